//! The HTTP API: handler tests through `tower::ServiceExt::oneshot` on the router (in this
//! process, against a real project directory, metadata store and local receiver), and an
//! end-to-end test of `sluice serve` on a loopback port.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use sluice_connectors::Connectors;
use sluice_engine::secrets::SecretKey;
use sluice_engine::service::Service;
use sluice_engine::tokens::Scope;
use sluice_engine::{Engine, Project, Quiet};
use tower::ServiceExt;

use crate::common::TestProject;
use crate::faults::{AckReceiver, Answer, Model, project_config, write_model};

/// A project (from `project_config`: source `warehouse`, model `users`, destination `crm`,
/// mapping `users_to_crm`), its API router, and an admin and a read token.
pub(crate) struct Api {
    pub(crate) project: TestProject,
    pub(crate) router: Router,
    pub(crate) service: Arc<Service>,
    pub(crate) admin: String,
    pub(crate) read: String,
}

/// The bytes of the key the API's tests seal secrets with.
pub(crate) const KEY_BYTES: [u8; 32] = [42u8; 32];

pub(crate) fn key() -> SecretKey {
    SecretKey::from_bytes(&KEY_BYTES).expect("key")
}

impl Api {
    pub(crate) async fn start(config: &str, rows: i64) -> Self {
        let project = TestProject::new(config);
        let model: Model = (1..=rows).map(|id| (id, "free".to_string())).collect();
        write_model(&project, &model);
        Self::open(project, Some(key())).await
    }

    pub(crate) async fn open(project: TestProject, secret_key: Option<SecretKey>) -> Self {
        let loaded = Project::load(&project.config_path()).expect("config");
        let engine = Engine::open_with_key(loaded, &Connectors, secret_key)
            .await
            .expect("engine");
        let admin = token(&engine, "admin", Scope::Admin).await;
        let read = token(&engine, "reader", Scope::Read).await;
        let service = Service::new(engine, Arc::new(Connectors), Arc::new(Quiet)).expect("service");
        let router = sluice_api::router(service.clone());
        Self {
            project,
            router,
            service,
            admin,
            read,
        }
    }

    /// Sends a request with `token` (none when `None`); the status and the body (JSON when it
    /// parses, else a JSON string).
    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let (status, _, bytes) = self.raw(method, path, token, body, None).await;
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, value)
    }

    pub(crate) async fn raw(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        accept: Option<&str>,
    ) -> (StatusCode, axum::http::HeaderMap, bytes::Bytes) {
        let mut request = Request::builder().method(method).uri(path);
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if let Some(accept) = accept {
            request = request.header(header::ACCEPT, accept);
        }
        let request = match body {
            Some(body) => request
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.to_string())),
            None => request.body(Body::empty()),
        }
        .expect("request");
        let response = self.router.clone().oneshot(request).await.expect("response");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.expect("body").to_bytes();
        (status, headers, bytes)
    }

    pub(crate) async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.call(method, path, Some(&self.admin.clone()), body).await
    }

    /// Polls a run until it is no longer running.
    pub(crate) async fn finished(&self, run_id: &str) -> Value {
        for _ in 0..600 {
            let (status, run) = self
                .admin(Method::GET, &format!("/api/v1/runs/{run_id}"), None)
                .await;
            assert_eq!(status, StatusCode::OK, "{run}");
            if run["status"] != "running" {
                return run;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("run {run_id} did not finish in 30 s");
    }

    /// Triggers a run of `mapping` and waits for it.
    pub(crate) async fn run(&self, mapping: &str, body: Value) -> Value {
        let (status, run) = self
            .admin(
                Method::POST,
                &format!("/api/v1/mappings/{mapping}/runs"),
                Some(body),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{run}");
        assert_eq!(run["status"], "running", "{run}");
        self.finished(run["id"].as_str().expect("id")).await
    }
}

pub(crate) async fn token(engine: &Engine, name: &str, scope: Scope) -> String {
    // (A reopened project has the tokens of its first opening.)
    engine.metadata().revoke_token(name).await.expect("revoke");
    engine.metadata().create_token(name, scope).await.expect("token")
}

/// An error answer's message.
pub(crate) fn message(body: &Value) -> &str {
    body["error"]["message"].as_str().unwrap_or("")
}

pub(crate) fn assert_error(status: StatusCode, body: &Value, expected: StatusCode, code: &str) {
    assert_eq!(status, expected, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(!message(body).is_empty(), "{body}");
}

pub(crate) fn config(url: &str) -> String {
    project_config(url, 10, 10)
}

#[tokio::test]
async fn tokens_are_required_and_scopes_enforced_but_health_checks_answer() {
    let receiver = AckReceiver::start(Duration::ZERO).await;
    let api = Api::start(&config(&receiver.url), 5).await;
    let (status, body) = api.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = api.call(Method::GET, "/readyz", None, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["metadata_store"], "ok");

    let (status, headers, bytes) = api.raw(Method::GET, "/api/v1/sources", None, None, None).await;
    let body: Value = serde_json::from_slice(&bytes).expect("json");
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");
    assert!(headers.get(header::WWW_AUTHENTICATE).is_some());
    let (status, body) = api
        .call(Method::GET, "/api/v1/sources", Some("sluice_not-a-token"), None)
        .await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");
    let (status, body) = api.call(Method::GET, "/metrics", None, None).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");

    // A read token reads and queries, and may not change or trigger anything.
    let (status, body) = api
        .call(Method::GET, "/api/v1/sources", Some(&api.read), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["items"][0]["name"], "warehouse");
    assert_eq!(body["items"][0]["origin"], "file");
    let (status, body) = api
        .call(
            Method::POST,
            "/api/v1/query",
            Some(&api.read),
            Some(json!({"sql": "SHOW TABLES"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = api
        .call(
            Method::POST,
            "/api/v1/mappings/users_to_crm/runs",
            Some(&api.read),
            Some(json!({})),
        )
        .await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    let (status, body) = api
        .call(
            Method::POST,
            "/api/v1/sources",
            Some(&api.read),
            Some(json!({"name": "x", "definition": {"type": "files", "tables": {}}})),
        )
        .await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "forbidden");
    let (status, body) = api.call(Method::GET, "/metrics", Some(&api.read), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // A token made by another process (here, straight in the store) is accepted at once; a
    // revoked one stops working.
    let engine = api.service.engine();
    let late = token(&engine, "late", Scope::Read).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (status, _) = api.call(Method::GET, "/api/v1/runs", Some(&late), None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(engine.metadata().revoke_token("late").await.expect("revoke"));
}

/// Sends a request with browser-like cookies (and a form body when given).
pub(crate) async fn browser(
    api: &Api,
    method: Method,
    path: &str,
    cookies: &str,
    form: Option<&str>,
    csrf_header: Option<&str>,
) -> (StatusCode, axum::http::HeaderMap, String) {
    let mut request = Request::builder().method(method).uri(path);
    if !cookies.is_empty() {
        request = request.header(header::COOKIE, cookies);
    }
    if let Some(csrf) = csrf_header {
        request = request.header("x-csrf-token", csrf);
    }
    let request = match form {
        Some(form) => request
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(form.to_string())),
        None => request.body(Body::empty()),
    }
    .expect("request");
    let response = api.router.clone().oneshot(request).await.expect("response");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.expect("body").to_bytes();
    (status, headers, String::from_utf8_lossy(&bytes).into_owned())
}

/// The `name=value` pairs a response sets, with each cookie's attributes.
pub(crate) fn set_cookies(headers: &axum::http::HeaderMap) -> Vec<(String, String, String)> {
    headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| {
            let (pair, attributes) = v.split_once(';').unwrap_or((v, ""));
            let (name, value) = pair.split_once('=')?;
            Some((name.to_string(), value.to_string(), attributes.to_string()))
        })
        .collect()
}

#[tokio::test]
async fn the_connector_catalog_describes_every_type_with_its_options_schema() {
    let receiver = AckReceiver::start(Duration::ZERO).await;
    let api = Api::start(&config(&receiver.url), 5).await;
    let read = api.read.clone();
    let (status, body) = api
        .call(Method::GET, "/api/v1/connectors", Some(&read), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let find = |section: &str, kind: &str| -> Value {
        body[section]
            .as_array()
            .and_then(|types| types.iter().find(|t| t["type"] == kind))
            .cloned()
            .unwrap_or_else(|| panic!("no {section} type {kind}: {body}"))
    };
    let types = |section: &str| -> Vec<String> {
        body[section]
            .as_array()
            .map(|t| {
                t.iter()
                    .map(|c| c["type"].as_str().unwrap_or_default().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(types("sources").len(), sluice_connectors::SOURCE_TYPES.len());
    assert_eq!(
        types("destinations").len(),
        sluice_connectors::DESTINATION_TYPES.len()
    );

    let postgres = find("sources", "postgres");
    assert_eq!(postgres["title"], "PostgreSQL");
    let options = &postgres["options"];
    // Unknown options are refused by the parser, and the schema says so.
    assert_eq!(options["additionalProperties"], false);
    assert_eq!(options["properties"]["password"]["writeOnly"], true);
    assert!(options["properties"]["host"].get("writeOnly").is_none());
    assert!(
        options["properties"]["port"]["description"]
            .as_str()
            .is_some_and(|d| d.contains("5432"))
    );

    let webhook = find("destinations", "webhook");
    assert_eq!(webhook["options"]["required"], json!(["url"]));
    assert_eq!(
        webhook["options"]["properties"]["headers"]["additionalProperties"]["writeOnly"],
        true
    );
    assert!(
        webhook.get("actions").is_none(),
        "the webhook takes sluice's envelope: no actions"
    );

    let hubspot = find("destinations", "hubspot");
    assert_eq!(
        hubspot["actions"],
        json!([{"name": "objects", "summary": hubspot["actions"][0]["summary"], "default": true}])
    );
    assert_eq!(hubspot["mapping_options"]["required"], json!(["object"]));
    let segment = find("destinations", "segment");
    let actions: Vec<&str> = segment["actions"]
        .as_array()
        .map(|a| a.iter().filter_map(|a| a["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(actions, ["identify", "track", "group", "page", "screen"]);
    assert!(
        segment["actions"]
            .as_array()
            .is_some_and(|a| a.iter().all(|a| a["default"] == false))
    );

    let (status, body) = api.call(Method::GET, "/api/v1/connectors", None, None).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");
}

#[tokio::test]
async fn a_draft_connection_is_tested_before_it_is_saved() {
    let receiver = AckReceiver::start(Duration::ZERO).await;
    let api = Api::start(&config(&receiver.url), 5).await;
    let draft = |kind: &str, name: &str, definition: Value| {
        let body = json!({"kind": kind, "name": name, "definition": definition});
        let api = &api;
        async move {
            api.admin(Method::POST, "/api/v1/connection-tests", Some(body))
                .await
        }
    };
    let (status, body) = draft(
        "destination",
        "hook",
        json!({"type": "webhook", "url": receiver.url}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"ok": true, "error": null}));
    // Nothing was saved.
    let (status, _) = api.admin(Method::GET, "/api/v1/destinations/hook", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // The system's own error, and options the connector refuses, come back as `ok: false`.
    let (status, body) = draft(
        "source",
        "db",
        json!({"type": "postgres", "url": "postgres://postgres@127.0.0.1:1/test"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["ok"], false);
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("127.0.0.1:1") || e.contains("refused")),
        "{body}"
    );
    let (_, body) = draft(
        "destination",
        "hook",
        json!({"type": "webhook", "url": receiver.url, "batch": 5}),
    )
    .await;
    assert_eq!(body["ok"], false);
    assert!(
        body["error"].as_str().is_some_and(|e| e.contains("batch")),
        "{body}"
    );
    let (_, body) = draft(
        "destination",
        "hook",
        json!({"type": "file", "url": "${EXPORT_DIR}"}),
    )
    .await;
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("taken literally")),
        "{body}"
    );

    // A placeholder secret is the one stored under that name.
    let hook = json!({"type": "webhook", "url": receiver.url, "headers": {"Authorization": "Bearer t0ken"}});
    let (status, body) = api
        .admin(
            Method::POST,
            "/api/v1/destinations",
            Some(json!({"name": "stored_hook", "definition": hook})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let shown = body["definition"].clone();
    assert_eq!(shown["headers"]["Authorization"], "********");
    let (_, body) = draft("destination", "stored_hook", shown.clone()).await;
    assert_eq!(body["ok"], true, "{body}");
    let (_, body) = draft("destination", "new_hook", shown).await;
    assert_eq!(body["ok"], false, "no stored secret under another name: {body}");
    assert!(
        body["error"].as_str().is_some_and(|e| e.contains("placeholder")),
        "{body}"
    );

    let (status, body) = draft(
        "destination",
        "crm",
        json!({"type": "webhook", "url": receiver.url}),
    )
    .await;
    assert_error(status, &body, StatusCode::CONFLICT, "defined_in_file");
    let (status, body) = draft("model", "m", json!({})).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
    let read = api.read.clone();
    let (status, body) = api
        .call(
            Method::POST,
            "/api/v1/connection-tests",
            Some(&read),
            Some(json!({"kind": "source", "name": "x", "definition": {"type": "sqlite", "path": "x.db"}})),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "a draft connects out: admin only: {body}"
    );
}

#[tokio::test]
async fn a_destinations_record_shape_says_what_a_mapping_must_fill() {
    let receiver = AckReceiver::start(Duration::ZERO).await;
    let api = Api::start(&config(&receiver.url), 5).await;
    for (name, definition) in [
        (
            "segment",
            json!({"type": "segment", "write_key": "wk", "url": receiver.url}),
        ),
        (
            "hubspot",
            json!({"type": "hubspot", "token": "pat", "url": receiver.url}),
        ),
        (
            "tiktok",
            json!({"type": "tiktok", "access_token": "tt", "event_source_id": "CJ1", "url": receiver.url}),
        ),
    ] {
        let (status, body) = api
            .admin(
                Method::POST,
                "/api/v1/destinations",
                Some(json!({"name": name, "definition": definition})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let read = api.read.clone();
    let shape = |destination: &str, body: Value| {
        let path = format!("/api/v1/destinations/{destination}/shape");
        let read = read.clone();
        let api = &api;
        async move { api.call(Method::POST, &path, Some(&read), Some(body)).await }
    };
    // A read token may ask: nothing is sent or saved.
    let (status, body) = shape("segment", json!({"action": "identify"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["action"], "identify");
    assert_eq!(body["container"], "traits");
    assert_eq!(body["identity"], json!(["userId", "anonymousId"]));
    assert!(
        body["top_level"]
            .as_array()
            .is_some_and(|t| t.iter().any(|f| f == "context")),
        "{body}"
    );
    let (_, body) = shape("segment", json!({"action": "track"})).await;
    assert_eq!(body["required"], json!(["event"]), "{body}");
    assert_eq!(body["events"], true);
    assert_eq!(body["formats"], json!([]), "{body}");
    // An ad platform's customer information is hashed, and the shape says so.
    let (status, body) = shape("tiktok", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let formats = body["formats"].as_array().cloned().unwrap_or_default();
    assert!(
        formats.contains(&json!({"field": "user.email", "format": "sha256_email"})),
        "{body}"
    );
    assert!(
        formats.contains(&json!({"field": "event_time", "format": "unix_seconds"})),
        "{body}"
    );

    let (status, body) = shape("segment", json!({})).await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_definition",
    );
    assert!(
        message(&body).contains("identify"),
        "the destination's own message names its actions: {body}"
    );
    let (status, body) = shape("hubspot", json!({})).await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_definition",
    );
    assert!(message(&body).contains("object"), "{body}");
    let (status, body) = shape("hubspot", json!({"options": {"object": "contacts"}})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["action"], "objects");
    assert_eq!(body["container"], "properties");

    // The webhook takes sluice's envelope: no action, fields as mapped.
    let (status, body) = shape("crm", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["action"], Value::Null);
    let (status, body) = shape("crm", json!({"action": "track"})).await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_definition",
    );
    let (status, body) = shape("nosuch", json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
}

#[tokio::test]
async fn a_running_mappings_progress_is_served_while_it_runs() {
    // 400 records at 10 a request, 40 ms a request: about 1.6 s of delivery.
    let receiver = AckReceiver::start(Duration::from_millis(40)).await;
    let config = project_config(&receiver.url, 10, 10)
        .replace("max_attempts: 3", "max_attempts: 3\n    concurrency: 1");
    let api = Api::start(&config, 400).await;
    let read = api.read.clone();
    let progress = || {
        let read = read.clone();
        let api = &api;
        async move {
            api.call(
                Method::GET,
                "/api/v1/mappings/users_to_crm/progress",
                Some(&read),
                None,
            )
            .await
        }
    };
    let (status, body) = progress().await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, Value::Null),
        "not running: no progress"
    );

    let (status, run) = api
        .admin(
            Method::POST,
            "/api/v1/mappings/users_to_crm/runs",
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{run}");
    let run_id = run["id"].as_str().expect("id").to_string();
    let mut seen = None;
    for _ in 0..500 {
        let (status, body) = progress().await;
        assert_eq!(status, StatusCode::OK, "{body}");
        if body["stage"] == "delivering" && body["delivered"].as_u64().is_some() {
            seen = Some(body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seen = seen.expect("the run was seen delivering");
    assert_eq!(seen["extracted_rows"], 400, "{seen}");
    assert!(seen["buckets"].as_u64().is_some_and(|b| b > 0), "{seen}");
    let done = api.finished(&run_id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let (_, body) = progress().await;
    assert_eq!(body, Value::Null, "a finished run has no progress");
    let (status, _) = api
        .call(Method::GET, "/api/v1/mappings/nosuch/progress", Some(&read), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn schedule_previews_describe_a_schedule_and_list_its_next_runs() {
    let receiver = AckReceiver::start(Duration::ZERO).await;
    let api = Api::start(&config(&receiver.url), 5).await;
    let preview = |body: Value| {
        let read = api.read.clone();
        let api = &api;
        async move {
            api.call(Method::POST, "/api/v1/schedules/preview", Some(&read), Some(body))
                .await
        }
    };
    // A read token may preview: it changes nothing.
    let (status, body) =
        preview(json!({"schedule": {"cron": "30 9 * * 1-5", "timezone": "Europe/Paris"}})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["description"], "cron `30 9 * * 1-5` (Europe/Paris)");
    let runs: Vec<chrono::DateTime<chrono::Utc>> =
        serde_json::from_value(body["next_runs"].clone()).expect("times");
    assert_eq!(runs.len(), 5);
    for (a, b) in runs.iter().zip(runs.iter().skip(1)) {
        assert!(a < b, "{runs:?}");
    }
    for run in &runs {
        // 09:30 in Paris is 08:30 UTC in winter, 07:30 in summer; weekdays only.
        let utc = run.format("%H:%M").to_string();
        assert!(utc == "08:30" || utc == "07:30", "{run}");
        assert!(chrono::Datelike::weekday(run).number_from_monday() <= 5, "{run}");
    }

    let (status, body) = preview(json!({"schedule": {"every": "15m"}, "count": 3})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["description"], "every 15m");
    let runs: Vec<chrono::DateTime<chrono::Utc>> =
        serde_json::from_value(body["next_runs"].clone()).expect("times");
    assert_eq!(runs.len(), 3);
    assert_eq!((runs[1] - runs[0]).num_minutes(), 15);

    let (status, body) = preview(json!({"schedule": "manual"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["description"], "manual");
    assert_eq!(body["next_runs"], json!([]));

    let (status, body) = preview(json!({"schedule": {"cron": "61 * * * *"}})).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
    assert!(message(&body).contains("schedule"), "{body}");
    let (status, body) = preview(json!({"schedule": {"every": "10s"}})).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
    let (status, body) = preview(json!({"schedule": "manual", "count": 0})).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
}

#[tokio::test]
async fn definitions_are_created_listed_replaced_and_deleted_with_secrets_write_only() {
    let receiver = AckReceiver::start(Duration::ZERO).await;
    let api = Api::start(&config(&receiver.url), 5).await;
    let definition = json!({
        "type": "webhook",
        "url": receiver.url,
        "headers": {"Authorization": "Bearer s3cret-value"},
        "batch_size": 50
    });
    let (status, created) = api
        .admin(
            Method::POST,
            "/api/v1/destinations",
            Some(json!({"name": "hooks", "definition": definition})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["origin"], "api");
    assert_eq!(created["definition"]["headers"]["Authorization"], "********");
    assert_eq!(created["definition"]["batch_size"], 50);
    assert!(!created.to_string().contains("s3cret"), "{created}");

    // Listed beside the file's, by name; sealed at rest.
    let (_, list) = api.admin(Method::GET, "/api/v1/destinations", None).await;
    let names: Vec<&str> = list["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|d| d["name"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(names, ["crm", "hooks"]);
    let engine = api.service.engine();
    let stored = engine.metadata().catalog().await.expect("catalog");
    let text = stored.definitions[0].spec.to_string();
    assert!(text.contains("$sealed") && !text.contains("s3cret"), "{text}");

    // A replacement that sends the placeholder back keeps the secret.
    let mut changed = created["definition"].clone();
    changed["batch_size"] = json!(25);
    let (status, replaced) = api
        .admin(
            Method::PUT,
            "/api/v1/destinations/hooks",
            Some(json!({"definition": changed})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{replaced}");
    assert_eq!(replaced["definition"]["batch_size"], 25);
    let opened =
        sluice_engine::secrets::open(&api.service.engine().catalog().definitions[0].spec, Some(&key()))
            .expect("open");
    assert_eq!(opened["headers"]["Authorization"], "Bearer s3cret-value");

    // A model and a mapping on it; the mapping runs like the file's.
    let (status, body) = api
        .admin(
            Method::POST,
            "/api/v1/models",
            Some(json!({"name": "pro_users", "definition": {
                "source": "warehouse",
                "sql": "SELECT id, plan, email FROM users WHERE id <= 3",
                "primary_key": "id"
            }})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = api
        .admin(
            Method::POST,
            "/api/v1/mappings",
            Some(json!({"name": "pro_to_hooks", "definition": {
                "model": "pro_users", "destination": "hooks", "fields": {"email": "email"}
            }})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["enabled"], true);
    let run = api.run("pro_to_hooks", json!({})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["counts"]["added"], 3, "{run}");
    assert_eq!(run["trigger"], "api", "{run}");

    // Things in use are not deleted; a mapping deleted forgets what it sent.
    let (status, body) = api
        .admin(Method::DELETE, "/api/v1/destinations/hooks", None)
        .await;
    assert_error(status, &body, StatusCode::CONFLICT, "in_use");
    let (status, body) = api.admin(Method::DELETE, "/api/v1/models/pro_users", None).await;
    assert_error(status, &body, StatusCode::CONFLICT, "in_use");
    for path in [
        "/api/v1/mappings/pro_to_hooks",
        "/api/v1/models/pro_users",
        "/api/v1/destinations/hooks",
    ] {
        let (status, body) = api.admin(Method::DELETE, path, None).await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{path}: {body}");
        let (status, body) = api.admin(Method::GET, path, None).await;
        assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    }
    assert!(
        api.service
            .engine()
            .metadata()
            .mapping_state("pro_to_hooks")
            .await
            .expect("state")
            .is_none()
    );
}

#[tokio::test]
async fn what_the_file_defines_cannot_be_changed_through_the_api() {
    let receiver = AckReceiver::start(Duration::ZERO).await;
    let api = Api::start(&config(&receiver.url), 5).await;
    let (status, body) = api.admin(Method::GET, "/api/v1/models/users", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["origin"], "file");
    assert_eq!(body["definition"]["primary_key"], "id");
    let (status, body) = api
        .admin(
            Method::PUT,
            "/api/v1/models/users",
            Some(json!({"definition": body["definition"]})),
        )
        .await;
    assert_error(status, &body, StatusCode::CONFLICT, "defined_in_file");
    assert!(message(&body).contains("sluice.yaml"), "{body}");
    let (status, body) = api
        .admin(Method::DELETE, "/api/v1/mappings/users_to_crm", None)
        .await;
    assert_error(status, &body, StatusCode::CONFLICT, "defined_in_file");
    let (status, body) = api
        .admin(
            Method::POST,
            "/api/v1/sources",
            Some(json!({"name": "warehouse", "definition": {"type": "files", "tables": {}}})),
        )
        .await;
    assert_error(status, &body, StatusCode::CONFLICT, "defined_in_file");
    // Its secrets are redacted like the API's (a URL keeps all but its password).
    let (status, body) = api.admin(Method::GET, "/api/v1/destinations/crm", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["definition"]["type"], "webhook");

    // A file mapping can be disabled and enabled: operating it, not defining it.
    let (status, body) = api
        .admin(
            Method::PATCH,
            "/api/v1/mappings/users_to_crm",
            Some(json!({"enabled": false})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["enabled"], false);
    let (status, body) = api
        .admin(
            Method::POST,
            "/api/v1/mappings/users_to_crm/runs",
            Some(json!({})),
        )
        .await;
    assert_error(status, &body, StatusCode::CONFLICT, "mapping_disabled");
    // `sluice run` sees the switch too (the same metadata store).
    let output = api.project.sluice(&["run", "users_to_crm"]).await;
    assert!(!output.status.success());
    assert!(
        crate::common::stderr(&output).contains("disabled"),
        "{}",
        crate::common::stderr(&output)
    );
    let (status, body) = api
        .admin(
            Method::PATCH,
            "/api/v1/mappings/users_to_crm",
            Some(json!({"enabled": true})),
        )
        .await;
    assert_eq!(
        (status, &body["enabled"]),
        (StatusCode::OK, &json!(true)),
        "{body}"
    );
    let run = api.run("users_to_crm", json!({})).await;
    assert_eq!(run["status"], "succeeded", "{run}");
}

#[tokio::test]
async fn bad_requests_get_json_errors_that_say_what_is_wrong() {
    let receiver = AckReceiver::start(Duration::ZERO).await;
    let api = Api::start(&config(&receiver.url), 5).await;
    let admin = api.admin.clone();
    // A model of a source that does not exist; a mapping with an unknown key.
    let (status, body) = api
        .admin(
            Method::POST,
            "/api/v1/models",
            Some(json!({"name": "m", "definition": {"source": "nope", "sql": "SELECT 1 AS id", "primary_key": "id"}})),
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_definition",
    );
    assert!(message(&body).contains("source `nope`"), "{body}");
    let (status, body) = api
        .admin(
            Method::POST,
            "/api/v1/mappings",
            Some(json!({"name": "m", "definition": {"model": "users", "destination": "crm", "feilds": {}}})),
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_definition",
    );
    assert!(message(&body).contains("feilds"), "{body}");
    // A connector option the connector does not know.
    let (status, body) = api
        .admin(
            Method::POST,
            "/api/v1/destinations",
            Some(json!({"name": "d", "definition": {"type": "webhook", "url": "http://127.0.0.1:1/x", "bach_size": 3}})),
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_definition",
    );
    // Environment references are not expanded for the API's definitions.
    let (status, body) = api
        .admin(
            Method::POST,
            "/api/v1/destinations",
            Some(json!({"name": "d", "definition": {"type": "file", "url": "${HOME}/exports"}})),
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_definition",
    );
    // Names become paths: refused when not plain.
    let (status, body) = api
        .admin(
            Method::POST,
            "/api/v1/sources",
            Some(json!({"name": "../etc", "definition": {"type": "files", "tables": {}}})),
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_definition",
    );

    // Malformed bodies, missing fields, wrong content types, oversized bodies.
    let request = Request::builder()
        .method(Method::POST)
        .uri("/api/v1/sources")
        .header(header::AUTHORIZATION, format!("Bearer {admin}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{not json"))
        .expect("request");
    let response = api.router.clone().oneshot(request).await.expect("response");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let (status, body) = api
        .admin(Method::POST, "/api/v1/sources", Some(json!({"name": "x"})))
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
    let request = Request::builder()
        .method(Method::POST)
        .uri("/api/v1/sources")
        .header(header::AUTHORIZATION, format!("Bearer {admin}"))
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from("{}"))
        .expect("request");
    let response = api.router.clone().oneshot(request).await.expect("response");
    assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let huge = json!({"name": "x", "definition": {"type": "files", "tables": {}, "pad": "a".repeat(2 * 1024 * 1024)}});
    let (status, body) = api.admin(Method::POST, "/api/v1/sources", Some(huge)).await;
    assert_error(status, &body, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large");

    // Paging limits, unknown runs, routes and methods.
    let (status, body) = api.admin(Method::GET, "/api/v1/runs?limit=100000", None).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
    let (status, body) = api.admin(Method::GET, "/api/v1/runs?cursor=garbage", None).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
    let (status, body) = api.admin(Method::GET, "/api/v1/runs?status=sleeping", None).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
    let (status, body) = api.admin(Method::GET, "/api/v1/runs/no-such-run", None).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, body) = api.admin(Method::GET, "/api/v1/nothing-here", None).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, body) = api.admin(Method::DELETE, "/api/v1/runs", None).await;
    assert_error(
        status,
        &body,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
    let (status, body) = api
        .admin(
            Method::POST,
            "/api/v1/mappings/users_to_crm/runs",
            Some(json!({"filter": "plan = 'pro'"})),
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
    let (status, body) = api
        .admin(
            Method::POST,
            "/api/v1/mappings/users_to_crm/runs",
            Some(json!({"full": true, "filter": "plan = 'pro'; DROP TABLE users"})),
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
    let (status, body) = api
        .admin(
            Method::POST,
            "/api/v1/models/users/preview",
            Some(json!({"limit": 5000})),
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
}

#[tokio::test]
async fn secrets_cannot_be_stored_without_a_key() {
    let receiver = AckReceiver::start(Duration::ZERO).await;
    let project = TestProject::new(&config(&receiver.url));
    let api = Api::open(project, None).await;
    let (status, body) = api
        .admin(
            Method::POST,
            "/api/v1/destinations",
            Some(json!({"name": "hs", "definition": {"type": "hubspot", "token": "pat-123"}})),
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_definition",
    );
    assert!(message(&body).contains("SLUICE_SECRET_KEY"), "{body}");
    // A webhook's address is a credential as a whole: it needs the key too.
    let (status, body) = api
        .admin(
            Method::POST,
            "/api/v1/destinations",
            Some(json!({"name": "hook", "definition": {"type": "webhook", "url": receiver.url}})),
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_definition",
    );
    // Without secrets, a definition needs no key.
    let (status, body) = api
        .admin(
            Method::POST,
            "/api/v1/destinations",
            Some(json!({"name": "plain", "definition": {"type": "file", "url": "exports/"}})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

#[tokio::test]
async fn definitions_made_through_the_api_survive_a_restart_and_the_cli_sees_them() {
    let receiver = AckReceiver::start(Duration::ZERO).await;
    let api = Api::start(&config(&receiver.url), 4).await;
    let (status, body) = api
        .admin(
            Method::POST,
            "/api/v1/mappings",
            Some(json!({"name": "again", "definition": {"model": "users", "destination": "crm"}})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let project = api.project;
    drop(api.router);
    api.service.engine().close().await;
    drop(api.service);

    let api = Api::open(project, Some(key())).await;
    let (status, body) = api.admin(Method::GET, "/api/v1/mappings/again", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["origin"], "api");
    let output = api.project.sluice(&["run", "again"]).await;
    assert!(output.status.success(), "{}", crate::common::stderr(&output));
    let runs = api.project.sluice(&["runs", "again"]).await;
    let row = crate::common::result_row(&runs, "again");
    assert_eq!(row.get(1).map(String::as_str), Some("succeeded"), "{row:?}");
}

#[tokio::test]
async fn previews_and_connection_tests_report_what_the_systems_say() {
    let receiver = AckReceiver::start(Duration::ZERO).await;
    let api = Api::start(&config(&receiver.url), 5).await;
    let (status, body) = api
        .admin(
            Method::POST,
            "/api/v1/models/users/preview",
            Some(json!({"limit": 2})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["rows"].as_array().map(Vec::len), Some(2), "{body}");
    assert_eq!(body["columns"][0]["name"], "id");
    assert_eq!(body["columns"][0]["type"], "Int64");
    assert_eq!(body["rows"][0]["id"], 1);
    // No body: ten rows at most.
    let (status, body) = api
        .admin(Method::POST, "/api/v1/models/users/preview", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["rows"].as_array().map(Vec::len), Some(5));
    let (status, body) = api
        .admin(Method::POST, "/api/v1/sources/warehouse/test", None)
        .await;
    assert_eq!((status, &body["ok"]), (StatusCode::OK, &json!(true)), "{body}");

    // A draft query, not a model yet: its rows and column types, for picking a primary key.
    let (status, body) = api
        .admin(
            Method::POST,
            "/api/v1/sources/warehouse/preview",
            Some(json!({"sql": "SELECT id, email FROM users", "limit": 3})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["rows"].as_array().map(Vec::len), Some(3), "{body}");
    assert_eq!(body["columns"][1]["name"], "email", "{body}");
    let (status, body) = api
        .admin(
            Method::POST,
            "/api/v1/sources/warehouse/preview",
            Some(json!({"sql": "SELECT nope FROM users"})),
        )
        .await;
    assert_error(status, &body, StatusCode::UNPROCESSABLE_ENTITY, "upstream_error");
    let (status, body) = api
        .admin(
            Method::POST,
            "/api/v1/sources/warehouse/preview",
            Some(json!({"sql": " "})),
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");

    // A test record: one row rendered through the mapping, exactly as it would be sent.
    let (status, body) = api
        .admin(
            Method::POST,
            "/api/v1/mappings/users_to_crm/test-record",
            Some(json!({"key": ["3"], "op": "updated"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["key"], json!({"id": 3}), "{body}");
    assert_eq!(body["requests"][0]["method"], "POST", "{body}");
    assert_eq!(body["requests"][0]["records"], 1, "{body}");
    let record = &body["requests"][0]["body"]["records"][0];
    assert_eq!(
        (&record["op"], &record["key"]["id"]),
        (&json!("updated"), &json!(3)),
        "{body}"
    );
    assert!(body["unsendable"].is_null(), "{body}");
    // No body: the model's first row, as added.
    let (status, body) = api
        .admin(Method::POST, "/api/v1/mappings/users_to_crm/test-record", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["requests"][0]["body"]["records"][0]["op"], "added", "{body}");
    let (status, body) = api
        .admin(
            Method::POST,
            "/api/v1/mappings/users_to_crm/test-record",
            Some(json!({"op": "upserted"})),
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
    let (status, body) = api
        .admin(
            Method::POST,
            "/api/v1/mappings/users_to_crm/test-record",
            Some(json!({"key": ["1", "2"]})),
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");

    // A destination nobody listens at: the test says so, with the system's error.
    let (status, body) = api
        .admin(
            Method::POST,
            "/api/v1/destinations",
            Some(json!({"name": "nowhere", "definition": {"type": "postgres", "url": "postgres://postgres@127.0.0.1:1/test"}})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = api
        .admin(Method::POST, "/api/v1/destinations/nowhere/test", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["ok"], false, "{body}");
    assert!(
        body["error"].as_str().is_some_and(|e| e.contains("nowhere")),
        "{body}"
    );
    // A model whose query fails: 422 with the source's error.
    let (status, body) = api
        .admin(
            Method::POST,
            "/api/v1/models",
            Some(json!({"name": "broken", "definition": {"source": "warehouse", "sql": "SELECT nope FROM users", "primary_key": "nope"}})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = api
        .admin(Method::POST, "/api/v1/models/broken/preview", None)
        .await;
    assert_error(status, &body, StatusCode::UNPROCESSABLE_ENTITY, "upstream_error");
}

#[tokio::test]
async fn a_trigger_during_a_run_conflicts_and_a_cancelled_run_loses_nothing() {
    // 400 records at 10 a request, 40 ms a request: about 1.6 s of delivery.
    let receiver = AckReceiver::start(Duration::from_millis(40)).await;
    let config = project_config(&receiver.url, 10, 10)
        .replace("max_attempts: 3", "max_attempts: 3\n    concurrency: 1");
    let api = Api::start(&config, 400).await;
    let (status, run) = api
        .admin(
            Method::POST,
            "/api/v1/mappings/users_to_crm/runs",
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{run}");
    let run_id = run["id"].as_str().expect("id").to_string();
    let (status, body) = api
        .admin(
            Method::POST,
            "/api/v1/mappings/users_to_crm/runs",
            Some(json!({"full": true})),
        )
        .await;
    assert_error(status, &body, StatusCode::CONFLICT, "run_in_progress");
    assert_eq!(body["error"]["details"]["run_id"], run_id.as_str(), "{body}");

    // Cancel once some records are through.
    while receiver.acks().len() < 50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = api
        .admin(Method::POST, &format!("/api/v1/runs/{run_id}/cancel"), None)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["cancel_requested"], true);
    let done = api.finished(&run_id).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    let delivered = done["counts"]["delivered"].as_u64().unwrap_or(0);
    assert!((50..400).contains(&delivered), "{done}");
    let (status, body) = api
        .admin(Method::POST, &format!("/api/v1/runs/{run_id}/cancel"), None)
        .await;
    assert_error(status, &body, StatusCode::CONFLICT, "run_finished");

    // The next run sends the rest, and only the rest (at most the batch in flight again).
    let next = api.run("users_to_crm", json!({})).await;
    assert_eq!(next["status"], "succeeded", "{next}");
    let acks = receiver.acks();
    let ids: std::collections::BTreeSet<i64> = acks.iter().map(|a| a.id).collect();
    assert_eq!(ids.len(), 400);
    assert!(acks.len() <= 410, "{} records were sent", acks.len());
}

#[tokio::test]
async fn runs_page_by_cursor_and_failures_come_as_json_pages_or_csv() {
    let receiver = AckReceiver::start(Duration::ZERO).await;
    let api = Api::start(&config(&receiver.url), 30).await;
    // The receiver refuses records of even ids.
    receiver.behave(|records: &[Value]| {
        Answer::Refuse(
            records
                .iter()
                .enumerate()
                .filter(|(_, r)| r["key"]["id"].as_i64().unwrap_or(0) % 2 == 0)
                .map(|(i, _)| (i, "invalid email".to_string()))
                .collect(),
        )
    });
    let first = api.run("users_to_crm", json!({})).await;
    assert_eq!(first["status"], "partial", "{first}");
    assert_eq!(first["counts"]["failed"], 15, "{first}");
    assert!(
        first["recommended_action"]
            .as_str()
            .is_some_and(|a| a.contains("invalid email")),
        "{first}"
    );
    receiver.behave(|_: &[Value]| Answer::Refuse(Vec::new()));
    let second = api.run("users_to_crm", json!({})).await;
    assert_eq!(second["status"], "succeeded", "{second}");
    assert_eq!(second["counts"]["retried"], 15, "{second}");
    let third = api.run("users_to_crm", json!({"full": true})).await;
    assert_eq!(third["trigger"], "backfill", "{third}");
    assert_eq!(third["counts"]["added"], 30, "{third}");

    // Pages of one, newest first, through the cursor.
    let mut ids = Vec::new();
    let mut path = "/api/v1/runs?limit=1&mapping=users_to_crm".to_string();
    loop {
        let (status, page) = api.call(Method::GET, &path, Some(&api.read.clone()), None).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        ids.extend(
            page["runs"]
                .as_array()
                .expect("runs")
                .iter()
                .map(|r| r["id"].as_str().unwrap_or("").to_string()),
        );
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/api/v1/runs?limit=1&mapping=users_to_crm&cursor={cursor}"),
            None => break,
        }
    }
    let expected: Vec<String> = [&third, &second, &first]
        .iter()
        .map(|r| r["id"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(ids, expected);
    let (_, partial) = api.admin(Method::GET, "/api/v1/runs?status=partial", None).await;
    assert_eq!(partial["runs"].as_array().map(Vec::len), Some(1), "{partial}");

    // Failures: JSON pages, then all of them as CSV.
    let failures_path = format!("/api/v1/runs/{}/failures", first["id"].as_str().unwrap_or(""));
    let (status, page) = api
        .admin(Method::GET, &format!("{failures_path}?limit=10"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["failures"].as_array().map(Vec::len), Some(10));
    assert_eq!(page["failures"][0]["error"], "invalid email");
    assert_eq!(page["failures"][0]["operation"], "added");
    assert!(page["failures"][0]["key"]["id"].is_i64(), "{page}");
    assert!(
        page["failures"][0]["payload"]
            .as_str()
            .is_some_and(|p| p.contains("user2@example.com")),
        "{page}"
    );
    let cursor = page["next_cursor"].as_str().expect("a second page").to_string();
    let (_, rest) = api
        .admin(
            Method::GET,
            &format!("{failures_path}?limit=10&cursor={cursor}"),
            None,
        )
        .await;
    assert_eq!(rest["failures"].as_array().map(Vec::len), Some(5));
    assert!(rest["next_cursor"].is_null());
    let (status, headers, csv) = api
        .raw(
            Method::GET,
            &failures_path,
            Some(&api.read.clone()),
            None,
            Some("text/csv"),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap_or("")
            .starts_with("text/csv")
    );
    let mut reader = csv::Reader::from_reader(csv.as_ref());
    assert_eq!(
        reader.headers().expect("header").iter().collect::<Vec<_>>(),
        [
            "key",
            "operation",
            "error",
            "attempts",
            "first_failed_at",
            "last_failed_at",
            "payload"
        ]
    );
    let rows: Vec<csv::StringRecord> = reader.records().map(|r| r.expect("row")).collect();
    assert_eq!(rows.len(), 15);
    assert_eq!(&rows[0][2], "invalid email");
}

#[tokio::test]
async fn a_filtered_backfill_resends_matching_rows_and_a_dry_run_keeps_its_requests() {
    let receiver = AckReceiver::start(Duration::ZERO).await;
    let api = Api::start(&config(&receiver.url), 20).await;
    let first = api.run("users_to_crm", json!({})).await;
    assert_eq!(first["counts"]["added"], 20, "{first}");
    // Nothing changed; a backfill of ids 1-5 sends exactly those again, as added.
    let before = receiver.acks().len();
    let backfill = api
        .run("users_to_crm", json!({"full": true, "filter": "id <= 5"}))
        .await;
    assert_eq!(backfill["status"], "succeeded", "{backfill}");
    assert_eq!(backfill["filter"], "id <= 5");
    assert_eq!(backfill["counts"]["added"], 5, "{backfill}");
    let resent: Vec<i64> = receiver.acks()[before..].iter().map(|a| a.id).collect();
    assert_eq!(resent, [1, 2, 3, 4, 5]);
    assert!(receiver.acks()[before..].iter().all(|a| a.op == "added"));
    // A filter on a column the model does not have is refused before the run starts.
    let (status, body) = api
        .admin(
            Method::POST,
            "/api/v1/mappings/users_to_crm/runs",
            Some(json!({"full": true, "filter": "nonexistent > 1"})),
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
    assert!(message(&body).contains("nonexistent"), "{body}");

    // A dry run computes the same requests and sends nothing.
    let before = receiver.acks().len();
    let dry = api
        .run("users_to_crm", json!({"full": true, "dry_run": true}))
        .await;
    assert_eq!(dry["status"], "succeeded", "{dry}");
    assert_eq!(dry["dry_run"], true);
    assert_eq!(receiver.acks().len(), before);
    let (status, headers, body) = api
        .raw(
            Method::GET,
            &format!("/api/v1/runs/{}/requests", dry["id"].as_str().unwrap_or("")),
            Some(&api.read.clone()),
            None,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "application/x-ndjson");
    let lines: Vec<Value> = String::from_utf8_lossy(&body)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let records: u64 = lines
        .iter()
        .map(|l| l["request"]["records"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(records, 20, "{lines:?}");
    let (status, body) = api
        .admin(
            Method::GET,
            &format!("/api/v1/runs/{}/requests", first["id"].as_str().unwrap_or("")),
            None,
        )
        .await;
    assert_error(status, &body, StatusCode::CONFLICT, "not_a_dry_run");
}

#[tokio::test]
async fn history_queries_stream_as_json_lines_csv_or_arrow_and_are_read_only() {
    let receiver = AckReceiver::start(Duration::ZERO).await;
    let api = Api::start(&config(&receiver.url), 12).await;
    api.run("users_to_crm", json!({})).await;
    api.run("users_to_crm", json!({})).await;
    let read = api.read.clone();
    let sql =
        json!({"sql": "SELECT id, _run_id FROM users_history WHERE id <= 3 ORDER BY _extracted_at, id"});
    let (status, headers, body) = api
        .raw(
            Method::POST,
            "/api/v1/query",
            Some(&read),
            Some(sql.clone()),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "application/x-ndjson");
    let lines: Vec<Value> = String::from_utf8_lossy(&body)
        .lines()
        .map(|l| serde_json::from_str(l).expect("line"))
        .collect();
    assert_eq!(lines.len(), 6, "two snapshots of three rows: {lines:?}");
    assert_eq!(lines[0]["id"], 1);
    let (status, _, body) = api
        .raw(
            Method::POST,
            "/api/v1/query",
            Some(&read),
            Some(sql.clone()),
            Some("text/csv"),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8_lossy(&body);
    assert_eq!(text.lines().next(), Some("id,_run_id"));
    assert_eq!(text.lines().count(), 7);
    let (status, headers, body) = api
        .raw(
            Method::POST,
            "/api/v1/query",
            Some(&read),
            Some(sql),
            Some("application/vnd.apache.arrow.stream"),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        headers[header::CONTENT_TYPE],
        "application/vnd.apache.arrow.stream"
    );
    let reader =
        arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(body.to_vec()), None).expect("arrow");
    let rows: usize = reader.map(|b| b.expect("batch").num_rows()).sum();
    assert_eq!(rows, 6);
    let (status, _, body) = api
        .raw(
            Method::POST,
            "/api/v1/query",
            Some(&read),
            Some(json!({"sql": "SELECT * FROM users", "max_rows": 4})),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(String::from_utf8_lossy(&body).lines().count(), 4);

    // The tables, from the manifests, for a read token; the model without snapshots has none.
    let (status, tables) = api
        .call(Method::GET, "/api/v1/query/tables", Some(&read), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{tables}");
    let tables = tables.as_array().expect("a list");
    let names: Vec<&str> = tables.iter().filter_map(|t| t["name"].as_str()).collect();
    assert_eq!(names, ["users", "users_history"], "{tables:?}");
    assert_eq!(tables[0]["rows"], 12);
    assert_eq!(tables[0]["snapshots"], 1);
    assert_eq!(tables[1]["history"], true);
    assert_eq!(tables[1]["snapshots"], 2);
    assert_eq!(tables[1]["rows"], 24);
    let columns: Vec<&str> = tables[1]["columns"]
        .as_array()
        .expect("columns")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert!(columns.starts_with(&["id"]), "{columns:?}");
    assert!(
        columns.ends_with(&["_snapshot_id", "_run_id", "_extracted_at"]),
        "{columns:?}"
    );
    // Every column the listing names is one a query can select.
    let select = format!("SELECT {} FROM users_history LIMIT 1", columns.join(", "));
    let (status, _, body) = api
        .raw(
            Method::POST,
            "/api/v1/query",
            Some(&read),
            Some(json!({"sql": select})),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));

    for refused in [
        "CREATE EXTERNAL TABLE x STORED AS CSV LOCATION '/etc/passwd'",
        "SELECT * FROM '/etc/passwd'",
        "COPY (SELECT 1) TO '/tmp/sluice-copy-test.csv'",
        "INSERT INTO users VALUES (1)",
        "DROP TABLE users",
        "SET datafusion.execution.batch_size = 1",
        "SELECT * FROM nosuchtable",
    ] {
        let (status, body) = api
            .call(
                Method::POST,
                "/api/v1/query",
                Some(&read),
                Some(json!({"sql": refused})),
            )
            .await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
    }
    assert!(!std::path::Path::new("/tmp/sluice-copy-test.csv").exists());
    let (status, _, body) = api
        .raw(
            Method::POST,
            "/api/v1/query",
            Some(&read),
            Some(json!({"sql": "SELECT 1"})),
            Some("image/png"),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::NOT_ACCEPTABLE,
        "{}",
        String::from_utf8_lossy(&body)
    );
}

/// Every route the README documents is in the OpenAPI document, and every operation in the
/// document is routed (no 404 from the router's fallback, no 405).
#[tokio::test]
async fn the_openapi_document_matches_the_routes() {
    let receiver = AckReceiver::start(Duration::ZERO).await;
    let api = Api::start(&config(&receiver.url), 3).await;
    let (status, document) = api
        .call(Method::GET, "/api/v1/openapi.json", Some(&api.read.clone()), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{document}");
    assert_eq!(document["openapi"], "3.1.0");
    assert_eq!(
        document,
        serde_json::to_value(sluice_api::openapi()).expect("document")
    );
    let paths = document["paths"].as_object().expect("paths");
    let expected = [
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/metrics"),
        ("get", "/api/v1/openapi.json"),
        ("post", "/api/v1/query"),
        ("get", "/api/v1/query/tables"),
        ("post", "/api/v1/schedules/preview"),
        ("get", "/api/v1/connectors"),
        ("post", "/api/v1/connection-tests"),
        ("post", "/api/v1/destinations/{name}/shape"),
        ("get", "/api/v1/mappings/{name}/progress"),
        ("get", "/api/v1/runs"),
        ("get", "/api/v1/runs/{id}"),
        ("get", "/api/v1/runs/{id}/failures"),
        ("get", "/api/v1/runs/{id}/requests"),
        ("post", "/api/v1/runs/{id}/cancel"),
        ("post", "/api/v1/mappings/{name}/runs"),
        ("patch", "/api/v1/mappings/{name}"),
        ("post", "/api/v1/sources/{name}/test"),
        ("post", "/api/v1/destinations/{name}/test"),
        ("post", "/api/v1/models/{name}/preview"),
        ("post", "/api/v1/mappings/{name}/test-record"),
        ("post", "/api/v1/sources/{name}/preview"),
        ("post", "/api/v1/triggers/dbt"),
        ("get", "/api/v1/dbt/models"),
    ];
    let mut all = expected.to_vec();
    for collection in ["sources", "models", "destinations", "mappings"] {
        let list: &'static str = Box::leak(format!("/api/v1/{collection}").into_boxed_str());
        let one: &'static str = Box::leak(format!("/api/v1/{collection}/{{name}}").into_boxed_str());
        all.extend([
            ("get", list),
            ("post", list),
            ("get", one),
            ("put", one),
            ("delete", one),
        ]);
    }
    for (method, path) in &all {
        assert!(
            paths.get(*path).and_then(|p| p.get(*method)).is_some(),
            "{method} {path} is missing from the OpenAPI document"
        );
    }
    let mut operations = 0;
    for (path, item) in paths {
        for (method, operation) in item.as_object().expect("path item") {
            operations += 1;
            assert!(
                operation["responses"]["default"].is_object(),
                "{method} {path} documents no error answer"
            );
            let concrete = path.replace("{name}", "nosuch").replace("{id}", "nosuch");
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
            let (status, body) = api.admin(method.clone(), &concrete, Some(json!({}))).await;
            assert_ne!(
                status,
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path} is documented but not routed"
            );
            assert!(
                !(status == StatusCode::NOT_FOUND
                    && body["error"]["message"]
                        .as_str()
                        .is_some_and(|m| m.starts_with("no such route"))),
                "{method} {path} is documented but not routed"
            );
        }
    }
    assert_eq!(
        operations,
        all.len(),
        "the document has operations the test does not know"
    );
}

/// `sluice serve` on a loopback port: a source, model, destination and mapping created through
/// the API, a run and a backfill triggered and polled to completion, the failures downloaded as
/// CSV, and the history table queried.
#[tokio::test]
async fn serve_drives_a_whole_sync_through_the_api() {
    let receiver = AckReceiver::start(Duration::ZERO).await;
    receiver.behave(|records: &[Value]| {
        Answer::Refuse(
            records
                .iter()
                .enumerate()
                .filter(|(_, r)| r["key"]["id"].as_i64() == Some(7))
                .map(|(i, _)| (i, "record 7 is refused".to_string()))
                .collect(),
        )
    });
    let project = TestProject::new(
        "state_dir: .sluice\napi:\n  tokens:\n    - { name: e2e, token: \"${SLUICE_E2E_TOKEN}\", scope: admin }\n",
    );
    let model: Model = (1..=25)
        .map(|id| (id, if id % 3 == 0 { "pro" } else { "free" }.to_string()))
        .collect();
    write_model(&project, &model);
    let token = "e2e-token-0123456789abcdef";
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let mut serve = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--config"])
        .arg(project.config_path())
        .env("SLUICE_E2E_TOKEN", token)
        .env(
            "SLUICE_SECRET_KEY",
            "KioqKioqKioqKioqKioqKioqKioqKioqKioqKioqKio=",
        )
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("spawn serve");
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let mut up = false;
    for _ in 0..200 {
        if client.get(format!("{base}/healthz")).send().await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "sluice serve did not come up");
    let call = |method: reqwest::Method, path: &str, body: Option<Value>| {
        let mut request = client.request(method, format!("{base}{path}")).bearer_auth(token);
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        async move {
            let response = request.send().await.expect("request");
            let status = response.status().as_u16();
            let text = response.text().await.expect("body");
            (
                status,
                serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text)),
            )
        }
    };
    let data = project.path().join("data/users.parquet");
    for (collection, body) in [
        (
            "sources",
            json!({"name": "lake", "definition": {"type": "files", "tables": {"users": data.display().to_string()}}}),
        ),
        (
            "models",
            json!({"name": "accounts", "definition": {"source": "lake", "sql": "SELECT id, plan, email FROM users", "primary_key": "id"}}),
        ),
        (
            "destinations",
            json!({"name": "hook", "definition": {"type": "webhook", "url": receiver.url, "batch_size": 5, "headers": {"X-Api-Key": "k-123"}}}),
        ),
        (
            "mappings",
            json!({"name": "accounts_to_hook", "definition": {"model": "accounts", "destination": "hook", "fields": {"email": "email", "traits.plan": "plan"}}}),
        ),
    ] {
        let (status, created) = call(
            reqwest::Method::POST,
            &format!("/api/v1/{collection}"),
            Some(body),
        )
        .await;
        assert_eq!(status, 201, "{collection}: {created}");
    }
    let (status, body) = call(reqwest::Method::POST, "/api/v1/sources/lake/test", None).await;
    assert_eq!((status, &body["ok"]), (200, &json!(true)), "{body}");

    let poll = |id: String| {
        let call = &call;
        async move {
            for _ in 0..400 {
                let (status, run) = call(reqwest::Method::GET, &format!("/api/v1/runs/{id}"), None).await;
                assert_eq!(status, 200, "{run}");
                if run["status"] != "running" {
                    return run;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("run {id} did not finish");
        }
    };
    let (status, run) = call(
        reqwest::Method::POST,
        "/api/v1/mappings/accounts_to_hook/runs",
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 202, "{run}");
    let run = poll(run["id"].as_str().expect("id").to_string()).await;
    assert_eq!(run["status"], "partial", "{run}");
    assert_eq!(
        (run["counts"]["added"].as_u64(), run["counts"]["failed"].as_u64()),
        (Some(25), Some(1)),
        "{run}"
    );
    assert!(
        receiver
            .acks()
            .iter()
            .all(|a| a.data["traits"]["plan"].is_string())
    );

    let (status, backfill) = call(
        reqwest::Method::POST,
        "/api/v1/mappings/accounts_to_hook/runs",
        Some(json!({"full": true})),
    )
    .await;
    assert_eq!(status, 202, "{backfill}");
    let backfill = poll(backfill["id"].as_str().expect("id").to_string()).await;
    assert_eq!(backfill["trigger"], "backfill", "{backfill}");
    assert_eq!(backfill["counts"]["added"], 25, "{backfill}");

    let csv = client
        .get(format!(
            "{base}/api/v1/runs/{}/failures",
            run["id"].as_str().unwrap_or("")
        ))
        .bearer_auth(token)
        .header("accept", "text/csv")
        .send()
        .await
        .expect("failures");
    assert_eq!(csv.status().as_u16(), 200);
    let csv = csv.text().await.expect("csv");
    assert!(csv.starts_with("key,operation,error"), "{csv}");
    assert!(csv.contains("record 7 is refused"), "{csv}");

    let history = client
        .post(format!("{base}/api/v1/query"))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(
            json!({"sql": "SELECT COUNT(DISTINCT _run_id) AS runs, COUNT(*) AS rows FROM accounts_history"})
                .to_string(),
        )
        .send()
        .await
        .expect("query");
    assert_eq!(history.status().as_u16(), 200);
    let line: Value = serde_json::from_str(history.text().await.expect("text").trim()).expect("a JSON line");
    assert_eq!(
        (line["runs"].as_i64(), line["rows"].as_i64()),
        (Some(2), Some(50)),
        "{line}"
    );

    // Secrets never come back; the CLI sees what the API made.
    let (_, hook) = call(reqwest::Method::GET, "/api/v1/destinations/hook", None).await;
    assert_eq!(hook["definition"]["headers"]["X-Api-Key"], "********", "{hook}");
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["check", "accounts_to_hook", "--config"])
        .arg(project.config_path())
        .env("SLUICE_E2E_TOKEN", token)
        .env(
            "SLUICE_SECRET_KEY",
            "KioqKioqKioqKioqKioqKioqKioqKioqKioqKioqKio=",
        )
        .output()
        .await
        .expect("check");
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("ok      mapping accounts_to_hook"),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    crate::faults::terminate(&serve);
    let status = tokio::time::timeout(Duration::from_secs(30), serve.wait())
        .await
        .expect("serve stops on SIGTERM")
        .expect("wait");
    assert!(status.success(), "{status}");
}

/// A mapping made through the API with a schedule is taken up by the scheduler that is already
/// running, without a restart.
#[tokio::test]
async fn a_schedule_made_through_the_api_is_taken_up_by_the_running_scheduler() {
    let receiver = AckReceiver::start(Duration::ZERO).await;
    let api = Api::start(&config(&receiver.url), 5).await;
    let scheduler = tokio::spawn(api.service.clone().run_schedules());
    let (status, body) = api
        .admin(
            Method::POST,
            "/api/v1/mappings",
            Some(json!({"name": "every_second", "definition": {
                "model": "users", "destination": "crm", "schedule": {"cron": "* * * * * *"}
            }})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let mut scheduled = Value::Null;
    for _ in 0..100 {
        let (_, page) = api
            .admin(
                Method::GET,
                "/api/v1/runs?mapping=every_second&status=succeeded",
                None,
            )
            .await;
        if let Some(run) = page["runs"].as_array().and_then(|r| r.first()) {
            scheduled = run.clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(scheduled["trigger"], "schedule", "no scheduled run: {scheduled}");
    // Disabled through the API: the scheduler stops running it.
    let (status, _) = api
        .admin(
            Method::PATCH,
            "/api/v1/mappings/every_second",
            Some(json!({"enabled": false})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, before) = api
        .admin(Method::GET, "/api/v1/runs?mapping=every_second", None)
        .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_, after) = api
        .admin(Method::GET, "/api/v1/runs?mapping=every_second", None)
        .await;
    assert_eq!(before["runs"], after["runs"], "a disabled mapping ran");
    api.service.engine().shutdown().request();
    tokio::time::timeout(Duration::from_secs(30), scheduler)
        .await
        .expect("the scheduler stops")
        .expect("join")
        .expect("scheduler");
}

/// A mapping scheduled `after:` another runs when that one has succeeded, once per success, and
/// not while it fails; a schedule that would never start (a cycle, an unknown mapping) is
/// refused.
#[tokio::test]
async fn a_mapping_scheduled_after_another_runs_when_that_one_succeeds() {
    let receiver = AckReceiver::start(Duration::ZERO).await;
    let api = Api::start(&config(&receiver.url), 5).await;
    let (status, body) = api
        .admin(
            Method::POST,
            "/api/v1/mappings",
            Some(json!({"name": "then_archive", "definition": {
                "model": "users", "destination": "crm", "schedule": {"after": ["users_to_crm"]}
            }})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    for (name, after) in [("loop_a", "loop_a"), ("nowhere", "no_such_mapping")] {
        let (status, body) = api
            .admin(
                Method::POST,
                "/api/v1/mappings",
                Some(json!({"name": name, "definition": {
                    "model": "users", "destination": "crm", "schedule": {"after": [after]}
                }})),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{name}: {body}");
    }
    let scheduler = tokio::spawn(api.service.clone().run_schedules());
    let runs_of = |mapping: &'static str| {
        let api = &api;
        async move {
            let (_, page) = api
                .admin(Method::GET, &format!("/api/v1/runs?mapping={mapping}"), None)
                .await;
            page["runs"].as_array().cloned().unwrap_or_default()
        }
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(runs_of("then_archive").await.is_empty(), "nothing ran before it");

    // The first mapping fails: the one after it waits.
    receiver.behave(|_| Answer::Status(StatusCode::INTERNAL_SERVER_ERROR, "down", None));
    let failed = api.run("users_to_crm", json!({})).await;
    assert_ne!(failed["status"], "succeeded", "{failed}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(runs_of("then_archive").await.is_empty(), "ran after a failure");

    // It succeeds: the one after it runs, as a scheduled run, once.
    receiver.behave(|_| Answer::Refuse(Vec::new()));
    let succeeded = api.run("users_to_crm", json!({})).await;
    assert_eq!(succeeded["status"], "succeeded", "{succeeded}");
    let mut after = Vec::new();
    for _ in 0..100 {
        after = runs_of("then_archive").await;
        if after.first().is_some_and(|r| r["status"] != "running") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(after[0]["trigger"], "schedule", "{after:?}");
    assert_eq!(after[0]["status"], "succeeded", "{after:?}");
    assert!(
        after[0]["started_at"].as_str() >= succeeded["finished_at"].as_str(),
        "started after the success: {after:?} {succeeded}"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(runs_of("then_archive").await.len(), 1, "once per success");

    api.service.engine().shutdown().request();
    tokio::time::timeout(Duration::from_secs(30), scheduler)
        .await
        .expect("the scheduler stops")
        .expect("join")
        .expect("scheduler");
}

/// A cancellation asked for through the API reaches a run of another process (`sluice run`)
/// through the metadata store.
#[tokio::test]
async fn a_run_of_another_process_is_cancelled_through_the_metadata_store() {
    let receiver = AckReceiver::start(Duration::from_millis(50)).await;
    let config =
        project_config(&receiver.url, 5, 5).replace("max_attempts: 3", "max_attempts: 3\n    concurrency: 1");
    let api = Api::start(&config, 1000).await;
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", "users_to_crm", "--config"])
        .arg(api.project.config_path())
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .output();
    let child = tokio::spawn(child);
    let mut running = None;
    for _ in 0..200 {
        let (_, page) = api.admin(Method::GET, "/api/v1/runs?status=running", None).await;
        if let Some(run) = page["runs"].as_array().and_then(|r| r.first()) {
            running = run["id"].as_str().map(str::to_string);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let run_id = running.expect("the CLI's run shows as running");
    while receiver.acks().len() < 20 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let asked = std::time::Instant::now();
    let (status, body) = api
        .admin(Method::POST, &format!("/api/v1/runs/{run_id}/cancel"), None)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let output = tokio::time::timeout(Duration::from_secs(30), child)
        .await
        .expect("the CLI stops")
        .expect("join")
        .expect("output");
    assert!(
        asked.elapsed() < Duration::from_secs(15),
        "took {:?}",
        asked.elapsed()
    );
    assert_eq!(
        output.status.code(),
        Some(1),
        "{}",
        crate::common::stderr(&output)
    );
    let run = api.finished(&run_id).await;
    assert_eq!(run["status"], "cancelled", "{run}");
    assert!(run["counts"]["delivered"].as_u64().unwrap_or(0) < 1000, "{run}");
}

/// A TCP server on loopback that accepts connections and never answers (a firewall that
/// swallows packets, a hung database); its port.
async fn silent_server() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    port
}

/// Previews, test records, connection tests and dry runs are interactive work: bounded in time
/// (`api.limits.probe_timeout`, `dry_run_timeout`) and in number per token, so a source that
/// never answers cannot hold a request, a thread or a place forever.
#[tokio::test]
async fn previews_tests_and_dry_runs_against_systems_that_never_answer_are_bounded() {
    if crate::services::postgres("api_bounded").await.is_none() {
        return;
    }
    let silent = silent_server().await;
    let config = format!(
        r#"state_dir: .sluice
sources:
  slow: {{ type: postgres, url: "{pg}", sslmode: disable }}
  silent: {{ type: postgres, url: "postgres://postgres@127.0.0.1:{silent}/test", sslmode: disable, connect_timeout: 60s }}
models:
  waits:
    source: slow
    sql: SELECT id, pg_sleep(30)::text AS waited FROM generate_series(1, 3) id
    primary_key: id
destinations:
  hook: {{ type: webhook, url: "http://127.0.0.1:{silent}/hook" }}
mappings:
  waits_out: {{ model: waits, destination: hook }}
api:
  limits: {{ probes: 3, probes_per_token: 2, probe_timeout: 2s, dry_run_timeout: 3s }}
"#,
        pg = crate::services::PG_URL,
    );
    let api = Api::open(TestProject::new(&config), Some(key())).await;
    let started = std::time::Instant::now();

    // A connection test of a host that never answers is a failed test, after the limit.
    let (status, body) = api.admin(Method::POST, "/api/v1/sources/silent/test", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["ok"], false, "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.contains("within 2s (api.limits.probe_timeout)"), "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );

    // A draft the same.
    let (status, body) = api
        .admin(
            Method::POST,
            "/api/v1/connection-tests",
            Some(json!({"kind": "source", "name": "draft", "definition": {
                "type": "postgres", "url": format!("postgres://postgres@127.0.0.1:{silent}/test"),
                "sslmode": "disable", "connect_timeout": "60s"}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("api.limits.probe_timeout"),
        "{body}"
    );

    // A preview and a test record of a model whose query takes 30 s: stopped, 504.
    for path in [
        "/api/v1/models/waits/preview",
        "/api/v1/mappings/waits_out/test-record",
    ] {
        let asked = std::time::Instant::now();
        let (status, body) = api.admin(Method::POST, path, None).await;
        assert_error(status, &body, StatusCode::GATEWAY_TIMEOUT, "probe_timeout");
        assert!(
            asked.elapsed() < Duration::from_secs(5),
            "{path}: {:?}",
            asked.elapsed()
        );
    }

    // Two at once for one token; a third is refused at once, with when to ask again.
    let first = {
        let (router, admin) = (api.router.clone(), api.admin.clone());
        tokio::spawn(async move { probe(router, &admin, "/api/v1/sources/silent/test").await })
    };
    let second = {
        let (router, admin) = (api.router.clone(), api.admin.clone());
        tokio::spawn(async move { probe(router, &admin, "/api/v1/models/waits/preview").await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, headers, bytes) = api
        .raw(
            Method::POST,
            "/api/v1/sources/silent/test",
            Some(&api.admin.clone()),
            None,
            None,
        )
        .await;
    let body: Value = serde_json::from_slice(&bytes).expect("json");
    assert_error(status, &body, StatusCode::TOO_MANY_REQUESTS, "too_many_requests");
    assert!(message(&body).contains("api.limits.probes_per_token"), "{body}");
    assert_eq!(
        headers.get(header::RETRY_AFTER).and_then(|v| v.to_str().ok()),
        Some("5")
    );
    assert_eq!(first.await.expect("first"), StatusCode::OK);
    assert_eq!(second.await.expect("second"), StatusCode::GATEWAY_TIMEOUT);

    // A dry run is stopped at its own limit and recorded as failed, saying which.
    let (status, run) = api
        .admin(
            Method::POST,
            "/api/v1/mappings/waits_out/runs",
            Some(json!({"dry_run": true})),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{run}");
    let run = api.finished(run["id"].as_str().expect("id")).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert!(
        run["error"]
            .as_str()
            .unwrap_or_default()
            .contains("api.limits.dry_run_timeout"),
        "{run}"
    );
    // Every place was given back.
    let (status, body) = api.admin(Method::POST, "/api/v1/sources/slow/test", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["ok"], true, "{body}");
}

/// A POST's status.
pub(crate) async fn probe(router: Router, token: &str, path: &str) -> StatusCode {
    let request = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Body::empty())
        .expect("request");
    router.oneshot(request).await.expect("response").status()
}
