//! The `mysql` source against the local MariaDB, through the real binary.

use mysql_async::prelude::Queryable;
use serde_json::Value;

use crate::common::{TestProject, stderr, stdout};
use crate::services::{self, exported_records};

fn project(database: &str, sql: &str) -> TestProject {
    TestProject::new(&format!(
        r#"state_dir: .sluice
sources:
  shop:
    type: mysql
    url: mysql://root@127.0.0.1:3306/{database}
    ssl_mode: disabled
models:
  things:
    source: shop
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
"#
    ))
}

#[tokio::test]
async fn every_type_in_the_table_round_trips_into_payloads() {
    let database = "sluice_my_types";
    let Some(mut db) = services::mysql(database).await else {
        return;
    };
    db.query_drop(
        r#"CREATE TABLE everything (
            id BIGINT PRIMARY KEY,
            tiny TINYINT, flag TINYINT(1), small SMALLINT, small_u SMALLINT UNSIGNED,
            medium MEDIUMINT, normal INT, normal_u INT UNSIGNED, big BIGINT, big_u BIGINT UNSIGNED,
            price DECIMAL(38, 10), amount DECIMAL(12, 2),
            ratio FLOAT, score DOUBLE,
            name VARCHAR(100), code CHAR(3), body TEXT,
            born DATE, wakes TIME, seen DATETIME(6), seen_ts TIMESTAMP(6) NULL, yr YEAR,
            doc JSON, raw VARBINARY(16), blob_col BLOB,
            mood ENUM('happy', 'sad'), tags SET('a', 'b', 'c'), bits BIT(8)
        ) CHARACTER SET utf8mb4"#,
    )
    .await
    .expect("table");
    db.query_drop(
        r#"INSERT INTO everything VALUES (
            1,
            -128, 1, -32768, 65535,
            -8388608, 2147483647, 4294967295, -9223372036854775808, 18446744073709551615,
            9999999999999999999999999999.9999999999, -0.01,
            1.5, -1e300,
            'héllo 😀 世界', 'ab', REPEAT('x', 10),
            '1969-07-20', '23:59:59.999999', '1900-01-01 00:00:00.000001', '1999-12-31 23:59:59.5', 2026,
            '{"a": [1, 2]}', X'00FF', X'0102',
            'happy', 'a,c', b'10100101'
        )"#,
    )
    .await
    .expect("row");
    db.query_drop("INSERT INTO everything (id) VALUES (2)")
        .await
        .expect("null row");
    let project = project(database, "SELECT * FROM everything");
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
    insta::assert_json_snapshot!("mysql_types", data);
    let raw = services::raw_exports(project.path(), "things_out");
    for exact in [
        r#""price":9999999999999999999999999999.9999999999"#,
        r#""amount":-0.01"#,
        r#""big_u":18446744073709551615"#,
    ] {
        assert!(raw.contains(exact), "{exact} not in {raw}");
    }

    let output = project.sluice(&["run"]).await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        exported_records(project.path(), "things_out").len(),
        2,
        "nothing changed"
    );
}

#[tokio::test]
async fn check_reports_the_servers_own_error_with_a_hint() {
    let database = "sluice_my_check";
    let Some(mut db) = services::mysql(database).await else {
        return;
    };
    db.query_drop("CREATE TABLE secret (id INT PRIMARY KEY)")
        .await
        .expect("table");
    db.query_drop("DROP USER IF EXISTS 'sluice_no_access'@'%'")
        .await
        .expect("drop user");
    db.query_drop("DROP USER IF EXISTS 'sluice_no_access'@'localhost'")
        .await
        .expect("drop user");
    db.query_drop("CREATE USER 'sluice_no_access'@'%'")
        .await
        .expect("user");
    db.query_drop("CREATE USER 'sluice_no_access'@'localhost'")
        .await
        .expect("user");
    let project = TestProject::new(&format!(
        r#"sources:
  good:
    type: mysql
    url: mysql://root@127.0.0.1:3306/{database}
    ssl_mode: disabled
  no_server:
    type: mysql
    url: mysql://root@127.0.0.1:1/{database}
  no_database:
    type: mysql
    url: mysql://root@127.0.0.1:3306/sluice_missing_db
    ssl_mode: disabled
  restricted:
    type: mysql
    url: mysql://sluice_no_access@127.0.0.1:3306/
    ssl_mode: disabled
models:
  secret:
    source: restricted
    sql: SELECT id FROM {database}.secret
    primary_key: id
  missing_table:
    source: good
    sql: SELECT id FROM nope
    primary_key: id
"#
    ));
    let output = project.sluice(&["check"]).await;
    let out = stdout(&output);
    assert!(!output.status.success());
    assert!(out.contains("ok      source good"), "{out}");
    assert!(
        out.contains("FAILED  source no_server") && out.contains("nothing is listening"),
        "{out}"
    );
    assert!(
        out.contains("database `sluice_missing_db` does not exist"),
        "{out}"
    );
    assert!(
        out.contains("FAILED  model secret") && out.contains("GRANT SELECT"),
        "{out}"
    );
    assert!(
        out.contains("FAILED  model missing_table") && out.contains("the table does not exist"),
        "{out}"
    );
}

#[tokio::test]
async fn a_mysql_source_is_reached_through_an_ssh_tunnel() {
    let database = "sluice_my_tunnel";
    let Some(mut db) = services::mysql(database).await else {
        return;
    };
    let Some(sshd) = services::Sshd::start() else {
        return;
    };
    db.query_drop("CREATE TABLE t (id INT PRIMARY KEY)")
        .await
        .expect("table");
    db.query_drop("INSERT INTO t VALUES (1), (2), (3)")
        .await
        .expect("rows");
    let project = TestProject::new(&format!(
        r#"sources:
  shop:
    type: mysql
    url: mysql://root@127.0.0.1:3306/{database}
    ssl_mode: disabled
    ssh_tunnel: {{ host: 127.0.0.1, port: {port}, user: root }}
models:
  things:
    source: shop
    sql: SELECT id FROM t
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
        port = sshd.port
    ));
    let output = project.sluice(&["ssh-key", "generate", "shop"]).await;
    assert!(output.status.success(), "{}", stderr(&output));
    sshd.authorize(&stdout(&output));
    let output = project.sluice(&["run"]).await;
    assert!(
        output.status.success(),
        "{}\n{}",
        stdout(&output),
        stderr(&output)
    );
    assert_eq!(exported_records(project.path(), "things_out").len(), 3);
    assert!(project.path().join(".sluice/ssh/shop.key").exists());
}
