//! End to end through the `sluice` binary, against a local HTTP receiver.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::{Value, json};

use crate::common::{Receiver, TestProject, User, result_row, stderr, stdout, user, webhook_config};

fn users() -> Vec<User> {
    vec![
        user(1, "ada@example.com", "free", 10),
        user(2, "grace@example.com", "pro", 20),
        user(3, "linus@example.com", "free", 30),
        user(4, "ken@example.com", "starter", 40),
        user(5, "barbara@example.com", "pro", 50),
    ]
}

fn ids(records: &[Value]) -> Vec<(String, i64)> {
    records
        .iter()
        .map(|r| {
            (
                r["op"].as_str().unwrap_or_default().to_string(),
                r["key"]["id"].as_i64().unwrap_or_default(),
            )
        })
        .collect()
}

/// Answers 200 with the records whose key is in `fail` listed as failed (by index).
fn fail_keys(fail: HashSet<i64>) -> impl FnMut(&Value) -> axum::response::Response + Send + 'static {
    move |body: &Value| {
        let failed: Vec<Value> = body["records"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
            .filter(|(_, r)| r["key"]["id"].as_i64().is_some_and(|id| fail.contains(&id)))
            .map(|(i, _)| json!({"index": i, "error": "invalid email"}))
            .collect();
        (StatusCode::OK, axum::Json(json!({ "failed": failed }))).into_response()
    }
}

#[tokio::test]
async fn second_run_sends_exactly_the_changes() {
    let receiver = Receiver::start().await;
    let project = TestProject::new(&webhook_config(&receiver.url, ""));
    project.write_users(&users());

    let first = project.sluice(&["run"]).await;
    assert!(first.status.success(), "{}\n{}", stdout(&first), stderr(&first));
    let row = result_row(&first, "users_to_crm");
    assert_eq!(
        row[1..9],
        ["succeeded", "5", "5", "0", "0", "5", "0", "0"],
        "{}",
        stdout(&first)
    );
    let requests = receiver.take();
    assert_eq!(requests.len(), 3, "batch_size 2 makes 3 requests for 5 records");
    assert_eq!(requests[0].headers["x-sluice-mapping"], "users_to_crm");

    // Grace upgrades, Linus leaves, Barbara's score changes, Edsger signs up.
    let mut changed = users();
    changed[1].plan = "enterprise";
    changed.remove(2);
    changed[3].lead_score = 55;
    changed.push(user(6, "edsger@example.com", "free", 60));
    project.write_users(&changed);

    let second = project.sluice(&["run"]).await;
    assert!(
        second.status.success(),
        "{}\n{}",
        stdout(&second),
        stderr(&second)
    );
    let row = result_row(&second, "users_to_crm");
    assert_eq!(
        row[1..9],
        ["succeeded", "5", "1", "2", "1", "4", "0", "0"],
        "{}",
        stdout(&second)
    );
    insta::assert_json_snapshot!("second_run_payloads", receiver.take_records());

    let third = project.sluice(&["run"]).await;
    assert!(third.status.success());
    assert!(receiver.take().is_empty(), "nothing changed, nothing is sent");
}

#[tokio::test]
async fn failed_records_are_sent_again_and_nothing_else() {
    failed_records_cycle("").await;
}

/// Failures, retries, an update and a delete that fail and then succeed, with `top_level`
/// appended to the project file (the Ballista test runs the same cycle on a cluster).
pub(crate) async fn failed_records_cycle(top_level: &str) {
    let receiver = Receiver::start().await;
    let project = TestProject::new(&format!("{}{top_level}", webhook_config(&receiver.url, "")));
    project.write_users(&users());

    receiver.respond_with(fail_keys(HashSet::from([2, 4])));
    let first = project.sluice(&["run"]).await;
    assert_eq!(
        first.status.code(),
        Some(2),
        "partial runs exit with 2: {}",
        stdout(&first)
    );
    let row = result_row(&first, "users_to_crm");
    assert_eq!(
        row[1..9],
        ["partial", "5", "5", "0", "0", "3", "2", "0"],
        "{}",
        stdout(&first)
    );
    assert!(
        stdout(&first).contains("2 record(s) failed and will be sent again"),
        "{}",
        stdout(&first)
    );
    let first_records = receiver.take_records();
    let first_ids: Vec<&Value> = first_records
        .iter()
        .filter(|r| [2, 4].contains(&r["key"]["id"].as_i64().unwrap_or(0)))
        .collect();

    // Nothing changed in the model: only the two failed records go again, still as added, with
    // the same message ids.
    receiver.respond_with(|_: &Value| StatusCode::OK.into_response());
    let second = project.sluice(&["run"]).await;
    assert!(second.status.success(), "{}", stdout(&second));
    let retried = receiver.take_records();
    assert_eq!(
        ids(&retried),
        [("added".to_string(), 2), ("added".to_string(), 4)]
    );
    assert_eq!(
        retried.iter().collect::<Vec<_>>(),
        first_ids,
        "the retried records are the same messages"
    );

    // An update and a delete that fail are an update and a delete next time.
    let mut changed = users();
    changed[0].plan = "pro";
    changed.remove(4);
    project.write_users(&changed);
    receiver.respond_with(fail_keys(HashSet::from([1, 5])));
    let third = project.sluice(&["run"]).await;
    assert_eq!(third.status.code(), Some(2), "{}", stdout(&third));
    let failed = receiver.take_records();
    assert_eq!(
        ids(&failed),
        [("deleted".to_string(), 5), ("updated".to_string(), 1)]
    );

    receiver.respond_with(|_: &Value| StatusCode::OK.into_response());
    let fourth = project.sluice(&["run"]).await;
    assert!(fourth.status.success(), "{}", stdout(&fourth));
    let retried = receiver.take_records();
    assert_eq!(
        retried, failed,
        "the same update and delete, the delete carrying the old row"
    );
    assert_eq!(retried[0]["data"]["email"], "barbara@example.com");

    let fifth = project.sluice(&["run"]).await;
    assert!(fifth.status.success());
    assert!(
        receiver.take().is_empty(),
        "everything acknowledged: nothing more to send"
    );

    let history = project.sluice(&["runs", "--failures", "10"]).await;
    let text = stdout(&history);
    assert!(
        text.contains("invalid email") && text.contains("{\"id\":5}"),
        "{text}"
    );
}

#[tokio::test]
async fn rate_limits_and_server_errors_are_retried_then_reported() {
    let receiver = Receiver::start().await;
    let project = TestProject::new(&webhook_config(&receiver.url, ""));
    project.write_users(&users()[..2]);

    // Two 429s with Retry-After, then success: delivered, nothing failed.
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    receiver.respond_with(move |_: &Value| {
        if counter.fetch_add(1, Ordering::SeqCst) < 2 {
            (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "0")], "slow down").into_response()
        } else {
            StatusCode::OK.into_response()
        }
    });
    let first = project.sluice(&["run"]).await;
    assert!(first.status.success(), "{}", stdout(&first));
    assert_eq!(result_row(&first, "users_to_crm")[6..8], ["2", "0"]);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    receiver.take();

    // A destination that stays down: every attempt fails, the records are reported and kept.
    project.write_users(&users()[..3]);
    receiver.respond_with(|_: &Value| (StatusCode::SERVICE_UNAVAILABLE, "maintenance").into_response());
    let second = project.sluice(&["run"]).await;
    assert_eq!(second.status.code(), Some(2), "{}", stdout(&second));
    assert_eq!(result_row(&second, "users_to_crm")[6..8], ["0", "1"]);
    assert_eq!(receiver.take().len(), 3, "max_attempts is 3");
    let history = stdout(&project.sluice(&["runs", "--failures", "5"]).await);
    assert!(
        history.contains("HTTP 503 Service Unavailable: maintenance (gave up after 3 attempts)"),
        "{history}"
    );

    // A 400 is not retried.
    receiver.respond_with(|_: &Value| (StatusCode::BAD_REQUEST, "bad payload").into_response());
    let third = project.sluice(&["run"]).await;
    assert_eq!(third.status.code(), Some(2));
    assert_eq!(receiver.take().len(), 1);

    receiver.respond_with(|_: &Value| StatusCode::OK.into_response());
    let fourth = project.sluice(&["run"]).await;
    assert!(fourth.status.success());
    assert_eq!(ids(&receiver.take_records()), [("added".to_string(), 3)]);
}

#[tokio::test]
async fn bad_input_fails_clearly_and_sends_nothing() {
    let receiver = Receiver::start().await;
    let project = TestProject::new(&webhook_config(&receiver.url, ""));

    let mut duplicated = users();
    duplicated.push(user(2, "again@example.com", "free", 1));
    duplicated.push(user(2, "thrice@example.com", "free", 1));
    duplicated.push(user(4, "twice@example.com", "free", 1));
    project.write_users(&duplicated);
    let output = project.sluice(&["run"]).await;
    assert_eq!(output.status.code(), Some(1));
    let text = stdout(&output);
    assert!(
        text.contains("2 primary key value(s) occur more than once"),
        "{text}"
    );
    assert!(text.contains("id=2 (×3)") && text.contains("id=4 (×2)"), "{text}");

    let mut null_key = users();
    null_key[0].email = None;
    project.write_users(&null_key);
    let config = webhook_config(&receiver.url, "").replace("primary_key: id", "primary_key: email");
    std::fs::write(project.config_path(), &config).expect("config");
    let text = stdout(&project.sluice(&["run"]).await);
    assert!(
        text.contains("primary key column `email` is NULL in 1 row(s)"),
        "{text}"
    );

    project.write_users(&users());
    std::fs::write(
        project.config_path(),
        config.replace("primary_key: email", "primary_key: uid"),
    )
    .expect("config");
    let text = stdout(&project.sluice(&["run"]).await);
    assert!(
        text.contains("primary key column `uid` is not among the columns the query returns"),
        "{text}"
    );

    let config = webhook_config(&receiver.url, "").replace("SELECT id, email", "SELECT id, emial");
    std::fs::write(project.config_path(), config).expect("config");
    let text = stdout(&project.sluice(&["run"]).await);
    assert!(
        text.contains("model `users`: the query failed in source `warehouse`"),
        "{text}"
    );
    assert!(text.contains("emial"), "{text}");

    let config = webhook_config(&receiver.url, "").replace("    send:", "    sned:");
    std::fs::write(project.config_path(), config).expect("config");
    let output = project.sluice(&["run"]).await;
    assert_eq!(output.status.code(), Some(1));
    let text = stderr(&output);
    assert!(
        text.contains("sluice.yaml:25: mappings.users_to_crm: unknown field `sned`"),
        "{text}"
    );

    let config = webhook_config(&receiver.url, "").replace("destination: crm", "destination: hubspot");
    std::fs::write(project.config_path(), config).expect("config");
    let text = stderr(&project.sluice(&["run"]).await);
    assert!(
        text.contains(
            "mapping `users_to_crm` uses destination `hubspot`, which is not defined (defined: `crm`)"
        ),
        "{text}"
    );

    let config = webhook_config(&receiver.url, "").replace("\"traits.plan\": plan", "\"traits.plan\": plann");
    std::fs::write(project.config_path(), config).expect("config");
    let text = stdout(&project.sluice(&["run"]).await);
    assert!(
        text.contains("maps column `plann`, which model `users` does not return"),
        "{text}"
    );

    assert!(
        receiver.take().is_empty(),
        "no bad input ever reaches the destination"
    );
}

#[tokio::test]
async fn a_changed_model_schema_is_not_an_error() {
    let receiver = Receiver::start().await;
    let project = TestProject::new(&webhook_config(&receiver.url, ""));
    project.write_users(&users());
    assert!(project.sluice(&["run"]).await.status.success());
    receiver.take();

    // The model stops returning lifetime_value: every row's hash changes, so every row is an
    // update, and the run says why.
    let config = webhook_config(&receiver.url, "").replace(", lifetime_value FROM", " FROM");
    std::fs::write(project.config_path(), config).expect("config");
    let output = project.sluice(&["run"]).await;
    assert!(output.status.success(), "{}", stdout(&output));
    assert!(
        stdout(&output).contains("the model's columns changed since the last sync: removed `lifetime_value`")
    );
    assert_eq!(result_row(&output, "users_to_crm")[3..6], ["0", "5", "0"]);
}

#[tokio::test]
async fn full_resync_sends_every_row_as_added() {
    let receiver = Receiver::start().await;
    let project = TestProject::new(&webhook_config(&receiver.url, ""));
    project.write_users(&users());
    assert!(project.sluice(&["run"]).await.status.success());
    let first = receiver.take_records();
    let full = project.sluice(&["run", "--full", "users_to_crm"]).await;
    assert!(full.status.success(), "{}", stdout(&full));
    assert_eq!(
        receiver.take_records(),
        first,
        "a backfill resends the same messages"
    );
    assert!(project.sluice(&["run"]).await.status.success());
    assert!(receiver.take().is_empty());
    let unknown = project.sluice(&["run", "nope"]).await;
    assert!(
        stderr(&unknown).contains("unknown mapping `nope` (defined: users_to_crm)"),
        "{}",
        stderr(&unknown)
    );
}

#[tokio::test]
async fn file_destination_writes_each_runs_records() {
    let receiver = Receiver::start().await;
    let extra = "  archive:\n    type: file\n    url: exports\n    format: csv\n";
    let config = format!(
        "{}  users_to_archive:\n    model: users\n    destination: archive\n",
        webhook_config(&receiver.url, extra)
    );
    let project = TestProject::new(&config);
    project.write_users(&users());
    let output = project.sluice(&["run", "users_to_archive"]).await;
    assert!(
        output.status.success(),
        "{}\n{}",
        stdout(&output),
        stderr(&output)
    );
    let dir = project.path().join("exports/users_to_archive");
    let files: Vec<_> = std::fs::read_dir(&dir)
        .expect("exports")
        .filter_map(|e| e.ok())
        .collect();
    assert_eq!(files.len(), 1);
    let csv = std::fs::read_to_string(files[0].path()).expect("csv");
    let mut lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines.remove(0),
        "_op,_message_id,_key,id,email,plan,lead_score,lifetime_value"
    );
    assert_eq!(lines.len(), 5);
    let ada = lines.iter().find(|l| l.contains("ada@")).expect("ada's row");
    assert!(
        ada.starts_with("added,") && ada.ends_with(",\"{\"\"id\"\":1}\",1,ada@example.com,free,10,10.5"),
        "{ada}"
    );
    assert!(receiver.take().is_empty(), "only the named mapping ran");
    // No changes: no file.
    assert!(
        project
            .sluice(&["run", "users_to_archive"])
            .await
            .status
            .success()
    );
    assert_eq!(std::fs::read_dir(&dir).expect("exports").count(), 1);
}

/// [`webhook_config`] with a second mapping of the model, `users_to_archive`, to a `file`
/// destination writing Parquet under `exports/`; `tail` is appended.
fn archive_config(url: &str, tail: &str) -> String {
    let extra = "  archive:\n    type: file\n    url: exports\n    format: parquet\n";
    format!(
        "{}  users_to_archive:\n    model: users\n    destination: archive\n{tail}",
        webhook_config(url, extra)
    )
}

/// The rows of the Parquet files in `dir` that are not in `seen` (which they are added to).
fn new_parquet_rows(
    dir: &std::path::Path,
    seen: &mut HashSet<std::path::PathBuf>,
) -> Vec<arrow::array::RecordBatch> {
    let mut batches = Vec::new();
    for entry in std::fs::read_dir(dir).expect("exports").filter_map(|e| e.ok()) {
        let path = entry.path();
        if !seen.insert(path.clone()) {
            continue;
        }
        let file = std::fs::File::open(&path).expect("open");
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .expect("a Parquet file")
            .build()
            .expect("reader");
        batches.extend(reader.map(|b| b.expect("batch")));
    }
    batches
}

#[tokio::test]
async fn file_destination_writes_parquet_across_batches_and_fails_oversized_values_alone() {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::Int64Type;

    let receiver = Receiver::start().await;
    let project = TestProject::new(&archive_config(&receiver.url, "limits:\n  max_value_bytes: 30\n"));
    // More rows than one batch holds (8,192), so the file is written in several parts.
    let mut users: Vec<User> = (1..=20_000)
        .map(|id| {
            user(
                id,
                Box::leak(format!("u{id}@x.io").into_boxed_str()),
                "free",
                (id % 100) as i32,
            )
        })
        .collect();
    users[41].email = Some("a-very-long-address-indeed@example.com");
    project.write_users(&users);
    let output = project.sluice(&["run", "users_to_archive"]).await;
    assert_eq!(
        output.status.code(),
        Some(2),
        "{}\n{}",
        stdout(&output),
        stderr(&output)
    );
    let dir = project.path().join("exports/users_to_archive");
    let mut seen = HashSet::new();
    let first = new_parquet_rows(&dir, &mut seen);
    let rows: usize = first.iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows, 19_999, "every record but the oversized one");
    let names: Vec<String> = first[0]
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    assert_eq!(
        names,
        [
            "_op",
            "_message_id",
            "_key",
            "id",
            "email",
            "plan",
            "lead_score",
            "lifetime_value"
        ]
    );
    let mut ids = HashSet::new();
    for batch in &first {
        let id = batch
            .column_by_name("id")
            .expect("id")
            .as_primitive::<Int64Type>();
        let key = batch.column_by_name("_key").expect("_key").as_string::<i32>();
        let op = batch.column_by_name("_op").expect("_op").as_string::<i32>();
        let message = batch
            .column_by_name("_message_id")
            .expect("_message_id")
            .as_string::<i32>();
        for i in 0..batch.num_rows() {
            assert_eq!(key.value(i), format!("{{\"id\":{}}}", id.value(i)));
            assert_eq!(op.value(i), "added");
            assert_eq!(message.value(i).len(), 36, "a UUID");
            assert!(!message.is_null(i));
            ids.insert(id.value(i));
        }
    }
    assert_eq!(ids.len(), 19_999);
    assert!(!ids.contains(&42));
    // Pages are Snappy-compressed unless the destination says otherwise.
    for path in &seen {
        let file = std::fs::File::open(path).expect("open");
        let reader = parquet::file::reader::SerializedFileReader::new(file).expect("a Parquet file");
        use parquet::file::reader::FileReader;
        for group in reader.metadata().row_groups() {
            for column in group.columns() {
                assert_eq!(
                    column.compression(),
                    parquet::basic::Compression::SNAPPY,
                    "{}",
                    column.column_path()
                );
            }
        }
    }
    let failures = stdout(&project.sluice(&["runs", "--failures", "10"]).await);
    assert!(
        failures.contains("field `email` holds 38 bytes, more than limits.max_value_bytes (30)"),
        "{failures}"
    );

    // Ten plans change, five users leave: those, and the record that failed, tried again.
    for u in users.iter_mut().take(10) {
        u.plan = "pro";
    }
    users.truncate(19_995);
    project.write_users(&users);
    let output = project.sluice(&["run", "users_to_archive"]).await;
    assert_eq!(
        output.status.code(),
        Some(2),
        "{}\n{}",
        stdout(&output),
        stderr(&output)
    );
    let changes = file_changes(&new_parquet_rows(&dir, &mut seen));
    let mut want: Vec<(String, i64)> = (1..=10).map(|id| ("updated".to_string(), id)).collect();
    want.extend((19_996..=20_000).map(|id| ("deleted".to_string(), id)));
    want.sort();
    assert_eq!(changes, want);
}

/// (op, id) of every record in `batches` (rows of the `file` destination), sorted.
fn file_changes(batches: &[arrow::array::RecordBatch]) -> Vec<(String, i64)> {
    use arrow::array::AsArray;
    let mut changes: Vec<(String, i64)> = Vec::new();
    for batch in batches {
        let id = batch
            .column_by_name("id")
            .expect("id")
            .as_primitive::<arrow::datatypes::Int64Type>();
        let op = batch.column_by_name("_op").expect("_op").as_string::<i32>();
        for i in 0..batch.num_rows() {
            changes.push((op.value(i).to_string(), id.value(i)));
        }
    }
    changes.sort();
    changes
}

/// A first run to a `file` destination writes its file while the model is extracted, and
/// publishes it only once the snapshot has committed: duplicate keys leave nothing visible,
/// and the baseline it commits is exact (the next run sends only what changed).
#[tokio::test]
async fn a_first_run_to_a_file_publishes_nothing_until_its_snapshot_commits() {
    let receiver = Receiver::start().await;
    let project = TestProject::new(&archive_config(&receiver.url, ""));
    let dir = project.path().join("exports/users_to_archive");
    let visible_files = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(&dir)
            .map(|entries| entries.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    // Duplicate keys after more rows than one batch holds: the file has been started.
    let mut users: Vec<User> = (1..=20_000)
        .map(|id| user(id, "u@x.io", "free", (id % 100) as i32))
        .collect();
    users.push(user(7, "again@x.io", "free", 1));
    project.write_users(&users);
    let output = project.sluice(&["run"]).await;
    assert_eq!(
        output.status.code(),
        Some(1),
        "{}\n{}",
        stdout(&output),
        stderr(&output)
    );
    assert!(
        stdout(&output).contains("1 primary key value(s) occur more than once"),
        "{}",
        stdout(&output)
    );
    assert_eq!(
        visible_files(),
        Vec::<std::path::PathBuf>::new(),
        "nothing is published"
    );
    assert!(receiver.take().is_empty(), "nothing is sent");
    let runs = project.sluice(&["runs"]).await;
    for mapping in ["users_to_archive", "users_to_crm"] {
        assert!(
            result_row(&runs, mapping).contains(&"failed".to_string()),
            "{}",
            stdout(&runs)
        );
    }

    // Fixed: every row, once, as added; the webhook's mapping (delivered after the snapshot
    // commits) gets the same.
    users.pop();
    project.write_users(&users);
    let output = project.sluice(&["run"]).await;
    assert!(
        output.status.success(),
        "{}\n{}",
        stdout(&output),
        stderr(&output)
    );
    let mut seen = HashSet::new();
    let first = file_changes(&new_parquet_rows(&dir, &mut seen));
    let want: Vec<(String, i64)> = (1..=20_000).map(|id| ("added".to_string(), id)).collect();
    assert_eq!(first, want);
    assert_eq!(receiver.take_records().len(), 20_000);

    // The next run sends exactly what changed.
    for u in users.iter_mut().take(3) {
        u.plan = "pro";
    }
    users.truncate(19_998);
    project.write_users(&users);
    let output = project.sluice(&["run", "users_to_archive"]).await;
    assert!(
        output.status.success(),
        "{}\n{}",
        stdout(&output),
        stderr(&output)
    );
    let mut want: Vec<(String, i64)> = (1..=3).map(|id| ("updated".to_string(), id)).collect();
    want.extend((19_999..=20_000).map(|id| ("deleted".to_string(), id)));
    want.sort();
    assert_eq!(file_changes(&new_parquet_rows(&dir, &mut seen)), want);

    // A full resync writes every row again, while extracting too.
    let output = project.sluice(&["run", "users_to_archive", "--full"]).await;
    assert!(
        output.status.success(),
        "{}\n{}",
        stdout(&output),
        stderr(&output)
    );
    let want: Vec<(String, i64)> = (1..=19_998).map(|id| ("added".to_string(), id)).collect();
    assert_eq!(file_changes(&new_parquet_rows(&dir, &mut seen)), want);
}

#[tokio::test]
async fn quickstart_runs_on_a_fresh_machine() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("demo");
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["quickstart", "--dir"])
        .arg(&target)
        .output()
        .await
        .expect("quickstart");
    let text = stdout(&output);
    assert!(output.status.success(), "{text}\n{}", stderr(&output));
    assert!(text.contains("== first sync: every user is new =="), "{text}");
    assert!(text.contains("\"op\":\"deleted\""), "{text}");
    assert_eq!(
        std::fs::read_dir(target.join("out/users_to_crm"))
            .expect("out")
            .count(),
        2
    );
    let again = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["quickstart", "--dir"])
        .arg(&target)
        .output()
        .await
        .expect("quickstart");
    assert!(!again.status.success());
    assert!(stderr(&again).contains("already exists"));
}

#[tokio::test]
async fn oversized_records_fail_alone_and_row_limits_stop_the_run() {
    let receiver = Receiver::start().await;
    let config = format!(
        "{}limits:\n  max_value_bytes: 20\n  max_record_bytes: 120\n",
        webhook_config(&receiver.url, "")
    );
    let project = TestProject::new(&config);
    let mut rows = users();
    rows[1].email = Some("a-very-long-address-indeed@example.com");
    project.write_users(&rows);
    let output = project.sluice(&["run"]).await;
    assert_eq!(
        output.status.code(),
        Some(2),
        "{}\n{}",
        stdout(&output),
        stderr(&output)
    );
    let sent = receiver.take_records();
    assert_eq!(sent.len(), 4, "the other records went: {sent:?}");
    assert!(sent.iter().all(|r| r["key"]["id"] != 2));
    let failures = project.sluice(&["runs", "--failures", "10"]).await;
    let text = stdout(&failures);
    assert!(
        text.contains("field `email` holds 38 bytes, more than limits.max_value_bytes (20)"),
        "{text}"
    );

    let limited = config.replace("limits:\n", "limits:\n  max_records_per_run: 3\n");
    std::fs::write(project.config_path(), limited).expect("config");
    let output = project.sluice(&["run", "--full"]).await;
    assert_eq!(output.status.code(), Some(1));
    let all = format!("{}{}", stdout(&output), stderr(&output));
    assert!(
        all.contains("more than 3 rows (limits.max_records_per_run)"),
        "{all}"
    );
    assert!(
        receiver.take_records().is_empty(),
        "nothing is sent past the limit"
    );
}

#[tokio::test]
async fn schedules_are_listed_and_disabled_mappings_do_not_run() {
    let receiver = Receiver::start().await;
    let config = webhook_config(&receiver.url, "").replace(
        "    primary_key: id\n",
        "    primary_key: id\n    schedule: { days: [mon, thu], at: \"09:00\", timezone: Europe/Paris }\n",
    ) + "  paused:\n    model: users\n    destination: crm\n    enabled: false\n    schedule: { every: 15m }\n";
    let project = TestProject::new(&config);
    project.write_users(&users());
    let output = project.sluice(&["schedules"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.contains("mon, thu at 09:00 (Europe/Paris)"), "{text}");
    assert!(text.contains("every 15m"), "{text}");

    // `run` with no names leaves the disabled mapping out; naming it says why it cannot run.
    let output = project.sluice(&["run"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(result_row(&output, "paused").is_empty(), "{}", stdout(&output));
    assert!(!result_row(&output, "users_to_crm").is_empty());
    let output = project.sluice(&["run", "paused"]).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("mapping `paused` is disabled"),
        "{}",
        stderr(&output)
    );

    let bad = TestProject::new(&webhook_config(&receiver.url, "").replace(
        "    primary_key: id\n",
        "    primary_key: id\n    schedule: { every: 10s }\n",
    ));
    let output = bad.sluice(&["run"]).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("shorter than the 1 minute minimum"),
        "{}",
        stderr(&output)
    );
}

/// Two processes on the same state: while one run of a mapping is going, another is skipped and
/// recorded as such, never run alongside it.
#[tokio::test]
async fn a_run_while_the_same_mapping_runs_elsewhere_is_skipped() {
    // A receiver that accepts connections and never answers: the first run waits on it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/ingest", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let config = webhook_config(&url, "").replace("max_attempts: 3", "max_attempts: 1\n    timeout: 4s");
    let project = TestProject::new(&config);
    project.write_users(&users());
    let first = {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"));
        command.args(["run", "--config"]).arg(project.config_path());
        command.spawn().expect("first run")
    };
    // Wait until the first run holds the mapping.
    let db = project.path().join(".sluice/sluice.db");
    let mut leased = false;
    for _ in 0..100 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        if let Ok(output) = std::process::Command::new("sqlite3")
            .arg(&db)
            .arg("SELECT count(*) FROM leases")
            .output()
            && String::from_utf8_lossy(&output.stdout).trim() == "1"
        {
            leased = true;
            break;
        }
    }
    if !leased {
        // Without the sqlite3 CLI, give the first run time to start.
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    }
    let second = project.sluice(&["run"]).await;
    assert_eq!(
        second.status.code(),
        Some(0),
        "{}{}",
        stdout(&second),
        stderr(&second)
    );
    assert_eq!(
        result_row(&second, "users_to_crm")[1],
        "skipped",
        "{}",
        stdout(&second)
    );
    let first = first.wait_with_output().await.expect("first run ends");
    // Its records timed out against the silent receiver: committed with failed records.
    assert_eq!(first.status.code(), Some(2));
    let runs = project.sluice(&["runs"]).await;
    let text = stdout(&runs);
    assert!(text.contains("skipped"), "{text}");
    assert!(text.contains("is still going"), "{text}");
    // The lease was released: a third run is not skipped.
    let third = project.sluice(&["run"]).await;
    assert_ne!(
        result_row(&third, "users_to_crm")[1],
        "skipped",
        "{}",
        stdout(&third)
    );
}

/// Snapshot history answers SQL: a row as each run saw it, the latest snapshot as the model's
/// table, in every output format; anything but a read is refused.
#[tokio::test]
async fn snapshot_history_is_queryable_with_sql() {
    let receiver = Receiver::start().await;
    let project = TestProject::new(&webhook_config(&receiver.url, ""));
    project.write_users(&users());
    assert!(project.sluice(&["run"]).await.status.success());
    let mut changed = users();
    changed[0].plan = "enterprise";
    changed.remove(4);
    project.write_users(&changed);
    assert!(project.sluice(&["run"]).await.status.success());

    let history = project
        .sluice(&[
            "query",
            "SELECT plan, _run_id FROM users_history WHERE id = 1 ORDER BY _extracted_at",
            "--format",
            "csv",
        ])
        .await;
    assert!(history.status.success(), "{}", stderr(&history));
    let text = stdout(&history);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "plan,_run_id");
    assert!(
        lines[1].starts_with("free,") && lines[2].starts_with("enterprise,"),
        "{text}"
    );
    assert_ne!(lines[1].split(',').nth(1), lines[2].split(',').nth(1), "two runs");

    let latest = project
        .sluice(&["query", "SELECT count(*) AS users FROM users", "--format", "json"])
        .await;
    assert_eq!(stdout(&latest).trim(), r#"{"users":4}"#);
    let table = project
        .sluice(&[
            "query",
            "SELECT count(*) AS snapshots FROM (SELECT DISTINCT _snapshot_id FROM users_history)",
        ])
        .await;
    assert!(stdout(&table).contains("| 2 "), "{}", stdout(&table));

    for refused in [
        "CREATE TABLE x AS SELECT 1",
        "COPY (SELECT 1) TO '/tmp/sluice-copy.csv'",
        "CREATE EXTERNAL TABLE t STORED AS CSV LOCATION '/etc/passwd'",
        "INSERT INTO users VALUES (1)",
    ] {
        let output = project.sluice(&["query", refused]).await;
        assert_eq!(output.status.code(), Some(1), "{refused}");
        assert!(
            stderr(&output).contains("the query was refused"),
            "{refused}: {}",
            stderr(&output)
        );
    }
    assert!(!std::path::Path::new("/tmp/sluice-copy.csv").exists());
}

/// Personal data mapped `as: sha256_email` (and `sha256`) reaches the destination only as the
/// SHA-256 of its normalised value: not in the payload, the run's output or the failures. A
/// value that cannot be normalised fails its record, naming the column and the format.
#[tokio::test]
async fn hashed_fields_send_only_the_hash_and_a_bad_value_fails_its_record() {
    let receiver = Receiver::start().await;
    let config = webhook_config(&receiver.url, "").replace(
        r#"fields: { email: email, "traits.plan": plan, "traits.score": lead_score }"#,
        r#"fields: { "user_data.em": { column: email, as: sha256_email }, "user_data.external_id": { column: plan, as: sha256 } }"#,
    );
    assert!(config.contains("sha256_email"), "{config}");
    let project = TestProject::new(&config);
    let mut people = users();
    people[0].email = Some("  Mary@Example.com ");
    people[1].email = Some("not an email");
    project.write_users(&people);
    let output = project.sluice(&["run"]).await;
    let text = format!("{}{}", stdout(&output), stderr(&output));
    let records = receiver.take_records();
    assert_eq!(
        records.len(),
        4,
        "the bad email's record is not sent: {records:?}"
    );
    let mary = records
        .iter()
        .find(|r| r["key"]["id"] == 1)
        .expect("mary's record");
    // Meta's published hash of mary@example.com.
    assert_eq!(
        mary["data"]["user_data"]["em"], "f1904cf1a9d73a55fa5de0ac823c4403ded71afd4c3248d00bdcd0866552bb79",
        "{mary}"
    );
    assert_eq!(
        mary["data"]["user_data"]["external_id"],
        sluice_engine::pii::sha256_hex(b"free")
    );
    let everything = serde_json::to_string(&records).expect("json");
    for raw in [
        "Mary@Example.com",
        "mary@example.com",
        "linus@example.com",
        "\"free\"",
    ] {
        assert!(!everything.contains(raw), "{raw} was sent: {everything}");
    }
    let runs = project.sluice(&["runs"]).await;
    let run_id = crate::common::newest_run_id(&runs, "users_to_crm");
    let failures = project.sluice(&["failures", &run_id]).await;
    let failures = format!("{}{}", stdout(&failures), stderr(&failures));
    assert!(
        failures.contains("column `email` is not an email address; it is mapped `as: sha256_email`"),
        "{text}\n{failures}"
    );
    assert!(!text.contains("not an email\"") && !failures.contains("\"not an email\""));
}
