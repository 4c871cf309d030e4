//! The `postgres` destination against the local PostgreSQL, through the real binary.

use crate::common::{TestProject, stderr, stdout};
use crate::services::{self, PG_URL};

fn project(schema: &str, mode: &str) -> TestProject {
    TestProject::new(&format!(
        r#"sources:
  app_db:
    type: postgres
    url: {PG_URL}
    sslmode: disable
models:
  accounts:
    source: app_db
    sql: SELECT id, name, score, tags, updated_at FROM {schema}.accounts
    primary_key: id
destinations:
  copy:
    type: postgres
    url: {PG_URL}
    sslmode: disable
mappings:
  accounts_copy:
    model: accounts
    destination: copy
    mode: {mode}
    options: {{ schema: {schema}, table: accounts_copy }}
    fields: {{ id: id, name: name, "stats.score": score, tags: tags, updated_at: updated_at }}
"#
    ))
}

async fn rows(db: &tokio_postgres::Client, schema: &str) -> Vec<(i64, String, Option<f64>)> {
    db.query(
        &format!("SELECT id, name, \"stats.score\" FROM {schema}.accounts_copy ORDER BY id"),
        &[],
    )
    .await
    .expect("query copy")
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

#[tokio::test]
async fn mirror_creates_the_table_upserts_and_deletes() {
    let schema = "sluice_pg_dest";
    let Some(db) = services::postgres(schema).await else {
        return;
    };
    db.batch_execute(&format!(
        r#"CREATE TABLE {schema}.accounts (id int8 PRIMARY KEY, name text NOT NULL, score float8, tags text[], updated_at timestamptz);
           INSERT INTO {schema}.accounts
             SELECT g, 'account ' || g, g * 1.5, ARRAY['a', 'b'], '2026-11-01 00:00:00+00'::timestamptz + g * interval '1 minute'
             FROM generate_series(1, 5000) g;"#
    ))
    .await
    .expect("seed");
    let project = project(schema, "mirror");

    // First run: 5000 rows, in requests of 5000 (past the COPY threshold).
    let output = project.sluice(&["run"]).await;
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );
    let copied = rows(&db, schema).await;
    assert_eq!(copied.len(), 5000);
    assert_eq!(copied[0], (1, "account 1".to_string(), Some(1.5)));
    let (tags, at): (String, String) = {
        let row = db
            .query_one(
                &format!("SELECT tags::text, updated_at::text FROM {schema}.accounts_copy WHERE id = 2"),
                &[],
            )
            .await
            .expect("row 2");
        (row.get(0), row.get(1))
    };
    assert_eq!(tags, r#"["a", "b"]"#, "lists land as jsonb");
    assert_eq!(at, "2026-11-01 00:02:00+00");

    // Second run: one update, one delete, one insert (small requests: the JSON path).
    db.batch_execute(&format!(
        "UPDATE {schema}.accounts SET name = 'renamed' WHERE id = 7;
         DELETE FROM {schema}.accounts WHERE id = 9;
         INSERT INTO {schema}.accounts VALUES (9001, 'new', NULL, NULL, NULL);"
    ))
    .await
    .expect("change");
    let output = project.sluice(&["run"]).await;
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );
    let copied = rows(&db, schema).await;
    assert_eq!(copied.len(), 5000);
    assert!(copied.contains(&(7, "renamed".to_string(), Some(10.5))));
    assert!(!copied.iter().any(|r| r.0 == 9));
    assert!(copied.contains(&(9001, "new".to_string(), None)));
}

#[tokio::test]
async fn a_row_the_table_refuses_fails_alone() {
    let schema = "sluice_pg_dest_refuse";
    let Some(db) = services::postgres(schema).await else {
        return;
    };
    db.batch_execute(&format!(
        r#"CREATE TABLE {schema}.accounts (id int8 PRIMARY KEY, name text, score float8, tags text[], updated_at timestamptz);
           INSERT INTO {schema}.accounts SELECT g, 'account ' || g, g, NULL, NULL FROM generate_series(1, 40) g;
           CREATE TABLE {schema}.accounts_copy (id int8 PRIMARY KEY, name text CHECK (name <> 'account 13'), "stats.score" float8, tags jsonb, updated_at timestamptz);"#
    ))
    .await
    .expect("seed");
    let project = project(schema, "upsert");
    let output = project.sluice(&["run"]).await;
    assert_eq!(
        output.status.code(),
        Some(2),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );
    assert_eq!(rows(&db, schema).await.len(), 39);
    let runs = project.sluice(&["runs", "--failures", "5"]).await;
    assert!(stdout(&runs).contains("23514"), "{}", stdout(&runs));
    assert!(stdout(&runs).contains(r#"{"id":13}"#), "{}", stdout(&runs));
}
