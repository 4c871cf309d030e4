//! The advertising destinations (TikTok, Snapchat, Google Ads) end to end through the `sluice`
//! binary, against local servers on 127.0.0.1 that check each vendor's documented request
//! shape and answer with its documented bodies: throttling, an event refused by name,
//! expired tokens. Google's Data Manager requests are checked against Google's published
//! discovery document (`datamanager.v1.json`, PyPI's `google-api-python-client`); Snap's
//! against the schema of Snap's published OpenAPI document (`Snapchat/business-sdk-v3-java`,
//! `api/openapi.yaml`), restated in the stand-in.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use sluice_engine::pii::sha256_hex;

use crate::common::{TestProject, User, stderr, stdout, user};
use crate::services::{discovery_conforms, google_discovery};
use crate::vendors::{MockVendor, VendorRequest, project_with_model};

fn users() -> Vec<User> {
    vec![
        user(1, "Ada.Lovelace+ads@gmail.com", "free", 10),
        user(2, "grace@example.com", "pro", 20),
        user(3, "linus@example.com", "free", 30),
        user(4, "ken@example.com", "starter", 40),
    ]
}

/// A project whose model adds what ad platforms match on: a phone number with its country
/// code, a click id and a purchase time.
fn project(destination: &str, mapping: &str) -> TestProject {
    project_with_model(
        "SELECT id, email, plan, lead_score, lifetime_value, concat('+1 (650) 555-', lpad(cast(id AS varchar), 4, '0')) AS phone, concat('Cj0KCQiA', cast(id AS varchar)) AS gclid, to_timestamp(1764590000 + id) AS purchased_at FROM users",
        destination,
        mapping,
    )
}

fn ok(body: Value) -> Response {
    axum::Json(body).into_response()
}

fn is_sha256(value: &Value) -> bool {
    value.as_str().is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    })
}

fn events(requests: &[VendorRequest], key: &str) -> Vec<Value> {
    requests
        .iter()
        .flat_map(|r| r.body[key].as_array().cloned().unwrap_or_default())
        .collect()
}

fn no_raw_email(requests: &[VendorRequest]) {
    let everything =
        serde_json::to_string(&requests.iter().map(|r| &r.body).collect::<Vec<_>>()).expect("json");
    assert!(
        !everything.contains("@example.com") && !everything.contains("@gmail.com"),
        "no raw email leaves sluice"
    );
}

// ---------------------------------------------------------------------------------------------
// TikTok

/// TikTok's Events API 2.0: the token in `Access-Token` (no `Bearer`), `event_source` and
/// `event_source_id` beside `data` (at most 1,000 events, each with `event`, integer
/// `event_time`, `event_id` and hashed `user` fields); answers with HTTP 200 and TikTok's
/// `code` whatever happened: throttling (40100) once, a request refused for one event (40002,
/// naming `Batch.N`), a revoked token (40105) when told to.
fn tiktok_server(revoked: Arc<Mutex<bool>>) -> impl FnMut(&VendorRequest) -> Response + Send + 'static {
    let mut throttled_once = false;
    move |request: &VendorRequest| {
        let code = |code: i64, message: &str| {
            ok(json!({"code": code, "message": message, "request_id": "2026120612000001", "data": {}}))
        };
        assert_eq!(request.method, Method::POST);
        assert_eq!(request.path, "/open_api/v1.3/event/track/");
        if *revoked.lock().expect("lock") || request.header("access-token") != "tiktok-token" {
            return code(40105, "Access token is incorrect or has been revoked.");
        }
        if !throttled_once {
            throttled_once = true;
            return code(40100, "Too many requests. Please retry in some time.");
        }
        assert_eq!(request.body["event_source"], "offline");
        assert_eq!(request.body["event_source_id"], "ES7301");
        let data = request.body["data"].as_array().cloned().unwrap_or_default();
        assert!(!data.is_empty() && data.len() <= 1000);
        for event in &data {
            assert!(event["event"].is_string(), "{event}");
            assert!(event["event_time"].is_i64(), "{event}");
            assert!(
                event["event_id"].as_str().is_some_and(|id| !id.is_empty()),
                "{event}"
            );
            assert!(is_sha256(&event["user"]["email"]), "{event}");
            assert!(is_sha256(&event["user"]["phone"]), "{event}");
        }
        if let Some(bad) = data.iter().position(|e| e["properties"]["plan"] == "starter") {
            return code(
                40002,
                &format!("Batch.{bad}.properties.plan: Not a valid choice."),
            );
        }
        code(0, "OK")
    }
}

#[tokio::test]
async fn tiktok_events_are_hashed_and_an_event_tiktok_names_fails_alone() {
    let revoked = Arc::new(Mutex::new(false));
    let vendor = MockVendor::start(tiktok_server(revoked.clone())).await;
    let project = project(
        &format!(
            "  tiktok:\n    type: tiktok\n    access_token: tiktok-token\n    event_source: offline\n    event_source_id: ES7301\n    url: {}\n    delivery: {{ initial_backoff: 10ms, max_backoff: 50ms }}",
            vendor.url
        ),
        "  users_to_tiktok:\n    model: users\n    destination: tiktok\n    fields: { event_time: purchased_at, user.email: email, user.phone: phone, value: lifetime_value, plan: plan }\n    constants: { event: CompletePayment, currency: USD }\n",
    );
    project.write_users(&users());
    let output = project.sluice(&["run"]).await;
    let text = format!("{}{}", stdout(&output), stderr(&output));
    assert_eq!(output.status.code(), Some(2), "one event refused: {text}");
    let requests = vendor.take();
    // Throttled, then refused for ken's event alone, then the other three sent again.
    assert_eq!(requests.len(), 3, "{requests:?}");
    let delivered = events(&requests[2..], "data");
    assert_eq!(delivered.len(), 3);
    let ada = delivered
        .iter()
        .find(|e| e["properties"]["value"] == 10.5)
        .unwrap_or_else(|| panic!("{delivered:?}"));
    assert_eq!(ada["event"], "CompletePayment");
    assert_eq!(ada["event_time"], 1_764_590_001i64);
    assert_eq!(ada["properties"]["currency"], "USD");
    assert_eq!(ada["user"]["email"], sha256_hex(b"ada.lovelace+ads@gmail.com"));
    assert_eq!(ada["user"]["phone"], sha256_hex(b"+16505550001"), "E.164 with +");
    assert!(!delivered.iter().any(|e| e["properties"]["plan"] == "starter"));
    no_raw_email(&requests);
    let runs = stdout(&project.sluice(&["runs", "--failures", "5"]).await);
    assert!(
        runs.contains("properties.plan: Not a valid choice") && runs.contains("code 40002"),
        "{runs}"
    );

    // A revoked token stops the run and says where the token goes.
    let mut rows = users();
    rows[1].lead_score = 99;
    project.write_users(&rows);
    *revoked.lock().expect("lock") = true;
    let output = project.sluice(&["run"]).await;
    let text = format!("{}{}", stdout(&output), stderr(&output));
    assert!(!output.status.success(), "{text}");
    assert!(
        text.contains("code 40105") && text.contains("without Bearer"),
        "{text}"
    );
}

// ---------------------------------------------------------------------------------------------
// Snapchat

/// Checks an event against Snap's `CapiEvent` schema (Snap's OpenAPI document): its typed
/// fields, and `user_data`'s list fields as lists of strings.
fn snap_event_conforms(event: &Value) {
    for (field, check) in [
        ("event_name", Value::is_string as fn(&Value) -> bool),
        ("event_time", Value::is_i64),
        ("action_source", Value::is_string),
        ("event_id", Value::is_string),
        ("custom_data", Value::is_object),
        ("user_data", Value::is_object),
    ] {
        assert!(check(&event[field]), "{field} of {event}");
    }
    let known = [
        "event_name",
        "event_time",
        "action_source",
        "event_id",
        "event_source_url",
        "opt_out",
        "data_processing_options",
        "user_data",
        "custom_data",
        "app_data",
        "integration",
    ];
    for key in event.as_object().expect("object").keys() {
        assert!(known.contains(&key.as_str()), "{key} is not a CapiEvent field");
    }
    for (key, value) in event["user_data"].as_object().expect("user_data") {
        if ["em", "ph", "fn", "ln", "ge", "ct", "st", "zp", "country"].contains(&key.as_str()) {
            let list = value
                .as_array()
                .unwrap_or_else(|| panic!("user_data.{key} is a list: {event}"));
            assert!(list.iter().all(is_sha256), "{event}");
        }
    }
}

fn snapchat_server() -> impl FnMut(&VendorRequest) -> Response + Send + 'static {
    move |request: &VendorRequest| {
        assert_eq!(request.method, Method::POST);
        if !request.query.contains("access_token=snap-token") {
            return (
                StatusCode::UNAUTHORIZED,
                axum::Json(json!({"status": "INVALID", "reason": "Invalid access token"})),
            )
                .into_response();
        }
        if request.path == "/v3/6b8c1bd4-pixel/events/validate" {
            return ok(json!({"status": "VALID", "test_event": true, "reason": "", "event_logs": []}));
        }
        assert_eq!(request.path, "/v3/6b8c1bd4-pixel/events");
        let data = request.body["data"].as_array().cloned().unwrap_or_default();
        assert!(!data.is_empty() && data.len() <= 1000);
        data.iter().for_each(snap_event_conforms);
        if let Some(bad) = data.iter().position(|e| e["custom_data"]["plan"] == "starter") {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({"status": "INVALID", "event": bad, "errors": {"codes": ["INVALID_CUSTOM_DATA"], "error_msgs": ["custom_data.plan is not supported"]}})),
            )
                .into_response();
        }
        ok(json!({"status": "VALID", "reason": "Events have been processed successfully."}))
    }
}

#[tokio::test]
async fn snapchat_conversions_follow_snap_s_schema_and_an_event_snap_names_fails_alone() {
    let vendor = MockVendor::start(snapchat_server()).await;
    let project = project(
        &format!(
            "  snapchat:\n    type: snapchat\n    access_token: snap-token\n    pixel_id: 6b8c1bd4-pixel\n    url: {}",
            vendor.url
        ),
        "  users_to_snap:\n    model: users\n    destination: snapchat\n    fields: { event_time: purchased_at, user_data.em: email, user_data.ph: phone, value: lifetime_value, plan: plan }\n    constants: { event_name: PURCHASE, action_source: OFFLINE, currency: USD }\n",
    );
    project.write_users(&users());
    // `sluice check` posts no events to the validation endpoint.
    let output = project.sluice(&["check"]).await;
    assert!(
        stdout(&output).contains("ok      destination snapchat"),
        "{}",
        stdout(&output)
    );
    let checks = vendor.take();
    assert_eq!(checks.len(), 1);
    assert_eq!(checks[0].body, json!({"data": []}));
    let output = project.sluice(&["run"]).await;
    let text = format!("{}{}", stdout(&output), stderr(&output));
    assert_eq!(output.status.code(), Some(2), "one event refused: {text}");
    let requests = vendor.take();
    assert_eq!(requests.len(), 2, "refused for ken, then the rest: {requests:?}");
    let delivered = events(&requests[1..], "data");
    assert_eq!(delivered.len(), 3);
    let grace = delivered
        .iter()
        .find(|e| e["custom_data"]["value"] == 21.0)
        .unwrap_or_else(|| panic!("{delivered:?}"));
    assert_eq!(
        grace["user_data"]["em"],
        json!([sha256_hex(b"grace@example.com")])
    );
    assert_eq!(
        grace["user_data"]["ph"],
        json!([sha256_hex(b"16505550002")]),
        "digits without +"
    );
    let ids: HashSet<&str> = delivered.iter().filter_map(|e| e["event_id"].as_str()).collect();
    assert_eq!(ids.len(), 3, "one event id per event");
    no_raw_email(&requests);
    let runs = stdout(&project.sluice(&["runs", "--failures", "5"]).await);
    assert!(
        runs.contains("custom_data.plan is not supported (INVALID_CUSTOM_DATA)"),
        "{runs}"
    );
}

// ---------------------------------------------------------------------------------------------
// Google Ads through the Data Manager API

const TOKEN_PATH: &str = "/token";

#[derive(Default)]
struct Google {
    /// Access tokens issued so far; the first expires before it is used.
    tokens: u32,
    violations: Vec<String>,
    lists: Vec<(String, String)>,
}

impl Google {
    /// Google's OAuth token endpoint for an `authorized_user` credential: a refresh token grant.
    fn token(&mut self, request: &VendorRequest) -> Response {
        let form = request.body.as_str().unwrap_or_default();
        for part in [
            "grant_type=refresh_token",
            "refresh_token=1%2F%2F0g-refresh",
            "client_id=sluice.apps.googleusercontent.com",
            "client_secret=s3cret",
        ] {
            assert!(form.contains(part), "{form}");
        }
        self.tokens += 1;
        ok(
            json!({"access_token": format!("ya29.token-{}", self.tokens), "expires_in": 3599, "scope": "https://www.googleapis.com/auth/datamanager", "token_type": "Bearer"}),
        )
    }

    /// The bearer token must be the newest one: the first token issued is answered as expired.
    fn authorized(&self, request: &VendorRequest) -> Option<Response> {
        let newest = format!("Bearer ya29.token-{}", self.tokens);
        if request.header("authorization") == newest && self.tokens > 1 {
            return None;
        }
        Some(
            (
                StatusCode::UNAUTHORIZED,
                axum::Json(json!({"error": {"code": 401, "message": "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential.", "status": "UNAUTHENTICATED"}})),
            )
                .into_response(),
        )
    }

    fn check(&mut self, discovery: &Value, schema: &str, body: &Value) {
        if let Err(e) = discovery_conforms(discovery, schema, body, schema) {
            self.violations.push(e);
        }
    }
}

fn bad_request(violations: Value) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({"error": {"code": 400, "message": "There was a problem with the request.", "status": "INVALID_ARGUMENT", "details": [
            {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "INVALID_ARGUMENT", "domain": "datamanager.googleapis.com", "metadata": {"requestId": "t-6bc8fb83"}},
            {"@type": "type.googleapis.com/google.rpc.RequestInfo", "requestId": "t-6bc8fb83"},
            {"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": violations}]}})),
    )
        .into_response()
}

fn destination_is(body: &Value, product: &str) {
    assert_eq!(
        body["destinations"],
        json!([{"operatingAccount": {"accountType": "GOOGLE_ADS", "accountId": "1234567890"},
                "productDestinationId": product,
                "loginAccount": {"accountType": "GOOGLE_ADS", "accountId": "9876543210"}}])
    );
    assert_eq!(body["encoding"], "HEX");
}

fn data_manager(
    state: Arc<Mutex<Google>>,
    discovery: Arc<Value>,
) -> impl FnMut(&VendorRequest) -> Response + Send + 'static {
    move |request: &VendorRequest| {
        let mut google = state.lock().expect("lock");
        if request.path == TOKEN_PATH {
            return google.token(request);
        }
        if let Some(refused) = google.authorized(request) {
            return refused;
        }
        let lists = "/v1/accountTypes/GOOGLE_ADS/accounts/1234567890/userLists";
        match (request.method.as_str(), request.path.as_str()) {
            ("POST", "/v1/events:ingest") => {
                google.check(&discovery, "IngestEventsRequest", &request.body);
                destination_is(&request.body, "6543210987");
                assert_eq!(
                    request.body["consent"],
                    json!({"adUserData": "CONSENT_GRANTED", "adPersonalization": "CONSENT_GRANTED"})
                );
                let events = request.body["events"].as_array().cloned().unwrap_or_default();
                assert!(!events.is_empty() && events.len() <= 2000);
                let bad: Vec<Value> = events
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| e["customVariables"].as_array().is_some_and(|v| v.contains(&json!({"variable": "plan", "value": "starter"}))))
                    .map(|(i, _)| json!({"field": format!("events[{i}].custom_variables[0]"), "description": "The custom variable is not defined for this conversion action.", "reason": "INVALID_CUSTOM_VARIABLE"}))
                    .collect();
                if !bad.is_empty() {
                    return bad_request(Value::Array(bad));
                }
                ok(json!({"requestId": "t-8f1c0001"}))
            }
            // `sluice check` reads one list.
            ("GET", path) if path == lists && request.query == "pageSize=1" => ok(json!({"userLists": []})),
            ("GET", path) if path == lists => {
                assert!(request.query.contains("filter=display_name"), "{}", request.query);
                if !request.query.contains("pageToken=") {
                    return ok(
                        json!({"userLists": [{"name": format!("{lists}/111"), "id": "111", "displayName": "Someone else's list"}], "nextPageToken": "p2"}),
                    );
                }
                let found: Vec<Value> = google
                    .lists
                    .iter()
                    .map(|(id, name)| json!({"name": format!("{lists}/{id}"), "id": id, "displayName": name}))
                    .collect();
                ok(json!({ "userLists": found }))
            }
            ("POST", path) if path == lists => {
                google.check(&discovery, "UserList", &request.body);
                assert_eq!(
                    request.body["ingestedUserListInfo"]["uploadKeyTypes"],
                    json!(["CONTACT_ID"])
                );
                let name = request.body["displayName"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                assert!(google.lists.is_empty(), "created once");
                google.lists.push(("5555555555".into(), name.clone()));
                ok(json!({"name": format!("{lists}/5555555555"), "id": "5555555555", "displayName": name}))
            }
            ("POST", "/v1/audienceMembers:ingest") => {
                google.check(&discovery, "IngestAudienceMembersRequest", &request.body);
                destination_is(&request.body, "5555555555");
                assert_eq!(
                    request.body["termsOfService"],
                    json!({"customerMatchTermsOfServiceStatus": "ACCEPTED"})
                );
                ok(json!({"requestId": "t-8f1c0002"}))
            }
            ("POST", "/v1/audienceMembers:remove") => {
                google.check(&discovery, "RemoveAudienceMembersRequest", &request.body);
                destination_is(&request.body, "5555555555");
                ok(json!({"requestId": "t-8f1c0003"}))
            }
            _ => (
                StatusCode::NOT_FOUND,
                axum::Json(json!({"error": {"code": 404, "message": "Not found", "status": "NOT_FOUND"}})),
            )
                .into_response(),
        }
    }
}

/// A Google stand-in, and a project whose `google_ads` destination reaches it with an
/// `authorized_user` credential (an OAuth client and a refresh token) whose token endpoint it
/// is.
async fn google_project(mapping: &str) -> Option<(MockVendor, Arc<Mutex<Google>>, TestProject)> {
    let discovery = Arc::new(google_discovery("datamanager.v1.json", "Google Data Manager")?);
    let state = Arc::new(Mutex::new(Google::default()));
    let vendor = MockVendor::start(data_manager(state.clone(), discovery)).await;
    let project = project(
        &format!(
            "  google:\n    type: google_ads\n    service_account: google.json\n    customer_id: 123-456-7890\n    login_customer_id: 987-654-3210\n    consent: {{ ad_user_data: granted, ad_personalization: granted }}\n    customer_match_terms_accepted: true\n    url: {}\n    delivery: {{ initial_backoff: 10ms, max_backoff: 50ms }}",
            vendor.url
        ),
        mapping,
    );
    let credential = json!({"type": "authorized_user", "client_id": "sluice.apps.googleusercontent.com", "client_secret": "s3cret", "refresh_token": "1//0g-refresh", "token_uri": format!("{}{TOKEN_PATH}", vendor.url)});
    std::fs::write(project.path().join("google.json"), credential.to_string()).expect("credential");
    Some((vendor, state, project))
}

fn user_identifiers(event: &Value) -> Vec<Value> {
    event["userData"]["userIdentifiers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[tokio::test]
async fn google_ads_conversions_go_through_data_manager_and_restate_by_transaction() {
    let Some((vendor, state, project)) = google_project(
        "  users_to_google:\n    model: users\n    destination: google\n    action: conversions\n    options: { conversion_action_id: \"6543210987\" }\n    fields: { eventTimestamp: purchased_at, adIdentifiers.gclid: gclid, email: email, phone: phone, conversionValue: lifetime_value, plan: plan }\n    constants: { eventSource: WEB, currency: EUR }\n",
    )
    .await
    else {
        return;
    };
    project.write_users(&users());
    let output = project.sluice(&["check"]).await;
    assert!(
        stdout(&output).contains("ok      destination google"),
        "{}",
        stdout(&output)
    );
    vendor.take();
    state.lock().expect("lock").tokens = 0;
    let output = project.sluice(&["run"]).await;
    let text = format!("{}{}", stdout(&output), stderr(&output));
    assert_eq!(output.status.code(), Some(2), "one conversion refused: {text}");
    let requests = vendor.take();
    let ingests: Vec<&VendorRequest> = requests
        .iter()
        .filter(|r| r.path == "/v1/events:ingest")
        .collect();
    // The first token expired: fetched again; then refused for ken's custom variable; then the
    // other three.
    assert_eq!(state.lock().expect("lock").tokens, 2);
    assert_eq!(ingests.len(), 3, "{requests:?}");
    let accepted = ingests[2].body["events"].as_array().cloned().unwrap_or_default();
    assert_eq!(accepted.len(), 3);
    let ada = accepted
        .iter()
        .find(|e| e["transactionId"] == "1")
        .unwrap_or_else(|| panic!("{accepted:?}"));
    assert_eq!(ada["eventTimestamp"], "2025-12-01T11:53:21Z");
    assert_eq!(ada["eventSource"], "WEB");
    assert_eq!(ada["currency"], "EUR");
    assert_eq!(ada["conversionValue"], 10.5);
    assert_eq!(ada["adIdentifiers"], json!({"gclid": "Cj0KCQiA1"}));
    assert_eq!(
        user_identifiers(ada),
        [
            json!({"emailAddress": sha256_hex(b"adalovelace@gmail.com")}),
            json!({"phoneNumber": sha256_hex(b"+16505550001")})
        ],
        "a Gmail address without dots or +tag, a phone in E.164"
    );
    assert_eq!(
        ada["customVariables"],
        json!([{"variable": "plan", "value": "free"}])
    );
    no_raw_email(&requests);
    let violations = std::mem::take(&mut state.lock().expect("lock").violations);
    assert!(violations.is_empty(), "{violations:?}");
    let runs = stdout(&project.sluice(&["runs", "--failures", "5"]).await);
    assert!(
        runs.contains("events[") && runs.contains("INVALID_CUSTOM_VARIABLE"),
        "{runs}"
    );

    // Grace's value changes: her conversion is restated under the same transaction id.
    let mut rows = users();
    rows[1].ltv = 99.0;
    project.write_users(&rows);
    let output = project.sluice(&["run"]).await;
    assert!(
        output.status.code() == Some(2) || output.status.success(),
        "{}",
        stderr(&output)
    );
    let restated = events(&vendor.take(), "events");
    let grace = restated
        .iter()
        .find(|e| e["transactionId"] == "2")
        .unwrap_or_else(|| panic!("{restated:?}"));
    assert_eq!(grace["conversionValue"], 99.0);
    assert!(
        !restated.iter().any(|e| e["transactionId"] == "1"),
        "ada did not change"
    );
}

#[tokio::test]
async fn google_ads_customer_match_lists_are_created_once_and_mirror_the_model() {
    let Some((vendor, state, project)) = google_project(
        "  users_to_list:\n    model: users\n    destination: google\n    action: customer_match\n    mode: mirror\n    options: { user_list_name: Lead scorers, description: From sluice }\n    fields: { email: email, phone: phone }\n",
    )
    .await
    else {
        return;
    };
    let mut rows = users();
    project.write_users(&rows);
    // A dry run creates nothing and sends nothing.
    let output = project.sluice(&["run", "--dry-run"]).await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("audienceMembers:ingest"),
        "{}",
        stdout(&output)
    );
    assert!(
        vendor.take().iter().all(|r| r.path == TOKEN_PATH),
        "a dry run reaches no API"
    );

    let output = project.sluice(&["run"]).await;
    assert!(output.status.success(), "{}{}", stdout(&output), stderr(&output));
    let requests = vendor.take();
    let ingests: Vec<&VendorRequest> = requests
        .iter()
        .filter(|r| r.path == "/v1/audienceMembers:ingest")
        .collect();
    assert_eq!(ingests.len(), 1, "{requests:?}");
    let members = ingests[0].body["audienceMembers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(members.len(), 4);
    assert!(members.contains(&json!({"userData": {"userIdentifiers": [
        {"emailAddress": sha256_hex(b"grace@example.com")},
        {"phoneNumber": sha256_hex(b"+16505550002")}]}})));
    assert_eq!(
        state.lock().expect("lock").lists,
        [("5555555555".to_string(), "Lead scorers".to_string())]
    );
    no_raw_email(&requests);

    // Ada leaves the model: she is removed with the values the list got; the list is found,
    // not made again.
    rows.remove(0);
    project.write_users(&rows);
    let output = project.sluice(&["run"]).await;
    assert!(output.status.success(), "{}{}", stdout(&output), stderr(&output));
    let requests = vendor.take();
    let removes: Vec<&VendorRequest> = requests
        .iter()
        .filter(|r| r.path == "/v1/audienceMembers:remove")
        .collect();
    assert_eq!(removes.len(), 1, "{requests:?}");
    assert_eq!(
        removes[0].body["audienceMembers"],
        json!([{"userData": {"userIdentifiers": [
            {"emailAddress": sha256_hex(b"adalovelace@gmail.com")},
            {"phoneNumber": sha256_hex(b"+16505550001")}]}}])
    );
    let violations = std::mem::take(&mut state.lock().expect("lock").violations);
    assert!(violations.is_empty(), "{violations:?}");
}

// ---------------------------------------------------------------------------------------------
// Salesforce Marketing Cloud

#[derive(Default)]
struct MarketingCloud {
    url: String,
    tokens: u32,
}

/// Marketing Cloud: `/v2/token` with the installed package's client credentials (answering
/// with the tenant's REST and SOAP addresses, ending in `/`); the REST rowset API, refusing the
/// first token as expired and a request holding a bad row with `10006` and `additionalErrors`
/// naming the column; the SOAP `Delete` of `DataExtensionObject`s, one `Results` per object.
fn marketing_cloud(
    state: Arc<Mutex<MarketingCloud>>,
) -> impl FnMut(&VendorRequest) -> Response + Send + 'static {
    move |request: &VendorRequest| {
        let mut cloud = state.lock().expect("lock");
        let newest = format!("sfmc-token-{}", cloud.tokens);
        match request.path.as_str() {
            "/v2/token" => {
                assert_eq!(
                    request.body,
                    json!({"grant_type": "client_credentials", "client_id": "sfmc-client", "client_secret": "sfmc-secret", "account_id": "514009708"})
                );
                cloud.tokens += 1;
                ok(
                    json!({"access_token": format!("sfmc-token-{}", cloud.tokens), "token_type": "Bearer", "expires_in": 1079,
                          "scope": "data_extensions_read data_extensions_write",
                          "soap_instance_url": format!("{}/", cloud.url), "rest_instance_url": format!("{}/", cloud.url)}),
                )
            }
            "/hub/v1/dataevents/key:Users_DE/rowset" => {
                if request.header("authorization") != format!("Bearer {newest}") || cloud.tokens < 2 {
                    return (StatusCode::UNAUTHORIZED, axum::Json(json!({"message": "Not Authorized", "errorcode": 0, "documentation": "https://developer.salesforce.com/docs/atlas.en-us.mc-apis.meta/mc-apis/error-handling.htm"}))).into_response();
                }
                let rows = request.body.as_array().cloned().unwrap_or_default();
                assert!(!rows.is_empty() && rows.len() <= 50);
                for row in &rows {
                    assert!(row["keys"]["SubscriberKey"].is_string(), "{row}");
                    assert!(row["values"].get("SubscriberKey").is_none(), "{row}");
                }
                if rows.iter().any(|r| r["values"]["Plan"] == "starter") {
                    return (StatusCode::BAD_REQUEST, axum::Json(json!({"message": "Unable to save rows for data extension ID dcf7a0f9-ff23-ef11-b859-48df37dc1382", "errorcode": 10006, "documentation": "",
                        "additionalErrors": [{"message": "Plan: The value for column [Plan] is not one of the allowed values.", "errorcode": 10000, "documentation": ""}]}))).into_response();
                }
                ok(request.body.clone())
            }
            "/Service.asmx" => {
                assert_eq!(request.header("soapaction"), "Delete");
                let xml = request.body.as_str().unwrap_or_default();
                assert!(
                    xml.contains(&format!(
                        "<fueloauth xmlns=\"http://exacttarget.com\">{newest}</fueloauth>"
                    )),
                    "{xml}"
                );
                let objects = xml.matches("<Objects xsi:type=\"DataExtensionObject\">").count();
                assert_eq!(
                    xml.matches("<CustomerKey>Users_DE</CustomerKey>").count(),
                    objects
                );
                let results: String = (0..objects)
                    .map(|i| format!("<Results><StatusCode>OK</StatusCode><StatusMessage>Deleted</StatusMessage><OrdinalID>{i}</OrdinalID></Results>"))
                    .collect();
                let body = format!(
                    r#"<?xml version="1.0" encoding="utf-8"?><soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"><soap:Body><DeleteResponse xmlns="http://exacttarget.com/wsdl/partnerAPI">{results}<OverallStatus>OK</OverallStatus><RequestID>676FA9D6</RequestID></DeleteResponse></soap:Body></soap:Envelope>"#
                );
                ([("content-type", "text/xml; charset=utf-8")], body).into_response()
            }
            other => panic!("unexpected {other}"),
        }
    }
}

#[tokio::test]
async fn marketing_cloud_rows_are_upserted_a_refused_row_fails_alone_and_deleted_rows_leave() {
    let state = Arc::new(Mutex::new(MarketingCloud::default()));
    let vendor = MockVendor::start(marketing_cloud(state.clone())).await;
    state.lock().expect("lock").url = vendor.url.clone();
    let project = project(
        &format!(
            "  sfmc:\n    type: salesforce_marketing_cloud\n    subdomain: mc563885gzs27c5t9-63k636ttgm\n    client_id: sfmc-client\n    client_secret: sfmc-secret\n    account_id: \"514009708\"\n    auth_url: {}\n    delivery: {{ initial_backoff: 10ms, max_backoff: 50ms }}",
            vendor.url
        ),
        "  users_to_sfmc:\n    model: users\n    destination: sfmc\n    mode: mirror\n    options: { external_key: Users_DE, keys: [SubscriberKey] }\n    fields: { SubscriberKey: { column: id, as: string }, EmailAddress: email, Plan: plan }\n",
    );
    let mut rows = users();
    project.write_users(&rows);
    let output = project.sluice(&["run"]).await;
    let text = format!("{}{}", stdout(&output), stderr(&output));
    assert_eq!(output.status.code(), Some(2), "ken's row refused: {text}");
    let requests = vendor.take();
    let saved: Vec<Value> = requests
        .iter()
        .filter(|r| r.path.ends_with("/rowset") && r.header("authorization") == "Bearer sfmc-token-2")
        .filter(|r| {
            !r.body
                .as_array()
                .is_some_and(|rows| rows.iter().any(|row| row["values"]["Plan"] == "starter"))
        })
        .flat_map(|r| r.body.as_array().cloned().unwrap_or_default())
        .collect();
    let mut keys: Vec<&str> = saved
        .iter()
        .filter_map(|r| r["keys"]["SubscriberKey"].as_str())
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, ["1", "2", "3"], "{saved:?}");
    assert!(saved.contains(&json!({"keys": {"SubscriberKey": "2"}, "values": {"EmailAddress": "grace@example.com", "Plan": "pro"}})));
    assert_eq!(
        state.lock().expect("lock").tokens,
        2,
        "the expired token is fetched again once"
    );
    let runs = stdout(&project.sluice(&["runs", "--failures", "5"]).await);
    assert!(runs.contains("[Plan] is not one of the allowed values"), "{runs}");

    // Ada leaves the model: her row is deleted by its key through SOAP.
    rows.remove(0);
    project.write_users(&rows);
    let output = project.sluice(&["run"]).await;
    let text = format!("{}{}", stdout(&output), stderr(&output));
    assert!(
        output.status.code() == Some(2) || output.status.success(),
        "{text}"
    );
    let deletes: Vec<String> = vendor
        .take()
        .iter()
        .filter(|r| r.path == "/Service.asmx")
        .filter_map(|r| r.body.as_str().map(str::to_string))
        .collect();
    assert_eq!(deletes.len(), 1, "{deletes:?}");
    assert!(
        deletes[0].contains("<Keys><Key><Name>SubscriberKey</Name><Value>1</Value></Key></Keys>"),
        "{}",
        deletes[0]
    );
    assert_eq!(deletes[0].matches("<Objects ").count(), 1);
}

// ---------------------------------------------------------------------------------------------
// LinkedIn

/// LinkedIn's Conversions API: a `BATCH_CREATE` of `elements` with the versioned headers, each
/// event naming the conversion rule's URN, `conversionHappenedAt` in milliseconds, `amount` as
/// text and a hashed email among `user.userIds`; a batch holding a bad event is refused with
/// 422 and `Index: N` in the message, the others answered with one status each.
fn linkedin_server() -> impl FnMut(&VendorRequest) -> Response + Send + 'static {
    move |request: &VendorRequest| {
        assert_eq!(request.method, Method::POST);
        assert_eq!(request.path, "/rest/conversionEvents");
        assert_eq!(request.header("authorization"), "Bearer li-token");
        assert_eq!(request.header("linkedin-version"), "202606");
        assert_eq!(request.header("x-restli-protocol-version"), "2.0.0");
        assert_eq!(request.header("x-restli-method"), "BATCH_CREATE");
        let elements = request.body["elements"].as_array().cloned().unwrap_or_default();
        assert!(!elements.is_empty() && elements.len() <= 5000);
        let mut refused = String::new();
        for (i, element) in elements.iter().enumerate() {
            assert_eq!(
                element["conversion"], "urn:lla:llaPartnerConversion:104012",
                "{element}"
            );
            assert!(element["conversionHappenedAt"].is_i64(), "{element}");
            assert!(element["conversionValue"]["amount"].is_string(), "{element}");
            assert!(element["eventId"].is_string(), "{element}");
            assert_eq!(element["user"]["userIds"][0]["idType"], "SHA256_EMAIL");
            assert!(is_sha256(&element["user"]["userIds"][0]["idValue"]), "{element}");
            if element["user"]["userInfo"]["title"] == "starter" {
                refused.push_str(&format!("Index: {i}, ERROR :: /user/userInfo/firstName :: field is required but not found and has no default value\n"));
            }
        }
        if !refused.is_empty() {
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                axum::Json(json!({"status": 422, "message": refused})),
            )
                .into_response();
        }
        let statuses: Vec<Value> = elements.iter().map(|_| json!({"status": 201})).collect();
        ok(json!({ "elements": statuses }))
    }
}

#[tokio::test]
async fn linkedin_conversions_are_batched_and_an_event_linkedin_names_fails_alone() {
    let vendor = MockVendor::start(linkedin_server()).await;
    let project = project(
        &format!(
            "  linkedin:\n    type: linkedin\n    access_token: li-token\n    url: {}",
            vendor.url
        ),
        "  users_to_linkedin:\n    model: users\n    destination: linkedin\n    options: { conversion_id: \"104012\" }\n    fields: { conversionHappenedAt: purchased_at, email: email, conversionValue.amount: lifetime_value, title: plan }\n    constants: { conversionValue.currencyCode: USD }\n",
    );
    project.write_users(&users());
    let output = project.sluice(&["run"]).await;
    let text = format!("{}{}", stdout(&output), stderr(&output));
    assert_eq!(output.status.code(), Some(2), "one event refused: {text}");
    let requests = vendor.take();
    assert_eq!(requests.len(), 2, "refused for ken, then the rest: {requests:?}");
    let delivered = events(&requests[1..], "elements");
    assert_eq!(delivered.len(), 3);
    let ada = delivered
        .iter()
        .find(|e| e["conversionValue"]["amount"] == "10.5")
        .unwrap_or_else(|| panic!("{delivered:?}"));
    assert_eq!(ada["conversionHappenedAt"], 1_764_590_001_000i64);
    assert_eq!(ada["conversionValue"]["currencyCode"], "USD");
    assert_eq!(
        ada["user"]["userIds"],
        json!([{"idType": "SHA256_EMAIL", "idValue": sha256_hex(b"ada.lovelace+ads@gmail.com")}])
    );
    no_raw_email(&requests);
    let runs = stdout(&project.sluice(&["runs", "--failures", "5"]).await);
    assert!(
        runs.contains("Index: 3, ERROR :: /user/userInfo/firstName"),
        "{runs}"
    );
}

// ---------------------------------------------------------------------------------------------
// Payloads

/// Every ad destination's requests for two users, as a dry run shows them (no vendor is
/// reached, no token is fetched or shown), pinned.
#[tokio::test]
async fn ad_payloads_are_pinned() {
    let credential = json!({"type": "authorized_user", "client_id": "c", "client_secret": "s", "refresh_token": "refresh-never-shown", "token_uri": "http://127.0.0.1:9/token"});
    let project = project(
        &format!(
            r#"  tiktok:
    type: tiktok
    access_token: tiktok-token-never-shown
    event_source_id: CJ1ABC
    url: http://127.0.0.1:9
  snapchat:
    type: snapchat
    access_token: snap-token-never-shown
    pixel_id: 6b8c1bd4-pixel
    url: http://127.0.0.1:9
  google:
    type: google_ads
    service_account: '{credential}'
    customer_id: 123-456-7890
    consent: {{ ad_user_data: granted, ad_personalization: denied }}
    customer_match_terms_accepted: true
    url: http://127.0.0.1:9
  linkedin:
    type: linkedin
    access_token: li-token-never-shown
    url: http://127.0.0.1:9
  sfmc:
    type: salesforce_marketing_cloud
    subdomain: mc563885gzs27c5t9-63k636ttgm
    client_id: c
    client_secret: sfmc-secret-never-shown
    auth_url: http://127.0.0.1:9"#
        ),
        r#"  to_tiktok:
    model: users
    destination: tiktok
    fields: { event_time: purchased_at, user.email: email, user.phone: phone, value: lifetime_value }
    constants: { event: CompletePayment, currency: USD }
  to_snapchat:
    model: users
    destination: snapchat
    fields: { event_time: purchased_at, user_data.em: email, user_data.ph: phone, value: lifetime_value }
    constants: { event_name: PURCHASE, action_source: OFFLINE }
  to_google:
    model: users
    destination: google
    action: conversions
    options: { conversion_action_id: "6543210987" }
    fields: { eventTimestamp: purchased_at, adIdentifiers.gclid: gclid, email: email, phone: phone, conversionValue: lifetime_value, plan: plan }
    constants: { eventSource: WEB, currency: EUR }
  to_customer_match:
    model: users
    destination: google
    action: customer_match
    options: { user_list_id: "5555555555" }
    fields: { email: email, phone: phone }
  to_linkedin:
    model: users
    destination: linkedin
    options: { conversion_id: "104012" }
    fields: { conversionHappenedAt: purchased_at, email: email, conversionValue.amount: lifetime_value }
    constants: { conversionValue.currencyCode: USD }
  to_sfmc:
    model: users
    destination: sfmc
    options: { external_key: Users_DE, keys: [SubscriberKey] }
    fields: { SubscriberKey: { column: id, as: string }, EmailAddress: email, Plan: plan }"#,
    );
    project.write_users(&users()[..2]);
    let output = project.sluice(&["run", "--dry-run"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(
        !text.contains("never-shown"),
        "no credential shows in a dry run: {text}"
    );
    // The ad platforms get customer information hashed; a data extension gets it as it is.
    let ads: String = text.lines().filter(|l| !l.contains("marketing-cloud")).collect();
    assert!(
        !ads.contains("@example.com") && !ads.contains("@gmail.com"),
        "{text}"
    );
    let mut lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    // The mappings run at once: pin them in a stable order.
    lines.sort_by_key(|l| l.to_string());
    insta::assert_json_snapshot!(lines);
}
