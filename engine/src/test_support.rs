//! What the engine's unit tests share.

use sluice_snapshots::{SnapshotSpec, SnapshotStore};

/// A snapshot store in `dir`, spilling under it too (never in the machine's temp directory).
pub(crate) fn snapshot_store(dir: &tempfile::TempDir) -> SnapshotStore {
    SnapshotStore::open("s", dir.path(), [])
        .unwrap()
        .with_temp_dir(dir.path().join("tmp"))
}

/// A snapshot of the `users` model, keyed by `key_columns`, for run `run-1`.
pub(crate) fn users_spec(key_columns: Vec<String>) -> SnapshotSpec {
    SnapshotSpec {
        model: "users".into(),
        run_id: "run-1".into(),
        key_columns,
        buckets: None,
    }
}
