//! The `sqlserver` source, through the real binary, against the TDS stand-in in `tds.rs`
//! (SQL Server's wire protocol, its SQL run on the local PostgreSQL).

use serde_json::Value;

use crate::common::{TestProject, stderr, stdout};
use crate::services::{self, exported_records};
use crate::tds::{TdsOptions, TdsServer, TdsTls};

const USER: &str = "sluice";
const PASSWORD: &str = "S3cret!;'pass";

fn options(database: &str, tls: TdsTls) -> TdsOptions {
    TdsOptions {
        postgres_url: services::PG_URL.into(),
        user: USER.into(),
        password: PASSWORD.into(),
        database: database.into(),
        tls,
        allow_snapshot: true,
    }
}

/// A project whose source `erp` reaches the stand-in with `source_options` (YAML lines at the
/// source's indentation), one model `things` over `sql`, exported to files.
fn project(port: u16, database: &str, source_options: &str, sql: &str) -> TestProject {
    TestProject::new(&format!(
        r#"state_dir: .sluice
sources:
  erp:
    type: sqlserver
    host: localhost
    port: {port}
    user: {USER}
    password: "{password}"
    database: {database}
{source_options}
models:
  things:
    source: erp
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
        password = PASSWORD.replace('\\', "\\\\").replace('"', "\\\"")
    ))
}

#[tokio::test]
async fn every_type_in_the_table_round_trips_over_tls_into_payloads() {
    let database = "sluice_mssql_types";
    let Some(pg) = services::postgres(database).await else {
        return;
    };
    pg.batch_execute(&format!(
        r#"SET search_path = {database};
        CREATE DOMAIN tinyint AS smallint CHECK (VALUE BETWEEN 0 AND 255);
        CREATE DOMAIN datetime AS timestamp(3);
        CREATE DOMAIN smalldatetime AS timestamp(0);
        CREATE TABLE everything (
            id bigint PRIMARY KEY, flag boolean, tiny tinyint, small smallint, normal integer,
            big bigint, ratio real, score double precision, amount numeric(12, 2),
            huge numeric(38, 10), price money, name varchar(100), body text, raw bytea,
            born date, wakes time(6), seen timestamp(6), seen_at timestamptz(6),
            legacy datetime, legacy_small smalldatetime, guid uuid
        );
        INSERT INTO everything VALUES (
            1, true, 255, -32768, 2147483647, -9223372036854775808, 1.5, -1e300, -0.01,
            9999999999999999999999999999.9999999999, 12345678901.23,
            'héllo 😀 世界', repeat('long ', 2000), '\x00ff', '0001-01-01', '23:59:59.999999',
            '9999-12-31 23:59:59.999999', '2026-03-01 12:00:00.5+00', '1999-12-31 23:59:59.997',
            '2026-12-06 10:30:00', '6f9619ff-8b86-d011-b42d-00c04fc964ff'
        );
        INSERT INTO everything (id) VALUES (2);"#
    ))
    .await
    .expect("table");
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((ca, cert, key)) = localhost_certificate(dir.path()) else {
        return;
    };
    let server = TdsServer::start(options(database, TdsTls::Prelogin), Some((&cert, &key))).await;
    let project = project(
        server.port,
        database,
        &format!("    encrypt: required\n    ssl_ca: {}", ca.display()),
        "SELECT * FROM everything",
    );
    let output = project.sluice(&["run"]).await;
    assert!(
        output.status.success(),
        "{}\n{}",
        stdout(&output),
        stderr(&output)
    );
    let mut records = exported_records(project.path(), "things_out");
    assert_eq!(records.len(), 2);
    records.sort_by_key(|r| r["key"]["id"].as_i64());
    let data: Vec<Value> = records.iter().map(|r| r["data"].clone()).collect();
    assert_eq!(
        data[0]["body"].as_str().map(str::len),
        Some(10_000),
        "nvarchar(max) in PLP chunks"
    );
    let mut data = data;
    data[0]["body"] = Value::String("(10,000 characters)".into());
    insta::assert_json_snapshot!("sqlserver_types", data);
    let raw = services::raw_exports(project.path(), "things_out");
    for exact in [
        r#""huge":9999999999999999999999999999.9999999999"#,
        r#""amount":-0.01"#,
        r#""price":12345678901.2300"#,
        r#""big":-9223372036854775808"#,
    ] {
        assert!(raw.contains(exact), "{exact} not in {raw}");
    }

    // What sluice sent: a describe, the transaction, the model, the rollback.
    let batches = server.batches();
    let model = batches
        .iter()
        .position(|b| b == "SELECT * FROM everything")
        .expect("the model ran");
    assert!(
        batches[..model]
            .iter()
            .any(|b| b == "EXEC sp_describe_first_result_set @tsql = N'SELECT * FROM everything'"),
        "{batches:#?}"
    );
    assert_eq!(
        batches[model - 1],
        "SET TRANSACTION ISOLATION LEVEL READ COMMITTED; BEGIN TRANSACTION"
    );
    assert_eq!(batches[model + 1], "IF @@TRANCOUNT > 0 ROLLBACK");

    let output = project.sluice(&["run"]).await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        exported_records(project.path(), "things_out").len(),
        2,
        "nothing changed"
    );
}

#[tokio::test]
async fn a_second_sync_over_strict_tls_sends_exactly_the_changes() {
    let database = "sluice_mssql_changes";
    let Some(pg) = services::postgres(database).await else {
        return;
    };
    pg.batch_execute(&format!(
        "CREATE TABLE {database}.customers (id int PRIMARY KEY, email text, plan text);
         INSERT INTO {database}.customers SELECT g, 'user' || g || '@example.com', 'free' FROM generate_series(1, 2500) g;"
    ))
    .await
    .expect("table");
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((_, cert, key)) = localhost_certificate(dir.path()) else {
        return;
    };
    let server = TdsServer::start(options(database, TdsTls::Strict), Some((&cert, &key))).await;
    let project = project(
        server.port,
        database,
        "    encrypt: strict\n    trust_server_certificate: true\n    snapshot_isolation: true\n    batch_rows: 1000",
        "SELECT id, email, plan FROM customers",
    );
    let output = project.sluice(&["run"]).await;
    assert!(
        output.status.success(),
        "{}\n{}",
        stdout(&output),
        stderr(&output)
    );
    assert_eq!(exported_records(project.path(), "things_out").len(), 2500);

    pg.batch_execute(&format!(
        "UPDATE {database}.customers SET plan = 'pro' WHERE id IN (7, 1999);
         DELETE FROM {database}.customers WHERE id = 12;
         INSERT INTO {database}.customers VALUES (2501, 'new@example.com', 'free');"
    ))
    .await
    .expect("changes");
    let output = project.sluice(&["run"]).await;
    assert!(output.status.success(), "{}", stderr(&output));
    let records = services::latest_export(project.path(), "things_out");
    let mut changes: Vec<(String, i64)> = records
        .iter()
        .map(|r| {
            (
                r["op"].as_str().unwrap_or("?").to_string(),
                r["key"]["id"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    changes.sort();
    assert_eq!(
        changes,
        vec![
            ("added".to_string(), 2501),
            ("deleted".to_string(), 12),
            ("updated".to_string(), 7),
            ("updated".to_string(), 1999)
        ]
    );
    assert!(
        server
            .batches()
            .iter()
            .any(|b| b == "SET TRANSACTION ISOLATION LEVEL SNAPSHOT; BEGIN TRANSACTION"),
        "snapshot_isolation sets the level"
    );
}

#[tokio::test]
async fn previews_use_top_and_errors_carry_sql_servers_numbers_and_a_hint() {
    let database = "sluice_mssql_errors";
    let Some(pg) = services::postgres(database).await else {
        return;
    };
    pg.batch_execute(&format!(
        "SET search_path = {database};
         CREATE DOMAIN geography AS text;
         CREATE TABLE places (id int PRIMARY KEY, name text, area geography);
         INSERT INTO places SELECT g, 'place ' || g, 'POINT(0 0)' FROM generate_series(1, 50) g;"
    ))
    .await
    .expect("table");
    let server = TdsServer::start(options(database, TdsTls::None), None).await;
    let mut strict = options(database, TdsTls::None);
    strict.allow_snapshot = false;
    let no_snapshot = TdsServer::start(strict, None).await;
    let project = TestProject::new(&format!(
        r#"state_dir: .sluice
sources:
  erp:
    type: sqlserver
    url: sqlserver://{USER}:{password}@127.0.0.1:{port}/{database}
    encrypt: "off"
  wrong_password:
    type: sqlserver
    url: sqlserver://{USER}:nope@127.0.0.1:{port}/{database}
    encrypt: "off"
  wrong_database:
    type: sqlserver
    url: sqlserver://{USER}:{password}@127.0.0.1:{port}/nowhere
    encrypt: "off"
  wants_tls:
    type: sqlserver
    url: sqlserver://{USER}:{password}@127.0.0.1:{port}/{database}
  no_snapshot:
    type: sqlserver
    url: sqlserver://{USER}:{password}@127.0.0.1:{snapshot_port}/{database}
    encrypt: "off"
    snapshot_isolation: true
  no_server:
    type: sqlserver
    url: sqlserver://{USER}:{password}@127.0.0.1:1/{database}
    encrypt: "off"
models:
  places:
    source: erp
    sql: SELECT id, name FROM places
    primary_key: id
  missing_table:
    source: erp
    sql: SELECT id FROM nope
    primary_key: id
  shapes:
    source: erp
    sql: SELECT id, area FROM places
    primary_key: id
  unnamed:
    source: erp
    sql: SELECT id, id + 1 FROM places
    primary_key: id
  snapshot_refused:
    source: no_snapshot
    sql: SELECT id FROM places
    primary_key: id
"#,
        password = url_encoded(PASSWORD),
        port = server.port,
        snapshot_port = no_snapshot.port,
    ));

    let output = project.sluice(&["preview", "places", "--limit", "3"]).await;
    assert!(
        output.status.success(),
        "{}\n{}",
        stdout(&output),
        stderr(&output)
    );
    let out = stdout(&output);
    assert!(out.contains("place 3") && !out.contains("place 4"), "{out}");
    assert!(
        server
            .batches()
            .iter()
            .any(|b| b == "SELECT TOP (3) * FROM (\nSELECT id, name FROM places\n) AS sluice_limited"),
        "{:#?}",
        server.batches()
    );

    let output = project.sluice(&["check"]).await;
    assert!(!output.status.success());
    let out = stdout(&output);
    for expected in [
        "ok      source erp",
        "Msg 18456, Level 14, State 1: Login failed for user 'sluice'.",
        "check the user and password",
        "Msg 4060",
        "database nowhere does not exist",
        "Server does not allow the requested encryption level",
        "`encrypt: off`",
        "nothing is listening on 127.0.0.1:1",
        "Msg 208, Level 16, State 1: Invalid object name 'nope'.",
        "qualify it as schema.table",
        "geography",
        "STAsText()",
        "has no name",
        "Msg 3952",
        "ALLOW_SNAPSHOT_ISOLATION ON",
    ] {
        assert!(out.contains(expected), "`{expected}` not in:\n{out}");
    }
}

#[tokio::test]
async fn a_sqlserver_source_is_reached_through_an_ssh_tunnel_with_its_certificate_checked() {
    let database = "sluice_mssql_tunnel";
    let Some(pg) = services::postgres(database).await else {
        return;
    };
    let Some(sshd) = services::Sshd::start() else {
        return;
    };
    pg.batch_execute(&format!(
        "CREATE TABLE {database}.t (id int PRIMARY KEY); INSERT INTO {database}.t VALUES (1), (2), (3);"
    ))
    .await
    .expect("table");
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((ca, cert, key)) = localhost_certificate(dir.path()) else {
        return;
    };
    let server = TdsServer::start(options(database, TdsTls::Strict), Some((&cert, &key))).await;
    // The certificate names `localhost`; through the tunnel the socket's end is 127.0.0.1, so
    // the check passes only if sluice verifies the name it was configured with.
    let project = project(
        server.port,
        database,
        &format!(
            "    encrypt: strict\n    ssl_ca: {}\n    ssh_tunnel: {{ host: 127.0.0.1, port: {}, user: root }}",
            ca.display(),
            sshd.port
        ),
        "SELECT id FROM t",
    );
    let output = project.sluice(&["ssh-key", "generate", "erp"]).await;
    assert!(output.status.success(), "{}", stderr(&output));
    sshd.authorize(stdout(&output).trim());
    let output = project.sluice(&["run"]).await;
    assert!(
        output.status.success(),
        "{}\n{}",
        stdout(&output),
        stderr(&output)
    );
    assert_eq!(exported_records(project.path(), "things_out").len(), 3);
}

/// A certificate for `localhost`; `None` (skipped, or failed when services are required)
/// without the `openssl` command.
fn localhost_certificate(
    dir: &std::path::Path,
) -> Option<(std::path::PathBuf, std::path::PathBuf, std::path::PathBuf)> {
    match crate::tds::localhost_certificate(dir) {
        Ok(pair) => Some(pair),
        Err(e) => {
            services::unavailable("openssl (for a test certificate)", e);
            None
        }
    }
}

fn url_encoded(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}
