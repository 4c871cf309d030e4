//! The `bigquery` source against a server in the test that answers as BigQuery's REST API v2
//! does (`jobs.query`, `jobs.getQueryResults`, Google's OAuth token endpoint), and checks every
//! request against Google's published discovery document for BigQuery v2 (from PyPI's
//! `google-api-python-client`, installed by `.ci/test-tools`): request bodies may only use
//! fields of `QueryRequest`, query strings only the parameters of `getQueryResults`. Dry runs,
//! jobs that are not complete at first, a 429, result pages chained by `pageToken`, and
//! BigQuery's error bodies (`notFound`, `accessDenied`) are served. No BigQuery emulator exists
//! in the package registries.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use arrow::array::{
    Array, ArrayRef, AsArray, Decimal128Array, Int64Array, ListBuilder, RecordBatch, StringArray,
    StringBuilder, StructArray, TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field};
use axum::Json;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use futures::StreamExt;
use object_store::{ObjectStore, ObjectStoreExt};
use ring::signature::KeyPair as _;
use serde_json::{Value, json};
use sluice_connectors::sources::bigquery::{BigQueryConfig, BigQuerySource};
use sluice_connectors::sources::bigquery_storage::{
    ArrowRecordBatch, ArrowSchema, CreateReadSessionRequest, ReadRowsRequest, ReadRowsResponse, ReadSession,
    ReadStream, SERVICE,
};
use sluice_engine::source::{ConnectorEnv, ModelQuery, Source};

use crate::buckets::{Bucket, Provider};
use crate::common::sorted;
use crate::services::{discovery_conforms, google_discovery};

const PROJECT: &str = "sluice-test";
const CLIENT_EMAIL: &str = "sluice@sluice-test.iam.gserviceaccount.com";
const MODEL_SQL: &str = "SELECT * FROM analytics.users";

fn discovery() -> Option<Value> {
    google_discovery("bigquery.v2.json", "BigQuery")
}

#[derive(Default)]
struct Seen {
    tokens: u32,
    /// Token exchanges at the STS, impersonations, metadata-server tokens.
    exchanges: Vec<HashMap<String, String>>,
    /// Storage Read API calls: `CreateReadSession` requests, streams read.
    sessions: Vec<CreateReadSessionRequest>,
    streams_read: Vec<String>,
    impersonations: Vec<Value>,
    metadata_tokens: u32,
    bodies: Vec<Value>,
    result_calls: u32,
    page_tokens: Vec<Option<String>>,
    violations: Vec<String>,
}

#[derive(Clone)]
struct Api {
    seen: Arc<Mutex<Seen>>,
    discovery: Arc<Value>,
    public_key: Arc<Vec<u8>>,
    base: Arc<OnceLock<String>>,
    /// The Cloud Storage bucket `EXPORT DATA` writes to, and its name.
    export: Arc<OnceLock<(Arc<dyn ObjectStore>, String)>>,
    /// The Storage Read API refuses read sessions (a permission not granted).
    storage_denied: Arc<std::sync::atomic::AtomicBool>,
}

const EXPORT_JOB: &str = "job_sluice_export";
const ANON_DATASET: &str = "_8f2b0c1d_anon";
const ANON_TABLE: &str = "anon1a2b3c4d_result";

fn google_error(status: StatusCode, reason: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"code": status.as_u16(), "message": message,
            "errors": [{"message": message, "domain": "global", "reason": reason}],
            "status": if status == StatusCode::NOT_FOUND { "NOT_FOUND" } else { "PERMISSION_DENIED" }}})),
    )
        .into_response()
}

fn schema() -> Value {
    json!({"fields": [
        {"name": "id", "type": "INTEGER", "mode": "REQUIRED"},
        {"name": "amount", "type": "NUMERIC", "mode": "NULLABLE"},
        {"name": "name", "type": "STRING", "mode": "NULLABLE"},
        {"name": "seen", "type": "TIMESTAMP", "mode": "NULLABLE"},
        {"name": "tags", "type": "STRING", "mode": "REPEATED"},
        {"name": "address", "type": "RECORD", "mode": "NULLABLE", "fields": [
            {"name": "city", "type": "STRING", "mode": "NULLABLE"},
            {"name": "zip", "type": "INTEGER", "mode": "NULLABLE"}
        ]}
    ]})
}

fn row(id: i64) -> Value {
    json!({"f": [
        {"v": id.to_string()},
        {"v": if id == 2 { Value::Null } else { json!(format!("{id}.5")) }},
        {"v": format!("user {id}")},
        {"v": (1_700_000_000_000_000i64 + id).to_string()},
        {"v": [{"v": "a"}, {"v": format!("t{id}")}]},
        {"v": {"f": [{"v": "Paris"}, {"v": "75001"}]}}
    ]})
}

impl Api {
    async fn start(discovery: Value) -> (Self, String) {
        let pem = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/test_rsa_key.pem"
        ))
        .expect("key");
        let der = base64::engine::general_purpose::STANDARD
            .decode(
                pem.lines()
                    .filter(|l| !l.starts_with("-----"))
                    .collect::<String>(),
            )
            .expect("pem");
        let pair = ring::signature::RsaKeyPair::from_pkcs8(&der).expect("key");
        let api = Self {
            seen: Arc::default(),
            discovery: Arc::new(discovery),
            public_key: Arc::new(pair.public_key().as_ref().to_vec()),
            base: Arc::default(),
            export: Arc::default(),
            storage_denied: Arc::default(),
        };
        let app = axum::Router::new()
            .route("/token", post(token))
            .route("/bigquery/v2/projects/{project}/queries", post(query))
            .route("/bigquery/v2/projects/{project}/queries/{job}", get(results))
            .route("/bigquery/v2/projects/{project}/jobs/{job}", get(job))
            .route("/sts/v1/token", post(sts_token))
            .route("/iam/v1/projects/-/serviceAccounts/{account}", post(impersonate))
            .route(
                "/computeMetadata/v1/instance/service-accounts/default/token",
                get(metadata_token),
            )
            .with_state(api.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        api.base.set(base.clone()).expect("once");
        tokio::spawn(async move { axum::serve(listener, app).await.ok() });
        (api, base)
    }

    fn violation(&self, what: String) {
        self.seen.lock().unwrap().violations.push(what);
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        headers.get("authorization").and_then(|v| v.to_str().ok()) == Some("Bearer ya29.sluice-test")
    }
}

/// Google's token endpoint: a JWT bearer assertion signed by the service account's key.
async fn token(State(api): State<Api>, body: String) -> Response {
    let form: HashMap<String, String> = url::form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    let assertion = form.get("assertion").cloned().unwrap_or_default();
    let parts: Vec<&str> = assertion.split('.').collect();
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let valid = parts.len() == 3
        && form.get("grant_type").map(String::as_str) == Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
        && engine.decode(parts[2]).is_ok_and(|signature| {
            ring::signature::UnparsedPublicKey::new(
                &ring::signature::RSA_PKCS1_2048_8192_SHA256,
                api.public_key.as_slice(),
            )
            .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature)
            .is_ok()
        })
        && engine
            .decode(parts[1])
            .ok()
            .and_then(|c| serde_json::from_slice::<Value>(&c).ok())
            .is_some_and(|claims| {
                claims["iss"] == CLIENT_EMAIL
                    && claims["scope"] == "https://www.googleapis.com/auth/bigquery"
                    && claims["aud"] == format!("{}/token", api.base.get().expect("base"))
            });
    if !valid {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_grant", "error_description": "Invalid JWT Signature."})),
        )
            .into_response();
    }
    api.seen.lock().unwrap().tokens += 1;
    Json(json!({"access_token": "ya29.sluice-test", "expires_in": 3599, "token_type": "Bearer"}))
        .into_response()
}

const SUBJECT_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.workload-identity.signature";
const AUDIENCE: &str =
    "//iam.googleapis.com/projects/123/locations/global/workloadIdentityPools/ci/providers/k8s";

/// Google's STS (RFC 8693 token exchange): the workload's token for a federated token.
async fn sts_token(State(api): State<Api>, body: String) -> Response {
    let form: HashMap<String, String> = url::form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    api.seen.lock().unwrap().exchanges.push(form.clone());
    let expected = [
        ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
        ("audience", AUDIENCE),
        ("subject_token", SUBJECT_TOKEN),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        (
            "requested_token_type",
            "urn:ietf:params:oauth:token-type:access_token",
        ),
        ("scope", "https://www.googleapis.com/auth/cloud-platform"),
    ];
    if expected
        .iter()
        .any(|(k, v)| form.get(*k).map(String::as_str) != Some(*v))
    {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_request", "error_description": "Invalid value for one of the token exchange fields."})),
        )
            .into_response();
    }
    Json(json!({"access_token": "federated-1", "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "token_type": "Bearer", "expires_in": 3600}))
    .into_response()
}

/// IAM Credentials' `generateAccessToken` for the impersonated service account.
async fn impersonate(
    State(api): State<Api>,
    UrlPath(account): UrlPath<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    api.seen.lock().unwrap().impersonations.push(body.clone());
    if account != format!("{CLIENT_EMAIL}:generateAccessToken")
        || headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer federated-1")
    {
        return google_error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "Permission 'iam.serviceAccounts.getAccessToken' denied on resource (or it may not exist).",
        );
    }
    assert_eq!(body["scope"], json!(["https://www.googleapis.com/auth/bigquery"]));
    Json(json!({"accessToken": "ya29.sluice-test", "expireTime": "2099-01-01T00:00:00Z"})).into_response()
}

/// The metadata server's token for the instance's service account.
async fn metadata_token(
    State(api): State<Api>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if headers.get("metadata-flavor").and_then(|v| v.to_str().ok()) != Some("Google") {
        return (StatusCode::FORBIDDEN, "Missing Metadata-Flavor:Google header.").into_response();
    }
    assert_eq!(
        params.get("scopes").map(String::as_str),
        Some("https://www.googleapis.com/auth/bigquery")
    );
    api.seen.lock().unwrap().metadata_tokens += 1;
    Json(json!({"access_token": "ya29.sluice-test", "expires_in": 3599, "token_type": "Bearer"}))
        .into_response()
}

async fn query(
    State(api): State<Api>,
    UrlPath(project): UrlPath<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if !api.authorized(&headers) {
        return google_error(
            StatusCode::UNAUTHORIZED,
            "authError",
            "Request had invalid authentication credentials.",
        );
    }
    if let Err(e) = discovery_conforms(&api.discovery, "QueryRequest", &body, "QueryRequest") {
        api.violation(e);
    }
    api.seen.lock().unwrap().bodies.push(body.clone());
    if project != PROJECT {
        return google_error(
            StatusCode::FORBIDDEN,
            "accessDenied",
            &format!(
                "Access Denied: Project {project}: User does not have bigquery.jobs.create permission in project {project}."
            ),
        );
    }
    let sql = body["query"].as_str().unwrap_or("");
    if sql.contains("missing") {
        return google_error(
            StatusCode::NOT_FOUND,
            "notFound",
            "Not found: Table sluice-test:analytics.missing was not found in location EU",
        );
    }
    if body["dryRun"] == true {
        let statement = sql.split_whitespace().next().unwrap_or("").to_ascii_uppercase();
        return Json(
            json!({"kind": "bigquery#queryResponse", "schema": schema(), "jobComplete": true,
            "totalBytesProcessed": "1024", "cacheHit": false, "statementType": statement,
            "jobReference": {"projectId": PROJECT, "location": "EU"}}),
        )
        .into_response();
    }
    if sql.starts_with("EXPORT DATA") {
        return export_data(&api, sql).await;
    }
    // The job outlasts the call's wait: not complete yet.
    Json(json!({"kind": "bigquery#queryResponse", "jobComplete": false,
        "jobReference": {"projectId": PROJECT, "jobId": "job_sluice_1", "location": "EU"}}))
    .into_response()
}

async fn results(
    State(api): State<Api>,
    UrlPath((project, job)): UrlPath<(String, String)>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if !api.authorized(&headers) {
        return google_error(
            StatusCode::UNAUTHORIZED,
            "authError",
            "Request had invalid authentication credentials.",
        );
    }
    let method = &api.discovery["resources"]["jobs"]["methods"]["getQueryResults"]["parameters"];
    for key in params.keys() {
        if method.get(key).is_none() {
            api.violation(format!("getQueryResults has no parameter {key}"));
        }
    }
    if job == EXPORT_JOB {
        // An EXPORT DATA job returns no rows; it completes on the first poll.
        return Json(
            json!({"kind": "bigquery#getQueryResultsResponse", "jobComplete": true,
            "jobReference": {"projectId": PROJECT, "jobId": job, "location": "EU"}, "totalRows": "0"}),
        )
        .into_response();
    }
    assert_eq!((project.as_str(), job.as_str()), (PROJECT, "job_sluice_1"));
    assert_eq!(
        params.get("location").map(String::as_str),
        Some("EU"),
        "the job's location"
    );
    assert_eq!(
        params.get("formatOptions.useInt64Timestamp").map(String::as_str),
        Some("true")
    );
    let calls = {
        let mut seen = api.seen.lock().unwrap();
        seen.result_calls += 1;
        seen.page_tokens.push(params.get("pageToken").cloned());
        seen.result_calls
    };
    match calls {
        1 => {
            return Json(
                json!({"kind": "bigquery#getQueryResultsResponse", "jobComplete": false,
                "jobReference": {"projectId": PROJECT, "jobId": job, "location": "EU"}}),
            )
            .into_response();
        }
        2 => {
            return google_error(
                StatusCode::TOO_MANY_REQUESTS,
                "rateLimitExceeded",
                "Exceeded rate limits: too many api requests per user per method for this user_method.",
            );
        }
        _ => {}
    }
    let (rows, next): (Vec<i64>, Option<&str>) = match params.get("pageToken").map(String::as_str) {
        None => (vec![1, 2], Some("page-2")),
        Some("page-2") => (vec![3, 4], Some("page-3")),
        Some("page-3") => (vec![5], None),
        Some(other) => panic!("unknown page token {other}"),
    };
    let mut answer = json!({"kind": "bigquery#getQueryResultsResponse", "etag": "e", "schema": schema(),
        "jobReference": {"projectId": PROJECT, "jobId": job, "location": "EU"},
        "totalRows": "5", "rows": rows.into_iter().map(row).collect::<Vec<_>>(), "jobComplete": true, "cacheHit": false});
    if let Some(token) = next {
        answer["pageToken"] = json!(token);
    }
    Json(answer).into_response()
}

/// `EXPORT DATA OPTIONS (uri = 'gs://bucket/path/*.parquet', format = 'PARQUET', ...) AS query`:
/// writes the model's five rows as BigQuery exports them (NUMERIC as DECIMAL(38, 9), TIMESTAMP
/// in UTC microseconds, REPEATED as a list, RECORD as a group) in two files named by the
/// wildcard, and answers a job that is not complete yet.
async fn export_data(api: &Api, sql: &str) -> Response {
    let (store, bucket) = api.export.get().expect("the test set the export bucket").clone();
    let options = sql
        .strip_prefix("EXPORT DATA OPTIONS (")
        .and_then(|rest| rest.split_once(") AS\n"))
        .map(|(options, query)| {
            assert_eq!(query.trim(), MODEL_SQL, "{sql}");
            options
        })
        .unwrap_or_else(|| panic!("not an EXPORT DATA statement: {sql}"));
    assert!(
        options.contains("format = 'PARQUET'") && options.contains("overwrite = false"),
        "{sql}"
    );
    let uri = options
        .strip_prefix("uri = 'gs://")
        .and_then(|rest| rest.split_once('\''))
        .map(|(uri, _)| uri)
        .unwrap_or_else(|| panic!("no uri: {sql}"));
    let path = uri
        .strip_prefix(&format!("{bucket}/"))
        .and_then(|p| p.strip_suffix("*.parquet"))
        .unwrap_or_else(|| panic!("a uri outside the bucket or without its wildcard: {uri}"));
    for (part, ids) in [(0, vec![1i64, 2, 3]), (1, vec![4, 5])] {
        let batch = users_arrow(&ids);
        let mut bytes = Vec::new();
        let mut writer =
            parquet::arrow::ArrowWriter::try_new(&mut bytes, batch.schema(), None).expect("writer");
        writer.write(&batch).expect("write");
        writer.close().expect("close");
        store
            .put(
                &object_store::path::Path::from(format!("{path}{part:012}.parquet").as_str()),
                object_store::PutPayload::from(bytes),
            )
            .await
            .expect("put");
    }
    Json(json!({"kind": "bigquery#queryResponse", "jobComplete": false,
        "jobReference": {"projectId": PROJECT, "jobId": EXPORT_JOB, "location": "EU"}}))
    .into_response()
}

/// Rows `ids` of the model as BigQuery's Arrow (and Parquet) carries them: NUMERIC as
/// Decimal128(38, 9), TIMESTAMP as UTC microseconds, REPEATED as a list, RECORD as a struct.
fn users_arrow(ids: &[i64]) -> RecordBatch {
    let mut tags = ListBuilder::new(StringBuilder::new());
    for id in ids {
        tags.values().append_value("a");
        tags.values().append_value(format!("t{id}"));
        tags.append(true);
    }
    let tags = tags.finish();
    let address = StructArray::from(vec![
        (
            Arc::new(Field::new("city", DataType::Utf8, true)),
            Arc::new(StringArray::from(vec!["Paris"; ids.len()])) as ArrayRef,
        ),
        (
            Arc::new(Field::new("zip", DataType::Int64, true)),
            Arc::new(Int64Array::from(vec![75001; ids.len()])) as ArrayRef,
        ),
    ]);
    let columns: Vec<(&str, ArrayRef)> = vec![
        ("id", Arc::new(Int64Array::from(ids.to_vec()))),
        (
            "amount",
            Arc::new(
                Decimal128Array::from(
                    ids.iter()
                        .map(|id| (*id != 2).then_some(*id as i128 * 1_000_000_000 + 500_000_000))
                        .collect::<Vec<_>>(),
                )
                .with_precision_and_scale(38, 9)
                .expect("decimal"),
            ),
        ),
        (
            "name",
            Arc::new(StringArray::from(
                ids.iter().map(|id| format!("user {id}")).collect::<Vec<_>>(),
            )),
        ),
        (
            "seen",
            Arc::new(
                TimestampMicrosecondArray::from(
                    ids.iter()
                        .map(|id| 1_700_000_000_000_000 + id)
                        .collect::<Vec<_>>(),
                )
                .with_timezone("UTC"),
            ),
        ),
        ("tags", Arc::new(tags)),
        ("address", Arc::new(address)),
    ];
    // As BigQuery declares them: `id` REQUIRED, the rest NULLABLE.
    RecordBatch::try_from_iter_with_nullable(
        columns
            .into_iter()
            .map(|(name, column)| (name, column, name != "id")),
    )
    .expect("batch")
}

/// `jobs.get`: the export job, with its `exportDataStatistics`.
async fn job(
    State(api): State<Api>,
    UrlPath((project, job)): UrlPath<(String, String)>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    assert!(api.authorized(&headers));
    let method = &api.discovery["resources"]["jobs"]["methods"]["get"]["parameters"];
    for key in params.keys() {
        if method.get(key).is_none() {
            api.violation(format!("jobs.get has no parameter {key}"));
        }
    }
    assert_eq!(params.get("location").map(String::as_str), Some("EU"));
    if (project.as_str(), job.as_str()) == (PROJECT, "job_sluice_1") {
        // A query's result is an anonymous table, which the Storage Read API reads.
        let answer = json!({"kind": "bigquery#job", "id": format!("{PROJECT}:EU.{job}"),
            "jobReference": {"projectId": PROJECT, "jobId": job, "location": "EU"},
            "status": {"state": "DONE"},
            "configuration": {"jobType": "QUERY", "query": {"query": MODEL_SQL, "useLegacySql": false,
                "destinationTable": {"projectId": PROJECT, "datasetId": ANON_DATASET, "tableId": ANON_TABLE}}},
            "statistics": {"creationTime": "1700000000000", "query": {"statementType": "SELECT", "totalBytesProcessed": "1024"}}});
        if let Err(e) = discovery_conforms(&api.discovery, "Job", &answer, "Job") {
            api.violation(e);
        }
        return Json(answer).into_response();
    }
    assert_eq!((project.as_str(), job.as_str()), (PROJECT, EXPORT_JOB));
    let answer = json!({"kind": "bigquery#job", "id": format!("{PROJECT}:EU.{EXPORT_JOB}"),
        "jobReference": {"projectId": PROJECT, "jobId": EXPORT_JOB, "location": "EU"},
        "status": {"state": "DONE"},
        "statistics": {"creationTime": "1700000000000", "query": {"statementType": "EXPORT_DATA",
            "exportDataStatistics": {"fileCount": "2", "rowCount": "5"}}}});
    // The answer is held to the discovery document too, so the fields read are BigQuery's.
    if let Err(e) = discovery_conforms(&api.discovery, "Job", &answer, "Job") {
        api.violation(e);
    }
    Json(answer).into_response()
}

fn source(base: &str, project: &str) -> BigQuerySource {
    source_with(base, project, json!({}))
}

fn source_with_credentials(base: &str, credentials: &Value) -> BigQuerySource {
    let config: BigQueryConfig = serde_json::from_value(json!({
        "project": PROJECT,
        "service_account": credentials.to_string(),
        "location": "EU",
        "url": base,
    }))
    .expect("config");
    BigQuerySource::new("bq", config, &ConnectorEnv::rooted_at(std::env::temp_dir())).expect("source")
}

/// A source of the test project with `extra` options set.
fn source_with(base: &str, project: &str, extra: Value) -> BigQuerySource {
    let key = json!({
        "type": "service_account",
        "project_id": PROJECT,
        "private_key_id": "0123456789abcdef",
        "private_key": std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/test_rsa_key.pem")).expect("key"),
        "client_email": CLIENT_EMAIL,
        "token_uri": format!("{base}/token"),
    });
    let mut config = json!({
        "project": project,
        "service_account": key.to_string(),
        "location": "EU",
        "dataset": "analytics",
        "page_rows": 2,
        "url": base,
    });
    for (key, value) in extra.as_object().expect("an object") {
        config[key] = value.clone();
    }
    let config: BigQueryConfig = serde_json::from_value(config).expect("config");
    BigQuerySource::new("bq", config, &ConnectorEnv::rooted_at(std::env::temp_dir())).expect("source")
}

fn model(sql: &str) -> ModelQuery {
    ModelQuery::new("users", sql)
}

#[tokio::test]
async fn a_dry_run_then_the_job_is_polled_and_its_pages_read_in_order() {
    let Some(discovery) = discovery() else {
        return;
    };
    let (api, base) = Api::start(discovery).await;
    let source = source(&base, PROJECT);
    let mut stream = source
        .extract(&model(&format!("{MODEL_SQL};\n")))
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
            "Decimal128(38, 9)",
            "Utf8",
            "Timestamp(µs, \"UTC\")",
            "Utf8",
            "Utf8"
        ]
    );
    let ids = batch.column(0).as_primitive::<arrow::datatypes::Int64Type>();
    assert_eq!(ids.values().to_vec(), vec![1, 2, 3, 4, 5], "pages in order");
    assert!(batch.column(1).is_null(1));
    assert_eq!(
        batch
            .column(1)
            .as_primitive::<arrow::datatypes::Decimal128Type>()
            .value_as_string(0),
        "1.500000000"
    );
    assert_eq!(
        batch
            .column(3)
            .as_primitive::<arrow::datatypes::TimestampMicrosecondType>()
            .value(4),
        1_700_000_000_000_005
    );
    assert_eq!(batch.column(4).as_string::<i32>().value(0), r#"["a","t1"]"#);
    assert_eq!(
        batch.column(5).as_string::<i32>().value(0),
        r#"{"city":"Paris","zip":75001}"#
    );

    let seen = api.seen.lock().unwrap();
    assert!(
        seen.violations.is_empty(),
        "requests outside the discovery document: {:?}",
        seen.violations
    );
    assert_eq!(seen.tokens, 1, "one token for the whole run");
    assert_eq!(seen.bodies.len(), 2);
    assert_eq!(seen.bodies[0]["dryRun"], true, "a dry run first");
    assert_eq!(seen.bodies[1]["dryRun"], false);
    assert_eq!(seen.bodies[1]["query"], MODEL_SQL);
    assert_eq!(
        seen.bodies[1]["defaultDataset"],
        json!({"projectId": PROJECT, "datasetId": "analytics"})
    );
    assert_eq!(seen.bodies[1]["useLegacySql"], false);
    assert_eq!(
        seen.page_tokens,
        vec![
            None,
            None,
            None,
            Some("page-2".to_string()),
            Some("page-3".to_string())
        ],
        "polled until complete (a 429 retried), then the pages by token"
    );
}

#[tokio::test]
async fn writes_missing_tables_and_denied_projects_fail_with_bigquery_own_errors() {
    let Some(discovery) = discovery() else {
        return;
    };
    let (api, base) = Api::start(discovery).await;
    let err = source(&base, PROJECT)
        .extract(&model("DELETE FROM analytics.users WHERE true"))
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("DELETE statement") && err.contains("it was not run"),
        "{err}"
    );
    assert!(
        api.seen
            .lock()
            .unwrap()
            .bodies
            .iter()
            .all(|b| b["dryRun"] == true),
        "only a dry run was sent"
    );

    let err = source(&base, PROJECT)
        .check_query(&model("SELECT * FROM analytics.missing"))
        .await
        .expect_err("missing")
        .to_string();
    assert!(
        err.contains("notFound") && err.contains("HTTP 404") && err.contains("`location`"),
        "{err}"
    );

    let err = source(&base, "someone-elses-project")
        .check()
        .await
        .expect_err("denied")
        .to_string();
    assert!(
        err.contains("accessDenied") && err.contains("roles/bigquery.jobUser"),
        "{err}"
    );
}

#[tokio::test]
async fn a_sync_exports_parquet_to_cloud_storage_that_reads_back_as_the_pages_do() {
    let Some(discovery) = discovery() else {
        return;
    };
    let Some(bucket) = Bucket::new(Provider::Gcs, "bigquery-export").await else {
        return;
    };
    let (api, base) = Api::start(discovery).await;
    assert!(api.export.set((bucket.store(), bucket.name.clone())).is_ok());
    let paged = sorted(
        source(&base, PROJECT)
            .extract(&model(MODEL_SQL))
            .await
            .expect("pages"),
    )
    .await;
    assert_eq!(paged.num_rows(), 5);

    let options: serde_json::Map<String, Value> = bucket
        .options()
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    let source = source_with(
        &base,
        PROJECT,
        json!({"unload": {"url": bucket.url("exports/"), "options": options}}),
    );
    let mut query = model(MODEL_SQL);
    query.bulk = true;
    let exported = sorted(source.extract(&query).await.expect("export")).await;
    assert_eq!(
        exported, paged,
        "exported Parquet reads as the same types and values as the pages, records and arrays as the same JSON"
    );
    assert_eq!(
        bucket.list("").await,
        Vec::<String>::new(),
        "files are deleted once read"
    );

    let seen = api.seen.lock().unwrap();
    assert!(
        seen.violations.is_empty(),
        "outside the discovery document: {:?}",
        seen.violations
    );
    let export = seen.bodies.last().expect("bodies");
    assert_eq!(export["dryRun"], false);
    assert!(
        export["query"].as_str().is_some_and(|q| q.starts_with(&format!(
            "EXPORT DATA OPTIONS (uri = '{}users/",
            bucket.url("exports/")
        ))),
        "{export}"
    );
    assert_eq!(
        seen.bodies[seen.bodies.len() - 2]["dryRun"],
        true,
        "a dry run first"
    );
}

#[tokio::test]
async fn workload_identity_federation_exchanges_the_workload_token_then_impersonates() {
    let Some(discovery) = discovery() else {
        return;
    };
    let (api, base) = Api::start(discovery).await;
    let dir = tempfile::tempdir().expect("dir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{SUBJECT_TOKEN}\n")).expect("token file");
    let federation = json!({
        "type": "external_account",
        "audience": AUDIENCE,
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "token_url": format!("{base}/sts/v1/token"),
        "service_account_impersonation_url":
            format!("{base}/iam/v1/projects/-/serviceAccounts/{CLIENT_EMAIL}:generateAccessToken"),
        "credential_source": {"file": token_file.display().to_string(), "format": {"type": "text"}},
    });
    let source = source_with_credentials(&base, &federation);
    source
        .check()
        .await
        .expect("a dry run with the impersonated token");
    source.check().await.expect("again, with the cached token");
    {
        let seen = api.seen.lock().unwrap();
        assert_eq!(seen.exchanges.len(), 1, "one exchange, then the token is cached");
        assert_eq!(seen.impersonations.len(), 1);
        assert_eq!(seen.impersonations[0]["lifetime"], "3600s");
    }

    // A workload the pool does not trust: STS's refusal, with what to check.
    std::fs::write(&token_file, "another-token").expect("token file");
    let error = source_with_credentials(&base, &federation)
        .check()
        .await
        .expect_err("refused")
        .to_string();
    assert!(
        error.contains("Google STS refused")
            && error.contains("invalid_request")
            && error.contains("audience"),
        "{error}"
    );
}

#[tokio::test]
async fn without_credentials_tokens_come_from_the_metadata_server() {
    let Some(discovery) = discovery() else {
        return;
    };
    let (api, base) = Api::start(discovery).await;
    let project = crate::common::TestProject::new(&format!(
        r#"state_dir: .sluice
sources:
  bq:
    type: bigquery
    project: {PROJECT}
    location: EU
    dataset: analytics
    url: {base}
models:
  users:
    source: bq
    sql: "{MODEL_SQL}"
    primary_key: id
"#
    ));
    let host = base.trim_start_matches("http://").to_string();
    let output = project
        .sluice_with_env(&["check", "bq"], &[("GCE_METADATA_HOST", host.as_str())])
        .await;
    assert!(
        output.status.success(),
        "{}\n{}",
        crate::common::stdout(&output),
        crate::common::stderr(&output)
    );
    assert!(api.seen.lock().unwrap().metadata_tokens >= 1);

    // Off Google Cloud, the error says where the token was looked for.
    let output = project
        .sluice_with_env(&["check", "bq"], &[("GCE_METADATA_HOST", "127.0.0.1:9")])
        .await;
    assert!(!output.status.success());
    let said = crate::common::stderr(&output) + &crate::common::stdout(&output);
    assert!(said.contains("metadata server"), "{said}");
}

// ---------------------------------------------------------------------------------------------
// The Storage Read API: `google.cloud.bigquery.storage.v1.BigQueryRead` over gRPC

const SESSION: &str = "projects/sluice-test/locations/eu/sessions/CAISDmFub24tc2Vzc2lvbg";

/// The routing header and bearer token every Storage Read API call must carry.
fn storage_metadata_error<T>(request: &tonic::Request<T>, routing: &str) -> Option<tonic::Status> {
    let metadata = request.metadata();
    if metadata.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer ya29.sluice-test") {
        return Some(tonic::Status::unauthenticated(
            "Request had invalid authentication credentials. Expected OAuth 2 access token.",
        ));
    }
    if metadata
        .get("x-goog-request-params")
        .and_then(|v| v.to_str().ok())
        != Some(routing)
    {
        return Some(tonic::Status::invalid_argument(format!(
            "missing or wrong x-goog-request-params; expected {routing}"
        )));
    }
    None
}

/// An IPC stream of `batches`, split as the API sends it: the schema message, then each batch's.
fn ipc_messages(batches: &[RecordBatch]) -> (bytes::Bytes, Vec<(bytes::Bytes, i64)>) {
    let mut writer =
        arrow::ipc::writer::StreamWriter::try_new(Vec::new(), &batches[0].schema()).expect("ipc");
    let schema = bytes::Bytes::from(writer.get_ref().clone());
    let mut messages = Vec::new();
    for batch in batches {
        let before = writer.get_ref().len();
        writer.write(batch).expect("write");
        messages.push((
            bytes::Bytes::from(writer.get_ref()[before..].to_vec()),
            batch.num_rows() as i64,
        ));
    }
    (schema, messages)
}

/// The two streams of the session: rows 1-3 in two responses, rows 4-5 in one.
fn stream_batches(stream: &str) -> Vec<RecordBatch> {
    match stream.rsplit('/').next() {
        Some("0") => vec![users_arrow(&[1, 2]), users_arrow(&[3])],
        Some("1") => vec![users_arrow(&[4, 5])],
        other => panic!("no stream {other:?}"),
    }
}

async fn create_read_session(
    api: Api,
    request: tonic::Request<CreateReadSessionRequest>,
) -> Result<tonic::Response<ReadSession>, tonic::Status> {
    let table = format!("projects/{PROJECT}/datasets/{ANON_DATASET}/tables/{ANON_TABLE}");
    if let Some(refusal) = storage_metadata_error(&request, &format!("read_session.table={table}")) {
        return Err(refusal);
    }
    let message = request.into_inner();
    api.seen.lock().unwrap().sessions.push(message.clone());
    if api.storage_denied.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(tonic::Status::permission_denied(format!(
            "request failed: the user does not have 'bigquery.readsessions.create' permission for 'projects/{PROJECT}'"
        )));
    }
    let session = message.read_session.clone().unwrap_or_default();
    if message.parent != format!("projects/{PROJECT}") || session.table != table || session.data_format != 2 {
        return Err(tonic::Status::invalid_argument(format!(
            "unexpected session request {message:?}"
        )));
    }
    let (schema, _) = ipc_messages(&[users_arrow(&[1])]);
    Ok(tonic::Response::new(ReadSession {
        name: SESSION.into(),
        data_format: 2,
        arrow_schema: Some(ArrowSchema {
            serialized_schema: schema,
        }),
        table,
        streams: (0..2)
            .map(|i| ReadStream {
                name: format!("{SESSION}/streams/{i}"),
            })
            .collect(),
    }))
}

type ReadRowsStream = futures::stream::BoxStream<'static, Result<ReadRowsResponse, tonic::Status>>;

async fn read_rows(
    api: Api,
    request: tonic::Request<ReadRowsRequest>,
) -> Result<tonic::Response<ReadRowsStream>, tonic::Status> {
    let stream = request.get_ref().read_stream.clone();
    if let Some(refusal) = storage_metadata_error(&request, &format!("read_stream={stream}")) {
        return Err(refusal);
    }
    api.seen.lock().unwrap().streams_read.push(stream.clone());
    let (_, messages) = ipc_messages(&stream_batches(&stream));
    let responses = messages.into_iter().map(|(bytes, rows)| {
        Ok(ReadRowsResponse {
            arrow_record_batch: Some(ArrowRecordBatch {
                serialized_record_batch: bytes,
                row_count: rows,
            }),
            row_count: rows,
        })
    });
    Ok(tonic::Response::new(futures::stream::iter(responses).boxed()))
}

#[derive(Clone)]
struct StorageApi(Api);

impl tonic::server::NamedService for StorageApi {
    const NAME: &'static str = SERVICE;
}

impl tower::Service<axum::http::Request<tonic::body::Body>> for StorageApi {
    type Response = axum::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: axum::http::Request<tonic::body::Body>) -> Self::Future {
        let api = self.0.clone();
        Box::pin(async move {
            Ok(match request.uri().path() {
                "/google.cloud.bigquery.storage.v1.BigQueryRead/CreateReadSession" => {
                    let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                    let service = tower::service_fn(move |r| create_read_session(api.clone(), r));
                    grpc.unary(service, request).await
                }
                "/google.cloud.bigquery.storage.v1.BigQueryRead/ReadRows" => {
                    let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                    let service = tower::service_fn(move |r| read_rows(api.clone(), r));
                    grpc.server_streaming(service, request).await
                }
                _ => tonic::Status::unimplemented("not a BigQueryRead method").into_http(),
            })
        })
    }
}

/// The Storage Read API on loopback (plain HTTP/2): its `storage_url`.
async fn start_storage_api(api: &Api) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("addr");
    let service = StorageApi(api.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
            .ok()
    });
    format!("http://{address}")
}

#[tokio::test]
async fn a_sync_reads_the_result_table_through_the_storage_read_api_in_parallel_streams() {
    let Some(discovery) = discovery() else {
        return;
    };
    let (api, base) = Api::start(discovery).await;
    let storage_url = start_storage_api(&api).await;
    let source = source_with(
        &base,
        PROJECT,
        json!({"storage_url": storage_url, "read_streams": 2}),
    );
    // A preview reads pages: only a sync's whole result goes through a read session.
    let paged = sorted(source.extract(&model(MODEL_SQL)).await.expect("pages")).await;
    assert!(api.seen.lock().unwrap().sessions.is_empty());

    let mut query = model(MODEL_SQL);
    query.bulk = true;
    let streamed = sorted(source.extract(&query).await.expect("storage read")).await;
    assert_eq!(
        streamed, paged,
        "Arrow from the Storage Read API reads as the same types and values as the pages"
    );
    {
        let seen = api.seen.lock().unwrap();
        assert!(seen.violations.is_empty(), "{:?}", seen.violations);
        assert_eq!(seen.sessions.len(), 1);
        assert_eq!(seen.sessions[0].max_stream_count, 2);
        let mut streams = seen.streams_read.clone();
        streams.sort();
        assert_eq!(
            streams,
            vec![format!("{SESSION}/streams/0"), format!("{SESSION}/streams/1")]
        );
    }

    // Without the permission, the result is read through pages, whole.
    api.storage_denied
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let fallback = sorted(source.extract(&query).await.expect("pages after a refusal")).await;
    assert_eq!(fallback, paged);
    assert_eq!(api.seen.lock().unwrap().sessions.len(), 2);
}
