//! The `snowflake` source, against two stand-ins:
//! - **fakesnow** (PyPI, installed by `.ci/test-tools`): a server speaking Snowflake's driver
//!   protocol (login, query requests, Arrow results) over DuckDB, run through the real binary:
//!   types, both syncs, refusals of statements that are not queries, Snowflake's own errors;
//! - a **protocol server in the test** for what fakesnow does not do: key-pair JWTs (checked
//!   against the public key), statements still running (`333333`), an expired session token
//!   (`390112`) renewed with the master token, results in chunks on "cloud storage" (gzip, the
//!   SSE-C key header, a 503), narrowing integer widths and structured timestamps with nulls.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use arrow::array::{
    Array, ArrayRef, AsArray, Date32Array, Decimal128Array, Int8Array, Int16Array, Int32Array, Int64Array,
    RecordBatch, StringArray, StructArray, TimestampMicrosecondArray, TimestampNanosecondArray,
};
use arrow::datatypes::{DataType, Field, Fields, Schema};
use axum::Json;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use futures::StreamExt;
use object_store::{ObjectStore, ObjectStoreExt};
use ring::signature::KeyPair as _;
use serde_json::{Value, json};
use sluice_connectors::sources::snowflake::{SnowflakeConfig, SnowflakeSource};
use sluice_engine::source::{ConnectorEnv, ModelQuery, Source};

use crate::buckets::{Bucket, Provider, free_port, start_server, tools_dir};
use crate::common::{TestProject, sorted, stderr, stdout};
use crate::services::{self, unavailable};

// ---------------------------------------------------------------------------------------------
// fakesnow

fn fakesnow_port() -> Result<u16, String> {
    static FAKESNOW: OnceLock<Result<u16, String>> = OnceLock::new();
    FAKESNOW
        .get_or_init(|| {
            let port = free_port();
            start_server(
                "fakesnow",
                tools_dir().join("warehouses/bin/fakesnow"),
                vec![
                    "-s".into(),
                    "--host".into(),
                    "127.0.0.1".into(),
                    "--port".into(),
                    port.to_string(),
                ],
                port,
            )
        })
        .clone()
}

/// A session on fakesnow in a database of the test's own, for setting up its tables.
struct Fakesnow {
    base: String,
    database: String,
    token: String,
    http: reqwest::Client,
}

impl Fakesnow {
    async fn start(database: &str) -> Option<Self> {
        let port = match tokio::task::spawn_blocking(fakesnow_port).await.expect("join") {
            Ok(port) => port,
            Err(e) => {
                unavailable("fakesnow (PyPI fakesnow[server])", e);
                return None;
            }
        };
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let login: Value = http
            .post(format!(
                "{base}/session/v1/login-request?databaseName={database}&schemaName=public"
            ))
            .header("content-type", "application/json")
            .body(json!({"data": {"ACCOUNT_NAME": "fakesnow", "LOGIN_NAME": "fake", "PASSWORD": "snow", "SESSION_PARAMETERS": {}}}).to_string())
            .send()
            .await
            .expect("login")
            .bytes()
            .await
            .map(|b| serde_json::from_slice(&b).expect("login answer"))
            .expect("login answer");
        let token = login["data"]["token"].as_str().expect("token").to_string();
        let fakesnow = Self {
            base,
            database: database.into(),
            token,
            http,
        };
        fakesnow
            .sql(&format!("CREATE DATABASE IF NOT EXISTS {database}"))
            .await;
        Some(fakesnow)
    }

    async fn sql(&self, sql: &str) -> Value {
        let answer: Value = self
            .http
            .post(format!("{}/queries/v1/query-request", self.base))
            .header("authorization", format!("Snowflake Token=\"{}\"", self.token))
            .header("content-type", "application/json")
            .body(json!({"sqlText": sql, "sequenceId": 1}).to_string())
            .send()
            .await
            .expect("query")
            .bytes()
            .await
            .map(|b| serde_json::from_slice(&b).expect("query answer"))
            .expect("query answer");
        assert_eq!(answer["success"], true, "{sql}: {answer}");
        answer
    }

    fn project(&self, sql: &str) -> TestProject {
        TestProject::new(&format!(
            r#"state_dir: .sluice
sources:
  warehouse:
    type: snowflake
    account: fakesnow
    url: {base}
    user: fake
    password: snow
    database: {database}
    schema: public
models:
  users:
    source: warehouse
    sql: "{sql}"
    primary_key: ID
destinations:
  exports:
    type: file
    url: exports/
mappings:
  users_out:
    model: users
    destination: exports
"#,
            base = self.base,
            database = self.database,
        ))
    }
}

fn by_id(mut records: Vec<Value>) -> Vec<Value> {
    records.sort_by_key(|r| r["key"]["ID"].as_i64());
    records
}

#[tokio::test]
async fn snowflake_types_arrive_as_sluice_types_and_the_second_sync_sends_only_changes() {
    let Some(snow) = Fakesnow::start("sl_types").await else {
        return;
    };
    snow.sql(
        "CREATE OR REPLACE TABLE users (id INT, email VARCHAR, score NUMBER(10,2), active BOOLEAN, \
         signed_up DATE, updated_at TIMESTAMP_NTZ, attrs VARIANT, ratio FLOAT, visits NUMBER(38,0))",
    )
    .await;
    snow.sql(
        "INSERT INTO users SELECT 1, 'ada@example.com', 12.5, TRUE, '2024-02-29'::DATE, \
         '2024-03-01 12:34:56.789012'::TIMESTAMP_NTZ, PARSE_JSON('{\"plan\": \"pro\"}'), 0.25, 9007199254740993",
    )
    .await;
    snow.sql(
        "INSERT INTO users SELECT 2, NULL, -0.01, FALSE, NULL, '1969-12-31 23:59:59.5'::TIMESTAMP_NTZ, NULL, NULL, NULL",
    )
    .await;
    snow.sql(
        "INSERT INTO users SELECT 3, 'cy@example.com', 0, NULL, '1999-01-01'::DATE, \
         '2000-01-01 00:00:00'::TIMESTAMP_NTZ, PARSE_JSON('[1, 2]'), -1.5, 0",
    )
    .await;
    let project = snow.project("SELECT * FROM users");
    let output = project.sluice(&["run"]).await;
    assert!(
        output.status.success(),
        "{}\n{}",
        stdout(&output),
        stderr(&output)
    );
    let records = by_id(services::exported_records(project.path(), "users_out"));
    assert_eq!(records.len(), 3, "{records:?}");
    assert_eq!(
        records[0]["data"],
        json!({
            "ID": 1, "EMAIL": "ada@example.com", "SCORE": 12.5, "ACTIVE": true, "SIGNED_UP": "2024-02-29",
            "UPDATED_AT": "2024-03-01T12:34:56.789012", "ATTRS": "{\"plan\":\"pro\"}", "RATIO": 0.25,
            "VISITS": 9007199254740993i64
        })
    );
    assert_eq!(records[1]["data"]["EMAIL"], Value::Null);
    assert_eq!(records[1]["data"]["UPDATED_AT"], "1969-12-31T23:59:59.500");
    let raw = services::raw_exports(project.path(), "users_out");
    for exact in [
        r#""SCORE":12.50"#,
        r#""SCORE":-0.01"#,
        r#""VISITS":9007199254740993"#,
    ] {
        assert!(raw.contains(exact), "{exact} not in {raw}");
    }

    snow.sql("UPDATE users SET score = 99.99 WHERE id = 1").await;
    snow.sql("DELETE FROM users WHERE id = 2").await;
    snow.sql(
        "INSERT INTO users SELECT 4, 'dee@example.com', 1, TRUE, NULL, '2024-01-01'::TIMESTAMP_NTZ, NULL, NULL, 1",
    )
    .await;
    let output = project.sluice(&["run"]).await;
    assert!(
        output.status.success(),
        "{}\n{}",
        stdout(&output),
        stderr(&output)
    );
    let changes = by_id(services::latest_export(project.path(), "users_out"));
    let ops: Vec<(i64, &str)> = changes
        .iter()
        .map(|r| (r["key"]["ID"].as_i64().unwrap(), r["op"].as_str().unwrap()))
        .collect();
    assert_eq!(
        ops,
        vec![(1, "updated"), (2, "deleted"), (4, "added")],
        "{changes:?}"
    );
    assert_eq!(changes[0]["data"]["SCORE"], 99.99);
}

#[tokio::test]
async fn statements_that_are_not_queries_are_refused_before_they_run() {
    let Some(snow) = Fakesnow::start("sl_refuse").await else {
        return;
    };
    snow.sql("CREATE OR REPLACE TABLE users (id INT)").await;
    snow.sql("INSERT INTO users SELECT 1").await;
    let project = snow.project("DELETE FROM users");
    let output = project.sluice(&["run"]).await;
    assert!(!output.status.success());
    let said = stderr(&output);
    assert!(
        said.contains("is not a query") && said.contains("it was not run"),
        "{said}"
    );
    let count = snow.sql("SELECT COUNT(*) AS n FROM users").await;
    assert_eq!(count["data"]["total"], 1, "the table was not touched: {count}");

    let project = snow.project("SELECT * FROM no_such_table");
    let output = project.sluice(&["run"]).await;
    assert!(!output.status.success());
    let said = stderr(&output);
    assert!(
        said.contains("Snowflake error 002003") && said.contains("GRANT SELECT"),
        "Snowflake's own error with a hint: {said}"
    );

    // `check` compiles the model without running it and reports the same error.
    let output = project.sluice(&["check"]).await;
    assert!(!output.status.success());
    let said = format!("{}{}", stdout(&output), stderr(&output));
    assert!(
        said.contains("NO_SUCH_TABLE") && said.contains("002003"),
        "{said}"
    );

    let project = snow.project("SELECT * FROM users");
    let output = project.sluice(&["check"]).await;
    assert!(
        output.status.success(),
        "{}\n{}",
        stdout(&output),
        stderr(&output)
    );
    let output = project.sluice(&["preview", "users"]).await;
    assert!(
        output.status.success(),
        "{}\n{}",
        stdout(&output),
        stderr(&output)
    );
    assert!(stdout(&output).contains("Int64"), "{}", stdout(&output));
}

// ---------------------------------------------------------------------------------------------
// The protocol server

const ACCOUNT: &str = "testacct";
const QUERY_ID: &str = "01b2c3d4-0000-1111-0000-000000000001";
const JSON_SQL: &str = "SELECT * FROM ANALYTICS.MARTS.JSON_EVENTS";
const QRMK: &str = "c2x1aWNlLXRlc3QtcmVzdWx0LWtleS0zMmJ5dGVzISE=";

#[derive(Default)]
struct Seen {
    logins: u32,
    renewals: u32,
    polls: u32,
    chunk_requests: HashMap<String, u32>,
    authorized_chunk_requests: u32,
    describe_only: Vec<bool>,
    copies: Vec<String>,
}

#[derive(Clone)]
struct ProtocolServer {
    seen: Arc<Mutex<Seen>>,
    public_key: Arc<Vec<u8>>,
    fingerprint: String,
    base: Arc<OnceLock<String>>,
    /// The bucket `COPY INTO <location>` writes to, and the key prefix of the test's stage.
    unload: Arc<OnceLock<(Arc<dyn ObjectStore>, String)>>,
}

/// The stage the unload test names, whose URL is `<bucket>/stage-root/`.
const STAGE: &str = "ANALYTICS.PUBLIC.SLUICE_UNLOAD";

fn fixture_key() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/test_rsa_key.pem"
    ))
    .expect("key")
}

fn snowflake_error(code: &str, message: &str) -> Response {
    Json(json!({"data": null, "code": code, "message": message, "success": false})).into_response()
}

fn rowtype() -> Value {
    json!([
        {"name": "ID", "type": "fixed", "precision": 38, "scale": 0, "nullable": false},
        {"name": "AMOUNT", "type": "fixed", "precision": 12, "scale": 2, "nullable": true},
        {"name": "NAME", "type": "text", "nullable": true, "length": 16777216},
        {"name": "SEEN", "type": "timestamp_ntz", "precision": 0, "scale": 9, "nullable": true},
        {"name": "AT", "type": "timestamp_ltz", "precision": 0, "scale": 3, "nullable": true},
        {"name": "DAY", "type": "date", "nullable": true}
    ])
}

/// Rows `first..first + n` the way Snowflake encodes them: the id in the narrowest integer that
/// holds the part, the amount unscaled, the NTZ timestamp as {epoch, fraction} with every third
/// row null, the LTZ one as milliseconds.
fn result_part(first: i64, n: i64) -> Vec<u8> {
    let ids: Vec<i64> = (first..first + n).collect();
    let id: ArrayRef = if first < 4 {
        Arc::new(Int8Array::from(ids.iter().map(|i| *i as i8).collect::<Vec<_>>()))
    } else if first < 8 {
        Arc::new(Int16Array::from(
            ids.iter().map(|i| *i as i16).collect::<Vec<_>>(),
        ))
    } else {
        Arc::new(Int64Array::from(ids.clone()))
    };
    let amount: ArrayRef = Arc::new(Int32Array::from(
        ids.iter().map(|i| (*i * 125) as i32).collect::<Vec<_>>(),
    ));
    let name: ArrayRef = Arc::new(StringArray::from(
        ids.iter().map(|i| format!("row {i}")).collect::<Vec<_>>(),
    ));
    let seen: ArrayRef = Arc::new(StructArray::new(
        Fields::from(vec![
            Field::new("epoch", DataType::Int64, false),
            Field::new("fraction", DataType::Int32, false),
        ]),
        vec![
            Arc::new(Int64Array::from(
                ids.iter().map(|i| 1_700_000_000 + i).collect::<Vec<_>>(),
            )),
            Arc::new(Int32Array::from(vec![250_000_000; ids.len()])),
        ],
        Some(ids.iter().map(|i| i % 3 != 0).collect::<Vec<_>>().into()),
    ));
    let at: ArrayRef = Arc::new(Int64Array::from(
        ids.iter().map(|i| 1_700_000_000_000 + i).collect::<Vec<_>>(),
    ));
    let day: ArrayRef = Arc::new(Date32Array::from(
        ids.iter().map(|i| 19_000 + *i as i32).collect::<Vec<_>>(),
    ));
    let columns = vec![id, amount, name, seen, at, day];
    let fields: Vec<Field> = ["ID", "AMOUNT", "NAME", "SEEN", "AT", "DAY"]
        .iter()
        .zip(&columns)
        .map(|(name, c)| Field::new(*name, c.data_type().clone(), true))
        .collect();
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).expect("batch");
    let mut bytes = Vec::new();
    let mut writer = arrow::ipc::writer::StreamWriter::try_new(&mut bytes, &batch.schema()).expect("ipc");
    writer.write(&batch).expect("write");
    writer.finish().expect("finish");
    drop(writer);
    bytes
}

impl ProtocolServer {
    async fn start() -> (Self, String) {
        let pem = fixture_key();
        let der = base64::engine::general_purpose::STANDARD
            .decode(
                pem.lines()
                    .filter(|l| !l.starts_with("-----"))
                    .collect::<String>(),
            )
            .expect("pem");
        let pair = ring::signature::RsaKeyPair::from_pkcs8(&der).expect("key");
        let fingerprint = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/test_rsa_key.fingerprint"
        ))
        .expect("fingerprint")
        .trim()
        .to_string();
        let server = Self {
            seen: Arc::default(),
            public_key: Arc::new(pair.public_key().as_ref().to_vec()),
            fingerprint,
            base: Arc::default(),
            unload: Arc::default(),
        };
        let app = axum::Router::new()
            .route("/session/v1/login-request", post(login))
            .route("/session/token-request", post(renew))
            .route("/queries/v1/query-request", post(query))
            .route("/queries/{id}/result", get(result))
            .route("/chunks/{name}", get(chunk))
            .with_state(server.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        server.base.set(base.clone()).expect("once");
        tokio::spawn(async move { axum::serve(listener, app).await.ok() });
        (server, base)
    }

    fn session(&self, headers: &HeaderMap) -> Option<String> {
        let value = headers.get("authorization")?.to_str().ok()?;
        let token = value.strip_prefix("Snowflake Token=\"")?.strip_suffix('"')?;
        Some(token.to_string())
    }

    /// Checks the JWT as Snowflake does: RS256 under the user's registered public key, issuer
    /// `ACCOUNT.USER.SHA256:<fingerprint>`, subject `ACCOUNT.USER`, a short lifetime.
    fn jwt_is_valid(&self, jwt: &str, user: &str) -> bool {
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let parts: Vec<&str> = jwt.split('.').collect();
        let [header, claims, signature] = parts[..] else {
            return false;
        };
        let (Ok(signature), Ok(claims)) = (engine.decode(signature), engine.decode(claims)) else {
            return false;
        };
        let key = ring::signature::UnparsedPublicKey::new(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            self.public_key.as_slice(),
        );
        if key
            .verify(format!("{header}.{}", parts[1]).as_bytes(), &signature)
            .is_err()
        {
            return false;
        }
        let claims: Value = serde_json::from_slice(&claims).unwrap_or_default();
        let account = ACCOUNT.to_ascii_uppercase();
        let now = chrono::Utc::now().timestamp();
        claims["iss"] == format!("{account}.{user}.{}", self.fingerprint)
            && claims["sub"] == format!("{account}.{user}")
            && claims["iat"]
                .as_i64()
                .is_some_and(|iat| (now - 60..=now + 5).contains(&iat))
            && claims["exp"]
                .as_i64()
                .zip(claims["iat"].as_i64())
                .is_some_and(|(e, i)| e - i <= 3600)
    }
}

async fn login(State(server): State<ProtocolServer>, Json(body): Json<Value>) -> Response {
    let data = &body["data"];
    server.seen.lock().unwrap().logins += 1;
    if data["ACCOUNT_NAME"] != ACCOUNT.to_ascii_uppercase() || data["AUTHENTICATOR"] != "SNOWFLAKE_JWT" {
        return snowflake_error("390100", "Incorrect username or password was specified.");
    }
    // Only SLUICE has the key registered.
    // Login names are case-insensitive.
    let user = data["LOGIN_NAME"].as_str().unwrap_or("").to_ascii_uppercase();
    if user != "SLUICE" || !server.jwt_is_valid(data["TOKEN"].as_str().unwrap_or(""), "SLUICE") {
        return snowflake_error("390144", "JWT token is invalid.");
    }
    Json(
        json!({"data": {"token": "session-1", "masterToken": "master-1", "validityInSeconds": 3600,
        "sessionInfo": {"databaseName": "ANALYTICS"}}, "success": true, "code": null, "message": null}),
    )
    .into_response()
}

async fn renew(
    State(server): State<ProtocolServer>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if server.session(&headers).as_deref() != Some("master-1")
        || body["oldSessionToken"] != "session-1"
        || body["requestType"] != "RENEW"
    {
        return snowflake_error("390114", "Authentication token has expired.");
    }
    server.seen.lock().unwrap().renewals += 1;
    Json(
        json!({"data": {"sessionToken": "session-2", "validityInSecondsST": 3600, "masterToken": "master-1"},
        "success": true, "code": null, "message": null}),
    )
    .into_response()
}

async fn query(
    State(server): State<ProtocolServer>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if server.session(&headers).as_deref() != Some("session-1") {
        return (
            StatusCode::UNAUTHORIZED,
            snowflake_error("390104", "Session no longer exists."),
        )
            .into_response();
    }
    let describe_only = body["describeOnly"] == true;
    server.seen.lock().unwrap().describe_only.push(describe_only);
    if body["sqlText"] == JSON_SQL && !describe_only {
        // Snowflake may answer in JSON rowsets of strings: inline rows, then a chunk.
        let base = server.base.get().expect("base");
        return Json(
            json!({"data": {"rowtype": rowtype(), "statementTypeId": 4096, "queryResultFormat": "json",
            "rowset": [["1", "1.25", "row 1", "1700000001.250000000", "1700000000.001", "19001"],
                       ["2", "-0.50", null, null, null, null]],
            "total": 4, "qrmk": QRMK, "queryId": QUERY_ID,
            "chunks": [{"url": format!("{base}/chunks/json"), "rowCount": 2}]}, "success": true}),
        )
        .into_response();
    }
    if let Some(copy) = body["sqlText"].as_str().filter(|s| s.starts_with("COPY INTO"))
        && !describe_only
    {
        server.seen.lock().unwrap().copies.push(copy.to_string());
        return copy_into_location(&server, copy).await;
    }
    if body["sqlText"] != "SELECT * FROM ANALYTICS.MARTS.EVENTS" && body["sqlText"] != JSON_SQL {
        return snowflake_error(
            "001003",
            "SQL compilation error: syntax error line 1 at position 0.",
        );
    }
    if describe_only {
        return Json(
            json!({"data": {"rowtype": rowtype(), "statementTypeId": 4096, "total": 0,
            "queryResultFormat": "arrow", "rowsetBase64": "", "queryId": QUERY_ID}, "success": true}),
        )
        .into_response();
    }
    // Longer than Snowflake waits before answering: the client polls.
    Json(json!({"data": {"getResultUrl": format!("/queries/{QUERY_ID}/result"), "queryId": QUERY_ID,
        "progressDesc": null, "queryAbortsAfterSecs": 300}, "code": "333333",
        "message": "Asynchronous execution in progress. Use provided query id to perform query monitoring and management.",
        "success": true}))
    .into_response()
}

/// `COPY INTO @stage/path/ FROM (query) FILE_FORMAT = (TYPE = PARQUET) ...` or `COPY INTO
/// 's3://...' STORAGE_INTEGRATION = ... FROM (...)`: writes the events as Snowflake unloads them
/// (two files named as Snowflake names them, NUMBER as DECIMAL, TIMESTAMP_NTZ in nanoseconds)
/// and answers a row per file, as with `DETAILED_OUTPUT = TRUE`.
async fn copy_into_location(server: &ProtocolServer, copy: &str) -> Response {
    let (store, bucket) = server
        .unload
        .get()
        .expect("the test set the unload bucket")
        .clone();
    let target = copy.strip_prefix("COPY INTO ").expect("COPY INTO");
    let key_prefix = if let Some(rest) = target.strip_prefix(&format!("@{STAGE}/")) {
        format!("stage-root/{}", rest.split_whitespace().next().expect("path"))
    } else {
        let url = target
            .strip_prefix(&format!("'s3://{bucket}/"))
            .and_then(|rest| rest.split_once('\''))
            .map(|(path, rest)| {
                assert!(
                    rest.trim_start()
                        .starts_with("STORAGE_INTEGRATION = SLUICE_S3 FROM"),
                    "{copy}"
                );
                path.to_string()
            });
        url.unwrap_or_else(|| panic!("an unexpected COPY target: {copy}"))
    };
    assert!(
        copy.contains("FROM (\nSELECT * FROM ANALYTICS.MARTS.EVENTS\n) FILE_FORMAT = (TYPE = PARQUET) HEADER = TRUE DETAILED_OUTPUT = TRUE"),
        "{copy}"
    );
    let mut answer = Vec::new();
    for (part, ids) in [(0, 1..8i64), (1, 8..16i64)] {
        let ids: Vec<i64> = ids.collect();
        let columns: Vec<(&str, ArrayRef)> = vec![
            (
                "ID",
                Arc::new(
                    Decimal128Array::from(ids.iter().map(|i| *i as i128).collect::<Vec<_>>())
                        .with_precision_and_scale(38, 0)
                        .expect("decimal"),
                ),
            ),
            (
                "AMOUNT",
                Arc::new(
                    Decimal128Array::from(ids.iter().map(|i| (*i * 125) as i128).collect::<Vec<_>>())
                        .with_precision_and_scale(12, 2)
                        .expect("decimal"),
                ),
            ),
            (
                "NAME",
                Arc::new(StringArray::from(
                    ids.iter().map(|i| format!("row {i}")).collect::<Vec<_>>(),
                )),
            ),
            (
                "SEEN",
                Arc::new(TimestampNanosecondArray::from(
                    ids.iter()
                        .map(|i| (i % 3 != 0).then_some((1_700_000_000 + i) * 1_000_000_000 + 250_000_000))
                        .collect::<Vec<_>>(),
                )),
            ),
            (
                "AT",
                Arc::new(
                    TimestampMicrosecondArray::from(
                        ids.iter()
                            .map(|i| (1_700_000_000_000 + i) * 1000)
                            .collect::<Vec<_>>(),
                    )
                    .with_timezone("UTC"),
                ),
            ),
            (
                "DAY",
                Arc::new(Date32Array::from(
                    ids.iter().map(|i| 19_000 + *i as i32).collect::<Vec<_>>(),
                )),
            ),
        ];
        let batch = RecordBatch::try_from_iter(columns).expect("batch");
        let mut bytes = Vec::new();
        let mut writer =
            parquet::arrow::ArrowWriter::try_new(&mut bytes, batch.schema(), None).expect("writer");
        writer.write(&batch).expect("write");
        writer.close().expect("close");
        let name = format!("data_0_{part}_0.snappy.parquet");
        answer.push(json!([name, bytes.len().to_string(), ids.len().to_string()]));
        store
            .put(
                &object_store::path::Path::from(format!("{key_prefix}{name}").as_str()),
                object_store::PutPayload::from(bytes),
            )
            .await
            .expect("put");
    }
    Json(json!({"data": {
        "rowtype": [
            {"name": "FILE_NAME", "type": "text", "nullable": false, "length": 16777216},
            {"name": "FILE_SIZE", "type": "fixed", "precision": 19, "scale": 0, "nullable": false},
            {"name": "ROW_COUNT", "type": "fixed", "precision": 19, "scale": 0, "nullable": false}
        ],
        "statementTypeId": 20480, "queryResultFormat": "json", "rowset": answer, "total": 2,
        "queryId": QUERY_ID}, "success": true, "code": null, "message": null}))
    .into_response()
}

async fn result(
    State(server): State<ProtocolServer>,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    assert_eq!(id, QUERY_ID);
    let polls = {
        let mut seen = server.seen.lock().unwrap();
        seen.polls += 1;
        seen.polls
    };
    match (server.session(&headers).as_deref(), polls) {
        (Some("session-1"), _) => {
            return snowflake_error("390112", "Your session has expired. Please login again.");
        }
        (Some("session-2"), 2) => {
            return Json(
                json!({"data": {"getResultUrl": format!("/queries/{QUERY_ID}/result"), "queryId": QUERY_ID},
                "code": "333333", "message": "Asynchronous execution in progress.", "success": true}),
            )
            .into_response();
        }
        (Some("session-2"), _) => {}
        _ => {
            return (
                StatusCode::UNAUTHORIZED,
                snowflake_error("390104", "Session no longer exists."),
            )
                .into_response();
        }
    }
    let base = server.base.get().expect("base");
    let inline = base64::engine::general_purpose::STANDARD.encode(result_part(1, 3));
    Json(json!({"data": {
        "rowtype": rowtype(), "statementTypeId": 4096, "queryId": QUERY_ID, "queryResultFormat": "arrow",
        "rowsetBase64": inline, "total": 15, "returned": 15, "qrmk": QRMK,
        "chunks": [
            {"url": format!("{base}/chunks/a?X-Amz-Signature=abc"), "rowCount": 4, "uncompressedSize": 1000, "compressedSize": 400},
            {"url": format!("{base}/chunks/b?X-Amz-Signature=def"), "rowCount": 4, "uncompressedSize": 1000, "compressedSize": 400},
            {"url": format!("{base}/chunks/c?X-Amz-Signature=ghi"), "rowCount": 4, "uncompressedSize": 1000, "compressedSize": 400}
        ]}, "code": null, "message": null, "success": true}))
    .into_response()
}

async fn chunk(
    State(server): State<ProtocolServer>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    let attempt = {
        let mut seen = server.seen.lock().unwrap();
        if headers.contains_key("authorization") {
            seen.authorized_chunk_requests += 1;
        }
        let attempt = seen.chunk_requests.entry(name.clone()).or_default();
        *attempt += 1;
        *attempt
    };
    // Results are encrypted with the query's key: S3 refuses a GET without it (SSE-C).
    if headers
        .get("x-amz-server-side-encryption-customer-key")
        .and_then(|v| v.to_str().ok())
        != Some(QRMK)
        || headers
            .get("x-amz-server-side-encryption-customer-algorithm")
            .and_then(|v| v.to_str().ok())
            != Some("AES256")
    {
        return (
            StatusCode::BAD_REQUEST,
            "<Error><Code>InvalidRequest</Code></Error>",
        )
            .into_response();
    }
    if name == "json" {
        // JSON chunks are rows separated by commas, without the enclosing brackets.
        return r#"["3", "1234567.89", "row \"3\"", "-1.000001000", "0", "0"], ["4", "0.00", "", "0.000000000", "-1", "-1"]"#
            .into_response();
    }
    let (first, gzip) = match name.as_str() {
        "a" => (4, true),
        "b" if attempt == 1 => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "<Error><Code>SlowDown</Code></Error>",
            )
                .into_response();
        }
        "b" => (8, false),
        "c" => (12, true),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    let body = result_part(first, 4);
    let body = if gzip {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(&body).expect("gzip");
        encoder.finish().expect("gzip")
    } else {
        body
    };
    // Snowflake's chunks carry no Content-Encoding even when gzipped.
    ([("content-type", "binary/octet-stream")], body).into_response()
}

fn source(base: &str, user: &str) -> SnowflakeSource {
    source_with(base, user, None)
}

fn source_with(base: &str, user: &str, unload: Option<Value>) -> SnowflakeSource {
    let mut config = json!({
        "account": ACCOUNT,
        "url": base,
        "user": user,
        "private_key": fixture_key(),
        "warehouse": "REPORTING",
        "database": "ANALYTICS",
        "role": "SLUICE_READER",
    });
    if let Some(unload) = unload {
        config["unload"] = unload;
    }
    let config: SnowflakeConfig = serde_json::from_value(config).expect("config");
    SnowflakeSource::new(
        "warehouse",
        config,
        &ConnectorEnv::rooted_at(std::env::temp_dir()),
    )
    .expect("source")
}

#[tokio::test]
async fn key_pair_login_polling_renewal_and_chunked_arrow_results_follow_the_protocol() {
    let (server, base) = ProtocolServer::start().await;
    let source = source(&base, "sluice");
    let query = ModelQuery::new("events", "SELECT * FROM ANALYTICS.MARTS.EVENTS;");
    let mut stream = source.extract(&query).await.expect("extract");
    let mut batches = Vec::new();
    while let Some(batch) = stream.next().await {
        batches.push(batch.expect("batch"));
    }
    let batch = arrow::compute::concat_batches(&batches[0].schema(), &batches).expect("concat");
    let schema = batch.schema();
    let types: Vec<String> = schema
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
            "Timestamp(µs)",
            "Timestamp(µs, \"UTC\")",
            "Date32"
        ]
    );
    assert_eq!(batch.num_rows(), 15);
    let ids: Vec<i64> = batch
        .column(0)
        .as_primitive::<arrow::datatypes::Int64Type>()
        .values()
        .to_vec();
    assert_eq!(
        ids,
        (1..=15).collect::<Vec<i64>>(),
        "the inline part, then the chunks in order"
    );
    let amounts = batch.column(1).as_primitive::<arrow::datatypes::Decimal128Type>();
    assert_eq!(amounts.value_as_string(3), "5.00");
    let seen = batch
        .column(3)
        .as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
    assert_eq!(seen.value(0), 1_700_000_001_250_000);
    assert!(seen.is_null(2), "a null structured timestamp stays null");
    let at = batch
        .column(4)
        .as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
    assert_eq!(at.value(14), 1_700_000_000_015_000);

    let seen = server.seen.lock().unwrap();
    assert_eq!(seen.logins, 1);
    assert_eq!(
        seen.renewals, 1,
        "the expired session token was renewed with the master token"
    );
    assert_eq!(seen.polls, 3, "polled until the statement finished");
    assert_eq!(seen.describe_only, vec![true, false], "compiled first, then run");
    assert_eq!(seen.chunk_requests.get("b"), Some(&2), "a 503 is retried");
    assert_eq!(
        seen.authorized_chunk_requests, 0,
        "the session token never goes to cloud storage"
    );
}

#[tokio::test]
async fn a_refused_key_names_its_fingerprint_and_a_bad_query_its_error() {
    let (_server, base) = ProtocolServer::start().await;
    let fingerprint = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/test_rsa_key.fingerprint"
    ))
    .expect("fingerprint");
    let err = source(&base, "someone_else")
        .check()
        .await
        .expect_err("refused")
        .to_string();
    assert!(
        err.contains("JWT token is invalid") && err.contains("390144") && err.contains(fingerprint.trim()),
        "{err}"
    );
    let err = source(&base, "sluice")
        .check_query(&ModelQuery::new("events", "SELEC 1"))
        .await
        .expect_err("syntax")
        .to_string();
    assert!(err.contains("model `events`") && err.contains("001003"), "{err}");
}

#[tokio::test]
async fn json_rowsets_are_read_into_the_same_types_as_arrow() {
    let (_server, base) = ProtocolServer::start().await;
    let source = source(&base, "sluice");
    let mut stream = source
        .extract(&ModelQuery::new("events", JSON_SQL))
        .await
        .expect("extract");
    let mut batches = Vec::new();
    while let Some(batch) = stream.next().await {
        batches.push(batch.expect("batch"));
    }
    let batch = arrow::compute::concat_batches(&batches[0].schema(), &batches).expect("concat");
    assert_eq!(batch.num_rows(), 4);
    let ids = batch.column(0).as_primitive::<arrow::datatypes::Int64Type>();
    assert_eq!(ids.values().to_vec(), vec![1, 2, 3, 4]);
    let amounts = batch.column(1).as_primitive::<arrow::datatypes::Decimal128Type>();
    assert_eq!(amounts.value_as_string(2), "1234567.89");
    assert_eq!(batch.column(2).as_string::<i32>().value(2), "row \"3\"");
    assert!(batch.column(2).is_null(1));
    let seen = batch
        .column(3)
        .as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
    assert_eq!(seen.value(0), 1_700_000_001_250_000);
    assert_eq!(seen.value(2), -1_000_001);
    let at = batch
        .column(4)
        .as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
    assert_eq!(at.value(3), -1_000_000, "LTZ seconds");
}

#[tokio::test]
async fn unloaded_parquet_reads_back_as_the_same_batches_as_the_result_and_is_deleted() {
    let Some(bucket) = Bucket::new(Provider::S3, "snowflake-unload").await else {
        return;
    };
    let (server, base) = ProtocolServer::start().await;
    assert!(server.unload.set((bucket.store(), bucket.name.clone())).is_ok());
    let options: serde_json::Map<String, Value> = bucket
        .options()
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();

    let streamed = sorted(
        source(&base, "sluice")
            .extract(&ModelQuery::new("events", "SELECT * FROM ANALYTICS.MARTS.EVENTS"))
            .await
            .expect("extract"),
    )
    .await;
    assert_eq!(streamed.num_rows(), 15);

    for unload in [
        json!({"url": bucket.url("stage-root/"), "stage": format!("@{STAGE}"), "options": options}),
        json!({"url": bucket.url("direct/"), "storage_integration": "SLUICE_S3", "options": options}),
    ] {
        let source = source_with(&base, "sluice", Some(unload.clone()));
        // A preview or a probe reads the result as it streams; only a sync unloads.
        let copies_before = server.seen.lock().unwrap().copies.len();
        let mut query = ModelQuery::new("events", "SELECT * FROM ANALYTICS.MARTS.EVENTS");
        query.bulk = true;
        let unloaded = sorted(source.extract(&query).await.expect("unload")).await;
        assert_eq!(
            server.seen.lock().unwrap().copies.len(),
            copies_before + 1,
            "{unload}"
        );
        assert_eq!(
            unloaded, streamed,
            "unloaded Parquet reads as the same types and values as the result ({unload})"
        );
    }
    let copies = server.seen.lock().unwrap().copies.clone();
    assert!(
        copies[0].starts_with(&format!("COPY INTO @{STAGE}/events/")),
        "{}",
        copies[0]
    );
    assert!(
        copies[1].starts_with(&format!("COPY INTO '{}events/", bucket.url("direct/"))),
        "{}",
        copies[1]
    );
    assert_eq!(
        bucket.list("").await,
        Vec::<String>::new(),
        "files are deleted once read"
    );
}
