//! The diff benchmark: generated snapshot pairs of an 11-column `users` model, the second with
//! 2% of rows updated, 1% deleted, 1% added, rows shuffled.
//!
//! ```text
//! cargo bench --bench diff -- generate --rows 10000000 --dir target/bench-data
//! cargo bench --bench diff -- diff --dir target/bench-data/10000000
//! ```
//!
//! `benches/diff_vs_duckdb.py` drives both and DuckDB side by side and measures each process's
//! wall time, CPU time and peak RSS; see BENCHMARKS.md.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{
    ArrayRef, BooleanArray, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use futures::StreamExt;
use sluice_engine::diff::{Baseline, ChangeCounts, Differ};
use sluice_snapshots::{SnapshotManifest, SnapshotSpec, SnapshotStore, SnapshotWriter};

const BATCH: usize = 65_536;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match args.first().map(String::as_str) {
        Some("generate") => {
            let rows: u64 = flag("--rows").unwrap_or_else(|| "1000000".into()).parse()?;
            let buckets: Option<u32> = flag("--buckets").map(|b| b.parse()).transpose()?;
            let name = match buckets {
                Some(b) => format!("{rows}-b{b}"),
                None => rows.to_string(),
            };
            let dir = absolute(
                PathBuf::from(flag("--dir").unwrap_or_else(|| "target/bench-data".into())).join(name),
            )?;
            runtime.block_on(generate(&dir, rows, buckets))
        }
        Some("diff") => {
            let dir = absolute(PathBuf::from(flag("--dir").ok_or("--dir is required")?))?;
            let ballista = flag("--engine").as_deref() == Some("ballista");
            runtime.block_on(diff(&dir, ballista))
        }
        _ => {
            eprintln!(
                "usage: diff generate --rows N --dir DIR | diff diff --dir DIR/N [--engine local|ballista]"
            );
            Ok(())
        }
    }
}

fn absolute(dir: PathBuf) -> std::io::Result<PathBuf> {
    let dir = if dir.is_absolute() {
        dir
    } else {
        std::env::current_dir()?.join(dir)
    };
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn schema() -> SchemaRef {
    let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("email", DataType::Utf8, true),
        Field::new("first_name", DataType::Utf8, true),
        Field::new("last_name", DataType::Utf8, true),
        Field::new("plan", DataType::Utf8, true),
        Field::new("country", DataType::Utf8, true),
        Field::new("lifetime_value", DataType::Float64, true),
        Field::new("lead_score", DataType::Int32, true),
        Field::new("is_active", DataType::Boolean, true),
        Field::new("created_at", ts.clone(), true),
        Field::new("updated_at", ts, true),
    ]))
}

const FIRST: &[&str] = &[
    "Ada", "Grace", "Linus", "Margaret", "Ken", "Barbara", "Dennis", "Frances", "Edsger", "Radia", "Alan",
    "Donald",
];
const LAST: &[&str] = &[
    "Lovelace", "Hopper", "Torvalds", "Hamilton", "Thompson", "Liskov", "Ritchie", "Allen", "Dijkstra",
    "Perlman", "Turing", "Knuth",
];
const PLANS: &[&str] = &["free", "starter", "pro", "enterprise"];
const COUNTRIES: &[&str] = &[
    "US", "DE", "FR", "GB", "IN", "BR", "JP", "NG", "CA", "AU", "MX", "KR",
];

/// A cheap deterministic mix, so a row's values depend only on its id (and version).
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Rows for `ids`; `version` 1 changes plan, lead score and updated_at.
fn batch(ids: &[i64], version: impl Fn(i64) -> u64) -> RecordBatch {
    let pick = |list: &[&'static str], id: i64, salt: u64| {
        list[(mix(id as u64 ^ salt) % list.len() as u64) as usize]
    };
    let emails: Vec<String> = ids
        .iter()
        .map(|id| {
            format!(
                "{}.{}{id}@example.com",
                pick(FIRST, *id, 1).to_lowercase(),
                pick(LAST, *id, 2).to_lowercase()
            )
        })
        .collect();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(ids.to_vec())),
        Arc::new(StringArray::from(emails)),
        Arc::new(StringArray::from_iter_values(
            ids.iter().map(|id| pick(FIRST, *id, 1)),
        )),
        Arc::new(StringArray::from_iter_values(
            ids.iter().map(|id| pick(LAST, *id, 2)),
        )),
        Arc::new(StringArray::from_iter_values(
            ids.iter().map(|id| pick(PLANS, *id, 3 + version(*id))),
        )),
        Arc::new(StringArray::from_iter_values(
            ids.iter().map(|id| pick(COUNTRIES, *id, 4)),
        )),
        Arc::new(Float64Array::from_iter_values(
            ids.iter()
                .map(|id| (mix(*id as u64 ^ 5) % 500_000) as f64 / 100.0),
        )),
        Arc::new(Int32Array::from_iter_values(
            ids.iter()
                .map(|id| (mix(*id as u64 ^ 6) % 100) as i32 + version(*id) as i32),
        )),
        Arc::new(BooleanArray::from_iter(
            ids.iter().map(|id| Some(!mix(*id as u64 ^ 7).is_multiple_of(5))),
        )),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(
                ids.iter()
                    .map(|id| 1_600_000_000_000_000 + (mix(*id as u64 ^ 8) % 100_000_000_000_000) as i64),
            )
            .with_timezone("UTC"),
        ),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(ids.iter().map(|id| {
                1_700_000_000_000_000
                    + (mix(*id as u64 ^ 9) % 10_000_000_000_000) as i64
                    + version(*id) as i64 * 86_400_000_000
            }))
            .with_timezone("UTC"),
        ),
    ];
    RecordBatch::try_new(schema(), columns).expect("generated columns match the schema")
}

/// Row `i` of a shuffled order of `n` rows: `i * step mod n` with `step` coprime to `n`.
fn shuffled(i: u64, n: u64) -> u64 {
    let mut step = 0x9e37_79b9_7f4a_7c15 % n.max(1);
    while gcd(step, n) != 1 {
        step += 1;
    }
    ((i as u128 * step as u128) % n as u128) as u64
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

async fn write(
    store: &SnapshotStore,
    model: &str,
    buckets: Option<u32>,
    ids: impl Iterator<Item = i64>,
    version: impl Fn(i64) -> u64 + Copy,
) -> Result<SnapshotManifest, Box<dyn std::error::Error>> {
    let spec = SnapshotSpec {
        model: model.into(),
        run_id: "bench".into(),
        key_columns: vec!["id".into()],
        buckets,
    };
    let mut writer = SnapshotWriter::new(store.clone(), spec);
    let mut chunk = Vec::with_capacity(BATCH);
    for id in ids {
        chunk.push(id);
        if chunk.len() == BATCH {
            writer.write(batch(&chunk, version)).await?;
            chunk.clear();
        }
    }
    if !chunk.is_empty() {
        writer.write(batch(&chunk, version)).await?;
    }
    Ok(writer.commit().await?)
}

async fn generate(dir: &Path, rows: u64, buckets: Option<u32>) -> Result<(), Box<dyn std::error::Error>> {
    if dir.join("pair.json").exists() {
        eprintln!("{} already holds a snapshot pair", dir.display());
        return Ok(());
    }
    let store =
        SnapshotStore::open(&dir.display().to_string(), Path::new("/"), [])?.with_temp_dir(dir.join("tmp"));
    let started = Instant::now();
    let old = write(&store, "old", buckets, (0..rows as i64).map(|i| i + 1), |_| 0).await?;
    // The new snapshot: ids 1..=n minus 1% deleted, plus 1% new ids, 2% updated, shuffled.
    let deleted = |id: i64| mix(id as u64 ^ 0xdead).is_multiple_of(100);
    let updated = |id: i64| mix(id as u64 ^ 0xbeef).is_multiple_of(50);
    let added = rows / 100;
    let total = rows + added;
    let order = (0..total)
        .map(move |i| shuffled(i, total) as i64 + 1)
        .filter(move |id| !((*id as u64) <= rows && deleted(*id)));
    let new = write(&store, "new", buckets, order, move |id| {
        u64::from(id as u64 <= rows && updated(id))
    })
    .await?;
    let pair = serde_json::json!({ "old": old.id, "new": new.id, "rows": rows });
    std::fs::write(dir.join("pair.json"), serde_json::to_vec_pretty(&pair)?)?;
    eprintln!(
        "generated {} + {} rows in {:.1}s ({} and {} buckets) under {}",
        old.rows,
        new.rows,
        started.elapsed().as_secs_f64(),
        old.buckets,
        new.buckets,
        dir.display()
    );
    Ok(())
}

/// Diffs the pair under `dir`; with `ballista`, on a standalone Ballista cluster in this process
/// (started before the clock starts).
async fn diff(dir: &Path, ballista: bool) -> Result<(), Box<dyn std::error::Error>> {
    let pair: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("pair.json"))?)?;
    let store = SnapshotStore::open(&dir.display().to_string(), Path::new("/"), [])?;
    let started = Instant::now();
    let old = store
        .snapshot("old", pair["old"].as_str().ok_or("bad pair.json")?)
        .await?;
    let new = store
        .snapshot("new", pair["new"].as_str().ok_or("bad pair.json")?)
        .await?;
    let baseline = Baseline {
        snapshot: Some(Arc::new(old)),
        exceptions: None,
    };
    let mut differ = Differ::new(store.clone(), Arc::new(new), Some(baseline)).await?;
    if ballista {
        let cluster_started = Instant::now();
        let config = sluice_engine::config::DiffConfig {
            engine: sluice_engine::config::DiffEngineKind::Ballista,
            ..Default::default()
        };
        differ = differ.on_cluster(sluice_engine::ballista::session(&config, &store).await?);
        eprintln!(
            "standalone Ballista started in {:.2} s",
            cluster_started.elapsed().as_secs_f64()
        );
    }
    // (The cluster's start is not part of the diff.)
    let started = if ballista { Instant::now() } else { started };
    let parallelism = sluice_engine::diff::parallelism();
    let mut counts = ChangeCounts::default();
    let mut changed_rows_held = 0usize;
    let mut results = futures::stream::iter(0..differ.buckets())
        .map(|bucket| {
            let differ = differ.clone();
            tokio::spawn(async move { differ.changes(bucket).await })
        })
        .buffer_unordered(parallelism);
    while let Some(result) = results.next().await {
        let batches = result??;
        counts.add(ChangeCounts::of(&batches));
        changed_rows_held += batches.iter().map(|b| b.num_rows()).sum::<usize>();
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "engine": if ballista { "sluice-ballista" } else { "sluice" },
            "buckets": differ.buckets(),
            "added": counts.added,
            "updated": counts.updated,
            "deleted": counts.deleted,
            "change_rows": changed_rows_held,
            "seconds": seconds,
        })
    );
    Ok(())
}
