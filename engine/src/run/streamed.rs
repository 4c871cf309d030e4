//! Runs delivered while their model is extracted.
//!
//! A run that sends every row as added (a mapping's first run, or a full resync without a
//! filter) has no diff to wait for: its records are the extracted rows themselves. When its
//! destination also makes records visible only once its session finishes (a file), the run
//! renders and writes each batch as the extraction hands it over, instead of reading every row
//! back from the committed snapshot afterwards. Nothing changes in what is guaranteed:
//! - the session is finished (the file published) only once the snapshot has committed, so
//!   duplicate keys, a failing source or a stop during extraction abandon it unseen;
//! - the run commits exactly as one delivered after extraction: its baseline is the new
//!   snapshot, and a run killed at any point delivered nothing (no checkpoints are taken);
//! - the records are the same: the rows take the types the snapshot reads back
//!   ([`crate::diff::read_back_schema`]) and the row hashes the snapshot stores.
//!
//! The extraction waits when a delivery falls [`BATCHES_IN_FLIGHT`] batches behind, so memory
//! stays bounded; a delivery that fails stops taking batches and the extraction goes on.

use std::sync::Arc;

use arrow::array::{RecordBatch, UInt64Array};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::StreamExt;
use sluice_snapshots::SnapshotManifest;
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use super::{DeliveredSession, Delivery, RunEvent, RunObserver};
use crate::config::Op;
use crate::diff::{ChangeCounts, added_rows, added_schema, read_back_schema};
use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::exceptions::{ExceptionsWriter, StateRows};
use crate::mapping::MappingPlan;
use crate::metadata::RunRecord;

/// Extracted batches in flight to each mapping delivering during the extraction.
pub(super) const BATCHES_IN_FLIGHT: usize = 4;

/// A batch of model rows as extracted, with the row hashes the snapshot stores for them.
pub(super) type ExtractedRows = (RecordBatch, UInt64Array);

/// Where the extraction hands its batches to one mapping.
pub(super) type Tee = mpsc::Sender<ExtractedRows>;

/// How the extraction ended, as the mappings delivering during it learn it.
#[derive(Clone)]
pub(super) enum ExtractionState {
    Running,
    /// The snapshot committed, after this many milliseconds of extraction.
    Committed(Arc<SnapshotManifest>, u64),
    /// The extraction failed, stopped or was cancelled; its error is recorded on every run.
    Failed,
}

/// What became of a run delivered during its extraction.
pub(super) enum Outcome {
    /// Committed, or recorded as failed by its own delivery.
    Done(RunRecord),
    /// The extraction failed: its session was abandoned and the run is left to be recorded
    /// with the extraction's error.
    ExtractionFailed(RunRecord),
}

/// Hands a batch the snapshot took to every mapping delivering meanwhile. One whose delivery
/// stopped (it failed or was cancelled) is left out from then on.
pub(super) async fn hand_over(tees: &mut Vec<Tee>, rows: &RecordBatch, hashes: &UInt64Array) {
    let mut i = 0;
    while i < tees.len() {
        if tees[i].send((rows.clone(), hashes.clone())).await.is_ok() {
            i += 1;
        } else {
            tees.swap_remove(i);
        }
    }
}

impl Engine {
    /// Whether `run` is delivered while its model is extracted: it sends every row as added (no
    /// baseline: a first run, or a full resync without a filter), its mapping sends added
    /// records, and its destination acknowledges records only when the session finishes.
    pub(super) async fn delivers_while_extracting(&self, run: &RunRecord, full: bool) -> Result<bool> {
        if run.filter.is_some() {
            return Ok(false);
        }
        let config = self.mapping_config(&run.mapping)?;
        if !config.send.contains(&Op::Added)
            || !self.destination(&config.destination)?.acknowledges_at_finish()
        {
            return Ok(false);
        }
        Ok(full || self.metadata.mapping_state(&run.mapping).await?.is_none())
    }

    /// Delivers `run`'s records from the extracted batches `rows` as they come, then, once
    /// the extraction has committed its snapshot, finishes the session and commits the run.
    pub(super) async fn deliver_while_extracting(
        &self,
        mut run: RunRecord,
        rows: mpsc::Receiver<ExtractedRows>,
        mut extraction: watch::Receiver<ExtractionState>,
        observer: &dyn RunObserver,
    ) -> Result<Outcome> {
        // Every log line of the run carries its id and mapping.
        let span =
            tracing::info_span!("run", run_id = %run.id, mapping = %run.mapping, trigger = %run.trigger);
        let delivered = self
            .deliver_extracted(&mut run, rows, observer)
            .instrument(span.clone())
            .await;
        // Whatever the delivery did, the run's fate waits on the snapshot's.
        let extracted = extraction
            .wait_for(|e| !matches!(e, ExtractionState::Running))
            .await
            .map(|e| e.clone())
            .unwrap_or(ExtractionState::Failed);
        let ExtractionState::Committed(manifest, extract_ms) = extracted else {
            if let Ok(session) = delivered {
                session.abort().await;
            }
            return Ok(Outcome::ExtractionFailed(run));
        };
        run.snapshot_id = Some(manifest.id.clone());
        run.counts.extracted = manifest.rows;
        run.counts.added = manifest.rows;
        run.timings.extract_ms = extract_ms;
        self.metadata.update_run(&run).await?;
        let committed = match delivered {
            Ok(session) => {
                observer.on_event(RunEvent::MappingProgress {
                    mapping: run.mapping.clone(),
                    buckets_done: 1,
                    buckets: 1,
                    changes: ChangeCounts {
                        added: manifest.rows,
                        ..ChangeCounts::default()
                    },
                    delivered: run.counts.delivered,
                    failed: run.counts.failed,
                });
                self.commit_session(&mut run, &manifest.id, session)
                    .instrument(span)
                    .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = committed {
            self.record_stopped_run(&mut run, &e).await?;
        }
        self.finish_run(observer, &run).await;
        Ok(Outcome::Done(run))
    }

    /// Opens `run`'s destination session and sends it every extracted row as added, until the
    /// extraction stops handing batches over. On error the session is abandoned.
    async fn deliver_extracted(
        &self,
        run: &mut RunRecord,
        mut rows: mpsc::Receiver<ExtractedRows>,
        observer: &dyn RunObserver,
    ) -> Result<DeliveredSession> {
        let mapping = run.mapping.clone();
        let config = self.mapping_config(&mapping)?;
        let destination = self.destination(&config.destination)?.clone();
        let state = self.metadata.mapping_state(&mapping).await?;
        let stop = self.controls.register(&run.id);
        // The extraction hands over an empty batch with the model's columns first; none comes
        // when it failed before its first row.
        let Some((first, first_hashes)) = rows.recv().await else {
            return Err(EngineError::Internal(format!(
                "the extraction of model `{}` ended before handing over its columns",
                run.model
            )));
        };
        let schema = added_schema(&first.schema());
        let model_schema = read_back_schema(&first.schema());
        let key_columns = self
            .project
            .model(&run.model)
            .map(|m| m.primary_key.0.clone())
            .ok_or_else(|| EngineError::Internal(format!("model `{}` vanished", run.model)))?;
        let plan = Arc::new(MappingPlan::compile(
            &mapping,
            &config,
            &run.model,
            &model_schema,
            &key_columns,
            self.action(&mapping),
        )?);
        let info = self.run_info(&mapping, &config, run, false);
        let writer = destination.open(&info).await?;
        if !writer.acknowledges_at_finish() {
            writer.abort().await;
            return Err(EngineError::Internal(format!(
                "destination `{}` acknowledges records at the end of a session, but this session does not",
                config.destination
            )));
        }
        let policy = writer.policy();
        let key_fields = key_columns
            .iter()
            .map(|k| model_schema.field_with_name(k).cloned())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| EngineError::Internal(format!("a key column of model `{}`: {e}", run.model)))?;
        let mut exceptions =
            ExceptionsWriter::new(self.snapshots.clone(), &mapping, &run.id, key_fields.clone());
        tracing::info!("delivering while extracting: every row is added");
        observer.on_event(RunEvent::MappingStarted {
            mapping: mapping.clone(),
            model: run.model.clone(),
            buckets: 1,
        });
        let batches = {
            let schema = schema.clone();
            let first = futures::stream::iter([(first, first_hashes)]);
            let rest =
                futures::stream::unfold(
                    rows,
                    |mut rows| async move { rows.recv().await.map(|r| (r, rows)) },
                );
            first
                .chain(rest)
                .map(move |(batch, hashes)| added_rows(&schema, &batch, &hashes))
        };
        let stream = Box::pin(RecordBatchStreamAdapter::new(schema, batches));
        let mut delivery = Delivery {
            engine: self,
            run,
            plan,
            writer: writer.as_ref(),
            destination: config.destination.clone(),
            policy: &policy,
            state_rows: StateRows::new(key_fields),
            exceptions: &mut exceptions,
            // The destination acknowledges nothing before the session finishes.
            checkpoints: None,
            records_per_checkpoint: self.project.config.limits.records_per_checkpoint.max(1),
            failures: Vec::new(),
            first_failure: None,
            dry_run: None,
            stop,
            next_seq: 0,
        };
        let outcome = delivery
            .deliver_stream(stream)
            .instrument(tracing::info_span!("deliver"))
            .await;
        let failures = delivery.take_failures();
        DeliveredSession::after(outcome, writer, exceptions, failures, state).await
    }
}
