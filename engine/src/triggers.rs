//! Runs that start when dbt says the data is ready (`schedule: {after_dbt: ...}`), and
//! `sluice serve` following the dbt manifest as dbt writes it anew.
//!
//! Two things tell sluice that dbt finished:
//! - dbt Cloud's job webhook (`POST /api/v1/triggers/dbt`, [`Service::dbt_webhook`]): a
//!   `job.run.completed` event with status `Success`, signed with the subscription's secret;
//! - dbt's own `run_results.json` (dbt Core, or artifacts a CI job uploads), written at the end
//!   of every invocation ([`DbtWatch`]): the models it built, and their tests' outcomes.
//!
//! Either is recorded in the metadata store as an external event with the time it happened
//! ([`crate::metadata::MetadataStore::record_event`]), where every scheduler sharing the store
//! finds it ([`crate::scheduler::Scheduler::due_on_events`]); one of them claims the fire. So
//! a webhook answered by one replica starts the runs once, a restart loses no event, and an
//! event told twice (dbt Cloud retries a delivery it thinks failed) starts nothing more.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use chrono::Utc;

use crate::engine::Engine;
use crate::service::Service;

/// How often `sluice serve` looks at the dbt manifest and `run_results.json` (a stat of a
/// local file, a HEAD request for an object).
pub const DBT_POLL_EVERY: Duration = Duration::from_secs(10);

/// Why a dbt Cloud webhook was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookRefusal {
    /// The project has no `dbt.webhook_secret`, so no webhook can be verified.
    NotConfigured,
    /// No signature, or one that is not this body's under the secret.
    BadSignature,
    /// The body is not a dbt Cloud job event.
    NotAnEvent(String),
}

impl std::fmt::Display for WebhookRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WebhookRefusal::NotConfigured => f.write_str(
                "dbt webhooks are not set up here: put the secret token dbt Cloud shows for the webhook in `dbt.webhook_secret` (e.g. `${DBT_WEBHOOK_SECRET}`)",
            ),
            WebhookRefusal::BadSignature => f.write_str(
                "the `Authorization` header is not the HMAC-SHA256 of this body under `dbt.webhook_secret`, as dbt Cloud signs its webhooks",
            ),
            WebhookRefusal::NotAnEvent(message) => f.write_str(message),
        }
    }
}

/// What a dbt Cloud webhook did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookOutcome {
    /// dbt Cloud's `eventId`.
    pub event_id: String,
    /// Whether the event says a job succeeded (and was recorded).
    pub accepted: bool,
    /// Why it starts nothing, when it does not.
    pub reason: Option<String>,
    /// The `after_dbt:` mappings it makes due (started by the scheduler, in this process or
    /// another sharing the metadata store).
    pub mappings: Vec<String>,
}

impl Service {
    /// Takes in a dbt Cloud webhook: `authorization` must be the hex HMAC-SHA256 of `body`
    /// under `dbt.webhook_secret`. A successful `job.run.completed` is recorded for the job's id,
    /// its name and "any job", and wakes the scheduler; other events are acknowledged and start
    /// nothing (so dbt Cloud does not retry them).
    pub async fn dbt_webhook(
        &self,
        body: &[u8],
        authorization: Option<&str>,
    ) -> crate::error::Result<std::result::Result<WebhookOutcome, WebhookRefusal>> {
        // Unsigned is refused first, set up or not (what the route documents).
        let Some(authorization) = authorization.filter(|a| !a.trim().is_empty()) else {
            return Ok(Err(WebhookRefusal::BadSignature));
        };
        let engine = self.current().await?;
        let Some(secret) = engine
            .file
            .config
            .dbt
            .as_ref()
            .and_then(|dbt| dbt.webhook_secret.as_ref())
            .map(|s| s.expose().to_string())
            .filter(|s| !s.is_empty())
        else {
            return Ok(Err(WebhookRefusal::NotConfigured));
        };
        if !crate::dbt::signature_is_valid(&secret, body, authorization) {
            return Ok(Err(WebhookRefusal::BadSignature));
        }
        let event = match crate::dbt::CloudEvent::parse(body) {
            Ok(event) => event,
            Err(message) => return Ok(Err(WebhookRefusal::NotAnEvent(message))),
        };
        if let Err(reason) = event.succeeded() {
            tracing::info!(
                event_id = event.event_id,
                job = event.job_id(),
                "dbt Cloud webhook: {reason}"
            );
            return Ok(Ok(WebhookOutcome {
                event_id: event.event_id,
                accepted: false,
                reason: Some(reason),
                mappings: Vec::new(),
            }));
        }
        let names = event.events();
        let at = event.finished_at(Utc::now());
        for name in &names {
            engine.metadata.record_event(name, at, &event.event_id).await?;
        }
        let mappings = waiting_for(&engine, &names);
        tracing::info!(
            event_id = event.event_id,
            job = event.job_id(),
            ?mappings,
            "dbt Cloud job succeeded; mappings scheduled after_dbt are due"
        );
        self.changed.notify_one();
        Ok(Ok(WebhookOutcome {
            event_id: event.event_id,
            accepted: true,
            reason: None,
            mappings,
        }))
    }

    /// Takes in a manifest dbt wrote anew: the engine is built again with it (runs in flight
    /// keep theirs). `true` when it was.
    pub(crate) async fn take_in_manifest(&self) -> crate::error::Result<bool> {
        let _guard = self.changes.lock().await;
        let engine = self.engine();
        match engine.with_new_manifest(self.connectors.as_ref()).await? {
            Some(next) => {
                tracing::info!(
                    generated_at = next.file.dbt_manifest_generated_at().unwrap_or_default(),
                    "the dbt manifest changed; models that read dbt models use it from now on"
                );
                self.swap(next);
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

/// The enabled `after_dbt:` mappings that wait for any of `events`.
fn waiting_for(engine: &Engine, events: &[String]) -> Vec<String> {
    let project = &engine.project;
    project
        .config
        .mappings
        .iter()
        .filter(|(_, m)| m.enabled)
        .filter(|(name, _)| {
            project
                .after_dbt_events(name)
                .is_some_and(|waits| waits.iter().any(|w| events.contains(w)))
        })
        .map(|(name, _)| name.clone())
        .collect()
}

/// What `sluice serve` last saw of the dbt project's artifacts.
#[derive(Debug, Default)]
pub struct DbtWatch {
    manifest: Option<String>,
    run_results: Option<String>,
    last_look: Option<Instant>,
}

impl DbtWatch {
    /// Looks at the manifest and `run_results.json` (at most every [`DBT_POLL_EVERY`]): a new
    /// manifest is taken in; a new `run_results.json` records, for each relation the
    /// invocation built with its tests passing, the time it finished. Problems are logged, and
    /// looked at again next time.
    pub async fn look(&mut self, service: &Service) {
        if self.last_look.is_some_and(|t| t.elapsed() < DBT_POLL_EVERY) {
            return;
        }
        self.last_look = Some(Instant::now());
        let engine = service.engine();
        let Some(dbt) = engine.file.config.dbt.clone() else {
            return;
        };
        let base_dir: PathBuf = engine.file.base_dir.clone();
        let Some(manifest) = dbt.manifest_location() else {
            // Webhooks only.
            return;
        };
        let mut new_manifest = false;
        match crate::dbt::artifact_stamp(&dbt, manifest, &base_dir).await {
            Ok(stamp) if stamp.is_some() && stamp != self.manifest => {
                // (Taken in only when its `generated_at` moved: the first look, or a copy of
                // the same file, changes nothing.)
                self.manifest = stamp;
                match service.take_in_manifest().await {
                    Ok(taken) => new_manifest = taken,
                    Err(e) => {
                        tracing::error!(error = %e, "the dbt manifest changed and cannot be used; models keep the one read before")
                    }
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = e, "cannot look at the dbt manifest"),
        }
        let Some(location) = dbt.run_results_location() else {
            return;
        };
        let stamp = match crate::dbt::artifact_stamp(&dbt, &location, &base_dir).await {
            Ok(stamp) => stamp,
            Err(e) => {
                tracing::warn!(error = e, "cannot look at dbt's run_results.json");
                return;
            }
        };
        if stamp.is_none() {
            // No run_results.json (a job that uploads only its manifest, once it has built):
            // a new manifest stands for a build of every dbt model sluice reads.
            if new_manifest && let Err(e) = record_manifest(&service.engine()).await {
                tracing::warn!(error = e, "cannot record the new dbt manifest as a build");
            }
            return;
        }
        if stamp == self.run_results {
            return;
        }
        match record_built(&service.engine(), &dbt, &location, &base_dir).await {
            Ok(()) => self.run_results = stamp,
            Err(e) => tracing::warn!(error = e, "cannot take in dbt's run_results.json"),
        }
    }
}

/// Records a build of every dbt model the project reads, at the manifest's `generated_at`
/// (the same time for every process that sees it, so one run covers it).
async fn record_manifest(engine: &Engine) -> std::result::Result<(), String> {
    let Some(generated_at) = engine.file.dbt_manifest_generated_at() else {
        return Ok(());
    };
    let at = chrono::DateTime::parse_from_rfc3339(generated_at)
        .map_err(|e| format!("the manifest's `generated_at` {generated_at:?} is not a time: {e}"))?
        .with_timezone(&Utc)
        .min(Utc::now());
    let mut read: Vec<String> = engine
        .project
        .config
        .models
        .keys()
        .flat_map(|model| engine.project.dbt_sources_of(model))
        .map(|dbt| dbt.unique_id)
        .collect();
    read.sort();
    read.dedup();
    for node in &read {
        engine
            .metadata
            .record_event(&crate::dbt::node_event(node), at, generated_at)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Records an external event for each relation `run_results.json` says was built.
async fn record_built(
    engine: &Engine,
    dbt: &crate::dbt::DbtConfig,
    location: &str,
    base_dir: &std::path::Path,
) -> std::result::Result<(), String> {
    let Some(bytes) = crate::dbt::read_artifact(dbt, location, base_dir).await? else {
        return Ok(());
    };
    let results = crate::dbt::RunResults::parse(&bytes)?;
    let Some(manifest) = engine.file.dbt_manifest() else {
        return Ok(());
    };
    // Never later than now: a clock ahead of ours would keep mappings due.
    let at = results.finished_at()?.min(Utc::now());
    let built = results.built(manifest);
    let detail = results.metadata.invocation_id.clone().unwrap_or_default();
    let mut recorded = 0;
    for node in &built {
        if engine
            .metadata
            .record_event(&crate::dbt::node_event(node), at, &detail)
            .await
            .map_err(|e| e.to_string())?
        {
            recorded += 1;
        }
    }
    if recorded > 0 {
        tracing::info!(
            invocation = detail,
            finished_at = %at,
            relations = recorded,
            "dbt built models; mappings scheduled after_dbt on them are due"
        );
    }
    Ok(())
}
