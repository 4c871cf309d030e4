//! The metadata store: runs, failed records and each mapping's committed state. SQLite in the
//! state directory by default (one machine); Postgres, selected by a `postgres://` URL in
//! `metadata_store:`, for several machines sharing one state. One code path serves both through
//! sqlx's `Any` driver; queries are written with `?` placeholders and numbered for Postgres.
//!
//! The commit point of a mapping's run is [`MetadataStore::commit_run`]: one transaction that
//! records the run's outcome and moves the mapping's baseline. Anything before it (snapshots,
//! exception files, failure rows of a run still `running`) is invisible to the next run.

use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyConnection, AnyPool, AssertSqlSafe, Executor, Row};

use crate::error::{EngineError, Result};

/// A mapping's committed state: what its destination has acknowledged.
#[derive(Debug, Clone, PartialEq)]
pub struct MappingState {
    pub mapping: String,
    pub model: String,
    /// `None` when the mapping's first run was cut short: the destination then holds only what
    /// the exceptions file lists.
    pub baseline_snapshot_id: Option<String>,
    /// Records whose acknowledged state differs from the baseline snapshot (failed deliveries,
    /// and records acknowledged by a run that never reached its own commit).
    pub exceptions_path: Option<String>,
    pub exceptions_rows: u64,
    pub last_run_id: String,
    /// Start of the latest run after which nothing was left undelivered (the Unix epoch when
    /// there has been none); what `{{last_sync_time}}` renders.
    pub last_success_at: DateTime<Utc>,
}

/// Who holds a mapping's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHolder {
    pub run_id: String,
    /// `host:pid`
    pub holder: String,
    pub since: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    Running,
    /// Every selected record was delivered.
    Succeeded,
    /// The run committed, but some records failed and will be retried.
    Partial,
    /// The run stopped on an error; what it delivered up to its last checkpoint is kept.
    Failed,
    /// The process stopped (or was stopped) before the run finished; what it delivered up to
    /// its last checkpoint is kept.
    Interrupted,
    /// Not run: a run of the same mapping was still going.
    Skipped,
    /// Stopped at a commit point because someone asked (`POST /api/v1/runs/{id}/cancel`); what
    /// it delivered up to its last checkpoint is kept, and the next run goes on from there.
    Cancelled,
}

impl RunStatus {
    /// Every status, in the order the API documents them.
    pub const ALL: [RunStatus; 7] = [
        RunStatus::Running,
        RunStatus::Succeeded,
        RunStatus::Partial,
        RunStatus::Failed,
        RunStatus::Interrupted,
        RunStatus::Skipped,
        RunStatus::Cancelled,
    ];

    pub fn is_finished(self) -> bool {
        self != RunStatus::Running
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Partial => "partial",
            RunStatus::Failed => "failed",
            RunStatus::Interrupted => "interrupted",
            RunStatus::Skipped => "skipped",
            RunStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "running" => RunStatus::Running,
            "succeeded" => RunStatus::Succeeded,
            "partial" => RunStatus::Partial,
            "failed" => RunStatus::Failed,
            "interrupted" => RunStatus::Interrupted,
            "skipped" => RunStatus::Skipped,
            "cancelled" => RunStatus::Cancelled,
            _ => return None,
        })
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What started a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Trigger {
    /// `sluice run` (or a run started by hand in the console).
    #[default]
    Manual,
    /// The scheduler of `sluice serve`.
    Schedule,
    /// A request to the HTTP API.
    Api,
    /// A full resync (`--full`): every row sent as added.
    Backfill,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Manual => "manual",
            Trigger::Schedule => "schedule",
            Trigger::Api => "api",
            Trigger::Backfill => "backfill",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "manual" => Trigger::Manual,
            "schedule" => Trigger::Schedule,
            "api" => Trigger::Api,
            "backfill" => Trigger::Backfill,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Record counts of a run (the load results).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunCounts {
    /// Rows the model returned.
    pub extracted: u64,
    pub added: u64,
    pub updated: u64,
    pub deleted: u64,
    /// Records put in a request to the destination (a record that failed before it could be
    /// sent is not counted).
    pub sent: u64,
    /// Records the destination acknowledged.
    pub delivered: u64,
    /// Records not delivered (rejected by the destination, or unsendable); kept for retry.
    pub failed: u64,
    /// Records that had failed in earlier runs and were tried again by this one.
    pub retried: u64,
    /// Changes the mapping's `send` does not select.
    pub skipped: u64,
}

/// Milliseconds spent per stage. Extraction is wall time; the others are summed over buckets
/// and batches of one mapping, and overlap (bucket diffs run in parallel with each other and
/// with delivery), so they add up to more than the run's duration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StageTimings {
    /// The model's query streamed into a committed snapshot.
    pub extract_ms: u64,
    /// Joins of the new snapshot with the baseline, bucket by bucket.
    pub diff_ms: u64,
    /// Reading the full rows of the changed records.
    pub read_ms: u64,
    /// Rendering the records' payloads.
    pub render_ms: u64,
    /// Requests to the destination, retries and rate-limit waits included.
    pub deliver_ms: u64,
    /// Commit points: intent and checkpoint files and their metadata transactions.
    pub checkpoint_ms: u64,
}

/// A run as recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    pub id: String,
    pub mapping: String,
    pub model: String,
    pub destination: String,
    pub status: RunStatus,
    pub trigger: Trigger,
    pub full_resync: bool,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub snapshot_id: Option<String>,
    pub baseline_snapshot_id: Option<String>,
    pub counts: RunCounts,
    pub timings: StageTimings,
    pub schema_change: Option<String>,
    pub error: Option<String>,
    /// What a user can do about `error`, when sluice knows.
    pub recommended_action: Option<String>,
    /// A dry run: computed what it would send, sent and committed nothing.
    pub dry_run: bool,
    /// A backfill limited to the rows matching this SQL predicate.
    pub filter: Option<String>,
    /// Someone asked the run to stop (it stops at its next commit point).
    pub cancel_requested: bool,
}

impl RunRecord {
    /// A run about to start.
    pub fn starting(mapping: &str, model: &str, destination: &str, full_resync: bool) -> Self {
        Self {
            id: uuid::Uuid::now_v7().to_string(),
            mapping: mapping.to_string(),
            model: model.to_string(),
            destination: destination.to_string(),
            status: RunStatus::Running,
            trigger: if full_resync {
                Trigger::Backfill
            } else {
                Trigger::Manual
            },
            full_resync,
            started_at: Utc::now(),
            finished_at: None,
            snapshot_id: None,
            baseline_snapshot_id: None,
            counts: RunCounts::default(),
            timings: StageTimings::default(),
            schema_change: None,
            error: None,
            recommended_action: None,
            dry_run: false,
            filter: None,
            cancel_requested: false,
        }
    }

    /// Wall-clock duration, once finished.
    pub fn duration(&self) -> Option<chrono::Duration> {
        self.finished_at.map(|end| end - self.started_at)
    }
}

/// Which runs [`MetadataStore::runs_page`] returns.
#[derive(Debug, Clone, Default)]
pub struct RunQuery {
    pub mapping: Option<String>,
    pub status: Option<RunStatus>,
    /// Start and id of the last run of the previous page.
    pub after: Option<(DateTime<Utc>, String)>,
    pub limit: u32,
}

/// A failed record of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct FailureRow {
    pub record_key: String,
    pub op: String,
    pub error: String,
    pub attempts: i64,
    pub first_failed_at: DateTime<Utc>,
    pub last_failed_at: DateTime<Utc>,
    /// The record as it was (or would have been) sent, truncated to a few KiB.
    pub payload: Option<String>,
}

/// The columns of a run's failed records as CSV (`sluice failures --csv`, and the API's
/// `Accept: text/csv`).
pub const FAILURE_CSV_HEADER: [&str; 7] = [
    "key",
    "operation",
    "error",
    "attempts",
    "first_failed_at",
    "last_failed_at",
    "payload",
];

/// Failed records as CSV lines, after the header line when `header`.
pub fn failures_csv(rows: &[FailureRow], header: bool) -> Vec<u8> {
    let mut out = csv::Writer::from_writer(Vec::new());
    // (Writing to memory cannot fail.)
    if header {
        let _ = out.write_record(FAILURE_CSV_HEADER);
    }
    for f in rows {
        let _ = out.write_record([
            f.record_key.as_str(),
            f.op.as_str(),
            f.error.as_str(),
            &f.attempts.to_string(),
            &f.first_failed_at.to_rfc3339(),
            &f.last_failed_at.to_rfc3339(),
            f.payload.as_deref().unwrap_or(""),
        ]);
    }
    out.into_inner().unwrap_or_default()
}

/// A commit point inside a run (see [`MetadataStore::checkpoint`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub run_id: String,
    pub seq: i64,
    /// Parquet file in the snapshot store.
    pub path: String,
    pub acknowledged: u64,
    pub failed: u64,
}

#[derive(Debug, Clone)]
pub struct MetadataStore {
    pool: AnyPool,
    location: String,
    backend: Backend,
    /// Bumped after every write to runs and their failed records made through this store (its
    /// clones included), so readers can tell that what they read before may have changed.
    writes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// SQLite takes one writer at a time, and a second one polls for the lock with growing
    /// sleeps; this process's write transactions queue here instead (runs of several mappings
    /// commit checkpoints at once).
    write_turns: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// How long a run's lease outlives its last renewal (see [`MetadataStore::with_lease_ttl`]).
    lease_ttl: Duration,
}

/// How long a lease lasts unless the project sets `lease_ttl`.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(60);

/// Which database holds the metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// `sql` with its `?` placeholders as the backend wants them (`$1`, `$2`, ... for Postgres;
    /// `?N` keeps its number).
    fn sql(self, sql: &str) -> AssertSqlSafe<String> {
        if self == Backend::Sqlite {
            return AssertSqlSafe(sql.to_string());
        }
        let mut out = String::with_capacity(sql.len() + 8);
        let mut next = 0;
        let mut quoted = false;
        let mut chars = sql.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\'' => {
                    quoted = !quoted;
                    out.push(c);
                }
                '?' if !quoted => {
                    let mut digits = String::new();
                    while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                        digits.push(*d);
                        chars.next();
                    }
                    if digits.is_empty() {
                        next += 1;
                        digits = next.to_string();
                    }
                    out.push('$');
                    out.push_str(&digits);
                }
                _ => out.push(c),
            }
        }
        AssertSqlSafe(out)
    }
}

impl MetadataStore {
    /// Opens the store `location` names: a `postgres://` (or `postgresql://`) URL, else the
    /// SQLite file at `sqlite_path`.
    pub async fn open(location: Option<&str>, sqlite_path: &Path) -> Result<Self> {
        match location {
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Self::open_postgres(url).await
            }
            Some(other) => Err(EngineError::Usage(format!(
                "metadata_store `{}` is not a postgres:// URL; leave it out to use SQLite in the state directory",
                redact(other)
            ))),
            None => Self::open_sqlite(sqlite_path).await,
        }
    }

    /// Opens (creating if needed) the SQLite metadata store at `path` and migrates it.
    pub async fn open_sqlite(path: &Path) -> Result<Self> {
        sqlx::any::install_default_drivers();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| EngineError::Internal(format!("cannot create {}: {e}", dir.display())))?;
        }
        let location = path.display().to_string();
        let absolute = std::path::absolute(path)
            .map_err(|e| EngineError::Internal(format!("cannot resolve {}: {e}", path.display())))?;
        let file_url = url::Url::from_file_path(&absolute)
            .map_err(|_| EngineError::Internal(format!("cannot turn {} into a URL", absolute.display())))?;
        let pool = AnyPoolOptions::new()
            .max_connections(4)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    // WAL with NORMAL survives a killed process; only an OS crash can lose the
                    // last commit.
                    conn.execute(
                        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                         PRAGMA busy_timeout = 30000; PRAGMA foreign_keys = ON;",
                    )
                    .await?;
                    Ok(())
                })
            })
            .connect(&format!("sqlite://{}?mode=rwc", file_url.path()))
            .await
            .map_err(|e| EngineError::Metadata {
                location: location.clone(),
                source: e,
            })?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        let store = Self {
            pool,
            location,
            backend: Backend::Sqlite,
            writes: Default::default(),
            write_turns: Default::default(),
            lease_ttl: DEFAULT_LEASE_TTL,
        };
        store.mark_dead_runs_interrupted().await?;
        Ok(store)
    }

    /// Opens the Postgres metadata store at `url` and migrates it (the database must exist).
    pub async fn open_postgres(url: &str) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let location = redact(url);
        let pool = AnyPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(30))
            .connect(url)
            .await
            .map_err(|e| EngineError::Metadata {
                location: location.clone(),
                source: e,
            })?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        let store = Self {
            pool,
            location,
            backend: Backend::Postgres,
            writes: Default::default(),
            write_turns: Default::default(),
            lease_ttl: DEFAULT_LEASE_TTL,
        };
        store.mark_dead_runs_interrupted().await?;
        Ok(store)
    }

    /// Leases taken through this store last `ttl` past their last renewal: a process that
    /// stops renewing (its machine died) holds its mappings this long. Every process sharing
    /// the store should use the same value.
    pub fn with_lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    pub fn lease_ttl(&self) -> Duration {
        self.lease_ttl
    }

    /// This process's turn to write, on SQLite (see `write_turns`); Postgres takes concurrent
    /// writers itself.
    async fn write_turn(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match self.backend {
            Backend::Sqlite => Some(self.write_turns.lock().await),
            Backend::Postgres => None,
        }
    }

    /// How many writes to runs this process has made: a reader that cached what it read can
    /// keep it while this has not moved (writes of other processes it cannot see).
    pub fn run_writes(&self) -> u64 {
        self.writes.load(std::sync::atomic::Ordering::Acquire)
    }

    fn wrote(&self) {
        self.writes.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The store's location with any password hidden.
    pub fn location(&self) -> &str {
        &self.location
    }

    pub(crate) fn sql(&self, sql: &str) -> AssertSqlSafe<String> {
        self.backend.sql(sql)
    }

    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub(crate) fn err(&self) -> impl Fn(sqlx::Error) -> EngineError + '_ {
        move |source| EngineError::Metadata {
            location: self.location.clone(),
            source,
        }
    }

    /// Runs left `running` by a process of this host that no longer exists were cut short.
    async fn mark_dead_runs_interrupted(&self) -> Result<()> {
        let host = hostname();
        let rows = sqlx::query(self.sql("SELECT id, pid FROM runs WHERE status = 'running' AND host = ?"))
            .bind(&host)
            .fetch_all(&self.pool)
            .await
            .map_err(self.err())?;
        for row in rows {
            let pid: i64 = row.get("pid");
            if pid != std::process::id() as i64 && !process_alive(pid) {
                let id: String = row.get("id");
                sqlx::query(self.sql(
                    "UPDATE runs SET status = 'interrupted', finished_at = ?, \
                     error = 'the process running it stopped before the run finished' \
                     WHERE id = ? AND status = 'running'",
                ))
                .bind(Utc::now().to_rfc3339())
                .bind(&id)
                .execute(&self.pool)
                .await
                .map_err(self.err())?;
            }
        }
        Ok(())
    }

    /// Claims `mapping` for `run_id` for the store's lease time. `Ok(None)` when claimed; otherwise the run that
    /// holds it and where. A lease that lapsed, that a dead process of this host held, or whose
    /// run is recorded as finished, is taken over. Atomic: SQLite serialises the upsert.
    pub async fn acquire_lease(&self, mapping: &str, run_id: &str) -> Result<Option<LeaseHolder>> {
        let holder = format!("{}:{}", hostname(), std::process::id());
        for _ in 0..2 {
            let now = Utc::now();
            let expires =
                now + chrono::Duration::from_std(self.lease_ttl).unwrap_or(chrono::Duration::seconds(60));
            let claimed = sqlx::query(self.sql(
                "INSERT INTO leases (mapping, run_id, holder, acquired_at, expires_at) VALUES (?, ?, ?, ?, ?) \
                 ON CONFLICT (mapping) DO UPDATE SET run_id = excluded.run_id, holder = excluded.holder, \
                 acquired_at = excluded.acquired_at, expires_at = excluded.expires_at \
                 WHERE leases.expires_at < excluded.acquired_at",
            ))
            .bind(mapping)
            .bind(run_id)
            .bind(&holder)
            .bind(now.to_rfc3339())
            .bind(expires.to_rfc3339())
            .execute(&self.pool)
            .await
            .map_err(self.err())?
            .rows_affected();
            if claimed == 1 {
                return Ok(None);
            }
            let row =
                sqlx::query(self.sql("SELECT run_id, holder, acquired_at FROM leases WHERE mapping = ?"))
                    .bind(mapping)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(self.err())?;
            let Some(row) = row else { continue };
            let current = LeaseHolder {
                run_id: row.get("run_id"),
                holder: row.get("holder"),
                since: parse_time(row.get("acquired_at")),
            };
            // A run recorded as finished no longer needs its lease: it is released right
            // after, but a caller that saw the run finish may ask before that.
            let finished = sqlx::query(self.sql("SELECT status FROM runs WHERE id = ?"))
                .bind(&current.run_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(self.err())?
                .is_some_and(|r| r.get::<String, _>("status") != RunStatus::Running.as_str());
            // A holder on this host whose process is gone will never release it.
            let dead = finished
                || current
                    .holder
                    .rsplit_once(':')
                    .filter(|(host, _)| *host == hostname())
                    .and_then(|(_, pid)| pid.parse::<i64>().ok())
                    .is_some_and(|pid| pid != std::process::id() as i64 && !process_alive(pid));
            if !dead {
                return Ok(Some(current));
            }
            sqlx::query(self.sql("DELETE FROM leases WHERE mapping = ? AND run_id = ?"))
                .bind(mapping)
                .bind(&current.run_id)
                .execute(&self.pool)
                .await
                .map_err(self.err())?;
        }
        Ok(None)
    }

    /// Who holds `mapping`'s lease, if it is held and has not lapsed.
    pub async fn lease(&self, mapping: &str) -> Result<Option<LeaseHolder>> {
        let row = sqlx::query(
            self.sql("SELECT run_id, holder, acquired_at FROM leases WHERE mapping = ? AND expires_at >= ?"),
        )
        .bind(mapping)
        .bind(Utc::now().to_rfc3339())
        .fetch_optional(&self.pool)
        .await
        .map_err(self.err())?;
        Ok(row.map(|row| LeaseHolder {
            run_id: row.get("run_id"),
            holder: row.get("holder"),
            since: parse_time(row.get("acquired_at")),
        }))
    }

    /// Extends a held lease; `false` when it is no longer this run's.
    pub async fn renew_lease(&self, mapping: &str, run_id: &str) -> Result<bool> {
        let expires =
            Utc::now() + chrono::Duration::from_std(self.lease_ttl).unwrap_or(chrono::Duration::seconds(60));
        let renewed =
            sqlx::query(self.sql("UPDATE leases SET expires_at = ? WHERE mapping = ? AND run_id = ?"))
                .bind(expires.to_rfc3339())
                .bind(mapping)
                .bind(run_id)
                .execute(&self.pool)
                .await
                .map_err(self.err())?
                .rows_affected();
        Ok(renewed == 1)
    }

    pub async fn release_lease(&self, mapping: &str, run_id: &str) -> Result<()> {
        sqlx::query(self.sql("DELETE FROM leases WHERE mapping = ? AND run_id = ?"))
            .bind(mapping)
            .bind(run_id)
            .execute(&self.pool)
            .await
            .map_err(self.err())?;
        Ok(())
    }

    pub async fn mapping_state(&self, mapping: &str) -> Result<Option<MappingState>> {
        let row = sqlx::query(self.sql("SELECT * FROM mapping_state WHERE mapping = ?"))
            .bind(mapping)
            .fetch_optional(&self.pool)
            .await
            .map_err(self.err())?;
        Ok(row.as_ref().map(state_from_row))
    }

    /// Every mapping's committed state.
    pub async fn mapping_states(&self) -> Result<Vec<MappingState>> {
        let rows = sqlx::query(self.sql("SELECT * FROM mapping_state ORDER BY mapping"))
            .fetch_all(&self.pool)
            .await
            .map_err(self.err())?;
        Ok(rows.iter().map(state_from_row).collect())
    }

    /// Runs whose results are not settled: still going, or stopped before their commit and not
    /// yet taken in by a later run.
    pub async fn unsettled_runs(&self) -> Result<Vec<RunRecord>> {
        let rows = sqlx::query(self.sql("SELECT * FROM runs WHERE settled = 0"))
            .fetch_all(&self.pool)
            .await
            .map_err(self.err())?;
        Ok(rows.iter().map(run_from_row).collect())
    }

    /// Records progress of a running run (its snapshot, counts so far).
    pub async fn update_run(&self, run: &RunRecord) -> Result<()> {
        let _writing = self.write_turn().await;
        let mut tx = self.pool.begin().await.map_err(self.err())?;
        update_run(self.backend, &mut tx, run).await.map_err(self.err())?;
        tx.commit().await.map_err(self.err())?;
        self.wrote();
        Ok(())
    }

    /// Records the start of a run.
    pub async fn start_run(&self, run: &RunRecord) -> Result<()> {
        sqlx::query(self.sql(
            "INSERT INTO runs (id, mapping, model, destination, status, run_trigger, full_resync, host, pid, started_at, settled, dry_run, row_filter) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        ))
        .bind(&run.id)
        .bind(&run.mapping)
        .bind(&run.model)
        .bind(&run.destination)
        .bind(run.status.as_str())
        .bind(run.trigger.as_str())
        .bind(run.full_resync as i64)
        .bind(hostname())
        .bind(std::process::id() as i64)
        .bind(run.started_at.to_rfc3339())
        // A skipped run and a dry run deliver nothing; any other may leave results to take in.
        .bind((run.status == RunStatus::Skipped || run.dry_run) as i64)
        .bind(run.dry_run as i64)
        .bind(&run.filter)
        .execute(&self.pool)
        .await
        .map_err(self.err())?;
        self.wrote();
        Ok(())
    }

    /// Adds failed records of a running run, outside of a checkpoint.
    pub async fn add_failures(&self, run_id: &str, failures: &[FailureRow]) -> Result<()> {
        let _writing = self.write_turn().await;
        let mut tx = self.pool.begin().await.map_err(self.err())?;
        insert_failures(self.backend, &mut tx, run_id, failures)
            .await
            .map_err(self.err())?;
        tx.commit().await.map_err(self.err())?;
        self.wrote();
        Ok(())
    }

    /// A commit point inside a run, in one transaction: the checkpoint file (already written)
    /// becomes part of the run's results, with the batch's failed records and the run's counts
    /// so far. Fails with [`EngineError::LeaseLost`] when the run no longer holds its mapping.
    pub async fn checkpoint(
        &self,
        run: &RunRecord,
        checkpoint: &Checkpoint,
        failures: &[FailureRow],
    ) -> Result<()> {
        let _writing = self.write_turn().await;
        let mut tx = self.pool.begin().await.map_err(self.err())?;
        self.hold_lease(&mut tx, run).await?;
        sqlx::query(self.sql(
            "INSERT INTO run_checkpoints (run_id, seq, path, acknowledged, failed, created_at) \
             VALUES (?, ?, ?, ?, ?, ?)",
        ))
        .bind(&checkpoint.run_id)
        .bind(checkpoint.seq)
        .bind(&checkpoint.path)
        .bind(checkpoint.acknowledged as i64)
        .bind(checkpoint.failed as i64)
        .bind(Utc::now().to_rfc3339())
        .execute(&mut *tx)
        .await
        .map_err(self.err())?;
        insert_failures(self.backend, &mut tx, &run.id, failures)
            .await
            .map_err(self.err())?;
        update_run(self.backend, &mut tx, run).await.map_err(self.err())?;
        tx.commit().await.map_err(self.err())?;
        self.wrote();
        Ok(())
    }

    /// Inside a transaction, renews `run`'s lease on its mapping, or fails with
    /// [`EngineError::LeaseLost`]. Renewing first also takes SQLite's write lock.
    async fn hold_lease(&self, tx: &mut AnyConnection, run: &RunRecord) -> Result<()> {
        if renew_in(self.backend, tx, &run.mapping, &run.id, self.lease_ttl)
            .await
            .map_err(self.err())?
        {
            Ok(())
        } else {
            Err(EngineError::LeaseLost {
                mapping: run.mapping.clone(),
                run_id: run.id.clone(),
            })
        }
    }

    /// The checkpoints of a run, in order.
    pub async fn checkpoints(&self, run_id: &str) -> Result<Vec<Checkpoint>> {
        let rows = sqlx::query(self.sql("SELECT * FROM run_checkpoints WHERE run_id = ? ORDER BY seq"))
            .bind(run_id)
            .fetch_all(&self.pool)
            .await
            .map_err(self.err())?;
        Ok(rows
            .iter()
            .map(|r| Checkpoint {
                run_id: r.get("run_id"),
                seq: r.get("seq"),
                path: r.get("path"),
                acknowledged: r.get::<i64, _>("acknowledged") as u64,
                failed: r.get::<i64, _>("failed") as u64,
            })
            .collect())
    }

    /// Earlier runs of `mapping` that never reached their commit and whose results are not yet
    /// part of the mapping's state (the caller holds the mapping's lease, so they are over).
    /// Oldest first.
    pub async fn runs_to_recover(&self, mapping: &str, current_run: &str) -> Result<Vec<RunRecord>> {
        let rows =
            sqlx::query(self.sql(
                "SELECT * FROM runs WHERE mapping = ? AND id <> ? AND settled = 0 ORDER BY started_at, id",
            ))
            .bind(mapping)
            .bind(current_run)
            .fetch_all(&self.pool)
            .await
            .map_err(self.err())?;
        Ok(rows.iter().map(run_from_row).collect())
    }

    /// Ends the recovery of a cut-short run in one transaction: the mapping's state takes in
    /// the run's checkpoints (when `state` is given), the checkpoints are dropped, and a run
    /// still marked `running` becomes `interrupted` with `note`.
    pub async fn finish_recovery(
        &self,
        run_id: &str,
        state: Option<&MappingState>,
        note: &str,
    ) -> Result<()> {
        let _writing = self.write_turn().await;
        let mut tx = self.pool.begin().await.map_err(self.err())?;
        if let Some(state) = state {
            upsert_state(self.backend, &mut tx, state)
                .await
                .map_err(self.err())?;
        }
        sqlx::query(self.sql("DELETE FROM run_checkpoints WHERE run_id = ?"))
            .bind(run_id)
            .execute(&mut *tx)
            .await
            .map_err(self.err())?;
        sqlx::query(self.sql(
            "UPDATE runs SET status = 'interrupted', finished_at = COALESCE(finished_at, ?), \
             error = COALESCE(error, 'the process running it stopped before the run finished') \
             WHERE id = ? AND status = 'running'",
        ))
        .bind(Utc::now().to_rfc3339())
        .bind(run_id)
        .execute(&mut *tx)
        .await
        .map_err(self.err())?;
        sqlx::query(self.sql("UPDATE runs SET settled = 1, error = COALESCE(error, '') || ? WHERE id = ?"))
            .bind(format!(" ({note})"))
            .bind(run_id)
            .execute(&mut *tx)
            .await
            .map_err(self.err())?;
        tx.commit().await.map_err(self.err())?;
        self.wrote();
        Ok(())
    }

    /// Records a run's outcome and, when `state` is given, moves the mapping's baseline, in one
    /// transaction: the commit point of a run. Moving the baseline needs the mapping's lease
    /// (a run whose lease lapsed and was taken over commits nothing); the run's checkpoints,
    /// now part of the state, are dropped.
    pub async fn commit_run(&self, run: &RunRecord, state: Option<&MappingState>) -> Result<()> {
        let _writing = self.write_turn().await;
        let mut tx = self.pool.begin().await.map_err(self.err())?;
        if let Some(state) = state {
            self.hold_lease(&mut tx, run).await?;
            upsert_state(self.backend, &mut tx, state)
                .await
                .map_err(self.err())?;
            sqlx::query(self.sql("UPDATE runs SET settled = 1 WHERE id = ?"))
                .bind(&run.id)
                .execute(&mut *tx)
                .await
                .map_err(self.err())?;
            sqlx::query(self.sql("DELETE FROM run_checkpoints WHERE run_id = ?"))
                .bind(&run.id)
                .execute(&mut *tx)
                .await
                .map_err(self.err())?;
        }
        update_run(self.backend, &mut tx, run).await.map_err(self.err())?;
        tx.commit().await.map_err(self.err())?;
        self.wrote();
        Ok(())
    }

    /// When each scheduled mapping was last fired by any process sharing this store.
    pub async fn schedule_fires(&self) -> Result<std::collections::HashMap<String, DateTime<Utc>>> {
        let rows = sqlx::query(self.sql("SELECT mapping, fired_at FROM schedule_fires"))
            .fetch_all(&self.pool)
            .await
            .map_err(self.err())?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<String, _>("mapping"), parse_time(r.get("fired_at"))))
            .collect())
    }

    /// Claims the scheduled fire of `mapping` at `at` for this process, provided no process
    /// fired it after `previous` (what the caller last saw; `None`: never fired). `true` when
    /// this process won the fire and should start the run; one process wins each fire time.
    pub async fn claim_fire(
        &self,
        mapping: &str,
        previous: Option<DateTime<Utc>>,
        at: DateTime<Utc>,
    ) -> Result<bool> {
        // RFC 3339 texts in UTC order as their instants; nothing is at or before "".
        let previous = previous.map(|t| t.to_rfc3339()).unwrap_or_default();
        let claimed = sqlx::query(self.sql(
            "INSERT INTO schedule_fires (mapping, fired_at, fired_by) VALUES (?, ?, ?) \
             ON CONFLICT (mapping) DO UPDATE SET fired_at = excluded.fired_at, fired_by = excluded.fired_by \
             WHERE schedule_fires.fired_at <= ?",
        ))
        .bind(mapping)
        .bind(at.to_rfc3339())
        .bind(format!("{}:{}", hostname(), std::process::id()))
        .bind(previous)
        .execute(&self.pool)
        .await
        .map_err(self.err())?
        .rows_affected();
        Ok(claimed == 1)
    }

    /// The latest run of each mapping (for the scheduler's interval anchors).
    pub async fn last_runs(&self) -> Result<std::collections::HashMap<String, RunRecord>> {
        let rows = sqlx::query(self.sql(
            "SELECT * FROM runs r WHERE started_at = (SELECT MAX(started_at) FROM runs WHERE mapping = r.mapping)"),
        )
        .fetch_all(&self.pool)
        .await
        .map_err(self.err())?;
        Ok(rows
            .iter()
            .map(run_from_row)
            .map(|r| (r.mapping.clone(), r))
            .collect())
    }

    /// When each mapping's latest successful run finished (what `after:` schedules wait for).
    pub async fn last_successes(&self) -> Result<std::collections::HashMap<String, DateTime<Utc>>> {
        // (RFC 3339 texts in UTC order as their instants do, whole seconds and fractions alike.)
        let rows = sqlx::query(self.sql(
            "SELECT mapping, MAX(finished_at) AS finished_at FROM runs \
             WHERE status = 'succeeded' AND dry_run = 0 AND finished_at IS NOT NULL GROUP BY mapping",
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(self.err())?;
        Ok(rows
            .iter()
            .map(|row| (row.get("mapping"), parse_time(row.get("finished_at"))))
            .collect())
    }

    /// Records that the external event `name` happened at `at` (told by `detail`); an older
    /// time than the one recorded changes nothing, so the same event told twice (a webhook
    /// retried, a file seen by several processes) counts once. `true` when it was newer.
    pub async fn record_event(&self, name: &str, at: DateTime<Utc>, detail: &str) -> Result<bool> {
        let recorded = sqlx::query(self.sql(
            "INSERT INTO external_events (name, happened_at, detail) VALUES (?, ?, ?) \
             ON CONFLICT (name) DO UPDATE SET happened_at = excluded.happened_at, detail = excluded.detail \
             WHERE external_events.happened_at < excluded.happened_at",
        ))
        .bind(name)
        .bind(at.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true))
        .bind(detail)
        .execute(&self.pool)
        .await
        .map_err(self.err())?
        .rows_affected();
        Ok(recorded == 1)
    }

    /// When each external event last happened (what `after_dbt:` schedules wait for).
    pub async fn external_events(&self) -> Result<std::collections::HashMap<String, DateTime<Utc>>> {
        let rows = sqlx::query(self.sql("SELECT name, happened_at FROM external_events"))
            .fetch_all(&self.pool)
            .await
            .map_err(self.err())?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<String, _>("name"), parse_time(r.get("happened_at"))))
            .collect())
    }

    pub async fn run(&self, id: &str) -> Result<Option<RunRecord>> {
        let row = sqlx::query(self.sql("SELECT * FROM runs WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(self.err())?;
        Ok(row.map(|r| run_from_row(&r)))
    }

    /// A run by its id or the tail of its id (as `sluice runs` shows it); `Err(Usage)` when the
    /// tail fits several runs.
    pub async fn find_run(&self, id: &str) -> Result<Option<RunRecord>> {
        if let Some(run) = self.run(id).await? {
            return Ok(Some(run));
        }
        if id.len() < 6 {
            return Ok(None);
        }
        let rows = sqlx::query(
            self.sql("SELECT * FROM runs WHERE id LIKE '%' || ? ORDER BY started_at DESC LIMIT 2"),
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .map_err(self.err())?;
        match rows.len() {
            0 => Ok(None),
            1 => Ok(Some(run_from_row(&rows[0]))),
            _ => Err(EngineError::Usage(format!(
                "`{id}` ends more than one run id; give more of it"
            ))),
        }
    }

    /// Most recent runs first.
    pub async fn runs(&self, mapping: Option<&str>, limit: u32) -> Result<Vec<RunRecord>> {
        let query = match mapping {
            Some(mapping) => sqlx::query(
                self.sql("SELECT * FROM runs WHERE mapping = ? ORDER BY started_at DESC, id DESC LIMIT ?"),
            )
            .bind(mapping),
            None => sqlx::query(self.sql("SELECT * FROM runs ORDER BY started_at DESC, id DESC LIMIT ?")),
        };
        let rows = query
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(self.err())?;
        Ok(rows.iter().map(run_from_row).collect())
    }

    /// A page of runs, most recent first: those of `query.mapping` and `query.status` when
    /// given, strictly after `query.after` (the last run of the previous page) when given.
    pub async fn runs_page(&self, query: &RunQuery) -> Result<Vec<RunRecord>> {
        let mut sql = String::from("SELECT * FROM runs WHERE 1 = 1");
        if query.mapping.is_some() {
            sql.push_str(" AND mapping = ?");
        }
        if query.status.is_some() {
            sql.push_str(" AND status = ?");
        }
        if query.after.is_some() {
            sql.push_str(" AND (started_at < ? OR (started_at = ? AND id < ?))");
        }
        sql.push_str(" ORDER BY started_at DESC, id DESC LIMIT ?");
        let mut q = sqlx::query(self.sql(&sql));
        if let Some(mapping) = &query.mapping {
            q = q.bind(mapping.as_str());
        }
        if let Some(status) = query.status {
            q = q.bind(status.as_str());
        }
        if let Some((started_at, id)) = &query.after {
            let started_at = started_at.to_rfc3339();
            q = q.bind(started_at.clone()).bind(started_at).bind(id.as_str());
        }
        let rows = q
            .bind(query.limit as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(self.err())?;
        Ok(rows.iter().map(run_from_row).collect())
    }

    /// Asks a running run to stop at its next commit point; `false` when it is not running.
    pub async fn request_cancel(&self, run_id: &str) -> Result<bool> {
        let marked =
            sqlx::query(self.sql("UPDATE runs SET cancel_requested = 1 WHERE id = ? AND status = 'running'"))
                .bind(run_id)
                .execute(&self.pool)
                .await
                .map_err(self.err())?
                .rows_affected();
        self.wrote();
        Ok(marked == 1)
    }

    /// Which of `run_ids` someone asked to stop.
    pub async fn cancel_requests(&self, run_ids: &[String]) -> Result<Vec<String>> {
        if run_ids.is_empty() {
            return Ok(Vec::new());
        }
        let marks = vec!["?"; run_ids.len()].join(", ");
        let sql = format!("SELECT id FROM runs WHERE cancel_requested = 1 AND id IN ({marks})");
        let mut q = sqlx::query(self.sql(&sql));
        for id in run_ids {
            q = q.bind(id.as_str());
        }
        let rows = q.fetch_all(&self.pool).await.map_err(self.err())?;
        Ok(rows.iter().map(|r| r.get::<String, _>("id")).collect())
    }

    /// A run's failed records, in the order they failed, from `offset`.
    pub async fn failures(&self, run_id: &str, offset: u64, limit: u32) -> Result<Vec<FailureRow>> {
        // (Failures are kept in insertion order: SQLite's rowid, Postgres's `seq`.)
        let sql = match self.backend {
            Backend::Sqlite => "SELECT * FROM run_failures WHERE run_id = ? ORDER BY rowid LIMIT ? OFFSET ?",
            Backend::Postgres => "SELECT * FROM run_failures WHERE run_id = ? ORDER BY seq LIMIT ? OFFSET ?",
        };
        let rows = sqlx::query(self.sql(sql))
            .bind(run_id)
            .bind(limit as i64)
            .bind(offset as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(self.err())?;
        Ok(rows
            .iter()
            .map(|r| FailureRow {
                record_key: r.get("record_key"),
                op: r.get("op"),
                error: r.get("error"),
                attempts: r.get("attempts"),
                first_failed_at: parse_time(r.get("first_failed_at")),
                last_failed_at: r
                    .get::<Option<String>, _>("last_failed_at")
                    .map(|t| parse_time(&t))
                    .unwrap_or_else(|| parse_time(r.get("first_failed_at"))),
                payload: r.get("payload"),
            })
            .collect())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

async fn renew_in(
    backend: Backend,
    tx: &mut AnyConnection,
    mapping: &str,
    run_id: &str,
    ttl: Duration,
) -> sqlx::Result<bool> {
    let expires = Utc::now() + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::seconds(60));
    let renewed =
        sqlx::query(backend.sql("UPDATE leases SET expires_at = ? WHERE mapping = ? AND run_id = ?"))
            .bind(expires.to_rfc3339())
            .bind(mapping)
            .bind(run_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
    Ok(renewed == 1)
}

/// Failed records in bulk: one statement per thousand, never one per record.
async fn insert_failures(
    backend: Backend,
    tx: &mut AnyConnection,
    run_id: &str,
    failures: &[FailureRow],
) -> sqlx::Result<()> {
    const COLUMNS: usize = 8;
    for chunk in failures.chunks(1000) {
        let mut sql = String::from(
            "INSERT INTO run_failures (run_id, record_key, op, error, attempts, first_failed_at, last_failed_at, payload) VALUES ",
        );
        for i in 0..chunk.len() {
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push('(');
            sql.push_str(&["?"; COLUMNS].join(", "));
            sql.push(')');
        }
        let mut query = sqlx::query(backend.sql(&sql));
        for f in chunk {
            query = query
                .bind(run_id)
                .bind(f.record_key.as_str())
                .bind(f.op.as_str())
                // (Scrubbed of secrets where the run took the destination's answer in.)
                .bind(f.error.as_str())
                .bind(f.attempts)
                .bind(f.first_failed_at.to_rfc3339())
                .bind(f.last_failed_at.to_rfc3339())
                .bind(f.payload.as_deref());
        }
        query.execute(&mut *tx).await?;
    }
    Ok(())
}

async fn update_run(backend: Backend, tx: &mut AnyConnection, run: &RunRecord) -> sqlx::Result<()> {
    sqlx::query(backend.sql(
        "UPDATE runs SET status = ?, finished_at = ?, snapshot_id = ?, baseline_snapshot_id = ?, \
         extracted = ?, added = ?, updated = ?, deleted = ?, sent = ?, delivered = ?, failed = ?, \
         retried = ?, skipped = ?, extract_ms = ?, diff_ms = ?, deliver_ms = ?, read_ms = ?, \
         render_ms = ?, checkpoint_ms = ?, schema_change = ?, error = ?, recommended_action = ? \
         WHERE id = ?",
    ))
    .bind(run.status.as_str())
    .bind(run.finished_at.map(|t| t.to_rfc3339()))
    .bind(&run.snapshot_id)
    .bind(&run.baseline_snapshot_id)
    .bind(run.counts.extracted as i64)
    .bind(run.counts.added as i64)
    .bind(run.counts.updated as i64)
    .bind(run.counts.deleted as i64)
    .bind(run.counts.sent as i64)
    .bind(run.counts.delivered as i64)
    .bind(run.counts.failed as i64)
    .bind(run.counts.retried as i64)
    .bind(run.counts.skipped as i64)
    .bind(run.timings.extract_ms as i64)
    .bind(run.timings.diff_ms as i64)
    .bind(run.timings.deliver_ms as i64)
    .bind(run.timings.read_ms as i64)
    .bind(run.timings.render_ms as i64)
    .bind(run.timings.checkpoint_ms as i64)
    .bind(&run.schema_change)
    .bind(
        run.error
            .as_deref()
            .map(|e| crate::secrets::scrub_known(e).into_owned()),
    )
    .bind(&run.recommended_action)
    .bind(&run.id)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

async fn upsert_state(backend: Backend, tx: &mut AnyConnection, state: &MappingState) -> sqlx::Result<()> {
    sqlx::query(backend.sql(
        "INSERT INTO mapping_state (mapping, model, baseline_snapshot_id, exceptions_path, \
         exceptions_rows, last_run_id, last_success_at) VALUES (?, ?, ?, ?, ?, ?, ?) \
         ON CONFLICT (mapping) DO UPDATE SET model = excluded.model, \
         baseline_snapshot_id = excluded.baseline_snapshot_id, \
         exceptions_path = excluded.exceptions_path, exceptions_rows = excluded.exceptions_rows, \
         last_run_id = excluded.last_run_id, last_success_at = excluded.last_success_at",
    ))
    .bind(&state.mapping)
    .bind(&state.model)
    .bind(&state.baseline_snapshot_id)
    .bind(&state.exceptions_path)
    .bind(state.exceptions_rows as i64)
    .bind(&state.last_run_id)
    .bind(state.last_success_at.to_rfc3339())
    .execute(&mut *tx)
    .await?;
    Ok(())
}

fn state_from_row(row: &AnyRow) -> MappingState {
    MappingState {
        mapping: row.get("mapping"),
        model: row.get("model"),
        baseline_snapshot_id: row.get("baseline_snapshot_id"),
        exceptions_path: row.get("exceptions_path"),
        exceptions_rows: row.get::<i64, _>("exceptions_rows") as u64,
        last_run_id: row.get("last_run_id"),
        last_success_at: parse_time(row.get("last_success_at")),
    }
}

fn run_from_row(r: &AnyRow) -> RunRecord {
    let count = |name: &str| r.get::<i64, _>(name) as u64;
    let millis = |name: &str| r.get::<Option<i64>, _>(name).unwrap_or(0) as u64;
    RunRecord {
        id: r.get("id"),
        mapping: r.get("mapping"),
        model: r.get("model"),
        destination: r.get("destination"),
        status: RunStatus::parse(r.get("status")).unwrap_or(RunStatus::Failed),
        trigger: Trigger::parse(r.get("run_trigger")).unwrap_or_default(),
        full_resync: r.get::<i64, _>("full_resync") != 0,
        started_at: parse_time(r.get("started_at")),
        finished_at: r.get::<Option<String>, _>("finished_at").map(|t| parse_time(&t)),
        snapshot_id: r.get("snapshot_id"),
        baseline_snapshot_id: r.get("baseline_snapshot_id"),
        counts: RunCounts {
            extracted: count("extracted"),
            added: count("added"),
            updated: count("updated"),
            deleted: count("deleted"),
            sent: count("sent"),
            delivered: count("delivered"),
            failed: count("failed"),
            retried: count("retried"),
            skipped: count("skipped"),
        },
        timings: StageTimings {
            extract_ms: millis("extract_ms"),
            diff_ms: millis("diff_ms"),
            deliver_ms: millis("deliver_ms"),
            read_ms: millis("read_ms"),
            render_ms: millis("render_ms"),
            checkpoint_ms: millis("checkpoint_ms"),
        },
        schema_change: r.get("schema_change"),
        error: r.get("error"),
        recommended_action: r.get("recommended_action"),
        dry_run: r.get::<i64, _>("dry_run") != 0,
        filter: r.get("row_filter"),
        cancel_requested: r.get::<i64, _>("cancel_requested") != 0,
    }
}

/// A database URL without its password, for messages.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_string(),
    }
}

pub(crate) fn parse_time(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_default()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "localhost".to_string())
}

fn process_alive(pid: i64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, status: RunStatus) -> RunRecord {
        RunRecord {
            id: id.into(),
            status,
            ..RunRecord::starting("m", "users", "crm", false)
        }
    }

    #[tokio::test]
    async fn a_committed_run_moves_the_baseline_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetadataStore::open_sqlite(&dir.path().join("meta.db"))
            .await
            .unwrap();
        assert!(store.mapping_state("m").await.unwrap().is_none());
        let mut run = record("r1", RunStatus::Running);
        store.start_run(&run).await.unwrap();
        store
            .add_failures(
                "r1",
                &[FailureRow {
                    record_key: r#"{"id":1}"#.into(),
                    op: "added".into(),
                    error: "bad".into(),
                    attempts: 1,
                    first_failed_at: Utc::now(),
                    last_failed_at: Utc::now(),
                    payload: Some(r#"{"id":1}"#.into()),
                }],
            )
            .await
            .unwrap();
        run.status = RunStatus::Partial;
        run.counts.failed = 1;
        run.finished_at = Some(Utc::now());
        let state = MappingState {
            mapping: "m".into(),
            model: "users".into(),
            baseline_snapshot_id: Some("s1".into()),
            exceptions_path: Some("mappings/m/exceptions/r1.parquet".into()),
            exceptions_rows: 1,
            last_run_id: "r1".into(),
            last_success_at: run.started_at,
        };
        // Moving the baseline needs the mapping's lease.
        assert!(matches!(
            store.commit_run(&run, Some(&state)).await,
            Err(EngineError::LeaseLost { .. })
        ));
        assert_eq!(store.acquire_lease("m", "r1").await.unwrap(), None);
        store.commit_run(&run, Some(&state)).await.unwrap();
        let stored = store.mapping_state("m").await.unwrap().unwrap();
        assert_eq!(stored.baseline_snapshot_id.as_deref(), Some("s1"));
        assert_eq!(stored.exceptions_rows, 1);
        let runs = store.runs(Some("m"), 10).await.unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].status, RunStatus::Partial);
        assert_eq!(store.failures("r1", 0, 10).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn runs_of_dead_processes_are_marked_interrupted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.db");
        let store = MetadataStore::open_sqlite(&path).await.unwrap();
        store.start_run(&record("r1", RunStatus::Running)).await.unwrap();
        sqlx::query("UPDATE runs SET pid = 999999999")
            .execute(&store.pool)
            .await
            .unwrap();
        store.close().await;
        let store = MetadataStore::open_sqlite(&path).await.unwrap();
        let run = store.run("r1").await.unwrap().unwrap();
        assert_eq!(run.status, RunStatus::Interrupted);
    }

    #[tokio::test]
    async fn each_scheduled_fire_is_claimed_once() {
        let dir = tempfile::tempdir().unwrap();
        let one = MetadataStore::open_sqlite(&dir.path().join("m.db"))
            .await
            .unwrap();
        let two = one.clone();
        let t = |s: i64| DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap();
        // The first fire of a mapping: one of two schedulers that saw no fire wins it.
        assert!(one.claim_fire("m", None, t(0)).await.unwrap());
        assert!(!two.claim_fire("m", None, t(0)).await.unwrap());
        assert_eq!(one.schedule_fires().await.unwrap()["m"], t(0));
        // The next fire: whoever claims it first, having seen the last one; a claim made on
        // an older view loses.
        assert!(two.claim_fire("m", Some(t(0)), t(60)).await.unwrap());
        assert!(!one.claim_fire("m", Some(t(0)), t(61)).await.unwrap());
        assert_eq!(two.schedule_fires().await.unwrap()["m"], t(60));
        // Mappings are independent.
        assert!(one.claim_fire("other", None, t(61)).await.unwrap());
    }

    #[tokio::test]
    async fn an_external_event_keeps_its_latest_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetadataStore::open_sqlite(&dir.path().join("m.db"))
            .await
            .unwrap();
        let t = |s: i64, nanos: u32| DateTime::from_timestamp(1_800_000_000 + s, nanos).unwrap();
        assert!(store.record_event("dbt_job:1", t(0, 500), "wev_1").await.unwrap());
        // Told again (a retried webhook): nothing changes.
        assert!(!store.record_event("dbt_job:1", t(0, 500), "wev_1").await.unwrap());
        // An older event (delivered late) does not move it back; a fraction later does.
        assert!(!store.record_event("dbt_job:1", t(-60, 0), "wev_0").await.unwrap());
        assert!(store.record_event("dbt_job:1", t(0, 600), "wev_2").await.unwrap());
        assert!(store.record_event("dbt_job:1", t(9, 0), "wev_3").await.unwrap());
        assert!(
            store
                .record_event("dbt_node:model.a.b", t(1, 0), "inv")
                .await
                .unwrap()
        );
        let events = store.external_events().await.unwrap();
        assert_eq!(events["dbt_job:1"], t(9, 0));
        assert_eq!(events["dbt_node:model.a.b"], t(1, 0));
    }

    #[tokio::test]
    async fn a_mapping_is_leased_to_one_run_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetadataStore::open_sqlite(&dir.path().join("m.db"))
            .await
            .unwrap();
        assert_eq!(store.acquire_lease("m", "run-1").await.unwrap(), None);
        let held = store.acquire_lease("m", "run-2").await.unwrap().expect("held");
        assert_eq!(held.run_id, "run-1");
        assert!(held.holder.ends_with(&format!(":{}", std::process::id())));
        // Another mapping is independent.
        assert_eq!(store.acquire_lease("other", "run-3").await.unwrap(), None);
        assert!(store.renew_lease("m", "run-1").await.unwrap());
        assert!(!store.renew_lease("m", "run-2").await.unwrap());
        store.release_lease("m", "run-1").await.unwrap();
        assert_eq!(store.acquire_lease("m", "run-2").await.unwrap(), None);

        // A lapsed lease is taken over.
        store.release_lease("m", "run-2").await.unwrap();
        assert_eq!(
            store
                .clone()
                .with_lease_ttl(Duration::from_millis(1))
                .acquire_lease("m", "run-4")
                .await
                .unwrap(),
            None
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(store.acquire_lease("m", "run-5").await.unwrap(), None);

        // A lease of a process of this host that is gone is taken over at once.
        sqlx::query("UPDATE leases SET holder = ?, run_id = 'run-dead' WHERE mapping = 'm'")
            .bind(format!("{}:{}", hostname(), i32::MAX))
            .execute(&store.pool)
            .await
            .unwrap();
        assert_eq!(store.acquire_lease("m", "run-6").await.unwrap(), None);

        // The lease of a run recorded as finished is free, even before it is released: a
        // client that saw the run finish may start the next one at once.
        store.release_lease("m", "run-6").await.unwrap();
        let mut run = RunRecord::starting("m", "users", "crm", false);
        assert_eq!(store.acquire_lease("m", &run.id).await.unwrap(), None);
        store.start_run(&run).await.unwrap();
        let held = store.acquire_lease("m", "run-7").await.unwrap().expect("held");
        assert_eq!(held.run_id, run.id);
        run.status = RunStatus::Succeeded;
        run.finished_at = Some(Utc::now());
        store.commit_run(&run, None).await.unwrap();
        assert_eq!(store.acquire_lease("m", "run-7").await.unwrap(), None);
    }
}
