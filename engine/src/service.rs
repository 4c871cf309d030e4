//! The control plane: what `sluice serve` runs and its HTTP API drives. It holds the engine of
//! the moment and builds a new one when a definition changes (here, or in another process
//! sharing the metadata store), so runs in flight keep the engine they started with while new
//! runs and the scheduler take the new one. Triggered runs and schedules go through
//! [`Engine::claim`] and [`Engine::execute`], as `sluice run` does; nothing is done a second way.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::catalog::{CatalogState, Kind, Origin, StoredDefinition};
use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::metadata::{RunRecord, RunStatus, Trigger};
use crate::run::{DryRunSink, RunObserver, RunRequest};
use crate::scheduler::{Due, Scheduler};
use crate::source::ConnectorFactory;

/// How often API reads look for changes other processes made to the definitions.
const REFRESH_EVERY: Duration = Duration::from_secs(1);
/// Longest sleep of the scheduler between ticks: a clock change is noticed within this.
const MAX_SLEEP: Duration = Duration::from_secs(15);

/// A definition as the API shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct DefinitionView {
    pub kind: Kind,
    pub name: String,
    pub origin: Origin,
    /// As `sluice.yaml` writes it, secrets replaced by `"********"`.
    pub definition: Value,
    /// For definitions made through the API.
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
    /// Why the definition is not in use, when it is not.
    pub problem: Option<String>,
    /// Mappings: whether it runs (its definition, or the API's switch over it).
    pub enabled: Option<bool>,
}

/// How a run is asked for through the API.
#[derive(Debug, Clone, Default)]
pub struct TriggerOptions {
    /// A backfill: every row sent as added.
    pub full: bool,
    /// Compute what would be sent; send and commit nothing.
    pub dry_run: bool,
    /// With `full`: only rows matching this SQL predicate are sent again.
    pub filter: Option<String>,
    /// Who asks (the API token's name): dry runs are admitted per caller.
    pub caller: Option<String>,
}

/// The caller of work asked for without a token's name.
const ANONYMOUS: &str = "anonymous";

/// The control plane.
pub struct Service {
    pub(crate) connectors: Arc<dyn ConnectorFactory>,
    /// Which connector options are secret by their declared types.
    secret_schemas: crate::secrets::SecretSchemas,
    observer: Arc<dyn RunObserver>,
    current: RwLock<Arc<Engine>>,
    /// Changes to definitions happen one at a time.
    pub(crate) changes: tokio::sync::Mutex<()>,
    /// Wakes the scheduler when the definitions change, a run ends or dbt finishes.
    pub(crate) changed: Arc<tokio::sync::Notify>,
    last_refresh: Mutex<Instant>,
    /// Runs started through the API, so a shutdown can wait for them.
    tasks: Mutex<tokio::task::JoinSet<()>>,
    /// Bumped at every new engine: what was read from the old one may have changed.
    generation: std::sync::atomic::AtomicU64,
    /// How far the runs this process makes have got (fed by `observer`).
    progress: Arc<crate::progress::ProgressBoard>,
}

impl Service {
    /// The control plane over `engine`. Runs and interactive work (history queries, previews,
    /// tests) move to runtimes of their own (see [`crate::workload`]); the calling runtime keeps
    /// the API, the scheduler and lease renewals.
    pub fn new(
        mut engine: Engine,
        connectors: Arc<dyn ConnectorFactory>,
        observer: Arc<dyn RunObserver>,
    ) -> Result<Arc<Self>> {
        engine.workloads = Arc::new(crate::workload::Workloads::isolated(
            &engine.file.config.api.limits,
            engine.project.state_dir().join("tmp"),
        )?);
        let progress = Arc::new(crate::progress::ProgressBoard::default());
        let observer: Arc<dyn RunObserver> = Arc::new(crate::progress::Tracking {
            board: progress.clone(),
            next: observer,
        });
        let secret_schemas = crate::secrets::SecretSchemas::from_catalog(&connectors.catalog());
        Ok(Arc::new(Self {
            connectors,
            secret_schemas,
            observer,
            progress,
            current: RwLock::new(Arc::new(engine)),
            changes: tokio::sync::Mutex::new(()),
            changed: Arc::new(tokio::sync::Notify::new()),
            last_refresh: Mutex::new(Instant::now()),
            tasks: Mutex::new(tokio::task::JoinSet::new()),
            generation: std::sync::atomic::AtomicU64::new(0),
        }))
    }

    /// The connector types this build has, with their options' JSON Schema (secrets marked
    /// `writeOnly`).
    pub fn connector_catalog(&self) -> crate::connector_types::ConnectorCatalog {
        self.connectors.catalog().with_secrets_marked()
    }

    /// How far `mapping`'s run in this process has got, while it runs here; `None` when it is
    /// not running in this process (or has not reported yet).
    pub async fn progress(&self, mapping: &str) -> Result<Option<crate::progress::RunProgress>> {
        let engine = self.current().await?;
        let Some(config) = engine.project.config.mappings.get(mapping) else {
            return Err(unknown(&engine, Kind::Mapping, mapping));
        };
        let latest = engine.metadata.runs(Some(mapping), 1).await?;
        if !latest.first().is_some_and(|r| r.status == RunStatus::Running) {
            return Ok(None);
        }
        Ok(self.progress.get(mapping, &config.model))
    }

    /// Bumped every time the definitions change (the engine is built anew).
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The engine of the moment.
    pub fn engine(&self) -> Arc<Engine> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The engine of the moment, after taking in changes another process made to the
    /// definitions (looked for at most once a second).
    pub async fn current(&self) -> Result<Arc<Engine>> {
        let due = {
            let mut last = self.last_refresh.lock().unwrap_or_else(|e| e.into_inner());
            let due = last.elapsed() >= REFRESH_EVERY;
            if due {
                *last = Instant::now();
            }
            due
        };
        if due && let Err(e) = self.refresh().await {
            tracing::warn!(error = %e, "could not look for changed definitions");
        }
        Ok(self.engine())
    }

    pub(crate) fn swap(&self, engine: Engine) -> Arc<Engine> {
        let engine = Arc::new(engine);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = engine.clone();
        self.generation.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.changed.notify_waiters();
        engine
    }

    /// Takes in changes to the definitions made by another process; `true` when there were.
    pub async fn refresh(&self) -> Result<bool> {
        let engine = self.engine();
        if engine.metadata.catalog_version().await? == engine.catalog.version {
            return Ok(false);
        }
        let _guard = self.changes.lock().await;
        self.reload().await?;
        Ok(true)
    }

    /// Builds the engine anew from the definitions in the store (the caller holds `changes`).
    async fn reload(&self) -> Result<Arc<Engine>> {
        let engine = self.engine();
        let catalog = engine.metadata.catalog().await?;
        if catalog.version == engine.catalog.version {
            return Ok(engine);
        }
        let next = engine.with_catalog(catalog, self.connectors.as_ref())?;
        for problem in next.problems.iter().filter(|p| !engine.problems.contains(p)) {
            tracing::warn!(kind = %problem.kind, name = problem.name, "definition not in use: {}", problem.message);
        }
        Ok(self.swap(next))
    }

    /// Every definition of `kind` (from the file and the API, in use or not), by name.
    pub fn definitions(&self, kind: Kind) -> Vec<DefinitionView> {
        let engine = self.engine();
        let c = &engine.file.config;
        let mut names: Vec<String> = match kind {
            Kind::Source => c.sources.keys().cloned().collect(),
            Kind::Destination => c.destinations.keys().cloned().collect(),
            Kind::Model => c.models.keys().cloned().collect(),
            Kind::Mapping => c.mappings.keys().cloned().collect(),
        };
        names.extend(
            engine
                .catalog
                .definitions
                .iter()
                .filter(|d| d.kind == kind)
                .map(|d| d.name.clone()),
        );
        names.sort();
        names.dedup();
        names
            .iter()
            .filter_map(|name| view(&engine, &self.secret_schemas, kind, name))
            .collect()
    }

    /// One definition, or [`EngineError::Unknown`].
    pub fn definition(&self, kind: Kind, name: &str) -> Result<DefinitionView> {
        let engine = self.engine();
        view(&engine, &self.secret_schemas, kind, name).ok_or_else(|| unknown(&engine, kind, name))
    }

    /// Creates (`create`) or replaces a definition made through the API. `spec` is the JSON
    /// `sluice.yaml` would hold for it; secrets in it are sealed, and a secret sent as
    /// `"********"` keeps its stored value. The definition must be usable as it is (its
    /// references exist, its connector's options parse, its mapping fits its destination), and
    /// no other definition may stop working because of it.
    pub async fn put(&self, kind: Kind, name: &str, spec: Value, create: bool) -> Result<DefinitionView> {
        let _guard = self.changes.lock().await;
        let engine = self.reload().await?;
        crate::config::check_name(name).map_err(|message| EngineError::Invalid { message })?;
        match (engine.origin(kind, name), create) {
            (Some(Origin::File), _) => return Err(defined_in_file(&engine, kind, name)),
            (Some(Origin::Api), true) => {
                return Err(EngineError::Conflict {
                    code: "already_exists",
                    message: format!("{kind} `{name}` exists; update it with PUT, or pick another name"),
                    run_id: None,
                });
            }
            (None, false) => return Err(unknown(&engine, kind, name)),
            _ => {}
        }
        if !spec.is_object() {
            return Err(EngineError::Invalid {
                message: format!("a {kind} is a JSON object, as in sluice.yaml"),
            });
        }
        let (candidate, sealed) = candidate(&engine, &self.secret_schemas, kind, name, &spec)?;
        let checked = engine.with_catalog(candidate, self.connectors.as_ref())?;
        if let Some(problem) = checked.problems.iter().find(|p| p.kind == kind && p.name == name) {
            return Err(EngineError::Invalid {
                message: problem.message.clone(),
            });
        }
        if let Some(broken) = checked.problems.iter().find(|p| !engine.problems.contains(p)) {
            return Err(EngineError::Invalid {
                message: format!(
                    "this change would leave {} `{}` out of use: {}",
                    broken.kind, broken.name, broken.message
                ),
            });
        }
        engine.metadata.put_definition(kind, name, &sealed).await?;
        let engine = self.reload().await?;
        view(&engine, &self.secret_schemas, kind, name).ok_or_else(|| unknown(&engine, kind, name))
    }

    /// Connects with a source or destination that is not saved (a form's "Test connection"
    /// before "Add"): `Ok(Err(message))` carries the system's own error, or why the options
    /// cannot be used. `name` is what it would be saved as: a secret sent as the placeholder
    /// keeps the value stored under that name. Nothing is written.
    pub async fn test_draft(
        &self,
        kind: Kind,
        name: &str,
        spec: Value,
        caller: &str,
    ) -> Result<std::result::Result<(), String>> {
        if !kind.is_connector() {
            return Err(EngineError::Invalid {
                message: format!("only sources and destinations connect; a {kind} has nothing to test"),
            });
        }
        let engine = self.current().await?;
        crate::config::check_name(name).map_err(|message| EngineError::Invalid { message })?;
        if engine.origin(kind, name) == Some(Origin::File) {
            return Err(defined_in_file(&engine, kind, name));
        }
        if !spec.is_object() {
            return Err(EngineError::Invalid {
                message: format!("a {kind} is a JSON object, as in sluice.yaml"),
            });
        }
        // What the test answers is scrubbed of the secrets it was given, and of the stored ones
        // a placeholder keeps: a connector's error may echo an option's value.
        let mut secrets = crate::secrets::secret_values(kind, &self.secret_schemas, &spec);
        if let Some(stored) = engine.catalog.get(kind, name)
            && let Ok(opened) = crate::secrets::open(&stored.spec, engine.secret_key.as_ref())
        {
            secrets.extend(crate::secrets::secret_values(kind, &self.secret_schemas, &opened));
        }
        let answer = self
            .test_draft_unscrubbed(&engine, kind, name, spec, caller)
            .await?;
        Ok(answer.map_err(|message| crate::secrets::scrub(&message, &secrets)))
    }

    async fn test_draft_unscrubbed(
        &self,
        engine: &Arc<Engine>,
        kind: Kind,
        name: &str,
        spec: Value,
        caller: &str,
    ) -> Result<std::result::Result<(), String>> {
        let engine = engine.clone();
        // Options that cannot be used are the test's answer, not a failed request.
        let candidate = match candidate(&engine, &self.secret_schemas, kind, name, &spec) {
            Ok((candidate, _)) => candidate,
            Err(EngineError::Invalid { message }) => return Ok(Err(message)),
            Err(e) => return Err(e),
        };
        let draft = engine.with_catalog(candidate, self.connectors.as_ref())?;
        if let Some(problem) = draft.problems.iter().find(|p| p.kind == kind && p.name == name) {
            return Ok(Err(problem.message.clone()));
        }
        let workloads = engine.workloads.clone();
        let what = format!("the connection test of {kind} `{name}`");
        let name = name.to_string();
        let tested = workloads
            .probe(caller, what, async move {
                Ok(match kind {
                    Kind::Source => draft.source(&name)?.check().await.map_err(|e| e.to_string()),
                    _ => draft.destination(&name)?.check().await.map_err(|e| e.to_string()),
                })
            })
            .await;
        // A system that never answers is the test's answer.
        match tested {
            Err(EngineError::TimedOut { message, .. }) => Ok(Err(message)),
            other => other,
        }
    }

    /// Deletes a definition made through the API. Refused while something uses it (a model of
    /// a source, a mapping of a model or destination) or while its mapping runs.
    pub async fn delete(&self, kind: Kind, name: &str) -> Result<()> {
        let _guard = self.changes.lock().await;
        let engine = self.reload().await?;
        match engine.origin(kind, name) {
            Some(Origin::File) => return Err(defined_in_file(&engine, kind, name)),
            None => return Err(unknown(&engine, kind, name)),
            Some(Origin::Api) => {}
        }
        let c = &engine.project.config;
        let users: Vec<String> = match kind {
            Kind::Source => c
                .models
                .iter()
                .filter(|(_, m)| m.source == name)
                .map(|(n, _)| format!("model `{n}`"))
                .collect(),
            Kind::Destination => c
                .mappings
                .iter()
                .filter(|(_, m)| m.destination == name)
                .map(|(n, _)| format!("mapping `{n}`"))
                .collect(),
            Kind::Model => c
                .mappings
                .iter()
                .filter(|(_, m)| m.model == name)
                .map(|(n, _)| format!("mapping `{n}`"))
                .collect(),
            Kind::Mapping => Vec::new(),
        };
        if !users.is_empty() {
            return Err(EngineError::Conflict {
                code: "in_use",
                message: format!(
                    "{kind} `{name}` is used by {}; delete or change them first",
                    users.join(", ")
                ),
                run_id: None,
            });
        }
        if kind == Kind::Mapping
            && let Some(holder) = engine.metadata.lease(name).await?
        {
            return Err(running(name, &holder));
        }
        engine.metadata.delete_definition(kind, name).await?;
        self.reload().await?;
        Ok(())
    }

    /// Enables or disables a mapping (from the file or the API): a disabled mapping is not run
    /// by the scheduler, `sluice run` or a trigger; enabled again, its next run sends everything
    /// that changed since its last successful run.
    pub async fn set_enabled(&self, mapping: &str, enabled: bool) -> Result<DefinitionView> {
        let _guard = self.changes.lock().await;
        let engine = self.reload().await?;
        if engine.origin(Kind::Mapping, mapping).is_none() {
            return Err(unknown(&engine, Kind::Mapping, mapping));
        }
        engine.metadata.set_mapping_switch(mapping, enabled).await?;
        let engine = self.reload().await?;
        view(&engine, &self.secret_schemas, Kind::Mapping, mapping)
            .ok_or_else(|| unknown(&engine, Kind::Mapping, mapping))
    }

    /// Starts a run of `mapping` and returns it at once, recorded as running; the run goes on
    /// in the background. A conflict when a run of the mapping is going (with that run's id).
    pub async fn trigger(&self, mapping: &str, options: TriggerOptions) -> Result<RunRecord> {
        let engine = self.current().await?;
        let config = engine.mapping_config(mapping)?;
        if !config.enabled {
            return Err(EngineError::Conflict {
                code: "mapping_disabled",
                message: format!(
                    "mapping `{mapping}` is disabled; enable it (PATCH with {{\"enabled\": true}}) to run it"
                ),
                run_id: None,
            });
        }
        if let Some(filter) = &options.filter {
            if !options.full {
                return Err(EngineError::Usage(
                    "`filter` limits a backfill: send it with \"full\": true".into(),
                ));
            }
            engine.check_backfill_filter(&config.model, filter).await?;
        }
        let observer = self.observer.clone();
        if options.dry_run {
            // A dry run is interactive work: bounded in number like previews and tests.
            let admission = engine
                .workloads
                .admit_probe(options.caller.as_deref().unwrap_or(ANONYMOUS))?;
            let mut run = RunRecord::starting(mapping, &config.model, &config.destination, options.full);
            run.trigger = Trigger::Api;
            run.dry_run = true;
            run.filter = options.filter.clone();
            engine.metadata.start_run(&run).await?;
            let record = run.clone();
            let on = engine.clone();
            self.spawn(&on, async move {
                let _admission = admission;
                dry_run_recorded(engine, record, observer).await
            });
            return Ok(run);
        }
        let filter = options.filter.as_deref();
        match engine.claim(mapping, options.full, Trigger::Api, filter).await? {
            Ok(run) => {
                let claimed = run.clone();
                let model = config.model.clone();
                let full = options.full;
                let on = engine.clone();
                let changed = self.changed.clone();
                self.spawn(&on, async move {
                    if let Err(e) = engine
                        .execute(&model, vec![claimed], full, observer.as_ref())
                        .await
                    {
                        tracing::error!(model, error = %e, "a triggered run could not be recorded");
                    }
                    // Mappings scheduled after this one may be due now.
                    changed.notify_one();
                });
                Ok(run)
            }
            Err((_, holder)) => Err(running(mapping, &holder)),
        }
    }

    /// Asks a running run to stop at its next commit point (in this process at once, in
    /// another within seconds). Conflict when it is not running.
    pub async fn cancel(&self, run_id: &str) -> Result<RunRecord> {
        let engine = self.engine();
        let run = engine
            .metadata
            .run(run_id)
            .await?
            .ok_or_else(|| EngineError::Unknown {
                kind: "run",
                name: run_id.to_string(),
                available: Vec::new(),
            })?;
        if run.status.is_finished() || !engine.metadata.request_cancel(run_id).await? {
            return Err(EngineError::Conflict {
                code: "run_finished",
                message: format!(
                    "run {run_id} is not running (it {}); there is nothing to cancel",
                    run.status
                ),
                run_id: Some(run_id.to_string()),
            });
        }
        engine.controls.cancel(run_id);
        tracing::info!(run_id, mapping = run.mapping, "cancellation requested");
        Ok(RunRecord {
            cancel_requested: true,
            ..run
        })
    }

    /// Starts a run on the runs' runtime, tracked so a shutdown can wait for it.
    fn spawn(&self, engine: &Engine, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        while tasks.try_join_next().is_some() {}
        match engine.workloads.runs_handle() {
            Some(runs) => tasks.spawn_on(task, runs),
            None => tasks.spawn(task),
        };
    }

    /// Waits for the runs started through the API (after a shutdown request they stop at their
    /// next commit point).
    pub async fn wait_for_runs(&self) {
        let mut tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        while tasks.join_next().await.is_some() {}
    }

    /// Runs scheduled mappings until a shutdown is requested; then waits for the runs in flight
    /// to stop at their next commit point. Definitions that change while it runs are taken in
    /// at the next tick (at once when changed in this process). Snapshots are retired after each
    /// model's scheduled runs.
    pub async fn run_schedules(self: Arc<Self>) -> Result<()> {
        let mut engine = self.engine();
        let mut scheduler = Scheduler::for_engine(&engine, Utc::now()).await?;
        tracing::info!(mappings = scheduler.len(), "scheduler started");
        let mut running = tokio::task::JoinSet::new();
        let shutdown = engine.shutdown().clone();
        let mut dbt = crate::triggers::DbtWatch::default();
        while !shutdown.is_requested() {
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %e, "could not look for changed definitions");
            }
            // A manifest dbt wrote anew is taken in before anything runs on it.
            dbt.look(&self).await;
            let latest = self.engine();
            if !Arc::ptr_eq(&latest, &engine) {
                engine = latest;
                let mut rebuilt = Scheduler::for_engine(&engine, Utc::now()).await?;
                rebuilt.carry_over(&scheduler);
                scheduler = rebuilt;
                tracing::info!(
                    mappings = scheduler.len(),
                    "definitions changed; schedule rebuilt"
                );
            }
            let now = Utc::now();
            let mut due = scheduler.tick(now);
            if scheduler.has_sequences() {
                // Runs of any process sharing the store count, so the store is asked.
                match engine.metadata.last_successes().await {
                    Ok(succeeded) => due.extend(scheduler.due_after(&succeeded, now)),
                    Err(e) => {
                        tracing::warn!(error = %e, "could not read which runs succeeded, for `after:` schedules")
                    }
                }
            }
            if scheduler.has_external_triggers() {
                // Events any process recorded (a webhook one replica answered) count.
                match engine.metadata.external_events().await {
                    Ok(happened) => due.extend(scheduler.due_on_events(&happened, now)),
                    Err(e) => {
                        tracing::warn!(error = %e, "could not read dbt's events, for `after_dbt:` schedules")
                    }
                }
            }
            let due = match claim_fires(&engine, &mut scheduler, due, now).await {
                Ok(claimed) => claimed,
                Err(e) => {
                    // Without the store no run could start anyway; the next tick tries again.
                    tracing::warn!(error = %e, "could not claim scheduled runs in the metadata store");
                    Vec::new()
                }
            };
            let mut by_model: Vec<(String, Vec<String>)> = Vec::new();
            for Due { mapping, model } in due {
                match by_model.iter_mut().find(|(m, _)| *m == model) {
                    Some((_, mappings)) => mappings.push(mapping),
                    None => by_model.push((model, vec![mapping])),
                }
            }
            for (model, mappings) in by_model {
                let engine = engine.clone();
                let observer = self.observer.clone();
                tracing::info!(model, ?mappings, "scheduled run due");
                let runs = engine.workloads.runs_handle().cloned();
                let changed = self.changed.clone();
                let run = async move {
                    let request = RunRequest {
                        mappings,
                        full: false,
                        trigger: Trigger::Schedule,
                        filter: None,
                    };
                    if let Err(e) = engine.run(&request, observer.as_ref()).await {
                        tracing::error!(model, error = %e, "scheduled run failed to start");
                    }
                    if let Err(e) = engine.retire_snapshots(&model).await {
                        tracing::warn!(model, error = %e, "could not retire old snapshots");
                    }
                    // Mappings scheduled after these may be due now.
                    changed.notify_one();
                };
                match runs {
                    Some(runs) => running.spawn_on(run, &runs),
                    None => running.spawn(run),
                };
            }
            // Reap finished runs so the set does not grow.
            while running.try_join_next().is_some() {}
            let longest = if engine
                .file
                .config
                .dbt
                .as_ref()
                .is_some_and(|d| d.manifest.is_some())
            {
                crate::triggers::DBT_POLL_EVERY
            } else {
                MAX_SLEEP
            };
            let sleep = scheduler
                .next_wake()
                .and_then(|t| (t - Utc::now()).to_std().ok())
                .unwrap_or(longest)
                .min(longest);
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = self.changed.notified() => {}
                _ = shutdown.requested() => {}
            }
        }
        tracing::info!(
            runs = running.len(),
            "scheduler stopping; waiting for runs to reach a commit point"
        );
        while running.join_next().await.is_some() {}
        Ok(())
    }
}

/// The due mappings whose fire this process claims: one process sharing the metadata store
/// starts each fire time; a mapping another process fired since this one last looked is not
/// due here any more.
async fn claim_fires(
    engine: &Engine,
    scheduler: &mut Scheduler,
    due: Vec<Due>,
    now: DateTime<Utc>,
) -> Result<Vec<Due>> {
    if due.is_empty() {
        return Ok(due);
    }
    let fires = engine.metadata.schedule_fires().await?;
    let mut claimed = Vec::with_capacity(due.len());
    for entry in due {
        let previous = fires.get(&entry.mapping).copied();
        if let Some(fired_at) = previous
            && !scheduler.observe_fire(&entry.mapping, fired_at, now)
        {
            tracing::debug!(mapping = entry.mapping, %fired_at, "scheduled run already started by another process");
            continue;
        }
        if engine.metadata.claim_fire(&entry.mapping, previous, now).await? {
            claimed.push(entry);
        } else {
            tracing::debug!(
                mapping = entry.mapping,
                "another process claimed the scheduled run first"
            );
        }
    }
    Ok(claimed)
}

/// Where an API dry run's requests are kept, in the snapshot store.
pub fn dry_run_path(mapping: &str, run_id: &str) -> String {
    format!("dry-runs/{mapping}/{run_id}.jsonl")
}

/// A stream of bytes read from the snapshot store.
pub type ByteStream = futures::stream::BoxStream<'static, std::result::Result<bytes::Bytes, std::io::Error>>;

impl Service {
    /// The requests a finished dry run computed, streamed from the snapshot store; `None` when
    /// it left none.
    pub async fn dry_run_requests(&self, run: &RunRecord) -> Result<Option<ByteStream>> {
        use futures::StreamExt;
        use object_store::ObjectStoreExt;
        let engine = self.engine();
        let path = engine.snapshots.path(&dry_run_path(&run.mapping, &run.id));
        match engine.snapshots.object_store().get(&path).await {
            Ok(result) => Ok(Some(
                result
                    .into_stream()
                    .map(|chunk| chunk.map_err(std::io::Error::other))
                    .boxed(),
            )),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(EngineError::Internal(format!(
                "cannot read the dry run's requests: {e}"
            ))),
        }
    }
}

/// Runs a dry run recorded as a run, writes its requests to the snapshot store and records
/// its outcome.
async fn dry_run_recorded(engine: Arc<Engine>, run: RunRecord, observer: Arc<dyn RunObserver>) {
    let run_id = run.id.clone();
    let mapping = run.mapping.clone();
    let temp_dir = engine.snapshots.temp_dir();
    let limit = engine.workloads.limits().dry_run_timeout;
    let outcome = async {
        std::fs::create_dir_all(&temp_dir)
            .map_err(|e| EngineError::Internal(format!("cannot create {}: {e}", temp_dir.display())))?;
        let file = tempfile::NamedTempFile::new_in(&temp_dir).map_err(|e| {
            EngineError::Internal(format!("cannot create a file in {}: {e}", temp_dir.display()))
        })?;
        let writer = file
            .reopen()
            .map_err(|e| EngineError::Internal(format!("cannot open {}: {e}", file.path().display())))?;
        let sink = DryRunSink::new(Box::new(std::io::BufWriter::new(writer)));
        let done = engine.dry_run_as(run.clone(), &sink, observer.as_ref()).await?;
        drop(sink);
        // Streamed up (a backfill's dry run can be gigabytes).
        let copy_error =
            |e: std::io::Error| EngineError::Internal(format!("cannot store the dry run's requests: {e}"));
        let mut local = tokio::fs::File::open(file.path()).await.map_err(copy_error)?;
        let mut upload = object_store::buffered::BufWriter::new(
            engine.snapshots.object_store(),
            engine.snapshots.path(&dry_run_path(&mapping, &run_id)),
        );
        tokio::io::copy(&mut local, &mut upload)
            .await
            .map_err(copy_error)?;
        tokio::io::AsyncWriteExt::shutdown(&mut upload)
            .await
            .map_err(copy_error)?;
        Ok::<_, EngineError>(done)
    };
    let outcome = match tokio::time::timeout(limit, outcome).await {
        Ok(outcome) => outcome,
        Err(_) => Err(EngineError::TimedOut {
            code: "dry_run_timeout",
            message: format!(
                "the dry run did not finish within {} (api.limits.dry_run_timeout); a backfill's dry run of a large model takes as long as the run would",
                humantime::format_duration(limit)
            ),
        }),
    };
    let record = match outcome {
        Ok(done) => done,
        Err(e) => RunRecord {
            status: match e {
                EngineError::Cancelled(_) => RunStatus::Cancelled,
                EngineError::Interrupted(_) => RunStatus::Interrupted,
                _ => RunStatus::Failed,
            },
            finished_at: Some(Utc::now()),
            recommended_action: e.recommended_action(),
            error: Some(e.to_string()),
            ..run
        },
    };
    let record = RunRecord {
        finished_at: record.finished_at.or_else(|| Some(Utc::now())),
        ..record
    };
    if let Err(e) = engine.metadata.commit_run(&record, None).await {
        tracing::error!(run_id, error = %e, "could not record the dry run's outcome");
    }
}

fn view(
    engine: &Engine,
    schemas: &crate::secrets::SecretSchemas,
    kind: Kind,
    name: &str,
) -> Option<DefinitionView> {
    let origin = engine.origin(kind, name)?;
    let problem = engine
        .problems
        .iter()
        .find(|p| p.kind == kind && p.name == name)
        .map(|p| p.message.clone());
    let (raw, created_at, updated_at) = match origin {
        Origin::File => (
            engine
                .file
                .raw_definition(kind.section(), name)
                .cloned()
                .unwrap_or(Value::Null),
            None,
            None,
        ),
        Origin::Api => {
            let stored = engine.catalog.get(kind, name)?;
            (
                stored.spec.clone(),
                Some(stored.created_at),
                Some(stored.updated_at),
            )
        }
    };
    let enabled = (kind == Kind::Mapping).then(|| {
        engine
            .project
            .mapping(name)
            .map(|m| m.enabled)
            .or_else(|| engine.catalog.switches.get(name).copied())
            .unwrap_or_else(|| raw.get("enabled").and_then(Value::as_bool).unwrap_or(true))
    });
    Some(DefinitionView {
        kind,
        name: name.to_string(),
        origin,
        // Beyond the declared secrets: a known credential written into a plain option or a
        // model's SQL is not shown either.
        definition: crate::secrets::scrub_known_strings(crate::secrets::redact(kind, schemas, &raw)),
        created_at,
        updated_at,
        problem,
        enabled,
    })
}

fn unknown(engine: &Engine, kind: Kind, name: &str) -> EngineError {
    let c = &engine.project.config;
    let available: Vec<String> = match kind {
        Kind::Source => c.sources.keys().cloned().collect(),
        Kind::Destination => c.destinations.keys().cloned().collect(),
        Kind::Model => c.models.keys().cloned().collect(),
        Kind::Mapping => c.mappings.keys().cloned().collect(),
    };
    EngineError::Unknown {
        kind: kind.as_str(),
        name: name.to_string(),
        available,
    }
}

/// The catalog with `spec` as the API-made `kind` `name` (its secrets sealed, a placeholder
/// keeping the stored value), and the sealed definition: what [`Service::put`] stores and
/// [`Service::test_draft`] connects with.
fn candidate(
    engine: &Engine,
    schemas: &crate::secrets::SecretSchemas,
    kind: Kind,
    name: &str,
    spec: &Value,
) -> Result<(CatalogState, Value)> {
    if kind.is_connector()
        && let Some(path) = crate::secrets::env_reference(kind, schemas, spec)
    {
        return Err(EngineError::Invalid {
            message: format!(
                "`{path}`: definitions made through the API are taken literally, so `${{...}}` is not expanded; write the value itself (secrets are sealed at rest), or define the {kind} in sluice.yaml to use environment variables"
            ),
        });
    }
    if kind == Kind::Model
        && spec
            .get("sql")
            .and_then(Value::as_str)
            .is_some_and(crate::secrets::contains_known)
    {
        return Err(EngineError::Invalid {
            message: "`sql` holds a credential of this sluice (a source's, destination's or token's secret); a model is shown to every read token, so keep credentials in a source's options, where they are sealed".into(),
        });
    }
    let previous = engine.catalog.get(kind, name);
    let sealed = crate::secrets::seal(
        kind,
        schemas,
        spec,
        previous.map(|d| &d.spec),
        engine.secret_key.as_ref(),
    )
    .map_err(|e| EngineError::Invalid {
        message: e.to_string(),
    })?;
    let now = Utc::now();
    let catalog = engine.catalog.with(StoredDefinition {
        kind,
        name: name.to_string(),
        spec: sealed.clone(),
        created_at: previous.map_or(now, |d| d.created_at),
        updated_at: now,
    });
    Ok((catalog, sealed))
}

fn defined_in_file(engine: &Engine, kind: Kind, name: &str) -> EngineError {
    EngineError::Conflict {
        code: "defined_in_file",
        message: format!(
            "{kind} `{name}` is defined in {}; change it there (the API cannot change or delete what the file defines)",
            engine.file.path.display()
        ),
        run_id: None,
    }
}

fn running(mapping: &str, holder: &crate::metadata::LeaseHolder) -> EngineError {
    EngineError::Conflict {
        code: "run_in_progress",
        message: format!(
            "mapping `{mapping}` is running (run {}, on {}, since {}); wait for it to finish or cancel it",
            holder.run_id,
            holder.holder,
            holder.since.format("%Y-%m-%d %H:%M:%S UTC")
        ),
        run_id: Some(holder.run_id.clone()),
    }
}
