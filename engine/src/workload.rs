//! Where work runs, and how much of it at once.
//!
//! `sluice serve` keeps the process's own runtime for the control plane: health and readiness
//! checks, the API's routes, the scheduler, run leases and their renewal. Runs get a runtime
//! of their own, and so does interactive work asked for through the API (history queries,
//! previews, test records, connection tests), each with threads at a lower CPU priority. A
//! CPU-bound stage (hashing, sorting, rendering, encoding) or a heavy query then keeps only
//! its own threads busy, never the threads that answer `/healthz` or renew a lease, and when
//! the cores are short the kernel runs the control plane first.
//!
//! Interactive work is admitted through [`Gate`]s (so many at once in the process, so many per
//! caller; more are refused with "try again", never queued without bound) and bounded in time;
//! history queries share one memory pool that spills sorts and joins to disk and fails a query
//! that still does not fit, rather than growing the process.
//!
//! `sluice run` and the other one-shot commands use [`Workloads::inline`]: everything on the
//! command's runtime, with the same query limits.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::FairSpillPool;
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use serde::Deserialize;
use serde::de::Deserializer;
use tokio::runtime::{Handle, Runtime};
use tokio::task::JoinHandle;

use crate::error::{EngineError, Result};

/// `api.limits` in `sluice.yaml`: how much interactive work `sluice serve` takes on at once.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InteractiveLimits {
    /// History queries running at once in the process; one more is refused (429).
    pub queries: usize,
    /// History queries running at once for one API token.
    pub queries_per_token: usize,
    /// Memory the running history queries share (`512MiB`, `2GiB`). Sorts, joins and
    /// aggregations spill to disk within it; a query that still does not fit fails with an
    /// error that says so.
    #[serde(deserialize_with = "byte_size")]
    pub query_memory: u64,
    /// Disk a query's spills may take, in all (`10GiB`).
    #[serde(deserialize_with = "byte_size")]
    pub query_spill: u64,
    /// Time a query has to plan and produce its first rows (`60s`).
    #[serde(deserialize_with = "duration")]
    pub query_timeout: Duration,
    /// Threads history queries, previews and tests run on (default: half the cores, at
    /// least one), so they never take every core from runs.
    pub query_threads: Option<usize>,
    /// Previews, test records, connection tests and dry runs at once in the process.
    pub probes: usize,
    /// The same, for one API token.
    pub probes_per_token: usize,
    /// Time a preview, test record or connection test has (`30s`); a source or destination
    /// that never answers is given up on after it.
    #[serde(deserialize_with = "duration")]
    pub probe_timeout: Duration,
    /// Time a dry run has (`15m`).
    #[serde(deserialize_with = "duration")]
    pub dry_run_timeout: Duration,
}

impl Default for InteractiveLimits {
    fn default() -> Self {
        Self {
            queries: 2,
            queries_per_token: 1,
            query_memory: 512 * MIB,
            query_spill: 10 * 1024 * MIB,
            query_timeout: Duration::from_secs(60),
            query_threads: None,
            probes: 4,
            probes_per_token: 2,
            probe_timeout: Duration::from_secs(30),
            dry_run_timeout: Duration::from_secs(15 * 60),
        }
    }
}

const MIB: u64 = 1024 * 1024;

impl InteractiveLimits {
    /// Threads for interactive work: as set, or half the cores (at least one).
    pub fn threads(&self) -> usize {
        self.query_threads.filter(|n| *n > 0).unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
            (cores / 2).max(1)
        })
    }

    /// The limits as `sluice.yaml` must not set them.
    pub fn check(&self) -> std::result::Result<(), String> {
        for (name, value) in [
            ("queries", self.queries),
            ("queries_per_token", self.queries_per_token),
            ("probes", self.probes),
            ("probes_per_token", self.probes_per_token),
        ] {
            if value == 0 {
                return Err(format!("api.limits.{name} must be at least 1"));
            }
        }
        if self.query_memory < 16 * MIB {
            return Err("api.limits.query_memory must be at least 16MiB".into());
        }
        for (name, value) in [
            ("query_timeout", self.query_timeout),
            ("probe_timeout", self.probe_timeout),
            ("dry_run_timeout", self.dry_run_timeout),
        ] {
            if value < Duration::from_secs(1) {
                return Err(format!("api.limits.{name} must be at least 1s"));
            }
        }
        Ok(())
    }
}

/// `512MiB`, `2GiB`, `1000000` (bytes), `64MB`.
pub fn parse_byte_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1024,
        "kb" => 1000,
        "mib" => MIB,
        "mb" => 1000 * 1000,
        "gib" => 1024 * MIB,
        "gb" => 1000 * 1000 * 1000,
        _ => return None,
    };
    number.checked_mul(factor)
}

fn byte_size<'de, D: Deserializer<'de>>(deserializer: D) -> std::result::Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Size::deserialize(deserializer)? {
        Size::Bytes(n) => Ok(n),
        Size::Text(text) => parse_byte_size(&text).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "`{text}` is not a size; write it like `512MiB` or `2GiB`"
            ))
        }),
    }
}

fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    humantime::parse_duration(text.trim()).map_err(|_| {
        serde::de::Error::custom(format!(
            "`{text}` is not a duration; write it like `30s`, `5m` or `1h`"
        ))
    })
}

/// A runtime of its own, or the caller's.
struct Pool {
    /// Owned when the work is isolated; `None` runs it on the caller's runtime.
    runtime: Option<Runtime>,
}

impl Pool {
    fn inline() -> Self {
        Self { runtime: None }
    }

    /// A runtime of `threads` workers whose threads (workers and blocking ones alike) run at
    /// `nice` (Linux; elsewhere at the process's priority).
    fn isolated(name: &'static str, threads: usize, nice: i32) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name(name)
            .on_thread_start(move || lower_priority(nice))
            .enable_all()
            .build()?;
        Ok(Self {
            runtime: Some(runtime),
        })
    }

    fn spawn<F>(&self, future: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match &self.runtime {
            Some(runtime) => runtime.spawn(future),
            None => tokio::spawn(future),
        }
    }

    fn handle(&self) -> Option<&Handle> {
        self.runtime.as_ref().map(|r| r.handle())
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Dropped from async code when the last engine goes; a plain drop would block there.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Lowers the calling thread's CPU priority (its nice value) by `nice`.
fn lower_priority(nice: i32) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: setpriority only reads its arguments; on Linux, PRIO_PROCESS with a thread id
        // sets that one thread's nice value. A failure (a container that forbids it) leaves the
        // thread at the process's priority, which is only less isolated.
        unsafe {
            let thread = libc::syscall(libc::SYS_gettid) as libc::id_t;
            let current = libc::getpriority(libc::PRIO_PROCESS, thread);
            libc::setpriority(libc::PRIO_PROCESS, thread, (current + nice).min(19));
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}

/// Nice value of run threads: below the control plane, above interactive work.
const RUN_NICE: i32 = 5;
/// Nice value of query, preview and test threads.
const INTERACTIVE_NICE: i32 = 10;

/// Where a process's work runs and what interactive work it admits.
pub struct Workloads {
    /// The control plane's runtime, when work is isolated from it (lease renewals go there).
    control: Option<Handle>,
    runs: Pool,
    interactive: Pool,
    queries: Arc<Gate>,
    probes: Arc<Gate>,
    limits: InteractiveLimits,
    /// Where history queries spill.
    spill_dir: PathBuf,
    /// Memory pool and spill directory every history query shares (made at the first query).
    query_env: std::sync::OnceLock<Arc<RuntimeEnv>>,
}

impl std::fmt::Debug for Workloads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workloads")
            .field("isolated", &self.is_isolated())
            .field("limits", &self.limits)
            .finish()
    }
}

impl Workloads {
    /// Everything on the caller's runtime (the one-shot commands), with `limits` on queries.
    pub fn inline(limits: &InteractiveLimits, spill_dir: PathBuf) -> Result<Self> {
        Self::build(limits, spill_dir, None, Pool::inline(), Pool::inline())
    }

    /// Runs and interactive work on runtimes of their own, the control plane on the calling
    /// one (`sluice serve`). Must be called from within the control plane's runtime.
    pub fn isolated(limits: &InteractiveLimits, spill_dir: PathBuf) -> Result<Self> {
        let control = Handle::try_current()
            .map_err(|e| EngineError::Internal(format!("no async runtime to serve from: {e}")))?;
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let start = |e: std::io::Error| EngineError::Internal(format!("cannot start worker threads: {e}"));
        let runs = Pool::isolated("sluice-run", cores, RUN_NICE).map_err(start)?;
        let interactive =
            Pool::isolated("sluice-query", limits.threads(), INTERACTIVE_NICE).map_err(start)?;
        Self::build(limits, spill_dir, Some(control), runs, interactive)
    }

    fn build(
        limits: &InteractiveLimits,
        spill_dir: PathBuf,
        control: Option<Handle>,
        runs: Pool,
        interactive: Pool,
    ) -> Result<Self> {
        limits.check().map_err(EngineError::Usage)?;
        Ok(Self {
            control,
            runs,
            interactive,
            queries: Arc::new(Gate::new(
                "history queries",
                "queries",
                limits.queries,
                limits.queries_per_token,
            )),
            probes: Arc::new(Gate::new(
                "previews, tests and dry runs",
                "probes",
                limits.probes,
                limits.probes_per_token,
            )),
            limits: limits.clone(),
            spill_dir: spill_dir.join("queries"),
            query_env: std::sync::OnceLock::new(),
        })
    }

    /// Whether runs and interactive work have runtimes of their own.
    pub fn is_isolated(&self) -> bool {
        self.control.is_some()
    }

    pub fn limits(&self) -> &InteractiveLimits {
        &self.limits
    }

    /// The memory pool and spill directory of history queries.
    pub fn query_env(&self) -> Result<Arc<RuntimeEnv>> {
        if let Some(env) = self.query_env.get() {
            return Ok(env.clone());
        }
        std::fs::create_dir_all(&self.spill_dir).map_err(|e| {
            EngineError::Internal(format!(
                "cannot create the query spill directory {}: {e}",
                self.spill_dir.display()
            ))
        })?;
        let env = RuntimeEnvBuilder::new()
            .with_memory_pool(Arc::new(FairSpillPool::new(self.limits.query_memory as usize)))
            .with_disk_manager_builder(
                DiskManagerBuilder::default()
                    .with_mode(DiskManagerMode::Directories(vec![self.spill_dir.clone()]))
                    .with_max_temp_directory_size(self.limits.query_spill),
            )
            .build_arc()
            .map_err(|e| EngineError::Internal(format!("cannot set up query memory: {e}")))?;
        // Two first queries at once may both build one; either serves.
        Ok(self.query_env.get_or_init(|| env).clone())
    }

    /// Starts work of the control plane (lease renewals) on its runtime.
    pub fn spawn_control<F>(&self, future: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match &self.control {
            Some(handle) => handle.spawn(future),
            None => tokio::spawn(future),
        }
    }

    /// Starts a run on the runs' runtime.
    pub fn spawn_run<F>(&self, future: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.runs.spawn(future)
    }

    /// The runs' runtime, when it is one of its own (to start runs in a `JoinSet`).
    pub fn runs_handle(&self) -> Option<&Handle> {
        self.runs.handle()
    }

    /// Starts interactive work on its runtime.
    pub fn spawn_interactive<F>(&self, future: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.interactive.spawn(future)
    }

    /// Admits a history query for `caller`, or refuses it when too many are running.
    pub fn admit_query(&self, caller: &str) -> Result<Admission> {
        self.queries.admit(caller)
    }

    /// Admits a preview, test or dry run for `caller`, or refuses it.
    pub fn admit_probe(&self, caller: &str) -> Result<Admission> {
        self.probes.admit(caller)
    }

    /// Runs `work` (a preview, a test record, a connection test) as interactive work: admitted
    /// for `caller`, on the interactive runtime, stopped after `api.limits.probe_timeout`.
    /// `what` names it in the error ("the preview of model `users`").
    pub async fn probe<T, F>(&self, caller: &str, what: String, work: F) -> Result<T>
    where
        F: Future<Output = Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        let admission = self.admit_probe(caller)?;
        let limit = self.limits.probe_timeout;
        let task = self.spawn_interactive(async move {
            let _admission = admission;
            work.await
        });
        bounded(task, limit, move || {
            EngineError::TimedOut {
                code: "probe_timeout",
                message: format!(
                    "{what} did not finish within {} (api.limits.probe_timeout); the system it talks to may not be answering",
                    humantime::format_duration(limit)
                ),
            }
        })
        .await
    }
}

/// Waits for `task` up to `limit`; past it, stops the task and answers `timed_out()`.
pub(crate) async fn bounded<T>(
    mut task: JoinHandle<Result<T>>,
    limit: Duration,
    timed_out: impl FnOnce() -> EngineError,
) -> Result<T> {
    match tokio::time::timeout(limit, &mut task).await {
        Ok(Ok(result)) => result,
        Ok(Err(e)) if e.is_panic() => Err(EngineError::Internal(format!("interactive work panicked: {e}"))),
        Ok(Err(e)) => Err(EngineError::Internal(format!(
            "interactive work was stopped: {e}"
        ))),
        Err(_) => {
            task.abort();
            // Wait (briefly) for the stopped work to be dropped, so its admission is given back
            // before the caller hears of the timeout.
            let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
            Err(timed_out())
        }
    }
}

/// Admission to one kind of interactive work: at most `limit` at once in the process and
/// `per_caller` for one caller.
#[derive(Debug)]
pub struct Gate {
    /// For people: "history queries".
    what: &'static str,
    /// The `api.limits` key of the process-wide limit.
    key: &'static str,
    limit: usize,
    per_caller: usize,
    running: Mutex<GateState>,
}

#[derive(Debug, Default)]
struct GateState {
    total: usize,
    by_caller: HashMap<String, usize>,
}

/// How long a refused request is told to wait before asking again.
pub const RETRY_AFTER: Duration = Duration::from_secs(5);

impl Gate {
    pub fn new(what: &'static str, key: &'static str, limit: usize, per_caller: usize) -> Self {
        Self {
            what,
            key,
            limit,
            per_caller,
            running: Mutex::new(GateState::default()),
        }
    }

    /// A place for `caller`, held until the [`Admission`] is dropped.
    pub fn admit(self: &Arc<Self>, caller: &str) -> Result<Admission> {
        let mut state = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let mine = state.by_caller.get(caller).copied().unwrap_or(0);
        if mine >= self.per_caller {
            return Err(EngineError::Busy {
                code: "too_many_requests",
                message: format!(
                    "token `{caller}` already has {mine} {} running, its limit (api.limits.{}_per_token); wait for one to finish",
                    self.what, self.key
                ),
                retry_after: RETRY_AFTER,
            });
        }
        if state.total >= self.limit {
            return Err(EngineError::Busy {
                code: "too_many_requests",
                message: format!(
                    "{} {} are running, the server's limit (api.limits.{}); try again shortly",
                    state.total, self.what, self.key
                ),
                retry_after: RETRY_AFTER,
            });
        }
        state.total += 1;
        *state.by_caller.entry(caller.to_string()).or_default() += 1;
        Ok(Admission {
            gate: self.clone(),
            caller: caller.to_string(),
        })
    }

    /// Work admitted and not yet finished.
    pub fn running(&self) -> usize {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

/// A place in a [`Gate`]; given back when dropped.
#[derive(Debug)]
pub struct Admission {
    gate: Arc<Gate>,
    caller: String,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut state = self.gate.running.lock().unwrap_or_else(|e| e.into_inner());
        state.total = state.total.saturating_sub(1);
        if let Some(count) = state.by_caller.get_mut(&self.caller) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                state.by_caller.remove(&self.caller);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gate_refuses_past_its_limits_and_frees_places_when_work_ends() {
        let gate = Arc::new(Gate::new("history queries", "queries", 3, 2));
        let a1 = gate.admit("a").unwrap();
        let _a2 = gate.admit("a").unwrap();
        let refused = gate.admit("a").unwrap_err();
        assert!(
            refused.to_string().contains("api.limits.queries_per_token"),
            "{refused}"
        );
        let _b1 = gate.admit("b").unwrap();
        let refused = gate.admit("c").unwrap_err();
        assert!(refused.to_string().contains("api.limits.queries)"), "{refused}");
        assert!(matches!(refused, EngineError::Busy { .. }));
        assert_eq!(gate.running(), 3);
        drop(a1);
        assert_eq!(gate.running(), 2);
        gate.admit("c").unwrap();
        // The admission above was dropped at once.
        assert_eq!(gate.running(), 2);
    }

    #[test]
    fn sizes_and_limits_are_read_as_written() {
        assert_eq!(parse_byte_size("512MiB"), Some(512 * MIB));
        assert_eq!(parse_byte_size("2 GiB"), Some(2048 * MIB));
        assert_eq!(parse_byte_size("1000"), Some(1000));
        assert_eq!(parse_byte_size("64MB"), Some(64_000_000));
        assert_eq!(parse_byte_size("lots"), None);
        let limits: InteractiveLimits =
            serde_norway::from_str("queries: 4\nquery_memory: 1GiB\nprobe_timeout: 5s\n").unwrap();
        assert_eq!(limits.queries, 4);
        assert_eq!(limits.query_memory, 1024 * MIB);
        assert_eq!(limits.probe_timeout, Duration::from_secs(5));
        assert_eq!(limits.queries_per_token, 1);
        let zero = InteractiveLimits {
            queries: 0,
            ..Default::default()
        };
        assert!(zero.check().unwrap_err().contains("api.limits.queries"));
        assert!(serde_norway::from_str::<InteractiveLimits>("query_memory: lots\n").is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn isolated_work_runs_on_threads_of_its_own_and_probes_time_out() {
        let dir = tempfile::tempdir().unwrap();
        let limits = InteractiveLimits {
            probe_timeout: Duration::from_secs(1),
            ..Default::default()
        };
        let workloads = Workloads::isolated(&limits, dir.path().to_path_buf()).unwrap();
        let name = workloads
            .spawn_run(async { std::thread::current().name().map(str::to_string) })
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some("sluice-run"));
        let name = workloads
            .probe("t", "the test".into(), async {
                Ok(std::thread::current().name().map(str::to_string))
            })
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some("sluice-query"));
        #[cfg(target_os = "linux")]
        {
            let nice = workloads
                .spawn_interactive(async {
                    // SAFETY: reads the calling thread's nice value.
                    unsafe {
                        libc::getpriority(libc::PRIO_PROCESS, libc::syscall(libc::SYS_gettid) as libc::id_t)
                    }
                })
                .await
                .unwrap();
            // SAFETY: as above.
            let own = unsafe {
                libc::getpriority(libc::PRIO_PROCESS, libc::syscall(libc::SYS_gettid) as libc::id_t)
            };
            assert!(
                nice > own || nice == 19,
                "query threads at nice {nice}, control at {own}"
            );
        }
        let started = std::time::Instant::now();
        let hung = workloads
            .probe("t", "the connection test of source `never`".into(), async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(())
            })
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(
            hung.to_string()
                .contains("did not finish within 1s (api.limits.probe_timeout)"),
            "{hung}"
        );
        // The timed-out probe gave its place back.
        assert_eq!(workloads.probes.running(), 0);
    }
}
