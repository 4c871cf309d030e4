//! A model's snapshots as SQL tables: `<model>` (the latest snapshot) and `<model>_history`
//! (every committed snapshot, with its id, run and time).
//!
//! Both are table providers of their own rather than views, so a query's filters choose the
//! files before anything is opened: a filter pinning the key (`id = 42`, `id IN (...)`) reads
//! only the bucket that can hold it, of every snapshot and layer; one on `_run_id` or
//! `_snapshot_id` reads only those snapshots (and the layers they point into). A filter the
//! tables do not understand still applies; it just opens every file.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, ScalarValue};
use datafusion::dataframe::DataFrame;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::SessionState;
use datafusion::logical_expr::{Expr, LogicalPlan, TableProviderFilterPushDown, TableType};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::prelude::{SessionContext, cast, ident, lit};

use crate::error::Result;
use crate::manifest::{SnapshotFile, SnapshotManifest};
use crate::prune::Pruning;
use crate::store::SnapshotStore;
use crate::table::{
    EXTRACTED_AT_COLUMN, LAYER_TAG, RUN_ID_COLUMN, SNAPSHOT_ID_COLUMN, index_key, model_columns, read_files,
    read_rows_in,
};

/// Registers the snapshot history of `model` in `ctx`: table `<model>` is its latest snapshot,
/// and `<model>_history` every committed snapshot, oldest first, with `_snapshot_id`, `_run_id`
/// (the run that extracted it) and `_extracted_at`; sluice's own columns are left out. Snapshots
/// whose columns differ are aligned by name (a column missing from one is null there). Returns
/// the number of snapshots; nothing is registered for a model without any.
pub async fn register_history(ctx: &SessionContext, store: &SnapshotStore, model: &str) -> Result<usize> {
    let manifests = Arc::new(store.list_snapshots(model).await?);
    if manifests.is_empty() {
        return Ok(0);
    }
    for kind in [TableKind::Latest, TableKind::History] {
        let Some(whole) = read_table(ctx, store, &manifests, kind, &Pruning::default()).await? else {
            continue;
        };
        let table = SnapshotTable {
            store: store.clone(),
            manifests: Arc::clone(&manifests),
            kind,
            schema: Arc::new(whole.schema().as_arrow().clone()),
            whole: whole.into_unoptimized_plan(),
        };
        let name = match kind {
            TableKind::Latest => model.to_string(),
            TableKind::History => format!("{model}_history"),
        };
        ctx.register_table(name.as_str(), Arc::new(table))?;
    }
    Ok(manifests.len())
}

/// The rows of table `kind` in the files `pruning` keeps, in the table's column order when
/// nothing is pruned; `None` when no file is left.
async fn read_table(
    ctx: &SessionContext,
    store: &SnapshotStore,
    manifests: &[SnapshotManifest],
    kind: TableKind,
    pruning: &Pruning,
) -> Result<Option<DataFrame>> {
    match kind {
        TableKind::Latest => {
            let Some(latest) = manifests.last() else {
                return Ok(None);
            };
            let kept = pruning.for_snapshot(latest);
            let select = |files: &[SnapshotFile]| kept.files(files);
            let Some(rows) = read_rows_in(ctx, store, latest, &select).await? else {
                return Ok(None);
            };
            let columns = model_columns(&rows);
            Ok(Some(rows.select(columns)?))
        }
        TableKind::History => read_history(ctx, store, manifests, pruning).await,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TableKind {
    /// The latest snapshot's rows.
    Latest,
    /// Every snapshot's rows, with the snapshot's metadata.
    History,
}

/// `<model>` or `<model>_history`.
#[derive(Debug)]
struct SnapshotTable {
    store: SnapshotStore,
    /// Every committed snapshot of the model, oldest first (at least one).
    manifests: Arc<Vec<SnapshotManifest>>,
    kind: TableKind,
    /// The plan reading every file, whose schema is the table's.
    whole: LogicalPlan,
    schema: SchemaRef,
}

impl SnapshotTable {
    /// The columns whose filters choose files: every snapshot's key columns, and the
    /// history's snapshot columns.
    fn prunable(&self) -> HashSet<&str> {
        let mut columns: HashSet<&str> = self
            .manifests
            .iter()
            .flat_map(|m| m.key_columns.iter().map(String::as_str))
            .collect();
        if self.kind == TableKind::History {
            columns.extend([SNAPSHOT_ID_COLUMN, RUN_ID_COLUMN]);
        }
        columns
    }

    /// `frame`'s columns as the table's: by name, a column no kept snapshot has as null.
    /// `None` when a column's type differs (snapshots that retyped it were pruned away), so
    /// the caller reads the whole table instead.
    fn aligned(&self, frame: DataFrame) -> DfResult<Option<DataFrame>> {
        let mut columns = Vec::with_capacity(self.schema.fields().len());
        for field in self.schema.fields() {
            match frame.schema().field_with_unqualified_name(field.name()) {
                Ok(found) if found.data_type() == field.data_type() => columns.push(ident(field.name())),
                Ok(_) => return Ok(None),
                Err(_) if field.is_nullable() => {
                    columns.push(cast(lit(ScalarValue::Null), field.data_type().clone()).alias(field.name()))
                }
                Err(_) => return Ok(None),
            }
        }
        Ok(Some(frame.select(columns)?))
    }
}

#[async_trait]
impl TableProvider for SnapshotTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> DfResult<Vec<TableProviderFilterPushDown>> {
        // Every filter is applied to the rows read; what it pins also chooses the files.
        Ok(vec![TableProviderFilterPushDown::Exact; filters.len()])
    }

    async fn scan(
        &self,
        session: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let Some(state) = session.as_any().downcast_ref::<SessionState>() else {
            return Err(DataFusionError::Internal(
                "snapshot tables are planned in a DataFusion session".into(),
            ));
        };
        // The filters name the table's columns; the plan below has its own qualifiers.
        let filters = filters
            .iter()
            .map(|f| {
                f.clone()
                    .transform(|e| {
                        Ok(match e {
                            Expr::Column(c) if c.relation.is_some() => {
                                Transformed::yes(Expr::Column(Column::new_unqualified(c.name)))
                            }
                            e => Transformed::no(e),
                        })
                    })
                    .map(|t| t.data)
            })
            .collect::<DfResult<Vec<_>>>()?;
        let projected = match projection {
            Some(indices) => Arc::new(self.schema.project(indices)?),
            None => Arc::clone(&self.schema),
        };
        let pruning = Pruning::from_filters(&filters, &self.schema, &self.prunable());
        let whole = || DataFrame::new(state.clone(), self.whole.clone());
        let mut frame = if pruning.is_empty() {
            whole()
        } else {
            let ctx = SessionContext::new_with_state(state.clone());
            match read_table(&ctx, &self.store, &self.manifests, self.kind, &pruning)
                .await
                .map_err(external)?
            {
                None => return Ok(Arc::new(EmptyExec::new(projected))),
                Some(pruned) => match self.aligned(pruned)? {
                    Some(aligned) => aligned,
                    None => whole(),
                },
            }
        };
        if let Some(filter) = filters.into_iter().reduce(Expr::and) {
            frame = frame.filter(filter)?;
        }
        if let Some(indices) = projection {
            let columns: Vec<Expr> = indices
                .iter()
                .map(|&i| ident(self.schema.field(i).name()))
                .collect();
            frame = frame.select(columns)?;
        }
        if let Some(limit) = limit {
            frame = frame.limit(0, Some(limit))?;
        }
        state.create_physical_plan(frame.logical_plan()).await
    }
}

fn external(error: crate::SnapshotError) -> DataFusionError {
    DataFusionError::External(Box::new(error))
}

/// Every row of every snapshot in `manifests` that `pruning` keeps, with the snapshot's id, run
/// and time; in the table's column order when nothing is pruned.
///
/// Read as the layers are stored, each file once: every snapshot's own rows are its own; the
/// rows a delta shares with earlier snapshots are in those snapshots' files, found through the
/// delta's index. So the earlier layers' rows (each file read once, tagged with its layer) are
/// joined once with every delta's index (each tagged with its delta): one join for the whole
/// history, not one per snapshot and layer.
///
/// When the filters pin the key, the deltas' indexes are looked up first (their own rows
/// included): only the layer files that hold one of the keys' versions are then read, and the
/// few index entries found are joined with them in memory. A key's history then opens the
/// deltas' index files and the files of the versions it had, not every snapshot's rows.
async fn read_history(
    ctx: &SessionContext,
    store: &SnapshotStore,
    manifests: &[SnapshotManifest],
    pruning: &Pruning,
) -> Result<Option<DataFrame>> {
    use datafusion::logical_expr::{JoinType, case};

    let meta_values = |manifest: &SnapshotManifest| -> [Expr; 3] {
        [
            lit(manifest.id.as_str()),
            lit(manifest.run_id.as_str()),
            cast(
                lit(manifest.extracted_at.timestamp_micros()),
                arrow::datatypes::DataType::Timestamp(
                    arrow::datatypes::TimeUnit::Microsecond,
                    Some("UTC".into()),
                ),
            ),
        ]
    };
    let meta = |manifest: &SnapshotManifest| -> Vec<Expr> {
        let [id, run, at] = meta_values(manifest);
        vec![
            id.alias(SNAPSHOT_ID_COLUMN),
            run.alias(RUN_ID_COLUMN),
            at.alias(EXTRACTED_AT_COLUMN),
        ]
    };
    let union = |all: Option<DataFrame>, part: DataFrame| -> Result<DataFrame> {
        Ok(match all {
            None => part,
            Some(all) => all.union_by_name(part)?,
        })
    };
    // The history's columns: the first snapshot's, its metadata, then each column a later
    // snapshot adds, in the order they appeared.
    let mut order: Vec<String> = Vec::new();
    let mut parts: Option<DataFrame> = None;
    // Deltas grouped by their key columns (one join each; the key rarely changes).
    struct Shared {
        /// Layers' files by tag (the files of the buckets the filters keep).
        layers: BTreeMap<u32, Vec<SnapshotFile>>,
        members: Option<DataFrame>,
        /// The snapshots (ordinals into `manifests`) whose indexes `members` holds.
        members_of: Vec<u32>,
        tags: BTreeMap<String, u32>,
        /// The filter on the key columns when the filters pin them (the index is looked up
        /// first, own rows included).
        key_filter: Option<Expr>,
    }
    let mut shared: BTreeMap<Vec<String>, Shared> = BTreeMap::new();
    for (i, manifest) in manifests.iter().enumerate() {
        for column in &manifest.columns {
            if !order.contains(&column.name) {
                order.push(column.name.clone());
            }
        }
        if i == 0 {
            order.extend([SNAPSHOT_ID_COLUMN, RUN_ID_COLUMN, EXTRACTED_AT_COLUMN].map(String::from));
        }
        if !pruning.keeps_snapshot(manifest) {
            continue;
        }
        // Every list of a snapshot's files (own rows, index, layers) is split into the same
        // buckets, so the filters keep the same buckets of each.
        let kept = pruning.for_snapshot(manifest);
        let select = |files: &[SnapshotFile]| kept.files(files);
        // With the key pinned, a delta's index is looked up first (see above).
        let key_filter = if manifest.is_base() {
            None
        } else {
            kept.key_filter.clone()
        };
        if key_filter.is_none()
            && let Some(own) = read_files(ctx, store, &select(&manifest.files)).await?
        {
            let mut columns = model_columns(&own);
            columns.extend(meta(manifest));
            parts = Some(union(parts, own.select(columns)?)?);
        }
        if manifest.is_base() {
            continue;
        }
        let group = shared.entry(manifest.key_columns.clone()).or_insert(Shared {
            layers: BTreeMap::new(),
            members: None,
            members_of: Vec::new(),
            tags: BTreeMap::new(),
            key_filter: key_filter.clone(),
        });
        // Own rows go through the index too when it is looked up first.
        let last_layer = if key_filter.is_some() {
            manifest.own_layer()
        } else {
            manifest.own_layer().saturating_sub(1)
        };
        let mut tag_of_ordinal: Vec<(u32, u32)> = Vec::new();
        for ordinal in 0..=last_layer {
            let Some((snapshot, files)) = manifest.layer(ordinal) else {
                continue;
            };
            let next = group.tags.len() as u32;
            let tag = *group.tags.entry(snapshot.to_string()).or_insert(next);
            group.layers.entry(tag).or_insert_with(|| select(files));
            tag_of_ordinal.push((ordinal, tag));
        }
        if tag_of_ordinal.is_empty() {
            continue;
        }
        let Some(mut index) = read_files(ctx, store, &select(&manifest.index)).await? else {
            continue;
        };
        if let Some(filter) = &key_filter {
            index = index.filter(filter.clone())?;
        }
        let mut tag = case(ident(crate::manifest::LAYER_COLUMN));
        for (ordinal, layer_tag) in &tag_of_ordinal {
            tag = tag.when(lit(*ordinal), lit(*layer_tag));
        }
        let mut columns: Vec<Expr> = manifest
            .key_columns
            .iter()
            .enumerate()
            .map(|(i, k)| ident(k).alias(index_key(i)))
            .collect();
        columns.push(tag.end()?.alias(MEMBER_TAG));
        // Which snapshot, as an ordinal: its id, run and time come from it after the join.
        // (Literal metadata here would make DataFusion take each branch as sorted by
        // `_extracted_at` and drop the sort an `ORDER BY _extracted_at` needs.)
        columns.push(lit(i as u32).alias(MEMBER_SNAPSHOT));
        let members = index
            .filter(ident(crate::manifest::LAYER_COLUMN).lt_eq(lit(last_layer)))?
            .select(columns)?;
        group.members = Some(union(group.members.take(), members)?);
        group.members_of.push(i as u32);
    }
    for (keys, group) in shared {
        let Some(mut members) = group.members else {
            continue;
        };
        // With the key pinned, the index entries are few: found now, they say which layers'
        // files hold the rows.
        let mut layer_tags: Vec<u32> = group.layers.keys().copied().collect();
        if group.key_filter.is_some() {
            let found = members.collect().await?;
            layer_tags = found_tags(&found)?;
            if layer_tags.is_empty() {
                continue;
            }
            members = ctx.read_batches(found)?;
        }
        let mut layers: Option<DataFrame> = None;
        for tag in layer_tags {
            let Some(files) = group.layers.get(&tag) else {
                continue;
            };
            let Some(mut rows) = read_files(ctx, store, files).await? else {
                continue;
            };
            if let Some(filter) = &group.key_filter {
                rows = rows.filter(filter.clone())?;
            }
            let mut columns = model_columns(&rows);
            columns.push(lit(tag).alias(LAYER_TAG));
            layers = Some(union(layers, rows.select(columns)?)?);
        }
        let Some(layers) = layers else {
            continue;
        };
        let index_keys: Vec<String> = (0..keys.len()).map(index_key).collect();
        let mut left: Vec<&str> = keys.iter().map(String::as_str).collect();
        left.push(LAYER_TAG);
        let mut right: Vec<&str> = index_keys.iter().map(String::as_str).collect();
        right.push(MEMBER_TAG);
        // (The layer tag is sluice's own column, so not among the model's.)
        let mut columns = model_columns(&layers);
        let mut id = case(ident(MEMBER_SNAPSHOT));
        let mut run = case(ident(MEMBER_SNAPSHOT));
        let mut at = case(ident(MEMBER_SNAPSHOT));
        for &i in &group.members_of {
            let [snapshot_id, run_id, extracted_at] = meta_values(&manifests[i as usize]);
            id = id.when(lit(i), snapshot_id);
            run = run.when(lit(i), run_id);
            at = at.when(lit(i), extracted_at);
        }
        columns.push(id.end()?.alias(SNAPSHOT_ID_COLUMN));
        columns.push(run.end()?.alias(RUN_ID_COLUMN));
        columns.push(at.end()?.alias(EXTRACTED_AT_COLUMN));
        let joined = layers
            .join(members, JoinType::Inner, &left, &right, None)?
            .select(columns)?;
        parts = Some(union(parts, joined)?);
    }
    let Some(history) = parts else {
        return Ok(None);
    };
    if !pruning.is_empty() {
        // Some columns may be missing: the table aligns them.
        return Ok(Some(history));
    }
    Ok(Some(history.select(order.iter().map(ident).collect::<Vec<_>>())?))
}

/// The distinct layer tags of index entries found, ascending.
fn found_tags(found: &[arrow::array::RecordBatch]) -> Result<Vec<u32>> {
    use arrow::array::AsArray;
    let mut tags = std::collections::BTreeSet::new();
    for batch in found {
        let Some(column) = batch.column_by_name(MEMBER_TAG) else {
            continue;
        };
        let Some(values) = column.as_primitive_opt::<arrow::datatypes::UInt32Type>() else {
            return Err(DataFusionError::Internal(format!(
                "an index's layer tags are {}, not UInt32",
                column.data_type()
            ))
            .into());
        };
        tags.extend(values.iter().flatten());
    }
    Ok(tags.into_iter().collect())
}

/// The layer a delta's index puts a key in, as a tag of [`read_history`]'s layers.
const MEMBER_TAG: &str = "__sluice_member_layer";
/// The snapshot whose index a member row comes from, as an ordinal of [`read_history`]'s list.
const MEMBER_SNAPSHOT: &str = "__sluice_member_snapshot";

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
    use datafusion::physical_plan::displayable;
    use datafusion::prelude::SessionConfig;

    use super::*;
    use crate::writer::{SnapshotSpec, SnapshotWriter};

    async fn write(
        store: &SnapshotStore,
        run: &str,
        columns: Vec<(&str, ArrayRef)>,
        parent: Option<SnapshotManifest>,
    ) -> SnapshotManifest {
        let spec = SnapshotSpec {
            model: "m".into(),
            run_id: run.into(),
            key_columns: vec!["id".into()],
            buckets: Some(4),
        };
        let mut writer = SnapshotWriter::new(store.clone(), spec);
        if let Some(parent) = parent {
            writer = writer.with_parent(parent);
        }
        writer
            .write(RecordBatch::try_from_iter(columns).expect("batch"))
            .await
            .expect("write");
        writer.commit().await.expect("commit")
    }

    fn ids(from: i64, to: i64) -> ArrayRef {
        Arc::new(Int64Array::from_iter_values(from..to))
    }

    fn names(from: i64, to: i64, version: u32) -> ArrayRef {
        Arc::new(StringArray::from_iter_values(
            (from..to).map(|i| format!("v{version}-{i}")),
        ))
    }

    /// The data files a query's plan reads.
    async fn files_read(ctx: &SessionContext, sql: &str) -> Vec<String> {
        let plan = ctx
            .sql(sql)
            .await
            .expect("plan")
            .create_physical_plan()
            .await
            .expect("physical plan");
        let text = displayable(plan.as_ref()).indent(true).to_string();
        let mut files: Vec<String> = text
            .split(|c: char| c.is_whitespace() || matches!(c, '[' | ']' | ',' | '{' | '}'))
            .filter(|word| word.ends_with(".parquet"))
            .map(String::from)
            .collect();
        files.sort();
        files.dedup();
        files
    }

    async fn text_rows(ctx: &SessionContext, sql: &str) -> Vec<String> {
        let batches = ctx.sql(sql).await.expect("plan").collect().await.expect("run");
        let text = arrow::util::pretty::pretty_format_batches(&batches)
            .expect("format")
            .to_string();
        text.lines().map(str::to_string).collect()
    }

    #[tokio::test]
    async fn a_key_filter_reads_one_bucket_of_every_snapshot_and_a_run_filter_one_snapshot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SnapshotStore::open("s", dir.path(), []).expect("store");
        // Version 1: 400 rows; version 2: the first 40 names change and 40 rows are added;
        // version 3: one name changes.
        let name = |i: i64, version: u32| -> String {
            let changed_in = if !(40..400).contains(&i) {
                version.min(2)
            } else {
                1
            };
            let changed_in = if i == 7 && version == 3 { 3 } else { changed_in };
            format!("v{changed_in}-{i}")
        };
        let version = |rows: i64, v: u32| -> Vec<(&'static str, ArrayRef)> {
            vec![
                ("id", ids(0, rows)),
                (
                    "name",
                    Arc::new(StringArray::from_iter_values((0..rows).map(|i| name(i, v)))) as ArrayRef,
                ),
            ]
        };
        let first = write(&store, "run-1", version(400, 1), None).await;
        let second = write(&store, "run-2", version(440, 2), Some(first.clone())).await;
        let third = write(&store, "run-3", version(440, 3), Some(second.clone())).await;
        assert!(!second.is_base(), "the second snapshot is a delta");
        assert!(!third.is_base(), "the third snapshot is a delta");

        let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(2));
        register_history(&ctx, &store, "m").await.expect("register");
        let every = files_read(&ctx, "SELECT * FROM m_history").await;
        let one_key = files_read(&ctx, "SELECT * FROM m_history WHERE id = 7").await;
        assert!(
            one_key.len() * 3 <= every.len() && !one_key.is_empty(),
            "a key's lookup reads {} of {} files: {one_key:?}",
            one_key.len(),
            every.len()
        );
        // The key's three versions are in the base and in each delta's own rows: the deltas'
        // indexes are looked up while planning, and only those three files are read.
        assert_eq!(one_key.len(), 3, "{one_key:?}");
        let bucket = |path: &str| {
            path.rsplit('/')
                .next()
                .and_then(|f| f.split('-').nth(1))
                .map(String::from)
        };
        let buckets: std::collections::BTreeSet<_> = one_key.iter().filter_map(|f| bucket(f)).collect();
        assert_eq!(buckets.len(), 1, "one bucket: {one_key:?}");
        assert_eq!(
            text_rows(
                &ctx,
                "SELECT _run_id, name FROM m_history WHERE id = 7 ORDER BY _extracted_at"
            )
            .await[3..6],
            ["| run-1   | v1-7 |", "| run-2   | v2-7 |", "| run-3   | v3-7 |"]
        );
        assert_eq!(
            text_rows(&ctx, "SELECT name FROM m WHERE id IN (7, 80)  ORDER BY id").await[3..5],
            ["| v3-7  |", "| v1-80 |"]
        );
        // A run's rows read that snapshot's files and the layers they point into, not the
        // snapshots after it.
        let run_2 = files_read(&ctx, "SELECT * FROM m_history WHERE _run_id = 'run-2'").await;
        assert!(
            run_2.iter().all(|f| !f.contains(&third.id)),
            "run-2's rows read the third snapshot: {run_2:?}"
        );
        assert_eq!(
            text_rows(
                &ctx,
                "SELECT count(*) AS n FROM m_history WHERE _run_id = 'run-2'"
            )
            .await[3],
            "| 440 |"
        );
        // A key no snapshot holds, and a key pinned to null: nothing, without an error.
        assert_eq!(
            text_rows(&ctx, "SELECT count(*) AS n FROM m_history WHERE id = 100000").await[3],
            "| 0 |"
        );
        assert_eq!(
            text_rows(&ctx, "SELECT count(*) AS n FROM m WHERE id = NULL").await[3],
            "| 0 |"
        );
    }

    #[tokio::test]
    async fn snapshots_chosen_by_run_are_aligned_with_columns_added_later() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SnapshotStore::open("s", dir.path(), []).expect("store");
        let first = write(
            &store,
            "run-1",
            vec![("id", ids(0, 10)), ("name", names(0, 10, 1))],
            None,
        )
        .await;
        let plan: ArrayRef = Arc::new(StringArray::from_iter_values((0..10).map(|i| format!("p{i}"))));
        write(
            &store,
            "run-2",
            vec![("id", ids(0, 10)), ("name", names(0, 10, 2)), ("plan", plan)],
            Some(first),
        )
        .await;
        let ctx = SessionContext::new();
        register_history(&ctx, &store, "m").await.expect("register");
        assert_eq!(
            text_rows(
                &ctx,
                "SELECT id, name, plan FROM m_history WHERE _run_id = 'run-1' AND id = 3"
            )
            .await[3],
            "| 3  | v1-3 |      |"
        );
        assert_eq!(
            text_rows(
                &ctx,
                "SELECT id, name, plan FROM m_history WHERE _run_id = 'run-2' AND id = 3"
            )
            .await[3],
            "| 3  | v2-3 | p3   |"
        );
        assert_eq!(
            text_rows(
                &ctx,
                "SELECT _run_id, plan FROM m_history WHERE id = 3 ORDER BY _run_id"
            )
            .await[3..5],
            ["| run-1   |      |", "| run-2   | p3   |"]
        );
    }
}
