//! The snapshot store on S3 (moto) behind a proxy that misbehaves as object storage does:
//! throttling, requests that never answer, connections dropped mid-upload, credentials that
//! expire in the middle of a run; and `sluice run` killed with SIGKILL at random points with
//! its snapshots on S3. What they prove: each fault is retried or fails the run with an error
//! that says what to do, nothing is lost, and a kill leaves no visible half-snapshot. Also the
//! credential chains: environment variables, a shared-credentials profile, `${ENV}` references,
//! and that no secret is ever printed.

use std::collections::HashSet;
use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::buckets::{Bucket, Provider, S3_KEY_ID, S3_SECRET, yaml_map};
use crate::common::{TestProject, stderr, stdout};
use crate::faults::{
    AckReceiver, Model, assert_message_ids_are_deterministic, assert_same_state, destination_state,
    kill_rounds, project_config, write_model,
};
use crate::s3_proxy::{Fault, S3FaultProxy};

/// `options` plus short client timeouts, so a hung request is retried within the test.
fn with_timeouts(mut options: Vec<(String, String)>) -> Vec<(String, String)> {
    options.push(("timeout".into(), "2s".into()));
    options.push(("retry_timeout".into(), "60s".into()));
    options
}

fn snapshot_store_config(bucket: &Bucket, options: &[(String, String)]) -> String {
    format!(
        "snapshot_store: {}\nsnapshot_store_options: {}\n",
        bucket.url("snapshots"),
        yaml_map(options)
    )
}

async fn sluice_with_env(project: &TestProject, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"));
    command
        .args(args)
        .arg("--config")
        .arg(project.config_path())
        .env("RUST_LOG", "warn");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().await.expect("run sluice")
}

/// Changes every third plan and adds ten rows.
fn change(model: &mut Model, round: usize) {
    let ids: Vec<i64> = model.keys().copied().collect();
    for id in ids.iter().filter(|id| *id % 3 == round as i64 % 3) {
        model.insert(*id, format!("plan-{round}"));
    }
    let next = ids.last().copied().unwrap_or(0) + 1;
    for id in next..next + 10 {
        model.insert(id, "new".into());
    }
}

#[tokio::test]
async fn throttling_timeouts_and_dropped_uploads_are_retried() {
    let Some(bucket) = Bucket::new(Provider::S3, "faults-retried").await else {
        return;
    };
    let proxy = S3FaultProxy::start(&bucket.endpoint).await;
    let receiver = AckReceiver::start(Duration::ZERO).await;
    let options = with_timeouts(bucket.options_at(&proxy.endpoint));
    let project = TestProject::new(&format!(
        "{}{}",
        project_config(&receiver.url, 50, 100),
        snapshot_store_config(&bucket, &options)
    ));
    // Every fourth request is throttled; the 5th and 23rd hang; the first two uploads with a
    // body are cut off part way.
    let requests = Arc::new(AtomicUsize::new(0));
    let drops = Arc::new(AtomicUsize::new(0));
    {
        let (requests, drops) = (requests.clone(), drops.clone());
        proxy.plan(move |seen| {
            let n = requests.fetch_add(1, Ordering::SeqCst) + 1;
            if seen.method == "PUT" && drops.load(Ordering::SeqCst) < 2 {
                drops.fetch_add(1, Ordering::SeqCst);
                Fault::DropMidBody
            } else if n == 5 || n == 23 {
                Fault::Hang
            } else if n % 4 == 0 {
                Fault::SlowDown
            } else {
                Fault::Forward
            }
        });
    }
    let mut model: Model = (1..=400).map(|id| (id, "free".to_string())).collect();
    for round in 0..3 {
        if round > 0 {
            change(&mut model, round);
        }
        write_model(&project, &model);
        let run = project.sluice(&["run"]).await;
        assert!(
            run.status.success(),
            "round {round}: {}{}",
            stdout(&run),
            stderr(&run)
        );
    }
    assert_eq!(proxy.count(Fault::DropMidBody), 2);
    assert!(
        proxy
            .seen()
            .iter()
            .any(|s| s.fault == Fault::DropMidBody && s.path.contains("/snapshots/models/users/")),
        "a snapshot upload was cut off"
    );
    assert_eq!(proxy.count(Fault::Hang), 2);
    assert!(
        proxy.count(Fault::SlowDown) >= 5,
        "{}",
        proxy.count(Fault::SlowDown)
    );
    let acks = receiver.acks();
    assert_same_state(&destination_state(&acks), &model, "after retried faults");
    assert_message_ids_are_deterministic(&acks);
    // Faults cost retries, not resends: every record went once.
    let distinct: HashSet<&str> = acks.iter().map(|a| a.message_id.as_str()).collect();
    assert_eq!(distinct.len(), acks.len());
}

fn write_wide_users(project: &TestProject, rows: i64) {
    use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
    let ids: Vec<i64> = (1..=rows).collect();
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    let payloads: Vec<String> = ids
        .iter()
        .map(|_| {
            (0..6)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    format!("{state:016x}")
                })
                .collect()
        })
        .collect();
    let batch = RecordBatch::try_from_iter(vec![
        ("id", Arc::new(Int64Array::from(ids.clone())) as ArrayRef),
        (
            "email",
            Arc::new(StringArray::from_iter_values(
                ids.iter().map(|id| format!("user{id}@example.com")),
            )) as ArrayRef,
        ),
        (
            "plan",
            Arc::new(StringArray::from_iter_values(
                ids.iter().map(|id| format!("plan-{}", id % 7)),
            )) as ArrayRef,
        ),
        ("payload", Arc::new(StringArray::from(payloads)) as ArrayRef),
    ])
    .expect("batch");
    crate::common::write_parquet(&project.path().join("data/users.parquet"), &batch);
}

/// Bucket files past object_store's 10 MiB buffer go up as multipart uploads, a snapshot's and
/// a `file` export's alike; a part whose connection drops is sent again.
#[tokio::test]
async fn large_files_go_up_in_parts_and_a_dropped_part_is_sent_again() {
    let Some(bucket) = Bucket::new(Provider::S3, "multipart").await else {
        return;
    };
    let proxy = S3FaultProxy::start(&bucket.endpoint).await;
    let options = yaml_map(&with_timeouts(bucket.options_at(&proxy.endpoint)));
    let project = TestProject::new(&format!(
        r#"state_dir: .sluice
snapshot_store: {snapshots}
snapshot_store_options: {options}
sources:
  warehouse:
    type: files
    tables:
      users: data/users.parquet
models:
  users:
    source: warehouse
    sql: SELECT id, email, plan, payload FROM users
    primary_key: id
destinations:
  exports:
    type: file
    url: {exports}
    options: {options}
mappings:
  users_out:
    model: users
    destination: exports
    fields: {{ email: email, plan: plan }}
"#,
        snapshots = bucket.url("snapshots"),
        exports = bucket.url("exports"),
    ));
    // 200,000 rows with a 96-character payload that does not compress: the snapshot's one
    // bucket file is past 10 MiB, and so is the export (which leaves the payload out).
    const ROWS: i64 = 200_000;
    write_wide_users(&project, ROWS);
    let dropped = Arc::new(AtomicUsize::new(0));
    {
        let dropped = dropped.clone();
        proxy.plan(move |seen| {
            if seen.query.contains("partNumber=2") && dropped.fetch_add(1, Ordering::SeqCst) == 0 {
                Fault::DropMidBody
            } else {
                Fault::Forward
            }
        });
    }
    let run = project.sluice(&["run"]).await;
    assert!(run.status.success(), "{}{}", stdout(&run), stderr(&run));
    let seen = proxy.seen();
    let started: Vec<&str> = seen
        .iter()
        .filter(|s| s.method == "POST" && (s.query == "uploads" || s.query == "uploads="))
        .map(|s| s.path.as_str())
        .collect();
    assert!(
        started.iter().any(|p| p.contains("/snapshots/models/users/")),
        "{started:?} {:?}",
        seen.iter()
            .filter(|s| s.method == "PUT")
            .map(|s| (&s.path, &s.query))
            .collect::<Vec<_>>()
    );
    assert!(
        started.iter().any(|p| p.contains("/exports/users_out/")),
        "{started:?}"
    );
    assert_eq!(proxy.count(Fault::DropMidBody), 1);
    let completed = seen
        .iter()
        .filter(|s| s.method == "POST" && s.query.starts_with("uploadId="))
        .count();
    assert_eq!(completed, started.len(), "every upload was completed");

    let exports = bucket.list("exports/users_out").await;
    assert_eq!(exports.len(), 1, "{exports:?}");
    let text = bucket.get(&exports[0]).await;
    assert!(text.len() > 10 * 1024 * 1024, "{} bytes", text.len());
    assert_eq!(text.iter().filter(|b| **b == b'\n').count() as i64, ROWS);
    let count = project
        .sluice(&["query", "SELECT count(*) AS n FROM users", "--format", "csv"])
        .await;
    assert_eq!(stdout(&count).trim(), format!("n\n{ROWS}"), "{}", stderr(&count));
}

/// A `file` export whose completion outlasts the client's timeout (completing a file of many
/// GiB can take minutes; moto took over 30 s for a 4.7 GB JSONL file): the file may exist on
/// the server, but sluice cannot know, so the run fails saying what to do and counts nothing as
/// delivered; the next run writes every record again.
#[tokio::test]
async fn a_file_completion_that_times_out_fails_the_run_and_the_next_run_writes_every_record() {
    let Some(bucket) = Bucket::new(Provider::S3, "completion").await else {
        return;
    };
    let proxy = S3FaultProxy::start(&bucket.endpoint).await;
    let project = TestProject::new(&format!(
        r#"state_dir: .sluice
snapshot_store: {snapshots}
snapshot_store_options: {direct}
sources:
  warehouse: {{ type: files, tables: {{ users: data/users.parquet }} }}
models:
  users:
    source: warehouse
    sql: SELECT id, email, plan, payload FROM users
    primary_key: id
destinations:
  exports: {{ type: file, url: {exports}, options: {proxied} }}
mappings:
  users_out:
    model: users
    destination: exports
    fields: {{ email: email, "traits.plan": plan, payload: payload }}
"#,
        snapshots = bucket.url("snapshots"),
        direct = yaml_map(&bucket.options()),
        exports = bucket.url("exports"),
        proxied = yaml_map(&with_timeouts(bucket.options_at(&proxy.endpoint))),
    ));
    // Past 10 MiB of JSONL: a multipart upload.
    const ROWS: i64 = 120_000;
    write_wide_users(&project, ROWS);
    // The first run's completion is done by the server but its answer never comes; the
    // client's retry then finds the upload gone, as S3 answers once it completed.
    let mut completed: Option<String> = None;
    proxy.plan(move |seen| {
        let completion = seen.method == "POST" && seen.query.starts_with("uploadId=");
        match &completed {
            _ if !completion => Fault::Forward,
            None => {
                completed = Some(seen.path.clone());
                Fault::ForwardThenHang
            }
            Some(path) if *path == seen.path => Fault::NoSuchUpload,
            Some(_) => Fault::Forward,
        }
    });
    let first = project.sluice(&["run"]).await;
    let text = format!("{}{}", stdout(&first), stderr(&first));
    assert!(!first.status.success(), "{text}");
    assert!(
        text.contains("could not write to its object store") && text.contains("completing users_out/"),
        "{text}"
    );
    assert!(text.contains("raise the store's `timeout`"), "{text}");
    assert_eq!(proxy.count(Fault::ForwardThenHang), 1);

    let second = project.sluice(&["run"]).await;
    assert!(second.status.success(), "{}{}", stdout(&second), stderr(&second));
    // Every record is in the visible files (some twice, if the first completion finished).
    let mut acks = Vec::new();
    let mut keys = bucket.list("exports/users_out").await;
    keys.sort();
    for key in keys {
        for line in String::from_utf8(bucket.get(&key).await).expect("UTF-8").lines() {
            let r: serde_json::Value = serde_json::from_str(line).expect("JSONL");
            acks.push(crate::faults::Ack {
                message_id: r["message_id"].as_str().unwrap_or_default().to_string(),
                id: r["key"]["id"].as_i64().unwrap_or(-1),
                op: r["op"].as_str().unwrap_or_default().to_string(),
                data: r["data"].clone(),
            });
        }
    }
    let model: Model = (1..=ROWS).map(|id| (id, format!("plan-{}", id % 7))).collect();
    assert_same_state(&destination_state(&acks), &model, "after a completion timed out");
}

#[tokio::test]
async fn credentials_expiring_mid_run_fail_it_clearly_and_the_next_run_loses_nothing() {
    let Some(bucket) = Bucket::new(Provider::S3, "faults-expired").await else {
        return;
    };
    let proxy = S3FaultProxy::start(&bucket.endpoint).await;
    let receiver = AckReceiver::start(Duration::ZERO).await;
    let options = with_timeouts(bucket.options_at(&proxy.endpoint));
    // Small checkpoints: the run writes one to the store every 20 records it delivers.
    let project = TestProject::new(&format!(
        "{}{}",
        project_config(&receiver.url, 10, 20),
        snapshot_store_config(&bucket, &options)
    ));
    let mut model: Model = (1..=300).map(|id| (id, "free".to_string())).collect();
    write_model(&project, &model);
    let first = project.sluice(&["run"]).await;
    assert!(first.status.success(), "{}{}", stdout(&first), stderr(&first));

    // The token expires once delivery is under way: the next checkpoint upload is refused.
    change(&mut model, 1);
    write_model(&project, &model);
    let expired = Arc::new(Mutex::new(false));
    {
        let expired = expired.clone();
        let acks_at_start = receiver.acks().len();
        let receiver_acks = receiver.acks_counter();
        proxy.plan(move |_| {
            let mut expired = expired.lock().expect("lock");
            if !*expired && receiver_acks() >= acks_at_start + 30 {
                *expired = true;
            }
            if *expired {
                Fault::ExpiredToken
            } else {
                Fault::Forward
            }
        });
    }
    let failed = project.sluice(&["run"]).await;
    let text = format!("{}{}", stdout(&failed), stderr(&failed));
    assert_eq!(failed.status.code(), Some(1), "{text}");
    assert!(
        text.contains("ExpiredToken"),
        "the store's own error is shown: {text}"
    );
    assert!(
        text.contains("credentials have expired"),
        "the error says what to do: {text}"
    );
    assert!(!text.contains(S3_SECRET), "no secret in the output: {text}");
    let delivered_before_expiry = receiver.acks().len();
    assert!(
        delivered_before_expiry > 300,
        "delivery had started: {delivered_before_expiry}"
    );

    // New credentials: the next run sends what was not checkpointed, and the model converges.
    proxy.plan(|_| Fault::Forward);
    let next = project.sluice(&["run"]).await;
    assert!(next.status.success(), "{}{}", stdout(&next), stderr(&next));
    let acks = receiver.acks();
    assert_same_state(
        &destination_state(&acks),
        &model,
        "after the credentials were renewed",
    );
    assert_message_ids_are_deterministic(&acks);
    let show = project.sluice(&["runs", "--limit", "5"]).await;
    assert!(stdout(&show).contains("failed"), "{}", stdout(&show));
}

#[tokio::test]
async fn credentials_come_from_the_environment_a_profile_or_env_references_and_are_never_printed() {
    let Some(bucket) = Bucket::new(Provider::S3, "credentials").await else {
        return;
    };
    let proxy = S3FaultProxy::start(&bucket.endpoint).await;
    let receiver = AckReceiver::start(Duration::ZERO).await;
    let without_keys: Vec<(String, String)> = bucket
        .options_at(&proxy.endpoint)
        .into_iter()
        .filter(|(k, _)| !k.starts_with("aws_access_key_id") && !k.starts_with("aws_secret"))
        .collect();
    let model: Model = (1..=50).map(|id| (id, "free".to_string())).collect();
    let key_ids = |proxy: &S3FaultProxy| -> HashSet<Option<String>> {
        proxy.seen().into_iter().map(|s| s.access_key_id).collect()
    };

    // 1. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in sluice's environment.
    let project = TestProject::new(&format!(
        "{}{}",
        project_config(&receiver.url, 50, 100),
        snapshot_store_config(&bucket, &without_keys)
    ));
    write_model(&project, &model);
    let run = sluice_with_env(
        &project,
        &["run"],
        &[
            ("AWS_ACCESS_KEY_ID", "AKIAFROMENVIRONMENT1"),
            ("AWS_SECRET_ACCESS_KEY", S3_SECRET),
        ],
    )
    .await;
    assert!(run.status.success(), "{}{}", stdout(&run), stderr(&run));
    assert_eq!(
        key_ids(&proxy),
        HashSet::from([Some("AKIAFROMENVIRONMENT1".to_string())])
    );

    // 2. A named profile of a shared credentials file.
    let credentials = project.path().join("aws-credentials");
    std::fs::write(
        &credentials,
        format!(
            "[default]\naws_access_key_id = AKIADEFAULTPROFILE01\naws_secret_access_key = {S3_SECRET}\n\n[ci]\naws_access_key_id = AKIACIPROFILE0000001\naws_secret_access_key = {S3_SECRET}\n"
        ),
    )
    .expect("credentials file");
    let before = proxy.seen().len();
    let credentials_env = credentials.display().to_string();
    let run = sluice_with_env(
        &project,
        &["run", "--full"],
        &[
            ("AWS_SHARED_CREDENTIALS_FILE", credentials_env.as_str()),
            ("AWS_PROFILE", "ci"),
        ],
    )
    .await;
    assert!(run.status.success(), "{}{}", stdout(&run), stderr(&run));
    let profile_keys: HashSet<Option<String>> = proxy.seen()[before..]
        .iter()
        .map(|s| s.access_key_id.clone())
        .collect();
    assert_eq!(
        profile_keys,
        HashSet::from([Some("AKIACIPROFILE0000001".to_string())])
    );
    // A profile that does not exist is an error naming it.
    let run = sluice_with_env(
        &project,
        &["run"],
        &[
            ("AWS_SHARED_CREDENTIALS_FILE", credentials_env.as_str()),
            ("AWS_PROFILE", "nope"),
        ],
    )
    .await;
    assert_eq!(run.status.code(), Some(1));
    assert!(stderr(&run).contains("AWS profile `nope`"), "{}", stderr(&run));

    // 3. `${ENV}` references in the options; at debug level, through `sluice check`, and in the
    //    errors of a store that refuses them, the secret never appears.
    let mut referenced = without_keys.clone();
    referenced.push(("aws_access_key_id".into(), "${SNAP_KEY_ID}".into()));
    referenced.push(("aws_secret_access_key".into(), "${SNAP_SECRET}".into()));
    let project = TestProject::new(&format!(
        "{}{}",
        project_config(&receiver.url, 50, 100),
        snapshot_store_config(&bucket, &referenced)
    ));
    write_model(&project, &model);
    let secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYSLUICE";
    let env = [
        ("SNAP_KEY_ID", S3_KEY_ID),
        ("SNAP_SECRET", secret),
        ("RUST_LOG", "debug"),
    ];
    let before = proxy.seen().len();
    let run = sluice_with_env(&project, &["run"], &env).await;
    assert!(run.status.success(), "{}{}", stdout(&run), stderr(&run));
    let referenced_keys: HashSet<Option<String>> = proxy.seen()[before..]
        .iter()
        .map(|s| s.access_key_id.clone())
        .collect();
    assert_eq!(referenced_keys, HashSet::from([Some(S3_KEY_ID.to_string())]));
    proxy.plan(|_| Fault::ExpiredToken);
    for args in [&["run"][..], &["check"][..], &["retire"][..]] {
        let output = sluice_with_env(&project, args, &env).await;
        let text = format!("{}{}", stdout(&output), stderr(&output));
        assert!(
            !text.contains(secret),
            "`sluice {}` printed the secret: {text}",
            args.join(" ")
        );
        assert!(!text.contains(S3_SECRET));
    }
}

/// SIGKILL at random points with the snapshot store on S3: nothing lost (the local kill test's
/// assertions), and no kill leaves a visible half-snapshot: every committed manifest's files are
/// all there and readable, and what uncommitted data a kill left is cleaned up.
#[tokio::test]
async fn killed_runs_with_snapshots_on_s3_lose_nothing_and_leave_no_half_snapshot() {
    let Some(bucket) = Bucket::new(Provider::S3, "kills").await else {
        return;
    };
    // Runs against moto take about twice as long as against a local directory.
    let project = kill_rounds(&snapshot_store_config(&bucket, &bucket.options()), 40..900).await;
    eprintln!("{}", stdout(&project.sluice(&["runs", "--limit", "20"]).await));
    let committed = bucket.list("snapshots/models/users/snapshots").await;
    let manifests: Vec<&String> = committed.iter().filter(|k| k.ends_with(".json")).collect();
    assert!(!manifests.is_empty());
    for manifest in &manifests {
        let text: serde_json::Value = serde_json::from_slice(&bucket.get(manifest).await).expect("manifest");
        for path in manifest_files(&text) {
            assert!(
                committed.contains(&path),
                "{manifest} commits {path}, which is missing"
            );
        }
    }
    // What the kills left uncommitted goes once it is older than `abandoned_after`.
    let config = std::fs::read_to_string(project.config_path()).expect("config");
    std::fs::write(
        project.config_path(),
        config.replace(
            "primary_key: id\n",
            "primary_key: id\n    retain: { abandoned_after: 1s }\n",
        ),
    )
    .expect("config");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let retire = project.sluice(&["retire"]).await;
    assert!(retire.status.success(), "{}", stderr(&retire));
    let committed = bucket.list("snapshots/models/users/snapshots").await;
    let mut referenced: HashSet<String> = HashSet::new();
    for manifest in committed.iter().filter(|k| k.ends_with(".json")) {
        let text: serde_json::Value = serde_json::from_slice(&bucket.get(manifest).await).expect("manifest");
        referenced.extend(manifest_files(&text));
    }
    for key in committed.iter().filter(|k| k.ends_with(".parquet")) {
        assert!(
            referenced.contains(key),
            "{key} is data no manifest refers to, left after retiring"
        );
    }
    assert!(
        !committed.iter().any(|k| k.ends_with(".writing")),
        "markers of killed writers are removed: {committed:?}"
    );
    let manifests: Vec<&String> = committed.iter().filter(|k| k.ends_with(".json")).collect();
    // Every committed snapshot reads back whole.
    let history = project
        .sluice(&[
            "query",
            "SELECT count(DISTINCT _snapshot_id) AS n FROM users_history",
            "--format",
            "csv",
        ])
        .await;
    assert!(history.status.success(), "{}", stderr(&history));
    assert_eq!(
        stdout(&history).trim(),
        format!("n\n{}", manifests.len()),
        "{}",
        stderr(&history)
    );
}

/// Every data file a manifest refers to (its own rows, a delta's index, changes and layers), as
/// bucket keys.
fn manifest_files(manifest: &serde_json::Value) -> Vec<String> {
    let mut files: Vec<&serde_json::Value> = Vec::new();
    for list in ["files", "index", "changes"] {
        files.extend(manifest[list].as_array().into_iter().flatten());
    }
    for layer in manifest["layers"].as_array().into_iter().flatten() {
        files.extend(layer["files"].as_array().into_iter().flatten());
    }
    files
        .iter()
        .map(|f| format!("snapshots/{}", f["path"].as_str().expect("path")))
        .collect()
}
