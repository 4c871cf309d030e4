//! `sluice serve` as a service: scheduled runs (and skipped overlaps), Prometheus metrics,
//! shutdown on SIGTERM; snapshot retention; alerts; JSON logs.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{TestProject, stderr, stdout, table_rows};
use crate::faults::{
    AckReceiver, Answer, Model, assert_same_state, destination_state, project_config, terminate, write_model,
};

/// A free loopback port.
async fn free_port() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("addr").port()
}

/// `GET path` on 127.0.0.1:`port` (with a bearer token when given); the response's body, once
/// the server answers.
async fn http_get(port: u16, path: &str, token: Option<&str>) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    response.split_once("\r\n\r\n").map(|(_, body)| body.to_string())
}

/// A schedule every two seconds, and a first run that takes longer than that: `serve` runs the
/// mapping on schedule, records the overlapping run as skipped, serves metrics, and stops
/// cleanly on SIGTERM.
#[tokio::test]
async fn serve_runs_mappings_on_schedule_skips_overlaps_and_serves_metrics() {
    let receiver = AckReceiver::start(Duration::from_millis(30)).await;
    let config = project_config(&receiver.url, 10, 100)
        .replace(
            "    constants: { \"context.source\": \"sluice\" }\n",
            "    constants: { \"context.source\": \"sluice\" }\n    schedule: { cron: \"*/2 * * * * *\" }\n",
        )
        .replace("max_attempts: 3", "max_attempts: 3\n    concurrency: 1");
    assert!(config.contains("schedule: { cron"), "{config}");
    let project = TestProject::new(&config);
    // 900 records at 10 per request, one request at a time, 30 ms each: the first run takes
    // about 3 s.
    let model: Model = (1..=900).map(|id| (id, "free".to_string())).collect();
    write_model(&project, &model);
    // A read token for the scraper (shown once, on stdout).
    let created = project
        .sluice(&["token", "create", "prometheus", "--scope", "read"])
        .await;
    assert!(created.status.success(), "{}", stderr(&created));
    let scrape_token = stdout(&created).trim().to_string();
    let scrape_token = scrape_token.as_str();
    let port = free_port().await;
    let serve = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--config"])
        .arg(project.config_path())
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn serve");

    // Wait for: the first run done, an overlapping run skipped, and a later scheduled run.
    let mut rows = Vec::new();
    for _ in 0..150 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        rows = table_rows(
            &stdout(&project.sluice(&["runs", "--limit", "50"]).await),
            "users_to_crm",
        );
        let succeeded = rows.iter().filter(|r| r[1] == "succeeded").count();
        let skipped = rows.iter().filter(|r| r[1] == "skipped").count();
        if succeeded >= 2 && skipped >= 1 {
            break;
        }
    }
    assert!(
        rows.iter().filter(|r| r[1] == "succeeded").count() >= 2,
        "{rows:?}"
    );
    assert!(
        rows.iter().any(|r| r[1] == "skipped"),
        "an overlapping run is skipped: {rows:?}"
    );
    assert!(
        rows.iter().all(|r| r[10] == "schedule"),
        "every run was started by the schedule: {rows:?}"
    );
    assert_same_state(
        &destination_state(&receiver.acks()),
        &model,
        "after scheduled runs",
    );

    // Metrics need a token, like the rest of the API but the health checks.
    let refused = http_get(port, "/metrics", None).await.expect("metrics answer");
    assert!(refused.contains("unauthorized"), "{refused}");
    let metrics = http_get(port, "/metrics", Some(scrape_token))
        .await
        .expect("metrics answer");
    assert!(
        metrics.contains(r#"sluice_runs_total{mapping="users_to_crm",status="succeeded"}"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"sluice_runs_total{mapping="users_to_crm",status="skipped"}"#));
    assert!(metrics.contains(r#"sluice_destination_requests_total{vendor="webhook",status="200"}"#));
    assert!(metrics.contains("sluice_run_duration_seconds_bucket"));
    let health = http_get(port, "/healthz", None).await.expect("health");
    assert!(health.contains("\"ok\""), "{health}");

    terminate(&serve);
    let output = tokio::time::timeout(Duration::from_secs(15), serve.wait_with_output())
        .await
        .expect("serve stops on SIGTERM")
        .expect("wait");
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("run finished"), "{}", stderr(&output));
}

/// `retain: {runs: 2}` keeps the two newest snapshots, and also the old one that holds the row
/// of a delete still awaiting retry; once that delete is delivered, the old snapshot goes.
#[tokio::test]
async fn retention_keeps_what_retries_need_and_retires_the_rest() {
    let receiver = AckReceiver::start(Duration::ZERO).await;
    let config = project_config(&receiver.url, 50, 8192).replace(
        "    primary_key: id\n",
        "    primary_key: id\n    retain: { runs: 2 }\n",
    );
    let project = TestProject::new(&config);
    let snapshots = || -> usize {
        std::fs::read_dir(project.path().join(".sluice/snapshots/models/users/snapshots"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                    .count()
            })
            .unwrap_or(0)
    };
    let mut model: Model = (1..=20).map(|id| (id, "free".to_string())).collect();
    write_model(&project, &model);
    assert!(project.sluice(&["run"]).await.status.success());
    // Record 5 leaves the model, and its delete keeps failing.
    receiver.behave(|records: &[Value]| {
        Answer::Refuse(
            records
                .iter()
                .enumerate()
                .filter(|(_, r)| r["op"] == "deleted" && r["key"]["id"] == 5)
                .map(|(i, _)| (i, "locked record".to_string()))
                .collect(),
        )
    });
    model.remove(&5);
    for round in 0..4 {
        model.insert(100 + round, "new".to_string());
        write_model(&project, &model);
        let run = project.sluice(&["run"]).await;
        assert_eq!(run.status.code(), Some(2), "{}", stdout(&run));
    }
    let retire = project.sluice(&["retire"]).await;
    let text = stdout(&retire);
    assert!(retire.status.success(), "{}", stderr(&retire));
    assert!(
        text.contains("3 snapshot(s) kept (1 only because a mapping still needs them)"),
        "{text}"
    );
    assert_eq!(snapshots(), 3);
    // The delete goes through; the snapshot it needed is retired by the next pass.
    receiver.behave(|_| Answer::Refuse(Vec::new()));
    let run = project.sluice(&["run"]).await;
    assert!(run.status.success(), "{}", stdout(&run));
    assert_same_state(&destination_state(&receiver.acks()), &model, "after the delete");
    let text = stdout(&project.sluice(&["retire"]).await);
    assert!(text.contains("2 snapshot(s) kept (0 only because"), "{text}");
    assert_eq!(snapshots(), 2);
}

#[derive(Clone, Default)]
struct Hooks(Arc<Mutex<Vec<Value>>>);

async fn hook(State(hooks): State<Hooks>, body: Bytes) -> &'static str {
    if let Ok(value) = serde_json::from_slice(&body) {
        hooks.0.lock().expect("lock").push(value);
    }
    "ok"
}

/// Alerts go to the mapping's URLs when too many records fail and when the extracted row count
/// swings; JSON logs carry the run id and mapping on every line of a run.
#[tokio::test]
async fn alerts_fire_on_failure_ratios_and_row_count_swings_and_logs_are_json() {
    let hooks = Hooks::default();
    let app = Router::new().route("/hook", post(hook)).with_state(hooks.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let hook_url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let receiver = AckReceiver::start(Duration::ZERO).await;
    let config = project_config(&receiver.url, 50, 8192).replace(
        "    constants: { \"context.source\": \"sluice\" }\n",
        &format!(
            "    constants: {{ \"context.source\": \"sluice\" }}\n    alerts: {{ urls: [\"{hook_url}\"], failed_ratio: 0.2, extracted_change: 0.4 }}\n"
        ),
    );
    let project = TestProject::new(&config);
    let mut model: Model = (1..=100).map(|id| (id, "free".to_string())).collect();
    for round in 0..3 {
        model.insert(1000 + round, "new".to_string());
        write_model(&project, &model);
        assert!(project.sluice(&["run"]).await.status.success());
    }
    assert!(
        hooks.0.lock().expect("lock").is_empty(),
        "nothing to alert about yet"
    );

    // Half the model is gone and every update is refused.
    model.retain(|id, _| id % 2 == 0);
    for plan in model.values_mut() {
        *plan = "pro".to_string();
    }
    write_model(&project, &model);
    receiver.behave(|records: &[Value]| {
        Answer::Refuse(
            records
                .iter()
                .enumerate()
                .filter(|(_, r)| r["op"] == "updated")
                .map(|(i, _)| (i, "rejected".to_string()))
                .collect(),
        )
    });
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"));
    command
        .args(["run", "--log-format", "json", "--config"])
        .arg(project.config_path())
        .env("RUST_LOG", "info");
    let run = command.output().await.expect("run");
    assert_eq!(run.status.code(), Some(2), "{}", stdout(&run));
    let alerts = hooks.0.lock().expect("lock").clone();
    let kinds: Vec<&str> = alerts
        .iter()
        .filter_map(|a| a["sluice"]["alert"].as_str())
        .collect();
    assert_eq!(kinds, ["failed_ratio", "extracted_change"], "{alerts:?}");
    assert!(
        alerts[0]["text"]
            .as_str()
            .is_some_and(|t| t.contains("users_to_crm"))
    );

    // Every log line is a JSON object; a run's lines carry its id and mapping.
    let logs = stderr(&run);
    let lines: Vec<Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let in_run: Vec<&Value> = lines.iter().filter(|l| l["span"]["name"] == "run").collect();
    assert!(!in_run.is_empty(), "{logs}");
    assert!(
        in_run
            .iter()
            .all(|l| l["span"]["mapping"] == "users_to_crm" && l["span"]["run_id"].is_string())
    );
    assert!(lines.iter().any(|l| l["message"] == "alert sent"), "{logs}");
}

/// A disabled mapping does not run; enabled again, its next run sends everything that changed
/// since its last successful run, and only that.
#[tokio::test]
async fn a_re_enabled_mapping_sends_what_changed_while_it_was_disabled() {
    let receiver = AckReceiver::start(Duration::ZERO).await;
    let config = project_config(&receiver.url, 50, 8192);
    let disabled = config.replace(
        "    model: users\n    destination: crm\n",
        "    model: users\n    destination: crm\n    enabled: false\n",
    );
    assert_ne!(config, disabled);
    let project = TestProject::new(&config);
    let mut model: Model = (1..=50).map(|id| (id, "free".to_string())).collect();
    write_model(&project, &model);
    assert!(project.sluice(&["run"]).await.status.success());
    let first = receiver.acks().len();
    assert_eq!(first, 50);

    std::fs::write(project.config_path(), &disabled).expect("config");
    for round in 0..2i64 {
        for id in 1..=5 {
            model.insert(id + round * 5, format!("pro-{round}"));
        }
        model.remove(&(40 + round));
        model.insert(100 + round, "new".to_string());
        write_model(&project, &model);
        let run = project.sluice(&["run"]).await;
        assert!(run.status.success(), "{}", stderr(&run));
        assert_eq!(receiver.acks().len(), first, "a disabled mapping sends nothing");
    }

    std::fs::write(project.config_path(), &config).expect("config");
    let run = project.sluice(&["run"]).await;
    assert!(run.status.success(), "{}", stdout(&run));
    let sent = receiver.acks().len() - first;
    // 10 updated, 2 deleted, 2 added while it was disabled.
    assert_eq!(sent, 14, "{}", stdout(&run));
    assert_same_state(&destination_state(&receiver.acks()), &model, "after re-enabling");
}
