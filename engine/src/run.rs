//! Running mappings: extract, diff, deliver, commit.
//!
//! 1. **Extract**: each model that a requested mapping uses is queried once and streamed into a
//!    new snapshot, committed by its manifest.
//! 2. **Diff**: per mapping, the new snapshot against the mapping's baseline, bucket by bucket
//!    (the next buckets' diffs run while the current bucket is delivered).
//! 3. **Deliver**: the changed rows the mapping selects are read in full, mapped, encoded and
//!    sent through the shared delivery layer; every record's result is kept. Records the
//!    destination did not accept are appended to the run's exceptions file.
//!    Every delivered batch (at most `limits.records_per_checkpoint` records) ends in a
//!    **checkpoint** ([`crate::checkpoint`]): its results are written beside the snapshots and
//!    recorded in one metadata transaction. That is the commit point of a batch.
//! 4. **Commit**: one metadata transaction records the run and moves the mapping's baseline to
//!    the new snapshot plus the exceptions file: the commit point of the run. A run that stops
//!    before it (killed, shut down, failed part way) leaves the previous baseline standing, and
//!    the next run first folds the stopped run's checkpoints into it, so it sends only what the
//!    destination had not acknowledged at the last checkpoint (at most the batch that was in
//!    flight is sent again, with the same message ids).
//!
//! A run with no diff to wait for (every row added: a first run, a full resync) to a destination
//! that publishes its records only when the session finishes (a file) does steps 2 and 3 while
//! step 1 runs, and finishes its session once the snapshot commits ([`streamed`]).

use std::collections::HashMap;
use std::io::Write as _;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::{Schema, UInt8Type, UInt64Type};
use chrono::{DateTime, Utc};
use datafusion::error::DataFusionError;
use futures::{StreamExt, TryStreamExt};
use sluice_snapshots::{ROW_HASH_COLUMN, SnapshotManifest, SnapshotSpec, SnapshotWriter};
use tracing::Instrument;

use crate::checkpoint::{CheckpointWriter, fold};
use crate::config::{MappingConfig, Op};
use crate::delivery::deliver;
use crate::destination::{DestinationWriter, RunInfo};
use crate::diff::{BASE_HASH, Baseline, ChangeCounts, Differ, NEW_HASH, OP};
use crate::engine::Engine;
use crate::error::{EngineError, Result, SourceError};
use crate::exceptions::{ExceptionsWriter, FailedRecord, StateRows};
use crate::mapping::MappingPlan;
use crate::metadata::{FailureRow, MappingState, RunRecord, RunStatus, Trigger};
use crate::model::{TemplateValues, render_sql};
use crate::source::ModelQuery;

mod partitions;
mod streamed;

/// What to run.
#[derive(Debug, Clone, Default)]
pub struct RunRequest {
    /// Mapping names; empty means every mapping in the project.
    pub mappings: Vec<String>,
    /// Ignore the baseline and send every row as added (a backfill).
    pub full: bool,
    /// What started the run (a full run is recorded as a backfill).
    pub trigger: Trigger,
    /// With `full`: only rows matching this SQL predicate (over the model's columns) are sent
    /// again as added; everything else goes as in a normal run (see [`check_filter`]).
    pub filter: Option<String>,
}

/// The stop switches of this process's runs, by run id: `POST /api/v1/runs/{id}/cancel` flips
/// one, and the run stops at its next commit point.
#[derive(Debug, Default)]
pub struct RunControls {
    runs: std::sync::Mutex<HashMap<String, Shutdown>>,
}

impl RunControls {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Shutdown>> {
        // A panic elsewhere cannot leave the map half-changed: every change is one call.
        self.runs.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn register(&self, run_id: &str) -> Shutdown {
        self.lock().entry(run_id.to_string()).or_default().clone()
    }

    pub(crate) fn unregister(&self, run_id: &str) {
        self.lock().remove(run_id);
    }

    /// The stop switch of a run of this process.
    pub fn get(&self, run_id: &str) -> Option<Shutdown> {
        self.lock().get(run_id).cloned()
    }

    /// Asks a run of this process to stop; `false` when it is not one.
    pub fn cancel(&self, run_id: &str) -> bool {
        match self.get(run_id) {
            Some(stop) => {
                stop.request();
                true
            }
            None => false,
        }
    }
}

/// Checks that a backfill's filter is one SQL expression (no subquery, no second statement):
/// it is planned against the model's columns when the run has its snapshot.
pub fn check_filter(filter: &str) -> std::result::Result<(), String> {
    use datafusion::sql::sqlparser::dialect::GenericDialect;
    use datafusion::sql::sqlparser::parser::Parser;
    use datafusion::sql::sqlparser::tokenizer::Token;
    if filter.trim().is_empty() {
        return Err("the filter is empty".into());
    }
    if filter.len() > 4096 {
        return Err("the filter is longer than 4,096 characters".into());
    }
    let dialect = GenericDialect {};
    let mut parser = Parser::new(&dialect)
        .try_with_sql(filter)
        .map_err(|e| format!("the filter is not SQL: {e}"))?;
    let expr = parser
        .parse_expr()
        .map_err(|e| format!("the filter is not a SQL expression: {e}"))?;
    if parser.peek_token().token != Token::EOF {
        return Err(
            "the filter must be one SQL expression (a WHERE clause's condition), with nothing after it"
                .into(),
        );
    }
    use datafusion::sql::sqlparser::ast::{Expr as SqlExpr, visit_expressions};
    let subquery = visit_expressions(&expr, |e| match e {
        SqlExpr::Subquery(_) | SqlExpr::Exists { .. } | SqlExpr::InSubquery { .. } => {
            std::ops::ControlFlow::Break(())
        }
        _ => std::ops::ControlFlow::Continue(()),
    });
    if subquery.is_break() {
        return Err("the filter cannot hold a subquery; it is a condition on the model's columns".into());
    }
    Ok(())
}

/// A request to stop: runs finish the batch in flight, checkpoint it, and end `interrupted`.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    requested: Arc<std::sync::atomic::AtomicBool>,
    notify: Arc<tokio::sync::Notify>,
}

impl Shutdown {
    pub fn request(&self) {
        self.requested.store(true, std::sync::atomic::Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub fn is_requested(&self) -> bool {
        self.requested.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Resolves once a shutdown is requested.
    pub async fn requested(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_requested() {
                return;
            }
            notified.await;
        }
    }
}

/// Where a dry run writes the requests it would send: one JSON object per line,
/// `{"request": {"method", "target", "records", "body"}}` or, for a record that would fail
/// without being sent, `{"unsent": {"key", "op", "error"}}`.
pub struct DryRunSink {
    out: std::sync::Mutex<Box<dyn std::io::Write + Send>>,
    requests: std::sync::atomic::AtomicU64,
}

impl DryRunSink {
    pub fn new(out: Box<dyn std::io::Write + Send>) -> Self {
        Self {
            out: std::sync::Mutex::new(out),
            requests: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn write(&self, lines: &[serde_json::Value]) -> std::io::Result<()> {
        let mut out = self
            .out
            .lock()
            .map_err(|_| std::io::Error::other("the dry run's output is poisoned"))?;
        for line in lines {
            if line.get("request").is_some() {
                self.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            serde_json::to_writer(&mut *out, line)?;
            out.write_all(b"\n")?;
        }
        out.flush()
    }

    /// Requests written so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Progress of a run, for a terminal or a log.
#[derive(Debug, Clone)]
pub enum RunEvent {
    ExtractStarted {
        model: String,
    },
    ExtractProgress {
        model: String,
        rows: u64,
    },
    ExtractFinished {
        model: String,
        rows: u64,
        snapshot_id: String,
    },
    MappingStarted {
        mapping: String,
        model: String,
        buckets: u32,
    },
    /// Cumulative counts of a mapping's run so far.
    MappingProgress {
        mapping: String,
        buckets_done: u32,
        buckets: u32,
        changes: ChangeCounts,
        delivered: u64,
        failed: u64,
    },
    MappingFinished {
        run: Box<RunRecord>,
    },
}

/// Receives [`RunEvent`]s.
pub trait RunObserver: Send + Sync {
    fn on_event(&self, event: RunEvent);
}

/// An observer that ignores everything.
pub struct Quiet;

impl RunObserver for Quiet {
    fn on_event(&self, _event: RunEvent) {}
}

impl Engine {
    /// Runs the requested mappings and returns each one's recorded run. A mapping that fails
    /// does not stop the others; its run says why.
    pub async fn run(&self, request: &RunRequest, observer: &dyn RunObserver) -> Result<Vec<RunRecord>> {
        let names: Vec<String> = if request.mappings.is_empty() {
            // Every enabled mapping; disabled ones are left out.
            self.project
                .config
                .mappings
                .iter()
                .filter(|(name, m)| {
                    if !m.enabled {
                        tracing::info!(mapping = %name, "disabled (enabled: false); not run");
                    }
                    m.enabled
                })
                .map(|(name, _)| name.clone())
                .collect()
        } else {
            for name in &request.mappings {
                match self.project.mapping(name) {
                    None => {
                        return Err(EngineError::Unknown {
                            kind: "mapping",
                            name: name.clone(),
                            available: self.project.config.mappings.keys().cloned().collect(),
                        });
                    }
                    Some(mapping) if !mapping.enabled => {
                        return Err(EngineError::Usage(format!(
                            "mapping `{name}` is disabled (`enabled: false` in the project file); enable it to run it"
                        )));
                    }
                    Some(_) => {}
                }
            }
            request.mappings.clone()
        };
        // Each model is extracted once for all of its mappings.
        let mut by_model: Vec<(String, Vec<String>)> = Vec::new();
        for name in names {
            let model = self.project.config.mappings[&name].model.clone();
            match by_model.iter_mut().find(|(m, _)| *m == model) {
                Some((_, mappings)) => mappings.push(name),
                None => by_model.push((model, vec![name])),
            }
        }
        if let Some(filter) = &request.filter {
            if !request.full {
                return Err(EngineError::Usage(
                    "a filter limits a backfill: give it with --full (full: true)".into(),
                ));
            }
            for (model, _) in &by_model {
                self.check_backfill_filter(model, filter).await?;
            }
        }
        let mut records = Vec::new();
        for (model, mappings) in by_model {
            let trigger = if request.full {
                Trigger::Backfill
            } else {
                request.trigger
            };
            records.extend(
                self.run_model(
                    &model,
                    &mappings,
                    request.full,
                    trigger,
                    request.filter.as_deref(),
                    observer,
                )
                .await?,
            );
        }
        Ok(records)
    }

    async fn run_model(
        &self,
        model: &str,
        mappings: &[String],
        full: bool,
        trigger: Trigger,
        filter: Option<&str>,
        observer: &dyn RunObserver,
    ) -> Result<Vec<RunRecord>> {
        // Each mapping's run first claims the mapping; one whose previous run is still going
        // (in this process or another sharing the state) is recorded as skipped.
        let mut runs = Vec::new();
        let mut skipped = Vec::new();
        for mapping in mappings {
            match self.claim(mapping, full, trigger, filter).await? {
                Ok(run) => runs.push(run),
                Err((mut run, holder)) => {
                    run.status = RunStatus::Skipped;
                    run.finished_at = Some(Utc::now());
                    run.error = Some(format!(
                        "skipped: run {} of this mapping is still going ({}, since {}); runs of one mapping never overlap",
                        holder.run_id,
                        holder.holder,
                        holder.since.format("%Y-%m-%d %H:%M:%S UTC")
                    ));
                    tracing::warn!(mapping, holder = %holder.holder, "a run of this mapping is still going; skipped");
                    self.metadata.start_run(&run).await?;
                    self.metadata.commit_run(&run, None).await?;
                    self.finish_run(observer, &run).await;
                    skipped.push(run);
                }
            }
        }
        let mut done = if runs.is_empty() {
            Vec::new()
        } else {
            self.execute(model, runs, full, observer).await?
        };
        done.extend(skipped);
        Ok(done)
    }

    /// Claims `mapping` for a new run: takes its lease and records the run as running (so it
    /// can be watched and cancelled from then on). `Err` with the run that would have been
    /// and the lease's holder when another run of the mapping is going.
    pub async fn claim(
        &self,
        mapping: &str,
        full: bool,
        trigger: Trigger,
        filter: Option<&str>,
    ) -> Result<std::result::Result<RunRecord, (RunRecord, crate::metadata::LeaseHolder)>> {
        let config = self.mapping_config(mapping)?;
        let mut run = RunRecord::starting(mapping, &config.model, &config.destination, full);
        run.trigger = if full { Trigger::Backfill } else { trigger };
        run.filter = filter.map(str::to_string);
        match self.metadata.acquire_lease(mapping, &run.id).await? {
            None => {
                // Started once claimed: a run that held the mapping until a moment ago
                // finished before this one's start.
                run.started_at = Utc::now();
                self.controls.register(&run.id);
                if let Err(e) = self.metadata.start_run(&run).await {
                    self.controls.unregister(&run.id);
                    let _ = self.metadata.release_lease(mapping, &run.id).await;
                    return Err(e);
                }
                Ok(Ok(run))
            }
            Some(holder) => Ok(Err((run, holder))),
        }
    }

    /// Runs claimed mappings of one model (see [`Engine::claim`]): first takes in what earlier
    /// runs of each left uncommitted, then extracts the model once, and diffs, delivers and
    /// commits each mapping. Releases the leases at the end, whatever happened.
    pub async fn execute(
        &self,
        model: &str,
        claimed: Vec<RunRecord>,
        full: bool,
        observer: &dyn RunObserver,
    ) -> Result<Vec<RunRecord>> {
        let leases: Vec<(String, String)> = claimed
            .iter()
            .map(|r| (r.mapping.clone(), r.id.clone()))
            .collect();
        // On the control plane's runtime: a run's own CPU work never delays its renewals.
        let heartbeat = self.workloads.spawn_control(heartbeat(
            self.metadata.clone(),
            self.controls.clone(),
            leases.clone(),
        ));
        let result = async {
            let mut runs = Vec::new();
            let mut done = Vec::new();
            for mut run in claimed {
                // Whatever an earlier run delivered and did not commit becomes part of the
                // mapping's state first.
                match self.recover(&run.mapping, &run.id).await {
                    Ok(()) => runs.push(run),
                    Err(e) => {
                        tracing::error!(mapping = run.mapping, error = %e, "could not take in an earlier run's checkpoints");
                        run.status = RunStatus::Failed;
                        run.finished_at = Some(Utc::now());
                        run.recommended_action = e.recommended_action();
                        run.error = Some(crate::secrets::scrub_known(&format!(
                            "taking in the results of an earlier run that did not finish: {e}"
                        )).into_owned());
                        self.metadata.commit_run(&run, None).await?;
                        self.finish_run(observer, &run).await;
                        done.push(run);
                    }
                }
            }
            if !runs.is_empty() {
                done.splice(0..0, self.run_leased(model, runs, full, observer).await?);
            }
            Ok(done)
        }
        .await;
        heartbeat.abort();
        for (mapping, run_id) in &leases {
            self.controls.unregister(run_id);
            if let Err(e) = self.metadata.release_lease(mapping, run_id).await {
                tracing::warn!(mapping, error = %e, "could not release the run's lease; it lapses by itself");
            }
        }
        result
    }

    /// Runs mappings of one model whose leases this process holds.
    async fn run_leased(
        &self,
        model: &str,
        runs: Vec<RunRecord>,
        full: bool,
        observer: &dyn RunObserver,
    ) -> Result<Vec<RunRecord>> {
        let template = self.template_values(model, runs[0].started_at).await?;
        let started = Instant::now();
        let run_ids: Vec<String> = runs.iter().map(|r| r.id.clone()).collect();
        let snapshot_run = run_ids[0].clone();
        let span = tracing::info_span!("extract", model, run_ids = ?run_ids);
        let stops: Vec<Shutdown> = runs.iter().map(|r| self.controls.register(&r.id)).collect();
        // A full resync also starts a new base: nothing of earlier snapshots is relied on.
        let base = full && runs.iter().all(|r| r.filter.is_none());
        // Runs that add every row to a destination publishing at the end are delivered while
        // the model is extracted (see `streamed`); the others once its snapshot has committed.
        let mut streamed = Vec::new();
        let mut after = Vec::new();
        for run in runs {
            if self.delivers_while_extracting(&run, full).await? {
                streamed.push(run);
            } else {
                after.push(run);
            }
        }
        let (extraction_tx, extraction_rx) = tokio::sync::watch::channel(streamed::ExtractionState::Running);
        let mut tees = Vec::new();
        let streaming: Vec<_> = streamed
            .into_iter()
            .map(|run| {
                let (tee, rows) = tokio::sync::mpsc::channel(streamed::BATCHES_IN_FLIGHT);
                tees.push(tee);
                self.deliver_while_extracting(run, rows, extraction_rx.clone(), observer)
            })
            .collect();
        let extraction = async {
            let extracted = self
                .extract(
                    model,
                    &snapshot_run,
                    &template,
                    Extraction {
                        stops: &stops,
                        base,
                        tees,
                    },
                    observer,
                )
                .instrument(span)
                .await
                .map(Arc::new);
            let extract_ms = started.elapsed().as_millis() as u64;
            let _ = extraction_tx.send(match &extracted {
                Ok(manifest) => streamed::ExtractionState::Committed(manifest.clone(), extract_ms),
                Err(_) => streamed::ExtractionState::Failed,
            });
            (extracted, extract_ms)
        };
        let ((extracted, extract_ms), streamed) =
            tokio::join!(extraction, futures::future::join_all(streaming));
        let mut done = Vec::new();
        for outcome in streamed {
            match outcome? {
                streamed::Outcome::Done(run) => done.push(run),
                // Recorded below, with the extraction's error.
                streamed::Outcome::ExtractionFailed(run) => after.push(run),
            }
        }
        let manifest = match extracted {
            Ok(manifest) => manifest,
            Err(e) => {
                let message = crate::secrets::scrub_known(&e.to_string()).into_owned();
                tracing::error!(model, error = %message, "extraction failed");
                let status = stopped_status(&e);
                for mut run in after {
                    run.status = status;
                    run.finished_at = Some(Utc::now());
                    run.timings.extract_ms = extract_ms;
                    run.error = Some(message.clone());
                    run.recommended_action = e.recommended_action();
                    self.metadata.commit_run(&run, None).await?;
                    self.finish_run(observer, &run).await;
                    done.push(run);
                }
                return Ok(in_order(done, &run_ids));
            }
        };
        for run in &mut after {
            run.snapshot_id = Some(manifest.id.clone());
            run.counts.extracted = manifest.rows;
            run.timings.extract_ms = extract_ms;
            // The snapshot is in use from now on (retention keeps snapshots of running runs).
            self.metadata.update_run(run).await?;
        }
        // The mappings of one model run at once: each holds its own lease and state, and their
        // diffs, rendering and requests share the cores (one waits on its destination while
        // another renders).
        let mappings = after.into_iter().map(|mut run| {
            let manifest = manifest.clone();
            async move {
                let config = self.project.config.mappings[&run.mapping].clone();
                // Every log line of the run carries its id and mapping.
                let span = tracing::info_span!("run", run_id = %run.id, mapping = %run.mapping, trigger = %run.trigger);
                let outcome = self
                    .run_mapping(&mut run, &config, manifest, full, observer, None)
                    .instrument(span)
                    .await;
                if let Err(e) = outcome {
                    self.record_stopped_run(&mut run, &e).await?;
                }
                self.finish_run(observer, &run).await;
                Ok::<_, EngineError>(run)
            }
        });
        for run in futures::future::join_all(mappings).await {
            done.push(run?);
        }
        // Results come back in the mappings' order.
        Ok(in_order(done, &run_ids))
    }

    /// Records a run that a failure, a shutdown or a cancellation stopped after extraction.
    async fn record_stopped_run(&self, run: &mut RunRecord, e: &EngineError) -> Result<()> {
        let message = crate::secrets::scrub_known(&e.to_string()).into_owned();
        run.status = stopped_status(e);
        if run.status == RunStatus::Interrupted {
            tracing::warn!(
                mapping = run.mapping,
                "run stopped at a checkpoint by a shutdown request"
            );
        } else if run.status == RunStatus::Cancelled {
            tracing::warn!(mapping = run.mapping, "run cancelled; stopped at a checkpoint");
        } else {
            tracing::error!(mapping = run.mapping, error = %message, "run failed");
        }
        run.finished_at = Some(Utc::now());
        run.recommended_action = e.recommended_action();
        run.error = Some(message);
        self.metadata.commit_run(run, None).await?;
        Ok(())
    }

    /// Computes what a run of `mapping` would send and writes it to `sink`: the model is
    /// extracted and diffed as in a run, but nothing is sent, no failed record is kept, and the
    /// mapping's baseline does not move. Returns the run as it would have been counted
    /// (`delivered` is what would be sent).
    pub async fn dry_run(
        &self,
        mapping: &str,
        full: bool,
        filter: Option<&str>,
        sink: &DryRunSink,
        observer: &dyn RunObserver,
    ) -> Result<RunRecord> {
        let config = self.mapping_config(mapping)?;
        let mut run = RunRecord::starting(mapping, &config.model, &config.destination, full);
        run.dry_run = true;
        run.filter = filter.map(str::to_string);
        self.dry_run_as(run, sink, observer).await
    }

    /// [`Engine::dry_run`] of a run already recorded as a dry run (by the API).
    pub async fn dry_run_as(
        &self,
        mut run: RunRecord,
        sink: &DryRunSink,
        observer: &dyn RunObserver,
    ) -> Result<RunRecord> {
        if let Some(filter) = &run.filter {
            check_filter(filter).map_err(EngineError::Usage)?;
        }
        let config = self.mapping_config(&run.mapping)?;
        let stop = self.controls.register(&run.id);
        let result = async {
            let template = self.template_values(&config.model, run.started_at).await?;
            let started = Instant::now();
            let manifest = self
                .extract(
                    &config.model,
                    &run.id,
                    &template,
                    Extraction {
                        stops: std::slice::from_ref(&stop),
                        base: run.full_resync && run.filter.is_none(),
                        tees: Vec::new(),
                    },
                    observer,
                )
                .await?;
            run.timings.extract_ms = started.elapsed().as_millis() as u64;
            run.snapshot_id = Some(manifest.id.clone());
            run.counts.extracted = manifest.rows;
            let full = run.full_resync;
            self.run_mapping(&mut run, &config, Arc::new(manifest), full, observer, Some(sink))
                .await
        }
        .await;
        self.controls.unregister(&run.id);
        result?;
        run.status = RunStatus::Succeeded;
        Ok(run)
    }

    /// Checks a backfill's filter before a run starts: one SQL expression and, when the model
    /// has a snapshot, a condition over its latest snapshot's columns.
    pub async fn check_backfill_filter(&self, model: &str, filter: &str) -> Result<()> {
        check_filter(filter).map_err(EngineError::Usage)?;
        let snapshots = self.snapshots.list_snapshots(model).await?;
        if let Some(latest) = snapshots.last() {
            let ctx = crate::diff::diff_context();
            let schema = crate::diff::snapshot_schema(&ctx, &self.snapshots, latest)
                .await
                .map_err(|source| EngineError::Diff {
                    mapping: model.to_string(),
                    source,
                })?;
            crate::diff::filter_expr(&schema, filter).map_err(|e| {
                EngineError::Usage(format!(
                    "the filter `{filter}` does not apply to model `{model}`'s columns: {e}"
                ))
            })?;
        }
        Ok(())
    }

    /// Extracts a model into a new committed snapshot without running any mapping: for
    /// snapshot history, and to measure extraction alone.
    pub async fn snapshot_model(&self, model: &str, observer: &dyn RunObserver) -> Result<SnapshotManifest> {
        if self.project.model(model).is_none() {
            return Err(EngineError::Unknown {
                kind: "model",
                name: model.to_string(),
                available: self.project.config.models.keys().cloned().collect(),
            });
        }
        let started_at = Utc::now();
        let template = self.template_values(model, started_at).await?;
        let id = format!("extract-{}", uuid::Uuid::now_v7());
        self.extract(model, &id, &template, Extraction::default(), observer)
            .await
    }

    /// The values a model's SQL template is rendered with: `last_sync_time` is the earliest
    /// previous successful run among the model's mappings (none if any never ran), so no
    /// mapping misses a row.
    pub async fn template_values(
        &self,
        model: &str,
        run_started_at: DateTime<Utc>,
    ) -> Result<TemplateValues> {
        let mut earliest: Option<DateTime<Utc>> = None;
        for (name, mapping) in &self.project.config.mappings {
            if mapping.model != model {
                continue;
            }
            match self.metadata.mapping_state(name).await? {
                Some(state) => {
                    earliest = Some(earliest.map_or(state.last_success_at, |t| t.min(state.last_success_at)));
                }
                None => {
                    earliest = None;
                    break;
                }
            }
        }
        Ok(TemplateValues {
            last_sync_time: earliest,
            run_started_at,
        })
    }

    /// The model's query as it runs now: its template rendered and its length checked.
    pub fn model_query(&self, model: &str, template: &TemplateValues) -> Result<ModelQuery> {
        let config = self.project.model(model).ok_or_else(|| EngineError::Unknown {
            kind: "model",
            name: model.to_string(),
            available: self.project.config.models.keys().cloned().collect(),
        })?;
        let limit_error = |message: String| SourceError::Limit {
            model: model.to_string(),
            message,
        };
        let sql = render_sql(&config.sql, template).map_err(limit_error)?;
        self.project
            .config
            .limits
            .check_query(&sql)
            .map_err(limit_error)?;
        Ok(ModelQuery::new(model, sql))
    }

    /// Streams the model's rows into a new committed snapshot. Stops when a shutdown is asked
    /// for, or when every run in `stops` is cancelled.
    async fn extract(
        &self,
        model: &str,
        run_id: &str,
        template: &TemplateValues,
        extraction: Extraction<'_>,
        observer: &dyn RunObserver,
    ) -> Result<SnapshotManifest> {
        let Extraction {
            stops,
            base,
            mut tees,
        } = extraction;
        let config = self
            .project
            .model(model)
            .ok_or_else(|| EngineError::Internal(format!("model `{model}` vanished")))?;
        let source = self.source(&config.source)?;
        observer.on_event(RunEvent::ExtractStarted {
            model: model.to_string(),
        });
        let mut query = self.model_query(model, template)?;
        query.bulk = true;
        let limits = self.project.config.limits;
        let max_records = config.max_records_per_run.unwrap_or(limits.max_records_per_run);
        let partitions = source.extract_partitions(&query).await?;
        let no_rows = |message: String| SourceError::Query {
            model: model.to_string(),
            source_name: config.source.clone(),
            message,
            hint: None,
        };
        let schema = partitions
            .first()
            .map(|p| p.schema())
            .ok_or_else(|| no_rows("the source returned no stream at all".to_string()))?;
        limits
            .check_schema(&schema)
            .map_err(|message| SourceError::Limit {
                model: model.to_string(),
                message,
            })?;
        let spec = SnapshotSpec {
            model: model.to_string(),
            run_id: run_id.to_string(),
            key_columns: config.primary_key.0.clone(),
            buckets: None,
        };
        let snapshot_error = |source| EngineError::Snapshot {
            model: model.to_string(),
            source,
        };
        // The latest snapshot is the parent: the new one stores only what changed since it
        // (when it qualifies; see `SnapshotWriter`). `base` writes every row again.
        let parent = if base {
            None
        } else {
            self.snapshots
                .list_snapshots(model)
                .await
                .map_err(snapshot_error)?
                .pop()
        };
        let mut writer = SnapshotWriter::new(self.snapshots.clone(), spec);
        if let Some(parent) = parent {
            writer = writer.with_parent(parent);
        }
        let empty = RecordBatch::new_empty(schema);
        match writer.write(empty.clone()).await {
            // The model's columns reach the mappings delivering meanwhile before any row.
            Ok(hashes) => streamed::hand_over(&mut tees, &empty, &hashes).await,
            Err(e) => {
                writer.abort().await;
                return Err(snapshot_error(e));
            }
        }
        // Started by the empty batch: the writer has loaded its parent's fingerprints (when it
        // is to be a delta), which the partitions' readers probe with.
        let mut rows =
            match partitions::PartitionedRows::new(partitions, &config.primary_key.0, writer.probe()) {
                Ok(rows) => rows,
                Err(message) => {
                    writer.abort().await;
                    return Err(no_rows(message).into());
                }
            };
        loop {
            if self.shutdown.is_requested() {
                writer.abort().await;
                return Err(EngineError::Interrupted(format!(
                    "stopped while extracting model `{model}`; nothing was sent"
                )));
            }
            if !stops.is_empty() && stops.iter().all(Shutdown::is_requested) {
                writer.abort().await;
                return Err(EngineError::Cancelled(format!(
                    "cancelled while extracting model `{model}`; nothing was sent"
                )));
            }
            let (batch, hashes) = match rows.next().await {
                None => break,
                Some(partitions::Extracted::Rows(batch, hashes)) => (batch, hashes),
                Some(partitions::Extracted::SourceFailed(e)) => {
                    writer.abort().await;
                    return Err(source_failure(model, &config.source, e).into());
                }
                Some(partitions::Extracted::HashFailed(e)) => {
                    writer.abort().await;
                    return Err(snapshot_error(e));
                }
            };
            match writer.write_hashed(batch.clone(), hashes).await {
                Ok(hashes) => streamed::hand_over(&mut tees, &batch, &hashes).await,
                Err(e) => {
                    writer.abort().await;
                    return Err(snapshot_error(e));
                }
            }
            if writer.rows_written() > max_records {
                writer.abort().await;
                return Err(SourceError::Limit {
                    model: model.to_string(),
                    message: format!(
                        "the query returned more than {max_records} rows (limits.max_records_per_run); filter the model, or raise `max_records_per_run` on it"
                    ),
                }
                .into());
            }
            observer.on_event(RunEvent::ExtractProgress {
                model: model.to_string(),
                rows: writer.rows_written(),
            });
        }
        let manifest = writer.commit().await.map_err(snapshot_error)?;
        tracing::info!(
            model,
            rows = manifest.rows,
            snapshot = manifest.id,
            "snapshot committed"
        );
        observer.on_event(RunEvent::ExtractFinished {
            model: model.to_string(),
            rows: manifest.rows,
            snapshot_id: manifest.id.clone(),
        });
        Ok(manifest)
    }

    /// Diffs, delivers and commits one mapping against an extracted snapshot.
    async fn run_mapping(
        &self,
        run: &mut RunRecord,
        config: &MappingConfig,
        manifest: Arc<SnapshotManifest>,
        full: bool,
        observer: &dyn RunObserver,
        dry_run: Option<&DryRunSink>,
    ) -> Result<()> {
        let mapping = run.mapping.clone();
        let destination = self.destination(&config.destination)?.clone();
        let state = self.metadata.mapping_state(&mapping).await?;
        let mut manifests: HashMap<String, Arc<SnapshotManifest>> = HashMap::new();
        manifests.insert(manifest.id.clone(), manifest.clone());
        // A plain backfill ignores the baseline; one with a filter diffs as usual, and sends the
        // matching rows again on top.
        let use_baseline = !full || run.filter.is_some();
        let baseline = match (&state, use_baseline) {
            (Some(state), true) => Some(
                self.load_baseline(&mapping, state, &manifest, &mut manifests)
                    .await?,
            ),
            _ => None,
        };
        if let Some(snapshot) = baseline.as_ref().and_then(|b| b.snapshot.as_ref()) {
            run.baseline_snapshot_id = Some(snapshot.id.clone());
            run.schema_change = manifest.schema_change_since(snapshot);
            if let Some(change) = &run.schema_change {
                tracing::info!(mapping, change, "the model's columns changed since the baseline");
            }
        }
        let diff_err = |source: DataFusionError| EngineError::Diff {
            mapping: mapping.clone(),
            source,
        };
        let stop = self.controls.register(&run.id);
        if stop.is_requested() {
            return Err(EngineError::Cancelled(format!(
                "mapping `{mapping}` was cancelled before it sent anything"
            )));
        }
        let mut differ = Differ::new(self.snapshots.clone(), manifest.clone(), baseline.clone())
            .await
            .map_err(diff_err)?;
        // Without a baseline there is no join to distribute (every row is added), so no cluster
        // is started or contacted.
        if baseline.is_some()
            && let Some(cluster) = self.diff_cluster(&mapping).await?
        {
            differ = differ.on_cluster(cluster);
        }
        if let Some(filter) = &run.filter {
            differ = differ.resend_matching(filter).await.map_err(|e| {
                EngineError::Usage(format!(
                    "mapping `{mapping}`: the backfill's filter `{filter}` does not apply to model `{}`'s columns: {e}",
                    run.model
                ))
            })?;
        }
        let model_schema = self.model_schema(&differ).await.map_err(diff_err)?;
        let action = self.action(&mapping);
        let plan = Arc::new(MappingPlan::compile(
            &mapping,
            config,
            &run.model,
            &model_schema,
            &manifest.key_columns,
            action,
        )?);
        let send: Vec<Op> = config.send.clone();
        let info = self.run_info(&mapping, config, run, dry_run.is_some());
        let writer = destination.open(&info).await?;
        let policy = writer.policy();
        let key_fields: Vec<arrow::datatypes::Field> = differ
            .change_schema()
            .fields()
            .iter()
            .take(manifest.key_columns.len())
            .map(|f| f.as_ref().clone())
            .collect();
        let state_rows = StateRows::new(key_fields.clone());
        let mut exceptions = ExceptionsWriter::new(self.snapshots.clone(), &mapping, &run.id, key_fields);
        // A dry run sends nothing, so it has nothing to checkpoint; nor has a run to a
        // destination that acknowledges records only when the run's session finishes.
        let checkpoints = (dry_run.is_none() && !writer.acknowledges_at_finish()).then(|| {
            Arc::new(CheckpointWriter::new(
                self.snapshots.clone(),
                &mapping,
                &run.id,
                &manifest.id,
                state_rows.clone(),
            ))
        });
        let mut delivery = Delivery {
            engine: self,
            run,
            plan: plan.clone(),
            writer: writer.as_ref(),
            destination: config.destination.clone(),
            policy: &policy,
            state_rows,
            exceptions: &mut exceptions,
            checkpoints,
            records_per_checkpoint: self.project.config.limits.records_per_checkpoint.max(1),
            failures: Vec::new(),
            first_failure: None,
            dry_run,
            stop,
            next_seq: 0,
        };
        let buckets = differ.buckets();
        tracing::info!(
            buckets,
            baseline = run_baseline_text(baseline.as_ref()),
            diff_engine = if differ.distributed() { "ballista" } else { "local" },
            "diffing and delivering"
        );
        observer.on_event(RunEvent::MappingStarted {
            mapping: mapping.clone(),
            model: delivery.run.model.clone(),
            buckets,
        });
        let outcome = delivery
            .all_buckets(&differ, &send, &manifests, observer, baseline.is_none())
            .await;
        let failures = delivery.take_failures();
        let session = DeliveredSession::after(outcome, writer, exceptions, failures, state).await?;
        if dry_run.is_some() {
            // Nothing was sent, so nothing is finished or committed.
            session.abort().await;
            run.finished_at = Some(Utc::now());
            return Ok(());
        }
        self.commit_session(run, &manifest.id, session).await
    }

    /// Finishes a run's destination session and commits the run: the mapping's baseline moves
    /// to `snapshot_id` plus the run's exceptions.
    async fn commit_session(
        &self,
        run: &mut RunRecord,
        snapshot_id: &str,
        session: DeliveredSession,
    ) -> Result<()> {
        let DeliveredSession {
            writer,
            exceptions,
            unrecorded_failures,
            first_failure,
            state,
        } = session;
        let mapping = run.mapping.clone();
        let started = Instant::now();
        if let Err(e) = writer.finish().await {
            exceptions.abort().await;
            return Err(e.into());
        }
        run.timings.deliver_ms += started.elapsed().as_millis() as u64;
        if !unrecorded_failures.is_empty() {
            self.metadata.add_failures(&run.id, &unrecorded_failures).await?;
        }
        let (exceptions_path, exceptions_rows) = match exceptions.finish().await? {
            Some((path, rows)) => (Some(path), rows),
            None => (None, 0),
        };
        run.status = if run.counts.failed > 0 {
            let first = first_failure.unwrap_or_default();
            let advice = crate::error::known_destination_action(&first)
                .map(|a| format!("{a}. "))
                .unwrap_or_default();
            run.recommended_action = Some(format!(
                "{advice}{} record(s) failed and will be sent again by every later run (the first: {}); `sluice failures {}` lists them with the destination's errors",
                run.counts.failed,
                first.chars().take(200).collect::<String>(),
                run.id
            ));
            RunStatus::Partial
        } else {
            RunStatus::Succeeded
        };
        run.finished_at = Some(Utc::now());
        // `{{last_sync_time}}` advances only past runs that left nothing undelivered, so a
        // templated window keeps returning a failed record until it is delivered.
        let last_success_at = if run.status == RunStatus::Succeeded && exceptions_rows == 0 {
            run.started_at
        } else {
            state
                .as_ref()
                .map_or(DateTime::<Utc>::UNIX_EPOCH, |s| s.last_success_at)
        };
        let new_state = MappingState {
            mapping: mapping.clone(),
            model: run.model.clone(),
            baseline_snapshot_id: Some(snapshot_id.to_string()),
            exceptions_path,
            exceptions_rows,
            last_run_id: run.id.clone(),
            last_success_at,
        };
        self.metadata.commit_run(run, Some(&new_state)).await?;
        tracing::info!(
            added = run.counts.added,
            updated = run.counts.updated,
            deleted = run.counts.deleted,
            delivered = run.counts.delivered,
            failed = run.counts.failed,
            "run committed"
        );
        // The checkpoints are part of the committed state now.
        self.remove_checkpoint_files(&mapping, &run.id).await;
        Ok(())
    }

    async fn remove_checkpoint_files(&self, mapping: &str, run_id: &str) {
        let dir = CheckpointWriter::dir(mapping, run_id);
        match self.snapshots.list(&dir).await {
            Ok(paths) => {
                for path in paths {
                    if let Err(e) = self.snapshots.delete(&path).await {
                        tracing::debug!(path, error = %e, "could not remove a checkpoint file; retention removes it later");
                    }
                }
            }
            Err(e) => tracing::debug!(dir, error = %e, "could not list checkpoint files"),
        }
    }

    /// Reports a finished run: metrics, alerts, and the observer.
    async fn finish_run(&self, observer: &dyn RunObserver, run: &RunRecord) {
        crate::metrics::run_finished(run);
        if let (Some(sender), Some(config)) = (
            &self.alert_sender,
            self.project.mapping(&run.mapping).and_then(|m| m.alerts.as_ref()),
        ) {
            let recent = match self.metadata.runs(Some(&run.mapping), 7).await {
                Ok(runs) => runs,
                Err(e) => {
                    tracing::warn!(mapping = run.mapping, error = %e, "cannot read recent runs for alerts");
                    Vec::new()
                }
            };
            let alerts = crate::alerts::evaluate(config, run, &recent);
            crate::alerts::send(sender, config, &alerts).await;
        }
        observer.on_event(RunEvent::MappingFinished {
            run: Box::new(run.clone()),
        });
    }

    /// Takes the checkpoints of earlier runs of `mapping` that never committed into the
    /// mapping's state (the caller holds the mapping's lease, so those runs are over).
    pub(crate) async fn recover(&self, mapping: &str, current_run: &str) -> Result<()> {
        for stopped in self.metadata.runs_to_recover(mapping, current_run).await? {
            let checkpoints = self.metadata.checkpoints(&stopped.id).await?;
            let intents: Vec<String> = self
                .snapshots
                .list(&CheckpointWriter::dir(mapping, &stopped.id))
                .await?
                .into_iter()
                .filter(|p| p.ends_with(crate::checkpoint::INTENT_SUFFIX))
                .collect();
            let state = self.metadata.mapping_state(mapping).await?;
            let folded = fold(&self.snapshots, state.as_ref(), &stopped, &checkpoints, &intents).await?;
            let acknowledged: u64 = checkpoints.iter().map(|c| c.acknowledged).sum();
            let note = if checkpoints.is_empty() {
                "it had delivered nothing".to_string()
            } else {
                format!(
                    "the {acknowledged} records it delivered up to its last checkpoint were kept; run {current_run} sends the rest"
                )
            };
            tracing::info!(
                mapping,
                run = stopped.id,
                acknowledged,
                "took in the checkpoints of a run that did not finish"
            );
            self.metadata
                .finish_recovery(&stopped.id, folded.as_ref(), &note)
                .await?;
            self.remove_checkpoint_files(mapping, &stopped.id).await;
        }
        Ok(())
    }

    /// The records of `outgoing` that must not be sent: those the mapping could not encode and
    /// those over a size limit (sluice's `limits`, or the destination's own per-record limit).
    pub(crate) fn blocked_records(
        &self,
        unsendable: Vec<crate::destination::RecordFailure>,
        outgoing: &crate::destination::OutgoingBatch,
        policy: &crate::destination::DeliveryPolicy,
    ) -> Vec<crate::destination::RecordFailure> {
        let mut blocked = unsendable;
        blocked.extend(self.project.config.limits.oversized_records(outgoing));
        if let Some(limit) = policy.max_record_bytes {
            blocked.extend((0..outgoing.len()).filter_map(|i| {
                let bytes = outgoing.bodies.get(i).len();
                (bytes > limit).then(|| crate::destination::RecordFailure {
                    index: i,
                    error: format!(
                        "the record is {bytes} bytes, more than the destination accepts in one record ({limit} bytes); the record was not sent"
                    ),
                })
            }));
        }
        blocked.sort_by_key(|f| f.index);
        blocked.dedup_by_key(|f| f.index);
        blocked
    }

    /// What a destination is told about a mapping's run.
    pub(crate) fn run_info(
        &self,
        mapping: &str,
        config: &MappingConfig,
        run: &RunRecord,
        dry_run: bool,
    ) -> RunInfo {
        RunInfo {
            run_id: run.id.clone(),
            mapping: mapping.to_string(),
            model: run.model.clone(),
            started_at: run.started_at,
            primary_key: self
                .project
                .model(&config.model)
                .map(|m| m.primary_key.0.clone())
                .unwrap_or_default(),
            action: config.action.clone(),
            mode: config.mode.unwrap_or_default(),
            options: config.options.clone(),
            dry_run,
        }
    }

    /// The mapping's committed baseline, checked against the new snapshot.
    async fn load_baseline(
        &self,
        mapping: &str,
        state: &MappingState,
        manifest: &SnapshotManifest,
        manifests: &mut HashMap<String, Arc<SnapshotManifest>>,
    ) -> Result<Baseline> {
        let incompatible = |reason: String| EngineError::IncompatibleBaseline {
            mapping: mapping.to_string(),
            reason,
        };
        if state.model != manifest.model {
            return Err(incompatible(format!(
                "it was sent from model `{}`, and the mapping now uses model `{}`",
                state.model, manifest.model
            )));
        }
        let snapshot = match &state.baseline_snapshot_id {
            Some(id) => {
                let snapshot = self
                    .snapshots
                    .snapshot(&state.model, id)
                    .await
                    .map_err(|e| incompatible(e.to_string()))?;
                if snapshot.key_columns != manifest.key_columns {
                    return Err(incompatible(format!(
                        "the primary key changed from ({}) to ({})",
                        snapshot.key_columns.join(", "),
                        manifest.key_columns.join(", ")
                    )));
                }
                let snapshot = Arc::new(snapshot);
                manifests.insert(snapshot.id.clone(), snapshot.clone());
                Some(snapshot)
            }
            None => None,
        };
        if let Some(path) = &state.exceptions_path {
            // Deleted records may need rows from older snapshots the exceptions point at.
            let ids = crate::exceptions::referenced_snapshot_ids(&self.snapshots, path)
                .await
                .map_err(|e| incompatible(e.to_string()))?;
            for id in ids {
                if !manifests.contains_key(&id)
                    && let Ok(old) = self.snapshots.snapshot(&state.model, &id).await
                {
                    manifests.insert(id, Arc::new(old));
                }
            }
        }
        Ok(Baseline {
            snapshot,
            exceptions: state.exceptions_path.clone(),
        })
    }

    /// The Ballista session diffs run on, when `diff.engine` is `ballista`.
    async fn diff_cluster(&self, mapping: &str) -> Result<Option<datafusion::prelude::SessionContext>> {
        let config = &self.project.config.diff;
        match config.engine {
            crate::config::DiffEngineKind::Local => Ok(None),
            #[cfg(feature = "ballista")]
            crate::config::DiffEngineKind::Ballista => crate::ballista::session(config, &self.snapshots)
                .await
                .map(Some)
                .map_err(|source| EngineError::Diff {
                    mapping: mapping.to_string(),
                    source,
                }),
            #[cfg(not(feature = "ballista"))]
            crate::config::DiffEngineKind::Ballista => Err(EngineError::Usage(format!(
                "mapping `{mapping}`: `diff.engine` is `ballista`, and this sluice was built without Ballista (cargo feature `ballista`, on by default)"
            ))),
        }
    }

    /// The model's columns (the snapshot's schema without sluice's row hash).
    async fn model_schema(&self, differ: &Differ) -> std::result::Result<Schema, DataFusionError> {
        let ctx = crate::diff::diff_context();
        let schema = crate::diff::snapshot_schema(&ctx, &self.snapshots, differ.new_snapshot()).await?;
        Ok(Schema::new(
            schema
                .fields()
                .iter()
                .filter(|f| f.name() != ROW_HASH_COLUMN)
                .cloned()
                .collect::<Vec<_>>(),
        ))
    }
}

/// Batches a changed-rows stream reads ahead of its delivery.
const READ_AHEAD_BATCHES: usize = 4;

/// Reads `rows` on a task of its own, up to [`READ_AHEAD_BATCHES`] batches ahead of whoever
/// consumes the stream returned: the next bucket's rows are read (a deleted record's last
/// values are a scan of its layer's bucket) while the current bucket is delivered. A reading
/// task that stops without finishing ends the stream with an error, never early.
fn read_ahead(
    mut rows: datafusion::execution::SendableRecordBatchStream,
) -> datafusion::execution::SendableRecordBatchStream {
    let schema = rows.schema();
    let (tx, rx) = tokio::sync::mpsc::channel::<std::result::Result<Option<RecordBatch>, DataFusionError>>(
        READ_AHEAD_BATCHES,
    );
    tokio::spawn(
        async move {
            while let Some(batch) = rows.next().await {
                let failed = batch.is_err();
                if tx.send(batch.map(Some)).await.is_err() || failed {
                    return;
                }
            }
            let _ = tx.send(Ok(None)).await;
        }
        .in_current_span(),
    );
    let batches = futures::stream::unfold(Some(rx), |rx| async move {
        let mut rx = rx?;
        match rx.recv().await {
            Some(Ok(Some(batch))) => Some((Ok(batch), Some(rx))),
            Some(Ok(None)) => None,
            Some(Err(e)) => Some((Err(e), None)),
            None => Some((
                Err(DataFusionError::Execution(
                    "reading the changed rows stopped before their end".into(),
                )),
                None,
            )),
        }
    });
    Box::pin(datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(
        schema, batches,
    ))
}

/// `runs` in the order of `ids`.
fn in_order(mut runs: Vec<RunRecord>, ids: &[String]) -> Vec<RunRecord> {
    runs.sort_by_key(|run| ids.iter().position(|id| *id == run.id));
    runs
}

/// A baseline as a log field.
fn run_baseline_text(baseline: Option<&crate::diff::Baseline>) -> String {
    match baseline {
        None => "none (every row is added)".into(),
        Some(b) => format!(
            "{}{}",
            b.snapshot.as_ref().map_or("no snapshot", |s| s.id.as_str()),
            if b.exceptions.is_some() {
                " with exceptions"
            } else {
                ""
            }
        ),
    }
}

/// How a run that stopped on `error` ends: interrupted when a shutdown stopped it, else failed.
/// Either way its checkpoints stand, and the next run takes them in.
fn stopped_status(error: &EngineError) -> RunStatus {
    match error {
        EngineError::Interrupted(_) => RunStatus::Interrupted,
        EngineError::Cancelled(_) => RunStatus::Cancelled,
        _ => RunStatus::Failed,
    }
}

/// Turns an error met while streaming a model's rows into the source's own words.
fn source_failure(model: &str, source_name: &str, error: DataFusionError) -> SourceError {
    let mut current: &(dyn std::error::Error + 'static) = &error;
    loop {
        if let Some(source_error) = current.downcast_ref::<SourceError>() {
            return source_error.clone();
        }
        match current.source() {
            Some(next) => current = next,
            None => break,
        }
    }
    SourceError::Query {
        model: model.to_string(),
        source_name: source_name.to_string(),
        message: error.to_string(),
        hint: None,
    }
}

/// One mapping's delivery in progress.
struct Delivery<'a> {
    engine: &'a Engine,
    run: &'a mut RunRecord,
    plan: Arc<MappingPlan>,
    writer: &'a dyn DestinationWriter,
    destination: String,
    policy: &'a crate::destination::DeliveryPolicy,
    state_rows: StateRows,
    exceptions: &'a mut ExceptionsWriter,
    /// `None` for a dry run, and for a destination that acknowledges records only when the
    /// run's session finishes. (Shared with the preparation of the next batch, which writes its
    /// intent while this one is sent.)
    checkpoints: Option<Arc<CheckpointWriter>>,
    records_per_checkpoint: usize,
    /// Failed records not yet written to the metadata store (they go with the next checkpoint).
    failures: Vec<FailureRow>,
    /// The first error a record failed with, for the run's recommended action.
    first_failure: Option<String>,
    /// Set for `--dry-run`: requests are written here instead of being sent.
    dry_run: Option<&'a DryRunSink>,
    /// This run's stop switch (a cancellation).
    stop: Shutdown,
    /// Sequence number of the next batch prepared (its intent and checkpoint files).
    next_seq: i64,
}

/// How a model is extracted for its runs.
#[derive(Default)]
struct Extraction<'a> {
    /// The stop switches of the runs it is for: it stops once every one is flipped.
    stops: &'a [Shutdown],
    /// Write a base snapshot, relying on nothing earlier (a full resync).
    base: bool,
    /// The runs delivering while it extracts, each handed every batch.
    tees: Vec<streamed::Tee>,
}

/// A destination session whose records have all been handed over, waiting to be finished and
/// committed.
struct DeliveredSession {
    writer: Box<dyn DestinationWriter>,
    exceptions: ExceptionsWriter,
    /// Failed records no checkpoint carried (a run without commit points before its end).
    unrecorded_failures: Vec<FailureRow>,
    /// The first error a record failed with.
    first_failure: Option<String>,
    /// The mapping's state when the run started.
    state: Option<MappingState>,
}

impl DeliveredSession {
    /// The session a delivery left, with the delivery's failures ([`Delivery::take_failures`]);
    /// abandoned, and the delivery's error returned, when `outcome` is one.
    async fn after(
        outcome: Result<()>,
        writer: Box<dyn DestinationWriter>,
        exceptions: ExceptionsWriter,
        (first_failure, unrecorded_failures): (Option<String>, Vec<FailureRow>),
        state: Option<MappingState>,
    ) -> Result<Self> {
        let session = Self {
            writer,
            exceptions,
            unrecorded_failures,
            first_failure,
            state,
        };
        match outcome {
            Ok(()) => Ok(session),
            Err(e) => {
                session.abort().await;
                Err(e)
            }
        }
    }

    /// Abandons the session: nothing it wrote becomes visible.
    async fn abort(self) {
        self.writer.abort().await;
        self.exceptions.abort().await;
    }
}

/// A batch ready to send: its records rendered, those that cannot be sent set aside, and the
/// records it adds written to its intent file.
struct PreparedBatch {
    seq: i64,
    batch: RecordBatch,
    outgoing: crate::destination::OutgoingBatch,
    blocked: Vec<crate::destination::RecordFailure>,
    render_ms: u64,
    intent_ms: u64,
}

/// What preparing a batch needs: nothing the sending of the previous batch changes, so the two
/// run at once.
#[derive(Clone)]
struct Preparer<'a> {
    engine: &'a Engine,
    plan: Arc<MappingPlan>,
    policy: &'a crate::destination::DeliveryPolicy,
    /// What the destination session reads of each record (JSON bodies are rendered only when
    /// it reads them).
    payload: crate::destination::Payload,
    checkpoints: Option<&'a CheckpointWriter>,
}

impl Preparer<'_> {
    async fn prepare(&self, seq: i64, batch: RecordBatch) -> Result<PreparedBatch> {
        let internal = |what: &str| EngineError::Internal(format!("materialised rows lack {what}"));
        let ops_array = batch
            .column_by_name(OP)
            .and_then(|a| a.as_primitive_opt::<UInt8Type>())
            .ok_or_else(|| internal(OP))?;
        let new_hash = batch.column_by_name(NEW_HASH).ok_or_else(|| internal(NEW_HASH))?;
        let new_hash = new_hash
            .as_primitive_opt::<UInt64Type>()
            .ok_or_else(|| internal(NEW_HASH))?;
        let base_hash = batch
            .column_by_name(BASE_HASH)
            .ok_or_else(|| internal(BASE_HASH))?;
        let base_hash = base_hash
            .as_primitive_opt::<UInt64Type>()
            .ok_or_else(|| internal(BASE_HASH))?;
        let mut ops = Vec::with_capacity(batch.num_rows());
        let mut hashes = Vec::with_capacity(batch.num_rows());
        for i in 0..batch.num_rows() {
            let op = Op::from_code(ops_array.value(i)).ok_or_else(|| internal("a valid op"))?;
            ops.push(op);
            // A deleted record is identified by the state the destination has.
            hashes.push(if op == Op::Deleted {
                base_hash.value(i)
            } else {
                new_hash.value(i)
            });
        }
        // Rendering is the CPU-heavy part of a batch: it runs on a blocking thread, so it uses a
        // second core while the previous batch's request and checkpoint are in flight.
        let plan = self.plan.clone();
        let payload = self.payload;
        let (batch, encoded, render_ms) = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let encoded = plan.encode_for(&batch, ops, &hashes, payload);
            (batch, encoded, started.elapsed().as_millis() as u64)
        })
        .await
        .map_err(|e| EngineError::Internal(format!("rendering a batch stopped: {e}")))?;
        let encoded = encoded?;
        let outgoing = encoded.records;
        // Records that cannot be sent (no identifier, over a size limit) fail alone, unsent;
        // the rest of the batch goes on.
        let blocked = self
            .engine
            .blocked_records(encoded.unsendable, &outgoing, self.policy);
        let started = Instant::now();
        if let Some(checkpoints) = self.checkpoints {
            // What this batch adds is uncertain at the destination until its checkpoint.
            let adding: Vec<usize> = (0..outgoing.len())
                .filter(|i| outgoing.ops[*i] == Op::Added)
                .filter(|i| blocked.binary_search_by_key(i, |f| f.index).is_err())
                .collect();
            checkpoints.write_intent(seq, &batch, &adding).await?;
        }
        Ok(PreparedBatch {
            seq,
            batch,
            outgoing,
            blocked,
            render_ms,
            intent_ms: started.elapsed().as_millis() as u64,
        })
    }
}

/// A stream of materialised rows cut into batches of at most `size` records (commit points).
struct Batches {
    stream: futures::stream::BoxStream<'static, Result<RecordBatch>>,
    current: Option<RecordBatch>,
    offset: usize,
    size: usize,
    read_ms: u64,
}

impl Batches {
    async fn next(&mut self) -> Result<Option<RecordBatch>> {
        loop {
            if let Some(batch) = &self.current {
                if self.offset < batch.num_rows() {
                    let length = self.size.min(batch.num_rows() - self.offset);
                    let slice = batch.slice(self.offset, length);
                    self.offset += length;
                    return Ok(Some(slice));
                }
                self.current = None;
            }
            let started = Instant::now();
            let next = self.stream.try_next().await?;
            self.read_ms += started.elapsed().as_millis() as u64;
            match next {
                Some(batch) => {
                    self.current = Some(batch);
                    self.offset = 0;
                }
                None => return Ok(None),
            }
        }
    }
}

impl Delivery<'_> {
    async fn all_buckets(
        &mut self,
        differ: &Differ,
        send: &[Op],
        manifests: &HashMap<String, Arc<SnapshotManifest>>,
        observer: &dyn RunObserver,
        everything_added: bool,
    ) -> Result<()> {
        let buckets = differ.buckets();
        let mapping = self.run.mapping.clone();
        let diff_err = |source: DataFusionError| EngineError::Diff {
            mapping: mapping.clone(),
            source,
        };
        let mut changes = ChangeCounts::default();
        if everything_added {
            // First run or full resync: no join, every row of the snapshot is added.
            changes.added = differ.new_snapshot().rows;
            self.run.counts.added = changes.added;
            if !send.contains(&Op::Added) {
                self.run.counts.skipped += changes.added;
                return Ok(());
            }
            for bucket in 0..buckets {
                if let Some(stream) = differ.all_added(bucket).await.map_err(&diff_err)? {
                    let span = tracing::info_span!("deliver", bucket);
                    self.deliver_stream(stream).instrument(span).await?;
                }
                self.progress(observer, bucket + 1, buckets, changes);
            }
            return Ok(());
        }
        // Diffs of the next buckets run (in parallel, on their own tasks) while the current
        // bucket is delivered, and so do the first reads of their changed rows.
        let parallelism = crate::diff::parallelism();
        let manifests = Arc::new(manifests.clone());
        let ops: Arc<[Op]> = send.into();
        let mut diffs = futures::stream::iter(0..buckets)
            .map(|bucket| {
                let differ = differ.clone();
                let manifests = manifests.clone();
                let ops = ops.clone();
                async move {
                    let started = Instant::now();
                    // The diff runs on its own task; the span carries the run's fields there.
                    let span = tracing::info_span!("diff", bucket);
                    let result = tokio::spawn(
                        async move {
                            let changes = differ.changes(bucket).await?;
                            let rows = if ChangeCounts::of(&changes).total() > 0 {
                                let lookup = |id: &str| manifests.get(id).cloned();
                                let streams = differ.materialize(bucket, &changes, &ops, &lookup).await?;
                                streams.into_iter().map(read_ahead).collect()
                            } else {
                                Vec::new()
                            };
                            Ok((changes, rows))
                        }
                        .instrument(span),
                    )
                    .await
                    .map_err(|e| DataFusionError::External(Box::new(e)))
                    .and_then(|r| r);
                    (bucket, started.elapsed(), result)
                }
            })
            .buffered(parallelism);
        while let Some((bucket, elapsed, result)) = diffs.next().await {
            self.check_stop()?;
            self.run.timings.diff_ms += elapsed.as_millis() as u64;
            let (bucket_changes, streams) = result.map_err(&diff_err)?;
            let counts = ChangeCounts::of(&bucket_changes);
            changes.add(counts);
            self.run.counts.added = changes.added;
            self.run.counts.updated = changes.updated;
            self.run.counts.deleted = changes.deleted;
            for (op, n) in [
                (Op::Added, counts.added),
                (Op::Updated, counts.updated),
                (Op::Deleted, counts.deleted),
            ] {
                if !send.contains(&op) {
                    self.run.counts.skipped += n;
                }
            }
            for stream in streams {
                let span = tracing::info_span!("deliver", bucket);
                self.deliver_stream(stream).instrument(span).await?;
            }
            self.progress(observer, bucket + 1, buckets, changes);
        }
        Ok(())
    }

    /// Between two commit points: stop when a shutdown or a cancellation was asked for.
    fn check_stop(&self) -> Result<()> {
        let handled = self.run.counts.delivered + self.run.counts.failed;
        if self.engine.shutdown.is_requested() {
            return Err(EngineError::Interrupted(format!(
                "mapping `{}` stopped after {handled} records; they are kept, and the next run sends the rest",
                self.run.mapping,
            )));
        }
        if self.stop.is_requested() {
            return Err(EngineError::Cancelled(format!(
                "mapping `{}` was cancelled after {handled} records; they are kept, and the next run sends the rest",
                self.run.mapping,
            )));
        }
        Ok(())
    }

    fn progress(&self, observer: &dyn RunObserver, buckets_done: u32, buckets: u32, changes: ChangeCounts) {
        observer.on_event(RunEvent::MappingProgress {
            mapping: self.run.mapping.clone(),
            buckets_done,
            buckets,
            changes,
            delivered: self.run.counts.delivered,
            failed: self.run.counts.failed,
        });
    }

    /// Delivers a stream of materialised rows, a batch (commit point) at a time, as a pipeline:
    /// while batch n is sent and checkpointed, batch n+1 is read, rendered and its intent
    /// written. Batch n+1 is sent only once checkpoint n is committed, so a run stopped or
    /// killed at any point sends at most one batch again.
    async fn deliver_stream(
        &mut self,
        stream: datafusion::execution::SendableRecordBatchStream,
    ) -> Result<()> {
        let mapping = self.run.mapping.clone();
        let stream = stream.map_err(move |source| EngineError::Diff {
            mapping: mapping.clone(),
            source,
        });
        let mut batches = Batches {
            stream: Box::pin(stream),
            current: None,
            offset: 0,
            size: self.records_per_checkpoint,
            read_ms: 0,
        };
        let checkpoints = self.checkpoints.clone();
        let preparer = Preparer {
            engine: self.engine,
            plan: self.plan.clone(),
            policy: self.policy,
            payload: self.writer.payload(),
            checkpoints: checkpoints.as_deref(),
        };
        let outcome = async {
            let Some(first) = batches.next().await? else {
                return Ok(());
            };
            let mut ready = preparer.prepare(self.take_seq(), first).await?;
            loop {
                // A batch is a commit point; a shutdown stops the run between two of them.
                self.check_stop()?;
                let seq = self.take_seq();
                let next = async {
                    match batches.next().await? {
                        Some(batch) => preparer.prepare(seq, batch).await.map(Some),
                        None => Ok(None),
                    }
                };
                let span = tracing::info_span!("batch", records = ready.batch.num_rows());
                let (sent, next) = tokio::join!(self.send_batch(ready).instrument(span), next);
                sent?;
                match next? {
                    Some(prepared) => ready = prepared,
                    None => return Ok(()),
                }
            }
        }
        .await;
        self.run.timings.read_ms += batches.read_ms;
        outcome
    }

    /// The first error a record failed with, and the failed records no checkpoint carried (a
    /// run without commit points before its end), taken once the delivery is over.
    fn take_failures(&mut self) -> (Option<String>, Vec<FailureRow>) {
        (self.first_failure.take(), std::mem::take(&mut self.failures))
    }

    fn take_seq(&mut self) -> i64 {
        self.next_seq += 1;
        self.next_seq - 1
    }

    /// Sends a prepared batch and commits its checkpoint.
    async fn send_batch(&mut self, prepared: PreparedBatch) -> Result<()> {
        let PreparedBatch {
            seq,
            batch,
            outgoing,
            blocked,
            render_ms,
            intent_ms,
        } = prepared;
        let batch = &batch;
        self.run.timings.render_ms += render_ms;
        self.run.timings.checkpoint_ms += intent_ms;
        let blocked_count = blocked.len() as u64;
        if let Some(sink) = self.dry_run {
            return self.write_dry_run(sink, &outgoing, &blocked).await;
        }
        let started = Instant::now();
        let delivered = if blocked.is_empty() {
            deliver(self.writer, &outgoing, self.policy).await
        } else {
            let kept: Vec<usize> = (0..outgoing.len())
                .filter(|i| blocked.binary_search_by_key(i, |f| f.index).is_err())
                .collect();
            deliver(self.writer, &outgoing.select(&kept)?, self.policy)
                .await
                .map(|mut result| {
                    for failure in &mut result.failures {
                        failure.index = kept[failure.index];
                    }
                    result.failures.extend(blocked);
                    result
                })
        };
        // Records that had failed before: attempts above zero.
        let retried = batch
            .column_by_name(crate::diff::ATTEMPTS)
            .and_then(|a| arrow::compute::cast(a, &arrow::datatypes::DataType::Int64).ok())
            .and_then(|a| arrow::compute::kernels::cmp::gt(&a, &arrow::array::Int64Array::new_scalar(0)).ok())
            .map_or(0, |earlier| earlier.true_count() as u64);
        let mut result = delivered.map_err(|stopped| crate::error::DestinationError::Failed {
            destination: self.destination.clone(),
            message: format!(
                "{}; the run stopped, and every record it did not deliver will be sent again by the next run",
                stopped.reason
            ),
        })?;
        if result.retries + result.rate_limited > 0 {
            crate::metrics::delivery_waits(
                &self.destination,
                result.retries as u64,
                result.rate_limited as u64,
            );
            tracing::debug!(
                mapping = self.run.mapping,
                retries = result.retries,
                rate_limited = result.rate_limited,
                "requests were sent again"
            );
        }
        result.failures.sort_by_key(|f| f.index);
        result.failures.dedup_by_key(|f| f.index);
        // A rejection may quote a credential the destination was sent; what is kept (failure
        // samples, the exceptions queryable with SQL, the run's first failure) must not.
        for failure in &mut result.failures {
            if let std::borrow::Cow::Owned(scrubbed) = crate::secrets::scrub_known(&failure.error) {
                failure.error = scrubbed;
            }
        }
        self.run.timings.deliver_ms += started.elapsed().as_millis() as u64;
        let failed = result.failures.len() as u64;
        self.run.counts.sent += outgoing.len() as u64 - blocked_count;
        self.run.counts.delivered += outgoing.len() as u64 - failed;
        self.run.counts.failed += failed;
        self.run.counts.retried += retried;
        let failed_rows = if result.failures.is_empty() {
            None
        } else {
            let failed_records: Vec<FailedRecord> = result
                .failures
                .iter()
                .map(|f| FailedRecord {
                    row: f.index,
                    error: f.error.clone(),
                })
                .collect();
            let now = Utc::now();
            if self.first_failure.is_none() {
                self.first_failure = result.failures.first().map(|f| f.error.clone());
            }
            let (rows, attempts) = self.state_rows.failed(batch, &failed_records, now)?;
            self.exceptions.write(&rows).await?;
            for (failure, (attempts, first_failed_at)) in result.failures.iter().zip(attempts) {
                self.failures.push(FailureRow {
                    record_key: String::from_utf8_lossy(outgoing.keys.get(failure.index)).into_owned(),
                    op: outgoing.ops[failure.index].as_str().to_string(),
                    error: failure.error.clone(),
                    attempts,
                    first_failed_at,
                    last_failed_at: now,
                    payload: Some(sample_payload(&outgoing.readable_record(failure.index))),
                });
            }
            Some(rows)
        };
        // The batch's commit point.
        let acknowledged: Vec<usize> = {
            let mut failed_at = result.failures.iter().map(|f| f.index).peekable();
            (0..outgoing.len())
                .filter(|i| {
                    if failed_at.peek() == Some(i) {
                        failed_at.next();
                        false
                    } else {
                        true
                    }
                })
                .collect()
        };
        if let Some(checkpoints) = &self.checkpoints {
            let started = Instant::now();
            let checkpoint = checkpoints
                .write(seq, batch, &acknowledged, failed_rows.as_ref())
                .await?;
            let failures = std::mem::take(&mut self.failures);
            self.engine
                .metadata
                .checkpoint(self.run, &checkpoint, &failures)
                .await?;
            self.run.timings.checkpoint_ms += started.elapsed().as_millis() as u64;
        }
        Ok(())
    }

    /// Writes the requests a batch would be sent as, and the records that would fail unsent.
    async fn write_dry_run(
        &mut self,
        sink: &DryRunSink,
        outgoing: &crate::destination::OutgoingBatch,
        blocked: &[crate::destination::RecordFailure],
    ) -> Result<()> {
        let kept: Vec<usize> = (0..outgoing.len())
            .filter(|i| blocked.binary_search_by_key(i, |f| f.index).is_err())
            .collect();
        let sendable = outgoing.select(&kept)?;
        // Grouped by action as the delivery layer groups them.
        let mut lines = Vec::new();
        for (_, indices) in sendable.action_groups() {
            let group = sendable.select(&indices)?;
            for range in crate::delivery::request_ranges(&group, self.policy) {
                for request in self.writer.prepare(&group, range).await {
                    lines.push(serde_json::json!({ "request": request }));
                }
            }
        }
        for failure in blocked {
            let key: serde_json::Value =
                serde_json::from_slice(outgoing.keys.get(failure.index)).unwrap_or(serde_json::Value::Null);
            lines.push(serde_json::json!({
                "unsent": {
                    "key": key,
                    "op": outgoing.ops[failure.index].as_str(),
                    "error": failure.error,
                }
            }));
        }
        self.run.counts.delivered += kept.len() as u64;
        self.run.counts.failed += blocked.len() as u64;
        sink.write(&lines)
            .map_err(|e| EngineError::Internal(format!("writing the dry run's output: {e}")))
    }
}

/// A failed record's payload as kept for the failures list: the first 4 KiB.
fn sample_payload(body: &[u8]) -> String {
    const LIMIT: usize = 4096;
    let text = String::from_utf8_lossy(body);
    if text.len() <= LIMIT {
        return text.into_owned();
    }
    let mut end = LIMIT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Keeps a run's leases alive (every third of their lifetime) and passes on cancellations
/// asked for in the metadata store (by the API of this process or another), every few seconds.
async fn heartbeat(
    metadata: crate::metadata::MetadataStore,
    controls: Arc<RunControls>,
    leases: Vec<(String, String)>,
) {
    let ttl = metadata.lease_ttl();
    let tick = (ttl / 4).min(std::time::Duration::from_secs(5));
    let run_ids: Vec<String> = leases.iter().map(|(_, id)| id.clone()).collect();
    let mut since_renewal = std::time::Duration::ZERO;
    loop {
        tokio::time::sleep(tick).await;
        since_renewal += tick;
        if since_renewal >= ttl / 3 {
            since_renewal = std::time::Duration::ZERO;
            for (mapping, run_id) in &leases {
                match metadata.renew_lease(mapping, run_id).await {
                    Ok(true) => {}
                    // Its next commit point fails with `LeaseLost` and stops the run.
                    Ok(false) => tracing::warn!(
                        mapping,
                        run_id,
                        "the run's lease lapsed and another run took the mapping over"
                    ),
                    Err(e) => tracing::warn!(mapping, error = %e, "could not renew the run's lease"),
                }
            }
        }
        match metadata.cancel_requests(&run_ids).await {
            Ok(cancelled) => {
                for run_id in cancelled {
                    controls.cancel(&run_id);
                }
            }
            Err(e) => tracing::debug!(error = %e, "could not read cancellation requests"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbers(from: i64, n: i64) -> RecordBatch {
        RecordBatch::try_from_iter(vec![(
            "n",
            Arc::new(arrow::array::Int64Array::from_iter_values(from..from + n)) as arrow::array::ArrayRef,
        )])
        .unwrap()
    }

    #[tokio::test]
    async fn rows_read_ahead_come_whole_or_end_in_an_error() {
        use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
        let schema = numbers(0, 0).schema();
        // Twenty batches through a channel of four: every one arrives, in order.
        let batches: Vec<_> = (0..20).map(|i| Ok(numbers(i * 10, 10))).collect();
        let whole = read_ahead(Box::pin(RecordBatchStreamAdapter::new(
            schema.clone(),
            futures::stream::iter(batches),
        )));
        let read: Vec<RecordBatch> = whole.try_collect().await.unwrap();
        let values: Vec<i64> = read
            .iter()
            .flat_map(|b| {
                b.column(0)
                    .as_primitive::<arrow::datatypes::Int64Type>()
                    .values()
                    .to_vec()
            })
            .collect();
        assert_eq!(values, (0..200).collect::<Vec<_>>());

        // A reading task that dies part way (a panic here) does not pass for a short stream.
        let dying = futures::stream::iter(0..3).map(|i| {
            assert!(i < 2, "the reader stops");
            Ok(numbers(i, 1))
        });
        let cut = read_ahead(Box::pin(RecordBatchStreamAdapter::new(schema.clone(), dying)));
        let outcome: std::result::Result<Vec<RecordBatch>, _> = cut.try_collect().await;
        let error = outcome.expect_err("a short stream").to_string();
        assert!(error.contains("stopped before their end"), "{error}");

        // An error is passed on as it is.
        let failing = futures::stream::iter(vec![
            Ok(numbers(0, 1)),
            Err(DataFusionError::Execution("disk gone".into())),
        ]);
        let failed = read_ahead(Box::pin(RecordBatchStreamAdapter::new(schema, failing)));
        let outcome: std::result::Result<Vec<RecordBatch>, _> = failed.try_collect().await;
        assert!(outcome.expect_err("an error").to_string().contains("disk gone"));
    }

    #[test]
    fn a_filter_is_one_expression_without_subqueries() {
        assert!(check_filter("plan = 'pro' AND country IN ('FR', 'DE')").is_ok());
        assert!(check_filter("lead_score > 50 OR email LIKE '%@example.com'").is_ok());
        // Words inside literals are only text.
        assert!(check_filter("note = 'please select one'").is_ok());
        for refused in [
            "",
            "   ",
            "plan = 'pro'; DROP TABLE users",
            "plan = 'pro' UNION SELECT 1",
            "id IN (SELECT id FROM users)",
            "EXISTS (SELECT 1)",
            "plan = 'pro' AND lead_score > (SELECT 1)",
            "plan = ",
        ] {
            assert!(check_filter(refused).is_err(), "{refused:?} was accepted");
        }
        assert!(check_filter(&"a".repeat(5000)).is_err());
    }

    #[test]
    fn run_controls_stop_registered_runs_only() {
        let controls = RunControls::default();
        let stop = controls.register("r1");
        assert!(!controls.cancel("r2"));
        assert!(controls.cancel("r1"));
        assert!(stop.is_requested());
        controls.unregister("r1");
        assert!(controls.get("r1").is_none());
    }
}
