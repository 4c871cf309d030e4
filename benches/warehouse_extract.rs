//! Extraction from warehouse stand-ins into a committed snapshot: rows per second and peak RSS
//! of a whole `sluice extract` process.
//!
//! ```sh
//! .ci/test-tools   # installs fakesnow
//! cargo bench --bench warehouse_extract -- --rows 1000000 --rounds 3
//! # a subset, by name: --only sqlserver,postgres
//! ```
//!
//! Each warehouse source reads the same 7-column `users` model (id, email, plan, score
//! DECIMAL(10,2), active, signed_up DATE, updated_at TIMESTAMP) from its stand-in:
//! - **fakesnow** (PyPI): Snowflake's driver protocol over DuckDB, the whole result inline as
//!   one base64 Arrow stream. Its own time to answer the query (measured alone, the body read
//!   and dropped) is printed beside sluice's, since it is most of the run;
//! - **chunks**: a server in this benchmark that logs in, compiles and answers the query with
//!   the result as gzip Arrow chunks of 100,000 rows on "cloud storage" (prepared before
//!   timing), as Snowflake does for large results: what sluice's own client costs;
//! - **unload**: the same server answering `COPY INTO @stage/...` by writing the result as
//!   snappy Parquet parts of 100,000 rows (prepared before timing) into a local directory, the
//!   stage's URL (`file://`): what sluice's read-back of unloaded files costs;
//! - **Databricks**: a server in this benchmark following the Statement Execution API, the
//!   result as Arrow chunks of 100,000 rows behind external links;
//! - **BigQuery**: a server in this benchmark following REST API v2, the result as JSON pages
//!   of 50,000 rows (prepared before timing);
//! - **BigQuery Storage Read API**: a gRPC server in this benchmark answering the read session
//!   of the same job with 4 streams of Arrow record batches of 50,000 rows (encoded before
//!   timing);
//! - **Redshift**: the local PostgreSQL read through the `redshift` source's cursor, beside the
//!   `postgres` source's `COPY` of the same table;
//! - **SQL Server**: the tests' TDS server (`tests/it/tds.rs`) in this process, answering the
//!   same PostgreSQL table in SQL Server's row encodings (`varchar(n)` columns as `nvarchar(n)`;
//!   its own reading of PostgreSQL and encoding run in this process, beside the timed one),
//!   without TLS and with TDS 8.0 TLS.

#[path = "common/process.rs"]
mod process;
// The tests' SQL Server stand-in; the bench uses its server, not its record of batches.
#[allow(dead_code)]
#[path = "../tests/it/tds.rs"]
mod tds;

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

fn snowflake_source(base: &str) -> String {
    format!(
        "    type: snowflake\n    account: bench\n    url: {base}\n    user: fake\n    password: snow\n    database: bench\n    schema: public\n"
    )
}

/// Wall s, CPU s, peak RSS MiB of one process.
type Figures = (f64, f64, f64);

/// Runs `sluice extract users` in a fresh project whose source is `source` (its YAML lines).
fn extract_once(source: &str, sql: &str, key: &str, files: &[(&str, String)]) -> Figures {
    let dir = tempfile::tempdir().expect("tempdir");
    let config_path = dir.path().join("sluice.yaml");
    let config = format!(
        "state_dir: .sluice\nsources:\n  warehouse:\n{source}models:\n  users:\n    source: warehouse\n    sql: {sql}\n    primary_key: {key}\n"
    );
    std::fs::write(&config_path, config).expect("config");
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).expect("file");
    }
    let log = dir.path().join("log");
    let log_file = std::fs::File::create(&log).expect("log");
    let mut command = Command::new(sluice_binary());
    command
        .args(["extract", "users", "--config"])
        .arg(&config_path)
        .stdout(log_file.try_clone().expect("log"))
        .stderr(log_file);
    let (cost, samples) = measure(&mut command, true);
    // VmHWM, sampled every 100 ms: wait4's ru_maxrss would count this benchmark's own memory
    // (the stand-ins' prepared results), which a spawned child inherits until it executes.
    let peak = samples.iter().filter_map(|s| s.peak_mib).fold(0.0, f64::max);
    assert_eq!(
        cost.exit,
        0,
        "sluice extract failed: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    (cost.wall, cost.cpu, peak)
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
    fakesnow_sql(
        &http,
        &fakesnow.base,
        &token,
        "CREATE DATABASE IF NOT EXISTS bench",
    )
    .await;
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
    /// The result as Parquet parts, as `COPY INTO <location>` writes it (prepared before timing).
    parquet_parts: Arc<Vec<(u64, Vec<u8>)>>,
    /// The directory the `BENCH` stage's URL names.
    stage_dir: Arc<std::path::PathBuf>,
    copies: Arc<std::sync::atomic::AtomicUsize>,
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

/// Rows `first..first + n` as Snowflake unloads them to Parquet (snappy; NUMBER(38, 0) in
/// INT64, NUMBER(10, 2) as DECIMAL, TIMESTAMP_NTZ in nanoseconds).
fn parquet_part(first: u64, n: u64) -> Vec<u8> {
    let ids: Vec<i64> = (first as i64..(first + n) as i64).collect();
    let columns: Vec<(&str, ArrayRef)> = vec![
        ("ID", Arc::new(Int64Array::from(ids.clone()))),
        (
            "EMAIL",
            Arc::new(StringArray::from(
                ids.iter()
                    .map(|i| format!("user{i}@example.com"))
                    .collect::<Vec<_>>(),
            )),
        ),
        (
            "PLAN",
            Arc::new(StringArray::from(
                ids.iter()
                    .map(|i| if i % 3 == 0 { "pro" } else { "free" })
                    .collect::<Vec<_>>(),
            )),
        ),
        (
            "SCORE",
            Arc::new(
                arrow::array::Decimal128Array::from(
                    ids.iter().map(|i| (i % 10_000) as i128).collect::<Vec<_>>(),
                )
                .with_precision_and_scale(10, 2)
                .expect("decimal"),
            ),
        ),
        (
            "ACTIVE",
            Arc::new(BooleanArray::from(
                ids.iter().map(|i| i % 2 == 0).collect::<Vec<_>>(),
            )),
        ),
        (
            "SIGNED_UP",
            Arc::new(Date32Array::from(
                ids.iter().map(|i| 17_167 + (i % 3000) as i32).collect::<Vec<_>>(),
            )),
        ),
        (
            "UPDATED_AT",
            Arc::new(arrow::array::TimestampNanosecondArray::from(
                ids.iter()
                    .map(|i| (1_704_067_200 + i) * 1_000_000_000)
                    .collect::<Vec<_>>(),
            )),
        ),
    ];
    let batch = RecordBatch::try_from_iter(columns).expect("batch");
    let properties = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .build();
    let mut bytes = Vec::new();
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(&mut bytes, batch.schema(), Some(properties)).expect("writer");
    writer.write(&batch).expect("write");
    writer.close().expect("close");
    bytes
}

/// `COPY INTO @BENCH/<path> FROM (...) ...`: the prepared parts written under the stage's
/// directory, and a row per file answered.
fn copy_into_stage(server: &Chunks, sql: &str) -> Json<Value> {
    server.copies.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = sql
        .strip_prefix("COPY INTO @BENCH/")
        .and_then(|rest| rest.split_whitespace().next())
        .expect("a COPY INTO the BENCH stage");
    let dir = server.stage_dir.join(path);
    std::fs::create_dir_all(&dir).expect("stage dir");
    let rows: Vec<Value> = server
        .parquet_parts
        .iter()
        .enumerate()
        .map(|(i, (rows, bytes))| {
            let name = format!("data_0_{i}_0.snappy.parquet");
            std::fs::write(dir.join(&name), bytes).expect("write part");
            json!([name, bytes.len().to_string(), rows.to_string()])
        })
        .collect();
    Json(json!({"data": {"rowtype": [
            {"name": "FILE_NAME", "type": "text"},
            {"name": "FILE_SIZE", "type": "fixed", "precision": 19, "scale": 0},
            {"name": "ROW_COUNT", "type": "fixed", "precision": 19, "scale": 0}],
        "queryResultFormat": "json", "rowset": rows, "total": server.parquet_parts.len()}, "success": true}))
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
    if let Some(sql) = body["sqlText"].as_str().filter(|s| s.starts_with("COPY INTO")) {
        return copy_into_stage(&server, sql);
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

async fn start_chunk_server(rows: u64, stage_dir: &Path) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let chunks: Vec<Vec<u8>> = (0..rows.div_ceil(CHUNK_ROWS as u64))
        .map(|i| {
            let first = i * CHUNK_ROWS as u64 + 1;
            chunk(first, (CHUNK_ROWS as u64).min(rows - i * CHUNK_ROWS as u64))
        })
        .collect();
    let parquet_parts: Vec<(u64, Vec<u8>)> = (0..rows.div_ceil(CHUNK_ROWS as u64))
        .map(|i| {
            let n = (CHUNK_ROWS as u64).min(rows - i * CHUNK_ROWS as u64);
            (n, parquet_part(i * CHUNK_ROWS as u64 + 1, n))
        })
        .collect();
    let copies = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let server = Chunks {
        base: base.clone(),
        rows,
        chunks: Arc::new(chunks),
        parquet_parts: Arc::new(parquet_parts),
        stage_dir: Arc::new(stage_dir.to_path_buf()),
        copies: copies.clone(),
    };
    let app = axum::Router::new()
        .route("/session/v1/login-request", post(chunk_login))
        .route("/queries/v1/query-request", post(chunk_query))
        .route("/chunks/{i}", get(chunk_get))
        .with_state(server);
    tokio::spawn(async move { axum::serve(listener, app).await.ok() });
    (base, copies)
}

// --- Databricks ---------------------------------------------------------------------------

#[derive(Clone)]
struct Databricks {
    base: String,
    rows: u64,
    chunks: Arc<Vec<Vec<u8>>>,
}

fn databricks_manifest(server: &Databricks) -> Value {
    json!({
        "format": "ARROW_STREAM",
        "schema": {"column_count": 7, "columns": [
            {"name": "id", "type_name": "LONG", "position": 0},
            {"name": "email", "type_name": "STRING", "position": 1},
            {"name": "plan", "type_name": "STRING", "position": 2},
            {"name": "score", "type_name": "DECIMAL", "type_precision": 10, "type_scale": 2, "position": 3},
            {"name": "active", "type_name": "BOOLEAN", "position": 4},
            {"name": "signed_up", "type_name": "DATE", "position": 5},
            {"name": "updated_at", "type_name": "TIMESTAMP", "position": 6}
        ]},
        "total_chunk_count": server.chunks.len(),
        "total_row_count": server.rows,
        "truncated": false
    })
}

fn databricks_link(server: &Databricks, index: usize) -> Value {
    json!({"chunk_index": index, "external_link": format!("{}/files/{index}", server.base)})
}

async fn databricks_execute(State(server): State<Databricks>, Json(body): Json<Value>) -> Json<Value> {
    if body["statement"]
        .as_str()
        .unwrap_or("")
        .starts_with("DESCRIBE QUERY")
    {
        return Json(json!({"statement_id": "describe", "status": {"state": "SUCCEEDED"}}));
    }
    Json(
        json!({"statement_id": "bench", "status": {"state": "SUCCEEDED"}, "manifest": databricks_manifest(&server),
        "result": {"external_links": [databricks_link(&server, 0)]}}),
    )
}

async fn databricks_links(
    State(server): State<Databricks>,
    UrlPath((_, index)): UrlPath<(String, usize)>,
) -> Json<Value> {
    Json(json!({"external_links": [databricks_link(&server, index)]}))
}

async fn databricks_file(
    State(server): State<Databricks>,
    UrlPath(i): UrlPath<usize>,
) -> axum::response::Response {
    match server.chunks.get(i) {
        Some(bytes) => bytes.clone().into_response(),
        None => axum::http::StatusCode::NOT_FOUND.into_response(),
    }
}

/// Databricks' Arrow: plain types (decimals as Decimal128, timestamps in microseconds, UTC).
fn databricks_chunk(first: u64, n: u64) -> Vec<u8> {
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
        Arc::new(
            arrow::array::Decimal128Array::from(
                ids.iter().map(|i| i128::from(i % 10_000)).collect::<Vec<_>>(),
            )
            .with_precision_and_scale(10, 2)
            .expect("decimal"),
        ),
        Arc::new(BooleanArray::from(
            ids.iter().map(|i| i % 2 == 0).collect::<Vec<_>>(),
        )),
        Arc::new(Date32Array::from(
            ids.iter().map(|i| 17_167 + (i % 3000) as i32).collect::<Vec<_>>(),
        )),
        Arc::new(
            arrow::array::TimestampMicrosecondArray::from(
                ids.iter()
                    .map(|i| (1_704_067_200 + i) * 1_000_000)
                    .collect::<Vec<_>>(),
            )
            .with_timezone("Etc/UTC"),
        ),
    ];
    let fields: Vec<Field> = [
        "id",
        "email",
        "plan",
        "score",
        "active",
        "signed_up",
        "updated_at",
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
    ipc
}

async fn start_databricks(rows: u64) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let chunks: Vec<Vec<u8>> = (0..rows.div_ceil(CHUNK_ROWS as u64))
        .map(|i| {
            databricks_chunk(
                i * CHUNK_ROWS as u64 + 1,
                (CHUNK_ROWS as u64).min(rows - i * CHUNK_ROWS as u64),
            )
        })
        .collect();
    let server = Databricks {
        base: base.clone(),
        rows,
        chunks: Arc::new(chunks),
    };
    let app = axum::Router::new()
        .route("/api/2.0/sql/statements", post(databricks_execute))
        .route(
            "/api/2.0/sql/statements/{id}/result/chunks/{index}",
            get(databricks_links),
        )
        .route("/files/{i}", get(databricks_file))
        .with_state(server);
    tokio::spawn(async move { axum::serve(listener, app).await.ok() });
    base
}

// --- BigQuery -----------------------------------------------------------------------------

const BIGQUERY_PAGE_ROWS: u64 = 50_000;

#[derive(Clone)]
struct BigQuery {
    /// Each page's whole answer, serialized before timing.
    pages: Arc<Vec<Vec<u8>>>,
}

fn bigquery_schema() -> Value {
    json!({"fields": [
        {"name": "id", "type": "INTEGER", "mode": "REQUIRED"},
        {"name": "email", "type": "STRING"},
        {"name": "plan", "type": "STRING"},
        {"name": "score", "type": "NUMERIC", "precision": "10", "scale": "2"},
        {"name": "active", "type": "BOOLEAN"},
        {"name": "signed_up", "type": "DATE"},
        {"name": "updated_at", "type": "TIMESTAMP"}
    ]})
}

fn bigquery_page(first: u64, n: u64) -> Value {
    let rows: Vec<Value> = (first..first + n)
        .map(|i| {
            let day = chrono::NaiveDate::from_ymd_opt(2017, 1, 1).expect("date") + chrono::Days::new(i % 3000);
            json!({"f": [
                {"v": i.to_string()}, {"v": format!("user{i}@example.com")},
                {"v": if i % 3 == 0 { "pro" } else { "free" }}, {"v": format!("{}.{:02}", (i % 10_000) / 100, i % 100)},
                {"v": if i % 2 == 0 { "true" } else { "false" }}, {"v": day.to_string()},
                {"v": ((1_704_067_200 + i) * 1_000_000).to_string()}
            ]})
        })
        .collect();
    Value::Array(rows)
}

async fn bigquery_token() -> Json<Value> {
    Json(json!({"access_token": "ya29.bench", "expires_in": 3599, "token_type": "Bearer"}))
}

fn bigquery_answer(rows: u64, pages: usize, page: usize, page_rows: Value) -> Vec<u8> {
    let mut answer = json!({"jobComplete": true, "schema": bigquery_schema(), "totalRows": rows.to_string(),
        "jobReference": {"projectId": "bench", "jobId": "job_bench", "location": "US"},
        "rows": page_rows});
    if page + 1 < pages {
        answer["pageToken"] = json!((page + 1).to_string());
    }
    answer.to_string().into_bytes()
}

async fn bigquery_query(State(server): State<BigQuery>, Json(body): Json<Value>) -> axum::response::Response {
    if body["dryRun"] == true {
        return Json(json!({"statementType": "SELECT", "schema": bigquery_schema(), "jobComplete": true}))
            .into_response();
    }
    server.pages[0].clone().into_response()
}

async fn bigquery_results(
    State(server): State<BigQuery>,
    axum::extract::Query(params): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> axum::response::Response {
    let page: usize = params.get("pageToken").and_then(|t| t.parse().ok()).unwrap_or(0);
    match server.pages.get(page) {
        Some(bytes) => bytes.clone().into_response(),
        None => axum::http::StatusCode::NOT_FOUND.into_response(),
    }
}

async fn start_bigquery(rows: u64) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let count = rows.div_ceil(BIGQUERY_PAGE_ROWS) as usize;
    let pages: Vec<Vec<u8>> = (0..count)
        .map(|i| {
            let first = i as u64 * BIGQUERY_PAGE_ROWS + 1;
            let n = BIGQUERY_PAGE_ROWS.min(rows - i as u64 * BIGQUERY_PAGE_ROWS);
            bigquery_answer(rows, count, i, bigquery_page(first, n))
        })
        .collect();
    let server = BigQuery {
        pages: Arc::new(pages),
    };
    let app = axum::Router::new()
        .route("/token", post(bigquery_token))
        .route("/bigquery/v2/projects/{project}/queries", post(bigquery_query))
        .route(
            "/bigquery/v2/projects/{project}/queries/{job}",
            get(bigquery_results),
        )
        .route("/bigquery/v2/projects/{project}/jobs/{job}", get(bigquery_job))
        .with_state(server);
    tokio::spawn(async move { axum::serve(listener, app).await.ok() });
    base
}

/// `jobs.get`: the query's anonymous result table, for the Storage Read API.
async fn bigquery_job() -> Json<Value> {
    Json(
        json!({"jobReference": {"projectId": "bench", "jobId": "job_bench", "location": "US"},
        "configuration": {"query": {"destinationTable": {"projectId": "bench", "datasetId": "_anon", "tableId": "result"}}}}),
    )
}

// --- BigQuery Storage Read API ------------------------------------------------------------

const READ_STREAMS: u64 = 4;

/// The read session's schema message and each stream's batch messages, encoded before timing.
#[derive(Clone)]
struct StorageRead {
    schema: bytes::Bytes,
    streams: Arc<Vec<Vec<(bytes::Bytes, i64)>>>,
}

/// Rows `first..first + n` as the Storage Read API's Arrow carries them (NUMERIC as
/// Decimal128(38, 9), TIMESTAMP as UTC microseconds).
fn bigquery_arrow(first: u64, n: u64) -> RecordBatch {
    let ids: Vec<i64> = (first as i64..(first + n) as i64).collect();
    let columns: Vec<(&str, ArrayRef, bool)> = vec![
        ("id", Arc::new(Int64Array::from(ids.clone())), false),
        (
            "email",
            Arc::new(StringArray::from(
                ids.iter()
                    .map(|i| format!("user{i}@example.com"))
                    .collect::<Vec<_>>(),
            )),
            true,
        ),
        (
            "plan",
            Arc::new(StringArray::from(
                ids.iter()
                    .map(|i| if i % 3 == 0 { "pro" } else { "free" })
                    .collect::<Vec<_>>(),
            )),
            true,
        ),
        (
            "score",
            Arc::new(
                arrow::array::Decimal128Array::from(
                    ids.iter()
                        .map(|i| (i % 10_000) as i128 * 10_000_000)
                        .collect::<Vec<_>>(),
                )
                .with_precision_and_scale(38, 9)
                .expect("decimal"),
            ),
            true,
        ),
        (
            "active",
            Arc::new(BooleanArray::from(
                ids.iter().map(|i| i % 2 == 0).collect::<Vec<_>>(),
            )),
            true,
        ),
        (
            "signed_up",
            Arc::new(Date32Array::from(
                ids.iter().map(|i| 17_167 + (i % 3000) as i32).collect::<Vec<_>>(),
            )),
            true,
        ),
        (
            "updated_at",
            Arc::new(
                arrow::array::TimestampMicrosecondArray::from(
                    ids.iter()
                        .map(|i| (1_704_067_200 + i) * 1_000_000)
                        .collect::<Vec<_>>(),
                )
                .with_timezone("UTC"),
            ),
            true,
        ),
    ];
    RecordBatch::try_from_iter_with_nullable(columns).expect("batch")
}

fn prepare_storage_read(rows: u64) -> StorageRead {
    let per_stream = rows.div_ceil(READ_STREAMS);
    let mut schema = bytes::Bytes::new();
    let streams = (0..READ_STREAMS)
        .map(|s| {
            let start = s * per_stream;
            let end = rows.min(start + per_stream);
            let mut writer =
                arrow::ipc::writer::StreamWriter::try_new(Vec::new(), &bigquery_arrow(1, 1).schema())
                    .expect("ipc");
            schema = bytes::Bytes::from(writer.get_ref().clone());
            let mut messages = Vec::new();
            let mut first = start;
            while first < end {
                let n = BIGQUERY_PAGE_ROWS.min(end - first);
                let before = writer.get_ref().len();
                writer.write(&bigquery_arrow(first + 1, n)).expect("write");
                messages.push((bytes::Bytes::from(writer.get_ref()[before..].to_vec()), n as i64));
                first += n;
            }
            messages
        })
        .collect();
    StorageRead {
        schema,
        streams: Arc::new(streams),
    }
}

impl tonic::server::NamedService for StorageRead {
    const NAME: &'static str = sluice_connectors::sources::bigquery_storage::SERVICE;
}

impl tower::Service<axum::http::Request<tonic::body::Body>> for StorageRead {
    type Response = axum::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: axum::http::Request<tonic::body::Body>) -> Self::Future {
        use sluice_connectors::sources::bigquery_storage::{
            ArrowRecordBatch, ArrowSchema, CreateReadSessionRequest, ReadRowsRequest, ReadRowsResponse,
            ReadSession, ReadStream,
        };
        let server = self.clone();
        Box::pin(async move {
            Ok(match request.uri().path() {
                "/google.cloud.bigquery.storage.v1.BigQueryRead/CreateReadSession" => {
                    let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                    let service = tower::service_fn(move |r: tonic::Request<CreateReadSessionRequest>| {
                        let server = server.clone();
                        async move {
                            Ok::<_, tonic::Status>(tonic::Response::new(ReadSession {
                                name: "projects/bench/locations/us/sessions/s".into(),
                                data_format: 2,
                                arrow_schema: Some(ArrowSchema {
                                    serialized_schema: server.schema.clone(),
                                }),
                                table: r.into_inner().read_session.unwrap_or_default().table,
                                streams: (0..server.streams.len())
                                    .map(|i| ReadStream {
                                        name: format!("projects/bench/locations/us/sessions/s/streams/{i}"),
                                    })
                                    .collect(),
                            }))
                        }
                    });
                    grpc.unary(service, request).await
                }
                "/google.cloud.bigquery.storage.v1.BigQueryRead/ReadRows" => {
                    let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                    let service = tower::service_fn(move |r: tonic::Request<ReadRowsRequest>| {
                        let server = server.clone();
                        async move {
                            let index: usize = r
                                .get_ref()
                                .read_stream
                                .rsplit('/')
                                .next()
                                .and_then(|i| i.parse().ok())
                                .unwrap_or(0);
                            let messages = server.streams[index].clone();
                            let responses = messages.into_iter().map(|(bytes, rows)| {
                                Ok::<_, tonic::Status>(ReadRowsResponse {
                                    arrow_record_batch: Some(ArrowRecordBatch {
                                        serialized_record_batch: bytes,
                                        row_count: rows,
                                    }),
                                    row_count: rows,
                                })
                            });
                            Ok::<_, tonic::Status>(tonic::Response::new(futures::stream::iter(responses)))
                        }
                    });
                    grpc.server_streaming(service, request).await
                }
                _ => tonic::Status::unimplemented("not a BigQueryRead method").into_http(),
            })
        })
    }
}

async fn start_storage_read(rows: u64) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("addr");
    let service = prepare_storage_read(rows);
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
            .ok()
    });
    format!("http://{address}")
}

fn bigquery_key(base: &str) -> String {
    let pem = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/test_rsa_key.pem"
    ))
    .expect("test key");
    json!({"type": "service_account", "client_email": "bench@bench.iam.gserviceaccount.com",
        "private_key": pem, "token_uri": format!("{base}/token")})
    .to_string()
}

// --- Redshift (PostgreSQL) ----------------------------------------------------------------

const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

async fn seed_postgres(rows: u64) {
    let (client, connection) = tokio_postgres::connect(PG_URL, tokio_postgres::NoTls)
        .await
        .expect("PostgreSQL on 127.0.0.1:5432");
    tokio::spawn(connection);
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS bench_warehouse_users;
             CREATE TABLE bench_warehouse_users AS SELECT g::bigint AS id, ('user' || g || '@example.com')::varchar(64) AS email,
               (CASE WHEN g % 3 = 0 THEN 'pro' ELSE 'free' END)::varchar(8) AS plan, ((g % 10000) / 100.0)::numeric(10, 2) AS score,
               g % 2 = 0 AS active, DATE '2017-01-01' + (g % 3000)::int AS signed_up,
               TIMESTAMP '2024-01-01' + g * INTERVAL '1 second' AS updated_at
             FROM generate_series(1, {rows}) AS g;
             ANALYZE bench_warehouse_users;"
        ))
        .await
        .expect("seed");
}

/// Files under `dir`, recursively.
fn walkdir(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| if e.path().is_dir() { walkdir(&e.path()) } else { 1 })
                .sum()
        })
        .unwrap_or(0)
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

    let stage = tempfile::tempdir().expect("stage dir");
    let (chunk_base, copies) = runtime.block_on(start_chunk_server(rows, stage.path()));
    let databricks_base = runtime.block_on(start_databricks(rows));
    let bigquery_base = runtime.block_on(start_bigquery(rows));
    let storage_base = runtime.block_on(start_storage_read(rows));
    runtime.block_on(seed_postgres(rows));
    let fakesnow = runtime.block_on(start_fakesnow(rows));
    let certificate_dir = tempfile::tempdir().expect("certificate dir");
    let (_, cert, key) =
        tds::localhost_certificate(certificate_dir.path()).expect("a certificate for the TDS server");
    let tds_options = |tls| tds::TdsOptions {
        postgres_url: PG_URL.into(),
        user: "bench".into(),
        password: "bench".into(),
        database: "public".into(),
        tls,
        allow_snapshot: true,
    };
    let tds_plain = runtime.block_on(tds::TdsServer::start(tds_options(tds::TdsTls::None), None));
    let tds_strict = runtime.block_on(tds::TdsServer::start(
        tds_options(tds::TdsTls::Strict),
        Some((&cert, &key)),
    ));
    let sqlserver = |port: u16, encrypt: &str| {
        format!(
            "    type: sqlserver\n    url: sqlserver://bench:bench@localhost:{port}/public\n    encrypt: {encrypt}\n    trust_server_certificate: {}\n",
            encrypt != "\"off\""
        )
    };
    let pg = |kind: &str| {
        format!("    type: {kind}\n    url: postgres://postgres@127.0.0.1:5432/test\n    sslmode: disable\n")
    };
    type Job = (
        &'static str,
        String,
        &'static str,
        &'static str,
        Vec<(&'static str, String)>,
    );
    let jobs: Vec<Job> = vec![
        (
            "snowflake (fakesnow)",
            snowflake_source(&fakesnow.base),
            "SELECT * FROM users",
            "ID",
            Vec::new(),
        ),
        (
            "snowflake (chunks)",
            snowflake_source(&chunk_base),
            "SELECT * FROM users",
            "ID",
            Vec::new(),
        ),
        (
            "snowflake (unload: COPY INTO a stage, Parquet on local disk)",
            format!(
                "{}    unload:\n      url: file://{}/\n      stage: BENCH\n",
                snowflake_source(&chunk_base),
                stage.path().display()
            ),
            "SELECT * FROM users",
            "ID",
            Vec::new(),
        ),
        (
            "databricks",
            format!(
                "    type: databricks\n    host: {databricks_base}\n    warehouse_id: bench\n    token: dapi-bench\n"
            ),
            "SELECT * FROM users",
            "id",
            Vec::new(),
        ),
        (
            "bigquery",
            format!(
                "    type: bigquery\n    project: bench\n    service_account: key.json\n    url: {bigquery_base}\n    storage_read: false\n"
            ),
            "SELECT * FROM users",
            "id",
            vec![("key.json", bigquery_key(&bigquery_base))],
        ),
        (
            "bigquery (Storage Read API, 4 streams)",
            format!(
                "    type: bigquery\n    project: bench\n    service_account: key.json\n    url: {bigquery_base}\n    storage_url: {storage_base}\n"
            ),
            "SELECT * FROM users",
            "id",
            vec![("key.json", bigquery_key(&bigquery_base))],
        ),
        (
            "redshift (cursor, on PostgreSQL)",
            pg("redshift"),
            "SELECT * FROM bench_warehouse_users",
            "id",
            Vec::new(),
        ),
        (
            "postgres (COPY)",
            pg("postgres"),
            "SELECT * FROM bench_warehouse_users",
            "id",
            Vec::new(),
        ),
        (
            "sqlserver (TDS stand-in on PostgreSQL, no TLS)",
            sqlserver(tds_plain.port, "\"off\""),
            "SELECT * FROM bench_warehouse_users",
            "id",
            Vec::new(),
        ),
        (
            "sqlserver (TDS stand-in on PostgreSQL, TDS 8.0 TLS)",
            sqlserver(tds_strict.port, "strict"),
            "SELECT * FROM bench_warehouse_users",
            "id",
            Vec::new(),
        ),
    ];
    let jobs: Vec<Job> = match arg(&args, "--only") {
        Some(only) => jobs
            .into_iter()
            .filter(|job| only.split(',').any(|part| job.0.contains(part)))
            .collect(),
        None => jobs,
    };
    let mut figures: Vec<Vec<Figures>> = vec![Vec::new(); jobs.len()];
    let mut fakesnow_alone = Vec::new();
    for round in 0..rounds {
        if jobs.iter().any(|job| job.0.contains("fakesnow")) {
            fakesnow_alone.push(runtime.block_on(fakesnow_answer_seconds(&fakesnow.base)));
        }
        for (i, (name, source, sql, key, files)) in jobs.iter().enumerate() {
            let run = extract_once(source, sql, key, files);
            println!("round {}: {name}: {:.2} s, {:.0} MiB", round + 1, run.0, run.2);
            figures[i].push(run);
        }
    }
    if jobs.iter().any(|job| job.0.contains("unload")) {
        assert_eq!(
            copies.load(std::sync::atomic::Ordering::Relaxed),
            rounds,
            "each unload round ran COPY INTO once"
        );
    }
    let left: usize = walkdir(stage.path());
    assert_eq!(left, 0, "the unloaded files were deleted once read");
    println!("| source (stand-in) | wall s (each round) | median rows/s | CPU s | peak RSS MiB |");
    println!("|---|---:|---:|---:|---:|");
    for ((name, ..), runs) in jobs.iter().zip(&figures) {
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
