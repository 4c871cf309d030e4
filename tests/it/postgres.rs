//! The `postgres` source against the local PostgreSQL, through the real binary.

use serde_json::Value;

use axum::http::StatusCode;
use axum::response::IntoResponse;

use crate::common::{Receiver, TestProject, stderr, stdout};
use crate::services::{self, PG_URL, Sshd, exported_records, latest_export};

fn project(schema: &str, sql: &str, source_extra: &str) -> TestProject {
    TestProject::new(&format!(
        r#"state_dir: .sluice
sources:
  app_db:
    type: postgres
    url: {PG_URL}
    sslmode: disable
{source_extra}
models:
  things:
    source: app_db
    sql: "{sql}"
    primary_key: id
destinations:
  exports:
    type: file
    url: exports/
mappings:
  things_out:
    model: things
    destination: exports
"#,
        sql = sql.replace("{s}", schema)
    ))
}

fn data_by_id(records: &[Value]) -> Vec<Value> {
    let mut records: Vec<Value> = records.to_vec();
    records.sort_by_key(|r| r["key"]["id"].as_i64());
    records.iter().map(|r| r["data"].clone()).collect()
}

#[tokio::test]
async fn every_type_in_the_table_round_trips_into_payloads() {
    let schema = "sluice_pg_types";
    let Some(db) = services::postgres(schema).await else {
        return;
    };
    db.batch_execute(&format!(
        r#"
        CREATE TYPE {schema}.mood AS ENUM ('happy', 'sad');
        CREATE DOMAIN {schema}.email AS text;
        CREATE TABLE {schema}.everything (
            id int8 PRIMARY KEY,
            small int2, normal int4, big int8, oid_col oid,
            price numeric(38, 10), amount numeric(12, 2), loose numeric,
            ratio float4, score float8,
            name text, code varchar(10), fixed char(3), email {schema}.email,
            active bool,
            born date, wakes time, wakes_tz timetz, seen timestamp, seen_tz timestamptz,
            uid uuid, doc json, docb jsonb,
            tags text[], nums int4[], empty_arr int4[],
            raw bytea, mood {schema}.mood,
            doc_xml xml, ident name, letter "char", ts_arr timestamptz[], dec_arr numeric(6, 2)[]
        );
        INSERT INTO {schema}.everything VALUES (
            1,
            -32768, 2147483647, -9223372036854775808, 4294967295,
            9999999999999999999999999999.9999999999, -0.01, 1::numeric / 3,
            1.5, -1e300,
            'héllo 😀 世界', 'abc', 'ab', 'ada@example.com',
            true,
            '1969-07-20', '23:59:59.999999', '12:00:00+02', '1900-01-01 00:00:00', '1960-06-01 12:00:00+02',
            'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{{"a": [1, 2]}}', '{{"b": {{"c": true}}}}',
            ARRAY['x', 'y,z'], ARRAY[1, NULL, 3], '{{}}',
            '\x00ff'::bytea, 'happy',
            '<a>1</a>', 'pg_class', 'z', ARRAY['1950-01-01 00:00:00+00'::timestamptz], ARRAY[1.5, -2.25]
        );
        INSERT INTO {schema}.everything (id) VALUES (2);
        "#
    ))
    .await
    .expect("create table");
    let project = project(schema, "SELECT * FROM {s}.everything", "");
    let output = project.sluice(&["run"]).await;
    assert!(
        output.status.success(),
        "{}\n{}",
        stdout(&output),
        stderr(&output)
    );
    let records = exported_records(project.path(), "things_out");
    assert_eq!(records.len(), 2);
    insta::assert_json_snapshot!("postgres_types", data_by_id(&records));
    // Decimals keep every digit in the payload (parsing above goes through f64).
    let raw = services::raw_exports(project.path(), "things_out");
    for exact in [
        r#""price":9999999999999999999999999999.9999999999"#,
        r#""amount":-0.01"#,
        r#""loose":0.3333333333"#,
        r#""big":-9223372036854775808"#,
    ] {
        assert!(raw.contains(exact), "{exact} not in {raw}");
    }

    // Unchanged data: the second run sends nothing, so every type hashes deterministically.
    let output = project.sluice(&["run"]).await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(exported_records(project.path(), "things_out").len(), 2);
}

#[tokio::test]
async fn preview_shows_types_and_first_rows_without_a_snapshot() {
    let schema = "sluice_pg_preview";
    let Some(db) = services::postgres(schema).await else {
        return;
    };
    db.batch_execute(&format!(
        "CREATE TABLE {schema}.t AS SELECT g AS id, 'user ' || g AS name, (g * 1.5)::numeric(10, 2) AS score \
         FROM generate_series(1, 50) g"
    ))
    .await
    .expect("table");
    let project = project(schema, "SELECT id, name, score FROM {s}.t ORDER BY id", "");
    let output = project.sluice(&["preview", "things", "--limit", "3"]).await;
    let out = stdout(&output);
    assert!(output.status.success(), "{out}\n{}", stderr(&output));
    assert!(out.contains("Decimal128(10, 2)"), "{out}");
    assert!(out.contains("user 3") && !out.contains("user 4"), "{out}");
    assert!(out.contains("3 row(s)"), "{out}");
    assert!(!project.path().join(".sluice/snapshots/models").exists());
}

#[tokio::test]
async fn a_type_sluice_cannot_carry_names_the_column_and_a_cast() {
    let schema = "sluice_pg_unsupported";
    let Some(db) = services::postgres(schema).await else {
        return;
    };
    db.batch_execute(&format!(
        "CREATE TABLE {schema}.t (id int PRIMARY KEY, waited interval); INSERT INTO {schema}.t VALUES (1, '1 day')"
    ))
    .await
    .expect("table");
    let project = project(schema, "SELECT id, waited FROM {s}.t", "");
    let output = project.sluice(&["run"]).await;
    assert!(!output.status.success());
    let all = format!("{}{}", stdout(&output), stderr(&output));
    assert!(
        all.contains("column `waited` has database type interval"),
        "{all}"
    );
    assert!(all.contains("extract(epoch FROM waited)"), "{all}");
}

#[tokio::test]
async fn check_reports_the_databases_own_error_with_a_hint() {
    let schema = "sluice_pg_check";
    let Some(db) = services::postgres(schema).await else {
        return;
    };
    db.batch_execute(&format!(
        "CREATE TABLE {schema}.secret (id int PRIMARY KEY);
         DO $$ BEGIN
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'sluice_no_access') THEN
             CREATE ROLE sluice_no_access LOGIN;
           END IF;
         END $$;
         GRANT USAGE ON SCHEMA {schema} TO sluice_no_access;"
    ))
    .await
    .expect("setup");
    let project = TestProject::new(&format!(
        r#"sources:
  good:
    type: postgres
    url: {PG_URL}
    sslmode: disable
  no_server:
    type: postgres
    url: postgres://postgres@127.0.0.1:1/test
    sslmode: disable
  no_database:
    type: postgres
    url: postgres://postgres@127.0.0.1:5432/sluice_missing_db
    sslmode: disable
  no_role:
    type: postgres
    url: postgres://sluice_missing_role@127.0.0.1:5432/test
    sslmode: disable
  restricted:
    type: postgres
    url: postgres://sluice_no_access@127.0.0.1:5432/test
    sslmode: disable
models:
  secret:
    source: restricted
    sql: SELECT id FROM {schema}.secret
    primary_key: id
  missing_table:
    source: good
    sql: SELECT id FROM {schema}.nope
    primary_key: id
"#
    ));
    let output = project.sluice(&["check"]).await;
    let out = stdout(&output);
    assert!(!output.status.success());
    assert!(out.contains("ok      source good"), "{out}");
    assert!(
        out.contains("FAILED  source no_server") && out.contains("nothing is listening on 127.0.0.1:1"),
        "{out}"
    );
    assert!(
        out.contains("does not exist") && out.contains("database `sluice_missing_db`"),
        "{out}"
    );
    assert!(
        out.contains("FAILED  source no_role") && out.contains("authentication failed"),
        "{out}"
    );
    assert!(
        out.contains("FAILED  model secret") && out.contains("permission denied"),
        "{out}"
    );
    assert!(out.contains("GRANT SELECT"), "{out}");
    assert!(
        out.contains("FAILED  model missing_table") && out.contains("qualify it as schema.table"),
        "{out}"
    );
}

#[tokio::test]
async fn templates_render_the_previous_runs_start() {
    let schema = "sluice_pg_template";
    let Some(db) = services::postgres(schema).await else {
        return;
    };
    db.batch_execute(&format!(
        "CREATE TABLE {schema}.t AS SELECT g AS id FROM generate_series(1, 3) g"
    ))
    .await
    .expect("table");
    let project = project(
        schema,
        "SELECT id, {{last_sync_time}}::int8 AS since, {{run_started_at}}::timestamptz AS now FROM {s}.t",
        "",
    );
    let before = chrono::Utc::now().timestamp();
    let output = project.sluice(&["run"]).await;
    assert!(output.status.success(), "{}", stderr(&output));
    let first = latest_export(project.path(), "things_out");
    assert!(first.iter().all(|r| r["data"]["since"] == 0), "{first:?}");
    let output = project.sluice(&["run"]).await;
    assert!(output.status.success(), "{}", stderr(&output));
    let second = latest_export(project.path(), "things_out");
    assert_eq!(
        second.len(),
        3,
        "every row changed: since moved to the first run's start"
    );
    let since = second[0]["data"]["since"].as_i64().expect("since");
    assert!(
        since >= before - 1 && since <= chrono::Utc::now().timestamp(),
        "{since}"
    );
}

#[tokio::test]
async fn an_extraction_killed_half_way_leaves_no_committed_snapshot() {
    let schema = "sluice_pg_kill";
    let Some(db) = services::postgres(schema).await else {
        return;
    };
    db.batch_execute(&format!(
        "CREATE TABLE {schema}.big AS SELECT g AS id, md5(g::text) AS a, md5((g * 7)::text) AS b \
         FROM generate_series(1, 3000000) g"
    ))
    .await
    .expect("table");
    let project = project(schema, "SELECT id, a, b FROM {s}.big", "    batch_rows: 4096");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", "--config"])
        .arg(project.config_path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start sluice");
    // Wait until rows are being spilled, then kill the process without warning.
    let tmp = project.path().join(".sluice/tmp");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let spilling = std::fs::read_dir(&tmp).map(|d| d.count() > 0).unwrap_or(false);
        if spilling {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "extraction never started");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    child.start_kill().expect("kill");
    child.wait().await.expect("wait");
    let manifests: Vec<_> =
        std::fs::read_dir(project.path().join(".sluice/snapshots/models/things/snapshots"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                    .collect()
            })
            .unwrap_or_default();
    assert!(
        manifests.is_empty(),
        "a killed extraction committed {manifests:?}"
    );
    assert!(exported_records(project.path(), "things_out").is_empty());
    let runs = project.sluice(&["runs"]).await;
    assert!(stdout(&runs).contains("interrupted"), "{}", stdout(&runs));
}

#[tokio::test]
async fn a_source_behind_an_ssh_bastion_is_reached_through_a_tunnel_and_keys_rotate_safely() {
    let schema = "sluice_pg_tunnel";
    let Some(db) = services::postgres(schema).await else {
        return;
    };
    let Some(sshd) = Sshd::start() else { return };
    db.batch_execute(&format!(
        "CREATE TABLE {schema}.t AS SELECT g AS id FROM generate_series(1, 5) g"
    ))
    .await
    .expect("table");
    let tunnel = format!(
        "    ssh_tunnel: {{ host: 127.0.0.1, port: {}, user: root }}",
        sshd.port
    );
    let project = project(schema, "SELECT id FROM {s}.t", &tunnel);

    // No key yet: the error says how to make one.
    let output = project.sluice(&["check", "app_db"]).await;
    assert!(!output.status.success());
    assert!(
        stdout(&output).contains("sluice ssh-key generate app_db"),
        "{}",
        stdout(&output)
    );

    let output = project.sluice(&["ssh-key", "generate", "app_db"]).await;
    assert!(output.status.success(), "{}", stderr(&output));
    let first_key = stdout(&output);
    assert!(first_key.starts_with("ssh-ed25519 "), "{first_key}");
    let keys = project.path().join(".sluice/ssh");
    // Not installed on the bastion yet: the connection fails and the key stays pending.
    let output = project.sluice(&["check", "app_db"]).await;
    assert!(!output.status.success(), "{}", stdout(&output));
    assert!(keys.join("app_db.key.new").exists() && !keys.join("app_db.key").exists());

    sshd.authorize(&first_key);
    let output = project.sluice(&["check", "app_db"]).await;
    assert!(output.status.success(), "{}", stdout(&output));
    assert!(keys.join("app_db.key").exists() && !keys.join("app_db.key.new").exists());

    // Rotation: a new key that is not installed yet never breaks the source.
    let output = project.sluice(&["ssh-key", "generate", "app_db"]).await;
    let second_key = stdout(&output);
    let output = project.sluice(&["run"]).await;
    assert!(
        output.status.success(),
        "{}\n{}",
        stdout(&output),
        stderr(&output)
    );
    assert_eq!(exported_records(project.path(), "things_out").len(), 5);
    assert!(keys.join("app_db.key.new").exists());
    sshd.authorize(&second_key);
    let output = project.sluice(&["check", "app_db"]).await;
    assert!(output.status.success(), "{}", stdout(&output));
    assert!(!keys.join("app_db.key.new").exists());
    let current = std::fs::read_to_string(keys.join("app_db.key")).expect("key");
    assert!(!current.is_empty());
    assert!(
        std::fs::read_to_string(keys.join("known_hosts"))
            .expect("known_hosts")
            .contains("ssh-ed25519")
    );
}

#[tokio::test]
async fn event_models_send_each_event_once_and_keep_failed_ones_in_the_window() {
    let schema = "sluice_pg_events";
    let Some(db) = services::postgres(schema).await else {
        return;
    };
    db.batch_execute(&format!(
        "CREATE TABLE {schema}.events (id text PRIMARY KEY, name text, at timestamptz NOT NULL DEFAULT clock_timestamp())"
    ))
    .await
    .expect("table");
    let receiver = Receiver::start().await;
    let project = TestProject::new(&format!(
        r#"sources:
  app_db:
    type: postgres
    url: {PG_URL}
    sslmode: disable
models:
  signups:
    source: app_db
    kind: events
    # No buffer, so the window is exactly "since the last run that left nothing undelivered".
    sql: SELECT id AS message_id, name, at FROM {schema}.events WHERE at > to_timestamp({{{{last_sync_time}}}})
destinations:
  crm:
    type: webhook
    url: {url}
mappings:
  signups_to_crm:
    model: signups
    destination: crm
"#,
        url = receiver.url
    ));
    let insert = |ids: &[&str]| {
        let values: Vec<String> = ids.iter().map(|id| format!("('{id}', 'signed up')")).collect();
        format!(
            "INSERT INTO {schema}.events (id, name) VALUES {}",
            values.join(", ")
        )
    };
    let sent_ids = |receiver: &Receiver| -> Vec<String> {
        let mut ids: Vec<String> = receiver
            .take_records()
            .iter()
            .map(|r| {
                assert_eq!(r["op"], "added");
                r["key"]["message_id"].as_str().unwrap_or_default().to_string()
            })
            .collect();
        ids.sort();
        ids
    };

    db.batch_execute(&insert(&["e1", "e2"])).await.expect("insert");
    let output = project.sluice(&["run"]).await;
    assert!(
        output.status.success(),
        "{}\n{}",
        stdout(&output),
        stderr(&output)
    );
    assert_eq!(sent_ids(&receiver), ["e1", "e2"]);

    // e3 is refused: the run is partial, and the window does not move past it.
    db.batch_execute(&insert(&["e3", "e4"])).await.expect("insert");
    receiver.respond_with(|body: &Value| {
        let failed: Vec<Value> = body["records"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
            .filter(|(_, r)| r["key"]["message_id"] == "e3")
            .map(|(i, _)| serde_json::json!({"index": i, "error": "rejected"}))
            .collect();
        (
            StatusCode::OK,
            axum::Json(serde_json::json!({ "failed": failed })),
        )
            .into_response()
    });
    let output = project.sluice(&["run"]).await;
    assert_eq!(output.status.code(), Some(2), "{}", stdout(&output));
    assert_eq!(sent_ids(&receiver), ["e3", "e4"]);

    // Next run: e3 again (still in the window, still undelivered), e5 new, e4 not again.
    receiver.respond_with(|_: &Value| StatusCode::OK.into_response());
    db.batch_execute(&insert(&["e5"])).await.expect("insert");
    let output = project.sluice(&["run"]).await;
    assert!(output.status.success(), "{}", stdout(&output));
    assert_eq!(sent_ids(&receiver), ["e3", "e5"]);

    // Everything delivered: the window moves on and nothing is sent twice.
    let output = project.sluice(&["run"]).await;
    assert!(output.status.success(), "{}", stdout(&output));
    assert!(sent_ids(&receiver).is_empty());

    // An events mapping cannot send updates or deletes.
    let bad = std::fs::read_to_string(project.config_path())
        .expect("config")
        .replace(
            "    destination: crm\n",
            "    destination: crm\n    send: [added, deleted]\n",
        );
    std::fs::write(project.config_path(), bad).expect("write config");
    let output = project.sluice(&["run"]).await;
    assert!(!output.status.success());
    assert!(stderr(&output).contains("events model"), "{}", stderr(&output));
}

#[tokio::test]
async fn tls_modes_encrypt_and_verify_as_libpq_does() {
    let Some(db) = services::postgres("sluice_pg_tls").await else {
        return;
    };
    let ssl = db.query_one("SHOW ssl", &[]).await.expect("show ssl");
    if ssl.get::<_, String>(0) != "on" {
        eprintln!("SKIPPED: the local PostgreSQL has ssl = off; TLS modes cannot be exercised");
        return;
    }
    let project = TestProject::new(&format!(
        r#"sources:
  encrypted:
    type: postgres
    url: {PG_URL}?sslmode=require
  verified:
    type: postgres
    url: {PG_URL}
    sslmode: verify-full
"#
    ));
    let output = project.sluice(&["check"]).await;
    let out = stdout(&output);
    assert!(out.contains("ok      source encrypted"), "{out}");
    // The server's certificate is self-signed: verification refuses it and says why.
    assert!(
        out.contains("FAILED  source verified") && out.contains("TLS handshake failed"),
        "{out}"
    );
}
