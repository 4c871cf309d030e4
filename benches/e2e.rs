//! End to end: a PostgreSQL table through `sluice run` (the release binary, as a user runs it)
//! to a local Segment-spec receiver and to the `file` destination, twice: a first sync (every
//! row added) and a second after 2% of rows were updated, 1% deleted and 1% added.
//!
//! ```sh
//! cargo bench --bench e2e -- --rows 1000000 10000000 30000000
//! ```
//!
//! For each size it (re)creates `sluice_bench.e2e_users` in the local PostgreSQL (the 11-column
//! `users` shape of the diff and extraction benchmarks), writes a project under
//! `target/bench-data/e2e/<rows>/`, and runs both syncs as child processes, measuring each
//! process's wall time, CPU time and peak RSS with `wait4`. Stage timings and counts are read
//! from the run records in the project's metadata store; the counts are checked against the
//! changes made and against what the receiver got. `--keep` leaves the project directory (the
//! snapshots, the exported files) in place; by default it is removed after each size.
//! `--sample-rss` also samples the process's RSS every 100 ms and prints the peak per stage.
//! `SLUICE_BENCH_BIN=path` runs another `sluice` binary (an earlier version, side by side).
//! `--profile DIR` runs each sync under `perf record -F 499 -g` (Debian's linux-perf), writing
//! `DIR/<rows>-<sync>.perf.data` (its timings then include perf's overhead).
//!
//! `--stores local s3` runs both syncs once per store, side by side on the same table: `local`
//! keeps the snapshots and the exported files on local disk (the default), `s3` puts both in a
//! bucket of a local S3 server (moto, installed by `.ci/test-tools`; `SLUICE_TEST_TOOLS` says
//! where), so the snapshot writer and the `file` destination upload in multipart parts. For
//! `s3` it reports the bytes each sync uploaded, and once per size the throughput of boto3
//! uploading the same files (the local store's) to the same server: what that server takes
//! from its own reference client.

#[path = "common/process.rs"]
mod process;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use process::{ProcessCost, Sample, busy_between, measure, peak_between};

use axum::Router;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::routing::post;
use serde::Deserialize;
use sqlx::Row;

const TABLE: &str = "sluice_bench.e2e_users";
const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// One mapping's run, as its record says.
#[derive(Debug)]
struct RunFigures {
    mapping: String,
    status: String,
    extracted: i64,
    added: i64,
    updated: i64,
    deleted: i64,
    delivered: i64,
    failed: i64,
    extract_ms: i64,
    diff_ms: i64,
    read_ms: i64,
    render_ms: i64,
    deliver_ms: i64,
    checkpoint_ms: i64,
    /// Seconds from the end of the shared extraction to this mapping's commit.
    mapping_s: f64,
}

#[derive(Deserialize)]
struct SegmentBatch {
    batch: Vec<serde::de::IgnoredAny>,
}

fn generator(from: i64, to: i64) -> String {
    format!(
        "SELECT
            g::int8 AS id,
            'user' || g || '@example.com' AS email,
            (ARRAY['Ada','Grace','Linus','Ken','Barbara'])[1 + g % 5] AS first_name,
            'Last' || (g % 1000) AS last_name,
            (ARRAY['free','starter','pro','enterprise'])[1 + g % 4] AS plan,
            (ARRAY['US','DE','FR','GB','JP','BR'])[1 + g % 6] AS country,
            (g % 10000) / 7.0::float8 AS lifetime_value,
            (g % 100)::int4 AS lead_score,
            g % 3 <> 0 AS is_active,
            timestamp '2020-01-01' + g * interval '1 second' AS created_at,
            timestamptz '2024-01-01' + g * interval '1 second' AS updated_at
        FROM generate_series({from}, {to}) g"
    )
}

async fn postgres() -> tokio_postgres::Client {
    let (client, connection) =
        tokio_postgres::connect("host=127.0.0.1 user=postgres dbname=test", tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| {
                panic!("the e2e benchmark needs the local PostgreSQL (127.0.0.1:5432, database test): {e}")
            });
    tokio::spawn(connection);
    client
}

async fn create_table(pg: &tokio_postgres::Client, rows: i64) {
    let started = Instant::now();
    pg.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS sluice_bench;
         DROP TABLE IF EXISTS {TABLE};
         CREATE UNLOGGED TABLE {TABLE} AS {};
         ALTER TABLE {TABLE} ADD PRIMARY KEY (id);",
        generator(1, rows)
    ))
    .await
    .expect("create the table");
    pg.batch_execute(&format!("VACUUM ANALYZE {TABLE}"))
        .await
        .expect("vacuum");
    eprintln!(
        "  generated {rows} rows in {TABLE} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// 2% updated, 1% deleted, 1% added; returns (added, updated, deleted).
async fn change_table(pg: &tokio_postgres::Client, rows: i64) -> (i64, i64, i64) {
    let updated = pg
        .execute(
            &format!(
                "UPDATE {TABLE} SET plan = 'upgraded', updated_at = updated_at + interval '1 day' WHERE id % 50 = 0"
            ),
            &[],
        )
        .await
        .expect("update") as i64;
    let deleted = pg
        .execute(&format!("DELETE FROM {TABLE} WHERE id % 100 = 7"), &[])
        .await
        .expect("delete") as i64;
    let added = pg
        .execute(
            &format!("INSERT INTO {TABLE} {}", generator(rows + 1, rows + rows / 100)),
            &[],
        )
        .await
        .expect("insert") as i64;
    pg.batch_execute(&format!("VACUUM ANALYZE {TABLE}"))
        .await
        .expect("vacuum");
    (added, updated, deleted)
}

/// Where a project keeps its snapshots and exported files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    Local,
    S3,
}

impl Store {
    fn name(self) -> &'static str {
        match self {
            Store::Local => "local",
            Store::S3 => "s3",
        }
    }
}

/// A moto S3 server on a free loopback port, stopped on drop.
struct Moto {
    child: std::process::Child,
    endpoint: String,
    python: PathBuf,
}

const MOTO_KEY: &str = "bench-key";
const MOTO_SECRET: &str = "bench-secret";

impl Moto {
    fn start() -> Self {
        let tools = std::env::var_os("SLUICE_TEST_TOOLS")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/sluice-test-tools")
            });
        let server = tools.join("venv/bin/moto_server");
        assert!(
            server.exists(),
            "{} is missing: run .ci/test-tools first",
            server.display()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = std::process::Command::new(&server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start moto");
        let endpoint = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(30), "moto did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Self {
            child,
            endpoint,
            python: tools.join("venv/bin/python"),
        }
    }

    async fn create_bucket(&self, bucket: &str) {
        let response = reqwest::Client::new()
            .put(format!("{}/{bucket}", self.endpoint))
            .send()
            .await
            .expect("create bucket");
        assert!(
            response.status().is_success(),
            "create bucket: {}",
            response.status()
        );
    }

    fn options_yaml(&self) -> String {
        format!(
            "{{ aws_endpoint: \"{}\", aws_region: us-east-1, aws_access_key_id: {MOTO_KEY}, aws_secret_access_key: {MOTO_SECRET}, allow_http: \"true\", timeout: 5m }}",
            self.endpoint
        )
    }

    fn options(&self) -> [(String, String); 5] {
        [
            ("aws_endpoint", self.endpoint.as_str()),
            ("aws_region", "us-east-1"),
            ("aws_access_key_id", MOTO_KEY),
            ("aws_secret_access_key", MOTO_SECRET),
            ("allow_http", "true"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
    }

    /// Bytes stored under `prefix` of `bucket`.
    async fn stored_bytes(&self, bucket: &str, prefix: &str) -> u64 {
        use futures::TryStreamExt;
        let url = url::Url::parse(&format!("s3://{bucket}/")).expect("url");
        let store = sluice_snapshots::open_store(&url, self.options())
            .expect("open bucket")
            .store;
        let prefix = object_store::path::Path::from(prefix);
        store
            .list(Some(&prefix))
            .try_fold(0u64, |sum, meta| async move { Ok(sum + meta.size) })
            .await
            .expect("list bucket")
    }

    /// Seconds object_store takes to upload every file under `dir` to `bucket` the way sluice's
    /// writers do (its `BufWriter`: 10 MiB parts, 8 in flight), one file after another, and the
    /// bytes uploaded.
    async fn object_store_upload(&self, dir: &Path, bucket: &str) -> (f64, u64) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let url = url::Url::parse(&format!("s3://{bucket}/")).expect("url");
        let store = sluice_snapshots::open_store(&url, self.options())
            .expect("open bucket")
            .store;
        let mut files = Vec::new();
        let mut dirs = vec![dir.to_path_buf()];
        while let Some(d) = dirs.pop() {
            for entry in std::fs::read_dir(&d).expect("read dir").flatten() {
                let path = entry.path();
                if path.is_dir() {
                    dirs.push(path);
                } else {
                    files.push(path);
                }
            }
        }
        let started = Instant::now();
        let mut total = 0u64;
        let mut chunk = vec![0u8; 1 << 20];
        for file in files {
            let relative = file.strip_prefix(dir).expect("under dir").display().to_string();
            let mut writer = object_store::buffered::BufWriter::new(
                store.clone(),
                object_store::path::Path::from(format!("object_store/{relative}")),
            );
            let mut input = tokio::fs::File::open(&file).await.expect("open");
            loop {
                let n = input.read(&mut chunk).await.expect("read");
                if n == 0 {
                    break;
                }
                writer.write_all(&chunk[..n]).await.expect("upload");
                total += n as u64;
            }
            writer.shutdown().await.expect("complete upload");
        }
        (started.elapsed().as_secs_f64(), total)
    }

    /// Seconds boto3 takes to upload every file under `dir` (its default multipart transfer:
    /// 8 MiB parts, 10 threads) to `bucket`, and the bytes uploaded.
    fn boto3_upload(&self, dir: &Path, bucket: &str) -> (f64, u64) {
        let script = r#"
import os, sys, time, boto3
from boto3.s3.transfer import TransferConfig
endpoint, bucket, root, key, secret = sys.argv[1:6]
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                  aws_access_key_id=key, aws_secret_access_key=secret)
files = [os.path.join(d, f) for d, _, names in os.walk(root) for f in names]
total = sum(os.path.getsize(f) for f in files)
config = TransferConfig()
start = time.perf_counter()
for f in files:
    s3.upload_file(f, bucket, "boto3/" + os.path.relpath(f, root), Config=config)
print(time.perf_counter() - start, total)
"#;
        let output = std::process::Command::new(&self.python)
            .args(["-c", script, &self.endpoint, bucket])
            .arg(dir)
            .args([MOTO_KEY, MOTO_SECRET])
            .output()
            .expect("run boto3");
        assert!(
            output.status.success(),
            "boto3 upload: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let text = String::from_utf8_lossy(&output.stdout);
        let mut fields = text.split_whitespace();
        let seconds = fields.next().and_then(|v| v.parse().ok()).expect("seconds");
        let bytes = fields.next().and_then(|v| v.parse().ok()).expect("bytes");
        (seconds, bytes)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where a project on `store` keeps its snapshots and exports: (config lines, exports URL).
fn store_settings(store: Store, moto: Option<&Moto>, bucket: &str, project: &str) -> (String, String) {
    match (store, moto) {
        (Store::S3, Some(moto)) => (
            format!(
                "snapshot_store: s3://{bucket}/{project}/snapshots\nsnapshot_store_options: {}\n",
                moto.options_yaml()
            ),
            format!(
                "s3://{bucket}/{project}/exports/, options: {}",
                moto.options_yaml()
            ),
        ),
        _ => (String::new(), "exports/".to_string()),
    }
}

fn write_project(dir: &Path, receiver: &str, store_lines: &str, exports: &str) -> PathBuf {
    std::fs::create_dir_all(dir).expect("project dir");
    let config = format!(
        r#"state_dir: .sluice
{store_lines}sources:
  pg: {{ type: postgres, url: "{PG_URL}", sslmode: disable }}
models:
  users:
    source: pg
    sql: SELECT * FROM {TABLE}
    primary_key: id
destinations:
  receiver:
    type: segment
    write_key: bench
    url: {receiver}
    delivery: {{ rate_limit: "off" }}
  exports: {{ type: file, url: {exports}, format: jsonl }}
mappings:
  users_to_receiver:
    model: users
    destination: receiver
    action: identify
    fields: {{ userId: {{ column: id, as: string }} }}
    columns: all
    send: [added, updated]
  users_to_file:
    model: users
    destination: exports
    columns: all
    send: [added, updated, deleted]
"#
    );
    let path = dir.join("sluice.yaml");
    std::fs::write(&path, config).expect("write sluice.yaml");
    path
}

/// The `sluice` binary to run: this build's, or `SLUICE_BENCH_BIN` (another version's, to
/// compare the two side by side).
fn sluice_binary() -> std::ffi::OsString {
    std::env::var_os("SLUICE_BENCH_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_sluice").into())
}

/// Runs `sluice run` and waits for it with `wait4`, for its own CPU time and peak RSS.
fn run_sluice(
    config: &Path,
    log: &Path,
    sample_rss: bool,
    profile: Option<PathBuf>,
) -> (ProcessCost, Vec<Sample>) {
    let log_file = std::fs::File::create(log).expect("log file");
    let mut command = match profile {
        Some(output) => {
            let mut perf = std::process::Command::new("perf");
            perf.args(["record", "-F", "499", "-g", "-o"])
                .arg(output)
                .arg("--")
                .arg(sluice_binary());
            perf
        }
        None => std::process::Command::new(sluice_binary()),
    };
    command
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(log_file.try_clone().expect("log"))
        .stderr(log_file);
    measure(&mut command, sample_rss)
}

async fn latest_runs(state: &Path) -> Vec<RunFigures> {
    let url = format!("sqlite://{}?mode=ro", state.join("sluice.db").display());
    let pool = sqlx::SqlitePool::connect(&url)
        .await
        .expect("open the metadata store");
    let rows = sqlx::query(
        "SELECT mapping, status, extracted, added, updated, deleted, delivered, failed,
                COALESCE(extract_ms, 0) AS extract_ms, COALESCE(diff_ms, 0) AS diff_ms,
                COALESCE(deliver_ms, 0) AS deliver_ms, COALESCE(read_ms, 0) AS read_ms,
                COALESCE(render_ms, 0) AS render_ms, COALESCE(checkpoint_ms, 0) AS checkpoint_ms,
                started_at, finished_at
         FROM runs ORDER BY started_at DESC, mapping LIMIT 2",
    )
    .fetch_all(&pool)
    .await
    .expect("read the runs");
    pool.close().await;
    let time = |r: &sqlx::sqlite::SqliteRow, column: &str| {
        let text: String = r.get(column);
        chrono::DateTime::parse_from_rfc3339(&text).expect("RFC 3339 time")
    };
    // The model is extracted once; then its mappings run (at once, in this version; one
    // after the other in earlier ones). A mapping's wall time runs from the end of the
    // extraction to its commit.
    let extracted_at = rows.iter().map(|r| time(r, "started_at")).min().expect("runs")
        + chrono::Duration::milliseconds(rows[0].get::<i64, _>("extract_ms"));
    let walls: std::collections::HashMap<String, f64> = rows
        .iter()
        .map(|r| {
            (
                r.get::<String, _>("mapping"),
                (time(r, "finished_at") - extracted_at).as_seconds_f64(),
            )
        })
        .collect();
    let mut runs: Vec<RunFigures> = rows
        .iter()
        .map(|r| RunFigures {
            mapping: r.get("mapping"),
            status: r.get("status"),
            extracted: r.get("extracted"),
            added: r.get("added"),
            updated: r.get("updated"),
            deleted: r.get("deleted"),
            delivered: r.get("delivered"),
            failed: r.get("failed"),
            extract_ms: r.get("extract_ms"),
            diff_ms: r.get("diff_ms"),
            read_ms: r.get("read_ms"),
            render_ms: r.get("render_ms"),
            deliver_ms: r.get("deliver_ms"),
            checkpoint_ms: r.get("checkpoint_ms"),
            mapping_s: walls[&r.get::<String, _>("mapping")],
        })
        .collect();
    runs.sort_by(|a, b| b.mapping.cmp(&a.mapping));
    runs
}

#[allow(clippy::too_many_arguments)]
fn report(
    rows: i64,
    sync: &str,
    store: Store,
    uploaded: Option<u64>,
    cost: &ProcessCost,
    runs: &[RunFigures],
    samples: &[Sample],
    expect: (i64, i64, i64),
    received: u64,
    expect_received: u64,
) {
    let extracted = runs.first().map_or(0, |r| r.extracted);
    let extract_s = runs.first().map_or(0, |r| r.extract_ms) as f64 / 1000.0;
    let s = |ms: i64| ms as f64 / 1000.0;
    let busy = |from: f64, to: f64| busy_between(samples, from, to) * 100.0;
    let uploaded = uploaded.map_or("–".to_string(), |bytes| {
        format!(
            "{:.0} MiB, {:.0} MiB/s",
            bytes as f64 / 1048576.0,
            bytes as f64 / 1048576.0 / cost.wall
        )
    });
    println!(
        "| {rows} | {sync} | {} | {:.1} | {:.1} | {:.0} | {:.2} M | {extract_s:.1} | {uploaded} | {:.0}% / {:.0}% | {} |",
        store.name(),
        cost.wall,
        cost.cpu,
        cost.peak_rss_mib,
        extracted as f64 / cost.wall / 1e6,
        busy(0.0, extract_s),
        busy(extract_s, f64::MAX),
        runs.iter()
            .map(|r| format!(
                "{} {:.1} ({:.1} / {:.1} / {:.1} / {:.1} / {:.1})",
                short(&r.mapping),
                r.mapping_s,
                s(r.diff_ms),
                s(r.read_ms),
                s(r.render_ms),
                s(r.deliver_ms),
                s(r.checkpoint_ms)
            ))
            .collect::<Vec<_>>()
            .join("; "),
    );
    if samples.iter().any(|s| s.rss_mib.is_some()) {
        let extract_end = extract_s;
        eprintln!(
            "  sampled RSS peak: extraction {:.0} MiB, diff and delivery {:.0} MiB",
            peak_between(samples, 0.0, extract_end),
            peak_between(samples, extract_end, f64::MAX)
        );
    }
    println!(
        "{{\"rows\":{rows},\"sync\":\"{sync}\",\"store\":\"{}\",\"wall_s\":{:.3},\"cpu_s\":{:.3},\"peak_rss_mib\":{:.1},\"runs\":[{}]}}",
        store.name(),
        cost.wall,
        cost.cpu,
        cost.peak_rss_mib,
        runs.iter()
            .map(|r| format!(
                "{{\"mapping\":\"{}\",\"status\":\"{}\",\"extracted\":{},\"added\":{},\"updated\":{},\"deleted\":{},\"delivered\":{},\"failed\":{},\"extract_ms\":{},\"diff_ms\":{},\"read_ms\":{},\"render_ms\":{},\"deliver_ms\":{},\"checkpoint_ms\":{},\"mapping_s\":{:.3}}}",
                r.mapping, r.status, r.extracted, r.added, r.updated, r.deleted, r.delivered, r.failed, r.extract_ms, r.diff_ms, r.read_ms, r.render_ms, r.deliver_ms, r.checkpoint_ms, r.mapping_s
            ))
            .collect::<Vec<_>>()
            .join(",")
    );
    assert_eq!(
        cost.exit, 0,
        "sluice run failed (see the log in the project directory)"
    );
    for run in runs {
        assert_eq!(run.status, "succeeded", "{run:?}");
        assert_eq!(run.failed, 0, "{run:?}");
        assert_eq!((run.added, run.updated, run.deleted), expect, "{run:?}");
    }
    assert_eq!(received, expect_received, "records the receiver got");
}

fn short(mapping: &str) -> &str {
    mapping.strip_prefix("users_to_").unwrap_or(mapping)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let keep = args.iter().any(|a| a == "--keep");
    let sample_rss = args.iter().any(|a| a == "--sample-rss");
    let profile: Option<PathBuf> = args
        .iter()
        .position(|a| a == "--profile")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    if let Some(dir) = &profile {
        std::fs::create_dir_all(dir).expect("profile directory");
    }
    let values = |flag: &str| -> Vec<String> {
        args.iter()
            .skip_while(|a| *a != flag)
            .skip(1)
            .take_while(|a| !a.starts_with("--"))
            .cloned()
            .collect()
    };
    let mut sizes: Vec<i64> = values("--rows")
        .iter()
        .filter_map(|a| a.replace('_', "").parse().ok())
        .collect();
    if sizes.is_empty() {
        sizes = vec![1_000_000];
    }
    let mut stores: Vec<Store> = values("--stores")
        .iter()
        .map(|name| match name.as_str() {
            "local" => Store::Local,
            "s3" => Store::S3,
            other => panic!("unknown store `{other}` (local or s3)"),
        })
        .collect();
    if stores.is_empty() {
        stores = vec![Store::Local];
    }
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-data/e2e");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let received = Arc::new(AtomicU64::new(0));
        let counter = received.clone();
        // The receiver parses every request (each message checked as JSON) and accepts it.
        let app = Router::new().route(
            "/v1/batch",
            post(move |body: Bytes| {
                let counter = counter.clone();
                async move {
                    match serde_json::from_slice::<SegmentBatch>(&body) {
                        Ok(batch) => {
                            counter.fetch_add(batch.batch.len() as u64, Ordering::Relaxed);
                            (StatusCode::OK, axum::Json(serde_json::json!({"success": true})))
                        }
                        Err(e) => (
                            StatusCode::BAD_REQUEST,
                            axum::Json(serde_json::json!({"error": e.to_string()})),
                        ),
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let receiver = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        let moto = stores.contains(&Store::S3).then(Moto::start);
        const BUCKET: &str = "sluice-bench";
        if let Some(moto) = &moto {
            moto.create_bucket(BUCKET).await;
        }
        let pg = postgres().await;
        println!(
            "| rows | sync | store | wall s | CPU s | peak RSS MiB | rows/s | extract s | uploaded (MiB/s over the run) | machine CPU busy (extraction / after) | per mapping: s after extraction (diff / read rows / render / send / checkpoints, summed s) |"
        );
        println!("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|");
        for rows in sizes {
            eprintln!("{rows} rows:");
            create_table(&pg, rows).await;
            let mut projects = Vec::new();
            for &store in &stores {
                let name = format!("{rows}-{}", store.name());
                let dir = data.join(&name);
                let _ = std::fs::remove_dir_all(&dir);
                let (store_lines, exports) = store_settings(store, moto.as_ref(), BUCKET, &name);
                let config = write_project(&dir, &receiver, &store_lines, &exports);
                projects.push((store, name, dir, config));
            }
            let perf_output = |sync: &str, store: Store| {
                profile
                    .as_ref()
                    .map(|d| d.join(format!("{rows}-{sync}-{}.perf.data", store.name())))
            };
            let uploaded = |store: Store, prefix: String| {
                let moto = moto.as_ref();
                async move {
                    match (store, moto) {
                        (Store::S3, Some(moto)) => Some(moto.stored_bytes(BUCKET, &prefix).await),
                        _ => None,
                    }
                }
            };
            for (store, name, dir, config) in &projects {
                received.store(0, Ordering::Relaxed);
                let (cost, samples) = tokio::task::block_in_place(|| {
                    run_sluice(config, &dir.join("first.log"), sample_rss, perf_output("first", *store))
                });
                let runs = latest_runs(&dir.join(".sluice")).await;
                report(
                    rows,
                    "first",
                    *store,
                    uploaded(*store, name.clone()).await,
                    &cost,
                    &runs,
                    &samples,
                    (rows, 0, 0),
                    received.load(Ordering::Relaxed),
                    rows as u64,
                );
            }
            // The same files uploaded alone, by sluice's upload path and by the reference
            // client, to the same server, alternately.
            if let (Some(moto), Some((_, _, local_dir, _))) =
                (&moto, projects.iter().find(|p| p.0 == Store::Local))
            {
                for round in 0..2 {
                    let (os_seconds, os_bytes) = moto.object_store_upload(local_dir, BUCKET).await;
                    let (seconds, bytes) =
                        tokio::task::block_in_place(|| moto.boto3_upload(local_dir, BUCKET));
                    let mib = |b: u64| b as f64 / 1048576.0;
                    eprintln!(
                        "  round {round}: the local project's {:.0} MiB (snapshots and exports) uploaded by object_store in {os_seconds:.1} s ({:.0} MiB/s), by boto3 in {seconds:.1} s ({:.0} MiB/s)",
                        mib(os_bytes),
                        mib(os_bytes) / os_seconds,
                        mib(bytes) / seconds
                    );
                    println!(
                        "{{\"rows\":{rows},\"round\":{round},\"object_store_upload\":{{\"bytes\":{os_bytes},\"seconds\":{os_seconds:.3}}},\"boto3_upload\":{{\"bytes\":{bytes},\"seconds\":{seconds:.3}}}}}"
                    );
                }
            }

            let (added, updated, deleted) = change_table(&pg, rows).await;
            for (store, name, dir, config) in &projects {
                let before = uploaded(*store, name.clone()).await;
                received.store(0, Ordering::Relaxed);
                let (cost, samples) = tokio::task::block_in_place(|| {
                    run_sluice(config, &dir.join("second.log"), sample_rss, perf_output("second", *store))
                });
                let runs = latest_runs(&dir.join(".sluice")).await;
                let after = uploaded(*store, name.clone()).await;
                report(
                    rows,
                    "second",
                    *store,
                    after.zip(before).map(|(a, b)| a.saturating_sub(b)),
                    &cost,
                    &runs,
                    &samples,
                    (added, updated, deleted),
                    received.load(Ordering::Relaxed),
                    (added + updated) as u64,
                );
                if !keep {
                    let _ = std::fs::remove_dir_all(dir);
                }
            }
        }
        pg.batch_execute(&format!("DROP TABLE IF EXISTS {TABLE}")).await.ok();
    });
}
