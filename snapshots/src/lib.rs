//! sluice's snapshot store: every extraction of a model kept as Parquet on object storage,
//! split into key-hash buckets, committed atomically by a manifest, and readable as DataFusion
//! tables.

mod error;
pub mod hash;
mod manifest;
mod storage;
mod store;
mod table;
mod writer;

pub use error::{Result, SnapshotError};
pub use manifest::{
    ColumnInfo, FORMAT_VERSION, RESERVED_PREFIX, ROW_HASH_COLUMN, SnapshotFile, SnapshotManifest,
    column_infos,
};
pub use storage::{OpenError, OpenedStore, UnfinishedUpload, UploadJanitor, open_store, store_action};
pub use store::SnapshotStore;
pub use table::{
    EXTRACTED_AT_COLUMN, RUN_ID_COLUMN, SNAPSHOT_ID_COLUMN, read_files, read_snapshot, register_history,
    register_snapshot,
};
pub use writer::{PARTITIONS, ROWS_PER_BUCKET, SnapshotSpec, SnapshotWriter, buckets_for};
