//! Security: each test tries what an outsider, a read token or a stolen cookie might, and
//! asserts the refusal. No secret leaves sluice through a definition, an error, a connection
//! test, a run record, a failure sample, a CSV download or a log line; a route cannot be reached
//! without a token, nor changed with a read token; a session ends on the server at sign-out.
//! (Token comparison: tokens are looked up by their SHA-256 and CSRF tokens compared in
//! constant time; `api/src/session.rs` measures the latter.)

use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use serde_json::json;
use sluice_engine::tokens::Scope;
use tower::ServiceExt;

use crate::api::{Api, assert_error, browser, config, message, set_cookies, token};
use crate::faults::{AckReceiver, Answer};

#[tokio::test]
async fn a_console_session_needs_the_csrf_token_for_changes_and_a_cookie_replayed_after_sign_out_is_refused()
{
    let receiver = AckReceiver::start(Duration::ZERO).await;
    let api = Api::start(&config(&receiver.url), 5).await;

    // The login page hands out a CSRF cookie and puts the same token in its form.
    let (status, headers, page) = browser(&api, Method::GET, "/login", "", None, None).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let cookies = set_cookies(&headers);
    let (_, csrf, attributes) = cookies
        .iter()
        .find(|(name, _, _)| name == "sluice_csrf")
        .expect("a CSRF cookie");
    assert!(attributes.contains("SameSite=Strict"), "{attributes}");
    assert!(page.contains(&format!(r#"name="csrf" value="{csrf}""#)), "{page}");
    let pre_login = format!("sluice_csrf={csrf}");

    // A post without the matching CSRF token, or with an unknown API token, signs nobody in.
    let form = format!("token={}&csrf=forged", api.admin);
    let (status, headers, _) = browser(&api, Method::POST, "/login", &pre_login, Some(&form), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        set_cookies(&headers)
            .iter()
            .all(|(name, _, _)| name != "sluice_session")
    );
    let form = format!("token=sluice_not-a-token&csrf={csrf}");
    let (status, headers, page) = browser(&api, Method::POST, "/login", &pre_login, Some(&form), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(page.contains("not known"), "{page}");
    assert!(
        set_cookies(&headers)
            .iter()
            .all(|(name, _, _)| name != "sluice_session")
    );

    // The right token starts a session: an HttpOnly, SameSite=Strict cookie and a new CSRF token.
    let form = format!("token={}&csrf={csrf}", api.admin);
    let (status, headers, _) = browser(&api, Method::POST, "/login", &pre_login, Some(&form), None).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(
        headers.get(header::LOCATION).and_then(|v| v.to_str().ok()),
        Some("/")
    );
    let cookies = set_cookies(&headers);
    let (_, session, attributes) = cookies
        .iter()
        .find(|(name, _, _)| name == "sluice_session")
        .expect("a session cookie");
    assert!(
        attributes.contains("HttpOnly") && attributes.contains("SameSite=Strict"),
        "{attributes}"
    );
    let (_, session_csrf, _) = cookies
        .iter()
        .find(|(name, _, _)| name == "sluice_csrf")
        .expect("a new CSRF cookie");
    assert_ne!(session_csrf, csrf, "a session gets its own CSRF token");
    let jar = format!("sluice_session={session}; sluice_csrf={session_csrf}");

    // The session reads the API with no header at all.
    let (status, _, body) = browser(&api, Method::GET, "/api/v1/mappings", &jar, None, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("users_to_crm"), "{body}");

    // A change made with the cookie needs the CSRF token, as a forged cross-site post lacks it.
    let (status, _, body) = browser(
        &api,
        Method::PATCH,
        "/api/v1/mappings/users_to_crm",
        &jar,
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("\"csrf\""), "{body}");
    let (status, _, body) = browser(
        &api,
        Method::PATCH,
        "/api/v1/mappings/users_to_crm",
        &jar,
        None,
        Some("0000"),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let request = Request::builder()
        .method(Method::PATCH)
        .uri("/api/v1/mappings/users_to_crm")
        .header(header::COOKIE, &jar)
        .header("x-csrf-token", session_csrf.as_str())
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(json!({"enabled": false}).to_string()))
        .expect("request");
    let response = api.router.clone().oneshot(request).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    let (_, mapping) = api
        .admin(Method::GET, "/api/v1/mappings/users_to_crm", None)
        .await;
    assert_eq!(mapping["enabled"], false, "{mapping}");

    // The browser keeps a session id, never the API token.
    assert!(!session.contains(&api.admin) && !session.is_empty(), "{session}");

    // Signing out needs the token too, and clears both cookies.
    let (status, _, _) = browser(&api, Method::POST, "/logout", &jar, Some("csrf=wrong"), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let form = format!("csrf={session_csrf}");
    let (status, headers, _) = browser(&api, Method::POST, "/logout", &jar, Some(&form), None).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let cleared = set_cookies(&headers);
    for name in ["sluice_session", "sluice_csrf"] {
        let (_, value, attributes) = cleared.iter().find(|(n, _, _)| n == name).expect("cleared");
        assert!(
            value.is_empty() && attributes.contains("Max-Age=0"),
            "{name}: {attributes}"
        );
    }

    // A copy of the cookie taken before signing out is worth nothing after: the session ended
    // on the server, for the API and for the console's page.
    let (status, _, body) = browser(&api, Method::GET, "/api/v1/mappings", &jar, None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, headers, _) = browser(&api, Method::GET, "/", &jar, None, None).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(
        headers.get(header::LOCATION).and_then(|v| v.to_str().ok()),
        Some("/login")
    );
    let form = format!("csrf={session_csrf}");
    let (status, _, _) = browser(
        &api,
        Method::POST,
        "/api/v1/mappings/users_to_crm/runs",
        &jar,
        Some(&form),
        Some(session_csrf),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Revoking the token a session was opened with ends the session too.
    let reader = token(&api.service.engine(), "console_reader", Scope::Read).await;
    // (A token made meanwhile is taken up by the next miss a tenth of a second on.)
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (_, headers, _) = browser(&api, Method::GET, "/login", "", None, None).await;
    let csrf = set_cookies(&headers)
        .into_iter()
        .find(|(name, _, _)| name == "sluice_csrf")
        .map(|(_, value, _)| value)
        .expect("csrf");
    let form = format!("token={reader}&csrf={csrf}");
    let (status, headers, _) = browser(
        &api,
        Method::POST,
        "/login",
        &format!("sluice_csrf={csrf}"),
        Some(&form),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let session = set_cookies(&headers)
        .into_iter()
        .find(|(name, _, _)| name == "sluice_session")
        .map(|(_, value, _)| value)
        .expect("session");
    let jar = format!("sluice_session={session}");
    let (status, _, _) = browser(&api, Method::GET, "/api/v1/mappings", &jar, None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        api.service
            .engine()
            .metadata()
            .revoke_token("console_reader")
            .await
            .expect("revoke")
    );
    // At once: the revocation ended the session in the store.
    let (status, _, _) = browser(&api, Method::GET, "/api/v1/mappings", &jar, None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

/// Generated from the OpenAPI document, so a route added later cannot be forgotten: every
/// operation but the health and readiness checks refuses a request without a token (401), and
/// every operation that changes or triggers something refuses a read token (403). The only
/// writes a read token may make are the three that only read: a history query, a schedule
/// preview and a destination's record shape.
#[tokio::test]
async fn every_documented_route_needs_a_token_and_every_write_an_admin_token() {
    let receiver = AckReceiver::start(Duration::ZERO).await;
    let api = Api::start(&config(&receiver.url), 3).await;
    let document = serde_json::to_value(sluice_api::openapi()).expect("document");
    let read = api.read.clone();
    let read_only_posts = [
        "/api/v1/query",
        "/api/v1/schedules/preview",
        "/api/v1/destinations/{name}/shape",
    ];
    let mut checked = 0;
    for (template, operations) in document["paths"].as_object().expect("paths") {
        // Path parameters as a name that exists nowhere; the token check comes first.
        let path = template
            .split('/')
            .map(|part| {
                if part.starts_with('{') {
                    "no_such_thing"
                } else {
                    part
                }
            })
            .collect::<Vec<_>>()
            .join("/");
        for method in operations.as_object().expect("operations").keys() {
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
            let body = (method != Method::GET && method != Method::DELETE).then(|| json!({}));
            let (status, answer) = api.call(method.clone(), &path, None, body.clone()).await;
            if template == "/healthz" || template == "/readyz" {
                assert_ne!(status, StatusCode::UNAUTHORIZED, "{method} {template}: {answer}");
                continue;
            }
            if template == "/api/v1/triggers/dbt" {
                // Signed by dbt Cloud instead of a token: no API token opens it (here no
                // `dbt.webhook_secret` is set, so nothing does; tests/it/dbt.rs checks the
                // signature).
                assert!(status.is_client_error(), "{method} {template}: {status} {answer}");
                let (status, answer) = api.call(method.clone(), &path, Some(&read), body).await;
                assert!(
                    status.is_client_error(),
                    "{method} {template} with a read token: {status} {answer}"
                );
                continue;
            }
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{method} {template} without a token: {answer}"
            );
            let (status, answer) = api.call(method.clone(), &path, Some(&read), body).await;
            let reads = method == Method::GET || read_only_posts.contains(&template.as_str());
            if reads {
                assert!(
                    status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN,
                    "{method} {template} with a read token: {status} {answer}"
                );
            } else {
                assert_error(status, &answer, StatusCode::FORBIDDEN, "forbidden");
            }
            checked += 1;
        }
    }
    assert!(checked >= 40, "only {checked} operations were checked");
}

/// Names in paths that try to climb out, end early or overflow are refused with a JSON error,
/// never a server error, and create nothing.
#[tokio::test]
async fn hostile_names_in_paths_are_refused_and_create_nothing() {
    let receiver = AckReceiver::start(Duration::ZERO).await;
    let api = Api::start(&config(&receiver.url), 3).await;
    let long = "a".repeat(10_000);
    let names = [
        "..",
        "%2E%2E",
        "..%2F..%2Fetc%2Fpasswd",
        "a%2Fb",
        "%00",
        "a%00b",
        "a%0Ab",
        long.as_str(),
    ];
    for name in names {
        for collection in ["sources", "destinations", "models", "mappings"] {
            let path = format!("/api/v1/{collection}/{name}");
            let definition = json!({"definition": {"type": "files", "tables": {}}});
            for (method, body) in [
                (Method::GET, None),
                (Method::PUT, Some(definition)),
                (Method::DELETE, None),
            ] {
                let (status, answer) = api.admin(method.clone(), &path, body).await;
                assert!(
                    status.is_client_error(),
                    "{method} {}: {status} {answer}",
                    &path[..path.len().min(80)]
                );
                assert!(
                    answer["error"]["code"].is_string(),
                    "{method} {}: {answer}",
                    &path[..path.len().min(80)]
                );
            }
        }
    }
    let (_, sources) = api.admin(Method::GET, "/api/v1/sources", None).await;
    let names: Vec<&str> = sources["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, ["warehouse"], "nothing was created");
}

/// An incoming-webhook address with a secret path and a key in its query is a credential as a
/// whole: sealed at rest, shown to a read token as its scheme and host only.
#[tokio::test]
async fn a_webhook_address_is_a_credential_as_a_whole() {
    let receiver = AckReceiver::start(Duration::ZERO).await;
    let api = Api::start(&config(&receiver.url), 3).await;
    // An incoming-webhook address with a secret path and a key in its query is a credential
    // as a whole: sealed at rest, shown to a read token as its scheme and host only.
    let address = "https://hooks.example.com/services/T0/B0/XoXoSecretPath?api_key=QQSECRET";
    let (status, body) = api
        .admin(
            Method::POST,
            "/api/v1/destinations",
            Some(json!({"name": "chat_hook", "definition": {"type": "webhook", "url": address}})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let read = api.read.clone();
    for path in ["/api/v1/destinations/chat_hook", "/api/v1/destinations"] {
        let (status, shown) = api.call(Method::GET, path, Some(&read), None).await;
        assert_eq!(status, StatusCode::OK, "{shown}");
        let text = shown.to_string();
        assert!(text.contains("https://hooks.example.com/…"), "{text}");
        assert!(!text.contains("QQSECRET") && !text.contains("XoXo"), "{text}");
    }
    let stored = api.service.engine().metadata().catalog().await.expect("catalog");
    let text =
        serde_json::to_string(&stored.definitions.iter().map(|d| &d.spec).collect::<Vec<_>>()).expect("json");
    assert!(!text.contains("QQSECRET"), "sealed at rest: {text}");
}

/// What a system echoes of a credential (a rejection quoting the key, a 401 body repeating the
/// token) reaches no caller: not a read token's run record, failure page or CSV, not an admin's
/// connection test, not a model's SQL.
#[tokio::test]
async fn secrets_a_system_echoes_reach_no_run_record_failure_sample_or_connection_test() {
    const KEY: &str = "QQHEADERKEY-7f3a9c";
    let receiver = AckReceiver::start(Duration::ZERO).await;
    let with_key = config(&receiver.url).replace(
        "    max_attempts: 3\n",
        &format!("    max_attempts: 3\n    headers:\n      X-Api-Key: {KEY}\n"),
    );
    assert!(with_key.contains(KEY));
    let api = Api::start(&with_key, 3).await;
    let read = api.read.clone();

    // A rejection that quotes the key: the failure sample and its CSV carry the placeholder.
    receiver.behave(|_| Answer::Refuse(vec![(0, format!("key {KEY} may not write this record"))]));
    let run = api.run("users_to_crm", json!({})).await;
    assert_eq!(run["counts"]["failed"], 1, "{run}");
    let failures = format!("/api/v1/runs/{}/failures", run["id"].as_str().expect("id"));
    let (status, page) = api.call(Method::GET, &failures, Some(&read), None).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let text = page.to_string();
    assert!(
        !text.contains(KEY) && text.contains("key ******** may not write"),
        "{text}"
    );
    let (status, _, csv) = api
        .raw(Method::GET, &failures, Some(&read), None, Some("text/csv"))
        .await;
    assert_eq!(status, StatusCode::OK);
    let csv = String::from_utf8_lossy(&csv);
    assert!(!csv.contains(KEY) && csv.contains("********"), "{csv}");

    // A refusal of the whole request whose body repeats the key: the failed run's error.
    receiver.behave(|_| {
        Answer::Status(
            StatusCode::BAD_REQUEST,
            "{\"error\": \"X-Api-Key QQHEADERKEY-7f3a9c is not valid for this workspace\"}",
            None,
        )
    });
    let run = api.run("users_to_crm", json!({"full": true})).await;
    let (status, shown) = api
        .call(
            Method::GET,
            &format!("/api/v1/runs/{}", run["id"].as_str().expect("id")),
            Some(&read),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{shown}");
    let text = shown.to_string();
    assert!(!text.contains(KEY), "{text}");
    let (_, runs) = api.call(Method::GET, "/api/v1/runs", Some(&read), None).await;
    assert!(!runs.to_string().contains(KEY), "{runs}");

    // A saved destination whose connection test gets a 401 that repeats the token.
    const TOKEN: &str = "pat-na1-QQTOKEN-5d1e77";
    let echo = EchoServer::start().await;
    let (status, body) = api
        .admin(
            Method::POST,
            "/api/v1/destinations",
            Some(json!({"name": "crm_echo", "definition": {"type": "hubspot", "token": TOKEN, "url": echo.url}})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, tested) = api
        .admin(Method::POST, "/api/v1/destinations/crm_echo/test", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{tested}");
    assert_eq!(tested["ok"], false, "{tested}");
    let error = tested["error"].as_str().unwrap_or("");
    assert!(echo.heard(TOKEN), "the server was sent the token");
    assert!(!error.contains(TOKEN) && error.contains("********"), "{error}");
    // The same as a draft, before it is saved.
    let (status, tested) = api
        .admin(
            Method::POST,
            "/api/v1/connection-tests",
            Some(json!({"kind": "destination", "name": "crm_draft", "definition": {"type": "hubspot", "token": "pat-na1-QQDRAFT-99aa00", "url": echo.url}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{tested}");
    assert_eq!(tested["ok"], false, "{tested}");
    assert!(echo.heard("QQDRAFT"), "the server was sent the draft's token");
    let text = tested.to_string();
    assert!(!text.contains("QQDRAFT") && text.contains("********"), "{text}");
    let (_, shown) = api
        .call(Method::GET, "/api/v1/destinations/crm_echo", Some(&read), None)
        .await;
    assert!(!shown.to_string().contains(TOKEN), "{shown}");

    // A model whose SQL holds a credential of this sluice is refused (models are shown to read
    // tokens), and the refusal does not repeat it.
    let (status, body) = api
        .admin(
            Method::POST,
            "/api/v1/models",
            Some(json!({"name": "leaky", "definition": {
                "source": "warehouse",
                "sql": format!("SELECT id, '{TOKEN}' AS token FROM users"),
                "primary_key": "id"
            }})),
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_definition",
    );
    assert!(
        message(&body).contains("credential") && !body.to_string().contains(TOKEN),
        "{body}"
    );
    let (status, _) = api.admin(Method::GET, "/api/v1/models/leaky", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// The log of a whole `sluice run`, at every level, does not carry a credential the
/// destination echoed back.
#[tokio::test]
async fn the_log_of_a_run_carries_no_echoed_secret_at_any_level() {
    const KEY: &str = "QQLOGKEY-0b7e44d2";
    let receiver = AckReceiver::start(Duration::ZERO).await;
    receiver.behave(|_| {
        Answer::Status(
            StatusCode::UNAUTHORIZED,
            "{\"error\": \"QQLOGKEY-0b7e44d2 was revoked\"}",
            None,
        )
    });
    let project = crate::common::TestProject::new(&config(&receiver.url).replace(
        "    max_attempts: 3\n",
        &format!("    max_attempts: 3\n    headers:\n      Authorization: Bearer {KEY}\n"),
    ));
    let model: crate::faults::Model = (1..=3).map(|id| (id, "free".to_string())).collect();
    crate::faults::write_model(&project, &model);
    let output = project
        .sluice_with_env(&["run", "users_to_crm"], &[("RUST_LOG", "trace")])
        .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "the run fails: {stdout}{stderr}");
    assert!(
        stderr.contains("********") || stdout.contains("********"),
        "the echo was scrubbed, not lost: {stdout}{stderr}"
    );
    assert!(!stderr.contains(KEY), "{stderr}");
    assert!(!stdout.contains(KEY), "{stdout}");
}

/// A request body over the limit is refused before it is read whole.
#[tokio::test]
async fn request_bodies_over_the_limit_are_refused() {
    let receiver = AckReceiver::start(Duration::ZERO).await;
    let api = Api::start(&config(&receiver.url), 3).await;
    let big = "x".repeat(sluice_api::BODY_LIMIT + 1);
    let (status, body) = api
        .admin(
            Method::POST,
            "/api/v1/models",
            Some(json!({"name": "big", "definition": {"source": "warehouse", "sql": big, "primary_key": "id"}})),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        &body.to_string()[..200.min(body.to_string().len())]
    );
    let (status, _) = api.admin(Method::GET, "/api/v1/models/big", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// A loopback server answering every request with a 401 whose body repeats the
/// `Authorization` header it was sent, as some APIs do.
struct EchoServer {
    url: String,
    heard: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl EchoServer {
    async fn start() -> Self {
        let heard = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = heard.clone();
        let app = axum::Router::new().fallback(move |headers: axum::http::HeaderMap| {
            let kept = kept.clone();
            async move {
                let sent = headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                kept.lock().expect("lock").push(sent.clone());
                (
                    StatusCode::UNAUTHORIZED,
                    [(header::CONTENT_TYPE, "application/json")],
                    json!({
                        "status": "error",
                        "message": format!("The OAuth token used to make this call is expired or invalid: {sent}"),
                        "category": "EXPIRED_AUTHENTICATION",
                    })
                    .to_string(),
                )
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, heard }
    }

    fn heard(&self, secret: &str) -> bool {
        self.heard
            .lock()
            .expect("lock")
            .iter()
            .any(|h| h.contains(secret))
    }
}

/// `sluice secrets rotate-key` seals every stored secret again under the new key, opening them
/// with the earlier one; afterwards the new key alone opens everything and the earlier one
/// nothing, and a second rotation has nothing to do.
#[tokio::test]
async fn a_key_rotation_reseals_every_secret_and_the_earlier_key_can_go() {
    use base64::Engine as _;
    use sluice_engine::secrets::SecretKey;
    let receiver = AckReceiver::start(Duration::ZERO).await;
    let api = Api::start(&config(&receiver.url), 3).await;
    let (status, body) = api
        .admin(
            Method::POST,
            "/api/v1/destinations",
            Some(json!({"name": "hook", "definition": {
                "type": "webhook",
                "url": "https://hooks.example.com/services/QQROTATE-path",
                "headers": {"Authorization": "Bearer QQROTATE-token"}
            }})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let earlier = base64::engine::general_purpose::STANDARD.encode(crate::api::KEY_BYTES);
    let new = SecretKey::generate().expect("key");
    let env = [
        ("SLUICE_SECRET_KEY", new.as_str()),
        ("SLUICE_SECRET_KEY_PREVIOUS", earlier.as_str()),
    ];
    let output = api
        .project
        .sluice_with_env(&["secrets", "rotate-key"], &env)
        .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("2 secret(s) in 1 definition(s)"), "{stdout}");
    let stored = api.service.engine().metadata().catalog().await.expect("catalog");
    let text =
        serde_json::to_string(&stored.definitions.iter().map(|d| &d.spec).collect::<Vec<_>>()).expect("json");
    assert!(!text.contains("QQROTATE"), "still sealed: {text}");

    let open_with = |key: &str| {
        let key = SecretKey::from_base64(key).expect("key");
        let project = sluice_engine::Project::load(&api.project.config_path()).expect("config");
        async move {
            sluice_engine::Engine::open_with_key(project, &sluice_connectors::Connectors, Some(key))
                .await
                .expect("engine")
        }
    };
    let engine = open_with(&new).await;
    assert!(engine.problems().is_empty(), "{:?}", engine.problems());
    assert!(engine.destination("hook").is_ok());
    let engine = open_with(&earlier).await;
    let problem = engine
        .problems()
        .iter()
        .find(|p| p.name == "hook")
        .expect("the earlier key opens nothing now");
    assert!(
        problem.message.contains("SLUICE_SECRET_KEY_PREVIOUS"),
        "{}",
        problem.message
    );

    let output = api
        .project
        .sluice_with_env(&["secrets", "rotate-key"], &env)
        .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.contains("0 secret(s) in 0 definition(s)"), "{stdout}");
}
