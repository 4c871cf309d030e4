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

use crate::diff::{
    ATTEMPTS, BASE_HASH, BASE_SNAPSHOT, FIRST_FAILED_AT, KEY_HASH, LAST_ERROR, OP, failed_at_type,
};
use crate::error::{EngineError, Result};

/// Collects a run's failed records into its exceptions file.
pub struct ExceptionsWriter {
    store: SnapshotStore,
    path: String,
    key_fields: Vec<Field>,
    schema: SchemaRef,
    writer: Option<AsyncArrowWriter<BufWriter>>,
    rows: u64,
}

/// A failed record's attempt count and first failure time, as the run records them.
#[derive(Debug, Clone)]
pub struct FailedRecord {
    pub row: usize,
    pub error: String,
}

impl ExceptionsWriter {
    pub fn new(store: SnapshotStore, mapping: &str, run_id: &str, key_fields: Vec<Field>) -> Self {
        let mut fields = key_fields.clone();
        fields.extend([
            Field::new(KEY_HASH, DataType::UInt64, false),
            Field::new(BASE_HASH, DataType::UInt64, true),
            Field::new(BASE_SNAPSHOT, DataType::Utf8, true),
            Field::new(OP, DataType::UInt8, false),
            Field::new(ATTEMPTS, DataType::Int64, false),
            Field::new(FIRST_FAILED_AT, failed_at_type(), false),
            Field::new(LAST_ERROR, DataType::Utf8, false),
        ]);
        Self {
            store,
            path: format!("mappings/{mapping}/exceptions/{run_id}.parquet"),
            key_fields,
            schema: Arc::new(Schema::new(fields)),
            writer: None,
            rows: 0,
        }
    }

    /// Appends the rows `failed` of a materialised batch (model columns plus change columns).
    /// Returns each failed record's attempt count and first failure time.
    pub async fn append(
        &mut self,
        batch: &RecordBatch,
        failed: &[FailedRecord],
        now: DateTime<Utc>,
    ) -> Result<Vec<(i64, DateTime<Utc>)>> {
        if failed.is_empty() {
            return Ok(Vec::new());
        }
        let indices = arrow::array::UInt32Array::from_iter_values(failed.iter().map(|f| f.row as u32));
        let rows = take_record_batch(batch, &indices)?;
        let column = |name: &str| -> Result<&ArrayRef> {
            rows.column_by_name(name)
                .ok_or_else(|| EngineError::Internal(format!("materialised rows lack `{name}`")))
        };
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(self.schema.fields().len());
        let key_names: Vec<String> = self.key_fields.iter().map(|f| f.name().clone()).collect();
        for field in &self.key_fields {
            columns.push(cast(column(field.name())?, field.data_type())?);
        }
        let keys_only =
            RecordBatch::try_new(Arc::new(Schema::new(self.key_fields.clone())), columns.clone())?;
        columns.push(Arc::new(UInt64Array::from(key_hashes(&keys_only, &key_names)?)));
        columns.push(cast(column(BASE_HASH)?, &DataType::UInt64)?);
        columns.push(cast(column(BASE_SNAPSHOT)?, &DataType::Utf8)?);
        columns.push(cast(column(OP)?, &DataType::UInt8)?);
        let previous_attempts = cast(column(ATTEMPTS)?, &DataType::Int64)?;
        let previous_attempts = previous_attempts.as_primitive::<Int64Type>();
        let first_failed = cast(column(FIRST_FAILED_AT)?, &failed_at_type())?;
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
        let out = RecordBatch::try_new(self.schema.clone(), columns)?;
        let writer = match self.writer.as_mut() {
            Some(w) => w,
            None => {
                let sink = BufWriter::new(self.store.object_store(), self.store.path(&self.path));
                self.writer.insert(
                    AsyncArrowWriter::try_new(sink, self.schema.clone(), None)
                        .map_err(|e| EngineError::Internal(format!("exceptions file: {e}")))?,
                )
            }
        };
        writer
            .write(&out)
            .await
            .map_err(|e| EngineError::Internal(format!("writing the exceptions file {}: {e}", self.path)))?;
        self.rows += out.num_rows() as u64;
        Ok(outcomes)
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

/// Reads the distinct snapshot ids an exceptions file refers to.
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
