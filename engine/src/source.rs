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
}

/// What connectors need to know about the project they are built for.
#[derive(Debug, Clone)]
pub struct ConnectorEnv {
    /// Directory relative paths in `sluice.yaml` resolve against.
    pub base_dir: PathBuf,
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
}
