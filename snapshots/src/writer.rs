//! Streams a model's record batches into a new snapshot.
//!
//! A snapshot is split into key-hash buckets, and each bucket's file is **sorted by the primary
//! key**. Both properties serve the diff: bucket `b` of one snapshot only ever meets bucket `b`
//! of another, and two sorted buckets are diffed by a streaming merge join, with no hash table
//! at all. Sorted keys also make the Parquet statistics on the key tight, so looking up a key in
//! the snapshot history skips almost every row group.
//!
//! Writing happens in two phases, so memory stays bounded however large the model:
//! 1. **Spill** (while the source streams): each batch gets its row hash column and is cut by
//!    key hash into [`PARTITIONS`] fine partitions, appended to local Arrow IPC files.
//! 2. **Sort and write** (at commit, when the row count is known): the bucket count is chosen from
//!    the actual row count; each bucket (the union of the fine partitions that nest into it) is
//!    sorted by DataFusion — which spills to disk beyond its memory budget — and encoded as
//!    Parquet, two buckets at a time. Equal keys end up adjacent, so duplicate keys are found on
//!    the way, without a second pass.

use std::fs::File;
use std::io::BufWriter as FileBuffer;
use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, UInt32Array, UInt64Array};
use arrow::compute::BatchCoalescer;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::ipc::writer::FileWriter as IpcWriter;
use arrow::row::{RowConverter, SortField};
use chrono::Utc;
use datafusion::execution::options::ArrowReadOptions;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{SessionConfig, SessionContext, ident};
use futures::{StreamExt, TryStreamExt};
use object_store::buffered::BufWriter;
use parquet::arrow::AsyncArrowWriter;
use parquet::basic::{Compression, Encoding};
use parquet::file::metadata::{KeyValue, SortingColumn};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use crate::error::{Result, SnapshotError};
use crate::hash::{bucket_of, key_hashes, row_hashes};
use crate::manifest::{
    FORMAT_VERSION, RESERVED_PREFIX, ROW_HASH_COLUMN, SnapshotFile, SnapshotManifest, column_infos,
};
use crate::store::SnapshotStore;

/// Fine partitions rows are spilled into while streaming. Final buckets nest into them, so a
/// snapshot has at most this many buckets.
pub const PARTITIONS: u32 = 64;
/// Target rows per bucket: small enough that one bucket's sort and merge stay cheap.
pub const ROWS_PER_BUCKET: u64 = 1_000_000;
/// Rows per spilled IPC batch.
const SPILL_BATCH_ROWS: usize = 8192;
/// Rows per Parquet row group of a bucket file.
const ROW_GROUP_ROWS: usize = 128 * 1024;
/// Memory the bucket sorts may use together before spilling to disk.
const SORT_MEMORY_BYTES: usize = 512 * 1024 * 1024;
/// Buckets sorted and encoded at once.
const PARALLEL_BUCKETS: usize = 2;
/// Dictionary size from which a column chunk falls back to plain encoding.
const DICTIONARY_PAGE_BYTES: usize = 64 * 1024;
/// False-positive rate of the key columns' bloom filters: 128 KiB a row group of
/// [`ROW_GROUP_ROWS`] keys (about 2% of a snapshot's bytes).
const KEY_BLOOM_FPP: f64 = 0.05;
/// Spilled bytes up to which a bucket is sorted whole in memory (two run at once); larger
/// buckets go through DataFusion's sort, which spills.
const IN_MEMORY_SORT_BYTES: u64 = 96 * 1024 * 1024;
/// Rows per batch gathered from an in-memory sorted bucket.
const IN_MEMORY_SLICE_ROWS: usize = 16 * 1024;

/// What to snapshot.
#[derive(Debug, Clone)]
pub struct SnapshotSpec {
    pub model: String,
    pub run_id: String,
    pub key_columns: Vec<String>,
    /// A fixed bucket count (a power of two, at most [`PARTITIONS`]) instead of one sized from
    /// the row count.
    pub buckets: Option<u32>,
}

/// Rows from which a snapshot gets at least [`MIN_PARALLEL_BUCKETS`] buckets, so its diff runs
/// on several cores.
const PARALLEL_FROM_ROWS: u64 = 256 * 1024;
const MIN_PARALLEL_BUCKETS: u64 = 4;

/// Bucket count for a snapshot of `rows` rows: a power of two near `rows / ROWS_PER_BUCKET`, at
/// least four once there is enough work to share between cores.
pub fn buckets_for(rows: u64) -> u32 {
    let floor = if rows >= PARALLEL_FROM_ROWS {
        MIN_PARALLEL_BUCKETS
    } else {
        1
    };
    let wanted = rows.div_ceil(ROWS_PER_BUCKET).max(floor).min(PARTITIONS as u64);
    wanted.next_power_of_two() as u32
}

pub struct SnapshotWriter {
    store: SnapshotStore,
    spec: SnapshotSpec,
    id: String,
    extracted_at: chrono::DateTime<Utc>,
    /// The model's schema (first batch), and the stored schema with the row hash column.
    schema: Option<(SchemaRef, SchemaRef)>,
    spill: Option<Spill>,
    rows: u64,
    /// Spilled bytes up to which a bucket is sorted in memory.
    in_memory_sort_bytes: u64,
}

/// Phase one: fine partitions on local disk.
struct Spill {
    dir: tempfile::TempDir,
    partitions: Vec<SpillPartition>,
}

struct SpillPartition {
    coalescer: BatchCoalescer,
    writer: Option<IpcWriter<FileBuffer<File>>>,
    path: PathBuf,
    rows: u64,
}

impl SnapshotWriter {
    /// A writer for a new snapshot. A fixed bucket count is rounded up to a power of two.
    pub fn new(store: SnapshotStore, mut spec: SnapshotSpec) -> Self {
        spec.buckets = spec.buckets.map(|b| b.clamp(1, PARTITIONS).next_power_of_two());
        Self {
            store,
            spec,
            id: uuid::Uuid::now_v7().to_string(),
            extracted_at: Utc::now(),
            schema: None,
            spill: None,
            rows: 0,
            in_memory_sort_bytes: IN_MEMORY_SORT_BYTES,
        }
    }

    /// Sorts buckets whose spilled data is larger than `bytes` with DataFusion's spilling
    /// sort instead of in memory (the default is 96 MiB).
    pub fn with_in_memory_sort_bytes(mut self, bytes: u64) -> Self {
        self.in_memory_sort_bytes = bytes;
        self
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn rows_written(&self) -> u64 {
        self.rows
    }

    /// Adds a batch of model rows.
    pub async fn write(&mut self, batch: RecordBatch) -> Result<()> {
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
        if batch.num_rows() == 0 {
            return Ok(());
        }
        self.check_keys_not_null(&batch)?;
        let hashes = row_hashes(&batch, &self.spec.key_columns)?;
        let mut columns = batch.columns().to_vec();
        columns.push(Arc::new(UInt64Array::from(hashes)) as ArrayRef);
        let batch = RecordBatch::try_new(stored_schema.clone(), columns)?;
        self.rows += batch.num_rows() as u64;

        let key_hashes = key_hashes(&batch, &self.spec.key_columns)?;
        let spill = match self.spill.as_mut() {
            Some(spill) => spill,
            None => self.spill.insert(Spill::new(&self.store, &stored_schema)?),
        };
        // Counting sort of row indices by partition, then one take per non-empty partition.
        let partitions = PARTITIONS as usize;
        let ids: Vec<u32> = key_hashes.iter().map(|h| bucket_of(*h, PARTITIONS)).collect();
        let mut starts = vec![0usize; partitions + 1];
        for p in &ids {
            starts[*p as usize + 1] += 1;
        }
        for p in 0..partitions {
            starts[p + 1] += starts[p];
        }
        let mut cursor = starts.clone();
        let mut order = vec![0u32; ids.len()];
        for (row, p) in ids.iter().enumerate() {
            order[cursor[*p as usize]] = row as u32;
            cursor[*p as usize] += 1;
        }
        let order = UInt32Array::from(order);
        for p in 0..partitions {
            let (start, end) = (starts[p], starts[p + 1]);
            if start < end {
                let indices = order.slice(start, end - start);
                spill.partitions[p].push(batch.clone(), &indices)?;
            }
        }
        Ok(())
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

    /// Sorts and writes every bucket, checks the primary key is unique, and commits the
    /// snapshot by writing its manifest. On error the partly written data is removed.
    pub async fn commit(mut self) -> Result<SnapshotManifest> {
        match self.finish().await {
            Ok(manifest) => Ok(manifest),
            Err(e) => {
                self.remove_data().await;
                Err(e)
            }
        }
    }

    async fn finish(&mut self) -> Result<SnapshotManifest> {
        let Some((model_schema, stored_schema)) = self.schema.clone() else {
            // No batch at all, not even an empty one: nothing tells us the columns.
            return Err(SnapshotError::SchemaMismatch {
                expected: "a schema from the source".into(),
                got: "no record batches".into(),
            });
        };
        let buckets = self.spec.buckets.unwrap_or_else(|| buckets_for(self.rows));
        tracing::debug!(
            model = self.spec.model,
            rows = self.rows,
            buckets,
            "rows spilled; sorting and writing buckets"
        );
        let mut bucket_inputs: Vec<Vec<PathBuf>> = vec![Vec::new(); buckets as usize];
        if let Some(spill) = self.spill.as_mut() {
            for (p, partition) in spill.partitions.iter_mut().enumerate() {
                if let Some(path) = partition.finish()? {
                    bucket_inputs[p % buckets as usize].push(path);
                }
            }
        }
        let props = Arc::new(writer_properties(&self.spec, &self.id, &stored_schema));
        let sort_dir = match &self.spill {
            Some(spill) => spill.dir.path().to_path_buf(),
            None => self.store.temp_dir(),
        };
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(SORT_MEMORY_BYTES, 1.0)
            .with_temp_file_path(sort_dir)
            .build_arc()?;
        let ctx = SessionContext::new_with_config_rt(
            SessionConfig::new()
                .with_target_partitions(1)
                .with_batch_size(8192),
            runtime,
        );
        let jobs = bucket_inputs
            .into_iter()
            .enumerate()
            .filter(|(_, inputs)| !inputs.is_empty())
            .map(|(bucket, inputs)| BucketJob {
                in_memory_sort_bytes: self.in_memory_sort_bytes,
                ctx: ctx.clone(),
                store: self.store.clone(),
                model: self.spec.model.clone(),
                key_columns: self.spec.key_columns.clone(),
                relative: format!(
                    "{}/bucket-{bucket:04}-of-{buckets:04}.parquet",
                    SnapshotStore::data_dir(&self.spec.model, &self.id)
                ),
                bucket: bucket as u32,
                inputs,
                schema: stored_schema.clone(),
                props: props.clone(),
            });
        let outcomes: Vec<Result<BucketOutcome>> = futures::stream::iter(jobs)
            .map(|job| async move {
                tokio::spawn(job.run())
                    .await
                    .map_err(|e| SnapshotError::Task(e.to_string()))?
            })
            .buffer_unordered(PARALLEL_BUCKETS)
            .collect()
            .await;
        let mut files = Vec::new();
        let mut duplicates = Duplicates::default();
        for outcome in outcomes {
            let outcome = outcome?;
            duplicates.merge(outcome.duplicates);
            files.push(outcome.file);
        }
        if duplicates.keys > 0 {
            return Err(SnapshotError::DuplicateKeys {
                duplicate_keys: duplicates.keys,
                examples: duplicates.examples.join(", "),
            });
        }
        if files.is_empty() {
            // An empty snapshot still records its schema in one empty file.
            files.push(self.write_empty_file(buckets, &stored_schema, &props).await?);
        }
        files.sort_by_key(|f| f.bucket);
        let manifest = SnapshotManifest {
            format_version: FORMAT_VERSION,
            id: self.id.clone(),
            model: self.spec.model.clone(),
            run_id: self.spec.run_id.clone(),
            extracted_at: self.extracted_at,
            key_columns: self.spec.key_columns.clone(),
            buckets,
            rows: self.rows,
            columns: column_infos(&model_schema),
            files,
        };
        let path = SnapshotStore::manifest_path(&manifest.model, &manifest.id);
        let bytes = serde_json::to_vec_pretty(&manifest).map_err(|e| SnapshotError::BadManifest {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        self.store.put(&path, bytes.into()).await?;
        Ok(manifest)
    }

    async fn write_empty_file(
        &self,
        buckets: u32,
        schema: &SchemaRef,
        props: &WriterProperties,
    ) -> Result<SnapshotFile> {
        let relative = format!(
            "{}/bucket-0000-of-{buckets:04}.parquet",
            SnapshotStore::data_dir(&self.spec.model, &self.id)
        );
        let sink = BufWriter::new(self.store.object_store(), self.store.path(&relative));
        let parquet_err = |source| SnapshotError::Parquet {
            model: self.spec.model.clone(),
            source,
        };
        let mut writer =
            AsyncArrowWriter::try_new(sink, schema.clone(), Some(props.clone())).map_err(parquet_err)?;
        writer.finish().await.map_err(parquet_err)?;
        Ok(SnapshotFile {
            path: relative,
            bucket: 0,
            rows: 0,
            bytes: writer.bytes_written() as u64,
        })
    }

    /// Abandons the snapshot: nothing it wrote stays.
    pub async fn abort(mut self) {
        self.remove_data().await;
    }

    async fn remove_data(&mut self) {
        // The spill directory goes with `self.spill`.
        self.spill = None;
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

impl Spill {
    fn new(store: &SnapshotStore, schema: &SchemaRef) -> Result<Self> {
        let base = store.temp_dir();
        std::fs::create_dir_all(&base).map_err(|e| spill_error(&base, e))?;
        let dir = tempfile::Builder::new()
            .prefix("snapshot-")
            .tempdir_in(&base)
            .map_err(|e| spill_error(&base, e))?;
        let partitions = (0..PARTITIONS)
            .map(|p| SpillPartition {
                coalescer: BatchCoalescer::new(schema.clone(), SPILL_BATCH_ROWS),
                writer: None,
                path: dir.path().join(format!("part-{p:04}.arrow")),
                rows: 0,
            })
            .collect();
        Ok(Self { dir, partitions })
    }
}

impl SpillPartition {
    fn push(&mut self, batch: RecordBatch, indices: &UInt32Array) -> Result<()> {
        self.coalescer.push_batch_with_indices(batch, indices)?;
        while let Some(full) = self.coalescer.next_completed_batch() {
            self.write(&full)?;
        }
        Ok(())
    }

    fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let writer = match self.writer.as_mut() {
            Some(w) => w,
            None => {
                let file = File::create(&self.path).map_err(|e| spill_error(&self.path, e))?;
                self.writer
                    .insert(IpcWriter::try_new(FileBuffer::new(file), &batch.schema())?)
            }
        };
        writer.write(batch)?;
        self.rows += batch.num_rows() as u64;
        Ok(())
    }

    /// Flushes what is buffered; returns the file, or `None` when the partition is empty.
    fn finish(&mut self) -> Result<Option<PathBuf>> {
        self.coalescer.finish_buffered_batch()?;
        while let Some(batch) = self.coalescer.next_completed_batch() {
            self.write(&batch)?;
        }
        match self.writer.take() {
            Some(mut writer) => {
                writer.finish()?;
                Ok(Some(self.path.clone()))
            }
            None => Ok(None),
        }
    }
}

fn spill_error(path: &std::path::Path, e: std::io::Error) -> SnapshotError {
    SnapshotError::InvalidLocation {
        location: path.display().to_string(),
        reason: format!("cannot write spill files: {e}"),
    }
}

/// Phase two for one bucket.
struct BucketJob {
    in_memory_sort_bytes: u64,
    ctx: SessionContext,
    store: SnapshotStore,
    model: String,
    key_columns: Vec<String>,
    relative: String,
    bucket: u32,
    inputs: Vec<PathBuf>,
    schema: SchemaRef,
    props: Arc<WriterProperties>,
}

struct BucketOutcome {
    file: SnapshotFile,
    duplicates: Duplicates,
}

impl BucketJob {
    async fn run(self) -> Result<BucketOutcome> {
        let spilled_bytes: u64 = self
            .inputs
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum();
        if spilled_bytes <= self.in_memory_sort_bytes {
            return self.sort_in_memory().await;
        }
        let paths: Vec<String> = self.inputs.iter().map(|p| p.display().to_string()).collect();
        let sort: Vec<_> = self
            .key_columns
            .iter()
            .map(|k| ident(k).sort(true, false))
            .collect();
        let options = ArrowReadOptions {
            schema: Some(&self.schema),
            ..Default::default()
        };
        let stream = self
            .ctx
            .read_arrow(paths, options)
            .await?
            .sort(sort)?
            .execute_stream()
            .await?;
        self.write_sorted(stream).await
    }

    /// A bucket that fits the budget: read whole, one argsort on the key, then gathered in
    /// row-group-sized slices. Cheaper than sorting batch by batch and merging them.
    async fn sort_in_memory(self) -> Result<BucketOutcome> {
        let mut batches = Vec::new();
        for path in &self.inputs {
            let file = File::open(path).map_err(|e| spill_error(path, e))?;
            let reader = arrow::ipc::reader::FileReader::try_new(std::io::BufReader::new(file), None)?;
            for batch in reader {
                batches.push(batch?);
            }
        }
        let all = arrow::compute::concat_batches(&self.schema, &batches)?;
        drop(batches);
        let key_columns: Vec<arrow::compute::SortColumn> = self
            .key_columns
            .iter()
            .map(|k| {
                Ok(arrow::compute::SortColumn {
                    values: all.column(all.schema().index_of(k)?).clone(),
                    options: None,
                })
            })
            .collect::<Result<_>>()?;
        let order = if key_columns.len() == 1 {
            arrow::compute::sort_to_indices(&key_columns[0].values, None, None)?
        } else {
            arrow::compute::lexsort_to_indices(&key_columns, None)?
        };
        drop(key_columns);
        let schema = self.schema.clone();
        let slices: Vec<Result<RecordBatch, datafusion::error::DataFusionError>> = (0..order.len())
            .step_by(IN_MEMORY_SLICE_ROWS)
            .map(|start| {
                let len = IN_MEMORY_SLICE_ROWS.min(order.len() - start);
                arrow::compute::take_record_batch(&all, &order.slice(start, len))
                    .map_err(datafusion::error::DataFusionError::from)
            })
            .collect();
        let stream: datafusion::execution::SendableRecordBatchStream =
            Box::pin(datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(
                schema,
                futures::stream::iter(slices),
            ));
        self.write_sorted(stream).await
    }

    async fn write_sorted(
        self,
        mut stream: datafusion::execution::SendableRecordBatchStream,
    ) -> Result<BucketOutcome> {
        let parquet_err = |source| SnapshotError::Parquet {
            model: self.model.clone(),
            source,
        };
        let sink = BufWriter::new(self.store.object_store(), self.store.path(&self.relative));
        let mut writer = AsyncArrowWriter::try_new(sink, self.schema.clone(), Some((*self.props).clone()))
            .map_err(parquet_err)?;
        let mut detector = DuplicateDetector::new(&self.schema, &self.key_columns)?;
        let mut rows = 0u64;
        while let Some(batch) = stream.try_next().await? {
            detector.check(&batch)?;
            rows += batch.num_rows() as u64;
            writer.write(&batch).await.map_err(parquet_err)?;
        }
        writer.finish().await.map_err(parquet_err)?;
        Ok(BucketOutcome {
            file: SnapshotFile {
                path: self.relative,
                bucket: self.bucket,
                rows,
                bytes: writer.bytes_written() as u64,
            },
            duplicates: detector.finish(),
        })
    }
}

fn writer_properties(spec: &SnapshotSpec, id: &str, schema: &Schema) -> WriterProperties {
    let key_indices: Vec<usize> = spec
        .key_columns
        .iter()
        .filter_map(|k| schema.index_of(k).ok())
        .collect();
    let mut builder = WriterProperties::builder()
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .set_compression(Compression::SNAPPY)
        // Low-cardinality columns (plans, countries) fit a small dictionary; high-cardinality
        // ones (emails, names) give up on it after a few thousand values instead of hashing
        // tens of thousands into a dictionary that is then thrown away.
        .set_dictionary_page_size_limit(DICTIONARY_PAGE_BYTES)
        .set_created_by(format!("sluice {}", env!("CARGO_PKG_VERSION")))
        .set_sorting_columns(Some(
            key_indices
                .iter()
                .map(|i| SortingColumn {
                    column_idx: *i as i32,
                    descending: false,
                    nulls_first: false,
                })
                .collect(),
        ))
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
    // Keys are unique, so dictionaries never pay off; the diff reads them on every run, so
    // fixed-width keys stay plain and uncompressed (decoding is a copy).
    for key in &spec.key_columns {
        let path = ColumnPath::from(key.as_str());
        // Each bucket spans the whole key range (buckets are by key hash), so min/max
        // statistics narrow a point lookup to one row group per bucket file; the bloom filter
        // then rules out the files that do not hold the key at all (see BENCHMARKS.md).
        builder = builder
            .set_column_dictionary_enabled(path.clone(), false)
            .set_column_bloom_filter_enabled(path.clone(), true)
            .set_column_bloom_filter_fpp(path.clone(), KEY_BLOOM_FPP)
            .set_column_bloom_filter_max_ndv(path.clone(), ROW_GROUP_ROWS as u64);
        let fixed_width = schema
            .field_with_name(key)
            .is_ok_and(|f| f.data_type().is_primitive() || f.data_type() == &DataType::Boolean);
        if fixed_width {
            builder = builder
                .set_column_encoding(path.clone(), Encoding::PLAIN)
                .set_column_compression(path, Compression::UNCOMPRESSED);
        }
    }
    builder.build()
}

/// Duplicate keys found in one bucket.
#[derive(Debug, Default)]
struct Duplicates {
    /// Distinct key values that occur more than once.
    keys: u64,
    /// A few of them, described as `id=2 (×3)`.
    examples: Vec<String>,
}

impl Duplicates {
    fn merge(&mut self, other: Duplicates) {
        self.keys += other.keys;
        for example in other.examples {
            if self.examples.len() < 5 {
                self.examples.push(example);
            }
        }
    }
}

/// Finds runs of equal keys in a key-sorted stream of batches.
struct DuplicateDetector {
    key_indices: Vec<usize>,
    key_names: Vec<String>,
    converter: RowConverter,
    /// The last key seen, as comparable row bytes, with its description and run length.
    last: Option<(Vec<u8>, String, u64)>,
    found: Duplicates,
}

impl DuplicateDetector {
    fn new(schema: &Schema, key_columns: &[String]) -> Result<Self> {
        let mut key_indices = Vec::new();
        let mut fields = Vec::new();
        for key in key_columns {
            let index = schema
                .index_of(key)
                .map_err(|_| SnapshotError::MissingKeyColumn { column: key.clone() })?;
            fields.push(SortField::new(schema.field(index).data_type().clone()));
            key_indices.push(index);
        }
        Ok(Self {
            key_indices,
            key_names: key_columns.to_vec(),
            converter: RowConverter::new(fields)?,
            last: None,
            found: Duplicates::default(),
        })
    }

    fn check(&mut self, batch: &RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let columns: Vec<ArrayRef> = self
            .key_indices
            .iter()
            .map(|i| batch.column(*i).clone())
            .collect();
        let rows = self.converter.convert_columns(&columns)?;
        for i in 0..rows.num_rows() {
            let row = rows.row(i);
            match &mut self.last {
                Some((bytes, _, count)) if bytes.as_slice() == row.as_ref() => *count += 1,
                _ => {
                    self.close_run();
                    self.last = Some((
                        row.as_ref().to_vec(),
                        describe_key(&columns, &self.key_names, i)?,
                        1,
                    ));
                }
            }
        }
        Ok(())
    }

    fn close_run(&mut self) {
        if let Some((_, description, count)) = self.last.take()
            && count > 1
        {
            self.found.keys += 1;
            if self.found.examples.len() < 5 {
                self.found.examples.push(format!("{description} (×{count})"));
            }
        }
    }

    fn finish(mut self) -> Duplicates {
        self.close_run();
        self.found
    }
}

/// `id=42` or `a=1, b=x` for row `row` of the key columns.
fn describe_key(columns: &[ArrayRef], names: &[String], row: usize) -> Result<String> {
    use arrow::util::display::{ArrayFormatter, FormatOptions};
    let options = FormatOptions::default().with_null("NULL");
    let mut parts = Vec::with_capacity(columns.len());
    for (column, name) in columns.iter().zip(names) {
        let formatter = ArrayFormatter::try_new(column.as_ref(), &options)?;
        parts.push(format!("{name}={}", formatter.value(row)));
    }
    Ok(parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{AsArray, Int64Array, StringArray};
    use arrow::datatypes::Int64Type;
    use datafusion::prelude::ParquetReadOptions;

    fn users(ids: &[i64]) -> RecordBatch {
        let names: Vec<String> = ids.iter().map(|i| format!("user {i}")).collect();
        RecordBatch::try_from_iter(vec![
            ("id", Arc::new(Int64Array::from(ids.to_vec())) as ArrayRef),
            ("name", Arc::new(StringArray::from(names)) as ArrayRef),
        ])
        .unwrap()
    }

    fn spec(buckets: Option<u32>) -> SnapshotSpec {
        SnapshotSpec {
            model: "users".into(),
            run_id: "run-1".into(),
            key_columns: vec!["id".into()],
            buckets,
        }
    }

    fn store(dir: &tempfile::TempDir) -> SnapshotStore {
        SnapshotStore::open("s", dir.path(), [])
            .unwrap()
            .with_temp_dir(dir.path().join("tmp"))
    }

    #[test]
    fn bucket_counts_grow_with_rows() {
        assert_eq!(buckets_for(0), 1);
        assert_eq!(buckets_for(200_000), 1);
        assert_eq!(buckets_for(999_999), 4);
        assert_eq!(buckets_for(10_000_000), 16);
        assert_eq!(buckets_for(30_000_000), 32);
        assert_eq!(buckets_for(u64::MAX), PARTITIONS);
    }

    #[tokio::test]
    async fn small_snapshot_is_one_sorted_file_and_commits_with_a_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir);
        let mut w = SnapshotWriter::new(store.clone(), spec(None));
        w.write(users(&[3, 1, 2])).await.unwrap();
        w.write(users(&[0])).await.unwrap();
        let manifest = w.commit().await.unwrap();
        assert_eq!(manifest.rows, 4);
        assert_eq!(manifest.buckets, 1);
        assert_eq!(manifest.files.len(), 1);
        let listed = store.list_snapshots("users").await.unwrap();
        assert_eq!(listed, vec![manifest.clone()]);
        let ctx = SessionContext::new();
        let batches = ctx
            .read_parquet(
                store.url(&manifest.files[0].path).to_string(),
                ParquetReadOptions::default(),
            )
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let ids: Vec<i64> = batches
            .iter()
            .flat_map(|b| b.column(0).as_primitive::<Int64Type>().values().to_vec())
            .collect();
        assert_eq!(ids, [0, 1, 2, 3]);
        assert!(
            std::fs::read_dir(dir.path().join("tmp"))
                .unwrap()
                .next()
                .is_none(),
            "spill files are removed"
        );
    }

    #[tokio::test]
    async fn bucketed_snapshot_places_every_row_in_its_bucket_in_key_order() {
        // Both ways of sorting a bucket: whole in memory, and DataFusion's spilling sort.
        for in_memory_limit in [u64::MAX, 0] {
            bucketed_snapshot_in_key_order(in_memory_limit).await;
        }
    }

    async fn bucketed_snapshot_in_key_order(in_memory_limit: u64) {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir);
        let mut w =
            SnapshotWriter::new(store.clone(), spec(Some(4))).with_in_memory_sort_bytes(in_memory_limit);
        let ids: Vec<i64> = (0..5000).rev().collect();
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
            let mut previous = i64::MIN;
            for batch in batches {
                let keys = key_hashes(&batch, &["id".to_string()]).unwrap();
                assert!(keys.iter().all(|k| bucket_of(*k, 4) == file.bucket));
                for id in batch.column(0).as_primitive::<Int64Type>().values() {
                    assert!(*id > previous, "sorted by key");
                    previous = *id;
                }
            }
        }
    }

    #[tokio::test]
    async fn duplicate_keys_are_refused_and_nothing_is_committed() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir);
        let mut w = SnapshotWriter::new(store.clone(), spec(None));
        w.write(users(&[1, 2, 3, 3])).await.unwrap();
        w.write(users(&[2, 3])).await.unwrap();
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
        let store = store(&dir);
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
        let store = store(&dir);
        let mut w = SnapshotWriter::new(store.clone(), spec(None));
        w.write(users(&[])).await.unwrap();
        let manifest = w.commit().await.unwrap();
        assert_eq!(manifest.rows, 0);
        assert_eq!(manifest.files.len(), 1);
        assert_eq!(manifest.columns.len(), 2);
    }
}
