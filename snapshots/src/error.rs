use thiserror::Error;

/// Everything that can go wrong writing, reading or retiring a snapshot.
#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error("invalid snapshot store location `{location}`: {reason}")]
    InvalidLocation { location: String, reason: String },

    #[error("snapshot store at {location}: {source}")]
    Store {
        location: String,
        #[source]
        source: object_store::Error,
    },

    #[error("writing Parquet for model `{model}`: {source}")]
    Parquet {
        model: String,
        #[source]
        source: parquet::errors::ParquetError,
    },

    #[error("reading snapshot data: {0}")]
    DataFusion(#[from] datafusion::error::DataFusionError),

    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),

    #[error("snapshot manifest {path} is unreadable: {reason}")]
    BadManifest { path: String, reason: String },

    #[error("snapshot `{id}` of model `{model}` does not exist (it may have been retired)")]
    NotFound { model: String, id: String },

    #[error(
        "snapshot file `{path}` of model `{model}` is missing from the snapshot store; if files were removed by hand, run with --full to write a new base"
    )]
    MissingFile { model: String, path: String },

    #[error(
        "snapshot file `{path}` of model `{model}` has no column `{column}`; it was not written by this version of sluice or was changed by hand: run with --full to write a new base"
    )]
    DamagedFile {
        model: String,
        path: String,
        column: String,
    },

    #[error("primary key column `{column}` is not among the columns the query returns")]
    MissingKeyColumn { column: String },

    #[error(
        "column `{column}` has type {data_type}, which sluice cannot hash; cast it in the model's SQL (for example to text)"
    )]
    UnhashableColumn { column: String, data_type: String },

    #[error(
        "primary key column `{column}` is NULL in {rows} row(s) of the batch ending at row {at_row}; every row needs a key (filter them out or COALESCE the key in the model)"
    )]
    NullKey {
        column: String,
        rows: usize,
        at_row: u64,
    },

    #[error(
        "{duplicate_keys} primary key value(s) occur more than once, for example {examples}; a model's primary key must be unique"
    )]
    DuplicateKeys { duplicate_keys: u64, examples: String },

    #[error("column name `{column}` is reserved for sluice's own bookkeeping; rename it in the model's SQL")]
    ReservedColumn { column: String },

    #[error("the query returned batches with different schemas: expected {expected}, got {got}")]
    SchemaMismatch { expected: String, got: String },

    #[error(
        "model `{model}`: a changed row was taken for an unchanged one while streaming (a 64-bit fingerprint collision, odds of about one in 2^40 a row); nothing was committed, and the next run salts its fingerprints anew, so run it again"
    )]
    FingerprintCollision { model: String },

    #[error("background snapshot writer failed: {0}")]
    Task(String),
}

pub type Result<T, E = SnapshotError> = std::result::Result<T, E>;
