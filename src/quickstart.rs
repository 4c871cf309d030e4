//! `sluice quickstart`: a demo project that runs with nothing but the binary.

use std::path::Path;
use std::process::ExitCode;
use std::str::FromStr;

use anyhow::{Context, Result, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sluice_connectors::Connectors;
use sluice_engine::{Engine, Project, RunRequest};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection};

const CONFIG: &str = r#"# A sluice project: see README.md for every key.
state_dir: .sluice                  # metadata (SQLite) and snapshots live here
sources:
  warehouse:
    type: sqlite
    path: warehouse.db              # the demo warehouse
models:
  users:
    source: warehouse
    sql: >-
      SELECT id, email, first_name, last_name, plan, country, lifetime_value, lead_score
      FROM users WHERE email IS NOT NULL
    primary_key: id
destinations:
  crm_export:
    type: file                      # one JSONL file per run under out/<mapping>/
    url: out
    format: jsonl
mappings:
  users_to_crm:
    model: users
    destination: crm_export
    send: [added, updated, deleted]
    fields:
      email: email
      traits.first_name: first_name
      traits.last_name: last_name
      traits.plan: plan
      traits.country: country
      traits.lifetime_value: lifetime_value
      traits.lead_score: lead_score
    constants:
      context.source: sluice-quickstart
"#;

const FIRST_NAMES: &[&str] = &[
    "Ada", "Grace", "Linus", "Margaret", "Ken", "Barbara", "Dennis", "Frances", "Edsger", "Radia",
];
const LAST_NAMES: &[&str] = &[
    "Lovelace", "Hopper", "Torvalds", "Hamilton", "Thompson", "Liskov", "Ritchie", "Allen", "Dijkstra",
    "Perlman",
];
const PLANS: &[&str] = &["free", "starter", "pro", "enterprise"];
const COUNTRIES: &[&str] = &["US", "DE", "FR", "GB", "IN", "BR", "JP", "NG", "CA", "AU"];

pub async fn run(dir: &Path, rows: u32) -> Result<ExitCode> {
    let config_path = dir.join("sluice.yaml");
    if config_path.exists() {
        bail!(
            "{} already exists; remove the directory or pick another with --dir",
            config_path.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let database = dir.join("warehouse.db");
    let mut rng = StdRng::seed_from_u64(42);
    create_warehouse(&database, rows, &mut rng).await?;
    std::fs::write(&config_path, CONFIG)
        .with_context(|| format!("cannot write {}", config_path.display()))?;
    println!(
        "created {} with {rows} users in {}",
        config_path.display(),
        database.display()
    );

    let engine = Engine::open(Project::load(&config_path)?, &Connectors).await?;
    println!("\n== first sync: every user is new ==");
    let first = crate::run(&engine, RunRequest::default()).await?;

    let (updated, deleted, added) = change_rows(&database, rows, &mut rng).await?;
    println!(
        "\n== changed the warehouse: {updated} users changed plan, {deleted} deleted, {added} signed up =="
    );
    println!("== second sync: only the changes are sent ==");
    let second = crate::run(&engine, RunRequest::default()).await?;
    engine.close().await;

    let out = dir.join("out").join("users_to_crm");
    let mut files: Vec<_> = std::fs::read_dir(&out)
        .with_context(|| format!("cannot list {}", out.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    if let Some(last) = files.last() {
        println!(
            "\nthe second sync wrote {}; a record of each kind:",
            last.display()
        );
        let text = std::fs::read_to_string(last)?;
        for op in ["added", "updated", "deleted"] {
            if let Some(line) = text.lines().find(|l| l.contains(&format!("\"op\":\"{op}\""))) {
                println!("{line}");
            }
        }
    }
    println!(
        "\nnext: edit {} and run `sluice run --config {}`; `sluice runs --config {}` shows the history",
        config_path.display(),
        config_path.display(),
        config_path.display()
    );
    let failed = first
        .iter()
        .chain(&second)
        .any(|r| r.error.is_some() || r.counts.failed > 0);
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

async fn connect(path: &Path) -> Result<sqlx::SqliteConnection> {
    let url = format!("sqlite://{}", path.display());
    Ok(SqliteConnectOptions::from_str(&url)?
        .create_if_missing(true)
        .connect()
        .await?)
}

async fn create_warehouse(path: &Path, rows: u32, rng: &mut StdRng) -> Result<()> {
    let mut conn = connect(path).await?;
    sqlx::query(
        "CREATE TABLE users (
            id INTEGER PRIMARY KEY,
            email TEXT,
            first_name TEXT NOT NULL,
            last_name TEXT NOT NULL,
            plan TEXT NOT NULL,
            country TEXT NOT NULL,
            lifetime_value REAL NOT NULL,
            lead_score INTEGER NOT NULL,
            created_at TEXT NOT NULL
        )",
    )
    .execute(&mut conn)
    .await?;
    let mut tx = conn.begin().await?;
    for id in 1..=rows as i64 {
        insert_user(&mut tx, id, rng).await?;
    }
    tx.commit().await?;
    conn.close().await?;
    Ok(())
}

async fn insert_user(conn: &mut sqlx::SqliteConnection, id: i64, rng: &mut StdRng) -> Result<()> {
    let first = FIRST_NAMES[rng.random_range(0..FIRST_NAMES.len())];
    let last = LAST_NAMES[rng.random_range(0..LAST_NAMES.len())];
    sqlx::query(
        "INSERT INTO users (id, email, first_name, last_name, plan, country, lifetime_value, lead_score, created_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, datetime('now'))",
    )
    .bind(id)
    .bind(format!("{}.{}{id}@example.com", first.to_lowercase(), last.to_lowercase()))
    .bind(first)
    .bind(last)
    .bind(PLANS[rng.random_range(0..PLANS.len())])
    .bind(COUNTRIES[rng.random_range(0..COUNTRIES.len())])
    .bind((rng.random_range(0.0..5000.0f64) * 100.0).round() / 100.0)
    .bind(rng.random_range(0..100i64))
    .execute(conn)
    .await?;
    Ok(())
}

/// Updates, deletes and inserts some users; returns how many of each.
async fn change_rows(path: &Path, rows: u32, rng: &mut StdRng) -> Result<(u64, u64, u64)> {
    let mut conn = connect(path).await?;
    let mut tx = conn.begin().await?;
    let n = rows as i64;
    let step = (n / 40).max(1);
    // Every `step`-th user upgrades, every `4*step`-th (offset) leaves, and a few sign up.
    let updated = sqlx::query(
        "UPDATE users SET plan = CASE plan WHEN 'free' THEN 'starter' WHEN 'starter' THEN 'pro' ELSE 'enterprise' END,
                          lead_score = lead_score + 1
         WHERE id % ? = 0 AND plan != 'enterprise'",
    )
    .bind(step)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let deleted = sqlx::query("DELETE FROM users WHERE id % ? = 1")
        .bind(step * 4)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    let added = (n / 60).max(1);
    for id in n + 1..=n + added {
        insert_user(&mut tx, id, rng).await?;
    }
    tx.commit().await?;
    conn.close().await?;
    Ok((updated, deleted, added as u64))
}
