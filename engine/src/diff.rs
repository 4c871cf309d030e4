//! The diff: which records of a new snapshot a destination has not acknowledged yet.
//!
//! A mapping's **baseline** is what its destination last acknowledged: a snapshot, plus an
//! optional **exceptions** file listing the keys whose acknowledged state differs from that
//! snapshot (records whose delivery failed: for each, the hash and snapshot of the state the
//! destination still has, or no hash when it has nothing). The effective baseline of a key is its
//! exception when it has one, else its row in the baseline snapshot. A baseline may have no
//! snapshot at all (a first run that was cut short): then the exceptions are all there is.
//!
//! The diff is a DataFusion full outer join on the primary key between the new snapshot and the
//! effective baseline, reading only key and hash columns, bucket by bucket: both snapshots are
//! split by key hash into nested power-of-two buckets, so bucket `b` of one only ever meets
//! bucket `b` of the other, and every bucket file is sorted by key, so the join is a streaming
//! sort-merge join (`SortMergeJoinExec`) that holds no hash table; buckets run in parallel.
//! Rows whose hashes differ (or that exist on one side only) come out as change rows:
//!
//! | column | meaning |
//! |---|---|
//! | key columns | the record's key (the new snapshot's types) |
//! | `__op` | 1 added, 2 updated, 3 deleted |
//! | `__new_hash` | row hash in the new snapshot (null when deleted) |
//! | `__base_hash` | row hash the destination has (null when it has none) |
//! | `__base_snapshot` | snapshot holding the row the destination has |
//! | `__attempts` | earlier failed deliveries of this record |
//! | `__first_failed_at` | when it first failed, if it has |
//!
//! The full rows are then read only for changed keys ([`Differ::materialize`]).

use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit, UInt8Type};
use datafusion::arrow::compute::SortOptions;
use datafusion::common::ScalarValue;
use datafusion::common::{DFSchema, NullEquality};
use datafusion::datasource::MemTable;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::logical_expr::{Operator, SortExpr, binary_expr};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::projection::ProjectionExpr;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::expressions::Column;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::joins::SortMergeJoinExec;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::prelude::{
    DataFrame, Expr, JoinType, ParquetReadOptions, SessionConfig, SessionContext, cast, ident, lit, when,
};
use sluice_snapshots::{
    BASE_HASH_COLUMN, CHANGE_OP_COLUMN, LAYER_COLUMN, ROW_HASH_COLUMN, SnapshotFile, SnapshotManifest,
    SnapshotStore, read_files, read_rows,
};

use crate::config::Op;

pub const OP: &str = "__op";
pub const NEW_HASH: &str = "__new_hash";
pub const BASE_HASH: &str = "__base_hash";
pub const BASE_SNAPSHOT: &str = "__base_snapshot";
pub const ATTEMPTS: &str = "__attempts";
pub const FIRST_FAILED_AT: &str = "__first_failed_at";
/// The base hash of a record whose add was in flight when its run stopped: the destination may
/// or may not have it (see [`crate::checkpoint`]). A real row hash equals it with probability
/// 2^-64.
pub const UNCERTAIN_HASH: u64 = u64::MAX;
/// Exceptions files also carry each key's hash (to filter by bucket) and its last error.
pub const KEY_HASH: &str = "__sluice_key_hash";
pub const LAST_ERROR: &str = "__last_error";
/// Whether a new row matches a filtered backfill's predicate (inside the diff only).
const RESEND: &str = "__resend";

/// Names of the change-row columns that follow the key columns.
pub const CHANGE_COLUMNS: [&str; 6] = [OP, NEW_HASH, BASE_HASH, BASE_SNAPSHOT, ATTEMPTS, FIRST_FAILED_AT];

/// Type of the `__first_failed_at` column.
pub fn failed_at_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// A mapping's acknowledged state, as the diff reads it.
#[derive(Debug, Clone)]
pub struct Baseline {
    /// `None`: the destination holds only what the exceptions list.
    pub snapshot: Option<Arc<SnapshotManifest>>,
    /// Path (in the snapshot store) of the exceptions file, when there are exceptions.
    pub exceptions: Option<String>,
}

/// Added, updated and deleted counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChangeCounts {
    pub added: u64,
    pub updated: u64,
    pub deleted: u64,
}

impl ChangeCounts {
    pub fn total(&self) -> u64 {
        self.added + self.updated + self.deleted
    }

    pub fn add(&mut self, other: ChangeCounts) {
        self.added += other.added;
        self.updated += other.updated;
        self.deleted += other.deleted;
    }

    /// Counts the ops of change batches.
    pub fn of(batches: &[RecordBatch]) -> Self {
        let mut counts = Self::default();
        for batch in batches {
            if let Some(ops) = batch
                .column_by_name(OP)
                .and_then(|a| a.as_primitive_opt::<UInt8Type>())
            {
                for op in ops.values().iter() {
                    match Op::from_code(*op) {
                        Some(Op::Added) => counts.added += 1,
                        Some(Op::Updated) => counts.updated += 1,
                        Some(Op::Deleted) => counts.deleted += 1,
                        None => {}
                    }
                }
            }
        }
        counts
    }
}

/// The diff between a new snapshot and a baseline, bucket by bucket.
#[derive(Clone)]
pub struct Differ {
    ctx: SessionContext,
    store: SnapshotStore,
    new: Arc<SnapshotManifest>,
    baseline: Option<Baseline>,
    buckets: u32,
    key_columns: Vec<String>,
    /// The new snapshot's key fields (types the change rows use).
    key_fields: Vec<Field>,
    /// The new snapshot's rows (model columns and row hash) and index files' schemas, and the
    /// baseline snapshot's index files', so planning a bucket reads no footers.
    new_schema: SchemaRef,
    new_index_schema: SchemaRef,
    base_schema: Option<SchemaRef>,
    /// A filtered backfill's predicate: new rows matching it are changes (added) whatever the
    /// baseline holds.
    resend: Option<Expr>,
    /// A Ballista session: each bucket's diff is submitted to its scheduler as a logical plan
    /// instead of running here.
    cluster: Option<SessionContext>,
    /// Whether the new snapshot's record of its changes may stand in for the join.
    use_recorded: bool,
}

impl Differ {
    /// Prepares the diff of `new` against `baseline` (`None`: every row is added).
    pub async fn new(
        store: SnapshotStore,
        new: Arc<SnapshotManifest>,
        baseline: Option<Baseline>,
    ) -> Result<Self> {
        let ctx = diff_context();
        store.register_with(&ctx);
        let buckets = match &baseline {
            Some(Baseline {
                snapshot: Some(snapshot),
                ..
            }) => new.buckets.min(snapshot.buckets),
            _ => new.buckets,
        };
        let schema = snapshot_schema(&ctx, &store, &new).await?;
        let new_index_schema = index_schema(&ctx, &store, &new).await?;
        let base_schema = match baseline.as_ref().and_then(|b| b.snapshot.as_ref()) {
            Some(snapshot) => Some(index_schema(&ctx, &store, snapshot).await?),
            None => None,
        };
        let key_fields = new
            .key_columns
            .iter()
            .map(|k| schema.field_with_name(k).cloned().map_err(DataFusionError::from))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            ctx,
            key_columns: new.key_columns.clone(),
            store,
            new,
            baseline,
            buckets,
            key_fields,
            new_schema: schema,
            new_index_schema,
            base_schema,
            resend: None,
            cluster: None,
            use_recorded: true,
        })
    }

    /// This diff executed on a Ballista cluster (`ctx` from [`crate::ballista::session`]): the
    /// same join and classification, as a logical plan the scheduler distributes. Full rows for
    /// the changes are still read here.
    pub fn on_cluster(mut self, ctx: SessionContext) -> Self {
        self.cluster = Some(ctx);
        self
    }

    /// This diff by the join of the two indexes even where the new snapshot's record of its
    /// changes would do (to check one against the other).
    pub fn joining_indexes(mut self) -> Self {
        self.use_recorded = false;
        self
    }

    /// Whether the diff runs on a Ballista cluster.
    pub fn distributed(&self) -> bool {
        self.cluster.is_some()
    }

    /// This diff with every new row matching `filter` (a SQL predicate over the model's
    /// columns) sent again as added, on top of what changed. Refused unless `filter` is a
    /// boolean expression of the new snapshot's columns, without subqueries or aggregates.
    pub async fn resend_matching(mut self, filter: &str) -> Result<Self> {
        let expr = filter_expr(&self.new_schema, filter)?;
        self.resend = Some(expr);
        Ok(self)
    }

    /// Number of buckets the diff runs in.
    pub fn buckets(&self) -> u32 {
        self.buckets
    }

    pub fn new_snapshot(&self) -> &Arc<SnapshotManifest> {
        &self.new
    }

    pub fn baseline(&self) -> Option<&Baseline> {
        self.baseline.as_ref()
    }

    pub fn key_columns(&self) -> &[String] {
        &self.key_columns
    }

    /// Schema of change rows.
    pub fn change_schema(&self) -> SchemaRef {
        let mut fields = self.key_fields.clone();
        fields.extend(change_fields());
        Arc::new(Schema::new(fields))
    }

    fn new_index_files(&self, bucket: u32) -> Vec<&SnapshotFile> {
        self.new.index_covering(bucket, self.buckets).collect()
    }

    /// Change rows of one bucket. With no baseline every row of the new snapshot is added.
    pub async fn changes(&self, bucket: u32) -> Result<Vec<RecordBatch>> {
        if let Some(parent) = self.recorded_changes_of() {
            return self.recorded_changes(parent, bucket).await;
        }
        if let Some(cluster) = &self.cluster {
            return self.changes_frame(cluster, bucket).await?.collect().await;
        }
        let plan = self.changes_plan(bucket).await?;
        datafusion::physical_plan::collect(plan, self.ctx.task_ctx()).await
    }

    /// The parent the new snapshot recorded its changes against, when that record is this
    /// diff: the baseline is the parent and nothing else (no exceptions, no filtered
    /// backfill). Every other case joins the two indexes.
    fn recorded_changes_of(&self) -> Option<&str> {
        let baseline = self.baseline.as_ref()?;
        let snapshot = baseline.snapshot.as_ref()?;
        let recorded = self.use_recorded
            && baseline.exceptions.is_none()
            && self.resend.is_none()
            && self.new.parent.as_deref() == Some(snapshot.id.as_str())
            && self.buckets == self.new.buckets;
        recorded.then_some(snapshot.id.as_str())
    }

    /// One bucket's change rows from the new snapshot's record of its changes since `parent`,
    /// with the layer holding each row (the new snapshot's own for added and updated rows,
    /// the parent's for deleted ones) as a last column, for [`Differ::materialize`].
    async fn recorded_changes(&self, parent: &str, bucket: u32) -> Result<Vec<RecordBatch>> {
        let files: Vec<&SnapshotFile> =
            sluice_snapshots::covering(&self.new.changes, self.new.buckets, bucket, self.buckets).collect();
        let Some(recorded) = read_files(&self.ctx, &self.store, files)
            .await
            .map_err(external)?
        else {
            return Ok(Vec::new());
        };
        let mut select: Vec<Expr> = self
            .key_fields
            .iter()
            .map(|f| cast(ident(f.name()), f.data_type().clone()).alias(f.name()))
            .collect();
        select.push(cast(ident(CHANGE_OP_COLUMN), DataType::UInt8).alias(OP));
        select.push(ident(ROW_HASH_COLUMN).alias(NEW_HASH));
        select.push(ident(BASE_HASH_COLUMN).alias(BASE_HASH));
        select.push(
            when(ident(BASE_HASH_COLUMN).is_null(), lit(ScalarValue::Utf8(None)))
                .otherwise(lit(parent))?
                .alias(BASE_SNAPSHOT),
        );
        select.push(lit(0i64).alias(ATTEMPTS));
        select.push(null_failed_at().alias(FIRST_FAILED_AT));
        select.push(ident(LAYER_COLUMN));
        recorded.select(select)?.collect().await
    }

    /// The new snapshot's side of one bucket: key columns, `__new_hash` and, for a filtered
    /// backfill against a baseline, `__resend`.
    async fn new_side(&self, ctx: &SessionContext, bucket: u32) -> Result<DataFrame> {
        let keys = &self.key_columns;
        let resend = self.baseline.as_ref().and(self.resend.as_ref());
        let mut new_columns = vec![(NEW_HASH, DataType::UInt64)];
        if resend.is_some() {
            new_columns.push((RESEND, DataType::Boolean));
        }
        let select = |_: &DataFrame| {
            let mut select: Vec<Expr> = keys.iter().map(ident).collect();
            select.push(ident(ROW_HASH_COLUMN).alias(NEW_HASH));
            if let Some(resend) = resend {
                select.push(resend.clone().is_true().alias(RESEND));
            }
            select
        };
        if resend.is_some() && !self.new.is_base() {
            // A filtered backfill of a delta: its filter needs the rows, which its layers hold
            // (in key order each, but not merged).
            let Some(rows) = read_rows(ctx, &self.store, &self.new, Some((bucket, self.buckets)))
                .await
                .map_err(external)?
            else {
                let empty = self.empty_frame(ctx, &new_columns)?;
                return Ok(empty);
            };
            let selected = select(&rows);
            let order: Vec<SortExpr> = keys.iter().map(|k| ident(k).sort(true, false)).collect();
            return rows.select(selected)?.sort(order);
        }
        // A base's index is its rows, so a filter over them reads them there.
        let schema = if resend.is_some() {
            &self.new_schema
        } else {
            &self.new_index_schema
        };
        self.sorted_side(
            ctx,
            self.new_index_files(bucket),
            schema,
            select,
            &new_columns,
            false,
        )
        .await
    }

    /// Every row of the new side as added (no baseline).
    fn all_added_changes(&self, new: DataFrame) -> Result<DataFrame> {
        let mut select: Vec<Expr> = self.key_columns.iter().map(ident).collect();
        select.push(lit(Op::Added as u8).alias(OP));
        select.push(ident(NEW_HASH));
        select.push(lit(ScalarValue::UInt64(None)).alias(BASE_HASH));
        select.push(lit(ScalarValue::Utf8(None)).alias(BASE_SNAPSHOT));
        select.push(lit(0i64).alias(ATTEMPTS));
        select.push(null_failed_at().alias(FIRST_FAILED_AT));
        new.select(select)
    }

    /// Over the joined rows: the condition for a change, and the change columns (expression,
    /// name). The same expressions serve the local physical plan and the logical plan sent to
    /// a cluster.
    fn classification(&self, baseline: &Baseline) -> Result<(Expr, Vec<(Expr, String)>)> {
        let keys = &self.key_columns;
        let resend = self.resend.as_ref();
        let with_extras = baseline.exceptions.is_some();
        let mut changed = binary_expr(ident(NEW_HASH), Operator::IsDistinctFrom, ident(BASE_HASH));
        if resend.is_some() {
            changed = changed.or(ident(RESEND).is_true());
        }
        // A record whose add was in flight when a run stopped may or may not be at the
        // destination: it is added again while the model has it, and deleted once it does not.
        // (A filtered backfill's matching rows go as added, whatever the baseline has.)
        let mut op = match resend {
            Some(_) => when(ident(RESEND).is_true(), lit(Op::Added as u8))
                .when(ident(BASE_HASH).is_null(), lit(Op::Added as u8)),
            None => when(ident(BASE_HASH).is_null(), lit(Op::Added as u8)),
        };
        let op = op
            .when(ident(NEW_HASH).is_null(), lit(Op::Deleted as u8))
            .when(ident(BASE_HASH).eq(lit(UNCERTAIN_HASH)), lit(Op::Added as u8))
            .otherwise(lit(Op::Updated as u8))?;
        // (`coalesce` written as the CASE it stands for: physical planning does not simplify.)
        let first_of = |a: Expr, b: Expr| when(a.clone().is_not_null(), a).otherwise(b);
        let mut select: Vec<(Expr, String)> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| Ok((first_of(ident(k), ident(base_key(i)))?, k.clone())))
            .collect::<Result<_>>()?;
        select.push((op, OP.into()));
        select.push((ident(NEW_HASH), NEW_HASH.into()));
        select.push((ident(BASE_HASH), BASE_HASH.into()));
        if with_extras {
            select.push((ident(BASE_SNAPSHOT), BASE_SNAPSHOT.into()));
            select.push((first_of(ident(ATTEMPTS), lit(0i64))?, ATTEMPTS.into()));
            select.push((ident(FIRST_FAILED_AT), FIRST_FAILED_AT.into()));
        } else {
            // Without exceptions every baseline row comes from the baseline snapshot.
            let id = baseline.snapshot.as_ref().map(|s| s.id.as_str());
            let snapshot = when(ident(BASE_HASH).is_null(), lit(ScalarValue::Utf8(None)))
                .otherwise(lit(ScalarValue::Utf8(id.map(str::to_string))))?;
            select.push((snapshot, BASE_SNAPSHOT.into()));
            select.push((lit(0i64), ATTEMPTS.into()));
            select.push((null_failed_at(), FIRST_FAILED_AT.into()));
        }
        Ok((changed, select))
    }

    /// One bucket's diff as a logical plan in `ctx` (a full outer join the context's planner
    /// picks the algorithm for): what a Ballista scheduler receives.
    pub async fn changes_frame(&self, ctx: &SessionContext, bucket: u32) -> Result<DataFrame> {
        let new = self.new_side(ctx, bucket).await?;
        let Some(baseline) = &self.baseline else {
            return self.all_added_changes(new);
        };
        let base = self.baseline_side(ctx, baseline, bucket).await?;
        let left: Vec<String> = self.key_columns.clone();
        let right: Vec<String> = (0..left.len()).map(base_key).collect();
        let left: Vec<&str> = left.iter().map(String::as_str).collect();
        let right: Vec<&str> = right.iter().map(String::as_str).collect();
        let (changed, select) = self.classification(baseline)?;
        new.join(base, JoinType::Full, &left, &right, None)?
            .filter(changed)?
            .select(
                select
                    .into_iter()
                    .map(|(e, name)| e.alias(name))
                    .collect::<Vec<_>>(),
            )
    }

    /// The physical plan of one bucket's diff: a full outer sort-merge join on the key of the
    /// new snapshot's bucket and the effective baseline's, both read sorted from their files,
    /// then the rows whose hashes differ, classified.
    pub async fn changes_plan(&self, bucket: u32) -> Result<Arc<dyn ExecutionPlan>> {
        let keys = &self.key_columns;
        let new = self.new_side(&self.ctx, bucket).await?;
        let Some(baseline) = &self.baseline else {
            return self.all_added_changes(new)?.create_physical_plan().await;
        };
        let base = self.baseline_side(&self.ctx, baseline, bucket).await?;

        let new_plan = new.create_physical_plan().await?;
        let base_plan = base.create_physical_plan().await?;
        let on: Vec<(Arc<dyn PhysicalExpr>, Arc<dyn PhysicalExpr>)> = (0..keys.len())
            .map(|i| {
                let left: Arc<dyn PhysicalExpr> = Arc::new(Column::new(&keys[i], i));
                let right: Arc<dyn PhysicalExpr> = Arc::new(Column::new(&base_key(i), i));
                (left, right)
            })
            .collect();
        let ascending = SortOptions {
            descending: false,
            nulls_first: false,
        };
        let joined: Arc<dyn ExecutionPlan> = {
            Arc::new(SortMergeJoinExec::try_new(
                new_plan,
                base_plan,
                on,
                None,
                JoinType::Full,
                vec![ascending; keys.len()],
                NullEquality::NullEqualsNothing,
            )?)
        };

        // Classify, with the same expressions a SQL query would use, planned against the join's
        // output.
        let schema = DFSchema::try_from(joined.schema().as_ref().clone())?;
        let physical = |expr: Expr| self.ctx.create_physical_expr(expr, &schema);
        let (changed, select) = self.classification(baseline)?;
        let filtered: Arc<dyn ExecutionPlan> = Arc::new(FilterExec::try_new(physical(changed)?, joined)?);
        let projection = select
            .into_iter()
            .map(|(expr, name)| Ok(ProjectionExpr::from((physical(expr)?, name))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Arc::new(ProjectionExec::try_new(projection, filtered)?))
    }

    /// One side of the join: the files' rows in key order, through `select`. A bucket made of
    /// several files (a snapshot with more buckets than the diff) is merged, not re-sorted,
    /// since every file is sorted by key.
    async fn sorted_side(
        &self,
        ctx: &SessionContext,
        files: Vec<&SnapshotFile>,
        schema: &SchemaRef,
        select: impl Fn(&DataFrame) -> Vec<Expr>,
        empty_columns: &[(&str, DataType)],
        rename_keys: bool,
    ) -> Result<DataFrame> {
        let order: Vec<SortExpr> = self
            .key_columns
            .iter()
            .map(|k| ident(k).sort(true, false))
            .collect();
        let mut frames = Vec::new();
        for file in files {
            let options = ParquetReadOptions::default()
                .schema(schema)
                .file_sort_order(vec![order.clone()]);
            let df = ctx
                .read_parquet(self.store.url(&file.path).to_string(), options)
                .await?;
            let select = select(&df);
            frames.push(df.select(select)?);
        }
        let side = match frames.len() {
            0 => {
                let empty = self.empty_frame(ctx, empty_columns)?;
                let mut select: Vec<Expr> = self.key_columns.iter().map(ident).collect();
                select.extend(empty_columns.iter().map(|(name, _)| ident(*name)));
                empty.select(select)?
            }
            1 => frames.remove(0),
            _ => {
                let mut union = frames.remove(0);
                for frame in frames {
                    union = union.union(frame)?;
                }
                union.sort(order.clone())?
            }
        };
        if !rename_keys {
            return Ok(side);
        }
        let columns: Vec<String> = side.schema().fields().iter().map(|f| f.name().clone()).collect();
        let select: Vec<Expr> = columns
            .iter()
            .map(|c| match self.key_columns.iter().position(|k| k == c) {
                Some(i) => cast(ident(c), self.key_fields[i].data_type().clone()).alias(base_key(i)),
                None => ident(c),
            })
            .collect();
        // A cast that changes the key's order (a number retyped as text, say) needs a re-sort;
        // widening casts keep the order and the sort is planned away.
        let renamed_order: Vec<SortExpr> = (0..self.key_columns.len())
            .map(|i| ident(base_key(i)).sort(true, false))
            .collect();
        side.select(select)?.sort(renamed_order)
    }

    /// The effective baseline of one bucket, sorted by key: key columns renamed `__base_key_<i>`
    /// (cast to the new snapshot's key types), `__base_hash` and, when there are exceptions,
    /// `__base_snapshot`, `__attempts`, `__first_failed_at`.
    async fn baseline_side(
        &self,
        ctx: &SessionContext,
        baseline: &Baseline,
        bucket: u32,
    ) -> Result<DataFrame> {
        let with_extras = baseline.exceptions.is_some();
        let snapshot_id = baseline
            .snapshot
            .as_ref()
            .map(|s| s.id.clone())
            .unwrap_or_default();
        let keys = self.key_columns.clone();
        let mut extra = vec![(BASE_HASH, DataType::UInt64)];
        if with_extras {
            extra.extend([
                (BASE_SNAPSHOT, DataType::Utf8),
                (ATTEMPTS, DataType::Int64),
                (FIRST_FAILED_AT, failed_at_type()),
            ]);
        }
        let files: Vec<&SnapshotFile> = match &baseline.snapshot {
            Some(snapshot) => snapshot.index_covering(bucket, self.buckets).collect(),
            None => Vec::new(),
        };
        // (With no snapshot there are no files, and the schema is not read.)
        let schema = self
            .base_schema
            .clone()
            .unwrap_or_else(|| self.new_index_schema.clone());
        let snapshot_rows = self
            .sorted_side(
                ctx,
                files,
                &schema,
                |_| {
                    let mut select: Vec<Expr> = keys.iter().map(ident).collect();
                    select.push(ident(ROW_HASH_COLUMN).alias(BASE_HASH));
                    if with_extras {
                        select.push(lit(snapshot_id.as_str()).alias(BASE_SNAPSHOT));
                        select.push(lit(0i64).alias(ATTEMPTS));
                        select.push(null_failed_at().alias(FIRST_FAILED_AT));
                    }
                    select
                },
                &extra,
                true,
            )
            .await?;
        let Some(exceptions_path) = &baseline.exceptions else {
            return Ok(snapshot_rows);
        };
        let exceptions = ctx
            .read_parquet(
                self.store.url(exceptions_path).to_string(),
                ParquetReadOptions::default(),
            )
            .await?
            .filter((ident(KEY_HASH) % lit(self.buckets as u64)).eq(lit(bucket as u64)))?;
        let mut select: Vec<Expr> = self
            .key_fields
            .iter()
            .enumerate()
            .map(|(i, field)| cast(ident(field.name()), field.data_type().clone()).alias(base_key(i)))
            .collect();
        select.extend([
            ident(BASE_HASH),
            cast(ident(BASE_SNAPSHOT), DataType::Utf8).alias(BASE_SNAPSHOT),
            ident(ATTEMPTS),
            ident(FIRST_FAILED_AT),
        ]);
        let exceptions = exceptions.select(select)?;
        // Keys with an exception take the exception's state instead of the snapshot's: the
        // snapshot's rows minus those keys (a hash anti join probing the sorted rows with the
        // few exception keys, which keeps their order), merged with the exceptions.
        let exception_keys = exceptions.clone().select(
            (0..self.key_fields.len())
                .map(|i| ident(base_key(i)).alias(format!("__exc_key_{i}")))
                .collect::<Vec<Expr>>(),
        )?;
        let on: Vec<Expr> = (0..self.key_fields.len())
            .map(|i| ident(format!("__exc_key_{i}")).eq(ident(base_key(i))))
            .collect();
        let order: Vec<SortExpr> = (0..self.key_fields.len())
            .map(|i| ident(base_key(i)).sort(true, false))
            .collect();
        exception_keys
            .join_on(snapshot_rows, JoinType::RightAnti, on)?
            .union(exceptions)?
            .sort(order)
    }

    /// An empty frame with the key columns and `extra` columns: typed nulls over no rows (an
    /// empty relation, which serializes to a cluster, unlike an in-memory table).
    fn empty_frame(&self, ctx: &SessionContext, extra: &[(&str, DataType)]) -> Result<DataFrame> {
        let mut columns: Vec<Expr> = self
            .key_fields
            .iter()
            .map(|f| Ok(lit(ScalarValue::try_from(f.data_type())?).alias(f.name())))
            .collect::<Result<_>>()?;
        for (name, data_type) in extra {
            columns.push(lit(ScalarValue::try_from(data_type)?).alias(*name));
        }
        ctx.read_empty()?.select(columns)?.filter(lit(false))
    }

    /// Full rows for the change rows `changes` (all of one bucket): the new snapshot's rows for
    /// added and updated records, the baseline's rows (from whichever snapshot holds them) for
    /// deleted ones. Each stream's batches have the snapshot's columns followed by the change
    /// columns; only ops in `ops` are read.
    pub async fn materialize(
        &self,
        bucket: u32,
        changes: &[RecordBatch],
        ops: &[Op],
        manifests: &(dyn Fn(&str) -> Option<Arc<SnapshotManifest>> + Sync),
    ) -> Result<Vec<SendableRecordBatchStream>> {
        let mut streams = Vec::new();
        // The change rows' own schema (the plan that produced them decides nullability).
        let changes_schema = changes
            .first()
            .map(|b| b.schema())
            .unwrap_or_else(|| self.change_schema());
        let wanted = |op: Op| ops.contains(&op);
        if changes_schema.column_with_name(LAYER_COLUMN).is_some() {
            // Recorded changes say which layer holds each row; the parent's layers are the
            // new snapshot's too, under the same ordinals.
            let selected = filter_ops(changes, wanted)?;
            let by_layer = split_by_layer(&selected, &changes_schema)?;
            return self.read_layers(&self.new, bucket, by_layer).await;
        }
        let upserts: Vec<RecordBatch> =
            filter_ops(changes, |op| matches!(op, Op::Added | Op::Updated) && wanted(op))?;
        if upserts.iter().any(|b| b.num_rows() > 0) {
            streams.extend(self.rows_for(&self.new, bucket, upserts, &changes_schema).await?);
        }
        if wanted(Op::Deleted) {
            let deletes = filter_ops(changes, |op| op == Op::Deleted)?;
            let mut by_snapshot: Vec<(String, Vec<RecordBatch>)> = Vec::new();
            for batch in deletes.into_iter().filter(|b| b.num_rows() > 0) {
                let snapshots = batch
                    .column_by_name(BASE_SNAPSHOT)
                    .ok_or_else(|| DataFusionError::Internal("change rows lack __base_snapshot".into()))?;
                let snapshots = arrow::compute::cast(snapshots, &DataType::Utf8)?;
                let snapshots = snapshots.as_string::<i32>();
                let mut ids: Vec<&str> = (0..snapshots.len())
                    .filter(|i| snapshots.is_valid(*i))
                    .map(|i| snapshots.value(i))
                    .collect();
                ids.sort_unstable();
                ids.dedup();
                for id in ids {
                    let mask = arrow::compute::kernels::cmp::eq(
                        snapshots,
                        &arrow::array::Scalar::new(arrow::array::StringArray::from(vec![id])),
                    )?;
                    let part = arrow::compute::filter_record_batch(&batch, &mask)?;
                    match by_snapshot.iter_mut().find(|(s, _)| s == id) {
                        Some((_, parts)) => parts.push(part),
                        None => by_snapshot.push((id.to_string(), vec![part])),
                    }
                }
            }
            for (id, parts) in by_snapshot {
                let manifest = manifests(&id).ok_or_else(|| {
                    DataFusionError::Execution(format!(
                        "snapshot {id}, which holds rows the destination still has, is gone; run with --full to start a new baseline"
                    ))
                })?;
                streams.extend(self.rows_for(&manifest, bucket, parts, &changes_schema).await?);
            }
        }
        Ok(streams)
    }

    /// The rows of `snapshot` for the keys of `changes` (of one bucket), with the change columns
    /// appended. A base's rows are in its own files; a delta's index says which layer holds each
    /// key's row, and each layer is read for its keys alone.
    async fn rows_for(
        &self,
        snapshot: &SnapshotManifest,
        bucket: u32,
        changes: Vec<RecordBatch>,
        changes_schema: &SchemaRef,
    ) -> Result<Vec<SendableRecordBatchStream>> {
        let table = |batches: Vec<RecordBatch>| -> Result<DataFrame> {
            let table = MemTable::try_new(changes_schema.clone(), vec![batches])?;
            self.ctx.read_table(Arc::new(table))
        };
        let layer_rows = |files: &[SnapshotFile]| -> Vec<SnapshotFile> {
            sluice_snapshots::covering(files, snapshot.buckets, bucket, self.buckets)
                .cloned()
                .collect()
        };
        if snapshot.is_base() {
            let files = layer_rows(&snapshot.files);
            return Ok(
                match read_files(&self.ctx, &self.store, &files)
                    .await
                    .map_err(external)?
                {
                    Some(rows) => vec![self.join_rows(rows, table(changes)?).await?],
                    None => Vec::new(),
                },
            );
        }
        // Which layer holds each changed key: the bucket's index, joined with the changes.
        let index_files: Vec<&SnapshotFile> = snapshot.index_covering(bucket, self.buckets).collect();
        let Some(index) = read_files(&self.ctx, &self.store, index_files)
            .await
            .map_err(external)?
        else {
            return Ok(Vec::new());
        };
        let index_keys: Vec<String> = (0..self.key_columns.len())
            .map(|i| format!("__index_key_{i}"))
            .collect();
        let mut index_select: Vec<Expr> = self
            .key_fields
            .iter()
            .zip(&index_keys)
            .map(|(field, alias)| cast(ident(field.name()), field.data_type().clone()).alias(alias))
            .collect();
        index_select.push(ident(LAYER_COLUMN));
        let index = index.select(index_select)?;
        let mut tagged_select: Vec<Expr> = changes_schema.fields().iter().map(|f| ident(f.name())).collect();
        tagged_select.push(ident(LAYER_COLUMN));
        let keys: Vec<&str> = self.key_columns.iter().map(String::as_str).collect();
        let index_key_refs: Vec<&str> = index_keys.iter().map(String::as_str).collect();
        let tagged = table(changes)?
            .join(index, JoinType::Inner, &keys, &index_key_refs, None)?
            .select(tagged_select)?
            .collect()
            .await?;
        let Some(tagged_schema) = tagged.first().map(|b| b.schema()) else {
            return Ok(Vec::new());
        };
        self.read_layers(snapshot, bucket, split_by_layer(&tagged, &tagged_schema)?)
            .await
    }

    /// For each layer of `snapshot`, the rows of its files for the keys of its change rows,
    /// with the change columns appended.
    async fn read_layers(
        &self,
        snapshot: &SnapshotManifest,
        bucket: u32,
        by_layer: std::collections::BTreeMap<u32, Vec<RecordBatch>>,
    ) -> Result<Vec<SendableRecordBatchStream>> {
        let mut streams = Vec::new();
        for (ordinal, parts) in by_layer {
            let (layer_id, files) = snapshot.layer(ordinal).ok_or_else(|| {
                DataFusionError::Execution(format!(
                    "snapshot {} of model `{}` points at layer {ordinal}, which its manifest does not list",
                    snapshot.id, snapshot.model
                ))
            })?;
            let files: Vec<&SnapshotFile> =
                sluice_snapshots::covering(files, snapshot.buckets, bucket, self.buckets).collect();
            let Some(first) = parts.first() else { continue };
            let table = MemTable::try_new(first.schema(), vec![parts])?;
            let changes = self.ctx.read_table(Arc::new(table))?;
            match read_files(&self.ctx, &self.store, files)
                .await
                .map_err(external)?
            {
                Some(rows) => streams.push(self.join_rows(rows, changes).await?),
                None => {
                    return Err(DataFusionError::Execution(format!(
                        "layer {layer_id} of snapshot {} of model `{}` has no file for bucket {bucket}",
                        snapshot.id, snapshot.model
                    )));
                }
            }
        }
        Ok(streams)
    }

    /// Rows of `rows` whose keys are in `changes`, with the change columns appended.
    async fn join_rows(&self, rows: DataFrame, changes: DataFrame) -> Result<SendableRecordBatchStream> {
        let row_columns: Vec<String> = rows
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .filter(|n| n != ROW_HASH_COLUMN)
            .collect();
        let mut change_select: Vec<Expr> = self
            .key_columns
            .iter()
            .enumerate()
            .map(|(i, k)| ident(k).alias(format!("__change_key_{i}")))
            .collect();
        change_select.extend(CHANGE_COLUMNS.iter().map(|c| ident(*c)));
        let changes = changes.select(change_select)?;
        let on: Vec<Expr> = self
            .key_columns
            .iter()
            .enumerate()
            .map(|(i, k)| ident(k).eq(ident(format!("__change_key_{i}"))))
            .collect();
        let mut select: Vec<Expr> = row_columns.iter().map(ident).collect();
        select.extend(CHANGE_COLUMNS.iter().map(|c| ident(*c)));
        changes
            .join_on(rows, JoinType::Inner, on)?
            .select(select)?
            .execute_stream()
            .await
    }

    /// Every row of one bucket of the new snapshot as added (a first run or a full resync),
    /// with the change columns appended.
    pub async fn all_added(&self, bucket: u32) -> Result<Option<SendableRecordBatchStream>> {
        let Some(rows) = read_rows(&self.ctx, &self.store, &self.new, Some((bucket, self.buckets)))
            .await
            .map_err(external)?
        else {
            return Ok(None);
        };
        let mut select: Vec<Expr> = rows
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .filter(|n| n != ROW_HASH_COLUMN)
            .map(ident)
            .collect();
        select.push(lit(Op::Added as u8).alias(OP));
        select.push(ident(ROW_HASH_COLUMN).alias(NEW_HASH));
        select.push(lit(ScalarValue::UInt64(None)).alias(BASE_HASH));
        select.push(lit(ScalarValue::Utf8(None)).alias(BASE_SNAPSHOT));
        select.push(lit(0i64).alias(ATTEMPTS));
        select.push(null_failed_at().alias(FIRST_FAILED_AT));
        Ok(Some(rows.select(select)?.execute_stream().await?))
    }
}

/// The columns of a model's rows as they are read back from its snapshot: DataFusion reads
/// strings and binaries as views. Rows delivered as they are extracted take these types, so a
/// mapping sees the same columns whichever way its rows come.
pub fn read_back_schema(model: &Schema) -> Schema {
    datafusion::datasource::file_format::parquet::transform_schema_to_view(model)
}

/// The schema of [`added_rows`]: the read-back columns, then the change columns.
pub fn added_schema(model: &Schema) -> SchemaRef {
    let mut fields: Vec<Field> = read_back_schema(model)
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.extend(change_fields());
    Arc::new(Schema::new(fields))
}

/// Extracted model rows with their row hashes as change rows that add every row, the shape
/// [`Differ::all_added`] reads from a committed snapshot. `schema` is [`added_schema`] of the
/// model's columns.
pub fn added_rows(schema: &SchemaRef, rows: &RecordBatch, hashes: &UInt64Array) -> Result<RecordBatch> {
    use arrow::array::{ArrayRef, Int64Array, UInt8Array, new_null_array};
    let n = rows.num_rows();
    if hashes.len() != n {
        return Err(DataFusionError::Internal(format!(
            "{} row hashes for {n} extracted rows",
            hashes.len()
        )));
    }
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for (column, field) in rows.columns().iter().zip(schema.fields()) {
        columns.push(if column.data_type() == field.data_type() {
            column.clone()
        } else {
            arrow::compute::cast(column, field.data_type())?
        });
    }
    columns.push(Arc::new(UInt8Array::from(vec![Op::Added as u8; n])));
    columns.push(Arc::new(hashes.clone()));
    columns.push(new_null_array(&DataType::UInt64, n));
    columns.push(new_null_array(&DataType::Utf8, n));
    columns.push(Arc::new(Int64Array::from(vec![0i64; n])));
    columns.push(new_null_array(&failed_at_type(), n));
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

/// A filtered backfill's predicate planned over a snapshot's columns (`schema`, sluice's row
/// hash left out): a boolean expression of the row's own columns, without subqueries,
/// aggregates or window functions.
pub fn filter_expr(schema: &Schema, filter: &str) -> Result<Expr> {
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    use datafusion::logical_expr::ExprSchemable;
    let columns: Vec<Field> = schema
        .fields()
        .iter()
        .filter(|f| f.name() != ROW_HASH_COLUMN)
        .map(|f| f.as_ref().clone())
        .collect();
    let schema = DFSchema::try_from(Schema::new(columns))?;
    let expr = SessionContext::new().parse_sql_expr(filter, &schema)?;
    let mut refused = None;
    expr.apply(|e| {
        match e {
            Expr::ScalarSubquery(_) | Expr::Exists(_) | Expr::InSubquery(_) => refused = Some("a subquery"),
            Expr::AggregateFunction(_) => refused = Some("an aggregate"),
            Expr::WindowFunction(_) => refused = Some("a window function"),
            _ => {}
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    if let Some(what) = refused {
        return Err(DataFusionError::Plan(format!(
            "it holds {what}; a filter is a condition on each row's own columns"
        )));
    }
    let data_type = expr.get_type(&schema)?;
    if data_type != DataType::Boolean {
        return Err(DataFusionError::Plan(format!(
            "it is of type {data_type}, not a condition (true or false)"
        )));
    }
    Ok(expr)
}

fn base_key(i: usize) -> String {
    format!("__base_key_{i}")
}

/// Buckets diffed at once: twice the cores, so one bucket computes while another waits for its
/// reads.
pub fn parallelism() -> usize {
    2 * std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// The session the diff runs in: one partition per bucket plan (buckets are the parallelism).
pub fn diff_context() -> SessionContext {
    let config = SessionConfig::new()
        .with_target_partitions(1)
        .with_batch_size(8192)
        .with_information_schema(false);
    SessionContext::new_with_config(config)
}

fn change_fields() -> Vec<Field> {
    vec![
        Field::new(OP, DataType::UInt8, false),
        Field::new(NEW_HASH, DataType::UInt64, true),
        Field::new(BASE_HASH, DataType::UInt64, true),
        Field::new(BASE_SNAPSHOT, DataType::Utf8, true),
        Field::new(ATTEMPTS, DataType::Int64, true),
        Field::new(FIRST_FAILED_AT, failed_at_type(), true),
    ]
}

fn null_failed_at() -> Expr {
    lit(ScalarValue::TimestampMicrosecond(None, Some("UTC".into())))
}

/// The Arrow schema of a snapshot's rows (sluice's row hash column included).
pub async fn snapshot_schema(
    ctx: &SessionContext,
    store: &SnapshotStore,
    manifest: &SnapshotManifest,
) -> Result<SchemaRef> {
    // A delta that changed nothing has no own rows; its layers have the same columns.
    let file = manifest
        .files
        .first()
        .or_else(|| manifest.layers.iter().find_map(|l| l.files.first()));
    file_schema(ctx, store, manifest, file).await
}

/// The Arrow schema of a snapshot's index files (a base's are its rows).
pub async fn index_schema(
    ctx: &SessionContext,
    store: &SnapshotStore,
    manifest: &SnapshotManifest,
) -> Result<SchemaRef> {
    file_schema(ctx, store, manifest, manifest.index_files().first()).await
}

async fn file_schema(
    ctx: &SessionContext,
    store: &SnapshotStore,
    manifest: &SnapshotManifest,
    file: Option<&SnapshotFile>,
) -> Result<SchemaRef> {
    let df = read_files(ctx, store, file)
        .await
        .map_err(external)?
        .ok_or_else(|| DataFusionError::Execution(format!("snapshot {} lists no data files", manifest.id)))?;
    Ok(Arc::new(df.schema().as_arrow().clone()))
}

/// Change rows with the layer holding each row as their last column, split by layer, that
/// column removed (`schema` is theirs with it).
fn split_by_layer(
    batches: &[RecordBatch],
    schema: &SchemaRef,
) -> Result<std::collections::BTreeMap<u32, Vec<RecordBatch>>> {
    let layer_at = schema.fields().len() - 1;
    let columns: Vec<usize> = (0..layer_at).collect();
    let without = Arc::new(schema.project(&columns)?);
    let mut by_layer: std::collections::BTreeMap<u32, Vec<RecordBatch>> = Default::default();
    for batch in batches.iter().filter(|b| b.num_rows() > 0) {
        let layers = arrow::compute::cast(batch.column(layer_at), &DataType::UInt32)?;
        let layers = layers.as_primitive::<arrow::datatypes::UInt32Type>();
        let mut ordinals: Vec<u32> = layers.values().to_vec();
        ordinals.sort_unstable();
        ordinals.dedup();
        let rows = batch.project(&columns)?;
        for ordinal in ordinals {
            let mask = arrow::compute::kernels::cmp::eq(
                layers,
                &arrow::array::Scalar::new(arrow::array::UInt32Array::from(vec![ordinal])),
            )?;
            let part = arrow::compute::filter_record_batch(&rows, &mask)?;
            let part = RecordBatch::try_new(without.clone(), part.columns().to_vec())?;
            by_layer.entry(ordinal).or_default().push(part);
        }
    }
    Ok(by_layer)
}

/// Keeps the rows of `batches` whose op satisfies `keep`.
fn filter_ops(batches: &[RecordBatch], keep: impl Fn(Op) -> bool) -> Result<Vec<RecordBatch>> {
    batches
        .iter()
        .map(|batch| {
            let ops = batch
                .column_by_name(OP)
                .and_then(|a| a.as_primitive_opt::<UInt8Type>())
                .ok_or_else(|| DataFusionError::Internal("change rows lack __op".into()))?;
            let mask: arrow::array::BooleanArray = ops
                .values()
                .iter()
                .map(|op| Some(Op::from_code(*op).is_some_and(&keep)))
                .collect();
            Ok(arrow::compute::filter_record_batch(batch, &mask)?)
        })
        .collect()
}

fn external(e: sluice_snapshots::SnapshotError) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{
        ArrayRef, BinaryArray, BooleanArray, Date32Array, Float64Array, Int32Array, Int64Array,
        LargeStringArray, StringArray, TimestampMicrosecondArray,
    };
    use futures::TryStreamExt;
    use sluice_snapshots::SnapshotWriter;

    /// Model rows of every kind of column a source gives.
    fn rows(ids: &[i64]) -> RecordBatch {
        let n = ids.len();
        let text = |prefix: &str| -> Vec<String> { ids.iter().map(|i| format!("{prefix}{i}")).collect() };
        RecordBatch::try_from_iter(vec![
            ("id", Arc::new(Int64Array::from(ids.to_vec())) as ArrayRef),
            ("email", Arc::new(StringArray::from(text("user")))),
            ("notes", Arc::new(LargeStringArray::from(text("note")))),
            ("blob", Arc::new(BinaryArray::from_iter_values(text("b")))),
            ("score", Arc::new(Int32Array::from(vec![Some(1); n]))),
            ("value", Arc::new(Float64Array::from(vec![2.5; n]))),
            ("active", Arc::new(BooleanArray::from(vec![true; n]))),
            ("born", Arc::new(Date32Array::from(vec![19_000; n]))),
            (
                "seen_at",
                Arc::new(
                    TimestampMicrosecondArray::from(vec![1_700_000_000_000_000; n]).with_timezone("UTC"),
                ),
            ),
        ])
        .unwrap()
    }

    /// Rows handed over as they are extracted are the rows a committed snapshot gives a first
    /// run: same schema, same values, same change columns.
    #[tokio::test]
    async fn extracted_rows_as_added_match_the_snapshots_own() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::test_support::snapshot_store(&dir);
        let extracted = rows(&[5, 3, 9, 1]);
        let mut writer =
            SnapshotWriter::new(store.clone(), crate::test_support::users_spec(vec!["id".into()]));
        let hashes = writer.write(extracted.clone()).await.unwrap();
        let manifest = Arc::new(writer.commit().await.unwrap());

        let schema = added_schema(&extracted.schema());
        let handed_over = added_rows(&schema, &extracted, &hashes).unwrap();
        let differ = Differ::new(store, manifest, None).await.unwrap();
        let stream = differ.all_added(0).await.unwrap().unwrap();
        let from_snapshot: Vec<RecordBatch> = stream.try_collect().await.unwrap();
        let from_snapshot =
            arrow::compute::concat_batches(&from_snapshot[0].schema(), &from_snapshot).unwrap();

        let types = |s: &Schema| -> Vec<(String, DataType)> {
            s.fields()
                .iter()
                .map(|f| (f.name().clone(), f.data_type().clone()))
                .collect()
        };
        assert_eq!(types(&schema), types(&from_snapshot.schema()));
        // The snapshot's rows come sorted by key.
        let order = arrow::compute::sort_to_indices(handed_over.column(0), None, None).unwrap();
        let sorted = arrow::compute::take_record_batch(&handed_over, &order).unwrap();
        for (i, field) in schema.fields().iter().enumerate() {
            assert_eq!(
                sorted.column(i).as_ref(),
                from_snapshot.column(i).as_ref(),
                "column {}",
                field.name()
            );
        }
    }
}
