//! The `databricks` source against a server in the test that follows the SQL Statement
//! Execution API 2.0 as Databricks documents it: `POST /api/2.0/sql/statements` with
//! `EXTERNAL_LINKS` + `ARROW_STREAM`, statements that stay `PENDING`/`RUNNING` until polled,
//! a manifest with the schema and chunk list, links to further chunks from
//! `/result/chunks/{i}`, chunks on "cloud storage" (presigned: a request carrying the bearer
//! token is refused; one answers 503 first; one needs the headers the link names), OAuth M2M
//! tokens from `/oidc/v1/token` that expire mid-run (401), and `FAILED` statements with
//! Databricks' error codes. No emulator of Databricks exists in the package registries.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use arrow::array::{
    Array, ArrayRef, AsArray, Date32Array, Decimal128Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use arrow::datatypes::{Field, Schema};
use axum::Json;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use futures::StreamExt;
use serde_json::{Value, json};
use sluice_connectors::sources::databricks::{DatabricksConfig, DatabricksSource};
use sluice_engine::source::{ConnectorEnv, ModelQuery, Source};

const WAREHOUSE: &str = "abcdef0123456789";
const STATEMENT_ID: &str = "01ef-statement-0001";
const MODEL_SQL: &str = "SELECT * FROM main.marts.orders";
const CLIENT_ID: &str = "sp-client-id";
const CLIENT_SECRET: &str = "dose-secret";
const CHUNKS: u64 = 3;
const ROWS_PER_CHUNK: i64 = 5;

#[derive(Default)]
struct Seen {
    tokens_issued: u32,
    polls: u32,
    statements: Vec<Value>,
    chunk_link_requests: Vec<u64>,
    downloads: HashMap<u64, u32>,
    downloads_with_bearer: u32,
}

#[derive(Clone)]
struct Workspace {
    seen: Arc<Mutex<Seen>>,
    base: Arc<OnceLock<String>>,
}

fn unauthenticated() -> Response {
    api_error(
        StatusCode::UNAUTHORIZED,
        "UNAUTHENTICATED",
        "Credential was not sent or was of an unsupported type for this API.",
    )
}

fn api_error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({"error_code": code, "message": message}))).into_response()
}

/// Rows `first..first + n` as Databricks sends them in ARROW_STREAM.
fn chunk_bytes(first: i64, n: i64) -> Vec<u8> {
    let ids: Vec<i64> = (first..first + n).collect();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(ids.clone())),
        Arc::new(
            Decimal128Array::from(ids.iter().map(|i| i128::from(*i) * 125).collect::<Vec<_>>())
                .with_precision_and_scale(12, 2)
                .unwrap(),
        ),
        Arc::new(StringArray::from(
            ids.iter()
                .map(|i| {
                    if i % 4 == 0 {
                        None
                    } else {
                        Some(format!("order {i}"))
                    }
                })
                .collect::<Vec<_>>(),
        )),
        Arc::new(
            TimestampMicrosecondArray::from(
                ids.iter().map(|i| 1_700_000_000_000_000 + i).collect::<Vec<_>>(),
            )
            .with_timezone("Etc/UTC"),
        ),
        Arc::new(Date32Array::from(
            ids.iter().map(|i| 19_000 + *i as i32).collect::<Vec<_>>(),
        )),
        Arc::new(StringArray::from(
            ids.iter().map(|i| format!("[{i},{}]", i + 1)).collect::<Vec<_>>(),
        )),
    ];
    let fields: Vec<Field> = ["id", "amount", "customer", "placed_at", "day", "tags"]
        .iter()
        .zip(&columns)
        .map(|(name, c)| Field::new(*name, c.data_type().clone(), true))
        .collect();
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).expect("batch");
    let mut bytes = Vec::new();
    {
        let mut writer = arrow::ipc::writer::StreamWriter::try_new(&mut bytes, &batch.schema()).expect("ipc");
        writer.write(&batch).expect("write");
        writer.finish().expect("finish");
    }
    bytes
}

fn manifest() -> Value {
    json!({
        "format": "ARROW_STREAM",
        "schema": {"column_count": 6, "columns": [
            {"name": "id", "type_text": "BIGINT", "type_name": "LONG", "position": 0},
            {"name": "amount", "type_text": "DECIMAL(12,2)", "type_name": "DECIMAL", "position": 1, "type_precision": 12, "type_scale": 2},
            {"name": "customer", "type_text": "STRING", "type_name": "STRING", "position": 2},
            {"name": "placed_at", "type_text": "TIMESTAMP", "type_name": "TIMESTAMP", "position": 3},
            {"name": "day", "type_text": "DATE", "type_name": "DATE", "position": 4},
            {"name": "tags", "type_text": "ARRAY<INT>", "type_name": "ARRAY", "position": 5}
        ]},
        "total_chunk_count": CHUNKS,
        "chunks": (0..CHUNKS).map(|i| json!({"chunk_index": i, "row_offset": i as i64 * ROWS_PER_CHUNK, "row_count": ROWS_PER_CHUNK})).collect::<Vec<_>>(),
        "total_row_count": CHUNKS as i64 * ROWS_PER_CHUNK,
        "truncated": false
    })
}

fn link(base: &str, index: u64) -> Value {
    let mut link = json!({
        "chunk_index": index,
        "row_offset": index as i64 * ROWS_PER_CHUNK,
        "row_count": ROWS_PER_CHUNK,
        "byte_count": 1000,
        "external_link": format!("{base}/storage/results/{index}?sig=presigned"),
        "expiration": "2030-01-01T00:00:00.000Z",
    });
    if index + 1 < CHUNKS {
        link["next_chunk_index"] = json!(index + 1);
        link["next_chunk_internal_link"] = json!(format!(
            "/api/2.0/sql/statements/{STATEMENT_ID}/result/chunks/{}",
            index + 1
        ));
    }
    if index == 2 {
        link["http_headers"] = json!({"x-ms-blob-type": "BlockBlob"});
    }
    link
}

impl Workspace {
    async fn start() -> (Self, String) {
        let workspace = Self {
            seen: Arc::default(),
            base: Arc::default(),
        };
        let app = axum::Router::new()
            .route("/oidc/v1/token", post(token))
            .route("/api/2.0/sql/statements", post(execute))
            .route("/api/2.0/sql/statements/{id}", get(poll))
            .route(
                "/api/2.0/sql/statements/{id}/result/chunks/{index}",
                get(chunk_links),
            )
            .route("/storage/results/{index}", get(download))
            .with_state(workspace.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        workspace.base.set(base.clone()).expect("once");
        tokio::spawn(async move { axum::serve(listener, app).await.ok() });
        (workspace, base)
    }

    /// Whether the request's bearer token is one the workspace issued and still honours: the
    /// first token expires after two statement polls.
    fn authorized(&self, headers: &HeaderMap) -> bool {
        let token = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let seen = self.seen.lock().unwrap();
        match token {
            "oauth-token-1" => seen.polls < 2,
            "oauth-token-2" => true,
            _ => false,
        }
    }
}

async fn token(State(workspace): State<Workspace>, headers: HeaderMap, body: String) -> Response {
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"))
    );
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "invalid_client", "error_description": "Client authentication failed"})),
        )
            .into_response();
    }
    let form: HashMap<String, String> = url::form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    if form.get("grant_type").map(String::as_str) != Some("client_credentials")
        || form.get("scope").map(String::as_str) != Some("all-apis")
    {
        return (StatusCode::BAD_REQUEST, Json(json!({"error": "invalid_request"}))).into_response();
    }
    let issued = {
        let mut seen = workspace.seen.lock().unwrap();
        seen.tokens_issued += 1;
        seen.tokens_issued
    };
    Json(json!({"access_token": format!("oauth-token-{issued}"), "token_type": "Bearer", "expires_in": 3600, "scope": "all-apis"}))
        .into_response()
}

async fn execute(
    State(workspace): State<Workspace>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if !workspace.authorized(&headers) {
        return unauthenticated();
    }
    // The request as the API reference gives it.
    let allowed = [
        "statement",
        "warehouse_id",
        "catalog",
        "schema",
        "disposition",
        "format",
        "wait_timeout",
        "on_wait_timeout",
        "parameters",
        "row_limit",
        "byte_limit",
    ];
    let object = body.as_object().expect("an object");
    if let Some(unknown) = object.keys().find(|k| !allowed.contains(&k.as_str())) {
        return api_error(
            StatusCode::BAD_REQUEST,
            "INVALID_PARAMETER_VALUE",
            &format!("Unknown field {unknown}"),
        );
    }
    if body["warehouse_id"] != WAREHOUSE {
        return api_error(
            StatusCode::NOT_FOUND,
            "RESOURCE_DOES_NOT_EXIST",
            "No warehouse found with id",
        );
    }
    assert_eq!(body["disposition"], "EXTERNAL_LINKS");
    assert_eq!(body["format"], "ARROW_STREAM");
    assert_eq!(body["on_wait_timeout"], "CONTINUE");
    let wait = body["wait_timeout"].as_str().unwrap_or("");
    let seconds: u64 = wait.trim_end_matches('s').parse().unwrap_or(0);
    assert!(
        wait.ends_with('s') && (seconds == 0 || (5..=50).contains(&seconds)),
        "{wait}"
    );
    workspace.seen.lock().unwrap().statements.push(body.clone());
    let statement = body["statement"].as_str().unwrap_or("");
    let failed = |code: &str, message: &str| {
        Json(json!({"statement_id": "01ef-failed", "status": {"state": "FAILED", "error": {"error_code": code, "message": message}}}))
            .into_response()
    };
    match statement {
        s if s == format!("DESCRIBE QUERY\n{MODEL_SQL}") || s == "DESCRIBE QUERY\nSELECT 1" => Json(
            json!({"statement_id": "01ef-describe", "status": {"state": "SUCCEEDED"}, "manifest": {"format": "ARROW_STREAM", "schema": {"column_count": 3, "columns": []}, "total_chunk_count": 0, "total_row_count": 3}}),
        )
        .into_response(),
        s if s.starts_with("DESCRIBE QUERY\nDELETE") => failed(
            "BAD_REQUEST",
            "[PARSE_SYNTAX_ERROR] Syntax error at or near 'DELETE'. SQLSTATE: 42601",
        ),
        s if s.contains("missing_table") => failed(
            "BAD_REQUEST",
            "[TABLE_OR_VIEW_NOT_FOUND] The table or view `main`.`marts`.`missing_table` cannot be found. SQLSTATE: 42P01",
        ),
        MODEL_SQL => Json(json!({"statement_id": STATEMENT_ID, "status": {"state": "PENDING"}})).into_response(),
        other => failed("BAD_REQUEST", &format!("unexpected statement {other}")),
    }
}

async fn poll(
    State(workspace): State<Workspace>,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    if !workspace.authorized(&headers) {
        return unauthenticated();
    }
    assert_eq!(id, STATEMENT_ID);
    let polls = {
        let mut seen = workspace.seen.lock().unwrap();
        seen.polls += 1;
        seen.polls
    };
    if polls < 3 {
        return Json(json!({"statement_id": STATEMENT_ID, "status": {"state": "RUNNING"}})).into_response();
    }
    let base = workspace.base.get().expect("base");
    Json(json!({
        "statement_id": STATEMENT_ID,
        "status": {"state": "SUCCEEDED"},
        "manifest": manifest(),
        "result": {"external_links": [link(base, 0)]}
    }))
    .into_response()
}

async fn chunk_links(
    State(workspace): State<Workspace>,
    UrlPath((id, index)): UrlPath<(String, u64)>,
    headers: HeaderMap,
) -> Response {
    if !workspace.authorized(&headers) {
        return unauthenticated();
    }
    assert_eq!(id, STATEMENT_ID);
    workspace.seen.lock().unwrap().chunk_link_requests.push(index);
    if index >= CHUNKS {
        return api_error(
            StatusCode::BAD_REQUEST,
            "INVALID_PARAMETER_VALUE",
            "chunk index out of range",
        );
    }
    let base = workspace.base.get().expect("base");
    Json(json!({"external_links": [link(base, index)]})).into_response()
}

async fn download(
    State(workspace): State<Workspace>,
    UrlPath(index): UrlPath<u64>,
    headers: HeaderMap,
) -> Response {
    let attempt = {
        let mut seen = workspace.seen.lock().unwrap();
        if headers.contains_key("authorization") {
            seen.downloads_with_bearer += 1;
        }
        let n = seen.downloads.entry(index).or_default();
        *n += 1;
        *n
    };
    // A presigned URL refuses a second credential, as S3 does.
    if headers.contains_key("authorization") {
        return (
            StatusCode::BAD_REQUEST,
            "<Error><Code>InvalidArgument</Code><Message>Only one auth mechanism allowed</Message></Error>",
        )
            .into_response();
    }
    if index == 1 && attempt == 1 {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "<Error><Code>SlowDown</Code></Error>",
        )
            .into_response();
    }
    if index == 2 && headers.get("x-ms-blob-type").and_then(|v| v.to_str().ok()) != Some("BlockBlob") {
        return (
            StatusCode::FORBIDDEN,
            "<Error><Code>AuthenticationFailed</Code></Error>",
        )
            .into_response();
    }
    let first = index as i64 * ROWS_PER_CHUNK + 1;
    chunk_bytes(first, ROWS_PER_CHUNK).into_response()
}

fn source(base: &str, auth: Value) -> DatabricksSource {
    let mut config = json!({
        "host": base,
        "warehouse_id": WAREHOUSE,
        "catalog": "main",
        "schema": "marts",
    });
    for (k, v) in auth.as_object().expect("auth") {
        config[k] = v.clone();
    }
    let config: DatabricksConfig = serde_json::from_value(config).expect("config");
    DatabricksSource::new(
        "lakehouse",
        config,
        &ConnectorEnv::rooted_at(std::env::temp_dir()),
    )
    .expect("source")
}

fn model(sql: &str) -> ModelQuery {
    ModelQuery::new("orders", sql)
}

#[tokio::test]
async fn statements_are_polled_and_their_arrow_chunks_read_in_order_with_oauth_renewed() {
    let (workspace, base) = Workspace::start().await;
    let source = source(
        &base,
        json!({"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}),
    );
    let mut stream = source
        .extract(&model(&format!("{MODEL_SQL};")))
        .await
        .expect("extract");
    let mut batches = Vec::new();
    while let Some(batch) = stream.next().await {
        batches.push(batch.expect("batch"));
    }
    let batch = arrow::compute::concat_batches(&batches[0].schema(), &batches).expect("concat");
    let types: Vec<String> = batch
        .schema()
        .fields()
        .iter()
        .map(|f| f.data_type().to_string())
        .collect();
    assert_eq!(
        types,
        [
            "Int64",
            "Decimal128(12, 2)",
            "Utf8",
            "Timestamp(µs, \"UTC\")",
            "Date32",
            "Utf8"
        ]
    );
    let ids = batch.column(0).as_primitive::<arrow::datatypes::Int64Type>();
    assert_eq!(
        ids.values().to_vec(),
        (1..=15).collect::<Vec<i64>>(),
        "chunks in order"
    );
    assert!(batch.column(2).is_null(3), "row 4's customer is null");
    assert_eq!(batch.column(5).as_string::<i32>().value(0), "[1,2]");

    let seen = workspace.seen.lock().unwrap();
    assert_eq!(seen.tokens_issued, 2, "the expired OAuth token was replaced once");
    assert_eq!(
        seen.polls, 3,
        "polled while RUNNING, again after the expired token was replaced"
    );
    let mut link_requests = seen.chunk_link_requests.clone();
    link_requests.sort();
    assert_eq!(
        link_requests,
        vec![1, 2],
        "links asked for the chunks after the first"
    );
    assert_eq!(seen.downloads.get(&1), Some(&2), "a 503 is retried");
    assert_eq!(
        seen.downloads_with_bearer, 0,
        "the bearer token never goes to cloud storage"
    );
    let first = &seen.statements[0];
    assert_eq!(
        first["statement"],
        format!("DESCRIBE QUERY\n{MODEL_SQL}"),
        "checked as a query first"
    );
    assert_eq!(seen.statements[1]["statement"], MODEL_SQL);
    assert_eq!(seen.statements[1]["catalog"], "main");
    assert_eq!(seen.statements[1]["schema"], "marts");
}

#[tokio::test]
async fn writes_missing_tables_and_bad_credentials_fail_with_databricks_own_errors() {
    let (workspace, base) = Workspace::start().await;
    let source_with_token = source(&base, json!({"token": "oauth-token-2"}));
    let err = source_with_token
        .extract(&model("DELETE FROM main.marts.orders"))
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("PARSE_SYNTAX_ERROR") && err.contains("it was not run"),
        "{err}"
    );
    assert!(
        workspace
            .seen
            .lock()
            .unwrap()
            .statements
            .iter()
            .all(|s| !s["statement"].as_str().unwrap_or("").starts_with("DELETE")),
        "the DELETE itself never ran"
    );

    let err = source_with_token
        .check_query(&model("SELECT * FROM main.marts.missing_table"))
        .await
        .expect_err("missing")
        .to_string();
    assert!(
        err.contains("TABLE_OR_VIEW_NOT_FOUND") && err.contains("catalog.schema.table"),
        "{err}"
    );

    let err = source(&base, json!({"token": "dapi-revoked"}))
        .check()
        .await
        .expect_err("refused")
        .to_string();
    assert!(
        err.contains("UNAUTHENTICATED") && err.contains("HTTP 401") && err.contains("check `token`"),
        "{err}"
    );

    let err = source(&base, json!({"client_id": CLIENT_ID, "client_secret": "wrong"}))
        .check()
        .await
        .expect_err("refused")
        .to_string();
    assert!(
        err.contains("invalid_client") && err.contains("client_secret"),
        "{err}"
    );
}
