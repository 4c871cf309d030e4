//! The Postgres metadata store (`metadata_store: postgres://...`), as several machines sharing
//! one state use it: history, failed records, leases between processes, and recovery of a
//! killed run, against the real PostgreSQL on 127.0.0.1.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::Value;

use crate::common::{TestProject, newest_run_id, stderr, stdout};
use crate::faults::{
    AckReceiver, Answer, Model, assert_message_ids_are_deterministic, assert_same_state, destination_state,
    project_config, write_model,
};
use crate::services::fresh_database;

#[tokio::test]
async fn a_postgres_metadata_store_keeps_history_leases_and_recovers_killed_runs() {
    let Some(url) = fresh_database("sluice_metadata_it").await else {
        return;
    };
    let receiver = AckReceiver::start(Duration::from_millis(15)).await;
    let config = format!("{}metadata_store: {url}\n", project_config(&receiver.url, 10, 50));
    let project = TestProject::new(&config);
    let mut model: Model = (1..=300).map(|id| (id, "free".to_string())).collect();
    write_model(&project, &model);

    // A first run with refused records: history and failures live in Postgres.
    receiver.behave(|records: &[Value]| {
        Answer::Refuse(
            records
                .iter()
                .enumerate()
                .filter(|(_, r)| r["key"]["id"].as_i64().is_some_and(|id| id % 7 == 0))
                .map(|(i, _)| (i, "rejected: id divisible by 7".to_string()))
                .collect(),
        )
    });
    let first = project.sluice(&["run"]).await;
    assert_eq!(
        first.status.code(),
        Some(2),
        "{}{}",
        stdout(&first),
        stderr(&first)
    );
    assert!(
        !project.path().join(".sluice/sluice.db").exists(),
        "no SQLite store beside a Postgres one"
    );
    let run_id = newest_run_id(&project.sluice(&["runs"]).await, "users_to_crm");
    let csv = project.path().join("failed.csv");
    let failures = project
        .sluice(&["failures", &run_id, "--csv", csv.to_str().expect("utf-8")])
        .await;
    assert!(failures.status.success(), "{}", stderr(&failures));
    let written = std::fs::read_to_string(&csv).expect("csv");
    assert_eq!(written.lines().count(), 1 + 42, "{written}");
    receiver.behave(|_| Answer::Refuse(Vec::new()));

    // Two processes on the same state: the second run is skipped while the first holds the
    // mapping; then the first is killed, and the next run recovers what it delivered.
    for id in 301..=1500 {
        model.insert(id, "new".to_string());
    }
    write_model(&project, &model);
    let mut first = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", "--config"])
        .arg(project.config_path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    for _ in 0..300 {
        if receiver.acks().len() > 400 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let second = project.sluice(&["run"]).await;
    let second_text = stdout(&second);
    assert!(
        second_text.contains("skipped"),
        "{second_text}{}",
        stderr(&second)
    );
    first.start_kill().expect("SIGKILL");
    let _ = first.wait().await;
    let acked_before = receiver.acks().len();

    let next = project.sluice(&["run"]).await;
    assert!(next.status.success(), "{}{}", stdout(&next), stderr(&next));
    let acks = receiver.acks();
    assert_same_state(&destination_state(&acks), &model, "postgres store");
    assert_message_ids_are_deterministic(&acks);
    let mut seen = HashSet::new();
    let resent = acks.iter().filter(|a| !seen.insert(a.message_id.clone())).count();
    assert!(
        resent <= 42 + 50,
        "{resent} sent again: the earlier failures and at most one batch in flight ({acked_before} acknowledged before the kill)"
    );
    let history = stdout(&project.sluice(&["runs", "--limit", "10"]).await);
    assert!(history.contains("interrupted"), "{history}");
    assert!(history.contains("skipped"), "{history}");
}

/// The API's catalog, tokens and cancellations on the Postgres store: a definition made by one
/// process is seen by another, and a version bump tells it so.
#[tokio::test]
async fn the_api_catalog_lives_in_a_postgres_metadata_store_too() {
    use sluice_engine::catalog::Kind;
    use sluice_engine::metadata::MetadataStore;
    use sluice_engine::tokens::Scope;
    let Some(url) = fresh_database("sluice_catalog_it").await else {
        return;
    };
    let one = MetadataStore::open_postgres(&url).await.expect("store");
    let two = MetadataStore::open_postgres(&url).await.expect("second process");
    let spec = serde_json::json!({"type": "webhook", "url": "http://127.0.0.1:1/x"});
    one.put_definition(Kind::Destination, "hook", &spec)
        .await
        .expect("put");
    one.set_mapping_switch("m", false).await.expect("switch");
    let seen = two.catalog().await.expect("catalog");
    assert_eq!(seen.version, 2);
    assert_eq!(seen.get(Kind::Destination, "hook").map(|d| &d.spec), Some(&spec));
    assert_eq!(seen.switches.get("m"), Some(&false));
    assert!(
        two.delete_definition(Kind::Destination, "hook")
            .await
            .expect("delete")
    );
    assert_eq!(one.catalog_version().await.expect("version"), 3);

    let token = one.create_token("ci", Scope::Admin).await.expect("token");
    let tokens = two.tokens().await.expect("tokens");
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0].hash, sluice_engine::tokens::hash(&token));

    let run = sluice_engine::metadata::RunRecord::starting("m", "users", "hook", false);
    one.start_run(&run).await.expect("start");
    assert!(two.request_cancel(&run.id).await.expect("cancel"));
    let asked = one
        .cancel_requests(std::slice::from_ref(&run.id))
        .await
        .expect("requests");
    assert_eq!(asked, std::slice::from_ref(&run.id));
    let page = two
        .runs_page(&sluice_engine::metadata::RunQuery {
            mapping: Some("m".into()),
            status: Some(sluice_engine::metadata::RunStatus::Running),
            after: None,
            limit: 10,
        })
        .await
        .expect("page");
    assert_eq!(page.len(), 1);
    assert!(page[0].cancel_requested);
}
