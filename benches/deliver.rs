//! Delivery: `users` rows rendered for a destination and delivered through the real connector
//! and the shared delivery layer (the vendor's batch size and concurrency, rate limit off) to a
//! local receiver on the same machine that parses every request, counts its records and answers
//! with the vendor's success body. Prints records per second end to end (render, hashing,
//! requests, answers), one destination after another in one process:
//!
//! - `segment`: identify messages;
//! - `meta`: Conversions API events, email hashed (`user_data.em`);
//! - `meta_audience`: Custom Audience members, email hashed;
//! - `google_ads`: Data Manager conversions (email hashed, RFC 3339 time, custom variable), with
//!   an OAuth token from the receiver;
//! - `google_customer_match`: Data Manager audience members, email hashed;
//! - `tiktok`, `snapchat`: Events API / Conversions API events, email hashed.
//!
//! `cargo bench --bench deliver -- [rows] [destination ...]` (default 1,000,000, all).
//!
//! With `--whole-run`, each destination is then also timed as the user's whole job: the rows
//! written as a Parquet file, and `sluice run` (this build's binary, or `SLUICE_BENCH_BIN`) as a
//! process reading them through the `files` source, snapshotting, diffing and delivering to the
//! same receiver; wall time, the process's CPU time and peak RSS.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use axum::Router;
use axum::body::Bytes;
use sluice_connectors::Connectors;
use sluice_engine::Op;
use sluice_engine::config::{ConnectorConfig, MappingConfig};
use sluice_engine::destination::{RunInfo, SyncMode};
use sluice_engine::mapping::MappingPlan;
use sluice_engine::source::{ConnectorEnv, ConnectorFactory};

#[path = "common/process.rs"]
mod process;

const BATCH_ROWS: usize = 65_536;

fn batch(start: usize, rows: usize) -> RecordBatch {
    let ids = start as i64..(start + rows) as i64;
    let plans = ["free", "starter", "pro", "enterprise"];
    RecordBatch::try_from_iter(vec![
        (
            "id",
            Arc::new(Int64Array::from_iter_values(ids.clone())) as ArrayRef,
        ),
        (
            "email",
            Arc::new(StringArray::from_iter_values(
                ids.clone().map(|i| format!("user{i}@example.com")),
            )) as ArrayRef,
        ),
        (
            "plan",
            Arc::new(StringArray::from_iter_values(
                ids.clone().map(|i| plans[(i % 4) as usize]),
            )) as ArrayRef,
        ),
        (
            "country",
            Arc::new(StringArray::from_iter_values(
                ids.clone().map(|i| if i % 2 == 0 { "US" } else { "DE" }),
            )) as ArrayRef,
        ),
    ])
    .expect("batch")
}

/// One destination's setup for the benchmark.
struct Profile {
    name: &'static str,
    kind: &'static str,
    action: &'static str,
    options: serde_json::Value,
    mapping: &'static str,
    run_options: serde_json::Value,
}

fn profiles(url: &str, credential: &str) -> Vec<Profile> {
    vec![
        Profile {
            name: "segment",
            kind: "segment",
            action: "identify",
            options: serde_json::json!({"write_key": "bench", "url": url}),
            mapping: "{model: users, destination: d, action: identify, fields: {userId: {column: id, as: string}}, columns: all}",
            run_options: serde_json::json!({}),
        },
        Profile {
            name: "meta",
            kind: "meta",
            action: "conversions",
            options: serde_json::json!({"access_token": "bench", "pixel_id": "1", "url": url}),
            mapping: "{model: users, destination: d, action: conversions, fields: {event_time: id, user_data.em: email, plan: plan, country: country}, constants: {event_name: Purchase, action_source: system_generated}}",
            run_options: serde_json::json!({}),
        },
        Profile {
            name: "meta_audience",
            kind: "meta",
            action: "audience",
            options: serde_json::json!({"access_token": "bench", "ad_account_id": "1", "url": url}),
            mapping: "{model: users, destination: d, action: audience, options: {audience_id: '7'}, fields: {EMAIL: email}}",
            run_options: serde_json::json!({"audience_id": "7"}),
        },
        Profile {
            name: "google_ads",
            kind: "google_ads",
            action: "conversions",
            options: serde_json::json!({"service_account": credential, "customer_id": "1234567890", "url": url, "consent": {"ad_user_data": "granted"}}),
            mapping: "{model: users, destination: d, action: conversions, options: {conversion_action_id: '7'}, fields: {eventTimestamp: id, email: email, plan: plan, country: country}, constants: {eventSource: WEB, conversionValue: 1.5, currency: EUR}}",
            run_options: serde_json::json!({"conversion_action_id": "7"}),
        },
        Profile {
            name: "google_customer_match",
            kind: "google_ads",
            action: "customer_match",
            options: serde_json::json!({"service_account": credential, "customer_id": "1234567890", "url": url, "customer_match_terms_accepted": true}),
            mapping: "{model: users, destination: d, action: customer_match, options: {user_list_id: '7'}, fields: {email: email}}",
            run_options: serde_json::json!({"user_list_id": "7"}),
        },
        Profile {
            name: "tiktok",
            kind: "tiktok",
            action: "events",
            options: serde_json::json!({"access_token": "bench", "event_source_id": "P1", "url": url}),
            mapping: "{model: users, destination: d, fields: {event_time: id, user.email: email, plan: plan, country: country}, constants: {event: CompletePayment}}",
            run_options: serde_json::json!({}),
        },
        Profile {
            name: "snapchat",
            kind: "snapchat",
            action: "conversions",
            options: serde_json::json!({"access_token": "bench", "pixel_id": "p1", "url": url}),
            mapping: "{model: users, destination: d, fields: {event_time: id, user_data.em: email, plan: plan, country: country}, constants: {event_name: PURCHASE, action_source: WEB}}",
            run_options: serde_json::json!({}),
        },
    ]
}

/// The receiver: counts the records of every request (whatever array holds them) and answers
/// as each vendor does on success; `/token` is Google's OAuth token endpoint.
async fn receive(counter: Arc<AtomicUsize>, uri: axum::http::Uri, body: Bytes) -> axum::response::Response {
    use axum::response::IntoResponse;
    let path = uri.path();
    if path == "/token" {
        return axum::Json(
            serde_json::json!({"access_token": "ya29.bench", "expires_in": 3599, "token_type": "Bearer"}),
        )
        .into_response();
    }
    let parsed: serde_json::Value = serde_json::from_slice(&body).expect("JSON body");
    let n = ["batch", "data", "events", "audienceMembers"]
        .iter()
        .find_map(|key| parsed[*key].as_array().map(Vec::len))
        .or_else(|| parsed["payload"]["data"].as_array().map(Vec::len))
        .unwrap_or(0);
    counter.fetch_add(n, Ordering::Relaxed);
    let answer = if path == "/v1/batch" {
        serde_json::json!({"success": true})
    } else if path.ends_with("/users") {
        serde_json::json!({"audience_id": "7", "session_id": "1", "num_received": n, "num_invalid_entries": 0, "invalid_entry_samples": {}})
    } else if path.ends_with("/events") && path.starts_with("/v26.0") {
        serde_json::json!({"events_received": n, "messages": [], "fbtrace_id": "bench"})
    } else if path.starts_with("/v1/") {
        serde_json::json!({"requestId": "t-bench"})
    } else if path.starts_with("/open_api") {
        serde_json::json!({"code": 0, "message": "OK", "request_id": "bench", "data": {}})
    } else {
        serde_json::json!({"status": "VALID", "reason": "Events have been processed successfully."})
    };
    axum::Json(answer).into_response()
}

/// A project running `profile`'s mapping over `data/users.parquet` in `dir`.
fn write_project(
    dir: &Path,
    profile: &Profile,
    options: &serde_json::Map<String, serde_json::Value>,
) -> std::path::PathBuf {
    let mut destination = options.clone();
    destination.insert("type".into(), profile.kind.into());
    let config = format!(
        "state_dir: .sluice\nsources:\n  warehouse:\n    type: files\n    tables:\n      users: data/users.parquet\nmodels:\n  users:\n    source: warehouse\n    sql: SELECT id, email, plan, country FROM users\n    primary_key: id\ndestinations:\n  d: {}\nmappings:\n  bench: {}\n",
        serde_json::Value::Object(destination),
        profile.mapping
    );
    let path = dir.join("sluice.yaml");
    std::fs::write(&path, config).expect("config");
    path
}

fn write_parquet(path: &Path, batches: &[RecordBatch]) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("data dir");
    let file = std::fs::File::create(path).expect("parquet file");
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, batches[0].schema(), None).expect("writer");
    for batch in batches {
        writer.write(batch).expect("write");
    }
    writer.close().expect("close");
}

fn main() {
    let whole_run = std::env::args().any(|a| a == "--whole-run");
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let rows: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(1_000_000);
    let wanted: Vec<&String> = args.iter().filter(|a| a.parse::<usize>().is_err()).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let received = Arc::new(AtomicUsize::new(0));
        let counter = received.clone();
        let app = Router::new().fallback(move |uri, body| receive(counter.clone(), uri, body));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        let credential = serde_json::json!({"type": "authorized_user", "client_id": "c", "client_secret": "s", "refresh_token": "r", "token_uri": format!("{url}/token")}).to_string();
        let batches: Vec<RecordBatch> = (0..rows)
            .step_by(BATCH_ROWS)
            .map(|start| batch(start, BATCH_ROWS.min(rows - start)))
            .collect();
        let env = ConnectorEnv {
            base_dir: std::env::temp_dir(),
            state_dir: std::env::temp_dir(),
        };
        for profile in profiles(&url, &credential) {
            if !wanted.is_empty() && !wanted.iter().any(|w| *w == profile.name) {
                continue;
            }
            let mut options = profile.options.as_object().cloned().expect("options");
            options.insert("delivery".into(), serde_json::json!({"rate_limit": "off"}));
            let config = ConnectorConfig {
                kind: profile.kind.into(),
                options,
            };
            let destination = Connectors
                .destination(profile.kind, &config, &env)
                .expect("destination");
            let run_options = profile.run_options.as_object().cloned().expect("run options");
            let action = destination
                .action(Some(profile.action), &run_options)
                .expect("action")
                .expect("action spec");
            let mut mapping: MappingConfig = serde_norway::from_str(profile.mapping).expect("mapping");
            mapping.resolve_send(false);
            let plan = MappingPlan::compile("bench", &mapping, "users", &batches[0].schema(), &["id".into()], Some(&action))
                .expect("plan");
            let writer = destination
                .open(&RunInfo {
                    run_id: "bench".into(),
                    mapping: "bench".into(),
                    model: "users".into(),
                    started_at: chrono::Utc::now(),
                    primary_key: vec!["id".into()],
                    action: Some(profile.action.into()),
                    mode: SyncMode::Upsert,
                    options: run_options,
                    dry_run: false,
                })
                .await
                .expect("open");
            let policy = writer.policy();
            let hashes: Vec<u64> = (0..BATCH_ROWS as u64).collect();
            received.store(0, Ordering::Relaxed);
            let started = Instant::now();
            let mut failed = 0;
            let mut requests = 0;
            for batch in &batches {
                let n = batch.num_rows();
                let encoded = plan.encode(batch, vec![Op::Added; n], &hashes[..n]).expect("encode");
                assert!(encoded.unsendable.is_empty(), "{:?}", encoded.unsendable.first());
                let result = sluice_engine::delivery::deliver(writer.as_ref(), &encoded.records, &policy)
                    .await
                    .expect("delivered");
                failed += result.failures.len();
                requests += result.requests;
            }
            let seconds = started.elapsed().as_secs_f64();
            let got = received.load(Ordering::Relaxed);
            assert_eq!(got, rows, "{}: the receiver got every record", profile.name);
            assert_eq!(failed, 0, "{}", profile.name);
            println!(
                "{:<22} {rows} records in {seconds:.2} s: {:.0} records/s, {requests} requests of up to {} records ({} in flight)",
                profile.name,
                rows as f64 / seconds,
                policy.max_records,
                policy.concurrency
            );
            if whole_run {
                let dir = tempfile::tempdir().expect("project dir");
                write_parquet(&dir.path().join("data/users.parquet"), &batches);
                let mut options = profile.options.as_object().cloned().expect("options");
                options.insert("delivery".into(), serde_json::json!({"rate_limit": "off"}));
                let config = write_project(dir.path(), &profile, &options);
                received.store(0, Ordering::Relaxed);
                let binary = std::env::var_os("SLUICE_BENCH_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_sluice").into());
                let mut command = std::process::Command::new(binary);
                command
                    .args(["run", "--config"])
                    .arg(&config)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null());
                let (cost, _) = process::measure(&mut command, false);
                assert_eq!(cost.exit, 0, "{}: sluice run failed", profile.name);
                assert_eq!(received.load(Ordering::Relaxed), rows, "{}: the receiver got every record", profile.name);
                println!(
                    "{:<22} whole `sluice run`: {:.2} s wall, {:.2} s CPU, {:.0} MiB peak RSS: {:.0} records/s",
                    profile.name,
                    cost.wall,
                    cost.cpu,
                    cost.peak_rss_mib,
                    rows as f64 / cost.wall
                );
            }
        }
    });
}
