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
//!    key hash into [`PARTITIONS`] fine partitions, appended to local Arrow IPC files. A
//!    snapshot that is to be a delta first loads fingerprints of its parent's keys and row
//!    hashes (`fingerprints`), and probes each row: a row the parent holds unchanged claims its
//!    parent row and is not spilled at all; only the rows the parent does not hold (new or
//!    changed) are, a few percent of a typical run instead of all of them. A batch may arrive
//!    hashed and probed already, on the thread that read it from the source ([`BatchHashes`],
//!    [`SnapshotWriter::probe`]).
//! 2. **Sort and write** (at commit, when the row count is known), two buckets at a time, as a
//!    base or as a delta of a parent snapshot:
//!    - a **base** writes every row: the bucket count is chosen from the row count; each bucket
//!      (the union of the fine partitions that nest into it) is sorted by key — whole in memory,
//!      or by DataFusion's sort, which spills to disk — and encoded as Parquet;
//!    - a **delta** writes only what its parent does not hold. The keys and row hashes of a
//!      bucket's spilled rows are sorted and merged with the parent's index (keys, row hashes,
//!      layers, sorted the same way): the parent's rows the probe claimed stay as they are, the
//!      others were changed or deleted. The bucket's files are a new index (every key with its
//!      row hash and the layer holding its row), what changed, and the new and changed rows,
//!      gathered from the spill. Each claim added a check of its row to a sum, and the merges
//!      add up the same check over the parent's rows they take as claimed: a row taken for
//!      another fails the snapshot. A delta shares its parent's bucket count.
//!
//!    Equal keys end up adjacent either way (a key claimed and spilled again meets its parent
//!    row), so duplicate keys are found without a second pass.
//!
//! A delta's index points into **layers**: its parent's own rows and the layers the parent
//! pointed into, oldest (the base) first. A snapshot is written as a base when it has no parent,
//! when the columns, key or bucket count moved away from the parent's, when the chain reaches
//! [`MAX_LAYERS`], or when the deltas hold more than half as many rows as the snapshot
//! (compaction: the next base folds them in).
//!
//! While a delta is being written, a marker `<id>.writing` beside the manifests names its parent,
//! so retention keeps the parent's layers until the delta commits (see [`SnapshotStore::retire`]).

use std::fs::File;
use std::io::BufWriter as FileBuffer;
use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray, RecordBatch, UInt32Array, UInt64Array};
use arrow::compute::BatchCoalescer;
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef, UInt32Type, UInt64Type};
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
use crate::fingerprints::{Claims, Fingerprints, check_term};
use crate::hash::{bucket_of, key_check_hashes, key_hashes, row_hashes};
use crate::manifest::{
    BASE_HASH_COLUMN, CHANGE_OP_COLUMN, FORMAT_VERSION, LAYER_COLUMN, OP_ADDED, OP_DELETED, OP_UPDATED,
    RESERVED_PREFIX, ROW_HASH_COLUMN, SnapshotFile, SnapshotManifest, column_infos,
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
/// Memory the bucket sorts may use together before spilling to disk, shared out evenly: each
/// sort has a pool of its own (in one pool a sort could take it all and leave the other's merge
/// of its spill files without the few megabytes it needs).
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
/// Layers a chain of deltas may reach (its base included) before the next snapshot is a base.
pub const MAX_LAYERS: usize = 16;

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

/// The fewest buckets (a power of two, at most [`PARTITIONS`]) over which `spilled` bytes come
/// to at most `in_memory` bytes a bucket, so each is sorted whole in memory rather than by a
/// spilling sort.
fn buckets_to_sort_in_memory(spilled: u64, in_memory: u64) -> u32 {
    if in_memory == 0 {
        return 1;
    }
    spilled
        .div_ceil(in_memory)
        .clamp(1, PARTITIONS as u64)
        .next_power_of_two() as u32
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
    /// Memory the spilling sorts of larger buckets share.
    sort_memory_bytes: usize,
    /// The snapshot to write this one as a delta of, when it qualifies.
    parent: Option<Arc<SnapshotManifest>>,
    /// Whether the marker naming the parent was written (and is to be removed).
    marked: bool,
    started: bool,
    /// The parent's rows, probed as rows stream in when this snapshot is to be its delta:
    /// unchanged rows claim their parent rows and are not spilled.
    probe: Option<Probe>,
    /// Whether rows were probed: then the snapshot must be written as a delta
    /// (the values of unchanged rows were not kept).
    probed: bool,
}

/// Phase one: fine partitions on local disk.
struct Spill {
    dir: tempfile::TempDir,
    /// Rows: every row, or while probing the parent only the rows it does not hold.
    partitions: Vec<SpillPartition>,
}

struct SpillPartition {
    coalescer: BatchCoalescer,
    writer: Option<IpcWriter<FileBuffer<File>>>,
    path: PathBuf,
    rows: u64,
    /// Rows pushed so far (written or buffered).
    pushed: u64,
}

/// The key columns, the row hash and (`with_layer`, where the file has one) the layer column
/// of a snapshot's data or index file, through ranged reads: only those column chunks are
/// fetched, not the file. Columns come in the file's order.
async fn index_columns(
    store: &SnapshotStore,
    model: &str,
    file: &SnapshotFile,
    key_columns: &[String],
    with_layer: bool,
) -> Result<parquet::arrow::async_reader::ParquetRecordBatchStream<crate::ObjectFileReader>> {
    use parquet::arrow::{ParquetRecordBatchStreamBuilder, ProjectionMask};
    let parquet_err = |source| SnapshotError::Parquet {
        model: model.to_string(),
        source,
    };
    let reader = crate::ObjectFileReader::new(store.object_store(), store.path(&file.path), file.bytes);
    let builder = ParquetRecordBatchStreamBuilder::new(reader)
        .await
        .map_err(parquet_err)?;
    let schema = builder.schema().clone();
    let damaged = |column: &str| SnapshotError::DamagedFile {
        model: model.to_string(),
        path: file.path.clone(),
        column: column.to_string(),
    };
    let mut wanted = Vec::new();
    for column in key_columns.iter().map(String::as_str).chain([ROW_HASH_COLUMN]) {
        wanted.push(schema.index_of(column).map_err(|_| damaged(column))?);
    }
    if with_layer {
        wanted.extend(schema.index_of(LAYER_COLUMN).ok());
    }
    let mask = ProjectionMask::roots(builder.parquet_schema(), wanted);
    builder
        .with_projection(mask)
        .with_batch_size(64 * 1024)
        .build()
        .map_err(parquet_err)
}

/// A batch's key hashes (which bucket a row goes to) and row hashes (what the diff compares),
/// and, once probed, which of its rows the parent does not hold unchanged.
#[derive(Clone)]
pub struct BatchHashes {
    key: Vec<u64>,
    row: Vec<u64>,
    kept: Option<ProbedRows>,
}

/// The outcome of a [`Probe`]: the rows to keep whole (new or changed since the parent).
#[derive(Clone)]
struct ProbedRows {
    /// The probe that decided, so a writer only takes the outcome of its own.
    by: Probe,
    kept: Vec<bool>,
}

impl BatchHashes {
    /// Hashes `batch` of a model whose primary key is `key_columns`.
    pub fn of(batch: &RecordBatch, key_columns: &[String]) -> Result<Self> {
        Ok(Self {
            key: key_hashes(batch, key_columns)?,
            row: row_hashes(batch, key_columns)?,
            kept: None,
        })
    }

    /// Probes the hashed rows of `batch` against a writer's parent ([`SnapshotWriter::probe`]),
    /// where the batch was read rather than on the writer's task. Each row found unchanged
    /// claims its parent row, so a batch is probed once and then written to that writer.
    pub fn probe(&mut self, batch: &RecordBatch, probe: &Probe) -> Result<()> {
        self.kept = Some(ProbedRows {
            by: probe.clone(),
            kept: probe.kept(batch, &self.key, &self.row)?,
        });
        Ok(())
    }

    /// Once probed, which rows are new or changed (kept whole); the others the parent holds.
    pub fn kept(&self) -> Option<&[bool]> {
        self.kept.as_ref().map(|k| k.kept.as_slice())
    }
}

impl std::fmt::Debug for BatchHashes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchHashes")
            .field("key", &self.key)
            .field("row", &self.row)
            .field("kept", &self.kept.as_ref().map(|k| &k.kept))
            .finish()
    }
}

/// A delta writer's fingerprints of its parent's rows, shared with the threads that read the
/// source: probing was half the work of the one task writing the snapshot, while the threads
/// decoding the source idled (BENCHMARKS.md).
#[derive(Clone)]
pub struct Probe {
    fingerprints: Arc<Fingerprints>,
    key_columns: Arc<[String]>,
}

impl Probe {
    /// Which rows of `batch` (with these key and row hashes) the parent does not hold
    /// unchanged, or held for a row that claimed it first: those to keep whole. The others
    /// claim their parent rows.
    fn kept(&self, batch: &RecordBatch, key_hashes: &[u64], row_hashes: &[u64]) -> Result<Vec<bool>> {
        let key_checks = key_check_hashes(batch, &self.key_columns)?;
        Ok(self.fingerprints.claim_all(key_hashes, row_hashes, &key_checks))
    }

    fn is(&self, other: &Probe) -> bool {
        Arc::ptr_eq(&self.fingerprints, &other.fingerprints)
    }
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
            sort_memory_bytes: SORT_MEMORY_BYTES,
            parent: None,
            marked: false,
            started: false,
            probe: None,
            probed: false,
        }
    }

    /// Writes the snapshot as a delta of `parent` (normally the model's latest snapshot) when
    /// it qualifies at commit; otherwise as a base.
    pub fn with_parent(mut self, parent: SnapshotManifest) -> Self {
        self.parent = Some(Arc::new(parent));
        self
    }

    /// The parent this snapshot may be written as a delta of.
    pub fn parent(&self) -> Option<&SnapshotManifest> {
        self.parent.as_deref()
    }

    /// The probe of the parent's rows, for rows hashed before they reach [`Self::write_hashed`]
    /// ([`BatchHashes::probe`]); `None` before the first batch (even an empty one) and when
    /// this snapshot is written as a base.
    pub fn probe(&self) -> Option<Probe> {
        self.probe.clone()
    }

    /// Before the first row: a marker naming the parent, so retention keeps the parent's
    /// layers; then the parent is checked to be still there (a retention that ran before the
    /// marker existed may have retired it, and then this snapshot is written as a base).
    async fn start(&mut self) -> Result<()> {
        self.started = true;
        let Some(parent) = self.parent.clone() else {
            return Ok(());
        };
        let marker = SnapshotStore::marker_path(&self.spec.model, &self.id);
        let body = crate::store::WriterMarker {
            parent: parent.id.clone(),
            started_at: self.extracted_at,
            // What the merge reads and the new snapshot will refer to.
            files: parent
                .index_files()
                .iter()
                .chain(parent.layers_for_child().iter().flat_map(|l| &l.files))
                .map(|f| f.path.clone())
                .collect(),
        };
        let body = serde_json::to_vec(&body).map_err(|e| SnapshotError::BadManifest {
            path: marker.clone(),
            reason: e.to_string(),
        })?;
        self.store.put(&marker, body.into()).await?;
        self.marked = true;
        if self
            .store
            .get(&SnapshotStore::manifest_path(&parent.model, &parent.id))
            .await?
            .is_none()
        {
            tracing::info!(
                model = self.spec.model,
                parent = parent.id,
                "the parent snapshot was retired; writing a base"
            );
            self.parent = None;
            return Ok(());
        }
        if self.may_be_delta_of(&parent) {
            self.probe = Some(Probe {
                fingerprints: Arc::new(self.parent_fingerprints(&parent).await?),
                key_columns: self.spec.key_columns.clone().into(),
            });
        }
        Ok(())
    }

    /// Whether a snapshot of `parent`'s key may be written as its delta, as far as can be told
    /// before the first row (the columns are checked on the first batch).
    fn may_be_delta_of(&self, parent: &SnapshotManifest) -> bool {
        parent.rows > 0
            && parent.key_columns == self.spec.key_columns
            && parent.layers.len() + 1 < MAX_LAYERS
            && parent.delta_rows().saturating_mul(2) <= parent.rows
            && self.spec.buckets.is_none_or(|fixed| fixed == parent.buckets)
    }

    /// Fingerprints of every `(key, row hash)` of `parent`, read from its index (only the key
    /// and hash columns are fetched).
    async fn parent_fingerprints(&self, parent: &SnapshotManifest) -> Result<Fingerprints> {
        let parquet_err = |source| SnapshotError::Parquet {
            model: self.spec.model.clone(),
            source,
        };
        // A fresh seed a writer: a collision one run meets, the next does not.
        let seed = uuid::Uuid::now_v7().as_u64_pair().1 ^ self.extracted_at.timestamp_micros() as u64;
        let mut fingerprints = Vec::with_capacity(parent.rows as usize);
        for file in parent.index_files() {
            let mut stream =
                index_columns(&self.store, &self.spec.model, file, &self.spec.key_columns, false).await?;
            while let Some(batch) = stream.try_next().await.map_err(parquet_err)? {
                let keys = key_hashes(&batch, &self.spec.key_columns)?;
                let hashes = batch
                    .column_by_name(ROW_HASH_COLUMN)
                    .map(|c| arrow::compute::cast(c, &DataType::UInt64))
                    .transpose()?
                    .ok_or_else(|| SnapshotError::DamagedFile {
                        model: self.spec.model.clone(),
                        path: file.path.clone(),
                        column: ROW_HASH_COLUMN.to_string(),
                    })?;
                let hashes = hashes.as_primitive::<UInt64Type>();
                fingerprints.extend(
                    keys.iter()
                        .zip(hashes.values())
                        .map(|(k, h)| Fingerprints::of(seed, *k, *h)),
                );
            }
        }
        tokio::task::spawn_blocking(move || Fingerprints::new(seed, fingerprints))
            .await
            .map_err(|e| SnapshotError::Task(e.to_string()))
    }

    async fn remove_marker(&mut self) {
        if self.marked {
            let marker = SnapshotStore::marker_path(&self.spec.model, &self.id);
            if let Err(e) = self.store.delete(&marker).await {
                tracing::warn!(path = marker, error = %e, "could not remove a snapshot writer's marker");
            } else {
                self.marked = false;
            }
        }
    }

    /// The parent when this snapshot, of `rows` rows and `columns`, qualifies as its delta;
    /// with the bucket count to use.
    fn delta_parent(&self, model_schema: &Schema) -> Option<(Arc<SnapshotManifest>, u32)> {
        let parent = self.parent.clone()?;
        if self.probed {
            // Unchanged rows were not kept: this snapshot is the parent's delta, whatever its
            // size (when it outgrew the parent's bucket count, the next one compacts).
            return Some((parent.clone(), parent.buckets));
        }
        if self.rows == 0
            || parent.rows == 0
            || parent.key_columns != self.spec.key_columns
            || parent.columns != column_infos(model_schema)
            || parent.layers.len() + 1 >= MAX_LAYERS
            || parent.delta_rows().saturating_mul(2) > parent.rows.max(self.rows)
        {
            return None;
        }
        let fits = match self.spec.buckets {
            Some(fixed) => fixed == parent.buckets,
            // Within a factor of two of the ideal count: no rebase each time a model hovers
            // around a bucket boundary.
            None => {
                let wanted = buckets_for(self.rows);
                wanted <= parent.buckets.saturating_mul(2) && parent.buckets <= wanted.saturating_mul(2)
            }
        };
        fits.then_some((parent.clone(), parent.buckets))
    }

    /// Sorts buckets whose spilled data is larger than `bytes` with DataFusion's spilling
    /// sort instead of in memory (the default is 96 MiB).
    pub fn with_in_memory_sort_bytes(mut self, bytes: u64) -> Self {
        self.in_memory_sort_bytes = bytes;
        self
    }

    /// The memory the spilling sorts share (the default is 512 MiB); a test's small budget
    /// makes them spill and merge.
    #[cfg(test)]
    fn with_sort_memory_bytes(mut self, bytes: usize) -> Self {
        self.sort_memory_bytes = bytes;
        self
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn rows_written(&self) -> u64 {
        self.rows
    }

    /// Adds a batch of model rows. Returns their row hashes (what the diff compares), for a
    /// caller that delivers the rows while they are extracted.
    pub async fn write(&mut self, batch: RecordBatch) -> Result<UInt64Array> {
        self.write_hashed(batch, None).await
    }

    /// [`SnapshotWriter::write`] of a batch whose hashes were computed already, where it was
    /// read ([`BatchHashes::of`] with this writer's key columns).
    pub async fn write_hashed(
        &mut self,
        batch: RecordBatch,
        hashes: Option<BatchHashes>,
    ) -> Result<UInt64Array> {
        if !self.started {
            self.start().await?;
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
        if batch.num_rows() == 0 {
            return Ok(UInt64Array::from(Vec::<u64>::new()));
        }
        self.check_keys_not_null(&batch)?;
        self.rows += batch.num_rows() as u64;
        // Hashed where the source's partitions are read when it reads in parallel (the
        // engine's `PartitionedRows`), else here; probed here. Hashing on a blocking thread
        // beside the spilling of the batch before made a PostgreSQL second sync 1.5-1.8 s
        // slower (the server's backend needs the second core) (BENCHMARKS.md).
        let BatchHashes {
            key: key_hashes,
            row: hashes,
            kept: probed,
        } = match hashes {
            Some(hashes) if hashes.key.len() == batch.num_rows() && hashes.row.len() == batch.num_rows() => {
                hashes
            }
            Some(_) => return Err(SnapshotError::Task("hashes of another batch".into())),
            None => BatchHashes::of(&batch, &self.spec.key_columns)?,
        };
        // While probing, the rows to keep whole: the new and changed ones. The others claimed
        // their parent rows, whose keys and hashes the parent's index holds.
        let kept: Option<Vec<bool>> = match (&self.probe, probed) {
            (None, _) => None,
            (Some(probe), Some(ProbedRows { by, kept })) if by.is(probe) => Some(kept),
            (Some(probe), _) => Some(probe.kept(&batch, &key_hashes, &hashes)?),
        };
        let hashes = UInt64Array::from(hashes);
        let mut columns = batch.columns().to_vec();
        columns.push(Arc::new(hashes.clone()));
        let batch = RecordBatch::try_new(stored_schema, columns)?;
        self.spill(batch, &key_hashes, kept)?;
        Ok(hashes)
    }

    /// Appends a hashed batch to the fine partitions: every row, or while probing the rows
    /// `kept`.
    fn spill(&mut self, batch: RecordBatch, key_hashes: &[u64], kept: Option<Vec<bool>>) -> Result<()> {
        let spill = match self.spill.as_mut() {
            Some(spill) => spill,
            None => self.spill.insert(Spill::new(&self.store, &batch.schema())?),
        };
        if kept.is_some() {
            self.probed = true;
        }
        let keep = |row: usize| kept.as_ref().is_none_or(|kept| kept[row]);
        // Counting sort of row indices by partition, then one take per non-empty partition.
        let partitions = PARTITIONS as usize;
        let mut starts = vec![0usize; partitions + 1];
        for (row, h) in key_hashes.iter().enumerate() {
            if keep(row) {
                starts[bucket_of(*h, PARTITIONS) as usize + 1] += 1;
            }
        }
        for p in 0..partitions {
            starts[p + 1] += starts[p];
        }
        let mut cursor = starts.clone();
        let mut order = vec![0u32; starts[partitions]];
        for (row, h) in key_hashes.iter().enumerate() {
            if keep(row) {
                let p = bucket_of(*h, PARTITIONS) as usize;
                order[cursor[p]] = row as u32;
                cursor[p] += 1;
            }
        }
        let order = UInt32Array::from(order);
        for p in 0..partitions {
            let (start, end) = (starts[p], starts[p + 1]);
            if start < end {
                spill.partitions[p].push(batch.clone(), &order.slice(start, end - start))?;
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
        // Columns that moved away from the parent's make a base: stop probing before any row.
        if self
            .parent
            .as_ref()
            .is_some_and(|parent| parent.columns != column_infos(&schema))
        {
            self.probe = None;
        }
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
            Ok(manifest) => {
                self.remove_marker().await;
                Ok(manifest)
            }
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
        let delta = self.delta_parent(&model_schema);
        let buckets = match &delta {
            Some((_, buckets)) => *buckets,
            None => self.spec.buckets.unwrap_or_else(|| {
                let spilled = self.spill.as_ref().map_or(0, Spill::bytes);
                buckets_for(self.rows).max(buckets_to_sort_in_memory(spilled, self.in_memory_sort_bytes))
            }),
        };
        tracing::debug!(
            model = self.spec.model,
            rows = self.rows,
            buckets,
            delta_of = delta.as_ref().map(|(p, _)| p.id.as_str()),
            "rows spilled; sorting and writing buckets"
        );
        // What the probe's claims leave: the parent's rows changed or deleted. The memory the
        // probe held goes before the buckets are sorted.
        let claims: Option<Arc<Claims>> = match self.probe.take() {
            Some(probe) if self.probed => Some(Arc::new(probe.fingerprints.claims())),
            _ => None,
        };
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
        let sort_memory_bytes = self.sort_memory_bytes / PARALLEL_BUCKETS;
        let data_dir = SnapshotStore::data_dir(&self.spec.model, &self.id);
        let own_layer = delta.as_ref().map_or(0, |(parent, _)| parent.own_layer() + 1);
        let index_schema = index_schema(&stored_schema, &self.spec.key_columns)?;
        let index_props = Arc::new(index_properties(&self.spec, &self.id, &index_schema));
        let changes_schema = changes_schema(&stored_schema, &self.spec.key_columns)?;
        let changes_props = Arc::new(
            WriterProperties::builder()
                .set_compression(Compression::SNAPPY)
                .build(),
        );
        let jobs = bucket_inputs
            .into_iter()
            .enumerate()
            // A delta's bucket without new or changed rows still has the parent's rows to keep
            // or delete.
            .filter(|(bucket, inputs)| {
                !inputs.is_empty()
                    || delta.as_ref().is_some_and(|(parent, _)| {
                        parent.index_covering(*bucket as u32, buckets).next().is_some()
                    })
            })
            .map(|(bucket, inputs)| BucketJob {
                in_memory_sort_bytes: self.in_memory_sort_bytes,
                sort_memory_bytes,
                sort_dir: sort_dir.clone(),
                store: self.store.clone(),
                model: self.spec.model.clone(),
                key_columns: self.spec.key_columns.clone(),
                relative: format!("{data_dir}/bucket-{bucket:04}-of-{buckets:04}.parquet"),
                bucket: bucket as u32,
                inputs,
                schema: stored_schema.clone(),
                props: props.clone(),
                delta: delta.as_ref().map(|(parent, _)| DeltaJob {
                    parent_index: parent.index_covering(bucket as u32, buckets).next().cloned(),
                    own_layer,
                    claims: claims.clone(),
                    index_relative: format!("{data_dir}/index-{bucket:04}-of-{buckets:04}.parquet"),
                    index_schema: index_schema.clone(),
                    index_props: index_props.clone(),
                    changes_relative: format!("{data_dir}/changes-{bucket:04}-of-{buckets:04}.parquet"),
                    changes_schema: changes_schema.clone(),
                    changes_props: changes_props.clone(),
                }),
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
        let mut index = Vec::new();
        let mut changes = Vec::new();
        let mut duplicates = Duplicates::default();
        let mut taken_as_claimed = ClaimCheck::default();
        for outcome in outcomes {
            let outcome = outcome?;
            duplicates.merge(outcome.duplicates);
            taken_as_claimed.add(outcome.taken_as_claimed);
            files.extend(outcome.file);
            index.extend(outcome.index);
            changes.extend(outcome.changes);
        }
        // The parent's rows the merges took as unchanged must be the rows the probe found
        // unchanged; else a row was taken for another (a collision, whatever the merges found).
        if let Some(claims) = &claims
            && (taken_as_claimed.rows != claims.rows || taken_as_claimed.check != claims.check)
        {
            tracing::warn!(
                model = self.spec.model,
                claimed = claims.rows,
                taken = taken_as_claimed.rows,
                "a delta's probe and its merge disagree on the unchanged rows"
            );
            return Err(SnapshotError::FingerprintCollision {
                model: self.spec.model.clone(),
            });
        }
        if duplicates.keys > 0 {
            return Err(SnapshotError::DuplicateKeys {
                duplicate_keys: duplicates.keys,
                examples: duplicates.examples.join(", "),
            });
        }
        if files.is_empty() && delta.is_none() {
            // An empty snapshot still records its schema in one empty file.
            files.push(self.write_empty_file(buckets, &stored_schema, &props).await?);
        }
        files.sort_by_key(|f| f.bucket);
        index.sort_by_key(|f| f.bucket);
        changes.sort_by_key(|f| f.bucket);
        let (parent, layers) = match &delta {
            Some((parent, _)) => (Some(parent.id.clone()), parent.layers_for_child()),
            None => (None, Vec::new()),
        };
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
            parent,
            index,
            layers,
            changes,
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
        self.remove_marker().await;
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
    /// Bytes of rows spilled so far (rows still buffered not counted).
    fn bytes(&self) -> u64 {
        self.partitions
            .iter()
            .filter_map(|p| std::fs::metadata(&p.path).ok())
            .map(|m| m.len())
            .sum()
    }

    fn new(store: &SnapshotStore, schema: &SchemaRef) -> Result<Self> {
        let base = store.temp_dir();
        std::fs::create_dir_all(&base).map_err(|e| spill_error(&base, e))?;
        let dir = tempfile::Builder::new()
            .prefix("snapshot-")
            .tempdir_in(&base)
            .map_err(|e| spill_error(&base, e))?;
        let partitions = (0..PARTITIONS)
            .map(|p| SpillPartition::new(schema, dir.path().join(format!("part-{p:04}.arrow"))))
            .collect();
        Ok(Self { dir, partitions })
    }
}

impl SpillPartition {
    fn new(schema: &SchemaRef, path: PathBuf) -> Self {
        Self {
            coalescer: BatchCoalescer::new(schema.clone(), SPILL_BATCH_ROWS),
            writer: None,
            path,
            rows: 0,
            pushed: 0,
        }
    }

    fn push(&mut self, batch: RecordBatch, indices: &UInt32Array) -> Result<()> {
        self.pushed += indices.len() as u64;
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
    /// This bucket's share of [`SORT_MEMORY_BYTES`] when it is too large to sort in memory.
    sort_memory_bytes: usize,
    /// Where that sort spills.
    sort_dir: PathBuf,
    store: SnapshotStore,
    model: String,
    key_columns: Vec<String>,
    relative: String,
    bucket: u32,
    /// Spilled rows (every row, or while probing only those kept).
    inputs: Vec<PathBuf>,
    schema: SchemaRef,
    props: Arc<WriterProperties>,
    /// Set when the snapshot is a delta.
    delta: Option<DeltaJob>,
}

/// What a delta's bucket needs beyond a base's.
struct DeltaJob {
    /// The parent's index file of this bucket (none: the parent had no rows in it).
    parent_index: Option<SnapshotFile>,
    /// The layer ordinal of this snapshot's own rows.
    own_layer: u32,
    /// What the probe's claims left, when it probed: the parent's rows it did not find
    /// unchanged.
    claims: Option<Arc<Claims>>,
    index_relative: String,
    index_schema: SchemaRef,
    index_props: Arc<WriterProperties>,
    changes_relative: String,
    changes_schema: SchemaRef,
    changes_props: Arc<WriterProperties>,
}

struct BucketOutcome {
    /// Own rows (none for a delta bucket where nothing changed).
    file: Option<SnapshotFile>,
    /// A delta's index file (none when the bucket has no rows left).
    index: Option<SnapshotFile>,
    /// A delta's changes since its parent (none when nothing changed in the bucket).
    changes: Option<SnapshotFile>,
    duplicates: Duplicates,
    /// The parent's rows of this bucket the merge took as claimed by the probe.
    taken_as_claimed: ClaimCheck,
}

/// A count of rows and the wrapping sum of their check terms
/// ([`crate::fingerprints::check_term`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct ClaimCheck {
    rows: u64,
    check: u64,
}

impl ClaimCheck {
    fn add(&mut self, other: ClaimCheck) {
        self.rows += other.rows;
        self.check = self.check.wrapping_add(other.check);
    }
}

/// Where a row of a delta's new index comes from: the parent's index or the spilled rows.
#[derive(Clone, Copy, PartialEq)]
enum IndexSource {
    Parent,
    New,
}

/// A delta's new index as runs of rows of the parent's index and of the spilled rows, gathered
/// run by run: the parent's unchanged rows come in long runs, copied whole.
#[derive(Default)]
struct IndexRuns(Vec<(IndexSource, usize, usize)>);

impl IndexRuns {
    fn push(&mut self, source: IndexSource, at: usize) {
        match self.0.last_mut() {
            Some((last, _, end)) if *last == source && *end == at => *end += 1,
            _ => self.0.push((source, at, at + 1)),
        }
    }

    /// Each column of the index, from the same columns of the parent's rows and the new ones
    /// (of the same types).
    fn gather(&self, parent: &[ArrayRef], new: &[ArrayRef]) -> Result<Vec<ArrayRef>> {
        let len = self.0.iter().map(|(_, start, end)| end - start).sum();
        parent
            .iter()
            .zip(new)
            .map(|(parent, new)| {
                let (parent, new) = (parent.to_data(), new.to_data());
                let mut out = arrow::array::MutableArrayData::new(vec![&parent, &new], false, len);
                for (source, start, end) in &self.0 {
                    out.try_extend(usize::from(*source == IndexSource::New), *start, *end)?;
                }
                Ok(arrow::array::make_array(out.freeze()))
            })
            .collect()
    }
}

impl BucketJob {
    async fn run(mut self) -> Result<BucketOutcome> {
        if let Some(delta) = self.delta.take() {
            return self.run_delta(delta).await;
        }
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
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(self.sort_memory_bytes, 1.0)
            .with_temp_file_path(self.sort_dir.clone())
            .build_arc()?;
        let ctx = SessionContext::new_with_config_rt(
            SessionConfig::new()
                .with_target_partitions(1)
                .with_batch_size(8192)
                // What the merge of the spill files holds back (DataFusion's default, 10 MiB,
                // unless the pool is small).
                .with_sort_spill_reservation_bytes((self.sort_memory_bytes / 8).min(10 * 1024 * 1024)),
            runtime,
        );
        let stream = ctx
            .read_arrow(paths, options)
            .await?
            .sort(sort)?
            .execute_stream()
            .await?;
        self.write_sorted(stream).await
    }

    /// A bucket that fits the budget: read whole, one argsort on its keys, then gathered from
    /// the spilled batches in row-group-sized slices. Only the key columns are concatenated to
    /// sort: the rows are copied once, into the slices, not first into one whole bucket.
    async fn sort_in_memory(self) -> Result<BucketOutcome> {
        let mut batches = Vec::new();
        for path in &self.inputs {
            let file = File::open(path).map_err(|e| spill_error(path, e))?;
            let reader = arrow::ipc::reader::FileReader::try_new(std::io::BufReader::new(file), None)?;
            for batch in reader {
                let batch = batch?;
                if batch.num_rows() > 0 {
                    batches.push(batch);
                }
            }
        }
        // (No batch, no keys to concatenate: the bucket is written empty.)
        let order = if batches.is_empty() {
            UInt32Array::from(Vec::<u32>::new())
        } else {
            let keys: Vec<ArrayRef> = self
                .key_columns
                .iter()
                .map(|k| {
                    let column = self.schema.index_of(k)?;
                    let parts: Vec<&dyn arrow::array::Array> =
                        batches.iter().map(|b| b.column(column).as_ref()).collect();
                    Ok(arrow::compute::concat(&parts)?)
                })
                .collect::<Result<_>>()?;
            sort_order(&keys)?
        };
        // Where each spilled batch starts in the bucket's positions.
        let starts: Vec<u32> = batches
            .iter()
            .scan(0u32, |at, b| {
                let start = *at;
                *at += b.num_rows() as u32;
                Some(start)
            })
            .collect();
        let schema = self.schema.clone();
        // Gathered slice by slice as the writer asks.
        let slices = (0..order.len()).step_by(IN_MEMORY_SLICE_ROWS).map(move |start| {
            let len = IN_MEMORY_SLICE_ROWS.min(order.len() - start);
            let rows: Vec<(usize, usize)> = order.values()[start..start + len]
                .iter()
                .map(|&position| {
                    let batch = starts.partition_point(|&s| s <= position) - 1;
                    (batch, (position - starts[batch]) as usize)
                })
                .collect();
            let sources: Vec<&RecordBatch> = batches.iter().collect();
            arrow::compute::interleave_record_batch(&sources, &rows)
                .map_err(datafusion::error::DataFusionError::from)
        });
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
            file: Some(SnapshotFile {
                path: self.relative,
                bucket: self.bucket,
                rows,
                bytes: writer.bytes_written() as u64,
            }),
            index: None,
            changes: None,
            duplicates: detector.finish(),
            taken_as_claimed: ClaimCheck::default(),
        })
    }

    /// A delta's bucket: sorts the keys and row hashes of its new and changed rows, merges them
    /// with the parent's index (whose rows the probe claimed are unchanged), writes the new
    /// index, and gathers the rows the parent does not hold from the spill.
    async fn run_delta(self, delta: DeltaJob) -> Result<BucketOutcome> {
        let key_indices: Vec<usize> = self
            .key_columns
            .iter()
            .map(|k| {
                self.schema
                    .index_of(k)
                    .map_err(|_| SnapshotError::MissingKeyColumn { column: k.clone() })
            })
            .collect::<Result<_>>()?;
        let hash_index = self.schema.index_of(ROW_HASH_COLUMN)?;

        // The keys and hashes of the bucket's spilled rows, in spill order: a row's position
        // among the spilled rows is its index here.
        let mut projection = key_indices.clone();
        projection.push(hash_index);
        let mut parts = Vec::new();
        for path in &self.inputs {
            let file = File::open(path).map_err(|e| spill_error(path, e))?;
            let reader = arrow::ipc::reader::FileReader::try_new(
                std::io::BufReader::new(file),
                Some(projection.clone()),
            )?;
            for batch in reader {
                parts.push(batch?);
            }
        }
        let keys_schema = Arc::new(self.schema.project(&projection)?);
        let spilled = arrow::compute::concat_batches(&keys_schema, &parts)?;
        drop(parts);
        let rows = spilled.num_rows();
        let key_count = key_indices.len();
        let (order, sorted_integers) = match IntegerKeys::of(&spilled.columns()[..key_count])? {
            Some(keys) => {
                let (order, sorted) = keys.into_sorted();
                (order, Some(sorted))
            }
            None => (sort_order(&spilled.columns()[..key_count])?, None),
        };
        let sorted = arrow::compute::take_record_batch(&spilled, &order)?;
        drop(spilled);
        let sorted_keys: Vec<ArrayRef> = sorted.columns()[..key_count].to_vec();
        let sorted_hashes = sorted.column(key_count).as_primitive::<UInt64Type>().clone();

        let (comparable, new_rows) = match sorted_integers {
            Some(keys) => (ComparableKeys::Integers, KeyRows::Integers(keys)),
            None => {
                let comparable = ComparableKeys::rows(&sorted_keys)?;
                let rows = comparable.convert(&sorted_keys)?;
                (comparable, rows)
            }
        };

        // The parent's keys, hashes, layers and claims for this bucket, in key order (none when
        // the parent had no rows in it).
        let parent = match &delta.parent_index {
            Some(file) => {
                self.read_parent_index(file, &sorted_keys, &comparable, delta.claims.as_deref())
                    .await?
            }
            None => ParentIndex::empty(&sorted_keys, &comparable)?,
        };

        // The new index: the parent's claimed rows (unchanged) and the spilled ones, in key
        // order. Rows the parent does not hold (added or updated), with the hash it had for
        // updated ones; and the parent's rows neither claimed nor matched (deleted).
        let parent_rows = parent.rows.len();
        let mut index_rows = IndexRuns::default();
        let mut layers: Vec<u32> = Vec::with_capacity(parent_rows + rows);
        let mut own: Vec<u32> = Vec::new();
        let mut own_base: Vec<Option<u64>> = Vec::new();
        let mut deleted: Vec<u32> = Vec::new();
        let mut duplicates = DuplicateRuns::default();
        let (mut i, mut j) = (0usize, 0usize);
        loop {
            let next = match (i < rows, j < parent_rows) {
                (false, false) => break,
                (true, false) => std::cmp::Ordering::Greater,
                (false, true) => std::cmp::Ordering::Less,
                (true, true) => parent.rows.cmp(j, &new_rows, i),
            };
            if next.is_ge() {
                if i > 0 && new_rows.cmp(i - 1, &new_rows, i).is_eq() {
                    duplicates.repeat(i);
                } else {
                    duplicates.start(i);
                }
            }
            match next {
                std::cmp::Ordering::Less => {
                    // A parent row no spilled row has: unchanged when claimed, else deleted.
                    if parent.claimed(j) {
                        index_rows.push(IndexSource::Parent, j);
                        layers.push(parent.layer(j));
                    } else {
                        deleted.push(j as u32);
                    }
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    if parent.claimed(j) {
                        // Found unchanged, and spilled again: the key came twice.
                        duplicates.repeat(i);
                        index_rows.push(IndexSource::Parent, j);
                        layers.push(parent.layer(j));
                    } else if parent.hashes.value(j) == sorted_hashes.value(i) {
                        // Unchanged, but spilled whole (a snapshot written without probing).
                        index_rows.push(IndexSource::New, i);
                        layers.push(parent.layer(j));
                    } else {
                        index_rows.push(IndexSource::New, i);
                        layers.push(delta.own_layer);
                        own.push(i as u32);
                        own_base.push(Some(parent.hashes.value(j)));
                    }
                    i += 1;
                    j += 1;
                }
                std::cmp::Ordering::Greater => {
                    index_rows.push(IndexSource::New, i);
                    layers.push(delta.own_layer);
                    own.push(i as u32);
                    own_base.push(None);
                    i += 1;
                }
            }
        }
        let duplicates = duplicates.finish(&sorted_keys, &self.key_columns)?;
        let taken_as_claimed = parent.taken;
        if duplicates.keys > 0 {
            return Ok(BucketOutcome {
                file: None,
                index: None,
                changes: None,
                duplicates,
                taken_as_claimed,
            });
        }

        // What changed since the parent, for the diff of a mapping whose baseline is the
        // parent: added and updated keys (in this snapshot's own layer) and deleted ones (in
        // the layer that holds their last row).
        let own_indices = UInt32Array::from(own.clone());
        let mut upserts: Vec<ArrayRef> = sorted_keys
            .iter()
            .map(|k| arrow::compute::take(k, &own_indices, None))
            .collect::<std::result::Result<_, _>>()?;
        upserts.push(Arc::new(arrow::array::UInt8Array::from_iter_values(
            own_base
                .iter()
                .map(|b| if b.is_some() { OP_UPDATED } else { OP_ADDED }),
        )));
        upserts.push(arrow::compute::take(&sorted_hashes, &own_indices, None)?);
        upserts.push(Arc::new(UInt64Array::from(own_base)));
        upserts.push(Arc::new(UInt32Array::from(vec![delta.own_layer; own.len()])));
        let mut change_batches = vec![RecordBatch::try_new(delta.changes_schema.clone(), upserts)?];
        if !deleted.is_empty() {
            let gone = UInt32Array::from(deleted);
            let mut deletes: Vec<ArrayRef> = parent
                .keys
                .iter()
                .map(|k| arrow::compute::take(k, &gone, None))
                .collect::<std::result::Result<_, _>>()?;
            deletes.push(Arc::new(arrow::array::UInt8Array::from(vec![
                OP_DELETED;
                gone.len()
            ])));
            deletes.push(Arc::new(UInt64Array::new_null(gone.len())));
            deletes.push(arrow::compute::take(&parent.hashes, &gone, None)?);
            deletes.push(match &parent.layers {
                Some(layers) => arrow::compute::take(layers, &gone, None)?,
                None => Arc::new(UInt32Array::from(vec![0; gone.len()])),
            });
            change_batches.push(RecordBatch::try_new(delta.changes_schema.clone(), deletes)?);
        }
        let change_count: usize = change_batches.iter().map(|b| b.num_rows()).sum();
        let changes = if change_count == 0 {
            None
        } else {
            Some(
                self.write_batches(
                    &delta.changes_relative,
                    &delta.changes_schema,
                    &delta.changes_props,
                    change_batches,
                )
                .await?,
            )
        };

        let index = if layers.is_empty() {
            None
        } else {
            let new_columns: Vec<ArrayRef> = sorted_keys
                .iter()
                .cloned()
                .chain([Arc::new(sorted_hashes) as ArrayRef])
                .collect();
            let parent_columns: Vec<ArrayRef> = parent
                .keys
                .iter()
                .cloned()
                .chain([Arc::new(parent.hashes.clone()) as ArrayRef])
                .collect();
            let mut index_columns = index_rows.gather(&parent_columns, &new_columns)?;
            index_columns.push(Arc::new(UInt32Array::from(layers)) as ArrayRef);
            let index_batch = RecordBatch::try_new(delta.index_schema.clone(), index_columns)?;
            Some(
                self.write_batches(
                    &delta.index_relative,
                    &delta.index_schema,
                    &delta.index_props,
                    [index_batch],
                )
                .await?,
            )
        };

        let file = if own.is_empty() {
            None
        } else {
            // Own rows in key order: their spill positions, gathered in spill order, then put
            // back in key order.
            let mut wanted: Vec<(u32, u32)> = Vec::with_capacity(own.len());
            for (rank, i) in own.iter().enumerate() {
                wanted.push((order.value(*i as usize), rank as u32));
            }
            wanted.sort_unstable();
            let gathered = self.gather(&wanted)?;
            let mut back = vec![0u32; wanted.len()];
            for (at, (_, rank)) in wanted.iter().enumerate() {
                back[*rank as usize] = at as u32;
            }
            let in_key_order = arrow::compute::take_record_batch(&gathered, &UInt32Array::from(back))?;
            drop(gathered);
            let batches: Vec<RecordBatch> = (0..in_key_order.num_rows())
                .step_by(ROW_GROUP_ROWS)
                .map(|start| in_key_order.slice(start, ROW_GROUP_ROWS.min(in_key_order.num_rows() - start)))
                .collect();
            Some(
                self.write_batches(&self.relative, &self.schema, &self.props, batches)
                    .await?,
            )
        };
        Ok(BucketOutcome {
            file,
            index,
            changes,
            duplicates,
            taken_as_claimed,
        })
    }

    /// Rows at the spill positions `wanted` (sorted ascending; the second field is carried
    /// along), in that order, read batch by batch so only the wanted rows stay in memory.
    fn gather(&self, wanted: &[(u32, u32)]) -> Result<RecordBatch> {
        let mut out = Vec::new();
        let mut offset = 0u32;
        let mut next = 0usize;
        'files: for path in &self.inputs {
            let file = File::open(path).map_err(|e| spill_error(path, e))?;
            let reader = arrow::ipc::reader::FileReader::try_new(std::io::BufReader::new(file), None)?;
            for batch in reader {
                if next == wanted.len() {
                    break 'files;
                }
                let batch = batch?;
                let end = offset + batch.num_rows() as u32;
                let mut indices = Vec::new();
                while next < wanted.len() && wanted[next].0 < end {
                    indices.push(wanted[next].0 - offset);
                    next += 1;
                }
                if !indices.is_empty() {
                    out.push(arrow::compute::take_record_batch(
                        &batch,
                        &UInt32Array::from(indices),
                    )?);
                }
                offset = end;
            }
        }
        Ok(arrow::compute::concat_batches(&self.schema, &out)?)
    }

    /// The parent's index of this bucket: keys as comparable rows (in the new snapshot's key
    /// types), row hashes and layer ordinals (none for a base parent: all layer 0); and, when
    /// the probe claimed rows (`claims`), which of these it claimed, with their check.
    async fn read_parent_index(
        &self,
        file: &SnapshotFile,
        new_keys: &[ArrayRef],
        comparable: &ComparableKeys,
        claims: Option<&Claims>,
    ) -> Result<ParentIndex> {
        // One bucket's keys, hashes and layers, a few MiB: only those column chunks are read.
        let stream = index_columns(&self.store, &self.model, file, &self.key_columns, true).await?;
        let schema = stream.schema().clone();
        let batches: Vec<RecordBatch> =
            stream
                .try_collect()
                .await
                .map_err(|source| SnapshotError::Parquet {
                    model: self.model.clone(),
                    source,
                })?;
        let all = arrow::compute::concat_batches(&schema, &batches)?;
        drop(batches);
        // By name: the reader gives a projection's columns in the file's order.
        let column = |name: &str| {
            all.column_by_name(name)
                .cloned()
                .ok_or_else(|| SnapshotError::DamagedFile {
                    model: self.model.clone(),
                    path: file.path.clone(),
                    column: name.to_string(),
                })
        };
        let keys = self
            .key_columns
            .iter()
            .zip(new_keys)
            .map(|(name, new)| {
                let old = column(name)?;
                if old.data_type() == new.data_type() {
                    Ok(old)
                } else {
                    Ok(arrow::compute::cast(&old, new.data_type())?)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let rows = comparable.convert(&keys)?;
        let hashes = arrow::compute::cast(&column(ROW_HASH_COLUMN)?, &DataType::UInt64)?
            .as_primitive::<UInt64Type>()
            .clone();
        let layers = match all.column_by_name(LAYER_COLUMN) {
            Some(layers) => Some(
                arrow::compute::cast(layers, &DataType::UInt32)?
                    .as_primitive::<UInt32Type>()
                    .clone(),
            ),
            None => None,
        };
        // Hashed as the probe's fingerprints were, from the index's own columns.
        let (claimed, taken) = match claims {
            Some(claims) => {
                let key_hashes = key_hashes(&all, &self.key_columns)?;
                let claimed = claims.claimed_all(&key_hashes, hashes.values());
                drop(key_hashes);
                let key_checks = key_check_hashes(&all, &self.key_columns)?;
                let mut taken = ClaimCheck::default();
                for ((claimed, key_check), hash) in claimed.iter().zip(&key_checks).zip(hashes.values()) {
                    if *claimed {
                        taken.add(ClaimCheck {
                            rows: 1,
                            check: check_term(*key_check, *hash),
                        });
                    }
                }
                (claimed, taken)
            }
            None => (Vec::new(), ClaimCheck::default()),
        };
        Ok(ParentIndex {
            keys,
            rows,
            hashes,
            layers,
            claimed,
            taken,
        })
    }
    /// Writes `batches` as one Parquet file at `relative`.
    async fn write_batches(
        &self,
        relative: &str,
        schema: &SchemaRef,
        props: &WriterProperties,
        batches: impl IntoIterator<Item = RecordBatch>,
    ) -> Result<SnapshotFile> {
        let parquet_err = |source| SnapshotError::Parquet {
            model: self.model.clone(),
            source,
        };
        let sink = BufWriter::new(self.store.object_store(), self.store.path(relative));
        let mut writer =
            AsyncArrowWriter::try_new(sink, schema.clone(), Some(props.clone())).map_err(parquet_err)?;
        let mut rows = 0u64;
        for batch in batches {
            rows += batch.num_rows() as u64;
            writer.write(&batch).await.map_err(parquet_err)?;
        }
        writer.finish().await.map_err(parquet_err)?;
        Ok(SnapshotFile {
            path: relative.to_string(),
            bucket: self.bucket,
            rows,
            bytes: writer.bytes_written() as u64,
        })
    }
}

/// A parent's index of one bucket, in key order.
struct ParentIndex {
    /// Key columns in the new snapshot's types.
    keys: Vec<ArrayRef>,
    rows: KeyRows,
    hashes: arrow::array::UInt64Array,
    layers: Option<arrow::array::UInt32Array>,
    /// Which rows the probe claimed (found unchanged); empty when it did not probe.
    claimed: Vec<bool>,
    /// The rows claimed and their check terms.
    taken: ClaimCheck,
}

impl ParentIndex {
    /// The index of a bucket the parent had no rows in, for keys like `new_keys`.
    fn empty(new_keys: &[ArrayRef], comparable: &ComparableKeys) -> Result<Self> {
        let keys: Vec<ArrayRef> = new_keys
            .iter()
            .map(|k| arrow::array::new_empty_array(k.data_type()))
            .collect();
        Ok(Self {
            rows: comparable.convert(&keys)?,
            keys,
            hashes: UInt64Array::from(Vec::<u64>::new()),
            layers: None,
            claimed: Vec::new(),
            taken: ClaimCheck::default(),
        })
    }

    fn claimed(&self, row: usize) -> bool {
        self.claimed.get(row).copied().unwrap_or(false)
    }

    /// The layer holding this row's values.
    fn layer(&self, row: usize) -> u32 {
        self.layers.as_ref().map_or(0, |l| l.value(row))
    }
}

/// A single integer key, widened to `i64` (order-preserving): sorted and compared as plain
/// integers, where the row format would encode every key and compare bytes.
struct IntegerKeys(Vec<i64>);

impl IntegerKeys {
    /// The keys' values when `keys` is one integer column that fits `i64`.
    fn of(keys: &[ArrayRef]) -> Result<Option<Self>> {
        let [key] = keys else {
            return Ok(None);
        };
        let fits = matches!(
            key.data_type(),
            DataType::Int8
                | DataType::Int16
                | DataType::Int32
                | DataType::Int64
                | DataType::UInt8
                | DataType::UInt16
                | DataType::UInt32
        );
        if !fits {
            return Ok(None);
        }
        let widened = arrow::compute::cast(key, &DataType::Int64)?;
        Ok(Some(Self(widened.as_primitive::<Int64Type>().values().to_vec())))
    }

    /// The order that sorts the keys, and the keys in that order. A stable sort of (key,
    /// position): extractions often come in or near key order (a table's insertion order, a
    /// file written sorted), and its run detection merges such runs instead of sorting them
    /// again.
    fn into_sorted(self) -> (UInt32Array, Vec<i64>) {
        let mut pairs: Vec<(i64, u32)> = self
            .0
            .into_iter()
            .enumerate()
            .map(|(i, k)| (k, i as u32))
            .collect();
        pairs.sort_by_key(|(key, _)| *key);
        let order = UInt32Array::from_iter_values(pairs.iter().map(|(_, i)| *i));
        (order, pairs.into_iter().map(|(key, _)| key).collect())
    }
}

/// How a bucket's keys are compared: as integers (see [`IntegerKeys`]) or in arrow's row
/// format, which orders any key columns as a byte string.
enum ComparableKeys {
    Integers,
    Rows(RowConverter),
}

impl ComparableKeys {
    fn rows(keys: &[ArrayRef]) -> Result<Self> {
        let fields = keys
            .iter()
            .map(|a| SortField::new(a.data_type().clone()))
            .collect();
        Ok(Self::Rows(RowConverter::new(fields)?))
    }

    /// `keys`, in the new snapshot's key types, in comparable form.
    fn convert(&self, keys: &[ArrayRef]) -> Result<KeyRows> {
        Ok(match self {
            Self::Integers => match IntegerKeys::of(keys)? {
                Some(IntegerKeys(values)) => KeyRows::Integers(values),
                None => {
                    return Err(SnapshotError::Task(
                        "an integer key read back as another type".into(),
                    ));
                }
            },
            Self::Rows(converter) => KeyRows::Rows(converter.convert_columns(keys)?),
        })
    }
}

/// Keys in key order, comparable across the new snapshot and its parent.
enum KeyRows {
    Integers(Vec<i64>),
    Rows(arrow::row::Rows),
}

impl KeyRows {
    fn len(&self) -> usize {
        match self {
            Self::Integers(values) => values.len(),
            Self::Rows(rows) => rows.num_rows(),
        }
    }

    /// This key at `i` against `other`'s at `j` (both made by the same [`ComparableKeys`]).
    #[inline]
    fn cmp(&self, i: usize, other: &KeyRows, j: usize) -> std::cmp::Ordering {
        match (self, other) {
            (Self::Integers(a), Self::Integers(b)) => a[i].cmp(&b[j]),
            (Self::Rows(a), Self::Rows(b)) => a.row(i).cmp(&b.row(j)),
            // Never made by one `ComparableKeys`; ordered so a mix-up cannot match.
            (Self::Integers(_), Self::Rows(_)) => std::cmp::Ordering::Less,
            (Self::Rows(_), Self::Integers(_)) => std::cmp::Ordering::Greater,
        }
    }
}

/// The order that sorts rows by `keys` (ascending, nulls last: keys are never null).
fn sort_order(keys: &[ArrayRef]) -> Result<UInt32Array> {
    Ok(if keys.len() == 1 {
        arrow::compute::sort_to_indices(&keys[0], None, None)?
    } else {
        let columns: Vec<arrow::compute::SortColumn> = keys
            .iter()
            .map(|k| arrow::compute::SortColumn {
                values: k.clone(),
                options: None,
            })
            .collect();
        arrow::compute::lexsort_to_indices(&columns, None)?
    })
}

/// Runs of equal keys in a key-sorted sequence, by position.
#[derive(Default)]
struct DuplicateRuns {
    /// (first position, length) of the current run.
    current: Option<(usize, u64)>,
    /// Runs longer than one: (first position, length).
    found: Vec<(usize, u64)>,
    keys: u64,
}

impl DuplicateRuns {
    fn start(&mut self, at: usize) {
        self.close();
        self.current = Some((at, 1));
    }

    fn repeat(&mut self, _at: usize) {
        if let Some((_, count)) = &mut self.current {
            *count += 1;
        }
    }

    fn close(&mut self) {
        if let Some((at, count)) = self.current.take()
            && count > 1
        {
            self.keys += 1;
            if self.found.len() < 5 {
                self.found.push((at, count));
            }
        }
    }

    fn finish(mut self, keys: &[ArrayRef], names: &[String]) -> Result<Duplicates> {
        self.close();
        let mut examples = Vec::new();
        for (at, count) in self.found {
            examples.push(format!("{} (×{count})", describe_key(keys, names, at)?));
        }
        Ok(Duplicates {
            keys: self.keys,
            examples,
        })
    }
}

/// The key columns' fields of the stored schema, in key order.
fn key_fields(stored: &Schema, key_columns: &[String]) -> Result<Vec<Arc<Field>>> {
    key_columns
        .iter()
        .map(|key| {
            stored
                .field_with_name(key)
                .map(|field| Arc::new(field.clone()))
                .map_err(|_| SnapshotError::MissingKeyColumn { column: key.clone() })
        })
        .collect()
}

/// The schema of a delta's index files: the key columns, the row hash and the layer.
fn index_schema(stored: &Schema, key_columns: &[String]) -> Result<SchemaRef> {
    let mut fields = key_fields(stored, key_columns)?;
    fields.push(Arc::new(Field::new(ROW_HASH_COLUMN, DataType::UInt64, false)));
    fields.push(Arc::new(Field::new(LAYER_COLUMN, DataType::UInt32, false)));
    Ok(Arc::new(Schema::new(fields)))
}

/// The schema of a delta's changes files: the key columns, the change (1 added, 2 updated,
/// 3 deleted), the new row hash (null when deleted), the parent's (null when added) and the
/// layer holding the row (the new one, or the parent's last for a deleted key).
fn changes_schema(stored: &Schema, key_columns: &[String]) -> Result<SchemaRef> {
    let mut fields = key_fields(stored, key_columns)?;
    fields.push(Arc::new(Field::new(CHANGE_OP_COLUMN, DataType::UInt8, false)));
    fields.push(Arc::new(Field::new(ROW_HASH_COLUMN, DataType::UInt64, true)));
    fields.push(Arc::new(Field::new(BASE_HASH_COLUMN, DataType::UInt64, true)));
    fields.push(Arc::new(Field::new(LAYER_COLUMN, DataType::UInt32, false)));
    Ok(Arc::new(Schema::new(fields)))
}

/// A delta's index files are written like own rows (the key columns' encodings, statistics and
/// bloom filters, the plain row hash). The layer column is a handful of values in long runs:
/// delta-encoded, a run packs to zero bits a value. A dictionary folded it as small, but
/// interning 10M values was a fifth of writing a 10M-row index (BENCHMARKS.md).
fn index_properties(spec: &SnapshotSpec, id: &str, schema: &Schema) -> WriterProperties {
    let layer = ColumnPath::from(LAYER_COLUMN);
    writer_properties(spec, id, schema)
        .into_builder()
        .set_column_dictionary_enabled(layer.clone(), false)
        .set_column_encoding(layer, Encoding::DELTA_BINARY_PACKED)
        .build()
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
    // fixed-width keys stay plain and uncompressed (decoding is a copy). Delta-encoding integer
    // keys stored a third less but made point lookups in the history slower (BENCHMARKS.md).
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
    /// The last key seen, as comparable row bytes (a buffer reused from key to key).
    last: Vec<u8>,
    /// How many times in a row the last key was seen (0 before the first), and its
    /// description once it is seen twice (only duplicates are described: formatting every
    /// key cost a first sync of 10M rows several percent of its time).
    run: u64,
    description: Option<String>,
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
            last: Vec::new(),
            run: 0,
            description: None,
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
            if self.run > 0 && self.last.as_slice() == row.as_ref() {
                self.run += 1;
                if self.description.is_none() && self.found.examples.len() < 5 {
                    self.description = Some(describe_key(&columns, &self.key_names, i)?);
                }
            } else {
                self.close_run();
                self.last.clear();
                self.last.extend_from_slice(row.as_ref());
                self.run = 1;
            }
        }
        Ok(())
    }

    fn close_run(&mut self) {
        if self.run > 1 {
            self.found.keys += 1;
            if let Some(description) = self.description.take()
                && self.found.examples.len() < 5
            {
                self.found.examples.push(format!("{description} (×{})", self.run));
            }
        }
        self.run = 0;
        self.description = None;
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

    proptest::proptest! {
        /// The integer fast path sorts and compares keys exactly as the row format does.
        #[test]
        fn integer_keys_order_as_the_row_format(
            new in proptest::collection::vec(-50i32..50, 0..300),
            parent in proptest::collection::vec(-50i32..50, 0..300),
        ) {
            let column = |values: &[i32]| -> ArrayRef { Arc::new(arrow::array::Int32Array::from(values.to_vec())) };
            let (new, parent) = (column(&new), column(&parent));
            let integers = IntegerKeys::of(std::slice::from_ref(&new)).unwrap().unwrap();
            let (order, sorted_integers) = integers.into_sorted();
            let by_rows = sort_order(std::slice::from_ref(&new)).unwrap();
            let sorted = arrow::compute::take(&new, &order, None).unwrap();
            proptest::prop_assert_eq!(&sorted, &arrow::compute::take(&new, &by_rows, None).unwrap());
            // Stable: equal keys keep their extraction order.
            let values = sorted.as_primitive::<arrow::datatypes::Int32Type>();
            let stable = order
                .values()
                .windows(2)
                .enumerate()
                .all(|(at, w)| values.value(at) != values.value(at + 1) || w[0] < w[1]);
            proptest::prop_assert!(stable, "equal keys out of extraction order");
            let sorted_parent = arrow::compute::take(&parent, &sort_order(std::slice::from_ref(&parent)).unwrap(), None).unwrap();
            let as_integers = (
                KeyRows::Integers(sorted_integers),
                ComparableKeys::Integers.convert(std::slice::from_ref(&sorted_parent)).unwrap(),
            );
            let converter = ComparableKeys::rows(std::slice::from_ref(&sorted)).unwrap();
            let as_rows = (
                converter.convert(std::slice::from_ref(&sorted)).unwrap(),
                converter.convert(std::slice::from_ref(&sorted_parent)).unwrap(),
            );
            for i in 0..sorted.len() {
                for j in 0..sorted_parent.len() {
                    proptest::prop_assert_eq!(
                        as_integers.1.cmp(j, &as_integers.0, i),
                        as_rows.1.cmp(j, &as_rows.0, i)
                    );
                }
                if i > 0 {
                    proptest::prop_assert_eq!(as_integers.0.cmp(i - 1, &as_integers.0, i), as_rows.0.cmp(i - 1, &as_rows.0, i));
                }
            }
        }
    }

    #[test]
    fn composite_and_wide_keys_use_the_row_format() {
        let wide: ArrayRef = Arc::new(arrow::array::UInt64Array::from(vec![u64::MAX, 1]));
        let text: ArrayRef = Arc::new(StringArray::from(vec!["b", "a"]));
        let small: ArrayRef = Arc::new(arrow::array::Int16Array::from(vec![3, -1]));
        assert!(IntegerKeys::of(&[wide]).unwrap().is_none());
        assert!(IntegerKeys::of(&[text]).unwrap().is_none());
        assert!(
            IntegerKeys::of(&[small.clone(), small.clone()])
                .unwrap()
                .is_none()
        );
        assert_eq!(IntegerKeys::of(&[small]).unwrap().unwrap().0, vec![3, -1]);
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
        assert_eq!(rows_in_key_order_in_their_buckets(&store, &manifest).await, 5000);
    }

    /// Checks each bucket file holds only its bucket's keys, in key order, each with its own
    /// name (`user <id>`, maybe padded); counts its rows.
    async fn rows_in_key_order_in_their_buckets(store: &SnapshotStore, manifest: &SnapshotManifest) -> u64 {
        let mut seen = 0;
        for file in &manifest.files {
            let batches = file_batches(store, file).await;
            let mut previous = i64::MIN;
            for batch in batches {
                let keys = key_hashes(&batch, &["id".to_string()]).unwrap();
                assert!(
                    keys.iter()
                        .all(|k| bucket_of(*k, manifest.buckets) == file.bucket)
                );
                let names = arrow::compute::cast(batch.column(1), &DataType::Utf8).unwrap();
                let names = names.as_string::<i32>();
                for (row, id) in batch
                    .column(0)
                    .as_primitive::<Int64Type>()
                    .values()
                    .iter()
                    .enumerate()
                {
                    assert!(*id > previous, "sorted by key");
                    let name = names.value(row);
                    let own = format!("user {id}");
                    assert!(
                        name == own || name.starts_with(&format!("{own} ")),
                        "row {id} came with {name}"
                    );
                    previous = *id;
                    seen += 1;
                }
            }
        }
        seen
    }

    #[tokio::test]
    async fn buckets_sorted_at_once_each_spill_and_merge_within_their_share_of_memory() {
        // Two spilling sorts at once, each far over its share of an 8 MiB budget: each spills
        // and merges its spill files (with one pool shared, one sort could starve the other's
        // merge).
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir);
        let mut w = SnapshotWriter::new(store.clone(), spec(Some(4)))
            .with_in_memory_sort_bytes(0)
            .with_sort_memory_bytes(8 * 1024 * 1024);
        let padding = "x".repeat(100);
        let rows = 200_000i64;
        for chunk in (0..rows).rev().collect::<Vec<_>>().chunks(8192) {
            let names: Vec<String> = chunk.iter().map(|i| format!("user {i} {padding}")).collect();
            let batch = RecordBatch::try_from_iter(vec![
                ("id", Arc::new(Int64Array::from(chunk.to_vec())) as ArrayRef),
                ("name", Arc::new(StringArray::from(names)) as ArrayRef),
            ])
            .unwrap();
            w.write(batch).await.unwrap();
        }
        let manifest = w.commit().await.unwrap();
        assert_eq!(manifest.files.len(), 4);
        assert_eq!(
            rows_in_key_order_in_their_buckets(&store, &manifest).await,
            rows as u64
        );
    }

    #[test]
    fn buckets_are_added_until_each_fits_the_in_memory_sort() {
        let mib = 1024 * 1024;
        assert_eq!(buckets_to_sort_in_memory(0, 96 * mib), 1);
        assert_eq!(buckets_to_sort_in_memory(96 * mib, 96 * mib), 1);
        assert_eq!(buckets_to_sort_in_memory(96 * mib + 1, 96 * mib), 2);
        // 30M rows of the benchmark's table: 32 buckets by rows, 64 by bytes.
        assert_eq!(buckets_to_sort_in_memory(3_840 * mib, 96 * mib), 64);
        assert_eq!(buckets_to_sort_in_memory(u64::MAX / 2, 96 * mib), PARTITIONS);
        assert_eq!(buckets_to_sort_in_memory(mib, u64::MAX), 1);
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

    /// Every row of a snapshot as (id, row hash), read back through DataFusion.
    async fn read_back(store: &SnapshotStore, manifest: &SnapshotManifest) -> Vec<(i64, u64)> {
        let ctx = SessionContext::new();
        let batches = crate::read_snapshot(&ctx, store, manifest)
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let mut rows: Vec<(i64, u64)> = batches
            .iter()
            .flat_map(|b| {
                let ids = b
                    .column_by_name("id")
                    .unwrap()
                    .as_primitive::<Int64Type>()
                    .clone();
                let hashes = b
                    .column_by_name(ROW_HASH_COLUMN)
                    .unwrap()
                    .as_primitive::<arrow::datatypes::UInt64Type>()
                    .clone();
                ids.values()
                    .iter()
                    .copied()
                    .zip(hashes.values().iter().copied())
                    .collect::<Vec<_>>()
            })
            .collect();
        rows.sort_unstable();
        rows
    }

    #[tokio::test]
    async fn write_returns_the_row_hashes_the_snapshot_stores() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir);
        let mut w = SnapshotWriter::new(store.clone(), spec(None));
        assert!(w.write(users(&[])).await.unwrap().is_empty());
        let mut returned = Vec::new();
        for ids in [&[3i64, 1, 2][..], &[7, 5]] {
            let hashes = w.write(users(ids)).await.unwrap();
            returned.extend(ids.iter().copied().zip(hashes.values().iter().copied()));
        }
        let manifest = w.commit().await.unwrap();
        returned.sort_unstable();
        assert_eq!(returned, read_back(&store, &manifest).await);
    }

    /// (id, row hash) of every row of `batch`, sorted.
    fn expected(batch: &RecordBatch) -> Vec<(i64, u64)> {
        let hashes = row_hashes(batch, &["id".to_string()]).unwrap();
        let ids = batch.column(0).as_primitive::<Int64Type>();
        let mut rows: Vec<(i64, u64)> = ids.values().iter().copied().zip(hashes).collect();
        rows.sort_unstable();
        rows
    }

    fn named(ids: &[i64], version: &dyn Fn(i64) -> String) -> RecordBatch {
        RecordBatch::try_from_iter(vec![
            ("id", Arc::new(Int64Array::from(ids.to_vec())) as ArrayRef),
            (
                "name",
                Arc::new(StringArray::from_iter_values(ids.iter().map(|i| version(*i)))) as ArrayRef,
            ),
        ])
        .unwrap()
    }

    async fn write_version(
        store: &SnapshotStore,
        batch: RecordBatch,
        parent: Option<&SnapshotManifest>,
    ) -> SnapshotManifest {
        let mut w = SnapshotWriter::new(store.clone(), spec(Some(4)));
        if let Some(parent) = parent {
            w = w.with_parent(parent.clone());
        }
        let half = batch.num_rows() / 2;
        w.write(batch.slice(0, half)).await.unwrap();
        w.write(batch.slice(half, batch.num_rows() - half)).await.unwrap();
        w.commit().await.unwrap()
    }

    /// A base of `ids` named `user <id>`.
    async fn users_base(store: &SnapshotStore, ids: &[i64]) -> SnapshotManifest {
        write_version(store, named(ids, &|i| format!("user {i}")), None).await
    }

    #[tokio::test]
    async fn a_delta_stores_the_changed_rows_and_reads_back_every_row() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir);
        let v1 = named(&(0..3000).rev().collect::<Vec<_>>(), &|i| format!("user {i}"));
        let base = write_version(&store, v1.clone(), None).await;
        assert!(base.is_base() && base.parent.is_none());
        // 100 updated, 30 deleted (ids 3..3000 step 100), 49 added.
        let ids: Vec<i64> = (0..3050).filter(|i| i % 100 != 3).collect();
        let v2 = named(&ids, &|i| {
            if i % 30 == 0 {
                format!("renamed {i}")
            } else {
                format!("user {i}")
            }
        });
        let delta = write_version(&store, v2.clone(), Some(&base)).await;
        assert_eq!(delta.parent.as_deref(), Some(base.id.as_str()));
        assert_eq!(delta.layers.len(), 1);
        assert_eq!(delta.layers[0].snapshot, base.id);
        assert_eq!(delta.rows, v2.num_rows() as u64);
        let own: u64 = delta.files.iter().map(|f| f.rows).sum();
        // (Added: 3000..3050 but 3003, which the filter leaves out.)
        assert_eq!(own, 100 + 49, "only updated and added rows are stored again");
        assert_eq!(delta.index.iter().map(|f| f.rows).sum::<u64>(), delta.rows);
        assert_eq!(read_back(&store, &delta).await, expected(&v2));
        assert_eq!(read_back(&store, &base).await, expected(&v1));
        // A delta of the delta points into both layers.
        let v3 = named(&ids, &|i| {
            if i % 7 == 0 {
                format!("third {i}")
            } else if i % 30 == 0 {
                format!("renamed {i}")
            } else {
                format!("user {i}")
            }
        });
        let third = write_version(&store, v3.clone(), Some(&delta)).await;
        assert_eq!(third.layers.len(), 2);
        assert_eq!(read_back(&store, &third).await, expected(&v3));
        // An unchanged extraction stores no rows at all.
        let same = write_version(&store, v3.clone(), Some(&third)).await;
        assert!(same.files.is_empty());
        assert_eq!(read_back(&store, &same).await, expected(&v3));
    }

    /// Every row of one of a snapshot's files.
    async fn file_batches(store: &SnapshotStore, file: &SnapshotFile) -> Vec<RecordBatch> {
        SessionContext::new()
            .read_parquet(store.url(&file.path).to_string(), ParquetReadOptions::default())
            .await
            .unwrap()
            .collect()
            .await
            .unwrap()
    }

    /// Each key's change op in `manifest`'s changes files.
    async fn changes_of(store: &SnapshotStore, manifest: &SnapshotManifest) -> Vec<(i64, u8)> {
        let mut ops = Vec::new();
        for file in &manifest.changes {
            for batch in file_batches(store, file).await {
                let ids = batch.column_by_name("id").unwrap().as_primitive::<Int64Type>();
                let op = batch.column_by_name(CHANGE_OP_COLUMN).unwrap();
                let op = op.as_primitive::<arrow::datatypes::UInt8Type>();
                ops.extend(ids.values().iter().copied().zip(op.values().iter().copied()));
            }
        }
        ops.sort_unstable();
        ops
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        /// Chains of deltas, each extraction in any order and cut into batches probed where they
        /// are read or by the writer, against a reference: every row reads back, and the
        /// changes are exactly the keys added, updated and deleted.
        #[test]
        fn deltas_store_exactly_what_changed(
            versions in proptest::collection::vec(
                proptest::collection::vec((0i64..300, 0u8..16), 0..400),
                2..4,
            ),
            cuts in proptest::collection::vec(1usize..120, 1..6),
            probed_where_read in proptest::collection::vec(proptest::bool::ANY, 6),
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let store = store(&dir);
                let key = ["id".to_string()];
                let mut parent: Option<(SnapshotManifest, std::collections::BTreeMap<i64, u8>)> = None;
                for version in &versions {
                    // Distinct keys, in the order drawn: a key's version picks its value (one in
                    // sixteen the second of two, so most rows stay and deltas chain).
                    let mut rows = std::collections::BTreeMap::new();
                    let mut ids = Vec::new();
                    for (id, v) in version {
                        if rows.insert(*id, *v / 15).is_none() {
                            ids.push(*id);
                        }
                    }
                    let batch = named(&ids, &|i| format!("user {i} v{}", rows[&i]));
                    let mut w = SnapshotWriter::new(store.clone(), spec(Some(4)));
                    if let Some((manifest, _)) = &parent {
                        w = w.with_parent(manifest.clone());
                    }
                    w.write(RecordBatch::new_empty(batch.schema())).await.unwrap();
                    let probe = w.probe();
                    let (mut at, mut cut) = (0, 0);
                    while at < batch.num_rows() {
                        let len = cuts[cut % cuts.len()].min(batch.num_rows() - at);
                        let part = batch.slice(at, len);
                        let mut hashes = BatchHashes::of(&part, &key).unwrap();
                        if let Some(probe) = &probe && probed_where_read[cut % probed_where_read.len()] {
                            hashes.probe(&part, probe).unwrap();
                        }
                        w.write_hashed(part, Some(hashes)).await.unwrap();
                        at += len;
                        cut += 1;
                    }
                    let manifest = w.commit().await.unwrap();
                    proptest::prop_assert_eq!(read_back(&store, &manifest).await, expected(&batch));
                    if let Some((previous, before)) = &parent && !manifest.is_base() {
                        proptest::prop_assert_eq!(manifest.parent.as_deref(), Some(previous.id.as_str()));
                        let mut reference = Vec::new();
                        for (id, v) in &rows {
                            match before.get(id) {
                                None => reference.push((*id, OP_ADDED)),
                                Some(old) if old != v => reference.push((*id, OP_UPDATED)),
                                Some(_) => {}
                            }
                        }
                        reference.extend(before.keys().filter(|id| !rows.contains_key(id)).map(|id| (*id, OP_DELETED)));
                        reference.sort_unstable();
                        proptest::prop_assert_eq!(changes_of(&store, &manifest).await, reference);
                    }
                    parent = Some((manifest, rows));
                }
                Ok(())
            })?;
        }
    }

    #[tokio::test]
    async fn a_delta_of_a_key_listed_out_of_column_order_finds_exactly_what_changed() {
        // Key (region, id) where the columns run id, region: the parent's index is read by
        // column name, not by the projection's position.
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir);
        let spec = SnapshotSpec {
            key_columns: vec!["region".into(), "id".into()],
            ..spec(Some(2))
        };
        let version = |ids: &[i64], name: &dyn Fn(i64) -> String| {
            RecordBatch::try_from_iter(vec![
                ("id", Arc::new(Int64Array::from(ids.to_vec())) as ArrayRef),
                (
                    "region",
                    Arc::new(StringArray::from_iter_values(
                        ids.iter().map(|i| format!("r{}", i % 3)),
                    )) as ArrayRef,
                ),
                (
                    "name",
                    Arc::new(StringArray::from_iter_values(ids.iter().map(|i| name(*i)))) as ArrayRef,
                ),
            ])
            .unwrap()
        };
        let ids: Vec<i64> = (0..1000).collect();
        let mut w = SnapshotWriter::new(store.clone(), spec.clone());
        w.write(version(&ids, &|i| format!("user {i}"))).await.unwrap();
        let base = w.commit().await.unwrap();
        // 10 renamed, 10 deleted, 5 added.
        let next: Vec<i64> = (0..1005).filter(|i| i % 100 != 7).collect();
        let mut w = SnapshotWriter::new(store.clone(), spec).with_parent(base.clone());
        w.write(version(&next, &|i| {
            if i % 100 == 3 {
                format!("renamed {i}")
            } else {
                format!("user {i}")
            }
        }))
        .await
        .unwrap();
        let delta = w.commit().await.unwrap();
        assert_eq!(delta.parent.as_deref(), Some(base.id.as_str()));
        let mut ops = std::collections::BTreeMap::new();
        for (_, op) in changes_of(&store, &delta).await {
            *ops.entry(op).or_insert(0) += 1;
        }
        let expected = [(OP_ADDED, 5), (OP_UPDATED, 10), (OP_DELETED, 10)];
        assert_eq!(ops, expected.into_iter().collect());
    }

    #[tokio::test]
    async fn a_deltas_index_packs_its_layers_without_a_dictionary() {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir);
        let ids: Vec<i64> = (0..5000).collect();
        let base = users_base(&store, &ids).await;
        let delta = write_version(
            &store,
            named(&ids, &|i| {
                if i % 100 == 0 {
                    "renamed".into()
                } else {
                    format!("user {i}")
                }
            }),
            Some(&base),
        )
        .await;
        assert!(!delta.index.is_empty());
        for file in &delta.index {
            let path = store.url(&file.path).to_file_path().unwrap();
            let reader = SerializedFileReader::new(File::open(path).unwrap()).unwrap();
            for group in reader.metadata().row_groups() {
                let layer = group
                    .columns()
                    .iter()
                    .find(|c| c.column_path().string() == LAYER_COLUMN)
                    .unwrap();
                let encodings: Vec<Encoding> = layer.encodings().collect();
                assert!(layer.dictionary_page_offset().is_none(), "{encodings:?}");
                assert!(
                    encodings.contains(&Encoding::DELTA_BINARY_PACKED),
                    "{encodings:?}"
                );
            }
        }
        assert_eq!(read_back(&store, &delta).await.len(), 5000);
    }

    #[tokio::test]
    async fn while_probing_the_parent_only_new_and_changed_rows_are_spilled_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir);
        let ids: Vec<i64> = (0..2000).collect();
        let base = users_base(&store, &ids).await;
        // 40 renamed (i % 50 == 0), 20 deleted (i % 100 == 1), 9 added (2000..2010 but 2001).
        let next_ids: Vec<i64> = (0..2010).filter(|i| i % 100 != 1).collect();
        let v2 = named(&next_ids, &|i| {
            if i % 50 == 0 {
                format!("renamed {i}")
            } else {
                format!("user {i}")
            }
        });
        let mut w = SnapshotWriter::new(store.clone(), spec(Some(4))).with_parent(base.clone());
        w.write(v2.slice(0, 1000)).await.unwrap();
        w.write(v2.slice(1000, v2.num_rows() - 1000)).await.unwrap();
        assert!(w.probe.is_some(), "a delta-to-be probes its parent");
        let spill = w.spill.as_ref().unwrap();
        let spilled: u64 = spill.partitions.iter().map(|p| p.pushed).sum();
        assert_eq!(
            spilled,
            40 + 9,
            "only renamed and added rows are spilled, nothing of the others"
        );
        let delta = w.commit().await.unwrap();
        assert!(!delta.is_base());
        assert_eq!(delta.files.iter().map(|f| f.rows).sum::<u64>(), 40 + 9);
        assert_eq!(read_back(&store, &delta).await, expected(&v2));
        // Deleted rows are recorded as changes too.
        let changes: u64 = delta.changes.iter().map(|f| f.rows).sum();
        assert_eq!(changes, 40 + 20 + 9);
    }

    #[tokio::test]
    async fn rows_probed_where_they_are_read_are_spilled_by_that_outcome_unless_another_writer_probed_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir);
        let key = ["id".to_string()];
        let ids: Vec<i64> = (0..2000).collect();
        let base = users_base(&store, &ids).await;
        // 40 renamed (i % 50 == 0), 20 of them in each half.
        let v2 = named(&ids, &|i| {
            if i % 50 == 0 {
                format!("renamed {i}")
            } else {
                format!("user {i}")
            }
        });
        let (first, second) = (v2.slice(0, 1000), v2.slice(1000, 1000));
        let mut w = SnapshotWriter::new(store.clone(), spec(Some(4))).with_parent(base.clone());
        assert!(w.probe().is_none(), "no probe before the writer starts");
        w.write(RecordBatch::new_empty(v2.schema())).await.unwrap();
        let probe = w.probe().expect("a delta-to-be probes its parent");

        // Another probe's outcome (one holding every row, as a collision would) is not taken:
        // the writer probes those rows again with its own.
        let everything = key_hashes(&v2, &key)
            .unwrap()
            .iter()
            .zip(row_hashes(&v2, &key).unwrap())
            .map(|(k, r)| Fingerprints::of(7, *k, r))
            .collect();
        let foreign = test_probe(Fingerprints::new(7, everything));
        let mut hashes = BatchHashes::of(&first, &key).unwrap();
        hashes.probe(&first, &foreign).unwrap();
        assert!(hashes.kept.as_ref().unwrap().kept.iter().all(|kept| !kept));
        w.write_hashed(first, Some(hashes)).await.unwrap();
        let whole = |w: &SnapshotWriter| -> u64 {
            w.spill
                .as_ref()
                .unwrap()
                .partitions
                .iter()
                .map(|p| p.pushed)
                .sum()
        };
        assert_eq!(
            whole(&w),
            20,
            "the renamed rows of the first half, by the writer's own probe"
        );

        // Its own probe's outcome is taken as it is. Probed again, the rows would find their
        // parent rows claimed already and all be spilled.
        let mut hashes = BatchHashes::of(&second, &key).unwrap();
        hashes.probe(&second, &probe).unwrap();
        assert_eq!(hashes.kept().unwrap().iter().filter(|kept| **kept).count(), 20);
        w.write_hashed(second, Some(hashes)).await.unwrap();
        assert_eq!(whole(&w), 20 + 20);

        // The merge at commit stays exact: only the renamed rows are stored again.
        let delta = w.commit().await.unwrap();
        assert_eq!(delta.files.iter().map(|f| f.rows).sum::<u64>(), 40);
        assert_eq!(read_back(&store, &delta).await, expected(&v2));
    }

    fn test_probe(fingerprints: Fingerprints) -> Probe {
        Probe {
            fingerprints: Arc::new(fingerprints),
            key_columns: vec!["id".to_string()].into(),
        }
    }

    #[tokio::test]
    async fn a_row_the_probe_takes_for_another_fails_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir);
        let base = write_version(&store, users(&[1, 2, 3]), None).await;
        let key = ["id".to_string()];
        let fingerprints = |batch: &RecordBatch, seed: u64| -> Vec<u64> {
            key_hashes(batch, &key)
                .unwrap()
                .iter()
                .zip(row_hashes(batch, &key).unwrap())
                .map(|(k, r)| Fingerprints::of(seed, *k, r))
                .collect()
        };
        let renamed = |i: i64| {
            if i == 2 {
                "renamed".into()
            } else {
                format!("user {i}")
            }
        };
        let cases = [
            // Row 2 changed, and its new fingerprint is what the parent held for it.
            (named(&[1, 2, 3], &renamed), named(&[1, 2, 3], &renamed)),
            // Row 2 deleted and row 4 added, whose fingerprint is the one row 2 had.
            (
                named(&[1, 3, 4], &|i| format!("user {i}")),
                named(&[1, 3, 4], &|i| format!("user {i}")),
            ),
        ];
        for (extracted, held) in cases {
            let mut w = SnapshotWriter::new(store.clone(), spec(Some(4))).with_parent(base.clone());
            w.write(RecordBatch::new_empty(extracted.schema())).await.unwrap();
            // A probe that (as a fingerprint collision would) holds the new row in the place
            // of one the parent had.
            w.probe = Some(test_probe(Fingerprints::new(7, fingerprints(&held, 7))));
            w.write(extracted).await.unwrap();
            let err = w.commit().await.unwrap_err();
            assert!(matches!(err, SnapshotError::FingerprintCollision { .. }), "{err}");
            assert!(err.to_string().contains("run it again"), "{err}");
            assert_eq!(store.list_snapshots("users").await.unwrap(), vec![base.clone()]);
        }
    }

    #[tokio::test]
    async fn a_base_is_written_when_columns_change_or_the_chain_is_long() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir);
        let ids: Vec<i64> = (0..500).collect();
        let mut parent = write_version(&store, named(&ids, &|i| format!("v0 {i}")), None).await;
        for version in 1..MAX_LAYERS + 1 {
            // One row in fifty changes each time: deltas until the chain is full.
            let batch = named(&ids, &|i| {
                if i % 50 == 0 {
                    format!("v{version} {i}")
                } else {
                    format!("v0 {i}")
                }
            });
            let next = write_version(&store, batch.clone(), Some(&parent)).await;
            assert_eq!(
                next.is_base(),
                version == MAX_LAYERS,
                "version {version}: {} layers",
                next.layers.len()
            );
            assert_eq!(read_back(&store, &next).await, expected(&batch));
            parent = next;
        }
        // Another column: a base.
        let wider = RecordBatch::try_from_iter(vec![
            ("id", Arc::new(Int64Array::from(ids.clone())) as ArrayRef),
            (
                "name",
                Arc::new(StringArray::from_iter_values(
                    ids.iter().map(|i| format!("v0 {i}")),
                )) as ArrayRef,
            ),
            (
                "plan",
                Arc::new(StringArray::from_iter_values(ids.iter().map(|_| "pro"))) as ArrayRef,
            ),
        ])
        .unwrap();
        let rebased = write_version(&store, wider, Some(&parent)).await;
        assert!(rebased.is_base());
        // Most rows changed: stored as a delta, then the next one folds the deltas into a base.
        let mostly = named(&ids, &|i| {
            if i % 4 == 0 {
                format!("v0 {i}")
            } else {
                format!("new {i}")
            }
        });
        let narrow = write_version(&store, named(&ids, &|i| format!("v0 {i}")), None).await;
        let big_delta = write_version(&store, mostly.clone(), Some(&narrow)).await;
        assert!(!big_delta.is_base());
        let folded = write_version(&store, mostly.clone(), Some(&big_delta)).await;
        assert!(
            folded.is_base(),
            "deltas holding more than half the rows are folded into a base"
        );
        assert_eq!(read_back(&store, &folded).await, expected(&mostly));
    }

    #[tokio::test]
    async fn duplicate_keys_are_refused_in_a_delta_too() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir);
        let base = write_version(&store, users(&[1, 2, 3]), None).await;
        let renamed = named(&[3], &|_| "renamed".into());
        let unchanged = users(&[3]);
        // A key found unchanged twice, found unchanged and changed (in either order), changed
        // twice, and found unchanged then changed twice.
        let cases = [
            (vec![users(&[1, 2, 3, 3])], "id=3 (×2)"),
            (vec![users(&[1, 2, 3]), renamed.clone()], "id=3 (×2)"),
            (vec![renamed.clone(), users(&[1, 2, 3])], "id=3 (×2)"),
            (
                vec![users(&[1, 2]), renamed.clone(), renamed.clone()],
                "id=3 (×2)",
            ),
            (
                vec![unchanged, renamed.clone(), users(&[1, 2]), renamed],
                "id=3 (×3)",
            ),
        ];
        for (batches, expected) in cases {
            let mut w = SnapshotWriter::new(store.clone(), spec(Some(4))).with_parent(base.clone());
            for batch in batches {
                w.write(batch).await.unwrap();
            }
            let err = w.commit().await.unwrap_err().to_string();
            assert!(err.contains(expected), "{expected}: {err}");
        }
        assert_eq!(store.list_snapshots("users").await.unwrap(), vec![base.clone()]);
        // Nothing of the failed writer stays: no data, no marker.
        let left: Vec<String> = store
            .list("models/users")
            .await
            .unwrap()
            .into_iter()
            .filter(|p| !p.contains(&base.id))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[tokio::test]
    async fn retiring_a_layer_keeps_its_rows_while_a_delta_needs_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir);
        let ids: Vec<i64> = (0..400).collect();
        let v1 = named(&ids, &|i| format!("a {i}"));
        let v2 = named(&ids, &|i| {
            if i % 10 == 0 {
                format!("b {i}")
            } else {
                format!("a {i}")
            }
        });
        let base = write_version(&store, v1, None).await;
        let delta = write_version(&store, v2.clone(), Some(&base)).await;
        store.retire("users", &base.id).await.unwrap();
        assert_eq!(store.list_snapshots("users").await.unwrap(), vec![delta.clone()]);
        // The base's rows are the delta's first layer: still readable.
        assert_eq!(read_back(&store, &delta).await, expected(&v2));
        let future = chrono::Utc::now() + chrono::Duration::hours(1);
        assert_eq!(store.remove_uncommitted("users", future).await.unwrap(), 0);
        assert_eq!(read_back(&store, &delta).await, expected(&v2));
        // Once no snapshot needs them, they are swept.
        let rebased = write_version(&store, v2.clone(), None).await;
        store.retire("users", &delta.id).await.unwrap();
        assert_eq!(
            store.remove_uncommitted("users", future).await.unwrap(),
            base.files.len(),
            "the retired base's rows"
        );
        let left = store.list("models/users").await.unwrap();
        assert!(left.iter().all(|p| p.contains(&rebased.id)), "{left:?}");
    }

    #[tokio::test]
    async fn a_writer_keeps_its_parents_files_from_retention_until_it_commits() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir);
        let ids: Vec<i64> = (0..300).collect();
        let base = write_version(&store, named(&ids, &|i| format!("a {i}")), None).await;
        let newer = write_version(&store, named(&ids, &|i| format!("z {i}")), None).await;
        let v2 = named(&ids, &|i| {
            if i % 3 == 0 {
                format!("b {i}")
            } else {
                format!("a {i}")
            }
        });
        let mut w = SnapshotWriter::new(store.clone(), spec(Some(4))).with_parent(base.clone());
        w.write(v2.slice(0, 100)).await.unwrap();
        // Retention retires the parent while the child is written: the marker keeps its files.
        store.retire("users", &base.id).await.unwrap();
        w.write(v2.slice(100, 200)).await.unwrap();
        let delta = w.commit().await.unwrap();
        assert_eq!(delta.parent.as_deref(), Some(base.id.as_str()));
        assert_eq!(read_back(&store, &delta).await, expected(&v2));
        assert!(
            store
                .list("models/users")
                .await
                .unwrap()
                .iter()
                .all(|p| !p.ends_with(".writing"))
        );
        // A writer that starts after its parent was retired writes a base.
        store.retire("users", &delta.id).await.unwrap();
        let mut late = SnapshotWriter::new(store.clone(), spec(Some(4))).with_parent(delta.clone());
        late.write(v2.clone()).await.unwrap();
        let late = late.commit().await.unwrap();
        assert!(late.is_base());
        let _ = newer;
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
