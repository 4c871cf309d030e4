//! The `Source` trait that connectors implement: run a model's SQL, stream Arrow batches.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
pub use datafusion::execution::SendableRecordBatchStream;

use crate::config::ConnectorConfig;
use crate::destination::Destination;
use crate::error::SourceError;

/// What a source is asked to run.
#[derive(Debug, Clone)]
pub struct ModelQuery {
    pub model: String,
    pub sql: String,
    /// The whole result goes into a snapshot (a sync), rather than a preview or a probe: a
    /// warehouse source configured with an unload location may then unload it to object storage
    /// and read it back, which pays off only for a whole result.
    pub bulk: bool,
}

impl ModelQuery {
    /// A query for a preview, a probe or a test: read as it streams, never unloaded.
    pub fn new(model: impl Into<String>, sql: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            sql: sql.into(),
            bulk: false,
        }
    }
}

/// A place models are queried: a database, a warehouse, files.
#[async_trait]
pub trait Source: Send + Sync + 'static {
    /// The `type` in `sluice.yaml`.
    fn kind(&self) -> &'static str;

    /// Connects and reports the source's own error, with a hint, when it cannot.
    async fn check(&self) -> Result<(), SourceError>;

    /// Runs the model's query. The stream yields the result in batches as the source produces
    /// them; it never holds the whole result. Errors met while streaming are
    /// `DataFusionError::External` wrapping a [`SourceError`].
    async fn extract(&self, query: &ModelQuery) -> Result<SendableRecordBatchStream, SourceError>;

    /// The model's query as streams that may be read concurrently (the rows of all of them
    /// together, in no particular order). A source whose engine reads in parallel hands its
    /// partitions over, so that the work done on each row as it arrives (hashing) runs on the
    /// threads that decode it. By default one stream, [`Source::extract`]'s.
    async fn extract_partitions(
        &self,
        query: &ModelQuery,
    ) -> Result<Vec<SendableRecordBatchStream>, SourceError> {
        Ok(vec![self.extract(query).await?])
    }

    /// The model's SQL wrapped so that at most `limit` rows come back, in this source's dialect
    /// (previews, probes and record lookups use it). By default `SELECT * FROM (...) LIMIT n`.
    fn limit_sql(&self, sql: &str, limit: u64) -> String {
        limit_sql(sql, limit)
    }

    /// Checks that a model's query is valid and readable here, without reading its rows: the
    /// tables exist and the user may read them. By default the query is run with `LIMIT 0`.
    async fn check_query(&self, query: &ModelQuery) -> Result<(), SourceError> {
        let probe = ModelQuery::new(query.model.clone(), self.limit_sql(&query.sql, 0));
        let mut stream = self.extract(&probe).await?;
        while let Some(batch) = futures::StreamExt::next(&mut stream).await {
            batch.map_err(|e| SourceError::Query {
                model: query.model.clone(),
                source_name: String::new(),
                message: e.to_string(),
                hint: None,
            })?;
        }
        Ok(())
    }
}

/// Removes trailing whitespace and semicolons, which cannot stand inside a subquery or
/// `COPY (...)`.
pub fn strip_statement_end(sql: &str) -> &str {
    sql.trim_end_matches(|c: char| c.is_whitespace() || c == ';')
}

/// Wraps a model's SQL so that at most `limit` rows come back. Every SQL source sluice has
/// (DataFusion, SQLite, PostgreSQL, MySQL) accepts this form.
pub fn limit_sql(sql: &str, limit: u64) -> String {
    let body = strip_statement_end(sql);
    // The newline keeps a trailing `-- comment` in the model from swallowing the wrapper.
    format!("SELECT * FROM (\n{body}\n) AS sluice_limited LIMIT {limit}")
}

/// What connectors need to know about the project they are built for.
#[derive(Debug, Clone)]
pub struct ConnectorEnv {
    /// Directory relative paths in `sluice.yaml` resolve against.
    pub base_dir: PathBuf,
    /// The project's state directory (metadata store, SSH keys).
    pub state_dir: PathBuf,
}

impl ConnectorEnv {
    /// For tests and tools: a project rooted at `base_dir` with the default state directory.
    pub fn rooted_at(base_dir: impl Into<PathBuf>) -> Self {
        let base_dir = base_dir.into();
        Self {
            state_dir: base_dir.join(".sluice"),
            base_dir,
        }
    }

    /// A path from the config file: absolute as written, else relative to `sluice.yaml`.
    pub fn resolve_path(&self, path: &str) -> PathBuf {
        let path = PathBuf::from(path);
        if path.is_absolute() {
            path
        } else {
            self.base_dir.join(path)
        }
    }
}

/// Builds sources and destinations from their config. Implemented by `sluice-connectors`; the
/// engine only knows the traits.
pub trait ConnectorFactory: Send + Sync {
    /// Parses `config` (strictly) into a source; the error says what is wrong with the options.
    fn source(
        &self,
        name: &str,
        config: &ConnectorConfig,
        env: &ConnectorEnv,
    ) -> Result<Arc<dyn Source>, String>;

    fn destination(
        &self,
        name: &str,
        config: &ConnectorConfig,
        env: &ConnectorEnv,
    ) -> Result<Arc<dyn Destination>, String>;

    /// What posts alerts (see [`crate::alerts`]); `None` when alerts cannot be sent.
    fn alert_sender(&self) -> Option<Arc<dyn crate::alerts::AlertSender>> {
        None
    }

    /// The source and destination types this factory builds, with their options' schemas.
    fn catalog(&self) -> crate::connector_types::ConnectorCatalog {
        crate::connector_types::ConnectorCatalog::default()
    }
}
