//! The `redshift` source against the local PostgreSQL behind a proxy that refuses what Redshift
//! refuses: `COPY ... TO STDOUT` (the connection is dropped, as a Redshift session fails on it).
//! The proxy also records every statement a client sends, over the simple and the extended
//! protocol, so the test checks the SQL sluice emits for Redshift.

use std::sync::{Arc, Mutex};

use arrow::array::{ArrayRef, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parquet::arrow::ArrowWriter;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_postgres::SimpleQueryMessage;
use tokio_postgres::types::Type;

use crate::buckets::{Bucket, Provider, yaml_map};
use crate::common::{TestProject, stderr, stdout};
use crate::services;

/// A PostgreSQL wire proxy on loopback to 127.0.0.1:5432.
struct RedshiftLikeProxy {
    port: u16,
    statements: Arc<Mutex<Vec<String>>>,
}

/// What the proxy does with `UNLOAD`: writes Parquet files and a verbose manifest to a bucket,
/// as Redshift does, from the query run on PostgreSQL.
#[derive(Clone)]
struct Unloader {
    store: Arc<dyn ObjectStore>,
    /// Rows per file (Redshift writes a file or more per slice).
    rows_per_file: usize,
    /// Added to the manifest's record count, to play a manifest that disagrees with its files.
    miscount: u64,
}

impl RedshiftLikeProxy {
    async fn start() -> Self {
        Self::start_with(None).await
    }

    async fn start_with(unloader: Option<Unloader>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let statements: Arc<Mutex<Vec<String>>> = Arc::default();
        let seen = statements.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let seen = seen.clone();
                let unloader = unloader.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect("127.0.0.1:5432").await {
                        relay(client, server, seen, unloader).await;
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
async fn relay(
    client: TcpStream,
    server: TcpStream,
    seen: Arc<Mutex<Vec<String>>>,
    unloader: Option<Unloader>,
) {
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
            let upper = sql.to_ascii_uppercase();
            let refused = upper.starts_with("COPY") || (upper.starts_with("UNLOAD") && unloader.is_none());
            if upper.starts_with("UNLOAD")
                && let Some(unloader) = &unloader
            {
                // PostgreSQL has no UNLOAD: the proxy writes the files, then lets PostgreSQL
                // answer an empty query in its place.
                if let Err(e) = unloader.unload(&sql).await {
                    panic!("the test's UNLOAD failed: {e}\n{sql}");
                }
                body = b"SELECT 1 WHERE false\0".to_vec();
                let len = (body.len() + 4) as u32;
                header[1..5].copy_from_slice(&len.to_be_bytes());
            }
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

/// Reads one of Redshift's string literals at the start of `text` (`''` and backslash escapes),
/// returning it and the rest of the text.
fn literal(text: &str) -> Result<(String, &str), String> {
    let text = text.trim_start();
    let mut chars = text.char_indices();
    if !matches!(chars.next(), Some((_, '\''))) {
        return Err(format!("no literal at `{}`", &text[..text.len().min(40)]));
    }
    let mut value = String::new();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => value.push(chars.next().ok_or("a literal ends in a backslash")?.1),
            '\'' if text[i + 1..].starts_with('\'') => {
                chars.next();
                value.push('\'');
            }
            '\'' => return Ok((value, &text[i + 1..])),
            c => value.push(c),
        }
    }
    Err("an unterminated literal".into())
}

impl Unloader {
    /// `UNLOAD ('query') TO 's3://bucket/prefix/' IAM_ROLE '...' FORMAT AS PARQUET MANIFEST
    /// VERBOSE ...`: runs the query on PostgreSQL, writes `<prefix>0000_part_00.parquet`, ...
    /// with the Parquet types Redshift writes, and `<prefix>manifest`.
    async fn unload(&self, statement: &str) -> Result<(), String> {
        let rest = statement.strip_prefix("UNLOAD (").ok_or("expected `UNLOAD (`")?;
        let (query, rest) = literal(rest)?;
        let rest = rest.trim_start().strip_prefix(") TO").ok_or("expected `) TO`")?;
        let (to, rest) = literal(rest)?;
        let rest = rest
            .trim_start()
            .strip_prefix("IAM_ROLE")
            .ok_or("expected IAM_ROLE")?;
        let (role, rest) = literal(rest)?;
        if !role.starts_with("arn:aws:iam::") {
            return Err(format!("`{role}` is not an IAM role ARN"));
        }
        if !rest.contains("FORMAT AS PARQUET") || !rest.contains("MANIFEST VERBOSE") {
            return Err("expected FORMAT AS PARQUET and MANIFEST VERBOSE".into());
        }
        let prefix = to
            .strip_prefix("s3://")
            .and_then(|t| t.split_once('/'))
            .map(|(bucket, path)| (bucket.to_string(), path.to_string()))
            .ok_or("TO must be an s3:// URL")?;
        let (bucket, path) = prefix;

        let (client, connection) = tokio_postgres::connect(services::PG_URL, tokio_postgres::NoTls)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        client
            .batch_execute("SET TIME ZONE 'UTC'")
            .await
            .map_err(|e| e.to_string())?;
        let described = client.prepare(&query).await.map_err(|e| e.to_string())?;
        let mut columns: Vec<Vec<Option<String>>> = vec![Vec::new(); described.columns().len()];
        for message in client.simple_query(&query).await.map_err(|e| e.to_string())? {
            if let SimpleQueryMessage::Row(row) = message {
                for (i, column) in columns.iter_mut().enumerate() {
                    column.push(row.get(i).map(str::to_string));
                }
            }
        }
        let rows = columns.first().map_or(0, Vec::len);
        let mut fields = Vec::new();
        let mut arrays = Vec::new();
        for (column, values) in described.columns().iter().zip(columns) {
            let (data_type, values): (DataType, Vec<Option<String>>) = match *column.type_() {
                Type::INT8 => (DataType::Int64, values),
                Type::INT4 => (DataType::Int32, values),
                Type::INT2 => (DataType::Int16, values),
                Type::FLOAT8 => (DataType::Float64, values),
                Type::FLOAT4 => (DataType::Float32, values),
                Type::BOOL => (DataType::Boolean, values),
                Type::DATE => (DataType::Date32, values),
                Type::TIMESTAMP => (DataType::Timestamp(TimeUnit::Microsecond, None), values),
                // `+00` as PostgreSQL prints it, `+00:00` as arrow parses it.
                Type::TIMESTAMPTZ => (
                    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                    values.into_iter().map(|v| v.map(|v| format!("{v}:00"))).collect(),
                ),
                Type::NUMERIC => {
                    let modifier = column.type_modifier() - 4;
                    (
                        DataType::Decimal128((modifier >> 16) as u8, (modifier & 0xffff) as i8),
                        values,
                    )
                }
                _ => (DataType::Utf8, values),
            };
            let text: ArrayRef = Arc::new(StringArray::from(values));
            let array =
                arrow::compute::cast(&text, &data_type).map_err(|e| format!("{}: {e}", column.name()))?;
            fields.push(Field::new(column.name(), data_type, true));
            arrays.push(array);
        }
        let schema = Arc::new(Schema::new(fields));
        let all = RecordBatch::try_new(schema.clone(), arrays).map_err(|e| e.to_string())?;

        let mut entries = Vec::new();
        let mut total_bytes = 0;
        for (part, start) in (0..rows.max(1)).step_by(self.rows_per_file).enumerate() {
            let batch = all.slice(start, self.rows_per_file.min(rows - start));
            let mut bytes = Vec::new();
            let mut writer =
                ArrowWriter::try_new(&mut bytes, schema.clone(), None).map_err(|e| e.to_string())?;
            writer.write(&batch).map_err(|e| e.to_string())?;
            writer.close().map_err(|e| e.to_string())?;
            let key = format!("{path}{part:04}_part_00.parquet");
            total_bytes += bytes.len();
            entries.push(json!({
                "url": format!("s3://{bucket}/{key}"),
                "meta": { "content_length": bytes.len(), "record_count": batch.num_rows() }
            }));
            self.store
                .put(&StorePath::from(key.as_str()), PutPayload::from(bytes))
                .await
                .map_err(|e| e.to_string())?;
        }
        let elements: Vec<Value> = described
            .columns()
            .iter()
            .map(|c| json!({ "name": c.name(), "type": { "base": c.type_().name() } }))
            .collect();
        let manifest = json!({
            "entries": entries,
            "schema": { "elements": elements },
            "meta": { "content_length": total_bytes, "record_count": rows as u64 + self.miscount },
            "author": { "name": "Amazon Redshift", "version": "1.0.0" }
        });
        self.store
            .put(
                &StorePath::from(format!("{path}manifest").as_str()),
                PutPayload::from(manifest.to_string().into_bytes()),
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// Updates, deletes and inserts one row each, runs again, and checks that exactly those went out.
async fn second_sync_sends_exactly_the_changes(
    db: &tokio_postgres::Client,
    schema: &str,
    project: &TestProject,
) {
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

fn project(port: u16, kind: &str, sql: &str) -> TestProject {
    project_with(port, kind, sql, "")
}

/// A project whose `warehouse` source has `extra` YAML lines.
fn project_with(port: u16, kind: &str, sql: &str, extra: &str) -> TestProject {
    TestProject::new(&format!(
        r#"state_dir: .sluice
sources:
  warehouse:
    type: {kind}
    url: postgres://postgres@127.0.0.1:{port}/test
    sslmode: disable
    batch_rows: 1000
{extra}models:
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

    second_sync_sends_exactly_the_changes(&db, schema, &project).await;
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

fn unloading_project(port: u16, bucket: &Bucket, sql: &str) -> TestProject {
    project_with(
        port,
        "redshift",
        sql,
        &format!(
            "    unload:\n      url: {}\n      iam_role: arn:aws:iam::123456789012:role/sluice-unload\n      options: {}\n",
            bucket.url("unload/"),
            yaml_map(&bucket.options())
        ),
    )
}

#[tokio::test]
async fn redshift_unloads_syncs_to_s3_as_parquet_and_reads_them_back() {
    let schema = "sluice_redshift_unload";
    let Some(db) = services::postgres(schema).await else {
        return;
    };
    let Some(bucket) = Bucket::new(Provider::S3, "redshift-unload").await else {
        return;
    };
    db.batch_execute(&format!(
        "CREATE TABLE {schema}.events (id BIGINT PRIMARY KEY, name VARCHAR(64), amount NUMERIC(12, 2), \
           happened TIMESTAMP, happened_tz TIMESTAMPTZ, day DATE, flag BOOLEAN, ratio DOUBLE PRECISION, small SMALLINT);
         INSERT INTO {schema}.events SELECT g, 'event ' || g, g * 1.25, \
           TIMESTAMP '2024-01-01' + g * INTERVAL '1 second', TIMESTAMPTZ '2024-01-01 00:00:00+00' + g * INTERVAL '1 minute', \
           DATE '2024-01-01' + (g % 365), g % 2 = 0, g / 7.0, g % 100 FROM generate_series(1, 2500) AS g;
         UPDATE {schema}.events SET name = 'it''s a \\ test', amount = NULL WHERE id = 7;"
    ))
    .await
    .expect("table");
    let proxy = RedshiftLikeProxy::start_with(Some(Unloader {
        store: bucket.store(),
        rows_per_file: 1000,
        miscount: 0,
    }))
    .await;
    // Quotes and a backslash in the model reach PostgreSQL intact through UNLOAD's literal.
    let sql = format!(
        "SELECT * FROM {schema}.events WHERE name IS DISTINCT FROM 'it''s not' AND name NOT LIKE '%\\\\\\\\%x'"
    );
    let project = unloading_project(proxy.port, &bucket, &sql);

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
    // The same values, in the same types, as the cursor reads (the test above).
    assert_eq!(
        records[0]["data"],
        json!({
            "id": 1, "name": "event 1", "amount": 1.25, "happened": "2024-01-01T00:00:01",
            "happened_tz": "2024-01-01T00:01:00Z", "day": "2024-01-02", "flag": false, "ratio": 1.0 / 7.0,
            "small": 1
        })
    );
    assert_eq!(records[6]["data"]["name"], "it's a \\ test");
    assert_eq!(records[6]["data"]["amount"], Value::Null);

    let statements = proxy.statements();
    let unloads: Vec<&String> = statements.iter().filter(|s| s.starts_with("UNLOAD")).collect();
    assert_eq!(unloads.len(), 1, "{statements:#?}");
    assert!(
        unloads[0].contains("IAM_ROLE 'arn:aws:iam::123456789012:role/sluice-unload'"),
        "{}",
        unloads[0]
    );
    assert!(
        unloads[0].contains(&format!("TO '{}events/", bucket.url("unload/"))),
        "{}",
        unloads[0]
    );
    assert!(
        !statements.iter().any(|s| s.starts_with("DECLARE")),
        "a sync with an unload location reads no cursor: {statements:#?}"
    );
    // Every file and the manifest are gone once read.
    assert_eq!(bucket.list("unload/").await, Vec::<String>::new());

    // A preview reads a few rows through the cursor, never unloading.
    let output = project.sluice(&["preview", "events"]).await;
    assert!(output.status.success(), "{}", stderr(&output));
    let statements = proxy.statements();
    assert_eq!(statements.iter().filter(|s| s.starts_with("UNLOAD")).count(), 1);
    assert!(statements.iter().any(|s| s.starts_with("DECLARE")));

    // The second sync finds exactly the changes: the unloaded types match the first sync's.
    second_sync_sends_exactly_the_changes(&db, schema, &project).await;
}

#[tokio::test]
async fn redshift_unload_whose_manifest_disagrees_with_its_files_fails_and_sends_nothing() {
    let schema = "sluice_redshift_unload_count";
    let Some(db) = services::postgres(schema).await else {
        return;
    };
    let Some(bucket) = Bucket::new(Provider::S3, "redshift-unload-count").await else {
        return;
    };
    db.batch_execute(&format!(
        "CREATE TABLE {schema}.events (id INT PRIMARY KEY, name TEXT);
         INSERT INTO {schema}.events SELECT g, 'e' || g FROM generate_series(1, 300) AS g;"
    ))
    .await
    .expect("table");
    let proxy = RedshiftLikeProxy::start_with(Some(Unloader {
        store: bucket.store(),
        rows_per_file: 100,
        miscount: 1,
    }))
    .await;
    let project = unloading_project(proxy.port, &bucket, &format!("SELECT * FROM {schema}.events"));
    let output = project.sluice(&["run"]).await;
    assert!(!output.status.success(), "{}", stdout(&output));
    let said = stderr(&output);
    assert!(
        said.contains("reported 301 rows unloaded, but its files hold 300"),
        "{said}"
    );
    assert!(services::exported_records(project.path(), "events_out").is_empty());
    assert_eq!(bucket.list("unload/").await, Vec::<String>::new());
}
