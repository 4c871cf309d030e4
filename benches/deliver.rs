//! Delivery: `users` rows rendered as Segment `identify` messages and delivered through the real
//! `segment` destination and the shared delivery layer (default batch size and concurrency, rate
//! limit off) to a local receiver on the same machine that parses every request and accepts
//! everything. Prints records per second end to end (render + requests + answers).
//!
//! `cargo bench --bench deliver -- [rows]` (default 1,000,000).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use axum::Router;
use axum::body::Bytes;
use axum::routing::post;
use sluice_connectors::Connectors;
use sluice_engine::Op;
use sluice_engine::config::{ConnectorConfig, MappingConfig};
use sluice_engine::destination::{RunInfo, SyncMode};
use sluice_engine::mapping::MappingPlan;
use sluice_engine::source::{ConnectorEnv, ConnectorFactory};

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

fn main() {
    let rows: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let received = Arc::new(AtomicUsize::new(0));
        let counter = received.clone();
        let app = Router::new().route(
            "/v1/batch",
            post(move |body: Bytes| {
                let counter = counter.clone();
                async move {
                    let parsed: serde_json::Value = serde_json::from_slice(&body).expect("JSON body");
                    let n = parsed["batch"].as_array().map_or(0, Vec::len);
                    counter.fetch_add(n, Ordering::Relaxed);
                    axum::Json(serde_json::json!({"success": true}))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });

        let mut options = serde_json::Map::new();
        options.insert("write_key".into(), "bench".into());
        options.insert("url".into(), url.into());
        options.insert("delivery".into(), serde_json::json!({"rate_limit": "off"}));
        let config = ConnectorConfig {
            kind: "segment".into(),
            options,
        };
        let env = ConnectorEnv {
            base_dir: std::env::temp_dir(),
            state_dir: std::env::temp_dir(),
        };
        let destination = Connectors.destination("segment", &config, &env).expect("destination");
        let action = destination
            .action(Some("identify"), &serde_json::Map::new())
            .expect("action")
            .expect("identify");
        let mut mapping: MappingConfig = serde_norway::from_str(
            "{model: users, destination: segment, action: identify, fields: {userId: {column: id, as: string}}, columns: all}",
        )
        .expect("mapping");
        mapping.resolve_send(false);
        let batches: Vec<RecordBatch> = (0..rows)
            .step_by(BATCH_ROWS)
            .map(|start| batch(start, BATCH_ROWS.min(rows - start)))
            .collect();
        let plan = MappingPlan::compile("bench", &mapping, "users", &batches[0].schema(), &["id".into()], Some(&action))
            .expect("plan");
        let writer = destination
            .open(&RunInfo {
                run_id: "bench".into(),
                mapping: "bench".into(),
                model: "users".into(),
                started_at: chrono::Utc::now(),
                primary_key: vec!["id".into()],
                action: Some("identify".into()),
                mode: SyncMode::Upsert,
                options: serde_json::Map::new(),
                dry_run: false,
            })
            .await
            .expect("open");
        let policy = writer.policy();
        let hashes: Vec<u64> = (0..BATCH_ROWS as u64).collect();
        let started = Instant::now();
        let mut failed = 0;
        let mut requests = 0;
        for batch in &batches {
            let n = batch.num_rows();
            let encoded = plan.encode(batch, vec![Op::Added; n], &hashes[..n]).expect("encode");
            let result = sluice_engine::delivery::deliver(writer.as_ref(), &encoded.records, &policy)
                .await
                .expect("delivered");
            failed += result.failures.len();
            requests += result.requests;
        }
        let seconds = started.elapsed().as_secs_f64();
        let got = received.load(Ordering::Relaxed);
        assert_eq!(got, rows, "the receiver got every record");
        assert_eq!(failed, 0);
        println!(
            "delivered {rows} records to a local Segment-spec receiver in {seconds:.2} s: {:.0} records/s, {requests} requests of up to {} records ({} in flight)",
            rows as f64 / seconds,
            policy.max_records,
            policy.concurrency
        );
    });
}
