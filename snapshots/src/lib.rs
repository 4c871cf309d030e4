//! sluice's snapshot store: every extraction of a model kept as Parquet on object storage,
//! split into key-hash buckets, committed atomically by a manifest, and readable as DataFusion
//! tables. A snapshot is a base (every row) or a delta (an index of every key, and only the rows
//! its parent does not hold; see [`SnapshotWriter`]).

mod error;
mod fingerprints;
pub mod hash;
mod history;
mod manifest;
mod object_reader;
mod prune;
mod storage;
mod store;
mod table;
mod writer;

pub use error::{Result, SnapshotError};
pub use history::register_history;
pub use manifest::{
    BASE_HASH_COLUMN, CHANGE_OP_COLUMN, ColumnInfo, FORMAT_VERSION, LAYER_COLUMN, Layer, OP_ADDED,
    OP_DELETED, OP_UPDATED, RESERVED_PREFIX, ROW_HASH_COLUMN, SnapshotFile, SnapshotManifest, column_infos,
    covering,
};
pub use object_reader::ObjectFileReader;
pub use storage::{OpenError, OpenedStore, UnfinishedUpload, UploadJanitor, open_store, store_action};
pub use store::SnapshotStore;
pub use table::{
    EXTRACTED_AT_COLUMN, RUN_ID_COLUMN, SNAPSHOT_ID_COLUMN, read_files, read_rows, read_snapshot,
    register_snapshot,
};
pub use writer::{
    BatchHashes, MAX_LAYERS, PARTITIONS, Probe, ROWS_PER_BUCKET, SnapshotSpec, SnapshotWriter, buckets_for,
};
