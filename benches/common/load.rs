//! The control plane under load: a `sluice serve` process running a large run and several
//! heavy history queries at once, while a client polls `/healthz` and a read route and another
//! watches the run's lease in the metadata store. Shared by the load test
//! (`tests/it/isolation.rs`, which asserts bounds) and the benchmark
//! (`benches/control_plane.rs`, which compares binaries side by side).
//!
//! Needs the local PostgreSQL: the model's table lives there, and so does the metadata store
//! (a fresh database), so the lease can be read while the run holds it.

// Shared by a test and a benchmark; each uses a part.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// The query the load runs: a three-way cross join of a 1,500-row history, sorted; far more
/// work than any time limit allows.
pub const HEAVY_QUERY: &str = "SELECT a.email || b.email || c.email AS e FROM people_history a, people_history b, people_history c ORDER BY e DESC LIMIT 5";

/// Rows of the `people` model the heavy queries join.
const PEOPLE: u64 = 1_500;
/// A poll that takes this long counts as a failure, at this latency.
const POLL_TIMEOUT: Duration = Duration::from_secs(5);
const ADMIN_TOKEN: &str = "sluice_load_admin_0123456789abcdef";
/// Read tokens: heavy queries come from the first two; the third asks when the server is full.
const READ_TOKENS: [(&str, &str); 3] = [
    ("analyst_a", "sluice_load_analyst_a_0123456789"),
    ("analyst_b", "sluice_load_analyst_b_0123456789"),
    ("analyst_c", "sluice_load_analyst_c_0123456789"),
];

/// One load scenario.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The `sluice` binary to serve with.
    pub binary: PathBuf,
    /// Rows of the model the run extracts and delivers.
    pub rows: u64,
    /// Heavy queries sent at once when the run starts (half from each of two read tokens).
    pub heavy_queries: usize,
    /// `api.limits` to write into sluice.yaml (`None` for a binary that predates them).
    pub limits: Option<String>,
    /// A heavy query is abandoned by the client after this.
    pub query_client_timeout: Duration,
    /// PostgreSQL: the server's URL (database `test`) and a schema and database name to use.
    pub pg_url: String,
    pub schema: String,
    pub metadata_database: String,
}

/// Latencies of one kind of poll.
#[derive(Debug, Clone, Default)]
pub struct Latencies {
    pub millis: Vec<f64>,
    /// Polls that failed or took longer than [`POLL_TIMEOUT`].
    pub failures: usize,
}

impl Latencies {
    pub fn percentile(&self, p: f64) -> f64 {
        if self.millis.is_empty() {
            return f64::NAN;
        }
        let mut sorted = self.millis.clone();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let index = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
        sorted[index.min(sorted.len() - 1)]
    }

    pub fn max(&self) -> f64 {
        self.millis.iter().copied().fold(f64::NAN, f64::max)
    }

    pub fn summary(&self) -> String {
        format!(
            "{} polls, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, {} failed",
            self.millis.len(),
            self.percentile(50.0),
            self.percentile(99.0),
            self.max(),
            self.failures
        )
    }
}

/// An answer to a query the load sent.
#[derive(Debug, Clone)]
pub struct QueryAnswer {
    pub token: String,
    /// HTTP status, or 0 when the client gave up.
    pub status: u16,
    pub seconds: f64,
    pub code: Option<String>,
    pub message: Option<String>,
    pub retry_after: Option<String>,
}

/// What one scenario saw.
#[derive(Debug, Clone)]
pub struct LoadReport {
    pub health: Latencies,
    pub read: Latencies,
    /// The run's outcome (`succeeded`, ...) and wall time from trigger to finish.
    pub run_status: String,
    pub run_seconds: f64,
    /// Records the run delivered.
    pub run_delivered: u64,
    /// The smallest time left on the run's lease seen while it ran (negative: it lapsed).
    pub lease_margin_min: Option<f64>,
    pub lease_ttl: f64,
    /// The heavy queries, then the two sent when the server was full.
    pub heavy: Vec<QueryAnswer>,
    pub extra: Vec<QueryAnswer>,
    /// A small query after everything: the gates were given back.
    pub after: Option<QueryAnswer>,
    pub serve_log: String,
}

/// Creates the model tables: `users` (`rows` rows) and `people` (1,500).
pub async fn prepare_source(pg_url: &str, schema: &str, rows: u64) -> Result<(), String> {
    let (client, connection) = tokio_postgres::connect(pg_url, tokio_postgres::NoTls)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    client
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema};
             CREATE TABLE {schema}.users AS SELECT g AS id, 'user' || g || '@example.com' AS email,
               (ARRAY['free','pro','team'])[1 + g % 3] AS plan, g % 1000 AS score,
               timestamptz '2026-01-01' + g * interval '1 second' AS created_at
               FROM generate_series(1, {rows}) g;
             ALTER TABLE {schema}.users ADD PRIMARY KEY (id);
             CREATE TABLE {schema}.people AS SELECT g AS id, 'person' || g || '@example.com' AS email
               FROM generate_series(1, {PEOPLE}) g;"
        ))
        .await
        .map_err(db_error)
}

/// The server's own message, not only "db error".
fn db_error(e: tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

/// A fresh database for the metadata store; its URL.
async fn fresh_database(pg_url: &str, name: &str) -> Result<String, String> {
    let (client, connection) = tokio_postgres::connect(pg_url, tokio_postgres::NoTls)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    // One statement each: CREATE DATABASE cannot run in the implicit transaction of a batch.
    for statement in [
        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        format!("CREATE DATABASE {name}"),
    ] {
        client.batch_execute(&statement).await.map_err(db_error)?;
    }
    Ok(pg_url.replace("/test", &format!("/{name}")))
}

fn config(options: &LoadOptions, metadata_url: &str) -> String {
    let mut text = format!(
        r#"state_dir: .sluice
metadata_store: {metadata_url}
lease_ttl: 10s
sources:
  pg: {{ type: postgres, url: "{pg}", sslmode: disable }}
models:
  users:
    source: pg
    sql: SELECT id, email, plan, score, created_at FROM {schema}.users
    primary_key: id
  people:
    source: pg
    sql: SELECT id, email FROM {schema}.people
    primary_key: id
destinations:
  exports: {{ type: file, url: exports/, format: jsonl }}
mappings:
  users_out: {{ model: users, destination: exports }}
  people_out: {{ model: people, destination: exports }}
api:
  tokens:
    - {{ name: ops, token: "${{LOAD_ADMIN}}", scope: admin }}
"#,
        pg = options.pg_url,
        schema = options.schema,
    );
    for (i, (name, _)) in READ_TOKENS.iter().enumerate() {
        text.push_str(&format!(
            "    - {{ name: {name}, token: \"${{LOAD_READ_{i}}}\", scope: read }}\n"
        ));
    }
    if let Some(limits) = &options.limits {
        text.push_str(&format!("  limits: {limits}\n"));
    }
    text
}

fn command(options: &LoadOptions, dir: &Path) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(&options.binary);
    command
        .current_dir(dir)
        .env("LOAD_ADMIN", ADMIN_TOKEN)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true);
    for (i, (_, token)) in READ_TOKENS.iter().enumerate() {
        command.env(format!("LOAD_READ_{i}"), token);
    }
    command
}

async fn free_port() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a free port");
    listener.local_addr().expect("port").port()
}

/// Polls `url` every `every` until `stop` is cancelled, timing each answer.
fn poll(
    client: reqwest::Client,
    url: String,
    token: Option<&'static str>,
    every: Duration,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Latencies> {
    tokio::spawn(async move {
        let mut latencies = Latencies::default();
        loop {
            let started = Instant::now();
            let mut request = client.get(&url).timeout(POLL_TIMEOUT);
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let ok = match request.send().await {
                Ok(response) => response.status().is_success() && response.bytes().await.is_ok(),
                Err(_) => false,
            };
            let took = started.elapsed();
            latencies.millis.push(took.as_secs_f64() * 1000.0);
            if !ok {
                latencies.failures += 1;
            }
            tokio::select! {
                _ = tokio::time::sleep(every.saturating_sub(took)) => {}
                _ = stop.cancelled() => return latencies,
            }
        }
    })
}

/// Watches the lease of `mapping` in the metadata store: the smallest time left on it.
fn watch_lease(
    metadata_url: String,
    mapping: &'static str,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Option<f64>> {
    tokio::spawn(async move {
        let (client, connection) = tokio_postgres::connect(&metadata_url, tokio_postgres::NoTls)
            .await
            .ok()?;
        tokio::spawn(connection);
        let mut smallest: Option<f64> = None;
        loop {
            if let Ok(rows) = client
                .query("SELECT expires_at FROM leases WHERE mapping = $1", &[&mapping])
                .await
            {
                for row in rows {
                    let expires: String = row.get(0);
                    if let Ok(expires) = DateTime::parse_from_rfc3339(&expires) {
                        let left =
                            (expires.with_timezone(&Utc) - Utc::now()).num_milliseconds() as f64 / 1000.0;
                        smallest = Some(smallest.map_or(left, |s: f64| s.min(left)));
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = stop.cancelled() => return smallest,
            }
        }
    })
}

async fn send_query(
    client: &reqwest::Client,
    base: &str,
    token: (&str, &str),
    sql: &str,
    timeout: Duration,
) -> QueryAnswer {
    let started = Instant::now();
    let sent = client
        .post(format!("{base}/api/v1/query"))
        .bearer_auth(token.1)
        .header("content-type", "application/json")
        .body(json!({ "sql": sql }).to_string())
        .timeout(timeout)
        .send()
        .await;
    let (status, retry_after, body) = match sent {
        Ok(response) => {
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = response.text().await.unwrap_or_default();
            (status, retry_after, body)
        }
        Err(_) => (0, None, String::new()),
    };
    let error: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    QueryAnswer {
        token: token.0.to_string(),
        status,
        seconds: started.elapsed().as_secs_f64(),
        code: error["error"]["code"].as_str().map(str::to_string),
        message: error["error"]["message"].as_str().map(str::to_string),
        retry_after,
    }
}

/// Runs the scenario once; the source tables must exist ([`prepare_source`]).
pub async fn run(options: &LoadOptions) -> Result<LoadReport, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let metadata_url = fresh_database(&options.pg_url, &options.metadata_database).await?;
    std::fs::write(dir.path().join("sluice.yaml"), config(options, &metadata_url))
        .map_err(|e| e.to_string())?;

    // A snapshot of `people` for the heavy queries to join.
    let made = command(options, dir.path())
        .args(["run", "people_out"])
        .output()
        .await
        .map_err(|e| e.to_string())?;
    if !made.status.success() {
        return Err(format!(
            "the people run failed: {}",
            String::from_utf8_lossy(&made.stderr)
        ));
    }

    let port = free_port().await;
    let base = format!("http://127.0.0.1:{port}");
    let log_path = dir.path().join("serve.log");
    let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
    let mut serve = command(options, dir.path())
        .args([
            "serve",
            "--no-schedules",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| e.to_string())?;
    let client = reqwest::Client::new();
    let mut up = false;
    for _ in 0..200 {
        if let Ok(r) = client.get(format!("{base}/healthz")).send().await
            && r.status().is_success()
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !up {
        let _ = serve.kill().await;
        return Err(format!(
            "sluice serve did not answer: {}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        ));
    }

    // A cancellation, not a `Notify`: `notify_waiters` wakes only tasks waiting at that instant,
    // and a poller in the middle of a request then polled forever.
    let stop = CancellationToken::new();
    let health = poll(
        client.clone(),
        format!("{base}/healthz"),
        None,
        Duration::from_millis(50),
        stop.clone(),
    );
    let read = poll(
        client.clone(),
        format!("{base}/api/v1/mappings"),
        Some(READ_TOKENS[2].1),
        Duration::from_millis(200),
        stop.clone(),
    );
    let lease = watch_lease(metadata_url.clone(), "users_out", stop.clone());

    // The run, then the heavy queries at once.
    let started = Instant::now();
    let triggered = client
        .post(format!("{base}/api/v1/mappings/users_out/runs"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let run: Value = serde_json::from_str(&triggered.text().await.map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    let run_id = run["id"]
        .as_str()
        .ok_or_else(|| format!("no run id in {run}"))?
        .to_string();
    let heavy: Vec<_> = (0..options.heavy_queries)
        .map(|i| {
            let client = client.clone();
            let base = base.clone();
            let timeout = options.query_client_timeout;
            let token = READ_TOKENS[i % 2];
            tokio::spawn(async move { send_query(&client, &base, token, HEAVY_QUERY, timeout).await })
        })
        .collect();
    // Once they run: one more from a token already running queries, and one from another.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let extra: Vec<_> = [READ_TOKENS[0], READ_TOKENS[2]]
        .into_iter()
        .map(|token| {
            let client = client.clone();
            let base = base.clone();
            let timeout = options.query_client_timeout;
            tokio::spawn(async move { send_query(&client, &base, token, HEAVY_QUERY, timeout).await })
        })
        .collect();

    let mut run_status = String::new();
    let mut run_seconds = f64::NAN;
    let mut run_delivered = 0;
    // A run starved of threads may never finish: given up on after this, as `timed out`.
    let deadline = Instant::now() + Duration::from_secs(120);
    run_status.push_str("not finished in 120 s");
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let Ok(response) = client
            .get(format!("{base}/api/v1/runs/{run_id}"))
            .bearer_auth(ADMIN_TOKEN)
            .timeout(POLL_TIMEOUT)
            .send()
            .await
        else {
            continue;
        };
        let Ok(body) = response.text().await else { continue };
        let record: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        let status = record["status"].as_str().unwrap_or("unknown");
        if status != "running" && status != "unknown" {
            run_status = status.to_string();
            run_seconds = started.elapsed().as_secs_f64();
            run_delivered = record["counts"]["delivered"].as_u64().unwrap_or(0);
            break;
        }
    }
    let mut heavy_answers = Vec::new();
    for task in heavy {
        heavy_answers.push(task.await.map_err(|e| e.to_string())?);
    }
    let mut extra_answers = Vec::new();
    for task in extra {
        extra_answers.push(task.await.map_err(|e| e.to_string())?);
    }
    stop.cancel();
    let health = health.await.map_err(|e| e.to_string())?;
    let read = read.await.map_err(|e| e.to_string())?;
    let lease_margin_min = lease.await.map_err(|e| e.to_string())?;
    let after = if options.limits.is_some() {
        Some(
            send_query(
                &client,
                &base,
                READ_TOKENS[0],
                "SELECT count(*) AS n FROM people",
                Duration::from_secs(30),
            )
            .await,
        )
    } else {
        None
    };

    #[cfg(unix)]
    if let Some(pid) = serve.id() {
        // SAFETY: signals our own child.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(20), serve.wait()).await;
    let _ = serve.kill().await;
    Ok(LoadReport {
        health,
        read,
        run_status,
        run_seconds,
        run_delivered,
        lease_margin_min,
        lease_ttl: 10.0,
        heavy: heavy_answers,
        extra: extra_answers,
        after,
        serve_log: std::fs::read_to_string(&log_path).unwrap_or_default(),
    })
}
