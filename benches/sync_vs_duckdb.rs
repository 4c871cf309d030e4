//! Whole syncs against the reference tools, side by side in one run: `sluice run` (the release
//! binary, as a user runs it) from a source to the `file` destination as Parquet, against
//! DuckDB doing the same job on the same data, and against PostgreSQL's own `COPY`.
//!
//! ```sh
//! cargo bench --bench sync_vs_duckdb -- --rows 10000000 30000000 --rounds 2 --sources files postgres
//! ```
//!
//! The data is the 11-column `users` shape of the other benchmarks. Version 1 has `rows` rows;
//! version 2 has 2% of them updated (`id % 50 = 0`: a new plan and `updated_at`), 1% deleted
//! (`id % 100 = 7`) and 1% added. For each size and source:
//!
//! - **files** (Parquet in, Parquet out): DuckDB writes both versions as Parquet files (cached
//!   under `target/bench-data/sync/<rows>/`). The project's `files` source reads
//!   `input/users.parquet`, a link to version 1 for the first sync and to version 2 for the
//!   second. Compared with, each as its own process:
//!   - first sync: DuckDB copying version 1 Parquet to Parquet;
//!   - second sync: DuckDB finding the same changes from the two files (a full outer join on the
//!     key with a hash of the other columns) and writing the added, updated and deleted rows
//!     (deleted rows with their last values) to one Parquet file.
//! - **postgres**: the table `sluice_bench.sync_users` in the local PostgreSQL, changed in place
//!   between the syncs; compared with `psql` running `\copy (SELECT * FROM the table) TO
//!   '/dev/null' (FORMAT binary)`: the rows leaving the server, which any extraction pays.
//!
//! Rounds alternate the tools (`--rounds`, default 2): every first sync starts from an empty
//! project, and every second sync from a copy of the state the last first sync left, so each
//! round does the same work. Each sluice run's counts are checked against the changes made and
//! against the rows in the file it wrote; DuckDB's against its own counts. `--sample-rss` samples
//! RSS every 100 ms (peak per stage); `--profile DIR` runs each sluice sync under `perf record`;
//! `SLUICE_BENCH_BIN=path` runs another `sluice` binary instead of this build's, and
//! `SLUICE_BENCH_PREVIOUS=path` runs that binary too, alternating, as `sluice previous` (an
//! earlier version side by side with this one).
//! DuckDB comes from PyPI (`duckdb`), installed for the user's `python3` when missing.

#[path = "common/process.rs"]
mod process;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use process::{ProcessCost, Sample, measure, median, peak_between};
use sqlx::Row;

const DUCKDB_VERSION: &str = "2.0.0";
const PG_TABLE: &str = "sluice_bench.sync_users";

/// The `users` columns in DuckDB's dialect over `range(from, to + 1) t(g)`.
fn duckdb_users(from: i64, to: i64) -> String {
    format!(
        "SELECT
            g::BIGINT AS id,
            'user' || g || '@example.com' AS email,
            (['Ada','Grace','Linus','Ken','Barbara'])[1 + g % 5] AS first_name,
            'Last' || (g % 1000) AS last_name,
            (['free','starter','pro','enterprise'])[1 + g % 4] AS plan,
            (['US','DE','FR','GB','JP','BR'])[1 + g % 6] AS country,
            (g % 10000) / 7.0::DOUBLE AS lifetime_value,
            (g % 100)::INTEGER AS lead_score,
            g % 3 <> 0 AS is_active,
            TIMESTAMP '2020-01-01' + g * INTERVAL 1 SECOND AS created_at,
            TIMESTAMPTZ '2024-01-01 00:00:00+00' + g * INTERVAL 1 SECOND AS updated_at
         FROM range({from}, {to} + 1) t(g)"
    )
}

/// The same rows in PostgreSQL's dialect.
fn pg_users(from: i64, to: i64) -> String {
    format!(
        "SELECT
            g::int8 AS id,
            'user' || g || '@example.com' AS email,
            (ARRAY['Ada','Grace','Linus','Ken','Barbara'])[1 + g % 5] AS first_name,
            'Last' || (g % 1000) AS last_name,
            (ARRAY['free','starter','pro','enterprise'])[1 + g % 4] AS plan,
            (ARRAY['US','DE','FR','GB','JP','BR'])[1 + g % 6] AS country,
            (g % 10000) / 7.0::float8 AS lifetime_value,
            (g % 100)::int4 AS lead_score,
            g % 3 <> 0 AS is_active,
            timestamp '2020-01-01' + g * interval '1 second' AS created_at,
            timestamptz '2024-01-01 00:00:00+00' + g * interval '1 second' AS updated_at
        FROM generate_series({from}, {to}) g"
    )
}

/// Added, updated and deleted rows of the change from version 1 to version 2.
fn expected_changes(rows: i64) -> (i64, i64, i64) {
    let updated = rows / 50;
    let deleted = (rows + 93) / 100;
    (rows / 100, updated, deleted)
}

const COLUMNS: [&str; 11] = [
    "id",
    "email",
    "first_name",
    "last_name",
    "plan",
    "country",
    "lifetime_value",
    "lead_score",
    "is_active",
    "created_at",
    "updated_at",
];

fn python() -> &'static str {
    "python3"
}

fn ensure_duckdb() {
    let found = Command::new(python())
        .args([
            "-c",
            &format!("import duckdb; assert duckdb.__version__ == '{DUCKDB_VERSION}'"),
        ])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!("installing duckdb=={DUCKDB_VERSION} from PyPI");
        let status = Command::new(python())
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                &format!("duckdb=={DUCKDB_VERSION}"),
            ])
            .status()
            .expect("run pip");
        assert!(status.success(), "pip install duckdb failed");
    }
}

/// Runs a DuckDB script (`sql` with `?` placeholders bound to `args`) in its own process with
/// every core, and returns what it printed (the last statement's rows, tab-separated).
fn duckdb_command(sql: &str, args: &[String]) -> Command {
    let script = r#"
import sys, duckdb
sql, args = sys.argv[1], sys.argv[2:]
con = duckdb.connect()
con.execute("SET enable_progress_bar = false")
result = None
for statement in [s for s in sql.split(";") if s.strip()]:
    for i, a in enumerate(args):
        statement = statement.replace("{%d}" % i, a)
    result = con.execute(statement).fetchall()
for row in result or []:
    print("\t".join(str(v) for v in row))
"#;
    let mut command = Command::new(python());
    command.args(["-c", script, sql]).args(args);
    command
}

fn run_duckdb(sql: &str, args: &[String]) -> (ProcessCost, String) {
    let out = tempfile::NamedTempFile::new().expect("temp file");
    let mut command = duckdb_command(sql, args);
    command
        .stdout(out.reopen().expect("reopen"))
        .stderr(Stdio::inherit());
    let (cost, _) = measure(&mut command, false);
    assert_eq!(cost.exit, 0, "duckdb failed: {sql}");
    (cost, std::fs::read_to_string(out.path()).unwrap_or_default())
}

/// Writes version 1 and 2 of the table as Parquet under `dir` (once; cached).
fn generate_files(dir: &Path, rows: i64) -> (PathBuf, PathBuf) {
    let v1 = dir.join("v1.parquet");
    let v2 = dir.join("v2.parquet");
    let marker = dir.join("generated");
    if marker.exists() {
        return (v1, v2);
    }
    std::fs::create_dir_all(dir).expect("data dir");
    let added_to = rows + rows / 100;
    let sql = format!(
        "COPY ({v1}) TO '{{0}}' (FORMAT parquet);
         COPY (
            SELECT id, email, first_name, last_name,
                   CASE WHEN id % 50 = 0 THEN 'upgraded' ELSE plan END AS plan,
                   country, lifetime_value, lead_score, is_active, created_at,
                   CASE WHEN id % 50 = 0 THEN updated_at + INTERVAL 1 DAY ELSE updated_at END AS updated_at
            FROM read_parquet('{{0}}') WHERE id % 100 <> 7
            UNION ALL {added}
         ) TO '{{1}}' (FORMAT parquet);
         SELECT 1",
        v1 = duckdb_users(1, rows),
        added = duckdb_users(rows + 1, added_to),
    );
    let started = std::time::Instant::now();
    run_duckdb(&sql, &[v1.display().to_string(), v2.display().to_string()]);
    std::fs::write(&marker, rows.to_string()).expect("marker");
    eprintln!(
        "  generated {} and {} in {:.1} s",
        v1.display(),
        v2.display(),
        started.elapsed().as_secs_f64()
    );
    (v1, v2)
}

/// DuckDB's first sync: version 1 copied Parquet to Parquet.
fn duckdb_copy(v1: &Path, out: &Path) -> ProcessCost {
    let (cost, printed) = run_duckdb(
        "COPY (SELECT * FROM read_parquet('{0}')) TO '{1}' (FORMAT parquet); SELECT count(*) FROM read_parquet('{1}')",
        &[v1.display().to_string(), out.display().to_string()],
    );
    let _ = std::fs::remove_file(out);
    eprintln!("    duckdb copy: {} rows", printed.trim());
    cost
}

/// DuckDB's second sync: the changes between the files, found by a full outer join on the key
/// with a hash of the other columns, written to one Parquet file with an `op` column.
fn duckdb_changes(v1: &Path, v2: &Path, out: &Path, expect: (i64, i64, i64)) -> ProcessCost {
    let others: Vec<&str> = COLUMNS[1..].to_vec();
    let hash = format!("hash({})", others.join(", "));
    let values: Vec<String> = COLUMNS
        .iter()
        .map(|c| format!("CASE WHEN n.id IS NULL THEN o.{c} ELSE n.{c} END AS {c}"))
        .collect();
    let sql = format!(
        "COPY (
            SELECT CASE WHEN o.id IS NULL THEN 'added' WHEN n.id IS NULL THEN 'deleted' ELSE 'updated' END AS op,
                   {values}
            FROM (SELECT *, {hash} AS h FROM read_parquet('{{1}}')) n
            FULL OUTER JOIN (SELECT *, {hash} AS h FROM read_parquet('{{0}}')) o ON n.id = o.id
            WHERE n.h IS DISTINCT FROM o.h
         ) TO '{{2}}' (FORMAT parquet);
         SELECT count(*) FILTER (op = 'added'), count(*) FILTER (op = 'updated'), count(*) FILTER (op = 'deleted')
         FROM read_parquet('{{2}}')",
        values = values.join(", "),
    );
    let (cost, printed) = run_duckdb(
        &sql,
        &[
            v1.display().to_string(),
            v2.display().to_string(),
            out.display().to_string(),
        ],
    );
    let _ = std::fs::remove_file(out);
    let counts: Vec<i64> = printed
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    assert_eq!(
        counts,
        vec![expect.0, expect.1, expect.2],
        "duckdb's change counts"
    );
    cost
}

/// `psql` copying the table out in binary to /dev/null.
fn pg_copy() -> ProcessCost {
    let mut command = Command::new("psql");
    command
        .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-q", "-c"])
        .arg(format!(
            "\\copy (SELECT * FROM {PG_TABLE}) TO '/dev/null' (FORMAT binary)"
        ))
        .stdout(Stdio::null());
    let (cost, _) = measure(&mut command, false);
    assert_eq!(cost.exit, 0, "psql \\copy failed");
    cost
}

fn psql(sql: &str) {
    let status = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "test",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ])
        .stdout(Stdio::null())
        .status()
        .expect("run psql");
    assert!(status.success(), "psql failed: {sql}");
}

fn create_pg_table(rows: i64) {
    psql(&format!(
        "CREATE SCHEMA IF NOT EXISTS sluice_bench;
         DROP TABLE IF EXISTS {PG_TABLE};
         CREATE UNLOGGED TABLE {PG_TABLE} AS {};
         ALTER TABLE {PG_TABLE} ADD PRIMARY KEY (id);",
        pg_users(1, rows)
    ));
    psql(&format!("VACUUM ANALYZE {PG_TABLE}"));
}

fn change_pg_table(rows: i64) {
    psql(&format!(
        "UPDATE {PG_TABLE} SET plan = 'upgraded', updated_at = updated_at + interval '1 day' WHERE id % 50 = 0;
         DELETE FROM {PG_TABLE} WHERE id % 100 = 7;
         INSERT INTO {PG_TABLE} {};",
        pg_users(rows + 1, rows + rows / 100)
    ));
    psql(&format!("VACUUM ANALYZE {PG_TABLE}"));
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Files,
    Postgres,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::Files => "files",
            Source::Postgres => "postgres",
        }
    }
}

fn write_project(dir: &Path, source: Source) -> PathBuf {
    std::fs::create_dir_all(dir).expect("project dir");
    let (source_yaml, sql) = match source {
        Source::Files => (
            "lake: { type: files, tables: { users: input/users.parquet } }".to_string(),
            "SELECT * FROM users".to_string(),
        ),
        Source::Postgres => (
            "lake: { type: postgres, url: \"postgres://postgres@127.0.0.1:5432/test\", sslmode: disable }"
                .to_string(),
            format!("SELECT * FROM {PG_TABLE}"),
        ),
    };
    let config = format!(
        r#"state_dir: .sluice
sources:
  {source_yaml}
models:
  users:
    source: lake
    sql: {sql}
    primary_key: id
destinations:
  exports: {{ type: file, url: exports/, format: parquet }}
mappings:
  users_to_file:
    model: users
    destination: exports
    columns: all
    send: [added, updated, deleted]
"#
    );
    let path = dir.join("sluice.yaml");
    std::fs::write(&path, config).expect("write sluice.yaml");
    path
}

fn sluice_binary() -> std::ffi::OsString {
    std::env::var_os("SLUICE_BENCH_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_sluice").into())
}

fn run_sluice(
    binary: &std::ffi::OsStr,
    config: &Path,
    log: &Path,
    sample_rss: bool,
    profile: Option<PathBuf>,
) -> (ProcessCost, Vec<Sample>) {
    let log_file = std::fs::File::create(log).expect("log file");
    let mut command = match profile {
        Some(output) => {
            let mut perf = Command::new("perf");
            perf.args(["record", "-F", "499", "-g", "-o"])
                .arg(output)
                .arg("--")
                .arg(binary);
            perf
        }
        None => Command::new(binary),
    };
    command
        .args(["run", "--config"])
        .arg(config)
        // `SLUICE_BENCH_LOG=sluice_snapshots=debug,info` puts the snapshot writer's steps in
        // each run's log, with their times.
        .env(
            "RUST_LOG",
            std::env::var("SLUICE_BENCH_LOG").unwrap_or_else(|_| "info".to_string()),
        )
        .stdout(log_file.try_clone().expect("log"))
        .stderr(log_file);
    measure(&mut command, sample_rss)
}

/// The mapping's last run, as its record says.
#[derive(Debug)]
struct RunFigures {
    status: String,
    extracted: i64,
    added: i64,
    updated: i64,
    deleted: i64,
    delivered: i64,
    extract_ms: i64,
    diff_ms: i64,
    read_ms: i64,
    render_ms: i64,
    deliver_ms: i64,
}

async fn last_run(state: &Path) -> RunFigures {
    let url = format!("sqlite://{}?mode=ro", state.join("sluice.db").display());
    let pool = sqlx::SqlitePool::connect(&url)
        .await
        .expect("open the metadata store");
    let r = sqlx::query(
        "SELECT status, extracted, added, updated, deleted, delivered,
                COALESCE(extract_ms, 0) AS extract_ms, COALESCE(diff_ms, 0) AS diff_ms,
                COALESCE(read_ms, 0) AS read_ms, COALESCE(render_ms, 0) AS render_ms,
                COALESCE(deliver_ms, 0) AS deliver_ms
         FROM runs ORDER BY started_at DESC LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .expect("read the run");
    pool.close().await;
    RunFigures {
        status: r.get("status"),
        extracted: r.get("extracted"),
        added: r.get("added"),
        updated: r.get("updated"),
        deleted: r.get("deleted"),
        delivered: r.get("delivered"),
        extract_ms: r.get("extract_ms"),
        diff_ms: r.get("diff_ms"),
        read_ms: r.get("read_ms"),
        render_ms: r.get("render_ms"),
        deliver_ms: r.get("deliver_ms"),
    }
}

/// Rows in the Parquet files the file destination wrote under `exports`, removing them.
fn take_exported_rows(exports: &Path) -> i64 {
    let mut rows = 0;
    let mut dirs = vec![exports.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "parquet") {
                let file = std::fs::File::open(&path).expect("open export");
                let reader = parquet::file::reader::SerializedFileReader::new(file).expect("read export");
                use parquet::file::reader::FileReader;
                rows += reader.metadata().file_metadata().num_rows();
                std::fs::remove_file(&path).expect("remove export");
            }
        }
    }
    rows
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).expect("create the copy's directory");
    }
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp");
    assert!(status.success(), "cp -a {} {}", from.display(), to.display());
}

fn link_input(project: &Path, version: &Path) {
    let input = project.join("input");
    std::fs::create_dir_all(&input).expect("input dir");
    let link = input.join("users.parquet");
    let _ = std::fs::remove_file(&link);
    std::fs::hard_link(version, &link).expect("link the input file");
}

/// One measured job, printed as a table row and a JSON line.
struct Measured {
    rows: i64,
    source: Source,
    sync: &'static str,
    tool: String,
    cost: ProcessCost,
    detail: String,
}

fn print_row(m: &Measured) {
    println!(
        "| {} | {} | {} | {} | {:.2} | {:.1} | {:.0} | {} |",
        m.rows,
        m.source.name(),
        m.sync,
        m.tool,
        m.cost.wall,
        m.cost.cpu,
        m.cost.peak_rss_mib,
        m.detail
    );
    println!(
        "{{\"rows\":{},\"source\":\"{}\",\"sync\":\"{}\",\"tool\":\"{}\",\"wall_s\":{:.3},\"cpu_s\":{:.3},\"peak_rss_mib\":{:.1}}}",
        m.rows,
        m.source.name(),
        m.sync,
        m.tool,
        m.cost.wall,
        m.cost.cpu,
        m.cost.peak_rss_mib
    );
}

#[allow(clippy::too_many_arguments)]
async fn sluice_sync(
    variant: &Variant,
    project: &Path,
    config: &Path,
    sync: &'static str,
    rows: i64,
    source: Source,
    expect: (i64, i64, i64),
    sample_rss: bool,
    profile: Option<PathBuf>,
) -> Measured {
    let (cost, samples) = run_sluice(
        &variant.binary,
        config,
        &project.join(format!("{sync}.log")),
        sample_rss,
        profile,
    );
    assert_eq!(
        cost.exit,
        0,
        "sluice run failed; see {}",
        project.join(format!("{sync}.log")).display()
    );
    let run = last_run(&project.join(".sluice")).await;
    assert_eq!(run.status, "succeeded", "{run:?}");
    assert_eq!((run.added, run.updated, run.deleted), expect, "{run:?}");
    let exported = take_exported_rows(&project.join("exports"));
    assert_eq!(
        exported,
        expect.0 + expect.1 + expect.2,
        "rows in the exported file"
    );
    assert_eq!(run.delivered, exported, "{run:?}");
    let s = |ms: i64| ms as f64 / 1000.0;
    let mut detail = format!(
        "extract {:.1}, diff {:.1}, read rows {:.1}, render {:.1}, write {:.1}",
        s(run.extract_ms),
        s(run.diff_ms),
        s(run.read_ms),
        s(run.render_ms),
        s(run.deliver_ms)
    );
    if samples.iter().any(|s| s.rss_mib.is_some()) {
        let extract_end = s(run.extract_ms);
        detail.push_str(&format!(
            "; RSS extraction {:.0} / after {:.0} MiB",
            peak_between(&samples, 0.0, extract_end),
            peak_between(&samples, extract_end, f64::MAX)
        ));
    }
    let _ = run.extracted;
    Measured {
        rows,
        source,
        sync,
        tool: variant.name.into(),
        cost,
        detail,
    }
}

/// A `sluice` binary under test.
struct Variant {
    name: &'static str,
    binary: std::ffi::OsString,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let sample_rss = args.iter().any(|a| a == "--sample-rss");
    let values = |flag: &str| -> Vec<String> {
        args.iter()
            .skip_while(|a| *a != flag)
            .skip(1)
            .take_while(|a| !a.starts_with("--"))
            .cloned()
            .collect()
    };
    let profile: Option<PathBuf> = values("--profile").first().map(PathBuf::from);
    if let Some(dir) = &profile {
        std::fs::create_dir_all(dir).expect("profile directory");
    }
    let mut sizes: Vec<i64> = values("--rows")
        .iter()
        .filter_map(|a| a.replace('_', "").parse().ok())
        .collect();
    if sizes.is_empty() {
        sizes = vec![1_000_000];
    }
    let rounds: usize = values("--rounds")
        .first()
        .and_then(|r| r.parse().ok())
        .unwrap_or(2);
    let mut sources: Vec<Source> = values("--sources")
        .iter()
        .map(|name| match name.as_str() {
            "files" => Source::Files,
            "postgres" => Source::Postgres,
            other => panic!("unknown source `{other}` (files or postgres)"),
        })
        .collect();
    if sources.is_empty() {
        sources = vec![Source::Files];
    }
    ensure_duckdb();
    let mut variants = vec![Variant {
        name: "sluice",
        binary: sluice_binary(),
    }];
    if let Some(previous) = std::env::var_os("SLUICE_BENCH_PREVIOUS") {
        variants.push(Variant {
            name: "sluice previous",
            binary: previous,
        });
    }
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-data/sync");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!("| rows | source | sync | tool | wall s | CPU s | peak RSS MiB | detail (s) |");
    println!("|---:|---|---|---|---:|---:|---:|---|");
    let mut results: Vec<Measured> = Vec::new();
    runtime.block_on(async {
        for &rows in &sizes {
            eprintln!("{rows} rows:");
            let expect_first = (rows, 0, 0);
            let expect_second = expected_changes(rows);
            let size_dir = data.join(rows.to_string());
            for &source in &sources {
                let saved = size_dir.join(format!("saved-{}", source.name()));
                let perf = |sync: &str, round: usize| {
                    profile
                        .as_ref()
                        .map(|d| d.join(format!("{rows}-{}-{sync}-{round}.perf.data", source.name())))
                };
                let (v1, v2) = match source {
                    Source::Files => {
                        let (v1, v2) = generate_files(&size_dir, rows);
                        (Some(v1), Some(v2))
                    }
                    Source::Postgres => {
                        create_pg_table(rows);
                        (None, None)
                    }
                };
                let project_of = |variant: &Variant| {
                    size_dir.join(format!(
                        "project-{}-{}",
                        source.name(),
                        variant.name.replace(' ', "-")
                    ))
                };
                for round in 0..rounds {
                    for variant in &variants {
                        let project = project_of(variant);
                        let _ = std::fs::remove_dir_all(&project);
                        let config = write_project(&project, source);
                        if let Some(v1) = &v1 {
                            link_input(&project, v1);
                        }
                        let profile = perf(&format!("first-{}", variant.name.replace(' ', "-")), round);
                        let m = sluice_sync(
                            variant,
                            &project,
                            &config,
                            "first",
                            rows,
                            source,
                            expect_first,
                            sample_rss,
                            profile,
                        )
                        .await;
                        print_row(&m);
                        results.push(m);
                    }
                    let (tool, cost) = match &v1 {
                        Some(v1) => (
                            "duckdb copy",
                            duckdb_copy(v1, &size_dir.join("duckdb-copy.parquet")),
                        ),
                        None => ("psql \\copy binary", pg_copy()),
                    };
                    let m = Measured {
                        rows,
                        source,
                        sync: "first",
                        tool: tool.into(),
                        cost,
                        detail: String::new(),
                    };
                    print_row(&m);
                    results.push(m);
                }
                for variant in &variants {
                    let project = project_of(variant);
                    copy_dir(
                        &project.join(".sluice"),
                        &saved.join(variant.name.replace(' ', "-")),
                    );
                    if let Some(v2) = &v2 {
                        link_input(&project, v2);
                    }
                }
                if v2.is_none() {
                    change_pg_table(rows);
                }
                for round in 0..rounds {
                    for variant in &variants {
                        let project = project_of(variant);
                        copy_dir(
                            &saved.join(variant.name.replace(' ', "-")),
                            &project.join(".sluice"),
                        );
                        let config = project.join("sluice.yaml");
                        let profile = perf(&format!("second-{}", variant.name.replace(' ', "-")), round);
                        let m = sluice_sync(
                            variant,
                            &project,
                            &config,
                            "second",
                            rows,
                            source,
                            expect_second,
                            sample_rss,
                            profile,
                        )
                        .await;
                        print_row(&m);
                        results.push(m);
                    }
                    let (tool, cost) = match (&v1, &v2) {
                        (Some(v1), Some(v2)) => (
                            "duckdb changes",
                            duckdb_changes(v1, v2, &size_dir.join("duckdb-changes.parquet"), expect_second),
                        ),
                        _ => ("psql \\copy binary", pg_copy()),
                    };
                    let m = Measured {
                        rows,
                        source,
                        sync: "second",
                        tool: tool.into(),
                        cost,
                        detail: String::new(),
                    };
                    print_row(&m);
                    results.push(m);
                }
                for variant in &variants {
                    let _ = std::fs::remove_dir_all(project_of(variant));
                }
                let _ = std::fs::remove_dir_all(&saved);
                if source == Source::Postgres {
                    psql(&format!("DROP TABLE IF EXISTS {PG_TABLE}"));
                }
            }
        }
    });
    // Medians side by side: each sluice binary over the reference tool.
    println!();
    println!(
        "| rows | source | sync | binary | wall s (median) | reference | reference wall s (median) | ratio | peak RSS MiB (max) |"
    );
    println!("|---:|---|---|---|---:|---|---:|---:|---:|");
    for &rows in &sizes {
        for &source in &sources {
            for sync in ["first", "second"] {
                let of = |tool: &dyn Fn(&str) -> bool| -> Vec<&Measured> {
                    results
                        .iter()
                        .filter(|m| m.rows == rows && m.source == source && m.sync == sync && tool(&m.tool))
                        .collect()
                };
                let theirs = of(&|t| !t.starts_with("sluice"));
                let Some(reference) = theirs.first() else { continue };
                let theirs_wall = median(&theirs.iter().map(|m| m.cost.wall).collect::<Vec<_>>());
                for variant in &variants {
                    let ours = of(&|t| t == variant.name);
                    let ours_wall = median(&ours.iter().map(|m| m.cost.wall).collect::<Vec<_>>());
                    let rss = ours.iter().map(|m| m.cost.peak_rss_mib).fold(0.0, f64::max);
                    println!(
                        "| {rows} | {} | {sync} | {} | {ours_wall:.2} | {} | {theirs_wall:.2} | {:.2}x | {rss:.0} |",
                        source.name(),
                        variant.name,
                        reference.tool,
                        ours_wall / theirs_wall
                    );
                }
            }
        }
    }
}
