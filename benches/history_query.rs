//! Snapshot-history queries: `snapshots` snapshots of `rows` rows of a `users` model (id, email,
//! plan, lead score), 5% of rows changing between snapshots, queried through the history tables
//! the `sluice query` command and the API use. Prints the time to register the tables and to
//! the first row (and to the end) of: one key's history across every snapshot, the rows that
//! changed between two snapshots, and a plain scan of the history.
//!
//! Both layouts are written and queried side by side, alternating: `layered` (each snapshot a
//! delta of the one before, as `sluice run` writes them) and `full` (each snapshot a base, every
//! row stored again: the layout before deltas).
//!
//! `cargo bench --bench history_query -- [rows] [snapshots]` (defaults 1,000,000 and 10).

use std::time::Instant;

use futures::StreamExt;
use sluice_engine::datafusion::prelude::SessionContext;
use sluice_snapshots::{SnapshotStore, register_history};

#[path = "common/history.rs"]
mod history;

async fn first_row_and_total(ctx: &SessionContext, sql: &str) -> (f64, f64, usize) {
    let started = Instant::now();
    let mut stream = ctx
        .sql(sql)
        .await
        .expect("plan")
        .execute_stream()
        .await
        .expect("execute");
    let mut first = None;
    let mut rows = 0;
    while let Some(batch) = stream.next().await {
        let batch = batch.expect("batch");
        if first.is_none() && batch.num_rows() > 0 {
            first = Some(started.elapsed().as_secs_f64());
        }
        rows += batch.num_rows();
    }
    let total = started.elapsed().as_secs_f64();
    (first.unwrap_or(total), total, rows)
}

#[tokio::main]
async fn main() {
    let args: Vec<i64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.replace('_', "").parse().ok())
        .collect();
    let rows = args.first().copied().unwrap_or(1_000_000);
    let snapshots = args.get(1).copied().unwrap_or(10);
    let mut layouts = Vec::new();
    for (name, layered) in [("layered", true), ("full", false)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SnapshotStore::open(dir.path().to_str().expect("path"), dir.path(), []).expect("store");
        let generated = Instant::now();
        history::write_snapshots(&store, rows, snapshots, layered).await;
        println!(
            "{name}: {snapshots} snapshots of {rows} rows written in {:.1} s, {:.0} MiB stored",
            generated.elapsed().as_secs_f64(),
            dir_bytes(dir.path()) as f64 / 1048576.0
        );
        layouts.push((name, dir, store));
    }
    for round in 0..3 {
        for (name, _dir, store) in &layouts {
            let store = store.clone();
            let ctx = SessionContext::new();
            let started = Instant::now();
            register_history(&ctx, &store, "users").await.expect("register");
            let register = started.elapsed().as_secs_f64();
            let one_key = first_row_and_total(
            &ctx,
            "SELECT id, plan, _run_id, _extracted_at FROM users_history WHERE id = 4242 ORDER BY _extracted_at",
        )
        .await;
            let changed = first_row_and_total(
                &ctx,
                "SELECT a.id, a.plan AS before, b.plan AS after FROM users_history a JOIN users_history b \
             ON a.id = b.id AND a._run_id = 'run-3' AND b._run_id = 'run-4' WHERE a.plan <> b.plan",
            )
            .await;
            let scan = first_row_and_total(&ctx, "SELECT * FROM users_history").await;
            // The same lookups with the key's bloom filters ignored: what they buy.
            let mut config = sluice_engine::datafusion::prelude::SessionConfig::new();
            config.options_mut().execution.parquet.bloom_filter_on_read = false;
            let without_bloom = SessionContext::new_with_config(config);
            register_history(&without_bloom, &store, "users")
                .await
                .expect("register");
            let keys =
                "SELECT id, plan, _run_id FROM users_history WHERE id IN (17, 4242, 99991, 123457, 654321)";
            let one = "SELECT id, plan, _run_id FROM users_history WHERE id = 777777";
            // Both contexts have run queries over the same files; alternate which goes first.
            let (mut with, mut without) = (Vec::new(), Vec::new());
            for round in 0..6 {
                for (first_with, sql) in [(round % 2 == 0, one), (round % 2 == 1, keys)] {
                    let order = if first_with {
                        [&ctx, &without_bloom]
                    } else {
                        [&without_bloom, &ctx]
                    };
                    let a = first_row_and_total(order[0], sql).await.1;
                    let b = first_row_and_total(order[1], sql).await.1;
                    let (w, o) = if first_with { (a, b) } else { (b, a) };
                    with.push((sql == one, w));
                    without.push((sql == one, o));
                }
            }
            let median = |v: &[(bool, f64)], single: bool| {
                let mut x: Vec<f64> = v.iter().filter(|(s, _)| *s == single).map(|(_, t)| *t).collect();
                x.sort_by(f64::total_cmp);
                x[x.len() / 2]
            };
            println!(
                "{name} round {round}: point lookups, median of 6, with the key's bloom filters / without: one key {:.4} / {:.4} s, five keys {:.4} / {:.4} s",
                median(&with, true),
                median(&without, true),
                median(&with, false),
                median(&without, false)
            );
            println!(
                "{name} round {round}: register {:.3} s | one key's history: first row {:.3} s, all {:.3} s ({} rows) | changed between two runs: first row {:.3} s, all {:.3} s ({} rows) | full scan: first row {:.3} s, all {:.3} s ({} rows)",
                register,
                one_key.0,
                one_key.1,
                one_key.2,
                changed.0,
                changed.1,
                changed.2,
                scan.0,
                scan.1,
                scan.2
            );
        }
    }
}

/// Bytes of every file under `dir`.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                total += entry.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
    }
    total
}
