//! Property test: the snapshot history SQL reads (`<model>` and `<model>_history`) holds exactly
//! the rows of every version written, whatever mix of bases, deltas and compactions the writer
//! chose, with a retired snapshot's layers still read through the deltas that need them.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::DataType;
use proptest::prelude::*;
use sluice_engine::datafusion::prelude::SessionContext;
use sluice_snapshots::{SnapshotManifest, SnapshotSpec, SnapshotStore, SnapshotWriter, register_history};

/// One version of the model: key → (c0, c1).
type Version = BTreeMap<i64, (Option<String>, Option<i64>)>;

/// A change to one key: keep, update, delete or (for an absent key) insert.
fn versions_strategy() -> impl Strategy<Value = (Vec<Version>, bool, u32)> {
    let row = (
        prop::option::of(prop::sample::select(vec!["a", "b", "ÿ", "日本"]).prop_map(String::from)),
        prop::option::of(-5i64..5),
    );
    (
        prop::collection::btree_map(0i64..80, row.clone(), 0..60),
        prop::collection::vec(prop::collection::vec((0i64..80, 0u8..4, row), 0..40), 1..7),
        any::<bool>(),
        prop::sample::select(vec![1u32, 2, 4]),
    )
        .prop_map(|(first, rounds, retire_first, buckets)| {
            let mut versions = vec![first];
            for changes in rounds {
                let mut next = versions.last().cloned().unwrap_or_default();
                for (key, fate, row) in changes {
                    match fate {
                        0 => {
                            next.remove(&key);
                        }
                        _ => {
                            next.insert(key, row);
                        }
                    }
                }
                versions.push(next);
            }
            (versions, retire_first, buckets)
        })
}

fn batch(version: &Version) -> RecordBatch {
    RecordBatch::try_from_iter(vec![
        (
            "k1",
            Arc::new(Int64Array::from_iter_values(version.keys().copied())) as ArrayRef,
        ),
        (
            "c0",
            Arc::new(StringArray::from_iter(version.values().map(|v| v.0.clone()))) as ArrayRef,
        ),
        (
            "c1",
            Arc::new(Int64Array::from_iter(version.values().map(|v| v.1))) as ArrayRef,
        ),
    ])
    .expect("batch")
}

async fn write(
    store: &SnapshotStore,
    version: &Version,
    run: usize,
    buckets: u32,
    parent: Option<SnapshotManifest>,
) -> SnapshotManifest {
    let spec = SnapshotSpec {
        model: "m".into(),
        run_id: format!("run-{run}"),
        key_columns: vec!["k1".into()],
        buckets: Some(buckets),
    };
    let mut writer = SnapshotWriter::new(store.clone(), spec);
    if let Some(parent) = parent {
        writer = writer.with_parent(parent);
    }
    let rows = batch(version);
    // Two batches, in an order unlike the key's.
    let half = rows.num_rows() / 2;
    writer
        .write(rows.slice(half, rows.num_rows() - half))
        .await
        .expect("write");
    writer.write(rows.slice(0, half)).await.expect("write");
    writer.commit().await.expect("commit")
}

/// The rows of `sql`, every value as text, sorted.
async fn rows(ctx: &SessionContext, sql: &str) -> Vec<Vec<Option<String>>> {
    let mut rows = rows_in_order(ctx, sql).await;
    rows.sort();
    rows
}

/// The rows of `sql`, every value as text, in the order the query gives them.
async fn rows_in_order(ctx: &SessionContext, sql: &str) -> Vec<Vec<Option<String>>> {
    let batches = ctx.sql(sql).await.expect("plan").collect().await.expect("run");
    let mut rows = Vec::new();
    for batch in batches {
        let columns: Vec<ArrayRef> = batch
            .columns()
            .iter()
            .map(|c| arrow::compute::cast(c, &DataType::Utf8).expect("as text"))
            .collect();
        for i in 0..batch.num_rows() {
            rows.push(
                columns
                    .iter()
                    .map(|c| {
                        let c = c.as_any().downcast_ref::<StringArray>().expect("text");
                        (!c.is_null(i)).then(|| c.value(i).to_string())
                    })
                    .collect(),
            );
        }
    }
    rows
}

fn expected(versions: &[(usize, &Version)], keys: Option<&[i64]>) -> Vec<Vec<Option<String>>> {
    let mut rows: Vec<Vec<Option<String>>> = versions
        .iter()
        .flat_map(|(run, version)| {
            version
                .iter()
                .filter(|(k, _)| keys.is_none_or(|keys| keys.contains(k)))
                .map(move |(k, (c0, c1))| {
                    vec![
                        Some(format!("run-{run}")),
                        Some(k.to_string()),
                        c0.clone(),
                        c1.map(|v| v.to_string()),
                    ]
                })
        })
        .collect();
    rows.sort();
    rows
}

async fn check(versions: Vec<Version>, retire_first: bool, buckets: u32) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SnapshotStore::open("snapshots", dir.path(), []).expect("store");
    let mut parent = None;
    let mut manifests = Vec::new();
    for (run, version) in versions.iter().enumerate() {
        let manifest = write(&store, version, run, buckets, parent.take()).await;
        parent = Some(manifest.clone());
        manifests.push(manifest);
    }
    // Retiring the first snapshot leaves its files to the deltas that still read them.
    let retired = retire_first && versions.len() > 1;
    if retired {
        store.retire("m", &manifests[0].id).await.expect("retire");
    }
    let kept: Vec<(usize, &Version)> = versions.iter().enumerate().skip(usize::from(retired)).collect();

    // Several partitions even for these small files, as large ones get.
    let mut config = sluice_engine::datafusion::prelude::SessionConfig::new().with_target_partitions(4);
    config.options_mut().optimizer.repartition_file_min_size = 1;
    let ctx = SessionContext::new_with_config(config);
    let registered = register_history(&ctx, &store, "m").await.expect("register");
    assert_eq!(registered, kept.len());
    let history = rows(&ctx, "SELECT _run_id, k1, c0, c1 FROM m_history").await;
    assert_eq!(history, expected(&kept, None));
    let latest = rows(&ctx, "SELECT k1, c0, c1 FROM m").await;
    let last = kept.last().expect("a version");
    let mut want: Vec<Vec<Option<String>>> = expected(&[*last], None)
        .into_iter()
        .map(|mut row| row.split_off(1))
        .collect();
    want.sort();
    assert_eq!(latest, want);
    // A key's history, through the predicate every file is pruned with.
    for key in [0, 7, 41, 79] {
        let one = rows(
            &ctx,
            &format!("SELECT _run_id, k1, c0, c1 FROM m_history WHERE k1 = {key}"),
        )
        .await;
        assert_eq!(one, expected(&kept, Some(&[key])), "key {key}");
    }
    // Several keys, alone and with a run: the files of their buckets, of the snapshots asked.
    let several = rows(
        &ctx,
        "SELECT _run_id, k1, c0, c1 FROM m_history WHERE k1 IN (3, 41, 77) OR k1 = 0",
    )
    .await;
    assert_eq!(several, expected(&kept, Some(&[0, 3, 41, 77])));
    let (run, version) = kept[0];
    let key_in_run = rows(
        &ctx,
        &format!("SELECT _run_id, k1, c0, c1 FROM m_history WHERE k1 IN (5, 6) AND _run_id = 'run-{run}'"),
    )
    .await;
    assert_eq!(key_in_run, expected(&[(run, version)], Some(&[5, 6])));
    let latest_keys = rows(&ctx, "SELECT k1, c0, c1 FROM m WHERE k1 = 7 OR k1 = 41").await;
    let mut want: Vec<Vec<Option<String>>> = expected(&[*kept.last().expect("a version")], Some(&[7, 41]))
        .into_iter()
        .map(|mut row| row.split_off(1))
        .collect();
    want.sort();
    assert_eq!(latest_keys, want);
    // One run's rows, through the metadata columns.
    let run = kept[kept.len() / 2].0;
    let one_run = rows(
        &ctx,
        &format!("SELECT _run_id, k1, c0, c1 FROM m_history WHERE _run_id = 'run-{run}'"),
    )
    .await;
    assert_eq!(one_run, expected(&[kept[kept.len() / 2]], None));
    // In the order of the runs that extracted them, then by key: the sort an `ORDER BY` on the
    // metadata asks for is kept (literal metadata once let DataFusion drop it).
    let ordered = rows_in_order(
        &ctx,
        "SELECT _run_id, k1, c0, c1 FROM m_history ORDER BY _extracted_at, k1",
    )
    .await;
    let mut want = expected(&kept, None);
    want.sort_by_key(|row| {
        (
            row[0].clone(),
            row[1].as_deref().and_then(|k| k.parse::<i64>().ok()),
        )
    });
    assert_eq!(ordered, want);
    let newest_first = rows_in_order(
        &ctx,
        "SELECT _run_id FROM m_history ORDER BY _extracted_at DESC LIMIT 3",
    )
    .await;
    let mut runs: Vec<Option<String>> = want.iter().map(|row| row[0].clone()).collect();
    runs.reverse();
    runs.truncate(3);
    assert_eq!(
        newest_first
            .into_iter()
            .map(|mut row| row.remove(0))
            .collect::<Vec<_>>(),
        runs
    );
    let layered = manifests.iter().filter(|m| !m.is_base()).count();
    eprintln!("{} versions, {layered} written as deltas", versions.len());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, .. ProptestConfig::default() })]

    #[test]
    fn history_tables_hold_every_version_written(
        (versions, retire_first, buckets) in versions_strategy()
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(check(versions, retire_first, buckets));
    }
}
