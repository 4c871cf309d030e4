//! Extraction from warehouse stand-ins into a committed snapshot: rows per second and peak RSS
//! of a whole `sluice extract` process.
//!
//! ```sh
//! .ci/test-tools   # installs fakesnow
//! cargo bench --bench warehouse_extract -- --rows 1000000 --rounds 3
//! ```
//!
//! Two stand-ins for Snowflake, each answering the same `users` model (id, email, plan, score
//! NUMBER(10,2), active, signed_up DATE, updated_at TIMESTAMP_NTZ):
//! - **fakesnow** (PyPI): Snowflake's driver protocol over DuckDB, the whole result inline as
//!   one base64 Arrow stream. Its own time to answer the query (measured alone, the body read
//!   and dropped) is printed beside sluice's, since it is most of the run;
//! - **chunks**: a server in this benchmark that logs in, compiles and answers the query with
//!   the result as gzip Arrow chunks of 100,000 rows on "cloud storage" (prepared before
//!   timing), as Snowflake does for large results: what sluice's own client costs.

#[path = "common/process.rs"]
mod process;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{
    ArrayRef, BooleanArray, Date32Array, Int32Array, Int64Array, RecordBatch, StringArray, StructArray,
};
use arrow::datatypes::{DataType, Field, Fields, Schema};
use axum::Json;
use axum::extract::{Path as UrlPath, State};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use process::{measure, median};
use serde_json::{Value, json};

const CHUNK_ROWS: usize = 100_000;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn sluice_binary() -> std::ffi::OsString {
    std::env::var_os("SLUICE_BENCH_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_sluice").into())
}

fn tools_dir() -> std::path::PathBuf {
    std::env::var_os("SLUICE_TEST_TOOLS")
        .map(Into::into)
        .unwrap_or_else(|| {
            Path::new(&std::env::var_os("HOME").unwrap_or_default()).join(".cache/sluice-test-tools")
        })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn config(base: &str, database: &str) -> String {
    format!(
        r#"state_dir: .sluice
sources:
  warehouse:
    type: snowflake
    account: bench
    url: {base}
    user: fake
    password: snow
    database: {database}
    schema: public
models:
  users:
    source: warehouse
    sql: SELECT * FROM users
    primary_key: ID
"#
    )
}

/// Wall s, CPU s, peak RSS MiB of one process.
type Figures = (f64, f64, f64);

/// Runs `sluice extract users` in a fresh project.
fn extract_once(base: &str, database: &str) -> Figures {
    let dir = tempfile::tempdir().expect("tempdir");
    let config_path = dir.path().join("sluice.yaml");
    std::fs::write(&config_path, config(base, database)).expect("config");
    let log = dir.path().join("log");
    let log_file = std::fs::File::create(&log).expect("log");
    let mut command = Command::new(sluice_binary());
    command
        .args(["extract", "users", "--config"])
        .arg(&config_path)
        .stdout(log_file.try_clone().expect("log"))
        .stderr(log_file);
    let (cost, _) = measure(&mut command, false);
    assert_eq!(
        cost.exit,
        0,
        "sluice extract failed: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    (cost.wall, cost.cpu, cost.peak_rss_mib)
}

// --- fakesnow ---------------------------------------------------------------------------------

struct Fakesnow {
    child: std::process::Child,
    base: String,
}

impl Drop for Fakesnow {
    fn drop(&mut self) {
        // fakesnow stops on SIGINT (not promptly on SIGTERM).
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

async fn fakesnow_sql(http: &reqwest::Client, base: &str, token: &str, sql: &str) -> Value {
    let answer: Value = http
        .post(format!("{base}/queries/v1/query-request"))
        .header("authorization", format!("Snowflake Token=\"{token}\""))
        .header("content-type", "application/json")
        .body(json!({"sqlText": sql, "sequenceId": 1}).to_string())
        .send()
        .await
        .expect("query")
        .bytes()
        .await
        .map(|b| serde_json::from_slice(&b).expect("answer"))
        .expect("answer");
    assert_eq!(answer["success"], true, "{sql}: {answer}");
    answer
}

async fn start_fakesnow(rows: u64) -> Fakesnow {
    let program = tools_dir().join("warehouses/bin/fakesnow");
    assert!(
        program.exists(),
        "{} is missing: run .ci/test-tools",
        program.display()
    );
    let port = free_port();
    let child = Command::new(program)
        .args(["-s", "--host", "127.0.0.1", "--port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start fakesnow");
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "fakesnow did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let fakesnow = Fakesnow { child, base };
    let http = reqwest::Client::new();
    let token = login(&http, &fakesnow.base).await;
    fakesnow_sql(&http, &fakesnow.base, &token, "CREATE OR REPLACE DATABASE bench").await;
    let token = login(&http, &fakesnow.base).await;
    fakesnow_sql(
        &http,
        &fakesnow.base,
        &token,
        &format!(
            "CREATE OR REPLACE TABLE users AS SELECT seq8() + 1 AS id, \
             concat('user', seq8(), '@example.com') AS email, \
             CASE WHEN seq8() % 3 = 0 THEN 'pro' ELSE 'free' END AS plan, \
             ((seq8() % 10000) / 100)::NUMBER(10,2) AS score, seq8() % 2 = 0 AS active, \
             dateadd(day, seq8() % 3000, '2017-01-01'::DATE) AS signed_up, \
             dateadd(second, seq8(), '2024-01-01 00:00:00'::TIMESTAMP_NTZ) AS updated_at \
             FROM TABLE(GENERATOR(ROWCOUNT => {rows}))"
        ),
    )
    .await;
    fakesnow
}

async fn login(http: &reqwest::Client, base: &str) -> String {
    let login: Value = http
        .post(format!("{base}/session/v1/login-request?databaseName=bench&schemaName=public"))
        .header("content-type", "application/json")
            .body(json!({"data": {"ACCOUNT_NAME": "fakesnow", "LOGIN_NAME": "fake", "PASSWORD": "snow", "SESSION_PARAMETERS": {}}}).to_string())
        .send()
        .await
        .expect("login")
        .bytes()
        .await
        .map(|b| serde_json::from_slice(&b).expect("login answer"))
        .expect("login answer");
    login["data"]["token"].as_str().expect("token").to_string()
}

/// fakesnow's own time to answer the model's query (the body read whole and dropped).
async fn fakesnow_answer_seconds(base: &str) -> f64 {
    let http = reqwest::Client::new();
    let token = login(&http, base).await;
    let started = Instant::now();
    let bytes = http
        .post(format!("{base}/queries/v1/query-request"))
        .header("authorization", format!("Snowflake Token=\"{token}\""))
        .header("content-type", "application/json")
        .body(json!({"sqlText": "SELECT * FROM users", "sequenceId": 1}).to_string())
        .send()
        .await
        .expect("query")
        .bytes()
        .await
        .expect("body");
    assert!(bytes.len() > 1000);
    started.elapsed().as_secs_f64()
}

// --- the chunk server -------------------------------------------------------------------------

#[derive(Clone)]
struct Chunks {
    base: String,
    rows: u64,
    chunks: Arc<Vec<Vec<u8>>>,
}

fn rowtype() -> Value {
    json!([
        {"name": "ID", "type": "fixed", "precision": 38, "scale": 0},
        {"name": "EMAIL", "type": "text"},
        {"name": "PLAN", "type": "text"},
        {"name": "SCORE", "type": "fixed", "precision": 10, "scale": 2},
        {"name": "ACTIVE", "type": "boolean"},
        {"name": "SIGNED_UP", "type": "date"},
        {"name": "UPDATED_AT", "type": "timestamp_ntz", "precision": 0, "scale": 9}
    ])
}

/// Rows `first..first + n` as Snowflake encodes them (ids as Int64 here, scores unscaled
/// Int32, timestamps as {epoch, fraction}), as gzip Arrow IPC.
fn chunk(first: u64, n: u64) -> Vec<u8> {
    let ids: Vec<i64> = (first as i64..(first + n) as i64).collect();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(ids.clone())),
        Arc::new(StringArray::from(
            ids.iter()
                .map(|i| format!("user{i}@example.com"))
                .collect::<Vec<_>>(),
        )),
        Arc::new(StringArray::from(
            ids.iter()
                .map(|i| if i % 3 == 0 { "pro" } else { "free" })
                .collect::<Vec<_>>(),
        )),
        Arc::new(Int32Array::from(
            ids.iter().map(|i| (i % 10_000) as i32).collect::<Vec<_>>(),
        )),
        Arc::new(BooleanArray::from(
            ids.iter().map(|i| i % 2 == 0).collect::<Vec<_>>(),
        )),
        Arc::new(Date32Array::from(
            ids.iter().map(|i| 17_167 + (i % 3000) as i32).collect::<Vec<_>>(),
        )),
        Arc::new(StructArray::new(
            Fields::from(vec![
                Field::new("epoch", DataType::Int64, false),
                Field::new("fraction", DataType::Int32, false),
            ]),
            vec![
                Arc::new(Int64Array::from(
                    ids.iter().map(|i| 1_704_067_200 + i).collect::<Vec<_>>(),
                )),
                Arc::new(Int32Array::from(vec![0; ids.len()])),
            ],
            None,
        )),
    ];
    let fields: Vec<Field> = [
        "ID",
        "EMAIL",
        "PLAN",
        "SCORE",
        "ACTIVE",
        "SIGNED_UP",
        "UPDATED_AT",
    ]
    .iter()
    .zip(&columns)
    .map(|(name, c)| Field::new(*name, c.data_type().clone(), true))
    .collect();
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).expect("batch");
    let mut ipc = Vec::new();
    {
        let mut writer = arrow::ipc::writer::StreamWriter::try_new(&mut ipc, &batch.schema()).expect("ipc");
        writer.write(&batch).expect("write");
        writer.finish().expect("finish");
    }
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gzip.write_all(&ipc).expect("gzip");
    gzip.finish().expect("gzip")
}

async fn chunk_login() -> Json<Value> {
    Json(json!({"data": {"token": "bench-session", "masterToken": "bench-master"}, "success": true}))
}

async fn chunk_query(State(server): State<Chunks>, Json(body): Json<Value>) -> Json<Value> {
    if body["describeOnly"] == true {
        return Json(
            json!({"data": {"rowtype": rowtype(), "statementTypeId": 4096, "rowsetBase64": ""}, "success": true}),
        );
    }
    let chunks: Vec<Value> = (0..server.chunks.len())
        .map(|i| json!({"url": format!("{}/chunks/{i}", server.base), "rowCount": CHUNK_ROWS}))
        .collect();
    Json(
        json!({"data": {"rowtype": rowtype(), "statementTypeId": 4096, "queryResultFormat": "arrow",
        "rowsetBase64": "", "total": server.rows, "qrmk": "bench-key", "chunks": chunks}, "success": true}),
    )
}

async fn chunk_get(State(server): State<Chunks>, UrlPath(i): UrlPath<usize>) -> axum::response::Response {
    match server.chunks.get(i) {
        Some(bytes) => bytes.clone().into_response(),
        None => axum::http::StatusCode::NOT_FOUND.into_response(),
    }
}

async fn start_chunk_server(rows: u64) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let chunks: Vec<Vec<u8>> = (0..rows.div_ceil(CHUNK_ROWS as u64))
        .map(|i| {
            let first = i * CHUNK_ROWS as u64 + 1;
            chunk(first, (CHUNK_ROWS as u64).min(rows - i * CHUNK_ROWS as u64))
        })
        .collect();
    let server = Chunks {
        base: base.clone(),
        rows,
        chunks: Arc::new(chunks),
    };
    let app = axum::Router::new()
        .route("/session/v1/login-request", post(chunk_login))
        .route("/queries/v1/query-request", post(chunk_query))
        .route("/chunks/{i}", get(chunk_get))
        .with_state(server);
    tokio::spawn(async move { axum::serve(listener, app).await.ok() });
    base
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rows: u64 = arg(&args, "--rows").map_or(1_000_000, |r| r.parse().expect("--rows"));
    let rounds: usize = arg(&args, "--rounds").map_or(3, |r| r.parse().expect("--rounds"));
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    println!(
        "warehouse_extract: {rows} rows, {rounds} rounds, sluice {:?}",
        sluice_binary()
    );

    let chunk_base = runtime.block_on(start_chunk_server(rows));
    let fakesnow = runtime.block_on(start_fakesnow(rows));
    let mut figures: Vec<(&str, Vec<Figures>)> = vec![("fakesnow", Vec::new()), ("chunks", Vec::new())];
    let mut fakesnow_alone = Vec::new();
    for round in 0..rounds {
        fakesnow_alone.push(runtime.block_on(fakesnow_answer_seconds(&fakesnow.base)));
        figures[0].1.push(extract_once(&fakesnow.base, "bench"));
        figures[1].1.push(extract_once(&chunk_base, "bench"));
        println!(
            "round {}: fakesnow answer alone {:.2} s; sluice from fakesnow {:.2} s, from chunks {:.2} s",
            round + 1,
            fakesnow_alone[round],
            figures[0].1[round].0,
            figures[1].1[round].0
        );
    }
    println!("| stand-in | wall s (each round) | median rows/s | CPU s | peak RSS MiB |");
    println!("|---|---:|---:|---:|---:|");
    for (name, runs) in &figures {
        let walls: Vec<f64> = runs.iter().map(|r| r.0).collect();
        let cpu: Vec<f64> = runs.iter().map(|r| r.1).collect();
        let rss: Vec<f64> = runs.iter().map(|r| r.2).collect();
        println!(
            "| {name} | {} | {:.0} | {:.1} | {:.0}–{:.0} |",
            walls
                .iter()
                .map(|w| format!("{w:.2}"))
                .collect::<Vec<_>>()
                .join(", "),
            rows as f64 / median(&walls),
            median(&cpu),
            rss.iter().cloned().fold(f64::MAX, f64::min),
            rss.iter().cloned().fold(0.0, f64::max),
        );
    }
    println!(
        "fakesnow alone (its answer to the query, read and dropped): {}",
        fakesnow_alone
            .iter()
            .map(|w| format!("{w:.2} s"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}
