//! Property test: the DataFusion diff against a plain in-memory reference diff, on random
//! snapshot pairs (composite keys, nulls in non-key columns, unicode strings, the Arrow types
//! sources produce, empty snapshots, everything changed, different bucket counts per side).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BinaryArray, BooleanArray, Date32Array, Decimal128Array, Float64Array, Int32Array, Int64Array,
    ListArray, RecordBatch, StringArray, Time64MicrosecondArray, TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Int64Type, Schema};
use proptest::prelude::*;
use sluice_engine::Op;
use sluice_engine::diff::{Baseline, ChangeCounts, Differ, OP};
use sluice_snapshots::{SnapshotManifest, SnapshotSpec, SnapshotStore, SnapshotWriter};

/// A non-key column type sources produce.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Int64,
    Int32,
    Float64,
    Text,
    Bool,
    Date,
    Time,
    Timestamp,
    Decimal,
    Binary,
    IntList,
}

const KINDS: [Kind; 11] = [
    Kind::Int64,
    Kind::Int32,
    Kind::Float64,
    Kind::Text,
    Kind::Bool,
    Kind::Date,
    Kind::Time,
    Kind::Timestamp,
    Kind::Decimal,
    Kind::Binary,
    Kind::IntList,
];

/// A value of any kind; `None` is null. Small domains so that "updates" sometimes keep a value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Value {
    Int(Option<i64>),
    Text(Option<String>),
    Bool(Option<bool>),
    List(Option<Vec<Option<i64>>>),
}

fn value_strategy(kind: Kind) -> BoxedStrategy<Value> {
    let int = prop_oneof![1 => Just(None), 6 => (-3i64..4).prop_map(Some)];
    match kind {
        Kind::Text => prop_oneof![
            1 => Just(None),
            6 => prop::sample::select(vec!["", "a", "é", "日本語", "🦀", "a\"b", "line\nbreak", "Ünïcödé"]).prop_map(|s| Some(s.to_string())),
        ]
        .prop_map(Value::Text)
        .boxed(),
        Kind::Bool => prop_oneof![1 => Just(None), 4 => any::<bool>().prop_map(Some)].prop_map(Value::Bool).boxed(),
        Kind::Binary => prop_oneof![
            1 => Just(None),
            4 => prop::sample::select(vec!["", "\u{0}", "xy", "\u{ff}"]).prop_map(|s| Some(s.to_string())),
        ]
        .prop_map(Value::Text)
        .boxed(),
        Kind::IntList => prop_oneof![
            1 => Just(None),
            4 => prop::collection::vec(prop_oneof![1 => Just(None), 3 => (0i64..3).prop_map(Some)], 0..3).prop_map(Some),
        ]
        .prop_map(Value::List)
        .boxed(),
        _ => int.prop_map(Value::Int).boxed(),
    }
}

fn array(kind: Kind, values: &[&Value]) -> ArrayRef {
    let ints = || {
        values
            .iter()
            .map(|v| if let Value::Int(i) = v { *i } else { None })
    };
    let texts = || {
        values
            .iter()
            .map(|v| if let Value::Text(t) = v { t.clone() } else { None })
    };
    match kind {
        Kind::Int64 => Arc::new(Int64Array::from_iter(ints())),
        Kind::Int32 => Arc::new(Int32Array::from_iter(ints().map(|v| v.map(|i| i as i32)))),
        Kind::Float64 => Arc::new(Float64Array::from_iter(ints().map(|v| v.map(|i| i as f64 / 4.0)))),
        Kind::Date => Arc::new(Date32Array::from_iter(
            ints().map(|v| v.map(|i| 19_000 + i as i32)),
        )),
        Kind::Time => Arc::new(Time64MicrosecondArray::from_iter(
            ints().map(|v| v.map(|i| 3_600_000_000 + i)),
        )),
        Kind::Timestamp => Arc::new(
            TimestampMicrosecondArray::from_iter(ints().map(|v| v.map(|i| 1_700_000_000_000_000 + i)))
                .with_timezone("UTC"),
        ),
        Kind::Decimal => Arc::new(
            Decimal128Array::from_iter(ints().map(|v| v.map(|i| i as i128 * 125)))
                .with_precision_and_scale(12, 2)
                .expect("valid decimal"),
        ),
        Kind::Text => Arc::new(StringArray::from_iter(texts())),
        Kind::Binary => Arc::new(BinaryArray::from_iter(texts().map(|t| t.map(|s| s.into_bytes())))),
        Kind::Bool => Arc::new(BooleanArray::from_iter(
            values
                .iter()
                .map(|v| if let Value::Bool(b) = v { *b } else { None }),
        )),
        Kind::IntList => Arc::new(ListArray::from_iter_primitive::<Int64Type, _, _>(
            values
                .iter()
                .map(|v| if let Value::List(l) = v { l.clone() } else { None }),
        )),
    }
}

/// A key: one or two columns, integer or text.
type Key = (i64, Option<String>);

#[derive(Debug, Clone)]
struct Case {
    composite: bool,
    kinds: Vec<Kind>,
    old: BTreeMap<Key, Vec<Value>>,
    new: BTreeMap<Key, Vec<Value>>,
    /// Order rows are written in (the new side is shuffled).
    new_order: Vec<Key>,
    old_buckets: u32,
    new_buckets: u32,
    /// The new snapshot is written as a delta of the old one (sharing its bucket count).
    delta: bool,
}

fn row_strategy(kinds: Vec<Kind>) -> impl Strategy<Value = Vec<Value>> {
    kinds.into_iter().map(value_strategy).collect::<Vec<_>>()
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        any::<bool>(),
        prop::sample::subsequence(KINDS.to_vec(), 1..=KINDS.len()),
        0usize..40,
        prop::sample::select(vec![1u32, 2, 4, 8]),
        prop::sample::select(vec![1u32, 2, 4, 8]),
        // How the new side relates: 0 mixed, 1 everything changed, 2 empty new, 3 empty old.
        prop::sample::select(vec![0u8, 0, 0, 1, 2, 3]),
        any::<bool>(),
    )
        .prop_flat_map(|(composite, kinds, n, old_buckets, new_buckets, shape, delta)| {
            let keys = prop::collection::btree_set(
                (
                    0i64..60,
                    prop::sample::select(vec!["x", "ÿ", "日"]).prop_map(|s| Some(s.to_string())),
                ),
                n,
            );
            let rows = prop::collection::vec(row_strategy(kinds.clone()), 80);
            let fates = prop::collection::vec(0u8..4, 80);
            let new_buckets = if delta { old_buckets } else { new_buckets };
            (
                Just((composite, kinds, old_buckets, new_buckets, shape, delta)),
                keys,
                rows,
                fates,
                any::<u64>(),
            )
        })
        .prop_map(
            |((composite, kinds, old_buckets, new_buckets, shape, delta), keys, rows, fates, seed)| {
                let key_of = |k: &Key| if composite { k.clone() } else { (k.0, None) };
                let keys: BTreeSet<Key> = keys.iter().map(key_of).collect();
                let mut old = BTreeMap::new();
                let mut new = BTreeMap::new();
                for (i, key) in keys.iter().enumerate() {
                    let fate = if shape == 1 {
                        1 + (i as u8 % 3)
                    } else {
                        fates[i % fates.len()]
                    };
                    let row = rows[i % rows.len()].clone();
                    let other = rows[(i * 7 + 3) % rows.len()].clone();
                    match fate {
                        0 => {
                            old.insert(key.clone(), row.clone());
                            new.insert(key.clone(), row);
                        }
                        1 => {
                            old.insert(key.clone(), row);
                        }
                        2 => {
                            new.insert(key.clone(), row);
                        }
                        _ => {
                            old.insert(key.clone(), row);
                            new.insert(key.clone(), other);
                        }
                    }
                }
                if shape == 1 {
                    // Every kept row gets a different value in its first column.
                    for row in new.values_mut() {
                        row[0] = match &row[0] {
                            Value::Int(v) => Value::Int(Some(v.unwrap_or(0) + 100)),
                            Value::Text(v) => {
                                Value::Text(Some(format!("{}!", v.clone().unwrap_or_default())))
                            }
                            Value::Bool(v) => Value::Bool(Some(!v.unwrap_or(false))),
                            Value::List(v) => {
                                Value::List(Some(vec![Some(v.as_ref().map_or(0, |l| l.len() as i64) + 9)]))
                            }
                        };
                    }
                }
                if shape == 2 {
                    new.clear();
                }
                if shape == 3 {
                    old.clear();
                }
                let mut new_order: Vec<Key> = new.keys().cloned().collect();
                // A deterministic shuffle from the seed.
                let mut state = seed | 1;
                for i in (1..new_order.len()).rev() {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    new_order.swap(i, (state % (i as u64 + 1)) as usize);
                }
                Case {
                    composite,
                    kinds,
                    old,
                    new,
                    new_order,
                    old_buckets,
                    new_buckets,
                    delta,
                }
            },
        )
}

fn batch(case: &Case, rows: &BTreeMap<Key, Vec<Value>>, order: &[Key]) -> RecordBatch {
    let mut fields = vec![Field::new("k1", DataType::Int64, false)];
    let mut columns: Vec<ArrayRef> = vec![Arc::new(Int64Array::from_iter_values(order.iter().map(|k| k.0)))];
    if case.composite {
        fields.push(Field::new("k2", DataType::Utf8, false));
        columns.push(Arc::new(StringArray::from_iter_values(
            order.iter().map(|k| k.1.clone().unwrap_or_default()),
        )));
    }
    for (i, kind) in case.kinds.iter().enumerate() {
        let values: Vec<&Value> = order.iter().map(|k| &rows[k][i]).collect();
        let column = array(*kind, &values);
        fields.push(Field::new(format!("c{i}"), column.data_type().clone(), true));
        columns.push(column);
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).expect("generated batch")
}

async fn write(
    store: &SnapshotStore,
    case: &Case,
    model: &str,
    batch: RecordBatch,
    buckets: u32,
    parent: Option<&SnapshotManifest>,
) -> SnapshotManifest {
    let keys = if case.composite {
        vec!["k1".to_string(), "k2".to_string()]
    } else {
        vec!["k1".to_string()]
    };
    let spec = SnapshotSpec {
        model: model.into(),
        run_id: "prop".into(),
        key_columns: keys,
        buckets: Some(buckets),
    };
    let mut writer = SnapshotWriter::new(store.clone(), spec);
    if let Some(parent) = parent {
        writer = writer.with_parent(parent.clone());
    }
    // Split in two to exercise several batches per bucket.
    let half = batch.num_rows() / 2;
    writer.write(batch.slice(0, half)).await.expect("write");
    writer
        .write(batch.slice(half, batch.num_rows() - half))
        .await
        .expect("write");
    writer.commit().await.expect("commit")
}

fn reference(case: &Case) -> BTreeMap<Key, Op> {
    let mut expected = BTreeMap::new();
    for (key, row) in &case.new {
        match case.old.get(key) {
            None => {
                expected.insert(key.clone(), Op::Added);
            }
            Some(old) if old != row => {
                expected.insert(key.clone(), Op::Updated);
            }
            Some(_) => {}
        }
    }
    for key in case.old.keys() {
        if !case.new.contains_key(key) {
            expected.insert(key.clone(), Op::Deleted);
        }
    }
    expected
}

async fn datafusion_diff(case: &Case, joined: bool) -> (BTreeMap<Key, Op>, usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SnapshotStore::open("snapshots", dir.path(), []).expect("store");
    let old_order: Vec<Key> = case.old.keys().cloned().collect();
    let old = write(
        &store,
        case,
        "m",
        batch(case, &case.old, &old_order),
        case.old_buckets,
        None,
    )
    .await;
    let new = write(
        &store,
        case,
        "m",
        batch(case, &case.new, &case.new_order),
        case.new_buckets,
        case.delta.then_some(&old),
    )
    .await;
    // A delta when asked for, unless there is nothing to layer on.
    assert_eq!(
        new.parent.is_some(),
        case.delta && !case.old.is_empty() && !case.new.is_empty(),
        "{new:?}"
    );
    let key_columns = new.key_columns.clone();
    let differ = Differ::new(
        store,
        Arc::new(new.clone()),
        Some(Baseline {
            snapshot: Some(Arc::new(old.clone())),
            exceptions: None,
        }),
    )
    .await
    .expect("differ");
    // A delta's recorded changes, and the join of its index with the old one.
    let differ = if joined { differ.joining_indexes() } else { differ };
    let manifests = |id: &str| {
        [&old, &new]
            .into_iter()
            .find(|m| m.id == id)
            .cloned()
            .map(Arc::new)
    };
    let mut found = BTreeMap::new();
    let mut materialised = 0;
    for bucket in 0..differ.buckets() {
        let changes = differ.changes(bucket).await.expect("changes");
        let counts = ChangeCounts::of(&changes);
        for batch in &changes {
            let k1 = batch.column_by_name("k1").expect("k1");
            let k1 = arrow::compute::cast(k1, &DataType::Int64).expect("cast");
            let k1 = k1.as_any().downcast_ref::<Int64Array>().expect("int64");
            let k2 = batch
                .column_by_name("k2")
                .map(|c| arrow::compute::cast(c, &DataType::Utf8).expect("cast"));
            let ops = batch.column_by_name(OP).expect("op");
            let ops = ops
                .as_any()
                .downcast_ref::<arrow::array::UInt8Array>()
                .expect("u8");
            for i in 0..batch.num_rows() {
                let key2 = k2.as_ref().map(|c| {
                    c.as_any()
                        .downcast_ref::<StringArray>()
                        .expect("utf8")
                        .value(i)
                        .to_string()
                });
                let previous = found.insert((k1.value(i), key2), Op::from_code(ops.value(i)).expect("op"));
                assert!(previous.is_none(), "a key came out of the diff twice");
            }
        }
        let streams = differ
            .materialize(
                bucket,
                &changes,
                &[Op::Added, Op::Updated, Op::Deleted],
                &manifests,
            )
            .await
            .expect("materialize");
        let mut rows = 0;
        for mut stream in streams {
            use futures::StreamExt;
            while let Some(batch) = stream.next().await {
                let batch = batch.expect("rows");
                rows += batch.num_rows();
                check_row_versions(&batch, &key_columns);
            }
        }
        assert_eq!(rows as u64, counts.total(), "every change has its full row");
        materialised += rows;
    }
    (found, materialised)
}

/// Each materialised row is the version its change row names: its hash is the new hash for
/// an added or updated record, the hash the destination has for a deleted one (whichever layer
/// of a delta it was read from).
fn check_row_versions(batch: &RecordBatch, key_columns: &[String]) {
    use sluice_engine::diff::{BASE_HASH, CHANGE_COLUMNS, NEW_HASH};
    let model_columns: Vec<usize> = (0..batch.num_columns())
        .filter(|i| !CHANGE_COLUMNS.contains(&batch.schema().field(*i).name().as_str()))
        .collect();
    let rows = batch.project(&model_columns).expect("model columns");
    let hashes = sluice_snapshots::hash::row_hashes(&rows, key_columns).expect("hash");
    let ops = batch.column_by_name(OP).expect("op");
    let ops = ops
        .as_any()
        .downcast_ref::<arrow::array::UInt8Array>()
        .expect("u8");
    let column = |name: &str| {
        let c =
            arrow::compute::cast(batch.column_by_name(name).expect(name), &DataType::UInt64).expect("cast");
        c.as_any()
            .downcast_ref::<arrow::array::UInt64Array>()
            .expect("u64")
            .clone()
    };
    let (new_hashes, base_hashes) = (column(NEW_HASH), column(BASE_HASH));
    for (i, hash) in hashes.iter().enumerate() {
        let expected = if Op::from_code(ops.value(i)) == Some(Op::Deleted) {
            base_hashes.value(i)
        } else {
            new_hashes.value(i)
        };
        assert_eq!(*hash, expected, "row {i} is the wrong version of its record");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    #[test]
    fn datafusion_diff_matches_the_reference(case in case_strategy()) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        let expected = reference(&case);
        for joined in [false, true] {
            let (found, materialised) = runtime.block_on(datafusion_diff(&case, joined));
            prop_assert_eq!(&found, &expected);
            prop_assert_eq!(materialised, expected.len());
        }
    }
}
