use std::path::PathBuf;

use thiserror::Error;

/// A problem in `sluice.yaml`: where it is and what to do about it.
#[derive(Debug, Error)]
#[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct ConfigError {
    pub path: PathBuf,
    /// 1-based line, when it could be found.
    pub line: Option<usize>,
    pub message: String,
}

/// What a source reports when it cannot connect or a model's query fails.
#[derive(Debug, Clone, Error)]
pub enum SourceError {
    #[error("cannot connect to source `{source_name}`: {message}{}", hint_suffix(hint))]
    Connect {
        source_name: String,
        message: String,
        hint: Option<String>,
    },
    #[error(
        "model `{model}`: the query failed in source `{source_name}`: {message}{}",
        hint_suffix(hint)
    )]
    Query {
        model: String,
        source_name: String,
        message: String,
        hint: Option<String>,
    },
    #[error(
        "model `{model}`: column `{column}` has database type {database_type}, which sluice cannot carry; {hint}"
    )]
    UnsupportedType {
        model: String,
        column: String,
        database_type: String,
        hint: String,
    },
    #[error("source `{source_name}` is misconfigured: {message}")]
    Config { source_name: String, message: String },
    /// The model's output broke one of sluice's limits (`limits:` in sluice.yaml).
    #[error("model `{model}`: {message}")]
    Limit { model: String, message: String },
}

/// What a destination reports outside of per-record results.
#[derive(Debug, Error)]
pub enum DestinationError {
    #[error("destination `{destination}` is misconfigured: {message}")]
    Config { destination: String, message: String },
    #[error("cannot reach destination `{destination}`: {message}")]
    Unreachable { destination: String, message: String },
    #[error("destination `{destination}` failed: {message}")]
    Failed { destination: String, message: String },
}

/// A mapping that cannot be applied to its model's columns.
#[derive(Debug, Error)]
#[error("mapping `{mapping}`: {message}")]
pub struct MappingError {
    pub mapping: String,
    pub message: String,
}

/// Everything a run can fail with.
#[derive(Debug, Error)]
pub enum EngineError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Destination(#[from] DestinationError),
    #[error(transparent)]
    Mapping(#[from] MappingError),
    #[error("model `{model}`: {source}")]
    Snapshot {
        model: String,
        #[source]
        source: sluice_snapshots::SnapshotError,
    },
    #[error("snapshot store: {0}")]
    SnapshotStore(#[from] sluice_snapshots::SnapshotError),
    #[error("mapping `{mapping}`: diff failed: {source}")]
    Diff {
        mapping: String,
        #[source]
        source: datafusion::error::DataFusionError,
    },
    #[error("metadata store ({location}): {source}")]
    Metadata {
        location: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("metadata store migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error(
        "mapping `{mapping}`: the baseline cannot be compared with the new snapshot: {reason}. Run it once with --full to send every row again and start a new baseline"
    )]
    IncompatibleBaseline { mapping: String, reason: String },
    #[error("unknown {kind} `{name}`{}", available_suffix(available))]
    Unknown {
        kind: &'static str,
        name: String,
        available: Vec<String>,
    },
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// A request that cannot be served as asked (no such record, wrong number of values).
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Internal(String),
}

fn hint_suffix(hint: &Option<String>) -> String {
    hint.as_ref().map(|h| format!(" (hint: {h})")).unwrap_or_default()
}

fn available_suffix(available: &[String]) -> String {
    if available.is_empty() {
        String::new()
    } else {
        format!(" (defined: {})", available.join(", "))
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
