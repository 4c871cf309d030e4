//! The metadata store: runs, failed records and each mapping's committed state, in SQLite
//! (through sqlx, so a Postgres store can sit beside it for several workers).
//!
//! The commit point of a mapping's run is [`MetadataStore::commit_run`]: one transaction that
//! records the run's outcome and moves the mapping's baseline. Anything before it (snapshots,
//! exception files, failure rows of a run still `running`) is invisible to the next run.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, SqlitePool};

use crate::error::{EngineError, Result};

/// A mapping's committed state: what its destination has acknowledged.
#[derive(Debug, Clone, PartialEq)]
pub struct MappingState {
    pub mapping: String,
    pub model: String,
    pub baseline_snapshot_id: String,
    /// Records whose acknowledged state differs from the baseline snapshot (failed deliveries).
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
    /// Nothing was committed.
    Failed,
    /// The process stopped before the run finished; nothing was committed.
    Interrupted,
    /// Not run: a run of the same mapping was still going.
    Skipped,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Partial => "partial",
            RunStatus::Failed => "failed",
            RunStatus::Interrupted => "interrupted",
            RunStatus::Skipped => "skipped",
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
            _ => return None,
        })
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Record counts of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunCounts {
    pub extracted: u64,
    pub added: u64,
    pub updated: u64,
    pub deleted: u64,
    pub delivered: u64,
    pub failed: u64,
    /// Changes the mapping's `send` does not select.
    pub skipped: u64,
}

/// Milliseconds spent per stage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StageTimings {
    pub extract_ms: u64,
    pub diff_ms: u64,
    pub deliver_ms: u64,
}

/// A run as recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    pub id: String,
    pub mapping: String,
    pub model: String,
    pub destination: String,
    pub status: RunStatus,
    pub full_resync: bool,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub snapshot_id: Option<String>,
    pub baseline_snapshot_id: Option<String>,
    pub counts: RunCounts,
    pub timings: StageTimings,
    pub schema_change: Option<String>,
    pub error: Option<String>,
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
            full_resync,
            started_at: Utc::now(),
            finished_at: None,
            snapshot_id: None,
            baseline_snapshot_id: None,
            counts: RunCounts::default(),
            timings: StageTimings::default(),
            schema_change: None,
            error: None,
        }
    }
}

/// A failed record of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct FailureRow {
    pub record_key: String,
    pub op: String,
    pub error: String,
    pub attempts: i64,
    pub first_failed_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct MetadataStore {
    pool: SqlitePool,
    location: String,
}

impl MetadataStore {
    /// Opens (creating if needed) the SQLite metadata store at `path` and migrates it.
    pub async fn open_sqlite(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| EngineError::Internal(format!("cannot create {}: {e}", dir.display())))?;
        }
        let location = path.display().to_string();
        let options = SqliteConnectOptions::from_str("sqlite://")
            .map_err(|e| EngineError::Metadata {
                location: location.clone(),
                source: e,
            })?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // WAL with NORMAL survives a killed process; only an OS crash can lose the last commit.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(30))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(|e| EngineError::Metadata {
                location: location.clone(),
                source: e,
            })?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        let store = Self { pool, location };
        store.mark_dead_runs_interrupted().await?;
        Ok(store)
    }

    fn err(&self) -> impl Fn(sqlx::Error) -> EngineError + '_ {
        move |source| EngineError::Metadata {
            location: self.location.clone(),
            source,
        }
    }

    /// Runs left `running` by a process of this host that no longer exists were cut short.
    async fn mark_dead_runs_interrupted(&self) -> Result<()> {
        let host = hostname();
        let rows = sqlx::query("SELECT id, pid FROM runs WHERE status = 'running' AND host = ?")
            .bind(&host)
            .fetch_all(&self.pool)
            .await
            .map_err(self.err())?;
        for row in rows {
            let pid: i64 = row.get("pid");
            if pid != std::process::id() as i64 && !process_alive(pid) {
                let id: String = row.get("id");
                sqlx::query(
                    "UPDATE runs SET status = 'interrupted', finished_at = ?, \
                     error = 'the process running it stopped before the run finished; nothing was committed' \
                     WHERE id = ? AND status = 'running'",
                )
                .bind(Utc::now().to_rfc3339())
                .bind(&id)
                .execute(&self.pool)
                .await
                .map_err(self.err())?;
            }
        }
        Ok(())
    }

    /// Claims `mapping` for `run_id` for `ttl`. `Ok(None)` when claimed; otherwise the run that
    /// holds it and where. A lease that lapsed, or that a dead process of this host held, is
    /// taken over. Atomic: SQLite serialises the upsert.
    pub async fn acquire_lease(
        &self,
        mapping: &str,
        run_id: &str,
        ttl: Duration,
    ) -> Result<Option<LeaseHolder>> {
        let holder = format!("{}:{}", hostname(), std::process::id());
        for _ in 0..2 {
            let now = Utc::now();
            let expires = now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::seconds(60));
            let claimed = sqlx::query(
                "INSERT INTO leases (mapping, run_id, holder, acquired_at, expires_at) VALUES (?, ?, ?, ?, ?) \
                 ON CONFLICT (mapping) DO UPDATE SET run_id = excluded.run_id, holder = excluded.holder, \
                 acquired_at = excluded.acquired_at, expires_at = excluded.expires_at \
                 WHERE leases.expires_at < excluded.acquired_at",
            )
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
            let row = sqlx::query("SELECT run_id, holder, acquired_at FROM leases WHERE mapping = ?")
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
            // A holder on this host whose process is gone will never release it.
            let dead = current
                .holder
                .rsplit_once(':')
                .filter(|(host, _)| *host == hostname())
                .and_then(|(_, pid)| pid.parse::<i64>().ok())
                .is_some_and(|pid| pid != std::process::id() as i64 && !process_alive(pid));
            if !dead {
                return Ok(Some(current));
            }
            sqlx::query("DELETE FROM leases WHERE mapping = ? AND run_id = ?")
                .bind(mapping)
                .bind(&current.run_id)
                .execute(&self.pool)
                .await
                .map_err(self.err())?;
        }
        Ok(None)
    }

    /// Extends a held lease; `false` when it is no longer this run's.
    pub async fn renew_lease(&self, mapping: &str, run_id: &str, ttl: Duration) -> Result<bool> {
        let expires = Utc::now() + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::seconds(60));
        let renewed = sqlx::query("UPDATE leases SET expires_at = ? WHERE mapping = ? AND run_id = ?")
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
        sqlx::query("DELETE FROM leases WHERE mapping = ? AND run_id = ?")
            .bind(mapping)
            .bind(run_id)
            .execute(&self.pool)
            .await
            .map_err(self.err())?;
        Ok(())
    }

    pub async fn mapping_state(&self, mapping: &str) -> Result<Option<MappingState>> {
        let row = sqlx::query("SELECT * FROM mapping_state WHERE mapping = ?")
            .bind(mapping)
            .fetch_optional(&self.pool)
            .await
            .map_err(self.err())?;
        Ok(row.map(|row| MappingState {
            mapping: row.get("mapping"),
            model: row.get("model"),
            baseline_snapshot_id: row.get("baseline_snapshot_id"),
            exceptions_path: row.get("exceptions_path"),
            exceptions_rows: row.get::<i64, _>("exceptions_rows") as u64,
            last_run_id: row.get("last_run_id"),
            last_success_at: parse_time(row.get("last_success_at")),
        }))
    }

    /// Records the start of a run.
    pub async fn start_run(&self, run: &RunRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO runs (id, mapping, model, destination, status, full_resync, host, pid, started_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&run.id)
        .bind(&run.mapping)
        .bind(&run.model)
        .bind(&run.destination)
        .bind(run.status.as_str())
        .bind(run.full_resync)
        .bind(hostname())
        .bind(std::process::id() as i64)
        .bind(run.started_at.to_rfc3339())
        .execute(&self.pool)
        .await
        .map_err(self.err())?;
        Ok(())
    }

    /// Adds failed records of a running run (one statement per chunk, never one per record).
    pub async fn add_failures(&self, run_id: &str, failures: &[FailureRow]) -> Result<()> {
        for chunk in failures.chunks(1000) {
            let mut query = QueryBuilder::new(
                "INSERT INTO run_failures (run_id, record_key, op, error, attempts, first_failed_at) ",
            );
            query.push_values(chunk, |mut row, f| {
                row.push_bind(run_id)
                    .push_bind(&f.record_key)
                    .push_bind(&f.op)
                    .push_bind(&f.error)
                    .push_bind(f.attempts)
                    .push_bind(f.first_failed_at.to_rfc3339());
            });
            query.build().execute(&self.pool).await.map_err(self.err())?;
        }
        Ok(())
    }

    /// Records a run's outcome and, when `state` is given, moves the mapping's baseline, in one
    /// transaction: the commit point of a run.
    pub async fn commit_run(&self, run: &RunRecord, state: Option<&MappingState>) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(self.err())?;
        sqlx::query(
            "UPDATE runs SET status = ?, finished_at = ?, snapshot_id = ?, baseline_snapshot_id = ?, \
             extracted = ?, added = ?, updated = ?, deleted = ?, delivered = ?, failed = ?, skipped = ?, \
             extract_ms = ?, diff_ms = ?, deliver_ms = ?, schema_change = ?, error = ? WHERE id = ?",
        )
        .bind(run.status.as_str())
        .bind(run.finished_at.map(|t| t.to_rfc3339()))
        .bind(&run.snapshot_id)
        .bind(&run.baseline_snapshot_id)
        .bind(run.counts.extracted as i64)
        .bind(run.counts.added as i64)
        .bind(run.counts.updated as i64)
        .bind(run.counts.deleted as i64)
        .bind(run.counts.delivered as i64)
        .bind(run.counts.failed as i64)
        .bind(run.counts.skipped as i64)
        .bind(run.timings.extract_ms as i64)
        .bind(run.timings.diff_ms as i64)
        .bind(run.timings.deliver_ms as i64)
        .bind(&run.schema_change)
        .bind(&run.error)
        .bind(&run.id)
        .execute(&mut *tx)
        .await
        .map_err(self.err())?;
        if let Some(state) = state {
            sqlx::query(
                "INSERT INTO mapping_state (mapping, model, baseline_snapshot_id, exceptions_path, \
                 exceptions_rows, last_run_id, last_success_at) VALUES (?, ?, ?, ?, ?, ?, ?) \
                 ON CONFLICT (mapping) DO UPDATE SET model = excluded.model, \
                 baseline_snapshot_id = excluded.baseline_snapshot_id, \
                 exceptions_path = excluded.exceptions_path, exceptions_rows = excluded.exceptions_rows, \
                 last_run_id = excluded.last_run_id, last_success_at = excluded.last_success_at",
            )
            .bind(&state.mapping)
            .bind(&state.model)
            .bind(&state.baseline_snapshot_id)
            .bind(&state.exceptions_path)
            .bind(state.exceptions_rows as i64)
            .bind(&state.last_run_id)
            .bind(state.last_success_at.to_rfc3339())
            .execute(&mut *tx)
            .await
            .map_err(self.err())?;
        }
        tx.commit().await.map_err(self.err())?;
        Ok(())
    }

    pub async fn run(&self, id: &str) -> Result<Option<RunRecord>> {
        let row = sqlx::query("SELECT * FROM runs WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(self.err())?;
        Ok(row.map(|r| run_from_row(&r)))
    }

    /// Most recent runs first.
    pub async fn runs(&self, mapping: Option<&str>, limit: u32) -> Result<Vec<RunRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM runs WHERE (?1 IS NULL OR mapping = ?1) ORDER BY started_at DESC, id DESC LIMIT ?2",
        )
        .bind(mapping)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(self.err())?;
        Ok(rows.iter().map(run_from_row).collect())
    }

    pub async fn failures(&self, run_id: &str, limit: u32) -> Result<Vec<FailureRow>> {
        let rows = sqlx::query("SELECT * FROM run_failures WHERE run_id = ? ORDER BY rowid LIMIT ?")
            .bind(run_id)
            .bind(limit as i64)
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
            })
            .collect())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn run_from_row(r: &sqlx::sqlite::SqliteRow) -> RunRecord {
    let count = |name: &str| r.get::<i64, _>(name) as u64;
    let millis = |name: &str| r.get::<Option<i64>, _>(name).unwrap_or(0) as u64;
    RunRecord {
        id: r.get("id"),
        mapping: r.get("mapping"),
        model: r.get("model"),
        destination: r.get("destination"),
        status: RunStatus::parse(r.get("status")).unwrap_or(RunStatus::Failed),
        full_resync: r.get("full_resync"),
        started_at: parse_time(r.get("started_at")),
        finished_at: r.get::<Option<String>, _>("finished_at").map(|t| parse_time(&t)),
        snapshot_id: r.get("snapshot_id"),
        baseline_snapshot_id: r.get("baseline_snapshot_id"),
        counts: RunCounts {
            extracted: count("extracted"),
            added: count("added"),
            updated: count("updated"),
            deleted: count("deleted"),
            delivered: count("delivered"),
            failed: count("failed"),
            skipped: count("skipped"),
        },
        timings: StageTimings {
            extract_ms: millis("extract_ms"),
            diff_ms: millis("diff_ms"),
            deliver_ms: millis("deliver_ms"),
        },
        schema_change: r.get("schema_change"),
        error: r.get("error"),
    }
}

fn parse_time(text: &str) -> DateTime<Utc> {
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
            baseline_snapshot_id: "s1".into(),
            exceptions_path: Some("mappings/m/exceptions/r1.parquet".into()),
            exceptions_rows: 1,
            last_run_id: "r1".into(),
            last_success_at: run.started_at,
        };
        store.commit_run(&run, Some(&state)).await.unwrap();
        let stored = store.mapping_state("m").await.unwrap().unwrap();
        assert_eq!(stored.baseline_snapshot_id, "s1");
        assert_eq!(stored.exceptions_rows, 1);
        let runs = store.runs(Some("m"), 10).await.unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].status, RunStatus::Partial);
        assert_eq!(store.failures("r1", 10).await.unwrap().len(), 1);
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
    async fn a_mapping_is_leased_to_one_run_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetadataStore::open_sqlite(&dir.path().join("m.db"))
            .await
            .unwrap();
        let ttl = Duration::from_secs(60);
        assert_eq!(store.acquire_lease("m", "run-1", ttl).await.unwrap(), None);
        let held = store
            .acquire_lease("m", "run-2", ttl)
            .await
            .unwrap()
            .expect("held");
        assert_eq!(held.run_id, "run-1");
        assert!(held.holder.ends_with(&format!(":{}", std::process::id())));
        // Another mapping is independent.
        assert_eq!(store.acquire_lease("other", "run-3", ttl).await.unwrap(), None);
        assert!(store.renew_lease("m", "run-1", ttl).await.unwrap());
        assert!(!store.renew_lease("m", "run-2", ttl).await.unwrap());
        store.release_lease("m", "run-1").await.unwrap();
        assert_eq!(store.acquire_lease("m", "run-2", ttl).await.unwrap(), None);

        // A lapsed lease is taken over.
        store.release_lease("m", "run-2").await.unwrap();
        assert_eq!(
            store
                .acquire_lease("m", "run-4", Duration::from_millis(1))
                .await
                .unwrap(),
            None
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(store.acquire_lease("m", "run-5", ttl).await.unwrap(), None);

        // A lease of a process of this host that is gone is taken over at once.
        sqlx::query("UPDATE leases SET holder = ?, run_id = 'run-dead' WHERE mapping = 'm'")
            .bind(format!("{}:{}", hostname(), i32::MAX))
            .execute(&store.pool)
            .await
            .unwrap();
        assert_eq!(store.acquire_lease("m", "run-6", ttl).await.unwrap(), None);
    }
}
