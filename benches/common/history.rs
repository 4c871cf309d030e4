//! The snapshot history the history benchmarks query: `snapshots` snapshots of a `rows`-row
//! `users` model (id, email, plan, lead score), 5% of rows changing plan between snapshots.

use std::sync::Arc;

use arrow::array::{ArrayRef, Int32Array, Int64Array, RecordBatch, StringArray};
use sluice_snapshots::{SnapshotSpec, SnapshotStore, SnapshotWriter};

const BATCH: usize = 65_536;

/// Rows `ids` of version `version` of the model.
pub fn batch(ids: std::ops::Range<i64>, version: i64) -> RecordBatch {
    let plans = ["free", "starter", "pro", "enterprise"];
    let plan = |i: i64| plans[((i + if i % 20 == 0 { version } else { 0 }) % 4) as usize];
    RecordBatch::try_from_iter(vec![
        (
            "id",
            Arc::new(Int64Array::from_iter_values(ids.clone())) as ArrayRef,
        ),
        (
            "email",
            Arc::new(StringArray::from_iter_values(
                ids.clone().map(|i| format!("user{i}@example.com")),
            )) as ArrayRef,
        ),
        (
            "plan",
            Arc::new(StringArray::from_iter_values(ids.clone().map(plan))) as ArrayRef,
        ),
        (
            "lead_score",
            Arc::new(Int32Array::from_iter_values(ids.map(|i| (i % 100) as i32))) as ArrayRef,
        ),
    ])
    .expect("batch")
}

/// Commits the snapshots (runs `run-0`, `run-1`, ...) of the `users` model to `store`: each a
/// delta of the one before when `layered` (as `sluice run` writes them), else each a base (every
/// row stored again: the layout before deltas).
pub async fn write_snapshots(store: &SnapshotStore, rows: i64, snapshots: i64, layered: bool) {
    let mut parent = None;
    for version in 0..snapshots {
        let spec = SnapshotSpec {
            model: "users".into(),
            run_id: format!("run-{version}"),
            key_columns: vec!["id".into()],
            buckets: None,
        };
        let mut writer = SnapshotWriter::new(store.clone(), spec);
        if let Some(parent) = parent.take().filter(|_| layered) {
            writer = writer.with_parent(parent);
        }
        let mut start = 0;
        while start < rows {
            let end = (start + BATCH as i64).min(rows);
            writer.write(batch(start..end, version)).await.expect("write");
            start = end;
        }
        parent = Some(writer.commit().await.expect("commit"));
    }
}
