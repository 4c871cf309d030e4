//! The control plane under load, side by side: `sluice serve` running a large run and heavy
//! history queries at once while a client polls `/healthz` and `GET /api/v1/mappings` and
//! another watches the run's lease (`common/load.rs`, the scenario `tests/it/isolation.rs`
//! asserts bounds on).
//!
//! `cargo bench --bench control_plane -- --rows 1000000 --rounds 2`
//! With `SLUICE_BENCH_PREVIOUS=/path/to/old/sluice`, each round runs the previous binary too
//! (alternating), with the same scenario minus `api.limits`, which it does not know; its heavy
//! queries are abandoned by the client after `--query-seconds` (default 20), the limit the
//! current binary enforces.
//!
//! Needs the local PostgreSQL (source tables and the metadata store).

#[path = "common/load.rs"]
mod load;

use std::path::PathBuf;
use std::time::Duration;

const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| -> Option<String> { args.iter().skip_while(|a| *a != flag).nth(1).cloned() };
    let rows: u64 = value("--rows")
        .and_then(|r| r.replace('_', "").parse().ok())
        .unwrap_or(1_000_000);
    let rounds: usize = value("--rounds").and_then(|r| r.parse().ok()).unwrap_or(2);
    let heavy: usize = value("--queries").and_then(|r| r.parse().ok()).unwrap_or(4);
    let query_seconds: u64 = value("--query-seconds")
        .and_then(|r| r.parse().ok())
        .unwrap_or(20);
    let current: PathBuf = std::env::var_os("SLUICE_BENCH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_sluice").into());
    let mut variants = vec![("sluice", current, true)];
    if let Some(previous) = std::env::var_os("SLUICE_BENCH_PREVIOUS") {
        variants.push(("sluice previous", PathBuf::from(previous), false));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        load::prepare_source(PG_URL, "control_plane_bench", rows)
            .await
            .expect("create the source tables (is PostgreSQL up on 127.0.0.1:5432?)");
        println!(
            "| round | binary | /healthz p50 / p99 / max ms (failed) | GET /api/v1/mappings p50 / p99 / max ms (failed) | run s | lease left, min s of 10 | heavy queries (status × n) | past the limit |"
        );
        println!("|---:|---|---|---|---:|---:|---|---|");
        for round in 1..=rounds {
            for (name, binary, limits) in &variants {
                let options = load::LoadOptions {
                    binary: binary.clone(),
                    rows,
                    heavy_queries: heavy,
                    limits: limits.then(|| {
                        format!(
                            "{{ queries: {heavy}, queries_per_token: {}, query_timeout: {query_seconds}s }}",
                            heavy.div_ceil(2)
                        )
                    }),
                    query_client_timeout: Duration::from_secs(query_seconds + 15),
                    pg_url: PG_URL.into(),
                    schema: "control_plane_bench".into(),
                    metadata_database: "sluice_control_plane_bench".into(),
                };
                let report = load::run(&options).await.expect("the load scenario");
                let latency = |l: &load::Latencies| {
                    format!(
                        "{:.1} / {:.1} / {:.1} ({})",
                        l.percentile(50.0),
                        l.percentile(99.0),
                        l.max(),
                        l.failures
                    )
                };
                let statuses = |answers: &[load::QueryAnswer]| {
                    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
                    for a in answers {
                        let status = if a.status == 0 {
                            "abandoned".to_string()
                        } else {
                            a.status.to_string()
                        };
                        *counts.entry(status).or_default() += 1;
                    }
                    counts
                        .iter()
                        .map(|(s, n)| format!("{s} × {n}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                println!(
                    "| {round} | {name} | {} | {} | {:.1} ({}, {} delivered) | {} | {} | {} |",
                    latency(&report.health),
                    latency(&report.read),
                    report.run_seconds,
                    report.run_status,
                    report.run_delivered,
                    report
                        .lease_margin_min
                        .map(|m| format!("{m:.1}"))
                        .unwrap_or_else(|| "-".into()),
                    statuses(&report.heavy),
                    statuses(&report.extra),
                );
            }
        }
    });
}
