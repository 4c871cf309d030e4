//! The exceptions file of a mapping: records a run could not deliver, with the state the
//! destination still has for each (see [`crate::diff`]). Written beside the snapshots as one
//! Parquet file per run that had failures, and made current by the run's commit.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray, UInt64Array,
};
use arrow::compute::{cast, take_record_batch};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef, TimestampMicrosecondType};
use chrono::{DateTime, Utc};
use object_store::buffered::BufWriter;
use parquet::arrow::AsyncArrowWriter;
use sluice_snapshots::SnapshotStore;
use sluice_snapshots::hash::key_hashes;

use crate::config::Op;
use crate::diff::{
    ATTEMPTS, BASE_HASH, BASE_SNAPSHOT, FIRST_FAILED_AT, KEY_HASH, LAST_ERROR, NEW_HASH, OP, failed_at_type,
};
use crate::error::{EngineError, Result};

/// Rows of an exceptions (or checkpoint) file: for a key, the state its destination has.
#[derive(Debug, Clone)]
pub struct StateRows {
    key_fields: Vec<Field>,
    schema: SchemaRef,
}

/// A failed record's attempt count and first failure time.
pub type Attempts = (i64, DateTime<Utc>);

/// A record of a batch that failed, and why.
#[derive(Debug, Clone)]
pub struct FailedRecord {
    pub row: usize,
    pub error: String,
}

impl StateRows {
    pub fn new(key_fields: Vec<Field>) -> Self {
        let mut fields = key_fields.clone();
        fields.extend([
            Field::new(KEY_HASH, DataType::UInt64, false),
            Field::new(BASE_HASH, DataType::UInt64, true),
            Field::new(BASE_SNAPSHOT, DataType::Utf8, true),
            Field::new(OP, DataType::UInt8, false),
            Field::new(ATTEMPTS, DataType::Int64, false),
            Field::new(FIRST_FAILED_AT, failed_at_type(), true),
            Field::new(LAST_ERROR, DataType::Utf8, false),
        ]);
        Self {
            key_fields,
            schema: Arc::new(Schema::new(fields)),
        }
    }

    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// Key columns (in the file's types) and their hash, for `rows` of a materialised batch.
    fn keys(&self, rows: &RecordBatch) -> Result<Vec<ArrayRef>> {
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(self.schema.fields().len());
        let key_names: Vec<String> = self.key_fields.iter().map(|f| f.name().clone()).collect();
        for field in &self.key_fields {
            columns.push(cast(column(rows, field.name())?, field.data_type())?);
        }
        let keys_only =
            RecordBatch::try_new(Arc::new(Schema::new(self.key_fields.clone())), columns.clone())?;
        columns.push(Arc::new(UInt64Array::from(key_hashes(&keys_only, &key_names)?)));
        Ok(columns)
    }

    /// The rows `failed` of a materialised batch (model columns plus change columns): the
    /// destination keeps the state it had, and the record's attempts go up by one. Also returns
    /// each failed record's attempt count and first failure time.
    pub fn failed(
        &self,
        batch: &RecordBatch,
        failed: &[FailedRecord],
        now: DateTime<Utc>,
    ) -> Result<(RecordBatch, Vec<Attempts>)> {
        let indices = arrow::array::UInt32Array::from_iter_values(failed.iter().map(|f| f.row as u32));
        let rows = take_record_batch(batch, &indices)?;
        let mut columns = self.keys(&rows)?;
        columns.push(cast(column(&rows, BASE_HASH)?, &DataType::UInt64)?);
        columns.push(cast(column(&rows, BASE_SNAPSHOT)?, &DataType::Utf8)?);
        columns.push(cast(column(&rows, OP)?, &DataType::UInt8)?);
        let previous_attempts = cast(column(&rows, ATTEMPTS)?, &DataType::Int64)?;
        let previous_attempts = previous_attempts.as_primitive::<Int64Type>();
        let first_failed = cast(column(&rows, FIRST_FAILED_AT)?, &failed_at_type())?;
        let first_failed = first_failed.as_primitive::<TimestampMicrosecondType>();
        let now_micros = now.timestamp_micros();
        let mut outcomes = Vec::with_capacity(failed.len());
        let mut attempts = Vec::with_capacity(failed.len());
        let mut first = Vec::with_capacity(failed.len());
        for i in 0..failed.len() {
            let count = if previous_attempts.is_valid(i) {
                previous_attempts.value(i)
            } else {
                0
            } + 1;
            let since = if first_failed.is_valid(i) {
                first_failed.value(i)
            } else {
                now_micros
            };
            attempts.push(count);
            first.push(since);
            outcomes.push((count, DateTime::from_timestamp_micros(since).unwrap_or(now)));
        }
        columns.push(Arc::new(Int64Array::from(attempts)));
        columns.push(Arc::new(
            TimestampMicrosecondArray::from(first).with_timezone("UTC"),
        ));
        columns.push(Arc::new(StringArray::from_iter_values(
            failed.iter().map(|f| f.error.as_str()),
        )));
        Ok((RecordBatch::try_new(self.schema.clone(), columns)?, outcomes))
    }

    /// The rows `acknowledged` of a materialised batch: the destination now has the new
    /// snapshot's row (`snapshot_id`), or nothing for a deleted record.
    pub fn acknowledged(
        &self,
        batch: &RecordBatch,
        acknowledged: &[usize],
        snapshot_id: &str,
    ) -> Result<RecordBatch> {
        let indices = arrow::array::UInt32Array::from_iter_values(acknowledged.iter().map(|i| *i as u32));
        let rows = take_record_batch(batch, &indices)?;
        let mut columns = self.keys(&rows)?;
        let ops = cast(column(&rows, OP)?, &DataType::UInt8)?;
        let ops = ops.as_primitive::<arrow::datatypes::UInt8Type>();
        let new_hash = cast(column(&rows, NEW_HASH)?, &DataType::UInt64)?;
        let new_hash = new_hash.as_primitive::<arrow::datatypes::UInt64Type>();
        let deleted = |i: usize| ops.value(i) == Op::Deleted as u8;
        let n = rows.num_rows();
        columns.push(Arc::new(
            (0..n)
                .map(|i| (!deleted(i) && new_hash.is_valid(i)).then(|| new_hash.value(i)))
                .collect::<UInt64Array>(),
        ));
        columns.push(Arc::new(
            (0..n)
                .map(|i| (!deleted(i)).then_some(snapshot_id))
                .collect::<StringArray>(),
        ));
        columns.push(Arc::new(ops.clone()));
        columns.push(Arc::new(Int64Array::from(vec![0i64; n])));
        columns.push(Arc::new(
            TimestampMicrosecondArray::from(vec![None::<i64>; n]).with_timezone("UTC"),
        ));
        columns.push(Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
            "", n,
        ))));
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }
}

impl StateRows {
    /// The rows `adding` (records about to be sent as added) of a materialised batch, as the
    /// destination's state is while their request is in flight: unknown. Their base hash is
    /// [`crate::diff::UNCERTAIN_HASH`] and their row is in `snapshot_id`.
    pub fn in_flight(&self, batch: &RecordBatch, adding: &[usize], snapshot_id: &str) -> Result<RecordBatch> {
        let indices = arrow::array::UInt32Array::from_iter_values(adding.iter().map(|i| *i as u32));
        let rows = take_record_batch(batch, &indices)?;
        let n = rows.num_rows();
        let mut columns = self.keys(&rows)?;
        columns.push(Arc::new(UInt64Array::from(vec![crate::diff::UNCERTAIN_HASH; n])));
        columns.push(Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
            snapshot_id,
            n,
        ))));
        columns.push(cast(column(&rows, OP)?, &DataType::UInt8)?);
        let attempts = cast(column(&rows, ATTEMPTS)?, &DataType::Int64)?;
        let attempts = attempts.as_primitive::<Int64Type>();
        columns.push(Arc::new(
            (0..n)
                .map(|i| {
                    if attempts.is_valid(i) {
                        attempts.value(i)
                    } else {
                        0
                    }
                })
                .collect::<Int64Array>(),
        ));
        columns.push(cast(column(&rows, FIRST_FAILED_AT)?, &failed_at_type())?);
        columns.push(Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
            "", n,
        ))));
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }
}

fn column<'a>(rows: &'a RecordBatch, name: &str) -> Result<&'a ArrayRef> {
    rows.column_by_name(name)
        .ok_or_else(|| EngineError::Internal(format!("materialised rows lack `{name}`")))
}

/// Collects a run's failed records into its exceptions file.
pub struct ExceptionsWriter {
    store: SnapshotStore,
    path: String,
    rows_of: StateRows,
    writer: Option<AsyncArrowWriter<BufWriter>>,
    rows: u64,
}

impl ExceptionsWriter {
    pub fn new(store: SnapshotStore, mapping: &str, run_id: &str, key_fields: Vec<Field>) -> Self {
        Self {
            store,
            path: format!("mappings/{mapping}/exceptions/{run_id}.parquet"),
            rows_of: StateRows::new(key_fields),
            writer: None,
            rows: 0,
        }
    }

    /// Appends failed records already in state-row form ([`StateRows::failed`]).
    pub async fn write(&mut self, out: &RecordBatch) -> Result<()> {
        let writer = match self.writer.as_mut() {
            Some(w) => w,
            None => {
                let sink = BufWriter::new(self.store.object_store(), self.store.path(&self.path));
                self.writer.insert(
                    AsyncArrowWriter::try_new(sink, self.rows_of.schema().clone(), None)
                        .map_err(|e| EngineError::Internal(format!("exceptions file: {e}")))?,
                )
            }
        };
        writer
            .write(out)
            .await
            .map_err(|e| EngineError::Internal(format!("writing the exceptions file {}: {e}", self.path)))?;
        self.rows += out.num_rows() as u64;
        Ok(())
    }

    /// Closes the file; returns its path and row count, or `None` when nothing failed.
    pub async fn finish(self) -> Result<Option<(String, u64)>> {
        let Some(mut writer) = self.writer else {
            return Ok(None);
        };
        writer
            .finish()
            .await
            .map_err(|e| EngineError::Internal(format!("closing the exceptions file {}: {e}", self.path)))?;
        Ok(Some((self.path, self.rows)))
    }

    /// Drops what was written (the run failed before its commit).
    pub async fn abort(self) {
        let path = self.path.clone();
        drop(self.writer);
        if let Err(e) = self.store.delete(&path).await {
            tracing::warn!(path, error = %e, "could not remove an abandoned exceptions file");
        }
    }
}

/// The distinct snapshot ids the exceptions file at `path` refers to.
pub async fn referenced_snapshot_ids(store: &SnapshotStore, path: &str) -> Result<Vec<String>> {
    let ctx = crate::diff::diff_context();
    store.register_with(&ctx);
    let unreadable = |e: datafusion::error::DataFusionError| {
        EngineError::Internal(format!("the exceptions file {path} is unreadable: {e}"))
    };
    let batches = ctx
        .read_parquet(
            store.url(path).to_string(),
            datafusion::prelude::ParquetReadOptions::default(),
        )
        .await
        .and_then(|df| {
            df.select(vec![datafusion::prelude::cast(
                datafusion::prelude::ident(BASE_SNAPSHOT),
                DataType::Utf8,
            )])?
            .distinct()
        })
        .map_err(unreadable)?
        .collect()
        .await
        .map_err(unreadable)?;
    Ok(referenced_snapshots(&batches))
}

/// Reads the distinct snapshot ids of batches of one string column.
pub fn referenced_snapshots(batches: &[RecordBatch]) -> Vec<String> {
    let mut ids = Vec::new();
    for batch in batches {
        if let Some(column) = batch.column(0).as_string_opt::<i32>() {
            for i in 0..column.len() {
                if column.is_valid(i) {
                    ids.push(column.value(i).to_string());
                }
            }
        }
    }
    ids.sort();
    ids.dedup();
    ids
}
