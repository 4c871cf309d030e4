//! What the API answers with, as documented types.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sluice_engine::metadata::{FailureRow, RunCounts, RunRecord, RunStatus, StageTimings};
use sluice_engine::service::DefinitionView;
use utoipa::ToSchema;

/// Where a definition comes from.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OriginView {
    /// `sluice.yaml`: read-only through the API.
    File,
    /// Created through the API.
    Api,
}

/// A run's status.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RunStatusView {
    Running,
    /// Every selected record was delivered.
    Succeeded,
    /// Committed; some records failed and are sent again by the next run.
    Partial,
    /// Stopped on an error; what it delivered up to its last checkpoint is kept.
    Failed,
    /// Stopped by a shutdown (or its process died); the next run goes on from there.
    Interrupted,
    /// Not run: a run of the mapping was still going.
    Skipped,
    /// Stopped on request; the next run goes on from there.
    Cancelled,
}

impl From<RunStatus> for RunStatusView {
    fn from(status: RunStatus) -> Self {
        match status {
            RunStatus::Running => Self::Running,
            RunStatus::Succeeded => Self::Succeeded,
            RunStatus::Partial => Self::Partial,
            RunStatus::Failed => Self::Failed,
            RunStatus::Interrupted => Self::Interrupted,
            RunStatus::Skipped => Self::Skipped,
            RunStatus::Cancelled => Self::Cancelled,
        }
    }
}

impl From<RunStatusView> for RunStatus {
    fn from(status: RunStatusView) -> Self {
        match status {
            RunStatusView::Running => Self::Running,
            RunStatusView::Succeeded => Self::Succeeded,
            RunStatusView::Partial => Self::Partial,
            RunStatusView::Failed => Self::Failed,
            RunStatusView::Interrupted => Self::Interrupted,
            RunStatusView::Skipped => Self::Skipped,
            RunStatusView::Cancelled => Self::Cancelled,
        }
    }
}

/// What started a run.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TriggerView {
    Manual,
    Schedule,
    Api,
    Backfill,
}

/// A run of a mapping.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Run {
    pub id: String,
    pub mapping: String,
    pub model: String,
    pub destination: String,
    pub status: RunStatusView,
    pub trigger: TriggerView,
    /// A backfill: every row sent as added.
    pub full_resync: bool,
    /// Computed what it would send; sent and committed nothing.
    pub dry_run: bool,
    /// The backfill's filter, when it had one.
    pub filter: Option<String>,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub duration_ms: Option<i64>,
    pub snapshot_id: Option<String>,
    pub baseline_snapshot_id: Option<String>,
    pub counts: RunCounts,
    pub timings: StageTimings,
    /// How the model's columns changed since the baseline.
    pub schema_change: Option<String>,
    pub error: Option<String>,
    pub recommended_action: Option<String>,
    /// Someone asked the run to stop; it stops at its next commit point.
    pub cancel_requested: bool,
}

impl From<&RunRecord> for Run {
    fn from(run: &RunRecord) -> Self {
        use sluice_engine::metadata::Trigger;
        Self {
            id: run.id.clone(),
            mapping: run.mapping.clone(),
            model: run.model.clone(),
            destination: run.destination.clone(),
            status: run.status.into(),
            trigger: match run.trigger {
                Trigger::Manual => TriggerView::Manual,
                Trigger::Schedule => TriggerView::Schedule,
                Trigger::Api => TriggerView::Api,
                Trigger::Backfill => TriggerView::Backfill,
            },
            full_resync: run.full_resync,
            dry_run: run.dry_run,
            filter: run.filter.clone(),
            started_at: run.started_at,
            finished_at: run.finished_at,
            duration_ms: run.duration().map(|d| d.num_milliseconds()),
            snapshot_id: run.snapshot_id.clone(),
            baseline_snapshot_id: run.baseline_snapshot_id.clone(),
            counts: run.counts,
            timings: run.timings,
            schema_change: run.schema_change.clone(),
            error: run.error.clone(),
            recommended_action: run.recommended_action.clone(),
            cancel_requested: run.cancel_requested,
        }
    }
}

/// A page of runs, most recent first.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunPage {
    pub runs: Vec<Run>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// A record a run failed to deliver.
#[derive(Debug, Serialize, ToSchema)]
pub struct Failure {
    /// The record's primary key.
    #[schema(value_type = Object)]
    pub key: Value,
    /// `added`, `updated` or `deleted`.
    pub operation: String,
    /// The destination's error (or why the record could not be sent).
    pub error: String,
    /// Deliveries tried, this run's included.
    pub attempts: i64,
    pub first_failed_at: DateTime<Utc>,
    pub last_failed_at: DateTime<Utc>,
    /// The record as it was sent, first 4 KiB.
    pub payload: Option<String>,
}

impl From<&FailureRow> for Failure {
    fn from(row: &FailureRow) -> Self {
        Self {
            key: serde_json::from_str(&row.record_key)
                .unwrap_or_else(|_| Value::String(row.record_key.clone())),
            operation: row.op.clone(),
            error: row.error.clone(),
            attempts: row.attempts,
            first_failed_at: row.first_failed_at,
            last_failed_at: row.last_failed_at,
            payload: row.payload.clone(),
        }
    }
}

/// A page of a run's failed records, in the order they failed.
#[derive(Debug, Serialize, ToSchema)]
pub struct FailurePage {
    pub failures: Vec<Failure>,
    pub next_cursor: Option<String>,
}

/// The result of a connection test.
#[derive(Debug, Serialize, ToSchema)]
pub struct TestResult {
    /// Whether sluice could connect (and authenticate).
    pub ok: bool,
    /// The system's own error, with a hint, when it could not.
    pub error: Option<String>,
}

/// A column of a model.
#[derive(Debug, Serialize, ToSchema)]
pub struct Column {
    pub name: String,
    /// The Arrow type sluice carries it as (`Int64`, `Utf8`, `Timestamp(µs, "UTC")`, ...).
    #[serde(rename = "type")]
    pub data_type: String,
    pub nullable: bool,
}

/// A model's first rows.
#[derive(Debug, Serialize, ToSchema)]
pub struct Preview {
    /// The SQL that ran (templates rendered).
    pub sql: String,
    pub columns: Vec<Column>,
    /// One JSON object per row (as payloads render values).
    #[schema(value_type = Vec<Object>)]
    pub rows: Vec<Value>,
}

/// A definition, with where it comes from and whether it is in use.
#[derive(Debug, Serialize, ToSchema)]
pub struct Definition {
    pub name: String,
    pub origin: OriginView,
    /// As sluice.yaml writes it; secrets show as `"********"`.
    #[schema(value_type = Object)]
    pub definition: Value,
    /// When it was created through the API.
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
    /// Why it is not in use, when it is not (its source is gone, its secrets cannot be opened).
    pub problem: Option<String>,
    /// Mappings: whether it runs.
    pub enabled: Option<bool>,
}

impl From<DefinitionView> for Definition {
    fn from(view: DefinitionView) -> Self {
        Self {
            name: view.name,
            origin: match view.origin {
                sluice_engine::catalog::Origin::File => OriginView::File,
                sluice_engine::catalog::Origin::Api => OriginView::Api,
            },
            definition: view.definition,
            created_at: view.created_at,
            updated_at: view.updated_at,
            problem: view.problem,
            enabled: view.enabled,
        }
    }
}

/// A page of definitions, by name.
#[derive(Debug, Serialize, ToSchema)]
pub struct DefinitionPage {
    pub items: Vec<Definition>,
    pub next_cursor: Option<String>,
}

/// `GET /healthz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: String,
    pub version: String,
}

/// `GET /readyz`: each store's state (`ok`, or `unavailable` with the reason in the log: the
/// route needs no token, so it tells no details of the infrastructure).
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    pub metadata_store: String,
    pub snapshot_store: String,
}

/// What a mapping with a given action writes to a destination: the record's layout, so a
/// mapping editor can suggest destination fields and say what each record must carry.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct RecordShape {
    /// The action (the destination's default when none was named); `null` for a destination
    /// that takes sluice's envelope (every change with its operation, fields as mapped).
    pub action: Option<String>,
    /// The modes it supports (`upsert`, `update`, `insert`, `mirror`); the first is the default.
    pub modes: Vec<String>,
    /// Whether deleted records can be sent.
    pub deletes: bool,
    /// Each record is an event (sent once; `send` defaults to `[added]`).
    pub events: bool,
    /// Fields the destination defines at the top level of a record (`userId`, `event`, ...).
    pub top_level: Vec<String>,
    /// Where every other field goes (`traits`, `properties`); `null` keeps them at the top.
    pub container: Option<String>,
    /// A record needs at least one of these with a value, or it fails unsent.
    pub identity: Vec<String>,
    /// Fields the mapping must fill, by a column or a constant.
    pub required: Vec<String>,
    /// Model columns taken for a top-level field when the mapping does not map it.
    pub aliases: Vec<FieldAlias>,
    /// Fields sluice fills itself (`type`, the message id).
    pub filled: Vec<String>,
    /// How fields mapped without an explicit `as:` are written: `sha256_email` (hashed, never
    /// sent raw), `unix_seconds`, `rfc3339`, ...
    pub formats: Vec<FieldFormat>,
}

/// The format a destination writes a field in unless the mapping says otherwise.
#[derive(Debug, Serialize, ToSchema)]
pub struct FieldFormat {
    pub field: String,
    pub format: sluice_engine::destination::ValueFormat,
}

/// A model column taken for a destination field by default.
#[derive(Debug, Serialize, ToSchema)]
pub struct FieldAlias {
    pub column: String,
    pub field: String,
}

/// What a dbt Cloud webhook did.
#[derive(Debug, Serialize, ToSchema)]
pub struct DbtWebhookAnswer {
    /// dbt Cloud's `eventId`.
    pub event_id: String,
    /// Whether the event says a job run succeeded (and was recorded).
    pub accepted: bool,
    /// Why it starts nothing, when it does not.
    pub reason: Option<String>,
    /// The mappings scheduled `after_dbt:` that it makes due; the scheduler starts them.
    pub mappings: Vec<String>,
}
