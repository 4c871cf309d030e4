//! Streams a model's record batches into a new snapshot.
//!
//! Each batch gets its row hash column, is split by key-hash bucket and handed to one background
//! task per bucket that encodes Parquet, so buckets are encoded in parallel while the source keeps
//! producing. Memory is bounded by the channel depth and one in-progress row group per bucket.
//!
//! The bucket count is chosen once per snapshot: from the previous snapshot's size when there is
//! one; otherwise the writer holds back the first batches (up to [`SIZING_BUFFER_ROWS`]) and a
//! model that ends within them is written as a single file.

use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, UInt32Array, UInt64Array};
use arrow::compute::take_record_batch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use chrono::Utc;
use datafusion::functions_aggregate::expr_fn::count;
use datafusion::prelude::{ParquetReadOptions, SessionConfig, SessionContext, ident, lit};
use futures::{StreamExt, TryStreamExt};
use object_store::buffered::BufWriter;
use parquet::arrow::AsyncArrowWriter;
use parquet::basic::{Compression, Encoding};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::error::{Result, SnapshotError};
use crate::hash::{bucket_of, key_hashes, row_hashes};
use crate::manifest::{
    FORMAT_VERSION, RESERVED_PREFIX, ROW_HASH_COLUMN, SnapshotFile, SnapshotManifest, column_infos,
};
use crate::store::SnapshotStore;

/// Rows held back to size a first snapshot before any file is written.
pub const SIZING_BUFFER_ROWS: usize = 512 * 1024;
/// Bucket count for a large first snapshot.
pub const DEFAULT_BUCKETS: u32 = 16;
/// Target rows per bucket: small enough that one bucket's diff fits comfortably in memory.
pub const ROWS_PER_BUCKET: u64 = 1_000_000;
const MAX_BUCKETS: u32 = 1024;
/// Rows of in-progress row groups across all bucket writers.
const ROW_GROUP_BUDGET_ROWS: usize = 2 * 1024 * 1024;

/// What to snapshot.
#[derive(Debug, Clone)]
pub struct SnapshotSpec {
    pub model: String,
    pub run_id: String,
    pub key_columns: Vec<String>,
    /// Rows in the model's previous snapshot, if any; sizes the buckets.
    pub expected_rows: Option<u64>,
}

/// Bucket count for a snapshot of about `rows` rows: a power of two near `rows / ROWS_PER_BUCKET`.
pub fn buckets_for(rows: u64) -> u32 {
    let wanted = rows.div_ceil(ROWS_PER_BUCKET).clamp(1, MAX_BUCKETS as u64);
    wanted.next_power_of_two() as u32
}

pub struct SnapshotWriter {
    store: SnapshotStore,
    spec: SnapshotSpec,
    id: String,
    extracted_at: chrono::DateTime<Utc>,
    /// The model's schema (first batch), and the stored schema with the row hash column.
    schema: Option<(SchemaRef, SchemaRef)>,
    pending: Vec<RecordBatch>,
    pending_rows: usize,
    workers: Option<Workers>,
    rows: u64,
}

struct Workers {
    buckets: u32,
    senders: Vec<mpsc::Sender<RecordBatch>>,
    handles: Vec<JoinHandle<Result<Option<SnapshotFile>>>>,
}

impl SnapshotWriter {
    pub fn new(store: SnapshotStore, spec: SnapshotSpec) -> Self {
        Self {
            store,
            spec,
            id: uuid::Uuid::now_v7().to_string(),
            extracted_at: Utc::now(),
            schema: None,
            pending: Vec::new(),
            pending_rows: 0,
            workers: None,
            rows: 0,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn rows_written(&self) -> u64 {
        self.rows
    }

    /// Adds a batch of model rows.
    pub async fn write(&mut self, batch: RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            if self.schema.is_none() {
                self.set_schema(batch.schema())?;
            }
            return Ok(());
        }
        let stored_schema = match &self.schema {
            Some((model_schema, stored)) => {
                if model_schema.fields() != batch.schema().fields() {
                    return Err(SnapshotError::SchemaMismatch {
                        expected: model_schema.to_string(),
                        got: batch.schema().to_string(),
                    });
                }
                stored.clone()
            }
            None => self.set_schema(batch.schema())?,
        };
        self.check_keys_not_null(&batch)?;
        let hashes = row_hashes(&batch, &self.spec.key_columns)?;
        let mut columns = batch.columns().to_vec();
        columns.push(Arc::new(UInt64Array::from(hashes)) as ArrayRef);
        let batch = RecordBatch::try_new(stored_schema, columns)?;
        self.rows += batch.num_rows() as u64;

        if self.workers.is_none() {
            self.pending_rows += batch.num_rows();
            self.pending.push(batch);
            let known = self.spec.expected_rows.is_some();
            if known || self.pending_rows >= SIZING_BUFFER_ROWS {
                let buckets = match self.spec.expected_rows {
                    Some(rows) => buckets_for(rows.max(self.pending_rows as u64)),
                    None => DEFAULT_BUCKETS,
                };
                self.start_workers(buckets);
                self.flush_pending().await?;
            }
            return Ok(());
        }
        self.dispatch(batch).await
    }

    fn set_schema(&mut self, schema: SchemaRef) -> Result<SchemaRef> {
        for field in schema.fields() {
            if field.name().starts_with(RESERVED_PREFIX) {
                return Err(SnapshotError::ReservedColumn {
                    column: field.name().clone(),
                });
            }
        }
        for key in &self.spec.key_columns {
            if schema.field_with_name(key).is_err() {
                return Err(SnapshotError::MissingKeyColumn { column: key.clone() });
            }
        }
        let mut fields: Vec<Arc<Field>> = schema.fields().iter().cloned().collect();
        fields.push(Arc::new(Field::new(ROW_HASH_COLUMN, DataType::UInt64, false)));
        let stored = Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()));
        self.schema = Some((schema, stored.clone()));
        Ok(stored)
    }

    fn check_keys_not_null(&self, batch: &RecordBatch) -> Result<()> {
        for key in &self.spec.key_columns {
            if let Some(array) = batch.column_by_name(key) {
                let nulls = array.logical_null_count();
                if nulls > 0 {
                    return Err(SnapshotError::NullKey {
                        column: key.clone(),
                        rows: nulls,
                        at_row: self.rows + batch.num_rows() as u64,
                    });
                }
            }
        }
        Ok(())
    }

    fn start_workers(&mut self, buckets: u32) {
        let stored = self
            .schema
            .as_ref()
            .map(|(_, s)| s.clone())
            .unwrap_or_else(|| Arc::new(Schema::empty()));
        let row_group_rows = (ROW_GROUP_BUDGET_ROWS / buckets as usize).clamp(32 * 1024, 1024 * 1024);
        let props = Arc::new(writer_properties(&self.spec, &self.id, row_group_rows));
        let mut senders = Vec::with_capacity(buckets as usize);
        let mut handles = Vec::with_capacity(buckets as usize);
        for bucket in 0..buckets {
            let (tx, rx) = mpsc::channel::<RecordBatch>(2);
            let relative = format!(
                "{}/bucket-{bucket:04}-of-{buckets:04}.parquet",
                SnapshotStore::data_dir(&self.spec.model, &self.id)
            );
            let worker = BucketWorker {
                store: self.store.clone(),
                model: self.spec.model.clone(),
                relative,
                bucket,
                schema: stored.clone(),
                props: props.clone(),
            };
            senders.push(tx);
            handles.push(tokio::spawn(worker.run(rx)));
        }
        self.workers = Some(Workers {
            buckets,
            senders,
            handles,
        });
    }

    async fn flush_pending(&mut self) -> Result<()> {
        for batch in std::mem::take(&mut self.pending) {
            self.dispatch(batch).await?;
        }
        self.pending_rows = 0;
        Ok(())
    }

    async fn dispatch(&mut self, batch: RecordBatch) -> Result<()> {
        let Some(workers) = &self.workers else {
            return Err(SnapshotError::Task("writer not started".into()));
        };
        if workers.buckets == 1 {
            return send(&workers.senders[0], batch).await;
        }
        let key_hashes = key_hashes(&batch, &self.spec.key_columns)?;
        // Counting sort of row indices by bucket: one pass to count, one to place, then one
        // `take` per non-empty bucket.
        let buckets = workers.buckets as usize;
        let bucket_ids: Vec<u32> = key_hashes
            .iter()
            .map(|h| bucket_of(*h, workers.buckets))
            .collect();
        let mut starts = vec![0usize; buckets + 1];
        for b in &bucket_ids {
            starts[*b as usize + 1] += 1;
        }
        for b in 0..buckets {
            starts[b + 1] += starts[b];
        }
        let mut cursor = starts.clone();
        let mut order = vec![0u32; bucket_ids.len()];
        for (row, b) in bucket_ids.iter().enumerate() {
            order[cursor[*b as usize]] = row as u32;
            cursor[*b as usize] += 1;
        }
        let order = UInt32Array::from(order);
        for b in 0..buckets {
            let (start, end) = (starts[b], starts[b + 1]);
            if start == end {
                continue;
            }
            let indices = order.slice(start, end - start);
            let part = take_record_batch(&batch, &indices)?;
            send(&workers.senders[b], part).await?;
        }
        Ok(())
    }

    /// Finishes every file, checks the primary key is unique, and commits the snapshot by
    /// writing its manifest. On error the partly written data is removed.
    pub async fn commit(mut self) -> Result<SnapshotManifest> {
        match self.finish().await {
            Ok(manifest) => Ok(manifest),
            Err(e) => {
                self.abort_files().await;
                Err(e)
            }
        }
    }

    async fn finish(&mut self) -> Result<SnapshotManifest> {
        if self.schema.is_none() {
            // No batch at all, not even an empty one: nothing tells us the columns.
            return Err(SnapshotError::SchemaMismatch {
                expected: "a schema from the source".into(),
                got: "no record batches".into(),
            });
        }
        if self.workers.is_none() {
            let buckets = buckets_for(self.pending_rows as u64);
            self.start_workers(buckets);
            self.flush_pending().await?;
        }
        let workers = self
            .workers
            .take()
            .ok_or_else(|| SnapshotError::Task("writer not started".into()))?;
        drop(workers.senders);
        let mut files = Vec::new();
        let mut first_error = None;
        for handle in workers.handles {
            match handle.await {
                Ok(Ok(Some(file))) => files.push(file),
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(e) => {
                    first_error.get_or_insert(SnapshotError::Task(e.to_string()));
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        if files.is_empty() {
            // An empty snapshot still records its schema in one empty file.
            files.push(self.write_empty_file(workers.buckets).await?);
        }
        files.sort_by_key(|f| f.bucket);
        let (model_schema, _) = self.schema.clone().unwrap_or_else(|| {
            let empty = Arc::new(Schema::empty());
            (empty.clone(), empty)
        });
        let manifest = SnapshotManifest {
            format_version: FORMAT_VERSION,
            id: self.id.clone(),
            model: self.spec.model.clone(),
            run_id: self.spec.run_id.clone(),
            extracted_at: self.extracted_at,
            key_columns: self.spec.key_columns.clone(),
            buckets: workers.buckets,
            rows: self.rows,
            columns: column_infos(&model_schema),
            files,
        };
        check_unique_keys(&self.store, &manifest).await?;
        let bytes = serde_json::to_vec_pretty(&manifest).map_err(|e| SnapshotError::BadManifest {
            path: SnapshotStore::manifest_path(&manifest.model, &manifest.id),
            reason: e.to_string(),
        })?;
        self.store
            .put(
                &SnapshotStore::manifest_path(&manifest.model, &manifest.id),
                bytes.into(),
            )
            .await?;
        Ok(manifest)
    }

    async fn write_empty_file(&self, buckets: u32) -> Result<SnapshotFile> {
        let stored = self
            .schema
            .as_ref()
            .map(|(_, s)| s.clone())
            .unwrap_or_else(|| Arc::new(Schema::empty()));
        let relative = format!(
            "{}/bucket-0000-of-{buckets:04}.parquet",
            SnapshotStore::data_dir(&self.spec.model, &self.id)
        );
        let props = writer_properties(&self.spec, &self.id, 1024);
        let sink = BufWriter::new(self.store.object_store(), self.store.path(&relative));
        let parquet_err = |source| SnapshotError::Parquet {
            model: self.spec.model.clone(),
            source,
        };
        let mut writer = AsyncArrowWriter::try_new(sink, stored, Some(props)).map_err(parquet_err)?;
        writer.finish().await.map_err(parquet_err)?;
        let bytes = writer.bytes_written() as u64;
        Ok(SnapshotFile {
            path: relative,
            bucket: 0,
            rows: 0,
            bytes,
        })
    }

    /// Abandons the snapshot: stops the writers and deletes what they wrote.
    pub async fn abort(mut self) {
        self.abort_files().await;
    }

    async fn abort_files(&mut self) {
        if let Some(workers) = self.workers.take() {
            drop(workers.senders);
            for handle in workers.handles {
                let _ = handle.await;
            }
        }
        let dir = SnapshotStore::data_dir(&self.spec.model, &self.id);
        if let Ok(paths) = self.store.list(&dir).await {
            for path in paths {
                if let Err(e) = self.store.delete(&path).await {
                    tracing::warn!(path, error = %e, "could not remove an abandoned snapshot file");
                }
            }
        }
    }
}

async fn send(sender: &mpsc::Sender<RecordBatch>, batch: RecordBatch) -> Result<()> {
    sender
        .send(batch)
        .await
        .map_err(|_| SnapshotError::Task("a bucket writer stopped early (see the error above)".into()))
}

fn writer_properties(spec: &SnapshotSpec, id: &str, row_group_rows: usize) -> WriterProperties {
    let mut builder = WriterProperties::builder()
        .set_max_row_group_row_count(Some(row_group_rows))
        .set_compression(Compression::SNAPPY)
        .set_created_by(format!("sluice {}", env!("CARGO_PKG_VERSION")))
        .set_key_value_metadata(Some(vec![
            KeyValue::new("sluice.format_version".into(), FORMAT_VERSION.to_string()),
            KeyValue::new("sluice.snapshot_id".into(), id.to_string()),
            KeyValue::new("sluice.model".into(), spec.model.clone()),
            KeyValue::new("sluice.key_columns".into(), spec.key_columns.join(",")),
        ]));
    // The row hash is random: dictionaries, compression and statistics only cost time.
    let hash = ColumnPath::from(ROW_HASH_COLUMN);
    builder = builder
        .set_column_dictionary_enabled(hash.clone(), false)
        .set_column_encoding(hash.clone(), Encoding::PLAIN)
        .set_column_compression(hash.clone(), Compression::UNCOMPRESSED)
        .set_column_statistics_enabled(hash, EnabledStatistics::None);
    // Keys are unique within a snapshot, so a dictionary never pays off.
    for key in &spec.key_columns {
        builder = builder.set_column_dictionary_enabled(ColumnPath::from(key.as_str()), false);
    }
    builder.build()
}

struct BucketWorker {
    store: SnapshotStore,
    model: String,
    relative: String,
    bucket: u32,
    schema: SchemaRef,
    props: Arc<WriterProperties>,
}

impl BucketWorker {
    async fn run(self, mut rx: mpsc::Receiver<RecordBatch>) -> Result<Option<SnapshotFile>> {
        let parquet_err = |source| SnapshotError::Parquet {
            model: self.model.clone(),
            source,
        };
        let mut writer: Option<AsyncArrowWriter<BufWriter>> = None;
        let mut rows = 0u64;
        while let Some(batch) = rx.recv().await {
            let w = match writer.as_mut() {
                Some(w) => w,
                None => {
                    let sink = BufWriter::new(self.store.object_store(), self.store.path(&self.relative));
                    writer.insert(
                        AsyncArrowWriter::try_new(sink, self.schema.clone(), Some((*self.props).clone()))
                            .map_err(parquet_err)?,
                    )
                }
            };
            rows += batch.num_rows() as u64;
            w.write(&batch).await.map_err(parquet_err)?;
        }
        let Some(mut writer) = writer else {
            return Ok(None);
        };
        writer.finish().await.map_err(parquet_err)?;
        Ok(Some(SnapshotFile {
            path: self.relative,
            bucket: self.bucket,
            rows,
            bytes: writer.bytes_written() as u64,
        }))
    }
}

/// Fails when any primary key value occurs more than once. Runs bucket by bucket (a key's
/// duplicates always share its bucket), so memory is bounded by one bucket.
async fn check_unique_keys(store: &SnapshotStore, manifest: &SnapshotManifest) -> Result<()> {
    if manifest.rows <= 1 {
        return Ok(());
    }
    let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(1));
    store.register_with(&ctx);
    let keys: Vec<_> = manifest.key_columns.iter().map(ident).collect();
    let per_bucket = futures::stream::iter(manifest.files.iter().filter(|f| f.rows > 1))
        .map(|file| {
            let ctx = ctx.clone();
            let keys = keys.clone();
            async move {
                let df = ctx
                    .read_parquet(store.url(&file.path).to_string(), ParquetReadOptions::default())
                    .await?
                    .aggregate(keys, vec![count(lit(1)).alias("__n")])?
                    .filter(ident("__n").gt(lit(1)))?;
                let batches = df.collect().await?;
                Ok::<_, SnapshotError>(batches)
            }
        })
        .buffer_unordered(2)
        .try_collect::<Vec<_>>()
        .await?;
    let mut duplicate_keys = 0u64;
    let mut examples = Vec::new();
    for batch in per_bucket.into_iter().flatten() {
        duplicate_keys += batch.num_rows() as u64;
        for row in 0..batch.num_rows() {
            if examples.len() >= 5 {
                break;
            }
            examples.push(describe_key(&batch, &manifest.key_columns, row)?);
        }
    }
    if duplicate_keys > 0 {
        return Err(SnapshotError::DuplicateKeys {
            duplicate_keys,
            examples: examples.join(", "),
        });
    }
    Ok(())
}

/// Quotes a column name for DataFusion's `col`, which otherwise lowercases and splits on dots.
pub fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `id=42` or `(a=1, b='x') ×3` style description of one key row of an aggregated batch that
/// has the key columns followed by a count column `__n`.
fn describe_key(batch: &RecordBatch, key_columns: &[String], row: usize) -> Result<String> {
    use arrow::util::display::{ArrayFormatter, FormatOptions};
    let options = FormatOptions::default().with_null("NULL");
    let mut parts = Vec::new();
    for key in key_columns {
        let array = batch
            .column_by_name(key)
            .ok_or_else(|| SnapshotError::MissingKeyColumn { column: key.clone() })?;
        let formatter = ArrayFormatter::try_new(array.as_ref(), &options)?;
        parts.push(format!("{key}={}", formatter.value(row)));
    }
    let count = batch
        .column_by_name("__n")
        .and_then(|a| a.as_any().downcast_ref::<arrow::array::Int64Array>())
        .map(|a| a.value(row))
        .unwrap_or(2);
    Ok(format!("{} (×{count})", parts.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};

    fn users(ids: &[i64]) -> RecordBatch {
        let names: Vec<String> = ids.iter().map(|i| format!("user {i}")).collect();
        RecordBatch::try_from_iter(vec![
            ("id", Arc::new(Int64Array::from(ids.to_vec())) as ArrayRef),
            ("name", Arc::new(StringArray::from(names)) as ArrayRef),
        ])
        .unwrap()
    }

    fn spec(expected_rows: Option<u64>) -> SnapshotSpec {
        SnapshotSpec {
            model: "users".into(),
            run_id: "run-1".into(),
            key_columns: vec!["id".into()],
            expected_rows,
        }
    }

    #[test]
    fn bucket_counts_grow_with_rows() {
        assert_eq!(buckets_for(0), 1);
        assert_eq!(buckets_for(999_999), 1);
        assert_eq!(buckets_for(10_000_000), 16);
        assert_eq!(buckets_for(30_000_000), 32);
        assert_eq!(buckets_for(u64::MAX), MAX_BUCKETS);
    }

    #[tokio::test]
    async fn small_snapshot_is_one_file_and_commits_with_a_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open("s", dir.path(), []).unwrap();
        let mut w = SnapshotWriter::new(store.clone(), spec(None));
        w.write(users(&[1, 2, 3])).await.unwrap();
        w.write(users(&[4])).await.unwrap();
        let manifest = w.commit().await.unwrap();
        assert_eq!(manifest.rows, 4);
        assert_eq!(manifest.buckets, 1);
        assert_eq!(manifest.files.len(), 1);
        let listed = store.list_snapshots("users").await.unwrap();
        assert_eq!(listed, vec![manifest]);
    }

    #[tokio::test]
    async fn bucketed_snapshot_places_every_row_in_its_bucket() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open("s", dir.path(), []).unwrap();
        let mut w = SnapshotWriter::new(store.clone(), spec(Some(4_000_000)));
        let ids: Vec<i64> = (0..5000).collect();
        w.write(users(&ids)).await.unwrap();
        let manifest = w.commit().await.unwrap();
        assert_eq!(manifest.buckets, 4);
        assert_eq!(manifest.files.iter().map(|f| f.rows).sum::<u64>(), 5000);
        let ctx = SessionContext::new();
        for file in &manifest.files {
            let batches = ctx
                .read_parquet(store.url(&file.path).to_string(), ParquetReadOptions::default())
                .await
                .unwrap()
                .collect()
                .await
                .unwrap();
            for batch in batches {
                let keys = key_hashes(&batch, &["id".to_string()]).unwrap();
                assert!(keys.iter().all(|k| bucket_of(*k, 4) == file.bucket));
            }
        }
    }

    #[tokio::test]
    async fn duplicate_keys_are_refused_and_nothing_is_committed() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open("s", dir.path(), []).unwrap();
        let mut w = SnapshotWriter::new(store.clone(), spec(None));
        w.write(users(&[1, 2, 2, 3, 3, 3])).await.unwrap();
        let err = w.commit().await.unwrap_err().to_string();
        assert!(
            err.contains("2 primary key value(s) occur more than once"),
            "{err}"
        );
        assert!(err.contains("id=2 (×2)") && err.contains("id=3 (×3)"), "{err}");
        assert!(store.list_snapshots("users").await.unwrap().is_empty());
        assert!(store.list("models/users").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn null_keys_and_reserved_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open("s", dir.path(), []).unwrap();
        let batch = RecordBatch::try_from_iter(vec![(
            "id",
            Arc::new(Int64Array::from(vec![Some(1), None])) as ArrayRef,
        )])
        .unwrap();
        let mut w = SnapshotWriter::new(store.clone(), spec(None));
        let err = w.write(batch).await.unwrap_err().to_string();
        assert!(
            err.contains("primary key column `id` is NULL in 1 row(s)"),
            "{err}"
        );

        let batch = RecordBatch::try_from_iter(vec![
            ("id", Arc::new(Int64Array::from(vec![1])) as ArrayRef),
            ("__sluice_x", Arc::new(Int64Array::from(vec![1])) as ArrayRef),
        ])
        .unwrap();
        let mut w = SnapshotWriter::new(store, spec(None));
        let err = w.write(batch).await.unwrap_err().to_string();
        assert!(err.contains("reserved"), "{err}");
    }

    #[tokio::test]
    async fn empty_model_still_records_its_schema() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open("s", dir.path(), []).unwrap();
        let mut w = SnapshotWriter::new(store.clone(), spec(None));
        w.write(users(&[])).await.unwrap();
        let manifest = w.commit().await.unwrap();
        assert_eq!(manifest.rows, 0);
        assert_eq!(manifest.files.len(), 1);
        assert_eq!(manifest.columns.len(), 2);
    }
}
