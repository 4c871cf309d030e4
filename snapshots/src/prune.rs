//! What a query's filters say about the snapshot files it can need.
//!
//! A snapshot's files are split by key hash into buckets, so a filter that pins every key
//! column to a few values (`id = 42`, `id IN (1, 2)`, `a = 1 AND b = 'x'`) names the buckets
//! whose files can hold a matching row; and a filter on the history's `_snapshot_id` or
//! `_run_id` names the snapshots that can. Everything else is left to the query: this only
//! decides which files are opened, never which rows are returned, so a filter it does not
//! understand costs time, not answers.

use std::collections::{BTreeSet, HashMap, HashSet};

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema};
use datafusion::common::ScalarValue;
use datafusion::logical_expr::expr::InList;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{BinaryExpr, Expr, Operator};
use datafusion::prelude::{ident, lit};

use crate::hash::{bucket_of, key_hashes};
use crate::manifest::{SnapshotFile, SnapshotManifest};
use crate::table::{RUN_ID_COLUMN, SNAPSHOT_ID_COLUMN};

/// Key combinations a compound key's filters may pin at most before pruning gives up (the
/// cross product of each column's values).
const MAX_PINNED_KEYS: usize = 4096;

/// The files a query's filters allow, by bucket and by snapshot.
#[derive(Debug, Default, Clone)]
pub(crate) struct Pruning {
    /// Values a column is pinned to by the filters (equality or `IN` list), by column name.
    pinned: HashMap<String, Vec<ScalarValue>>,
}

impl Pruning {
    /// What `filters` (conjuncts, as a table scan receives them) pin of the columns in
    /// `prunable` (key columns, the history's snapshot columns), for a table of `schema`.
    pub(crate) fn from_filters(filters: &[Expr], schema: &Schema, prunable: &HashSet<&str>) -> Self {
        let mut pinned: HashMap<String, Vec<ScalarValue>> = HashMap::new();
        for filter in filters {
            for conjunct in split_conjunction(filter) {
                let Some((column, values)) = pinned_values(conjunct) else {
                    continue;
                };
                if !prunable.contains(column.as_str()) {
                    continue;
                }
                let Ok(field) = schema.field_with_name(&column) else {
                    continue;
                };
                if !values
                    .iter()
                    .all(|v| same_kind(&v.data_type(), field.data_type()))
                {
                    continue;
                }
                // Two filters on one column: either set holds every matching row; keep the
                // smaller.
                match pinned.get(&column) {
                    Some(known) if known.len() <= values.len() => {}
                    _ => {
                        pinned.insert(column, values);
                    }
                }
            }
        }
        Self { pinned }
    }

    /// Whether the filters prune nothing.
    pub(crate) fn is_empty(&self) -> bool {
        self.pinned.is_empty()
    }

    /// Whether the filters allow rows of `manifest` (by its id and run).
    pub(crate) fn keeps_snapshot(&self, manifest: &SnapshotManifest) -> bool {
        let allows = |column: &str, value: &str| {
            self.pinned.get(column).is_none_or(|values| {
                values.iter().any(|v| match v {
                    ScalarValue::Utf8(Some(s))
                    | ScalarValue::LargeUtf8(Some(s))
                    | ScalarValue::Utf8View(Some(s)) => s == value,
                    _ => false,
                })
            })
        };
        allows(SNAPSHOT_ID_COLUMN, &manifest.id) && allows(RUN_ID_COLUMN, &manifest.run_id)
    }

    /// The buckets (of `buckets`) whose files can hold rows the filters allow, for a snapshot
    /// keyed by `key_columns`; `None` when the filters do not pin every key column.
    pub(crate) fn buckets(&self, key_columns: &[String], buckets: u32) -> Option<BTreeSet<u32>> {
        if key_columns.is_empty() || !buckets.is_power_of_two() {
            return None;
        }
        let mut columns = Vec::with_capacity(key_columns.len());
        let mut combinations = 1usize;
        for key in key_columns {
            let values = self.pinned.get(key)?;
            combinations = combinations.checked_mul(values.len())?;
            columns.push(values);
        }
        if combinations == 0 {
            // A key pinned to nothing but nulls: no row matches.
            return Some(BTreeSet::new());
        }
        if combinations > MAX_PINNED_KEYS {
            return None;
        }
        // Every combination as a row, the first column varying slowest.
        let mut arrays = Vec::with_capacity(columns.len());
        let mut fields = Vec::with_capacity(columns.len());
        let mut repeat = combinations;
        for (key, values) in key_columns.iter().zip(&columns) {
            repeat /= values.len();
            let cycle = combinations / (repeat * values.len());
            let rows =
                (0..cycle).flat_map(|_| values.iter().flat_map(|v| std::iter::repeat_n(v.clone(), repeat)));
            let array = ScalarValue::iter_to_array(rows).ok()?;
            fields.push(Field::new(key, array.data_type().clone(), true));
            arrays.push(array);
        }
        let batch = RecordBatch::try_new(std::sync::Arc::new(Schema::new(fields)), arrays).ok()?;
        let hashes = key_hashes(&batch, key_columns).ok()?;
        Some(hashes.into_iter().map(|h| bucket_of(h, buckets)).collect())
    }

    /// What the filters keep of `manifest`'s files, the key's buckets computed once for all
    /// its file lists.
    pub(crate) fn for_snapshot(&self, manifest: &SnapshotManifest) -> SnapshotPruning {
        let buckets = self.buckets(&manifest.key_columns, manifest.buckets);
        let key_filter = match &buckets {
            None => None,
            // A key pinned to nothing but nulls: no row matches.
            Some(buckets) if buckets.is_empty() => Some(lit(false)),
            Some(_) => manifest
                .key_columns
                .iter()
                .map(|k| {
                    let values = self.pinned.get(k)?;
                    Some(ident(k).in_list(values.iter().cloned().map(lit).collect(), false))
                })
                .collect::<Option<Vec<_>>>()
                .and_then(|filters| filters.into_iter().reduce(Expr::and)),
        };
        SnapshotPruning { buckets, key_filter }
    }
}

/// What a query's filters keep of one snapshot.
pub(crate) struct SnapshotPruning {
    /// The buckets whose files can hold matching rows; `None`: every bucket.
    buckets: Option<BTreeSet<u32>>,
    /// A filter holding every row of the keys pinned (each key column to its values); `None`
    /// when the filters do not pin the key.
    pub(crate) key_filter: Option<Expr>,
}

impl SnapshotPruning {
    /// Of `files` (one of the snapshot's file lists, all split into the same buckets), those
    /// the filters may need.
    pub(crate) fn files(&self, files: &[SnapshotFile]) -> Vec<SnapshotFile> {
        match &self.buckets {
            Some(buckets) => files
                .iter()
                .filter(|f| buckets.contains(&f.bucket))
                .cloned()
                .collect(),
            None => files.to_vec(),
        }
    }
}

/// The column and values a predicate pins it to: `c = v`, `v = c`, `c IN (v, ...)`, or a
/// disjunction of those on one column. Null values match nothing and are left out.
fn pinned_values(expr: &Expr) -> Option<(String, Vec<ScalarValue>)> {
    match expr {
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::Eq,
            right,
        }) => match (left.as_ref(), right.as_ref()) {
            (Expr::Column(c), Expr::Literal(v, _)) | (Expr::Literal(v, _), Expr::Column(c)) => {
                Some((c.name.clone(), non_null(vec![v.clone()])))
            }
            _ => None,
        },
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::Or,
            right,
        }) => {
            let (a, mut values) = pinned_values(left)?;
            let (b, more) = pinned_values(right)?;
            (a == b).then(|| {
                values.extend(more);
                (a, values)
            })
        }
        Expr::InList(InList {
            expr,
            list,
            negated: false,
        }) => {
            let Expr::Column(c) = expr.as_ref() else {
                return None;
            };
            let values = list
                .iter()
                .map(|e| match e {
                    Expr::Literal(v, _) => Some(v.clone()),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()?;
            Some((c.name.clone(), non_null(values)))
        }
        _ => None,
    }
}

fn non_null(mut values: Vec<ScalarValue>) -> Vec<ScalarValue> {
    values.retain(|v| !v.is_null());
    values.dedup();
    values
}

/// Whether a literal of type `value` compared with a column of type `column` compares values
/// the key hash hashes alike: the same type, or strings of any layout. (Anything else the
/// planner would have cast, and a cast's result is not what the file holds.)
fn same_kind(value: &DataType, column: &DataType) -> bool {
    let string = |t: &DataType| matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View);
    value == column || (string(value) && string(column))
}

#[cfg(test)]
mod tests {
    use datafusion::prelude::{col, lit};

    use super::*;
    use crate::hash::key_hashes;

    fn schema() -> Schema {
        Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("region", DataType::Utf8View, false),
            Field::new(RUN_ID_COLUMN, DataType::Utf8, true),
            Field::new("score", DataType::Float64, true),
        ])
    }

    fn prunable() -> HashSet<&'static str> {
        ["id", "region", RUN_ID_COLUMN].into_iter().collect()
    }

    fn bucket_of_row(id: i64, region: &str, buckets: u32) -> u32 {
        let batch = RecordBatch::try_new(
            std::sync::Arc::new(Schema::new(vec![
                Field::new("id", DataType::Int64, false),
                Field::new("region", DataType::Utf8, false),
            ])),
            vec![
                std::sync::Arc::new(arrow::array::Int64Array::from(vec![id])),
                std::sync::Arc::new(arrow::array::StringArray::from(vec![region])),
            ],
        )
        .unwrap();
        bucket_of(
            key_hashes(&batch, &["id".into(), "region".into()]).unwrap()[0],
            buckets,
        )
    }

    #[test]
    fn equalities_and_in_lists_on_every_key_column_name_buckets() {
        let keys = ["id".to_string(), "region".to_string()];
        let filters = [
            col("id").in_list(vec![lit(7i64), lit(9i64)], false),
            lit("eu").eq(col("region")).or(col("region").eq(lit("us"))),
        ];
        let pruning = Pruning::from_filters(&filters, &schema(), &prunable());
        let expected: BTreeSet<u32> = [(7, "eu"), (7, "us"), (9, "eu"), (9, "us")]
            .into_iter()
            .map(|(id, region)| bucket_of_row(id, region, 64))
            .collect();
        assert_eq!(pruning.buckets(&keys, 64), Some(expected));
        // A key column left free, a filter of another shape, or a cast literal: no pruning.
        assert_eq!(pruning.buckets(&["id".into(), "score".into()], 64), None);
        let on_score = Pruning::from_filters(&[col("score").eq(lit(1.5))], &schema(), &prunable());
        assert!(
            on_score.is_empty(),
            "a column that chooses no files is not pinned"
        );
        for unpinned in [
            col("id").gt(lit(7i64)),
            col("id").eq(lit(7i32)),
            col("id").in_list(vec![lit(7i64)], true),
            col("id").eq(lit(7i64)).or(col("region").eq(lit("eu"))),
        ] {
            let pruning = Pruning::from_filters(std::slice::from_ref(&unpinned), &schema(), &prunable());
            assert_eq!(pruning.buckets(&["id".into()], 16), None, "{unpinned}");
        }
    }

    #[test]
    fn run_and_snapshot_filters_name_snapshots() {
        let pruning = Pruning::from_filters(
            &[col(RUN_ID_COLUMN).in_list(vec![lit("r1"), lit("r3")], false)],
            &schema(),
            &prunable(),
        );
        let manifest = |run: &str| SnapshotManifest {
            format_version: crate::manifest::FORMAT_VERSION,
            id: format!("s-{run}"),
            model: "m".into(),
            run_id: run.into(),
            extracted_at: chrono::Utc::now(),
            key_columns: vec!["id".into()],
            buckets: 1,
            rows: 0,
            columns: Vec::new(),
            files: Vec::new(),
            parent: None,
            index: Vec::new(),
            layers: Vec::new(),
            changes: Vec::new(),
        };
        assert!(pruning.keeps_snapshot(&manifest("r1")));
        assert!(!pruning.keeps_snapshot(&manifest("r2")));
        assert!(Pruning::default().keeps_snapshot(&manifest("r2")));
    }
}
