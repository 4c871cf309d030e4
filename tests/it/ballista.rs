//! `diff.engine: ballista`: the diff submitted to a Ballista scheduler (standalone: a scheduler
//! and an executor in this process, on loopback) gives exactly the local engine's change rows,
//! and a whole failure-and-retry cycle through the CLI behaves as it does locally.

use std::sync::Arc;

use arrow::array::{ArrayRef, Int32Array, Int64Array, RecordBatch, StringArray};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use sluice_engine::config::{DiffConfig, DiffEngineKind};
use sluice_engine::diff::{Baseline, Differ};
use sluice_snapshots::{SnapshotManifest, SnapshotSpec, SnapshotStore, SnapshotWriter};

fn users(ids: impl Iterator<Item = i64> + Clone, version: i32) -> RecordBatch {
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
            "score",
            // Every 20th row changes between versions.
            Arc::new(Int32Array::from_iter_values(
                ids.map(|i| (i % 100) as i32 + if i % 20 == 0 { version } else { 0 }),
            )) as ArrayRef,
        ),
    ])
    .expect("batch")
}

async fn snapshot(store: &SnapshotStore, run: &str, batch: RecordBatch, buckets: u32) -> SnapshotManifest {
    let spec = SnapshotSpec {
        model: "users".into(),
        run_id: run.into(),
        key_columns: vec!["id".into()],
        buckets: Some(buckets),
    };
    let mut writer = SnapshotWriter::new(store.clone(), spec);
    let half = batch.num_rows() / 2;
    writer.write(batch.slice(0, half)).await.expect("write");
    writer
        .write(batch.slice(half, batch.num_rows() - half))
        .await
        .expect("write");
    writer.commit().await.expect("commit")
}

/// Change rows as sorted text lines, one per row (engines may differ in batch order and in
/// the nullability they declare, not in values).
fn lines(batches: &[RecordBatch]) -> Vec<String> {
    let options = FormatOptions::default().with_null("NULL");
    let mut lines = Vec::new();
    for batch in batches {
        let formatters: Vec<ArrayFormatter> = batch
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options).expect("formatter"))
            .collect();
        for row in 0..batch.num_rows() {
            let cells: Vec<String> = batch
                .schema()
                .fields()
                .iter()
                .zip(&formatters)
                .map(|(field, f)| format!("{}={}", field.name(), f.value(row)))
                .collect();
            lines.push(cells.join(" "));
        }
    }
    lines.sort();
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ballista_diff_matches_the_local_engine() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SnapshotStore::open("snapshots", dir.path(), []).expect("store");
    // Old: 20,000 rows in 8 buckets; new: every 50th row deleted, every 20th updated, 500
    // added, in 4 buckets (so each diff bucket merges two files of the old snapshot).
    let old = snapshot(&store, "run-1", users(0..20_000, 0), 8).await;
    let kept: Vec<i64> = (0..20_500).filter(|i| i % 50 != 3).collect();
    let new = snapshot(&store, "run-2", users(kept.into_iter(), 1), 4).await;
    let config = DiffConfig {
        engine: DiffEngineKind::Ballista,
        scheduler: None,
        partitions: Some(4),
    };
    let cluster = sluice_engine::ballista::session(&config, &store)
        .await
        .expect("standalone Ballista");

    let cases: Vec<(&str, Option<Baseline>)> = vec![
        (
            "against a baseline snapshot",
            Some(Baseline {
                snapshot: Some(Arc::new(old.clone())),
                exceptions: None,
            }),
        ),
        ("first run (everything added)", None),
    ];
    for (case, baseline) in cases {
        let local = Differ::new(store.clone(), Arc::new(new.clone()), baseline)
            .await
            .expect("differ");
        let distributed = local.clone().on_cluster(cluster.clone());
        assert!(distributed.distributed());
        let mut total = 0;
        for bucket in 0..local.buckets() {
            let here = lines(&local.changes(bucket).await.expect("local diff"));
            let there = lines(&distributed.changes(bucket).await.expect("Ballista diff"));
            assert_eq!(here, there, "{case}: bucket {bucket}");
            total += here.len();
        }
        let expected = if case.starts_with("first") {
            new.rows as usize
        } else {
            // 400 deleted (i % 50 == 3, never a multiple of 20), 1,000 updated, 500 added
            // less the 10 of them that are left out.
            400 + 1_000 + 490
        };
        assert_eq!(total, expected, "{case}");
    }

    // A filtered backfill: matching rows go again as added, the rest as a normal diff.
    let local = Differ::new(
        store.clone(),
        Arc::new(new.clone()),
        Some(Baseline {
            snapshot: Some(Arc::new(old.clone())),
            exceptions: None,
        }),
    )
    .await
    .expect("differ")
    .resend_matching("score >= 98")
    .await
    .expect("filter");
    let distributed = local.clone().on_cluster(cluster.clone());
    for bucket in 0..local.buckets() {
        assert_eq!(
            lines(&local.changes(bucket).await.expect("local diff")),
            lines(&distributed.changes(bucket).await.expect("Ballista diff")),
            "filtered backfill: bucket {bucket}"
        );
    }
}

/// The CLI's whole cycle of failures and retries (exceptions, deletes carrying old rows,
/// updates that fail) with the diff on a standalone Ballista cluster.
#[tokio::test]
async fn runs_with_the_diff_on_ballista_behave_as_local_runs() {
    crate::cli::failed_records_cycle("diff: { engine: ballista, partitions: 2 }\n").await;
}
