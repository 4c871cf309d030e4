//! SQL over snapshot history, read-only: every model is a table of its latest snapshot, and
//! `<model>_history` holds every snapshot with `_snapshot_id`, `_run_id` and `_extracted_at`
//! (see [`sluice_snapshots::register_history`]). DDL, DML and statements (`COPY`, `SET`,
//! `CREATE EXTERNAL TABLE`, ...) are refused, so a query reads the snapshot store and nothing
//! else; results stop at a row limit and a query at a time limit.

use std::time::Duration;

use datafusion::execution::SendableRecordBatchStream;
use datafusion::execution::context::SQLOptions;
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::engine::Engine;
use crate::error::{EngineError, Result};

/// Bounds of one query.
#[derive(Debug, Clone, Copy)]
pub struct QueryLimits {
    /// Rows returned at most; the result says when it was cut.
    pub max_rows: usize,
    /// Time to plan the query and produce its first rows.
    pub timeout: Duration,
}

impl Default for QueryLimits {
    fn default() -> Self {
        Self {
            max_rows: 100_000,
            timeout: Duration::from_secs(60),
        }
    }
}

impl Engine {
    /// A session with every model's snapshot history registered.
    pub async fn history_context(&self) -> Result<SessionContext> {
        let ctx = SessionContext::new_with_config(SessionConfig::new().with_information_schema(true));
        self.snapshots.register_with(&ctx);
        for model in self.project.config.models.keys() {
            sluice_snapshots::register_history(&ctx, &self.snapshots, model)
                .await
                .map_err(|source| EngineError::Snapshot {
                    model: model.clone(),
                    source,
                })?;
        }
        Ok(ctx)
    }

    /// Runs a read-only query over snapshot history; the rows stream back, at most
    /// `limits.max_rows` of them.
    pub async fn query(&self, sql: &str, limits: QueryLimits) -> Result<SendableRecordBatchStream> {
        let ctx = self.history_context().await?;
        let options = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        let refused = |e: datafusion::error::DataFusionError| {
            EngineError::Usage(format!(
                "the query was refused: {e}. Queries are read-only SELECTs over the models' tables (`sluice query \"SHOW TABLES\"` lists them)"
            ))
        };
        let planned = async {
            let df = ctx.sql_with_options(sql, options).await.map_err(refused)?;
            let df = df.limit(0, Some(limits.max_rows)).map_err(refused)?;
            df.execute_stream().await.map_err(refused)
        };
        tokio::time::timeout(limits.timeout, planned).await.map_err(|_| {
            EngineError::Usage(format!(
                "the query did not start returning rows within {} s",
                limits.timeout.as_secs()
            ))
        })?
    }
}
