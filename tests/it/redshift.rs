//! The `redshift` source against the local PostgreSQL behind a proxy that refuses what Redshift
//! refuses: `COPY ... TO STDOUT` (the connection is dropped, as a Redshift session fails on it).
//! The proxy also records every statement a client sends, over the simple and the extended
//! protocol, so the test checks the SQL sluice emits for Redshift.

use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::{TestProject, stderr, stdout};
use crate::services;

/// A PostgreSQL wire proxy on loopback to 127.0.0.1:5432.
struct RedshiftLikeProxy {
    port: u16,
    statements: Arc<Mutex<Vec<String>>>,
}

impl RedshiftLikeProxy {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let statements: Arc<Mutex<Vec<String>>> = Arc::default();
        let seen = statements.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect("127.0.0.1:5432").await {
                        relay(client, server, seen).await;
                    }
                });
            }
        });
        Self { port, statements }
    }

    fn statements(&self) -> Vec<String> {
        self.statements.lock().unwrap().clone()
    }
}

/// Relays one connection: the server's bytes as they are, the client's message by message.
async fn relay(client: TcpStream, server: TcpStream, seen: Arc<Mutex<Vec<String>>>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let downstream = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
    });
    // The startup message has a length but no type byte.
    let mut length = [0u8; 4];
    if client_read.read_exact(&mut length).await.is_err() {
        return;
    }
    let mut startup = vec![0u8; (u32::from_be_bytes(length) as usize).saturating_sub(4)];
    if client_read.read_exact(&mut startup).await.is_err() {
        return;
    }
    if server_write.write_all(&length).await.is_err() || server_write.write_all(&startup).await.is_err() {
        return;
    }
    loop {
        let mut header = [0u8; 5];
        if client_read.read_exact(&mut header).await.is_err() {
            break;
        }
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        let mut body = vec![0u8; len.saturating_sub(4)];
        if client_read.read_exact(&mut body).await.is_err() {
            break;
        }
        // 'Q': a simple query; 'P': Parse (name, then the SQL), each NUL-terminated.
        let sql = match header[0] {
            b'Q' => body.split(|b| *b == 0).next(),
            b'P' => body.split(|b| *b == 0).nth(1),
            _ => None,
        };
        if let Some(sql) = sql.map(|s| String::from_utf8_lossy(s).trim().to_string())
            && !sql.is_empty()
        {
            let refused = sql.to_ascii_uppercase().starts_with("COPY");
            seen.lock().unwrap().push(sql);
            if refused {
                break;
            }
        }
        if server_write.write_all(&header).await.is_err() || server_write.write_all(&body).await.is_err() {
            break;
        }
    }
    downstream.abort();
}

fn project(port: u16, kind: &str, sql: &str) -> TestProject {
    TestProject::new(&format!(
        r#"state_dir: .sluice
sources:
  warehouse:
    type: {kind}
    url: postgres://postgres@127.0.0.1:{port}/test
    sslmode: disable
    batch_rows: 1000
models:
  events:
    source: warehouse
    sql: "{sql}"
    primary_key: id
destinations:
  exports:
    type: file
    url: exports/
mappings:
  events_out:
    model: events
    destination: exports
"#
    ))
}

#[tokio::test]
async fn redshift_reads_through_a_cursor_never_copy_and_syncs_changes() {
    let schema = "sluice_redshift";
    let Some(db) = services::postgres(schema).await else {
        return;
    };
    db.batch_execute(&format!(
        "CREATE TABLE {schema}.events (id BIGINT PRIMARY KEY, name VARCHAR(64), amount NUMERIC(12, 2), \
           happened TIMESTAMP, happened_tz TIMESTAMPTZ, day DATE, flag BOOLEAN, ratio DOUBLE PRECISION);
         INSERT INTO {schema}.events SELECT g, 'event ' || g, g * 1.25, \
           TIMESTAMP '2024-01-01' + g * INTERVAL '1 second', TIMESTAMPTZ '2024-01-01 00:00:00+00' + g * INTERVAL '1 minute', \
           DATE '2024-01-01' + (g % 365), g % 2 = 0, g / 7.0 FROM generate_series(1, 2500) AS g;
         UPDATE {schema}.events SET name = NULL, amount = NULL WHERE id = 7;"
    ))
    .await
    .expect("table");
    let proxy = RedshiftLikeProxy::start().await;

    // The proxy refuses COPY as Redshift does: the `postgres` source cannot read through it.
    let copying = project(proxy.port, "postgres", &format!("SELECT * FROM {schema}.events"));
    let output = copying.sluice(&["run"]).await;
    assert!(!output.status.success(), "COPY must be refused by the proxy");

    let before = proxy.statements().len();
    let project = project(proxy.port, "redshift", &format!("SELECT * FROM {schema}.events"));
    let output = project.sluice(&["run"]).await;
    assert!(
        output.status.success(),
        "{}\n{}",
        stdout(&output),
        stderr(&output)
    );
    let mut records = services::exported_records(project.path(), "events_out");
    assert_eq!(records.len(), 2500);
    records.sort_by_key(|r| r["key"]["id"].as_i64());
    assert_eq!(
        records[0]["data"],
        serde_json::json!({
            "id": 1, "name": "event 1", "amount": 1.25, "happened": "2024-01-01T00:00:01",
            "happened_tz": "2024-01-01T00:01:00Z", "day": "2024-01-02", "flag": false, "ratio": 1.0 / 7.0
        })
    );
    assert_eq!(records[6]["data"]["name"], Value::Null);
    assert_eq!(records[6]["data"]["amount"], Value::Null);

    let statements: Vec<String> = proxy.statements()[before..].to_vec();
    assert!(
        statements
            .iter()
            .all(|s| !s.to_ascii_uppercase().starts_with("COPY")),
        "{statements:#?}"
    );
    for expected in [
        "BEGIN READ ONLY",
        &format!("DECLARE sluice_cursor CURSOR FOR\nSELECT * FROM {schema}.events"),
        "FETCH FORWARD 1000 FROM sluice_cursor",
        "CLOSE sluice_cursor; COMMIT",
    ] {
        assert!(
            statements.iter().any(|s| s == expected),
            "`{expected}` not among {statements:#?}"
        );
    }
    assert!(
        !statements
            .iter()
            .any(|s| s.contains("ISOLATION LEVEL REPEATABLE READ")),
        "Redshift takes no isolation level: {statements:#?}"
    );

    db.batch_execute(&format!(
        "UPDATE {schema}.events SET amount = 0 WHERE id = 1000;
         DELETE FROM {schema}.events WHERE id = 2000;
         INSERT INTO {schema}.events (id, name) VALUES (3000, 'late');"
    ))
    .await
    .expect("changes");
    let output = project.sluice(&["run"]).await;
    assert!(
        output.status.success(),
        "{}\n{}",
        stdout(&output),
        stderr(&output)
    );
    let mut changes = services::latest_export(project.path(), "events_out");
    changes.sort_by_key(|r| r["key"]["id"].as_i64());
    let ops: Vec<(i64, &str)> = changes
        .iter()
        .map(|r| (r["key"]["id"].as_i64().unwrap(), r["op"].as_str().unwrap()))
        .collect();
    assert_eq!(ops, vec![(1000, "updated"), (2000, "deleted"), (3000, "added")]);
}

#[tokio::test]
async fn redshift_refuses_writes_and_names_types_it_cannot_carry() {
    let schema = "sluice_redshift_refusals";
    let Some(db) = services::postgres(schema).await else {
        return;
    };
    db.batch_execute(&format!(
        "CREATE TABLE {schema}.t (id INT PRIMARY KEY, waited INTERVAL); INSERT INTO {schema}.t VALUES (1, '1 day');"
    ))
    .await
    .expect("table");
    let proxy = RedshiftLikeProxy::start().await;
    let deleting = project(
        proxy.port,
        "redshift",
        &format!("DELETE FROM {schema}.t RETURNING id"),
    );
    let output = deleting.sluice(&["run"]).await;
    assert!(!output.status.success());
    let remaining = db
        .query_one(&format!("SELECT count(*) FROM {schema}.t"), &[])
        .await
        .expect("count");
    assert_eq!(remaining.get::<_, i64>(0), 1);

    let interval = project(proxy.port, "redshift", &format!("SELECT * FROM {schema}.t"));
    let output = interval.sluice(&["run"]).await;
    assert!(!output.status.success());
    let said = stderr(&output);
    assert!(
        said.contains("column `waited`") && said.contains("interval"),
        "{said}"
    );
}
