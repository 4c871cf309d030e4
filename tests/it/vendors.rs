//! Vendor destinations end to end through the `sluice` binary, against local servers (on
//! 127.0.0.1, started by the test) that check each vendor's request shape and answer with the
//! vendor's own response shapes: success, partial failure, 429 and 5xx. Mixpanel's requests
//! are validated against Mixpanel's published OpenAPI document.

use std::collections::HashSet;
use std::io::Read as _;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::common::{TestProject, User, result_row, stderr, stdout, user};

/// One request a mock vendor received.
#[derive(Debug, Clone)]
pub struct VendorRequest {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub headers: HeaderMap,
    /// The body, gunzipped when it was sent gzipped, parsed as JSON.
    pub body: Value,
    pub gzipped: bool,
}

impl VendorRequest {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }
}

type VendorResponder = Box<dyn FnMut(&VendorRequest) -> Response + Send>;

#[derive(Clone)]
struct VendorState {
    received: Arc<Mutex<Vec<VendorRequest>>>,
    responder: Arc<Mutex<VendorResponder>>,
}

/// A local stand-in for a vendor's API: records every request, answers as told.
pub struct MockVendor {
    pub url: String,
    state: VendorState,
    _server: tokio::task::JoinHandle<()>,
}

impl MockVendor {
    pub async fn start(responder: impl FnMut(&VendorRequest) -> Response + Send + 'static) -> Self {
        let state = VendorState {
            received: Arc::new(Mutex::new(Vec::new())),
            responder: Arc::new(Mutex::new(Box::new(responder))),
        };
        let app = Router::new().fallback(record).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("mock vendor");
        });
        Self {
            url,
            state,
            _server: server,
        }
    }

    pub fn respond_with(&self, responder: impl FnMut(&VendorRequest) -> Response + Send + 'static) {
        *self.state.responder.lock().expect("lock") = Box::new(responder);
    }

    pub fn take(&self) -> Vec<VendorRequest> {
        std::mem::take(&mut *self.state.received.lock().expect("lock"))
    }
}

async fn record(
    State(state): State<VendorState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let gzipped = headers.get("content-encoding").and_then(|v| v.to_str().ok()) == Some("gzip");
    let bytes = if gzipped {
        let mut out = Vec::new();
        if flate2::read::GzDecoder::new(&body[..])
            .read_to_end(&mut out)
            .is_err()
        {
            return (StatusCode::BAD_REQUEST, "bad gzip").into_response();
        }
        out
    } else {
        body.to_vec()
    };
    let form = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.starts_with("application/x-www-form-urlencoded")
                || v.starts_with("text/csv")
                || v.starts_with("text/xml")
        });
    let body = if bytes.is_empty() {
        Value::Null
    } else if form {
        Value::String(String::from_utf8_lossy(&bytes).into_owned())
    } else {
        match serde_json::from_slice(&bytes) {
            Ok(body) => body,
            Err(_) => return (StatusCode::BAD_REQUEST, "Invalid JSON").into_response(),
        }
    };
    let request = VendorRequest {
        method,
        path: uri.path().to_string(),
        query: uri.query().unwrap_or_default().to_string(),
        headers,
        body,
        gzipped,
    };
    let response = (state.responder.lock().expect("lock"))(&request);
    state.received.lock().expect("lock").push(request);
    response
}

fn users() -> Vec<User> {
    vec![
        user(1, "ada@example.com", "free", 10),
        user(2, "grace@example.com", "pro", 20),
        user(3, "linus@example.com", "free", 30),
        user(4, "ken@example.com", "starter", 40),
    ]
}

fn project(destination: &str, mapping: &str) -> TestProject {
    project_with_model(
        "SELECT id, email, plan, lead_score, lifetime_value FROM users",
        destination,
        mapping,
    )
}

/// A project whose model `users` (key `id`) runs `sql` over `data/users.parquet`, with these
/// destinations and mappings.
pub fn project_with_model(sql: &str, destination: &str, mapping: &str) -> TestProject {
    TestProject::new(&format!(
        r#"sources:
  warehouse:
    type: files
    tables:
      users: data/users.parquet
models:
  users:
    source: warehouse
    sql: {sql}
    primary_key: id
destinations:
{destination}
mappings:
{mapping}
"#
    ))
}

// ---------------------------------------------------------------------------------------------
// Segment

fn segment_project(url: &str) -> TestProject {
    project(
        &format!(
            r#"  segment:
    type: segment
    write_key: wk_test
    url: {url}
    delivery: {{ batch_size: 2, initial_backoff: 10ms, max_backoff: 20ms }}"#
        ),
        r#"  users_to_segment:
    model: users
    destination: segment
    action: identify
    fields: { userId: email, "context.source": plan }
    columns: { include: [lead_score] }"#,
    )
}

/// Segment's own answer to a batch: 200 `{"success": true}`, or 400 for a bad message.
fn segment_ok(request: &VendorRequest) -> Response {
    let batch = request.body["batch"].as_array().cloned().unwrap_or_default();
    let well_formed = request.method == Method::POST
        && request.path == "/v1/batch"
        && request.header("authorization") == "Basic d2tfdGVzdDo="
        && request.header("content-type") == "application/json"
        && request.body["sentAt"].is_string()
        && !batch.is_empty()
        && batch.iter().all(|m| {
            m["type"] == "identify"
                && (m["userId"].is_string() || m["anonymousId"].is_string())
                && m["messageId"].as_str().is_some_and(|id| id.len() == 36)
                && m["traits"].is_object()
        });
    if well_formed {
        Json(json!({"success": true}))
    } else {
        (
            StatusCode::BAD_REQUEST,
            Json(json!({"code": "invalid_request", "message": "Invalid message"})),
        )
            .into_response()
    }
}

#[allow(non_snake_case)]
fn Json(value: Value) -> Response {
    axum::Json(value).into_response()
}

fn messages(requests: &[VendorRequest]) -> Vec<Value> {
    let mut all: Vec<Value> = requests
        .iter()
        .flat_map(|r| r.body["batch"].as_array().cloned().unwrap_or_default())
        .collect();
    all.sort_by_key(|m| m["userId"].as_str().unwrap_or_default().to_string());
    all
}

#[tokio::test]
async fn segment_identify_sends_spec_messages_and_splits_a_refused_batch() {
    let vendor = MockVendor::start(segment_ok).await;
    let project = segment_project(&vendor.url);
    let mut rows = users();
    rows[3].email = None; // no userId: fails unsent
    project.write_users(&rows);

    let output = project.sluice(&["run"]).await;
    assert_eq!(
        output.status.code(),
        Some(2),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );
    let requests = vendor.take();
    let sent = messages(&requests);
    assert_eq!(sent.len(), 3);
    let ada = &sent[0];
    assert_eq!(ada["userId"], "ada@example.com");
    assert_eq!(ada["context"], json!({"source": "free"}));
    assert_eq!(ada["traits"], json!({"lead_score": 10}));
    assert_eq!(ada["type"], "identify");
    // The record without an identifier is a failed record with the reason.
    let runs = project.sluice(&["runs", "--failures", "5"]).await;
    assert!(
        stdout(&runs).contains("no value for userId or anonymousId"),
        "{}",
        stdout(&runs)
    );

    // Second run: ken gets an email; grace changes plan, and Segment refuses grace's message
    // (a batch holding it gets a 400): the batch is split and only grace fails.
    rows[3].email = Some("ken@example.com");
    rows[1].plan = "enterprise";
    project.write_users(&rows);
    vendor.respond_with(|request: &VendorRequest| {
        let has_grace = request.body["batch"]
            .as_array()
            .is_some_and(|b| b.iter().any(|m| m["userId"] == "grace@example.com"));
        if has_grace {
            (
                StatusCode::BAD_REQUEST,
                Json(json!({"code": "invalid", "message": "bad message"})),
            )
                .into_response()
        } else {
            segment_ok(request)
        }
    });
    let output = project.sluice(&["run"]).await;
    assert_eq!(
        output.status.code(),
        Some(2),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );
    let requests = vendor.take();
    let (refused, accepted): (Vec<VendorRequest>, Vec<VendorRequest>) = requests
        .into_iter()
        .partition(|r| r.body["batch"].to_string().contains("grace@example.com"));
    // [grace, ken] refused, then split: [grace] refused, [ken] accepted.
    assert_eq!(refused.len(), 2, "{refused:?}");
    let accepted = messages(&accepted);
    assert_eq!(accepted.len(), 1);
    assert_eq!(accepted[0]["userId"], "ken@example.com");
    let row = result_row(&output, "users_to_segment");
    assert!(row.contains(&"1".to_string()), "{row:?}");

    // Third run: rate limited twice (429 with Retry-After), then accepted: grace is retried
    // and delivered, and the 429s are not failures.
    let limited = Arc::new(Mutex::new(0));
    let count = limited.clone();
    vendor.respond_with(move |request: &VendorRequest| {
        let mut n = count.lock().expect("lock");
        if *n < 2 {
            *n += 1;
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", "0")],
                Json(json!({"code": "rate_limited"})),
            )
                .into_response();
        }
        segment_ok(request)
    });
    let output = project.sluice(&["run"]).await;
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );
    // The same request three times: twice rate limited, then accepted.
    let sent = messages(&vendor.take());
    assert_eq!(sent.len(), 3);
    assert!(
        sent.iter()
            .all(|m| m["userId"] == "grace@example.com" && m["messageId"] == sent[0]["messageId"])
    );
    assert_eq!(sent[0]["context"]["source"], "enterprise");
    assert_eq!(*limited.lock().expect("lock"), 2);
}

#[tokio::test]
async fn segment_validation_names_the_mapping_and_the_problem() {
    let vendor = MockVendor::start(segment_ok).await;
    let project = project(
        &format!(
            "  segment:\n    type: segment\n    write_key: wk_test\n    url: {}",
            vendor.url
        ),
        "  m:\n    model: users\n    destination: segment\n    action: alias\n",
    );
    project.write_users(&users());
    let output = project.sluice(&["run"]).await;
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(
        err.contains("mapping `m`: unknown action `alias`; the segment destination offers identify, track, group, page, screen"),
        "{err}"
    );

    let project = self::project(
        &format!(
            "  segment:\n    type: segment\n    write_key: wk_test\n    url: {}",
            vendor.url
        ),
        "  m:\n    model: users\n    destination: segment\n    action: track\n    send: [added, deleted]\n",
    );
    project.write_users(&users());
    let output = project.sluice(&["run"]).await;
    let err = stderr(&output);
    assert!(err.contains("cannot delete records"), "{err}");
    assert!(vendor.take().is_empty());
}

// ---------------------------------------------------------------------------------------------
// HubSpot

fn hubspot_project(url: &str, mode: &str) -> TestProject {
    project(
        &format!(
            r#"  hubspot:
    type: hubspot
    token: pat-na1-test
    url: {url}
    delivery: {{ batch_size: 2, initial_backoff: 10ms, max_backoff: 20ms }}"#
        ),
        &format!(
            r#"  contacts:
    model: users
    destination: hubspot
    mode: {mode}
    options: {{ object: contacts, id_property: email }}
    fields: {{ email: email, plan: plan, hs_lead_score: lead_score }}"#
        ),
    )
}

/// HubSpot's batch endpoints, holding contacts by email.
fn hubspot_server(
    contacts: Arc<Mutex<std::collections::BTreeMap<String, Value>>>,
    refuse: HashSet<String>,
) -> impl FnMut(&VendorRequest) -> Response + Send + 'static {
    move |request: &VendorRequest| {
        if request.header("authorization") != "Bearer pat-na1-test" {
            return (
                StatusCode::UNAUTHORIZED,
                Json(json!({"status": "error", "message": "Authentication credentials not found.", "category": "INVALID_AUTHENTICATION", "correlationId": "c0"})),
            )
                .into_response();
        }
        let inputs = request.body["inputs"].as_array().cloned().unwrap_or_default();
        let mut contacts = contacts.lock().expect("lock");
        match request.path.as_str() {
            "/crm/v3/objects/contacts/batch/upsert" => {
                let mut results = Vec::new();
                let mut errors = Vec::new();
                for input in &inputs {
                    assert_eq!(input["idProperty"], "email", "{input}");
                    let id = input["id"].as_str().expect("id").to_string();
                    assert_eq!(input["properties"]["email"], id.as_str());
                    if refuse.contains(&id) {
                        errors.push(json!({"status": "error", "category": "VALIDATION_ERROR", "message": format!("Property values were not valid: {id}"), "context": {"ids": [id]}}));
                        continue;
                    }
                    contacts.insert(id.clone(), input["properties"].clone());
                    results.push(json!({"id": format!("hs-{id}"), "properties": input["properties"], "new": true, "archived": false}));
                }
                let body = json!({"status": "COMPLETE", "results": results, "startedAt": "2026-11-22T00:00:00Z", "completedAt": "2026-11-22T00:00:01Z", "numErrors": errors.len(), "errors": errors});
                let status = if errors.is_empty() {
                    StatusCode::OK
                } else {
                    StatusCode::MULTI_STATUS
                };
                (status, Json(body)).into_response()
            }
            "/crm/v3/objects/contacts/batch/read" => {
                assert_eq!(request.body["idProperty"], "email");
                let results: Vec<Value> = inputs
                    .iter()
                    .filter_map(|i| i["id"].as_str())
                    .filter(|id| contacts.contains_key(*id))
                    .map(|id| json!({"id": format!("hs-{id}"), "properties": {"email": id}}))
                    .collect();
                Json(json!({"status": "COMPLETE", "results": results}))
            }
            "/crm/v3/objects/contacts/batch/archive" => {
                for input in &inputs {
                    let id = input["id"].as_str().expect("id");
                    let email = id.strip_prefix("hs-").expect("internal id");
                    contacts.remove(email);
                }
                StatusCode::NO_CONTENT.into_response()
            }
            _ => (
                StatusCode::NOT_FOUND,
                Json(json!({"status": "error", "message": "not found"})),
            )
                .into_response(),
        }
    }
}

#[tokio::test]
async fn hubspot_mirror_upserts_archives_and_maps_207_errors_to_records() {
    let contacts = Arc::new(Mutex::new(std::collections::BTreeMap::new()));
    let refuse: HashSet<String> = ["linus@example.com".to_string()].into();
    let vendor = MockVendor::start(hubspot_server(contacts.clone(), refuse)).await;
    let project = hubspot_project(&vendor.url, "mirror");
    let mut rows = users();
    project.write_users(&rows);
    let output = project.sluice(&["run"]).await;
    assert_eq!(
        output.status.code(),
        Some(2),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );
    assert_eq!(
        contacts.lock().expect("lock").keys().cloned().collect::<Vec<_>>(),
        ["ada@example.com", "grace@example.com", "ken@example.com"]
    );
    assert_eq!(
        contacts.lock().expect("lock")["ada@example.com"],
        json!({"email": "ada@example.com", "plan": "free", "hs_lead_score": 10})
    );
    let runs = project.sluice(&["runs", "--failures", "5"]).await;
    assert!(stdout(&runs).contains("VALIDATION_ERROR"), "{}", stdout(&runs));
    vendor.take();

    // Ada leaves the model: mirror archives her (looked up by email first).
    rows.remove(0);
    project.write_users(&rows);
    let output = project.sluice(&["run"]).await;
    let paths: Vec<String> = vendor.take().into_iter().map(|r| r.path).collect();
    assert!(
        paths.contains(&"/crm/v3/objects/contacts/batch/read".to_string()),
        "{paths:?}"
    );
    assert!(
        paths.contains(&"/crm/v3/objects/contacts/batch/archive".to_string()),
        "{paths:?}"
    );
    assert!(
        !contacts.lock().expect("lock").contains_key("ada@example.com"),
        "{}",
        stdout(&output)
    );
}

#[tokio::test]
async fn hubspot_refused_credentials_stop_the_run_with_what_to_do() {
    let contacts = Arc::new(Mutex::new(std::collections::BTreeMap::new()));
    let vendor = MockVendor::start(hubspot_server(contacts, HashSet::new())).await;
    let project = hubspot_project(&vendor.url, "upsert");
    let config = std::fs::read_to_string(project.config_path()).expect("config");
    let config = config
        .replace("pat-na1-test", "pat-na1-expired")
        .replace("batch_size: 2,", "batch_size: 2, concurrency: 1,");
    std::fs::write(project.config_path(), config).expect("write");
    project.write_users(&users());
    let output = project.sluice(&["run"]).await;
    assert_eq!(output.status.code(), Some(1));
    let runs = project.sluice(&["runs"]).await;
    let text = format!("{}{}", stdout(&output), stdout(&runs));
    assert!(text.contains("401"), "{text}");
    // Stopped at the first refusal, not one request per batch.
    assert_eq!(vendor.take().len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Mixpanel, validated against Mixpanel's OpenAPI document

/// OpenAPI 3.0's `nullable: true` as JSON Schema's `type: [T, "null"]`.
fn nullable_to_json_schema(value: &mut Value) {
    match value {
        Value::Object(map) => {
            if map.remove("nullable") == Some(Value::Bool(true))
                && let Some(Value::String(t)) = map.get("type").cloned()
            {
                map.insert("type".into(), json!([t, "null"]));
            }
            map.remove("example");
            map.values_mut().for_each(nullable_to_json_schema);
        }
        Value::Array(items) => items.iter_mut().for_each(nullable_to_json_schema),
        _ => {}
    }
}

/// The request body schema of `path` (`/import`, `/engage#profile-set`) in Mixpanel's spec.
fn mixpanel_schema(path: &str) -> jsonschema::Validator {
    let file = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/vendor-specs/mixpanel-ingestion.openapi.yaml"
    );
    let text = std::fs::read_to_string(file).expect("Mixpanel's OpenAPI document in ../shared/vendor-specs");
    let mut spec: Value = serde_norway::from_str(&text).expect("spec parses");
    nullable_to_json_schema(&mut spec);
    let mut schema =
        spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"].clone();
    assert!(schema.is_object(), "no request schema for {path}");
    schema["components"] = spec["components"].clone();
    jsonschema::validator_for(&schema).expect("schema compiles")
}

fn assert_valid(validator: &jsonschema::Validator, body: &Value) {
    let errors: Vec<String> = validator
        .iter_errors(body)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "request does not match Mixpanel's spec: {errors:?}\n{body:#}"
    );
}

#[tokio::test]
async fn mixpanel_import_matches_the_spec_and_reports_refused_events() {
    let import = mixpanel_schema("/import");
    assert!(!import.is_valid(&json!([{"event": "x", "properties": {"distinct_id": "1"}}])));
    let vendor = MockVendor::start(move |request: &VendorRequest| {
        assert_eq!(request.path, "/import");
        assert!(request.query.contains("strict=1") && request.query.contains("project_id=42"), "{}", request.query);
        assert_eq!(request.header("authorization"), "Basic c3ZjOnMzY3JldA==");
        assert!(request.gzipped, "events are gzipped");
        assert_valid(&import, &request.body);
        let events = request.body.as_array().cloned().unwrap_or_default();
        let failed: Vec<Value> = events
            .iter()
            .enumerate()
            .filter(|(_, e)| e["properties"]["distinct_id"] == "3")
            .map(|(i, e)| json!({"index": i, "insert_id": e["properties"]["$insert_id"], "field": "properties.plan", "message": "'properties.plan' is invalid"}))
            .collect();
        if failed.is_empty() {
            Json(json!({"code": 200, "num_records_imported": events.len(), "status": "OK"}))
        } else {
            (
                StatusCode::BAD_REQUEST,
                Json(json!({"code": 400, "num_records_imported": events.len() - failed.len(), "status": "Bad Request", "failed_records": failed})),
            )
                .into_response()
        }
    })
    .await;
    let project = project(
        &format!(
            r#"  mixpanel:
    type: mixpanel
    url: {}
    project_id: "42"
    service_account: {{ username: svc, secret: s3cret }}"#,
            vendor.url
        ),
        r#"  signups:
    model: users
    destination: mixpanel
    action: track
    fields: { distinct_id: id, time: signed_up_at }
    constants: { event: Signed Up }
    columns: { include: [plan] }"#,
    );
    let config = std::fs::read_to_string(project.config_path()).expect("config");
    std::fs::write(
        project.config_path(),
        config.replace(
            "SELECT id, email, plan, lead_score, lifetime_value FROM users",
            "SELECT id, email, plan, to_timestamp_seconds(1793527200 + id * 3600) AS signed_up_at FROM users",
        ),
    )
    .expect("write");
    project.write_users(&users());
    let output = project.sluice(&["run"]).await;
    assert_eq!(
        output.status.code(),
        Some(2),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );
    let requests = vendor.take();
    let events: Vec<Value> = requests
        .iter()
        .flat_map(|r| r.body.as_array().cloned().unwrap_or_default())
        .collect();
    assert_eq!(events.len(), 4);
    let first = events
        .iter()
        .find(|e| e["properties"]["distinct_id"] == "1")
        .expect("event of user 1");
    assert_eq!(first["event"], "Signed Up");
    assert_eq!(first["properties"]["time"], 1_793_527_200_000i64 + 3_600_000);
    assert_eq!(first["properties"]["plan"], "free");
    let runs = project.sluice(&["runs", "--failures", "5"]).await;
    assert!(
        stdout(&runs).contains("'properties.plan' is invalid"),
        "{}",
        stdout(&runs)
    );
}

#[tokio::test]
async fn mixpanel_profiles_set_and_delete_match_the_spec() {
    let set = mixpanel_schema("/engage#profile-set");
    let delete = mixpanel_schema("/engage#profile-delete");
    let vendor = MockVendor::start(move |request: &VendorRequest| {
        assert_eq!(request.path, "/engage");
        for item in request.body.as_array().cloned().unwrap_or_default() {
            assert_eq!(item["$token"], "tok");
            let validator = if item.get("$delete").is_some() {
                &delete
            } else {
                &set
            };
            assert_valid(validator, &json!([item]));
        }
        Json(json!({"status": 1, "error": null}))
    })
    .await;
    let project = project(
        &format!(
            "  mixpanel:\n    type: mixpanel\n    url: {}\n    project_token: tok",
            vendor.url
        ),
        "  profiles:\n    model: users\n    destination: mixpanel\n    action: profile\n    mode: mirror\n    fields: { distinct_id: email, $email: email, plan: plan }\n",
    );
    let mut rows = users();
    project.write_users(&rows);
    let output = project.sluice(&["run"]).await;
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );
    let items: Vec<Value> = vendor
        .take()
        .iter()
        .flat_map(|r| r.body.as_array().cloned().unwrap_or_default())
        .collect();
    assert_eq!(items.len(), 4);
    assert_eq!(items[0]["$distinct_id"], "ada@example.com");
    assert_eq!(
        items[0]["$set"],
        json!({"$email": "ada@example.com", "plan": "free"})
    );

    rows.remove(0);
    project.write_users(&rows);
    let output = project.sluice(&["run"]).await;
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );
    let items: Vec<Value> = vendor
        .take()
        .iter()
        .flat_map(|r| r.body.as_array().cloned().unwrap_or_default())
        .collect();
    assert_eq!(
        items,
        [json!({"$token": "tok", "$delete": null, "$distinct_id": "ada@example.com"})]
    );
}

// ---------------------------------------------------------------------------------------------
// Dry runs and test records

#[tokio::test]
async fn dry_run_writes_the_requests_and_sends_and_commits_nothing() {
    let vendor = MockVendor::start(segment_ok).await;
    let project = segment_project(&vendor.url);
    project.write_users(&users());
    let output = project.sluice(&["run", "--dry-run", "users_to_segment"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let lines: Vec<Value> = stdout(&output)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 2, "4 records in batches of 2");
    let request = &lines[0]["request"];
    assert_eq!(request["method"], "POST");
    assert!(
        request["target"]
            .as_str()
            .unwrap_or_default()
            .ends_with("/v1/batch")
    );
    assert_eq!(request["records"], 2);
    assert_eq!(request["body"]["batch"][0]["type"], "identify");
    assert!(
        !request.to_string().contains("d2tfdGVzdDo"),
        "no credentials in the output"
    );
    assert!(
        stderr(&output).contains("would send 4 record(s) in 2 request(s)"),
        "{}",
        stderr(&output)
    );
    assert!(vendor.take().is_empty(), "a dry run sends nothing");

    // Nothing was committed: a real run still sends everything.
    let output = project.sluice(&["run"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(messages(&vendor.take()).len(), 4);

    // The test record for key 2.
    let output = project
        .sluice(&["preview-payload", "users_to_segment", "--key", "2"])
        .await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let preview: Value = serde_json::from_str(&stdout(&output)).expect("JSON");
    assert_eq!(preview["key"], json!({"id": 2}));
    let message = &preview["requests"][0]["body"]["batch"][0];
    assert_eq!(message["userId"], "grace@example.com");
    assert_eq!(message["traits"], json!({"lead_score": 20}));
    let output = project
        .sluice(&["preview-payload", "users_to_segment", "--key", "99"])
        .await;
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("no row with key 99"),
        "{}",
        stderr(&output)
    );
    assert!(vendor.take().is_empty());
}

/// The exact requests of each vendor for the same rows, pinned (reviewed with `cargo insta`).
#[tokio::test]
async fn vendor_payloads_are_pinned() {
    let project = project(
        r#"  hubspot:
    type: hubspot
    token: pat-na1-test
    url: http://127.0.0.1:9
  mixpanel:
    type: mixpanel
    url: http://127.0.0.1:9
    project_token: tok
    api_secret: secret
  app_db:
    type: postgres
    url: postgres://postgres@127.0.0.1:9/test
  meta:
    type: meta
    access_token: meta-token-never-shown
    pixel_id: "1234567890"
    url: http://127.0.0.1:9"#,
        r#"  contacts:
    model: users
    destination: hubspot
    options: { object: contacts }
    fields: { email: email, plan: plan, hs_lead_score: lead_score }
  profiles:
    model: users
    destination: mixpanel
    action: profile
    fields: { distinct_id: id, plan: plan, ltv: lifetime_value }
  events:
    model: users
    destination: mixpanel
    action: track
    fields: { distinct_id: id, time: lead_score }
    constants: { event: Lead Scored, "properties.source": sluice }
  table:
    model: users
    destination: app_db
    mode: mirror
    fields: { id: id, email: email, "traits.plan": plan }
  conversions:
    model: users
    destination: meta
    action: conversions
    fields: { event_time: lead_score, user_data.em: email, user_data.external_id: id, value: lifetime_value }
    constants: { event_name: Lead, action_source: system_generated }"#,
    );
    project.write_users(&users()[..2]);
    let output = project.sluice(&["run", "--dry-run"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let lines: Vec<Value> = stdout(&output)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert!(
        !stdout(&output).contains("meta-token-never-shown"),
        "the token is hidden in dry runs"
    );
    insta::assert_json_snapshot!(lines);
}

// ---------------------------------------------------------------------------------------------
// Braze, Iterable, Customer.io

fn items(requests: &[VendorRequest], array: &str) -> Vec<Value> {
    requests
        .iter()
        .flat_map(|r| r.body[array].as_array().cloned().unwrap_or_default())
        .collect()
}

#[tokio::test]
async fn braze_attributes_update_only_flags_per_object_errors_and_deletes() {
    let vendor = MockVendor::start(|request: &VendorRequest| {
        assert_eq!(request.header("authorization"), "Bearer braze-key");
        match request.path.as_str() {
            "/users/track" => {
                let attributes = request.body["attributes"].as_array().cloned().unwrap_or_default();
                assert!(attributes.len() <= 75);
                let errors: Vec<Value> = attributes
                    .iter()
                    .enumerate()
                    .filter(|(_, a)| a["email"] == "linus@example.com")
                    .map(|(i, _)| json!({"type": "'email' is not valid", "input_array": "attributes", "index": i}))
                    .collect();
                let mut body = json!({"message": "success", "attributes_processed": attributes.len() - errors.len()});
                if !errors.is_empty() {
                    body["errors"] = json!(errors);
                }
                Json(body)
            }
            "/users/delete" => Json(json!({"deleted": request.body["external_ids"].as_array().map_or(0, Vec::len), "message": "success"})),
            _ => StatusCode::NOT_FOUND.into_response(),
        }
    })
    .await;
    let project = project(
        &format!(
            "  braze:\n    type: braze\n    api_key: braze-key\n    url: {}",
            vendor.url
        ),
        "  users_to_braze:\n    model: users\n    destination: braze\n    action: attributes\n    mode: mirror\n    fields: { external_id: {column: id, as: string}, email: email, plan: plan }\n",
    );
    let mut rows = users();
    project.write_users(&rows);
    let output = project.sluice(&["run"]).await;
    assert_eq!(
        output.status.code(),
        Some(2),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );
    let sent = items(&vendor.take(), "attributes");
    assert_eq!(sent.len(), 4);
    assert_eq!(
        sent[0],
        json!({"_update_existing_only": false, "external_id": "1", "email": "ada@example.com", "plan": "free"})
    );
    let runs = project.sluice(&["runs", "--failures", "5"]).await;
    assert!(
        stdout(&runs).contains("'email' is not valid"),
        "{}",
        stdout(&runs)
    );

    rows.remove(0);
    project.write_users(&rows);
    let output = project.sluice(&["run"]).await;
    let requests = vendor.take();
    let deletes: Vec<&VendorRequest> = requests.iter().filter(|r| r.path == "/users/delete").collect();
    assert_eq!(deletes.len(), 1, "{}", stdout(&output));
    assert_eq!(deletes[0].body, json!({"external_ids": ["1"]}));
}

#[tokio::test]
async fn iterable_bulk_updates_map_failed_updates_back_to_records() {
    let vendor = MockVendor::start(|request: &VendorRequest| {
        assert_eq!(request.header("api-key"), "it-key");
        match (request.method.as_str(), request.path.as_str()) {
            ("POST", "/api/users/bulkUpdate") => {
                let users = request.body["users"].as_array().cloned().unwrap_or_default();
                assert!(users.iter().all(|u| u["preferUserId"] == true && u["dataFields"].is_object()));
                let invalid: Vec<Value> = users
                    .iter()
                    .filter(|u| u["email"] == "ken@example.com")
                    .map(|u| u["email"].clone())
                    .collect();
                Json(json!({
                    "successCount": users.len() - invalid.len(),
                    "failCount": invalid.len(),
                    "failedUpdates": {"invalidEmails": invalid, "invalidUserIds": [], "notFoundEmails": []},
                    "filteredOutFields": [], "createdFields": []
                }))
            }
            ("DELETE", "/api/users/byUserId/1") => Json(json!({"msg": "All users associated with 1 were successfully deleted", "code": "Success", "params": null})),
            _ => (StatusCode::BAD_REQUEST, Json(json!({"msg": "unexpected", "code": "BadParams", "params": null}))).into_response(),
        }
    })
    .await;
    let project = project(
        &format!(
            "  iterable:\n    type: iterable\n    api_key: it-key\n    url: {}",
            vendor.url
        ),
        "  users_to_iterable:\n    model: users\n    destination: iterable\n    action: users\n    mode: mirror\n    fields: { email: email, userId: id, plan: plan }\n",
    );
    let mut rows = users();
    project.write_users(&rows);
    let output = project.sluice(&["run"]).await;
    assert_eq!(
        output.status.code(),
        Some(2),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );
    let sent = items(&vendor.take(), "users");
    assert_eq!(
        sent[0],
        json!({"preferUserId": true, "email": "ada@example.com", "userId": "1", "dataFields": {"plan": "free"}})
    );
    let runs = project.sluice(&["runs", "--failures", "5"]).await;
    assert!(
        stdout(&runs).contains("invalidEmails: ken@example.com"),
        "{}",
        stdout(&runs)
    );

    rows.remove(0);
    project.write_users(&rows);
    let output = project.sluice(&["run"]).await;
    assert!(
        vendor
            .take()
            .iter()
            .any(|r| r.method == Method::DELETE && r.path == "/api/users/byUserId/1"),
        "{}",
        stdout(&output)
    );
}

#[tokio::test]
async fn customerio_people_identify_delete_and_report_by_batch_index() {
    let vendor = MockVendor::start(|request: &VendorRequest| {
        assert_eq!(request.path, "/api/v2/batch");
        // Basic base64("site:key").
        assert_eq!(request.header("authorization"), "Basic c2l0ZTprZXk=");
        let batch = request.body["batch"].as_array().cloned().unwrap_or_default();
        let errors: Vec<Value> = batch
            .iter()
            .enumerate()
            .filter(|(_, e)| e["identifiers"]["id"] == "3")
            .map(|(i, _)| json!({"batch_index": i, "reason": "invalid", "field": "plan", "message": "Attribute value too long"}))
            .collect();
        if errors.is_empty() {
            Json(json!({}))
        } else {
            (StatusCode::MULTI_STATUS, Json(json!({"errors": errors}))).into_response()
        }
    })
    .await;
    let project = project(
        &format!(
            "  cio:\n    type: customerio\n    site_id: site\n    api_key: key\n    url: {}",
            vendor.url
        ),
        "  people:\n    model: users\n    destination: cio\n    action: person\n    mode: mirror\n    fields: { identifiers.id: id, email: email, plan: plan }\n",
    );
    let mut rows = users();
    project.write_users(&rows);
    let output = project.sluice(&["run"]).await;
    assert_eq!(
        output.status.code(),
        Some(2),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );
    let sent = items(&vendor.take(), "batch");
    assert_eq!(
        sent[0],
        json!({"type": "person", "action": "identify", "identifiers": {"id": "1"}, "attributes": {"email": "ada@example.com", "plan": "free"}})
    );
    let runs = project.sluice(&["runs", "--failures", "5"]).await;
    assert!(
        stdout(&runs).contains("Attribute value too long"),
        "{}",
        stdout(&runs)
    );

    rows.remove(0);
    project.write_users(&rows);
    project.sluice(&["run"]).await;
    let sent = items(&vendor.take(), "batch");
    assert!(
        sent.contains(&json!({"type": "person", "action": "delete", "identifiers": {"id": "1"}})),
        "{sent:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Klaviyo, validated against Klaviyo's OpenAPI document

/// OpenAPI 3.0 `nullable` as JSON Schema: `type: [T, "null"]`, or a null branch beside a `$ref`
/// or a `oneOf`.
fn openapi_nullable(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.remove("example");
            map.remove("examples");
            if map.remove("nullable") == Some(Value::Bool(true)) {
                if let Some(Value::String(t)) = map.get("type").cloned() {
                    map.insert("type".into(), json!([t, "null"]));
                } else if let Some(reference) = map.remove("$ref") {
                    map.insert("anyOf".into(), json!([{"$ref": reference}, {"type": "null"}]));
                } else if let Some(Value::Array(branches)) = map.get_mut("oneOf") {
                    branches.push(json!({"type": "null"}));
                }
            }
            map.values_mut().for_each(openapi_nullable);
        }
        Value::Array(items) => items.iter_mut().for_each(openapi_nullable),
        _ => {}
    }
}

fn klaviyo_schemas() -> Value {
    let file = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/vendor-specs/klaviyo-stable.openapi.json"
    );
    let text = std::fs::read_to_string(file).expect("Klaviyo's OpenAPI document in ../shared/vendor-specs");
    let spec: Value = serde_json::from_str(&text).expect("spec parses");
    let mut components = json!({"schemas": spec["components"]["schemas"].clone()});
    openapi_nullable(&mut components);
    components
}

fn klaviyo_validator(components: &Value, schema: &str) -> jsonschema::Validator {
    let root = json!({"$ref": format!("#/components/schemas/{schema}"), "components": components});
    jsonschema::validator_for(&root).expect("schema compiles")
}

#[tokio::test]
async fn klaviyo_jobs_match_the_spec() {
    let components = klaviyo_schemas();
    let validators: Vec<(&str, jsonschema::Validator)> = [
        ("/api/profile-bulk-import-jobs", "ProfileImportJobCreateQuery"),
        (
            "/api/data-privacy-deletion-jobs",
            "DataPrivacyCreateDeletionJobQuery",
        ),
        ("/api/event-bulk-create-jobs", "EventsBulkCreateJob"),
        (
            "/api/profile-subscription-bulk-create-jobs",
            "SubscriptionCreateJobCreateQuery",
        ),
        (
            "/api/profile-subscription-bulk-delete-jobs",
            "SubscriptionDeleteJobCreateQuery",
        ),
    ]
    .into_iter()
    .map(|(path, schema)| (path, klaviyo_validator(&components, schema)))
    .collect();
    // The validators are not vacuous.
    assert!(
        !validators[0]
            .1
            .is_valid(&json!({"data": {"type": "profile-bulk-import-job"}}))
    );
    assert!(
        !validators[2]
            .1
            .is_valid(&json!({"data": {"type": "profile", "attributes": {}}}))
    );
    let vendor = MockVendor::start(move |request: &VendorRequest| {
        assert_eq!(request.header("authorization"), "Klaviyo-API-Key pk_test");
        assert_eq!(request.header("revision"), "2026-07-15");
        assert_eq!(request.header("content-type"), "application/vnd.api+json");
        let Some((_, validator)) = validators.iter().find(|(path, _)| *path == request.path) else {
            return (StatusCode::NOT_FOUND, Json(json!({"errors": [{"id": "x", "code": "not_found", "title": "Not found", "detail": request.path}]}))).into_response();
        };
        let errors: Vec<String> = validator
            .iter_errors(&request.body)
            .map(|e| format!("{e} at {}", e.instance_path()))
            .collect();
        if !errors.is_empty() {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"errors": [{"id": "e", "code": "invalid", "title": "Invalid input.", "detail": errors.join("; "), "source": {"pointer": "/data"}}]})),
            )
                .into_response();
        }
        (StatusCode::ACCEPTED, Json(json!({"data": {"type": "job", "id": "1"}}))).into_response()
    })
    .await;
    let project = project(
        &format!(
            "  klaviyo:\n    type: klaviyo\n    api_key: pk_test\n    url: {}",
            vendor.url
        ),
        r#"  profiles:
    model: users
    destination: klaviyo
    action: profiles
    mode: mirror
    options: { list_id: Y6nRLr }
    fields: { email: email, external_id: {column: id, as: string}, plan: plan, score: lead_score }
  events:
    model: users
    destination: klaviyo
    action: events
    fields: { email: email, value: lifetime_value, plan: plan }
    constants: { metric: Upgraded }
  newsletter:
    model: users
    destination: klaviyo
    action: subscribe
    mode: mirror
    options: { list_id: Y6nRLr }
    fields: { email: email }"#,
    );
    let mut rows = users();
    project.write_users(&rows);
    let output = project.sluice(&["run"]).await;
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );
    let requests = vendor.take();
    let import = requests
        .iter()
        .find(|r| r.path == "/api/profile-bulk-import-jobs")
        .expect("an import job");
    assert_eq!(
        import.body["data"]["attributes"]["profiles"]["data"][0]["attributes"],
        json!({"email": "ada@example.com", "external_id": "1", "properties": {"plan": "free", "score": 10}})
    );
    let events = requests
        .iter()
        .find(|r| r.path == "/api/event-bulk-create-jobs")
        .expect("an events job");
    let first = &events.body["data"]["attributes"]["events-bulk-create"]["data"][0]["attributes"];
    assert_eq!(
        first["profile"]["data"]["attributes"],
        json!({"email": "ada@example.com"})
    );
    assert_eq!(
        first["events"]["data"][0]["attributes"]["metric"]["data"]["attributes"]["name"],
        "Upgraded"
    );
    assert_eq!(first["events"]["data"][0]["attributes"]["value"], 10.5);
    assert!(
        requests
            .iter()
            .any(|r| r.path == "/api/profile-subscription-bulk-create-jobs")
    );

    // Ada leaves the model: her profile deletion is requested and she is unsubscribed.
    rows.remove(0);
    project.write_users(&rows);
    let output = project.sluice(&["run"]).await;
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );
    let requests = vendor.take();
    let deletion = requests
        .iter()
        .find(|r| r.path == "/api/data-privacy-deletion-jobs")
        .expect("a deletion job");
    assert_eq!(
        deletion.body["data"]["attributes"]["profile"]["data"]["attributes"],
        json!({"email": "ada@example.com"})
    );
    assert!(
        requests
            .iter()
            .any(|r| r.path == "/api/profile-subscription-bulk-delete-jobs")
    );
}

// ---------------------------------------------------------------------------------------------
// Salesforce

#[tokio::test]
async fn salesforce_upserts_by_external_id_refreshes_tokens_and_deletes() {
    let state = Arc::new(Mutex::new((
        0usize,
        std::collections::BTreeMap::<String, Value>::new(),
    )));
    let server = state.clone();
    let vendor = MockVendor::start(move |request: &VendorRequest| {
        let mut state = server.lock().expect("lock");
        let (tokens, records) = &mut *state;
        if request.path == "/services/oauth2/token" {
            *tokens += 1;
            let url = request.header("host").to_string();
            return Json(json!({"access_token": format!("tok{tokens}"), "instance_url": format!("http://{url}"), "token_type": "Bearer", "issued_at": "1"}));
        }
        // The first token expires at once: Salesforce answers 401 and a new one is fetched.
        if !request.header("authorization").starts_with("Bearer tok") || request.header("authorization") == "Bearer tok1" {
            return (StatusCode::UNAUTHORIZED, Json(json!([{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]))).into_response();
        }
        match (request.method.as_str(), request.path.as_str()) {
            ("PATCH", "/services/data/v62.0/composite/sobjects/Contact/External_Id__c") => {
                assert_eq!(request.body["allOrNone"], false);
                let results: Vec<Value> = request.body["records"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .map(|r| {
                        assert_eq!(r["attributes"], json!({"type": "Contact"}));
                        let ext = r["External_Id__c"].as_str().expect("external id").to_string();
                        if r["Email"] == "linus@example.com" {
                            return json!({"success": false, "errors": [{"statusCode": "INVALID_EMAIL_ADDRESS", "message": "Email: invalid email address", "fields": ["Email"]}]});
                        }
                        records.insert(ext.clone(), r.clone());
                        json!({"id": format!("003{ext}"), "success": true, "errors": [], "created": true})
                    })
                    .collect();
                Json(json!(results))
            }
            ("GET", "/services/data/v62.0/query") => {
                let found: Vec<Value> = records
                    .keys()
                    .filter(|ext| request.query.contains(&format!("%27{ext}%27")))
                    .map(|ext| json!({"attributes": {"type": "Contact"}, "Id": format!("003{ext}"), "External_Id__c": ext}))
                    .collect();
                Json(json!({"totalSize": found.len(), "done": true, "records": found}))
            }
            ("DELETE", "/services/data/v62.0/composite/sobjects") => {
                let ids: Vec<String> = request
                    .query
                    .split('&')
                    .find_map(|p| p.strip_prefix("ids="))
                    .unwrap_or_default()
                    .split("%2C")
                    .map(str::to_string)
                    .collect();
                let results: Vec<Value> = ids
                    .iter()
                    .map(|id| {
                        records.remove(id.trim_start_matches("003"));
                        json!({"id": id, "success": true, "errors": []})
                    })
                    .collect();
                Json(json!(results))
            }
            _ => (StatusCode::NOT_FOUND, Json(json!([{"message": "not found", "errorCode": "NOT_FOUND"}]))).into_response(),
        }
    })
    .await;
    let project = project(
        &format!(
            "  salesforce:\n    type: salesforce\n    login_url: {}\n    client_id: cid\n    client_secret: secret\n    delivery: {{ initial_backoff: 10ms, max_backoff: 20ms, concurrency: 1 }}",
            vendor.url
        ),
        "  contacts:\n    model: users\n    destination: salesforce\n    mode: mirror\n    options: { object: Contact, external_id: External_Id__c }\n    fields: { External_Id__c: {column: id, as: string}, Email: email, LastName: plan }\n",
    );
    let mut rows = users();
    project.write_users(&rows);
    let output = project.sluice(&["run"]).await;
    assert_eq!(
        output.status.code(),
        Some(2),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );
    {
        let state = state.lock().expect("lock");
        assert_eq!(state.0, 2, "a token, then a new one after the 401");
        assert_eq!(state.1.keys().cloned().collect::<Vec<_>>(), ["1", "2", "4"]);
    }
    let requests = vendor.take();
    let token = requests
        .iter()
        .find(|r| r.path == "/services/oauth2/token")
        .expect("token request");
    assert_eq!(token.header("content-type"), "application/x-www-form-urlencoded");
    assert_eq!(
        token.body,
        "grant_type=client_credentials&client_id=cid&client_secret=secret"
    );
    let runs = project.sluice(&["runs", "--failures", "5"]).await;
    assert!(
        stdout(&runs).contains("INVALID_EMAIL_ADDRESS"),
        "{}",
        stdout(&runs)
    );

    rows.remove(0);
    project.write_users(&rows);
    let output = project.sluice(&["run"]).await;
    assert!(
        !state.lock().expect("lock").1.contains_key("1"),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );
}

// ---------------------------------------------------------------------------------------------
// Google Sheets

/// A spreadsheet with one sheet, `Users`, as the Sheets API keeps it.
#[derive(Default)]
struct Grid {
    rows: Vec<Vec<Value>>,
    row_count: usize,
    tokens: usize,
}

fn sheets_server(grid: Arc<Mutex<Grid>>) -> impl FnMut(&VendorRequest) -> Response + Send + 'static {
    move |request: &VendorRequest| {
        let mut grid = grid.lock().expect("lock");
        if request.path == "/token" {
            let form = request.body.as_str().unwrap_or_default();
            assert!(
                form.starts_with(
                    "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion="
                ),
                "{form}"
            );
            assert_eq!(
                form.rsplit('=').next().unwrap_or_default().split('.').count(),
                3,
                "a JWT"
            );
            grid.tokens += 1;
            return Json(json!({"access_token": "ya29.test", "expires_in": 3599, "token_type": "Bearer"}));
        }
        if request.header("authorization") != "Bearer ya29.test" {
            return (
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": {"code": 401, "status": "UNAUTHENTICATED"}})),
            )
                .into_response();
        }
        let path = request.path.replace("%27", "'");
        match (request.method.as_str(), path.as_str()) {
            ("GET", "/v4/spreadsheets/SID") => Json(
                json!({"sheets": [{"properties": {"sheetId": 7, "title": "Users", "gridProperties": {"rowCount": grid.row_count, "columnCount": 26}}}]}),
            ),
            ("GET", "/v4/spreadsheets/SID/values/'Users'!A:A") => {
                let values: Vec<Value> = grid
                    .rows
                    .iter()
                    .map(|r| json!([r.first().cloned().unwrap_or(Value::Null)]))
                    .collect();
                Json(json!({"range": "Users!A1:A1000", "majorDimension": "ROWS", "values": values}))
            }
            ("POST", "/v4/spreadsheets/SID/values:batchUpdate") => {
                assert_eq!(request.body["valueInputOption"], "RAW");
                for data in request.body["data"].as_array().cloned().unwrap_or_default() {
                    let range = data["range"].as_str().unwrap_or_default();
                    let row: usize = range
                        .rsplit("!A")
                        .next()
                        .and_then(|r| r.parse().ok())
                        .expect("A1 row");
                    for (offset, values) in data["values"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                        .into_iter()
                        .enumerate()
                    {
                        let at = row + offset;
                        if at > grid.row_count {
                            return (StatusCode::BAD_REQUEST, Json(json!({"error": {"code": 400, "message": format!("Range ({range}) exceeds grid limits. Max rows: {}", grid.row_count), "status": "INVALID_ARGUMENT"}}))).into_response();
                        }
                        while grid.rows.len() < at {
                            grid.rows.push(Vec::new());
                        }
                        grid.rows[at - 1] = values.as_array().cloned().unwrap_or_default();
                    }
                }
                Json(json!({"spreadsheetId": "SID"}))
            }
            ("POST", "/v4/spreadsheets/SID:batchUpdate") => {
                for r in request.body["requests"].as_array().cloned().unwrap_or_default() {
                    if let Some(length) = r["appendDimension"]["length"].as_u64() {
                        grid.row_count += length as usize;
                    }
                    if let Some(start) = r["deleteDimension"]["range"]["startIndex"].as_u64() {
                        grid.rows.remove(start as usize);
                        grid.row_count -= 1;
                    }
                }
                Json(json!({"spreadsheetId": "SID", "replies": []}))
            }
            _ => (
                StatusCode::NOT_FOUND,
                Json(json!({"error": {"code": 404, "message": path}})),
            )
                .into_response(),
        }
    }
}

#[tokio::test]
async fn google_sheets_mirror_keeps_the_sheet_equal_to_the_model() {
    let grid = Arc::new(Mutex::new(Grid {
        row_count: 3,
        ..Grid::default()
    }));
    let vendor = MockVendor::start(sheets_server(grid.clone())).await;
    let key = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/test_rsa_key.pem"
    ))
    .expect("key");
    let service_account = json!({
        "type": "service_account",
        "client_email": "sluice@project.iam.gserviceaccount.com",
        "private_key": key,
        "token_uri": format!("{}/token", vendor.url),
    });
    let project = project(
        &format!(
            "  sheets:\n    type: google_sheets\n    service_account: sa.json\n    url: {}",
            vendor.url
        ),
        "  users_sheet:\n    model: users\n    destination: sheets\n    options: { spreadsheet_id: SID, sheet: Users }\n    fields: { email: email, plan: plan }\n",
    );
    std::fs::write(project.path().join("sa.json"), service_account.to_string()).expect("key file");
    let mut rows = users();
    project.write_users(&rows);
    let output = project.sluice(&["run"]).await;
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );
    let cells = |grid: &Grid| -> Vec<Vec<Value>> { grid.rows.clone() };
    assert_eq!(
        cells(&grid.lock().expect("lock")),
        vec![
            vec![json!("id"), json!("email"), json!("plan")],
            vec![json!("1"), json!("ada@example.com"), json!("free")],
            vec![json!("2"), json!("grace@example.com"), json!("pro")],
            vec![json!("3"), json!("linus@example.com"), json!("free")],
            vec![json!("4"), json!("ken@example.com"), json!("starter")],
        ]
    );
    assert!(grid.lock().expect("lock").row_count >= 5, "the grid grew");

    // Grace changes plan, Ada leaves, Barbara arrives.
    rows[1].plan = "enterprise";
    rows.remove(0);
    rows.push(user(5, "barbara@example.com", "pro", 50));
    project.write_users(&rows);
    let output = project.sluice(&["run"]).await;
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );
    let mut body: Vec<Vec<Value>> = cells(&grid.lock().expect("lock"))[1..].to_vec();
    body.sort_by_key(|r| r[0].as_str().unwrap_or_default().to_string());
    assert_eq!(
        body,
        vec![
            vec![json!("2"), json!("grace@example.com"), json!("enterprise")],
            vec![json!("3"), json!("linus@example.com"), json!("free")],
            vec![json!("4"), json!("ken@example.com"), json!("starter")],
            vec![json!("5"), json!("barbara@example.com"), json!("pro")],
        ]
    );
}

#[tokio::test]
async fn check_compiles_mappings_against_the_models_columns() {
    let project = project(
        "  segment:\n    type: segment\n    write_key: wk_test\n    url: http://127.0.0.1:9",
        "  good:\n    model: users\n    destination: segment\n    action: identify\n    fields: { userId: email }\n  typo:\n    model: users\n    destination: segment\n    action: identify\n    fields: { userId: emial }\n  no_id:\n    model: users\n    destination: segment\n    action: track\n    fields: { plan: plan }\n    constants: { event: Seen }\n",
    );
    project.write_users(&users());
    let output = project.sluice(&["check", "good", "typo", "no_id"]).await;
    assert_eq!(output.status.code(), Some(1));
    let text = stdout(&output);
    assert!(text.contains("ok      mapping good"), "{text}");
    assert!(
        text.contains(
            "FAILED  mapping typo: mapping `typo`: maps column `emial`, which model `users` does not return"
        ),
        "{text}"
    );
    assert!(
        text.contains("FAILED  mapping no_id: mapping `no_id`: action `track` identifies records by `userId` or `anonymousId`"),
        "{text}"
    );
}

#[tokio::test]
async fn salesforce_bulk_jobs_upload_csv_wait_and_read_failed_results() {
    let polls = Arc::new(Mutex::new(0usize));
    let counter = polls.clone();
    let vendor = MockVendor::start(move |request: &VendorRequest| {
        if request.path == "/services/oauth2/token" {
            let url = request.header("host").to_string();
            return Json(json!({"access_token": "tok", "instance_url": format!("http://{url}")}));
        }
        assert_eq!(request.header("authorization"), "Bearer tok");
        let job = "/services/data/v62.0/jobs/ingest/750J1";
        match (request.method.as_str(), request.path.as_str()) {
            ("POST", "/services/data/v62.0/jobs/ingest") => {
                assert_eq!(
                    request.body,
                    json!({"object": "Contact", "contentType": "CSV", "operation": "upsert", "lineEnding": "LF", "externalIdFieldName": "External_Id__c"})
                );
                Json(json!({"id": "750J1", "state": "Open", "object": "Contact", "operation": "upsert"}))
            }
            ("PUT", p) if p == format!("{job}/batches") => {
                assert_eq!(request.header("content-type"), "text/csv");
                let csv = request.body.as_str().unwrap_or_default();
                assert!(csv.starts_with("External_Id__c,Email,LastName\n1,ada@example.com,free\n"), "{csv}");
                assert_eq!(csv.lines().count(), 5);
                StatusCode::CREATED.into_response()
            }
            ("PATCH", p) if p == job => {
                assert_eq!(request.body, json!({"state": "UploadComplete"}));
                Json(json!({"id": "750J1", "state": "UploadComplete"}))
            }
            ("GET", p) if p == job => {
                let mut n = counter.lock().expect("lock");
                *n += 1;
                if *n < 2 {
                    Json(json!({"id": "750J1", "state": "InProgress"}))
                } else {
                    Json(json!({"id": "750J1", "state": "JobComplete", "numberRecordsProcessed": 4, "numberRecordsFailed": 1}))
                }
            }
            ("GET", p) if p == format!("{job}/failedResults/") => (
                [("content-type", "text/csv")],
                "\"sf__Id\",\"sf__Error\",External_Id__c,Email,LastName\n\"\",\"INVALID_EMAIL_ADDRESS:Email: invalid email address: linus:--\",3,linus@example.com,free\n",
            )
                .into_response(),
            _ => (StatusCode::NOT_FOUND, Json(json!([{"message": request.path, "errorCode": "NOT_FOUND"}]))).into_response(),
        }
    })
    .await;
    let project = project(
        &format!(
            "  salesforce:\n    type: salesforce\n    login_url: {}\n    client_id: cid\n    client_secret: secret\n    bulk_poll_interval: 10ms",
            vendor.url
        ),
        "  contacts:\n    model: users\n    destination: salesforce\n    options: { object: Contact, external_id: External_Id__c, api: bulk }\n    fields: { External_Id__c: {column: id, as: string}, Email: email, LastName: plan }\n",
    );
    project.write_users(&users());
    let output = project.sluice(&["run"]).await;
    assert_eq!(
        output.status.code(),
        Some(2),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );
    assert_eq!(*polls.lock().expect("lock"), 2);
    let runs = project.sluice(&["runs", "--failures", "5"]).await;
    let text = stdout(&runs);
    assert!(text.contains("INVALID_EMAIL_ADDRESS"), "{text}");
    assert!(text.contains(r#"{"id":3}"#), "{text}");
}

// ---------------------------------------------------------------------------------------------
// Meta

/// A stand-in for Meta's Conversions API: checks each request as Meta documents it (the token
/// as `access_token`, at most 1,000 events in `data`, each with `event_name`, an integer
/// `event_time`, `event_id`, `action_source` and hashed `user_data`) and answers as Meta does:
/// `events_received`, a whole request refused with code 100 for one bad event, throttling
/// (code 80004, HTTP 400) once, and an expired token (code 190) when told to.
fn meta_server(expired: Arc<Mutex<bool>>) -> impl FnMut(&VendorRequest) -> Response + Send + 'static {
    let mut throttled_once = false;
    move |request: &VendorRequest| {
        let error = |code: i64, subcode: Option<i64>, message: &str, user_msg: &str| {
            let mut error = json!({"message": message, "type": "OAuthException", "code": code, "fbtrace_id": "AK2w1lTqtwQ"});
            if let Some(subcode) = subcode {
                error["error_subcode"] = json!(subcode);
            }
            if !user_msg.is_empty() {
                error["error_user_title"] = json!("Invalid parameter");
                error["error_user_msg"] = json!(user_msg);
            }
            (StatusCode::BAD_REQUEST, axum::Json(json!({ "error": error }))).into_response()
        };
        assert_eq!(request.method, Method::POST);
        assert_eq!(request.path, "/v26.0/1234567890/events");
        assert!(
            request.query.contains("access_token=meta-token"),
            "{}",
            request.query
        );
        if *expired.lock().expect("lock") {
            return error(
                190,
                Some(463),
                "Error validating access token: Session has expired on Saturday, 05-Dec-26 10:00:00 PST.",
                "",
            );
        }
        if !throttled_once {
            throttled_once = true;
            return error(
                80004,
                Some(2446079),
                "(#80004) There have been too many calls to this ad-account. Wait a bit and try again.",
                "",
            );
        }
        let events = request.body["data"].as_array().cloned().unwrap_or_default();
        assert!(!events.is_empty() && events.len() <= 1000);
        for event in &events {
            assert!(event["event_name"].is_string(), "{event}");
            assert!(event["event_time"].is_i64(), "{event}");
            assert!(
                event["event_id"].as_str().is_some_and(|id| !id.is_empty()),
                "{event}"
            );
            assert!(event["action_source"].is_string(), "{event}");
            let em = event["user_data"]["em"].as_str().unwrap_or_default();
            assert!(
                em.len() == 64 && em.bytes().all(|b| b.is_ascii_hexdigit()),
                "em is hashed: {event}"
            );
        }
        // Meta refuses a request whole for one bad event.
        if events.iter().any(|e| e["custom_data"]["plan"] == "starter") {
            return error(
                100,
                Some(2804019),
                "Invalid parameter",
                "The value of custom_data.plan is not allowed for this dataset.",
            );
        }
        Json(json!({"events_received": events.len(), "messages": [], "fbtrace_id": "AK2w1lTqtwQ"}))
    }
}

#[tokio::test]
async fn meta_conversions_hash_customer_information_dedupe_by_event_id_and_isolate_a_refused_event() {
    let expired = Arc::new(Mutex::new(false));
    let vendor = MockVendor::start(meta_server(expired.clone())).await;
    let project = project(
        &format!(
            "  meta:\n    type: meta\n    access_token: meta-token\n    pixel_id: \"1234567890\"\n    url: {}\n    delivery: {{ initial_backoff: 10ms, max_backoff: 50ms }}",
            vendor.url
        ),
        "  users_to_meta:\n    model: users\n    destination: meta\n    action: conversions\n    send: [added, updated]\n    fields: { event_time: lead_score, user_data.em: email, value: lifetime_value, plan: plan }\n    constants: { event_name: Purchase, action_source: system_generated, currency: USD }\n",
    );
    project.write_users(&users());
    let output = project.sluice(&["run"]).await;
    let text = format!("{}{}", stdout(&output), stderr(&output));
    assert_eq!(output.status.code(), Some(2), "one event refused: {text}");
    let requests = vendor.take();
    let delivered: Vec<Value> = requests
        .iter()
        .filter(|r| {
            !r.body["data"]
                .as_array()
                .is_some_and(|d| d.iter().any(|e| e["custom_data"]["plan"] == "starter"))
        })
        .flat_map(|r| r.body["data"].as_array().cloned().unwrap_or_default())
        .collect();
    let ada = delivered
        .iter()
        .find(|e| e["custom_data"]["value"] == 10.5)
        .unwrap_or_else(|| panic!("ada's event: {delivered:?}"));
    assert_eq!(ada["event_name"], "Purchase");
    assert_eq!(ada["event_time"], 10);
    assert_eq!(ada["action_source"], "system_generated");
    assert_eq!(ada["custom_data"]["currency"], "USD");
    assert_eq!(
        ada["user_data"]["em"],
        sluice_engine::pii::sha256_hex(b"ada@example.com")
    );
    let everything =
        serde_json::to_string(&requests.iter().map(|r| &r.body).collect::<Vec<_>>()).expect("json");
    assert!(!everything.contains("@example.com"), "no raw email reaches Meta");
    let runs = stdout(&project.sluice(&["runs", "--failures", "5"]).await);
    assert!(
        runs.contains("The value of custom_data.plan is not allowed") && runs.contains("code 100"),
        "{runs}"
    );

    // Sent again (a changed row): the same record, a new event id; an expired token stops the
    // run and says what to do, and the next run sends what it could not.
    let event_ids: HashSet<String> = delivered
        .iter()
        .filter_map(|e| e["event_id"].as_str().map(str::to_string))
        .collect();
    assert_eq!(event_ids.len(), delivered.len(), "one event id per event");
    let mut rows = users();
    rows[1].lead_score = 99;
    project.write_users(&rows);
    *expired.lock().expect("lock") = true;
    let output = project.sluice(&["run"]).await;
    let text = format!("{}{}", stdout(&output), stderr(&output));
    assert!(!output.status.success(), "{text}");
    assert!(
        text.contains("code 190, subcode 463") && text.contains("system user token"),
        "{text}"
    );
    *expired.lock().expect("lock") = false;
    vendor.take();
    let output = project.sluice(&["run"]).await;
    assert!(
        output.status.code() == Some(2) || output.status.success(),
        "{}",
        stdout(&output)
    );
    let resent: Vec<Value> = vendor
        .take()
        .iter()
        .flat_map(|r| r.body["data"].as_array().cloned().unwrap_or_default())
        .collect();
    assert!(
        resent.iter().any(|e| e["event_time"] == 99),
        "grace's update is sent: {resent:?}"
    );
}

/// A stand-in for Meta's Custom Audience endpoints: the ad account's audiences (two pages),
/// creating one, and adding (`POST`) and removing (`DELETE`) members, each request one whole
/// session; answers with Meta's documented bodies.
fn meta_audience_server(url: Arc<Mutex<String>>) -> impl FnMut(&VendorRequest) -> Response + Send + 'static {
    let mut created: Option<String> = None;
    move |request: &VendorRequest| {
        assert!(
            request.query.contains("access_token=meta-token"),
            "{}",
            request.query
        );
        match (request.method.as_str(), request.path.as_str()) {
            ("GET", "/v26.0/act_555/customaudiences") if !request.query.contains("after=") => {
                let next = format!(
                    "{}/v26.0/act_555/customaudiences?access_token=meta-token&fields=id%2Cname&limit=500&after=QVFIUm",
                    url.lock().expect("lock")
                );
                Json(json!({"data": [{"id": "23850000000000111", "name": "Someone else's list"}],
                            "paging": {"cursors": {"before": "QVFIUl", "after": "QVFIUm"}, "next": next}}))
            }
            ("GET", "/v26.0/act_555/customaudiences") => {
                let data: Vec<Value> = created
                    .iter()
                    .map(|id| json!({"id": id, "name": "Lead scorers"}))
                    .collect();
                Json(json!({"data": data, "paging": {"cursors": {"before": "QVFIUm", "after": "QVFIUm"}}}))
            }
            ("POST", "/v26.0/act_555/customaudiences") => {
                assert_eq!(request.body["subtype"], "CUSTOM");
                assert_eq!(request.body["customer_file_source"], "USER_PROVIDED_ONLY");
                assert_eq!(request.body["name"], "Lead scorers");
                assert!(created.is_none(), "created once");
                created = Some("23850000000000999".into());
                Json(json!({"id": "23850000000000999"}))
            }
            ("POST" | "DELETE", "/v26.0/23850000000000999/users") => {
                let payload = &request.body["payload"];
                let session = &request.body["session"];
                let rows = payload["data"].as_array().cloned().unwrap_or_default();
                assert!(!rows.is_empty() && rows.len() <= 10_000);
                assert!(session["session_id"].as_u64().is_some_and(|id| id > 0 && id <= i64::MAX as u64), "{session}");
                assert_eq!(session["batch_seq"], 1);
                assert_eq!(session["last_batch_flag"], true);
                let schema = payload["schema"].as_array().cloned().unwrap_or_default();
                for row in &rows {
                    assert_eq!(row.as_array().map(Vec::len), Some(schema.len()), "{row}");
                }
                Json(json!({"audience_id": "23850000000000999", "session_id": session["session_id"].to_string(),
                            "num_received": rows.len(), "num_invalid_entries": 0, "invalid_entry_samples": {}}))
            }
            _ => (StatusCode::BAD_REQUEST, axum::Json(json!({"error": {"message": "Unknown path components", "type": "OAuthException", "code": 2500, "fbtrace_id": "x"}}))).into_response(),
        }
    }
}

#[tokio::test]
async fn meta_audiences_are_created_once_and_mirror_the_model_with_hashed_members() {
    let url = Arc::new(Mutex::new(String::new()));
    let vendor = MockVendor::start(meta_audience_server(url.clone())).await;
    *url.lock().expect("lock") = vendor.url.clone();
    let project = project(
        &format!(
            "  meta:\n    type: meta\n    access_token: meta-token\n    ad_account_id: act_555\n    url: {}",
            vendor.url
        ),
        "  users_to_audience:\n    model: users\n    destination: meta\n    action: audience\n    mode: mirror\n    options: { audience_name: Lead scorers }\n    fields: { EMAIL: email, EXTERN_ID: { column: id, as: string } }\n",
    );
    let mut rows = users();
    project.write_users(&rows);
    // A dry run creates nothing and sends nothing.
    let output = project.sluice(&["run", "--dry-run"]).await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("audience:Lead%20scorers/users"),
        "{}",
        stdout(&output)
    );
    assert!(vendor.take().is_empty(), "a dry run reaches nothing");

    let output = project.sluice(&["run"]).await;
    assert!(output.status.success(), "{}{}", stdout(&output), stderr(&output));
    let requests = vendor.take();
    let adds: Vec<&VendorRequest> = requests.iter().filter(|r| r.path.ends_with("/users")).collect();
    assert_eq!(adds.len(), 1, "{requests:?}");
    assert_eq!(adds[0].method, Method::POST);
    assert_eq!(adds[0].body["payload"]["schema"], json!(["EMAIL", "EXTERN_ID"]));
    let data = adds[0].body["payload"]["data"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(data.len(), 4);
    assert!(
        data.contains(&json!([sluice_engine::pii::sha256_hex(b"ada@example.com"), "1"])),
        "{data:?}"
    );
    assert!(!adds[0].body.to_string().contains("@example.com"));

    // Ada leaves the model: she leaves the audience; the audience is found, not made again.
    rows.remove(0);
    project.write_users(&rows);
    let output = project.sluice(&["run"]).await;
    assert!(output.status.success(), "{}{}", stdout(&output), stderr(&output));
    let requests = vendor.take();
    assert!(
        !requests
            .iter()
            .any(|r| r.method == Method::POST && r.path.ends_with("customaudiences"))
    );
    let removes: Vec<&VendorRequest> = requests.iter().filter(|r| r.method == Method::DELETE).collect();
    assert_eq!(removes.len(), 1, "{requests:?}");
    assert_eq!(
        removes[0].body["payload"]["data"],
        json!([[sluice_engine::pii::sha256_hex(b"ada@example.com"), "1"]])
    );
}
