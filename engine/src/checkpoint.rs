//! Commit points inside a run, and the recovery of a run that never reached its own commit.
//!
//! A run commits the mapping's new baseline only at its end (see [`crate::run`]). So that a run
//! killed part way does not send again what the destination already acknowledged, every
//! delivered batch ends in a **checkpoint**: a small Parquet file in the snapshot store with,
//! for each record of the batch, the state the destination now has (the shape of an exceptions
//! file: acknowledged records point at the new snapshot, or at nothing when deleted; failed
//! records keep the state the destination still has and count an attempt), recorded in the
//! metadata store in one transaction with the batch's failed records and the run's counts.
//!
//! Before a batch is sent, the records it **adds** are written to an **intent** file beside the
//! checkpoint to come: while their requests are in flight the destination may or may not end up
//! with them. Updates and deletes need no intent: re-sending them from the old state is right
//! whether or not they arrived. An add is not: if the model drops the record before it is sent
//! again, the destination may hold a record nobody deletes.
//!
//! The next run of the mapping, once it holds the mapping's lease, **folds** the checkpoints and
//! intents of any earlier run that did not commit (killed, stopped by a shutdown, or failed part
//! way) into the mapping's state: the state's exceptions become the old exceptions overlaid with
//! the intents (an add in flight has [`crate::diff::UNCERTAIN_HASH`]: it is added again while the
//! model has it and deleted once it does not), overlaid with every checkpointed record. That is
//! what the destination has acknowledged, so the diff sends only what the cut-short run did not
//! deliver, plus the batch that was in flight when it stopped (with the same message ids).

use std::sync::Arc;

use arrow::array::RecordBatch;
use datafusion::prelude::{Expr, ParquetReadOptions, cast, ident, lit};
use futures::TryStreamExt;
use object_store::buffered::BufWriter;
use parquet::arrow::{ArrowWriter, AsyncArrowWriter};
use sluice_snapshots::SnapshotStore;

use crate::diff::{
    ATTEMPTS, BASE_HASH, BASE_SNAPSHOT, FIRST_FAILED_AT, KEY_HASH, LAST_ERROR, OP, diff_context,
};
use crate::error::{EngineError, Result};
use crate::exceptions::StateRows;
use crate::metadata::{Checkpoint, MappingState, RunRecord};

/// Writes one run's checkpoint files.
pub struct CheckpointWriter {
    store: SnapshotStore,
    mapping: String,
    run_id: String,
    snapshot_id: String,
    rows: StateRows,
}

impl CheckpointWriter {
    pub fn new(
        store: SnapshotStore,
        mapping: &str,
        run_id: &str,
        snapshot_id: &str,
        rows: StateRows,
    ) -> Self {
        Self {
            store,
            mapping: mapping.to_string(),
            run_id: run_id.to_string(),
            snapshot_id: snapshot_id.to_string(),
            rows,
        }
    }

    /// Where a run's checkpoint files live.
    pub fn dir(mapping: &str, run_id: &str) -> String {
        format!("mappings/{mapping}/checkpoints/{run_id}")
    }

    /// Records, before batch `seq` is sent, the rows `adding` of the materialised `batch`: the
    /// records it adds, whose state at the destination is unknown until the batch's checkpoint.
    pub async fn write_intent(&self, seq: i64, batch: &RecordBatch, adding: &[usize]) -> Result<()> {
        if adding.is_empty() {
            return Ok(());
        }
        let path = format!(
            "{}/{seq:08}{INTENT_SUFFIX}",
            Self::dir(&self.mapping, &self.run_id)
        );
        let rows = self.rows.in_flight(batch, adding, &self.snapshot_id)?;
        self.put(&path, &[&rows]).await
    }

    /// Writes the results of delivered batch `seq`: the rows `acknowledged` of the materialised
    /// `batch`, and `failed` (already in state-row form). Returns the checkpoint to record; it
    /// counts only once the metadata store has it.
    pub async fn write(
        &self,
        seq: i64,
        batch: &RecordBatch,
        acknowledged: &[usize],
        failed: Option<&RecordBatch>,
    ) -> Result<Checkpoint> {
        let path = format!("{}/{seq:08}.parquet", Self::dir(&self.mapping, &self.run_id));
        let acked = self.rows.acknowledged(batch, acknowledged, &self.snapshot_id)?;
        let mut parts = vec![&acked];
        if let Some(failed) = failed {
            parts.push(failed);
        }
        self.put(&path, &parts).await?;
        Ok(Checkpoint {
            run_id: self.run_id.clone(),
            seq,
            path,
            acknowledged: acknowledged.len() as u64,
            failed: failed.map_or(0, |f| f.num_rows() as u64),
        })
    }

    async fn put(&self, path: &str, parts: &[&RecordBatch]) -> Result<()> {
        let error =
            |e: parquet::errors::ParquetError| EngineError::Internal(format!("checkpoint {path}: {e}"));
        let mut bytes = Vec::with_capacity(64 * 1024);
        let mut writer = ArrowWriter::try_new(
            &mut bytes,
            self.rows.schema().clone(),
            Some(checkpoint_properties()),
        )
        .map_err(error)?;
        for part in parts {
            writer.write(part).map_err(error)?;
        }
        writer.close().map_err(error)?;
        self.store.put(path, bytes.into()).await?;
        Ok(())
    }
}

/// Checkpoint and intent files are small, written once and read once, and only if a run
/// stops: plain encoding without statistics. (Dictionary-encoding their repeated strings and
/// computing statistics took two thirds of a checkpoint's time; see BENCHMARKS.md.)
fn checkpoint_properties() -> parquet::file::properties::WriterProperties {
    parquet::file::properties::WriterProperties::builder()
        .set_statistics_enabled(parquet::file::properties::EnabledStatistics::None)
        .set_dictionary_enabled(false)
        .build()
}

/// File name ending of intent files.
pub const INTENT_SUFFIX: &str = ".intent.parquet";

/// The state of `mapping` once the checkpoints and intents of `run` (a run that did not
/// commit) are taken in: the previous state's exceptions overlaid with the intents, then with
/// every checkpointed record. `None` when the run left neither. A full resync that was cut
/// short resumes as one: its state keeps only what it delivered, so the next run sends the rest.
pub async fn fold(
    store: &SnapshotStore,
    previous: Option<&MappingState>,
    run: &RunRecord,
    checkpoints: &[Checkpoint],
    intents: &[String],
) -> Result<Option<MappingState>> {
    if checkpoints.is_empty() && intents.is_empty() {
        return Ok(None);
    }
    let fold_error = |e: datafusion::error::DataFusionError| {
        EngineError::Internal(format!(
            "mapping `{}`: taking in the checkpoints of run {}: {e}",
            run.mapping, run.id
        ))
    };
    let ctx = diff_context();
    store.register_with(&ctx);
    // Later layers win: old exceptions (0), then intents (1), then checkpoints (2).
    let mut layers: Vec<(Vec<String>, i64)> = Vec::new();
    if let Some(path) = previous
        .filter(|_| !run.full_resync)
        .and_then(|s| s.exceptions_path.clone())
    {
        layers.push((vec![path], 0));
    }
    if !intents.is_empty() {
        layers.push((intents.to_vec(), 1));
    }
    if !checkpoints.is_empty() {
        layers.push((checkpoints.iter().map(|c| c.path.clone()).collect(), 2));
    }
    // The newest layer's columns and types (a key column's type may have changed since).
    let newest = &layers[layers.len() - 1].0;
    let schema = ctx
        .read_parquet(
            newest
                .iter()
                .map(|p| store.url(p).to_string())
                .collect::<Vec<_>>(),
            ParquetReadOptions::default(),
        )
        .await
        .map_err(fold_error)?
        .schema()
        .clone();
    let state_columns: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
    let key_count = state_columns.len().saturating_sub(STATE_COLUMNS.len());
    let mut all: Option<datafusion::prelude::DataFrame> = None;
    for (paths, seq) in layers {
        let urls: Vec<String> = paths.iter().map(|p| store.url(p).to_string()).collect();
        let frame = ctx
            .read_parquet(urls, ParquetReadOptions::default())
            .await
            .map_err(fold_error)?;
        let mut select: Vec<Expr> = state_columns
            .iter()
            .map(|name| {
                let field = schema.field_with_unqualified_name(name)?;
                Ok(cast(ident(name), field.data_type().clone()).alias(name))
            })
            .collect::<datafusion::error::Result<_>>()
            .map_err(fold_error)?;
        select.push(lit(seq).alias("__seq"));
        let frame = frame.select(select).map_err(fold_error)?;
        all = Some(match all {
            None => frame,
            Some(all) => all.union(frame).map_err(fold_error)?,
        });
    }
    let all = all.ok_or_else(|| EngineError::Internal("nothing to fold".into()))?;
    ctx.register_table("state_rows", all.into_view())
        .map_err(fold_error)?;
    let quoted = |name: &str| format!("\"{}\"", name.replace('"', "\"\""));
    let keys: Vec<String> = state_columns[..key_count].iter().map(|k| quoted(k)).collect();
    let columns: Vec<String> = state_columns.iter().map(|c| quoted(c)).collect();
    // Within one run every key is diffed once, so a layer never repeats a key.
    let sql = format!(
        "SELECT {columns} FROM (SELECT *, row_number() OVER (PARTITION BY {keys} ORDER BY __seq DESC) AS __rank \
         FROM state_rows) WHERE __rank = 1",
        columns = columns.join(", "),
        keys = keys.join(", "),
    );
    let folded = ctx.sql(&sql).await.map_err(fold_error)?;
    let path = format!("mappings/{}/exceptions/{}-recovered.parquet", run.mapping, run.id);
    let schema = Arc::new(folded.schema().as_arrow().clone());
    let mut stream = folded.execute_stream().await.map_err(fold_error)?;
    let sink = BufWriter::new(store.object_store(), store.path(&path));
    let mut writer = AsyncArrowWriter::try_new(sink, schema, None)
        .map_err(|e| EngineError::Internal(format!("exceptions file {path}: {e}")))?;
    let mut rows = 0u64;
    while let Some(batch) = stream.try_next().await.map_err(fold_error)? {
        rows += batch.num_rows() as u64;
        writer
            .write(&batch)
            .await
            .map_err(|e| EngineError::Internal(format!("exceptions file {path}: {e}")))?;
    }
    writer
        .close()
        .await
        .map_err(|e| EngineError::Internal(format!("exceptions file {path}: {e}")))?;
    Ok(Some(MappingState {
        mapping: run.mapping.clone(),
        model: run.model.clone(),
        baseline_snapshot_id: if run.full_resync {
            None
        } else {
            previous.and_then(|s| s.baseline_snapshot_id.clone())
        },
        exceptions_path: Some(path),
        exceptions_rows: rows,
        last_run_id: run.id.clone(),
        last_success_at: previous.map_or(chrono::DateTime::<chrono::Utc>::UNIX_EPOCH, |s| s.last_success_at),
    }))
}

/// Names of the state-row columns after the key columns.
pub const STATE_COLUMNS: [&str; 7] = [
    KEY_HASH,
    BASE_HASH,
    BASE_SNAPSHOT,
    OP,
    ATTEMPTS,
    FIRST_FAILED_AT,
    LAST_ERROR,
];
