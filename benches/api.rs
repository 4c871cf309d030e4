//! The HTTP API under load, as `sluice serve` runs it (the router, token checks, the metadata
//! store), on loopback:
//!
//! - **control plane**: `wrk` (Debian's package) with 200 connections against the endpoints an
//!   orchestrator or the console polls, beside `GET /healthz` (no token, no store) as the floor;
//!   prints each one's latency percentiles and requests per second;
//! - **history queries**: `POST /api/v1/query` over `snapshots` snapshots of `rows` rows, the
//!   time to the first byte of the body and to its end.
//!
//! `cargo bench --bench api -- [rows] [snapshots] [seconds] [rounds] [only]` (defaults
//! 1,000,000, 10, 10 and 3; `only`: run just the endpoints whose name contains it, and no
//! history queries). The endpoints take turns, round after round, and the medians are printed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_connectors::Connectors;
use sluice_engine::metadata::{RunRecord, RunStatus};
use sluice_engine::service::Service;
use sluice_engine::tokens::Scope;
use sluice_engine::{Engine, Project, Quiet};
use sluice_snapshots::SnapshotStore;

const SEEDED_RUNS: usize = 2_000;

#[path = "common/history.rs"]
mod history;

const CONFIG: &str = r#"state_dir: .sluice
sources:
  warehouse:
    type: files
    tables:
      users: data/users.parquet
models:
  users:
    source: warehouse
    sql: SELECT id, email, plan, lead_score FROM users
    primary_key: id
destinations:
  crm:
    type: webhook
    url: http://127.0.0.1:9/ingest
mappings:
  users_to_crm:
    model: users
    destination: crm
    fields: { email: email, "traits.plan": plan }
"#;

/// wrk's figures for one endpoint (latencies in ms).
struct Load {
    p50: f64,
    p90: f64,
    p99: f64,
    requests_per_s: f64,
    errors: String,
}

/// wrk's latency (`812.00us`, `4.31ms`, `1.02s`) in milliseconds.
fn millis(text: &str) -> f64 {
    let (number, unit) = text.split_at(text.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(text.len()));
    let value: f64 = number.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => value / 1000.0,
        "ms" => value,
        "s" => value * 1000.0,
        _ => f64::NAN,
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn wrk(url: &str, token: Option<&str>, seconds: u64) -> Option<Load> {
    let mut command = std::process::Command::new("wrk");
    command.args(["-t2", "-c200", &format!("-d{seconds}s"), "--latency"]);
    if let Some(token) = token {
        command.args(["-H", &format!("Authorization: Bearer {token}")]);
    }
    let output = command.arg(url).output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let percentile = |p: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(p))
            .and_then(|l| l.split_whitespace().nth(1))
            .map_or(f64::NAN, millis)
    };
    let requests_per_s = text
        .lines()
        .find(|l| l.starts_with("Requests/sec:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    let errors = text
        .lines()
        .filter(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("; ");
    Some(Load {
        p50: percentile("50%"),
        p90: percentile("90%"),
        p99: percentile("99%"),
        requests_per_s,
        errors: if errors.is_empty() { "none".into() } else { errors },
    })
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.replace('_', "").parse().ok())
        .collect();
    let rows = args.first().copied().unwrap_or(1_000_000) as i64;
    let snapshots = args.get(1).copied().unwrap_or(10) as i64;
    let seconds = args.get(2).copied().unwrap_or(10);
    let rounds = args.get(3).copied().unwrap_or(3).max(1);
    let only: Option<String> = std::env::args().skip(1).nth(4);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("data")).expect("data");
    std::fs::write(dir.path().join("sluice.yaml"), CONFIG).expect("config");
    let (base, token, run_id) = runtime.block_on(async {
        // The model's table (for previews) and its history (for queries).
        let file = std::fs::File::create(dir.path().join("data/users.parquet")).expect("parquet");
        let sample = history::batch(0..1000, 0);
        let mut writer = parquet::arrow::ArrowWriter::try_new(file, sample.schema(), None).expect("writer");
        writer.write(&sample).expect("write");
        writer.close().expect("close");
        let store_dir = dir.path().join(".sluice/snapshots");
        std::fs::create_dir_all(&store_dir).expect("store dir");
        let store = SnapshotStore::open(store_dir.to_str().expect("path"), dir.path(), []).expect("store");
        let generated = Instant::now();
        history::write_snapshots(&store, rows, snapshots, true).await;
        println!(
            "{snapshots} snapshots of {rows} rows written in {:.1} s",
            generated.elapsed().as_secs_f64()
        );

        let project = Project::load(&dir.path().join("sluice.yaml")).expect("project");
        let engine = Engine::open(project, &Connectors).await.expect("engine");
        let token = engine
            .metadata()
            .create_token("bench", Scope::Admin)
            .await
            .expect("token");
        // A run history of realistic length for the list endpoints.
        let mut last = String::new();
        for i in 0..SEEDED_RUNS {
            let mut run = RunRecord::starting("users_to_crm", "users", "crm", false);
            run.started_at -= chrono::Duration::minutes((SEEDED_RUNS - i) as i64 * 15);
            run.finished_at = Some(run.started_at + chrono::Duration::seconds(40));
            run.status = RunStatus::Succeeded;
            run.counts.extracted = rows as u64;
            engine.metadata().start_run(&run).await.expect("start");
            engine.metadata().commit_run(&run, None).await.expect("commit");
            last = run.id;
        }
        let service = Service::new(engine, Arc::new(Connectors), Arc::new(Quiet)).expect("service");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            sluice_api::serve(listener, service, std::future::pending::<()>())
                .await
                .expect("serve");
        });
        (base, token, last)
    });

    let endpoints = [
        (
            "GET /healthz (floor: no token, no store)",
            "/healthz".to_string(),
            false,
        ),
        ("GET /api/v1/mappings", "/api/v1/mappings".to_string(), true),
        (
            "GET /api/v1/mappings/users_to_crm",
            "/api/v1/mappings/users_to_crm".to_string(),
            true,
        ),
        (
            "GET /api/v1/runs?limit=20",
            "/api/v1/runs?limit=20".to_string(),
            true,
        ),
        (
            "GET /api/v1/runs?mapping=users_to_crm&status=succeeded&limit=50",
            "/api/v1/runs?mapping=users_to_crm&status=succeeded&limit=50".to_string(),
            true,
        ),
        ("GET /api/v1/runs/{id}", format!("/api/v1/runs/{run_id}"), true),
    ];
    let endpoints: Vec<_> = endpoints
        .into_iter()
        .filter(|(name, _, _)| only.as_ref().is_none_or(|o| name.contains(o.as_str())))
        .collect();
    println!(
        "\ncontrol plane: wrk -t2 -c200 -d{seconds}s --latency, {SEEDED_RUNS} runs in the metadata store, {rounds} rounds"
    );
    let mut results: Vec<Vec<Load>> = endpoints.iter().map(|_| Vec::new()).collect();
    'rounds: for round in 1..=rounds {
        for (i, (name, path, authed)) in endpoints.iter().enumerate() {
            let Some(load) = wrk(
                &format!("{base}{path}"),
                authed.then_some(token.as_str()),
                seconds,
            ) else {
                println!("(wrk is not installed: `apt-get install wrk`; control-plane figures skipped)");
                break 'rounds;
            };
            println!(
                "round {round}: {name}: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, {:.0} requests/s, errors: {}",
                load.p50, load.p90, load.p99, load.requests_per_s, load.errors
            );
            results[i].push(load);
        }
    }
    println!(
        "\n| endpoint (medians of {rounds} rounds) | p50 ms | p90 ms | p99 ms | requests/s | p50 / floor |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let floor = median(
        results
            .first()
            .map_or(Vec::new(), |r| r.iter().map(|l| l.p50).collect()),
    );
    for ((name, _, _), loads) in endpoints.iter().zip(&results) {
        if loads.is_empty() {
            continue;
        }
        let p50 = median(loads.iter().map(|l| l.p50).collect());
        println!(
            "| {name} | {p50:.2} | {:.2} | {:.2} | {:.0} | {:.2}x |",
            median(loads.iter().map(|l| l.p90).collect()),
            median(loads.iter().map(|l| l.p99).collect()),
            median(loads.iter().map(|l| l.requests_per_s).collect()),
            p50 / floor
        );
    }

    if only.is_some() {
        return;
    }
    println!("\nhistory queries through POST /api/v1/query (JSON lines), 3 repetitions");
    let client = reqwest::Client::new();
    let queries = [
        (
            "one key's history",
            "SELECT id, plan, _run_id, _extracted_at FROM users_history WHERE id = 4242 ORDER BY _extracted_at",
        ),
        (
            "changed between two runs",
            "SELECT a.id, a.plan AS before, b.plan AS after FROM users_history a JOIN users_history b ON a.id = b.id AND a._run_id = 'run-3' AND b._run_id = 'run-4' WHERE a.plan <> b.plan",
        ),
        ("full scan (first 1,000,000 rows)", "SELECT * FROM users_history"),
    ];
    runtime.block_on(async {
        for _ in 0..3 {
            let mut line = Vec::new();
            for (name, sql) in queries {
                let started = Instant::now();
                let mut response = client
                    .post(format!("{base}/api/v1/query"))
                    .bearer_auth(&token)
                    .header("content-type", "application/json")
                    .body(serde_json::json!({ "sql": sql, "max_rows": 1_000_000 }).to_string())
                    .timeout(Duration::from_secs(300))
                    .send()
                    .await
                    .expect("query");
                assert!(response.status().is_success(), "{}", response.status());
                let mut first = None;
                let mut bytes = 0usize;
                while let Some(chunk) = response.chunk().await.expect("chunk") {
                    if first.is_none() && !chunk.is_empty() {
                        first = Some(started.elapsed().as_secs_f64());
                    }
                    bytes += chunk.len();
                }
                let total = started.elapsed().as_secs_f64();
                line.push(format!(
                    "{name}: first byte {:.3} s, all {:.3} s ({:.1} MB)",
                    first.unwrap_or(total),
                    total,
                    bytes as f64 / 1e6
                ));
            }
            println!("{}", line.join(" | "));
        }
    });
}
