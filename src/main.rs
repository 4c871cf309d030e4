//! The `sluice` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use sluice_connectors::Connectors;
use sluice_engine::metadata::RunStatus;
use sluice_engine::{Engine, Project, RunRequest};

mod progress;
mod quickstart;
mod report;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Reverse ETL: SQL models snapshotted to Parquet, diffed by DataFusion, delivered to business tools"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines as text or as JSON objects (one per line, with the run id and mapping of the
    /// run they belong to). The level is set by RUST_LOG (default: warn; `sluice serve`: info).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "SLUICE_LOG_FORMAT"
    )]
    log_format: LogFormat,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(clap::Args)]
struct ConfigArg {
    /// The project file.
    #[arg(
        long,
        short = 'c',
        default_value = "sluice.yaml",
        env = "SLUICE_CONFIG",
        global = true
    )]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run mappings now: extract their models, diff, deliver what changed.
    Run {
        /// Mappings to run (all when none is named).
        mappings: Vec<String>,
        /// Ignore what was sent before and send every row as added (a backfill).
        #[arg(long)]
        full: bool,
        /// With --full: send again only rows matching this SQL predicate over the model's
        /// columns (e.g. "plan = 'pro'"); everything else goes as in a normal run.
        #[arg(long, requires = "full")]
        filter: Option<String>,
        /// Compute the diff and write the exact requests each mapping would send, one JSON
        /// object per line; send nothing, commit nothing.
        #[arg(long)]
        dry_run: bool,
        /// With --dry-run: write the requests to this file instead of stdout.
        #[arg(long, requires = "dry_run")]
        output: Option<PathBuf>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Show the payload a mapping would send for one record of its model (a test record):
    /// the row with primary key KEY, or the model's first row.
    PreviewPayload {
        mapping: String,
        /// The record's primary key; give it once per key column, in order.
        #[arg(long)]
        key: Vec<String>,
        /// Show the record as this change: added, updated or deleted.
        #[arg(long, default_value = "added")]
        op: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Print a model's first rows and column types, without writing a snapshot.
    Preview {
        model: String,
        #[arg(long, default_value_t = 10)]
        limit: usize,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Extract a model into a new snapshot without delivering anything (for snapshot history,
    /// and to measure extraction alone).
    Extract {
        model: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Manage the SSH keys sources use to reach databases through a bastion.
    SshKey {
        #[command(subcommand)]
        action: SshKeyAction,
    },
    /// Connect to sources and destinations, and check models' queries; report what fails (all
    /// when none is named).
    Check {
        names: Vec<String>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Show each mapping's schedule, whether it is enabled, and its next run times.
    Schedules {
        /// How many upcoming run times to show.
        #[arg(long, default_value_t = 3)]
        next: usize,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Show recent runs and their load results; `sluice runs show RUN` shows one run.
    #[command(args_conflicts_with_subcommands = true)]
    Runs {
        #[command(subcommand)]
        action: Option<RunsAction>,
        /// Only this mapping's runs.
        mapping: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Also list each run's failed records (up to this many per run).
        #[arg(long, default_value_t = 0)]
        failures: u32,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// List a run's failed records (key, operation, error, attempts, payload); with --csv, write
    /// them all to a CSV file.
    Failures {
        run: String,
        /// Write every failed record to this CSV file.
        #[arg(long)]
        csv: Option<PathBuf>,
        /// Records to print when not writing CSV.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Query snapshot history with SQL (read-only). Each model is a table of its latest
    /// snapshot; `<model>_history` holds every snapshot, with `_snapshot_id`, `_run_id` and
    /// `_extracted_at` columns.
    Query {
        sql: String,
        #[arg(long, value_enum, default_value = "table")]
        format: QueryFormat,
        /// Rows returned at most.
        #[arg(long, default_value_t = 10_000)]
        max_rows: usize,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Create a demo project (a SQLite warehouse and a file destination), sync it, change some
    /// rows, and sync again.
    Quickstart {
        /// Directory to create the demo in.
        #[arg(long, default_value = "sluice-quickstart")]
        dir: PathBuf,
        /// Rows in the demo warehouse.
        #[arg(long, default_value_t = 1000)]
        rows: u32,
    },
    /// Run mappings on their schedules and serve the HTTP API (`/api/v1`, with its OpenAPI
    /// document at `/api/v1/openapi.json`) until SIGTERM or Ctrl-C; runs in flight then stop at
    /// their next commit point.
    Serve {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Serve the API only; run nothing on a schedule.
        #[arg(long)]
        no_schedules: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Manage the HTTP API's bearer tokens (kept in the metadata store as their SHA-256).
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// The project's dbt side: `exposures` writes each mapping that reads a dbt model as a dbt
    /// exposure, so dbt's lineage shows where its models go.
    Dbt {
        #[command(subcommand)]
        action: DbtAction,
    },
    /// The key that seals secrets made through the API (`SLUICE_SECRET_KEY`).
    Secrets {
        #[command(subcommand)]
        action: SecretsAction,
    },
    /// Retire old snapshots by each model's `retain:` policy (all models when none is named);
    /// `sluice serve` does this after scheduled runs.
    Retire {
        models: Vec<String>,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum QueryFormat {
    Table,
    Csv,
    Json,
}

#[derive(Subcommand)]
enum RunsAction {
    /// One run: its trigger, timings, counts, error with the recommended action, and its first
    /// failed records.
    Show {
        run: String,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Subcommand)]
enum TokenAction {
    /// Create a token and print it (the only time it is shown).
    Create {
        /// A name to tell it by (who or what uses it).
        name: String,
        /// `read`: list, get, read runs, query; `admin`: also change, trigger and cancel.
        #[arg(long, value_parser = ["read", "admin"], default_value = "read")]
        scope: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// List the tokens (names, scopes, when made; never the tokens).
    List {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Revoke a token; the API refuses it within ten seconds.
    Revoke {
        name: String,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Subcommand)]
enum DbtAction {
    /// Write a dbt `exposures:` YAML file declaring every mapping whose model reads dbt models
    /// (`dbt_model:` or `ref()`); put it in the dbt project's models directory.
    Exposures {
        /// Where to write it (standard output when not given).
        #[arg(long)]
        output: Option<PathBuf>,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Subcommand)]
enum SecretsAction {
    /// Print a new random key for `SLUICE_SECRET_KEY`.
    NewKey,
    /// Seal every stored secret again under the current `SLUICE_SECRET_KEY`, opening each with
    /// that key or one in `SLUICE_SECRET_KEY_PREVIOUS`; afterwards the earlier keys can go.
    RotateKey {
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Subcommand)]
enum SshKeyAction {
    /// Create a new key pair for SOURCE and print its public key for the bastion's
    /// authorized_keys. The new key replaces the current one once a connection with it works.
    Generate {
        source: String,
        #[command(flatten)]
        config: ConfigArg,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = if matches!(cli.command, Command::Serve { .. }) {
        "info"
    } else {
        "warn"
    };
    init_tracing(cli.log_format, default_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            let message = format!("{e:#}");
            eprintln!("error: {}", sluice_engine::secrets::scrub_known(&message));
            ExitCode::FAILURE
        }
    }
}

/// Standard error with every secret the process knows taken out of each log line (the
/// formatter writes a whole event at once), at every level: a system's error quoted in a log
/// may carry a credential it was sent.
struct ScrubbedStderr;

impl std::io::Write for ScrubbedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        std::io::Write::write_all(
            &mut std::io::stderr(),
            sluice_engine::secrets::scrub_known(&text).as_bytes(),
        )?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::Write::flush(&mut std::io::stderr())
    }
}

fn init_tracing(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| ScrubbedStderr)
        .with_target(false);
    match format {
        LogFormat::Text => builder.init(),
        // Every line carries the fields of its spans: run id, mapping, model, stage.
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .flatten_event(true)
            .init(),
    }
}

async fn open(config: &Path) -> Result<Engine> {
    let project = Project::load(config)?;
    Ok(Engine::open(project, &Connectors).await?)
}

async fn dispatch(command: Command) -> Result<ExitCode> {
    match command {
        Command::Run {
            mappings,
            full,
            filter,
            dry_run: false,
            config,
            ..
        } => {
            let engine = open(&config.config).await?;
            stop_on_signals(engine.shutdown().clone());
            let request = RunRequest {
                mappings,
                full,
                trigger: sluice_engine::Trigger::Manual,
                filter,
            };
            let runs = run(&engine, request).await?;
            engine.close().await;
            Ok(exit_code(&runs))
        }
        Command::Run {
            mappings,
            full,
            filter,
            dry_run: true,
            output,
            config,
        } => {
            let engine = open(&config.config).await?;
            let result = dry_run(&engine, mappings, full, filter.as_deref(), output.as_deref()).await;
            engine.close().await;
            result
        }
        Command::PreviewPayload {
            mapping,
            key,
            op,
            config,
        } => {
            let op = sluice_engine::Op::parse(&op)
                .with_context(|| format!("`--op {op}`: choose added, updated or deleted"))?;
            let engine = open(&config.config).await?;
            let key = (!key.is_empty()).then_some(key);
            let preview = engine.preview_payload(&mapping, key.as_deref(), op).await;
            engine.close().await;
            let preview = preview?;
            println!("{}", serde_json::to_string_pretty(&preview)?);
            Ok(if preview.unsendable.is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Check { names, config } => check(&config.config, &names).await,
        Command::Preview { model, limit, config } => {
            let engine = open(&config.config).await?;
            let preview = engine.preview(&model, limit).await?;
            report::print_preview(&preview)?;
            engine.close().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Extract { model, config } => {
            let engine = open(&config.config).await?;
            let observer = progress::TerminalProgress::new();
            let started = std::time::Instant::now();
            let manifest = engine.snapshot_model(&model, &observer).await;
            observer.finish();
            let manifest = manifest?;
            let seconds = started.elapsed().as_secs_f64();
            println!(
                "model {model}: snapshot {} committed, {} rows in {seconds:.2} s ({:.0} rows/s)",
                manifest.id,
                manifest.rows,
                manifest.rows as f64 / seconds.max(1e-9)
            );
            engine.close().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::SshKey {
            action: SshKeyAction::Generate { source, config },
        } => {
            let project = Project::load(&config.config)?;
            match project.config.sources.get(&source) {
                None => anyhow::bail!("`{source}` is not a source in {}", config.config.display()),
                Some(s) if !s.options.contains_key("ssh_tunnel") => {
                    eprintln!("note: source `{source}` has no `ssh_tunnel` yet; add one to use this key")
                }
                Some(_) => {}
            }
            let public = sluice_connectors::tunnel::generate_key(&project.state_dir(), &source)
                .map_err(anyhow::Error::msg)?;
            println!("{public}");
            eprintln!(
                "Add this line to ~/.ssh/authorized_keys of the tunnel user on the bastion, then run `sluice check {source}`.\nThe new key is used once a connection with it succeeds; until then the current key (if any) stays in use."
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Runs {
            action: Some(RunsAction::Show { run, config }),
            ..
        } => {
            let engine = open(&config.config).await?;
            let record = engine
                .metadata()
                .find_run(&run)
                .await?
                .with_context(|| format!("no run `{run}` (`sluice runs` lists them)"))?;
            let failures = engine.metadata().failures(&record.id, 0, 20).await?;
            report::print_run(&record, &failures);
            engine.close().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Failures {
            run,
            csv,
            limit,
            config,
        } => {
            let engine = open(&config.config).await?;
            let record = engine
                .metadata()
                .find_run(&run)
                .await?
                .with_context(|| format!("no run `{run}` (`sluice runs` lists them)"))?;
            match csv {
                Some(path) => {
                    let written = write_failures_csv(&engine, &record.id, &path).await?;
                    eprintln!(
                        "wrote {written} failed record(s) of run {} ({}) to {}",
                        record.id,
                        record.mapping,
                        path.display()
                    );
                }
                None => {
                    let rows = engine.metadata().failures(&record.id, 0, limit).await?;
                    report::print_failures(&record, &rows);
                }
            }
            engine.close().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Runs {
            action: None,
            mapping,
            limit,
            failures,
            config,
        } => {
            let engine = open(&config.config).await?;
            let runs = engine.metadata().runs(mapping.as_deref(), limit).await?;
            report::print_runs(&runs);
            if failures > 0 {
                for run in runs.iter().filter(|r| r.counts.failed > 0) {
                    let rows = engine.metadata().failures(&run.id, 0, failures).await?;
                    report::print_failures(run, &rows);
                }
            }
            engine.close().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Schedules { next, config } => {
            let engine = open(&config.config).await?;
            let now = chrono::Utc::now();
            let mut table = comfy_table::Table::new();
            table.load_style(comfy_table::presets::UTF8_FULL_CONDENSED);
            table.set_header(["mapping", "schedule", "enabled", "last run", "next runs (UTC)"]);
            for (name, mapping) in &engine.project().config.mappings {
                let schedule = engine.project().schedule_of(name);
                let last = engine
                    .metadata()
                    .runs(Some(name), 1)
                    .await?
                    .first()
                    .map(|r| r.started_at);
                let upcoming: Vec<String> = if mapping.enabled {
                    schedule
                        .upcoming(now, last, next)
                        .iter()
                        .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
                        .collect()
                } else {
                    Vec::new()
                };
                table.add_row([
                    name.clone(),
                    schedule.to_string(),
                    if mapping.enabled { "yes" } else { "no" }.to_string(),
                    last.map_or("never".into(), |t| t.format("%Y-%m-%d %H:%M").to_string()),
                    if upcoming.is_empty() {
                        "-".into()
                    } else {
                        upcoming.join(", ")
                    },
                ]);
            }
            println!("{table}");
            engine.close().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Quickstart { dir, rows } => quickstart::run(&dir, rows).await,
        Command::Query {
            sql,
            format,
            max_rows,
            config,
        } => {
            let engine = open(&config.config).await?;
            let limits = sluice_engine::query::QueryLimits {
                max_rows,
                ..Default::default()
            };
            let result = print_query(&engine, &sql, format, limits).await;
            engine.close().await;
            result?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve {
            listen,
            no_schedules,
            config,
        } => {
            let engine = open(&config.config).await?;
            let shutdown = engine.shutdown().clone();
            let observer: Arc<dyn sluice_engine::RunObserver> = Arc::new(progress::LogProgress);
            let service = sluice_engine::service::Service::new(engine, Arc::new(Connectors), observer)?;
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            eprintln!("sluice API listening on http://{}", listener.local_addr()?);
            stop_on_signals(shutdown.clone());
            let scheduler = (!no_schedules).then(|| tokio::spawn(service.clone().run_schedules()));
            let stopped = async move { shutdown.requested().await };
            sluice_api::serve(listener, service.clone(), stopped).await?;
            if let Some(scheduler) = scheduler {
                scheduler.await.context("the scheduler stopped unexpectedly")??;
            }
            service.wait_for_runs().await;
            service.engine().close().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Token { action } => token(action).await,
        Command::Secrets { action } => secrets(action).await,
        Command::Dbt {
            action: DbtAction::Exposures { output, config },
        } => {
            let project = Project::load(&config.config)?;
            // An object-store manifest is read as the engine reads it.
            let project = if project.dbt_pending() {
                let engine = Engine::open(project, &Connectors).await?;
                let project = engine.project().clone();
                engine.close().await;
                project
            } else {
                project
            };
            if project.config.dbt.as_ref().is_none_or(|d| d.manifest.is_none()) {
                anyhow::bail!(
                    "{} names no dbt manifest: add `dbt: {{manifest: path/to/target/manifest.json}}`",
                    config.config.display()
                );
            }
            let mappings: Vec<_> = project
                .config
                .mappings
                .iter()
                .filter_map(|(name, mapping)| {
                    let models = project.dbt_sources_of(&mapping.model);
                    (!models.is_empty()).then(|| {
                        let description = format!(
                            "sluice sends the rows of model `{}` to destination `{}`{}.",
                            mapping.model,
                            mapping.destination,
                            project
                                .config
                                .destinations
                                .get(&mapping.destination)
                                .map(|d| format!(" ({})", d.kind))
                                .unwrap_or_default()
                        );
                        (name.clone(), mapping.destination.clone(), description, models)
                    })
                })
                .collect();
            let yaml = sluice_engine::dbt::exposures_yaml(project.dbt_project_name(), &mappings);
            match output {
                Some(path) => {
                    std::fs::write(&path, &yaml)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    eprintln!("{} exposure(s) written to {}", mappings.len(), path.display());
                }
                None => print!("{yaml}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Retire { models, config } => {
            let engine = open(&config.config).await?;
            let models: Vec<String> = if models.is_empty() {
                engine.project().config.models.keys().cloned().collect()
            } else {
                models
            };
            for model in models {
                let report = engine.retire_snapshots(&model).await?;
                println!(
                    "model {model}: {} snapshot(s) kept ({} only because a mapping still needs them), {} retired, {} orphaned file(s) removed, {} unfinished upload(s) aborted",
                    report.kept,
                    report.protected.len(),
                    report.retired.len(),
                    report.orphan_files_removed,
                    report.uploads_aborted
                );
            }
            engine.close().await;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// On SIGTERM or Ctrl-C, runs stop at their next commit point (the batch in flight finishes
/// and is checkpointed); a second signal exits at once.
fn stop_on_signals(shutdown: sluice_engine::Shutdown) {
    tokio::spawn(async move {
        let mut signals = 0;
        loop {
            termination_signal().await;
            signals += 1;
            if signals > 1 {
                eprintln!("stopping now");
                std::process::exit(130);
            }
            eprintln!(
                "stopping: runs finish the batch in flight and end interrupted; the next run goes on from there (signal again to stop at once)"
            );
            shutdown.request();
        }
    });
}

/// SIGTERM or SIGINT (Ctrl-C).
async fn termination_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Streams a query's rows to stdout as a table, CSV or JSON lines.
async fn print_query(
    engine: &Engine,
    sql: &str,
    format: QueryFormat,
    limits: sluice_engine::query::QueryLimits,
) -> Result<()> {
    use futures::TryStreamExt;
    use sluice_engine::arrow;

    let mut stream = engine.query(sql, limits, "cli").await?;
    let stdout = std::io::stdout();
    let mut rows = 0usize;
    match format {
        QueryFormat::Table => {
            let batches: Vec<arrow::array::RecordBatch> = stream.try_collect().await?;
            rows = batches.iter().map(|b| b.num_rows()).sum();
            println!("{}", arrow::util::pretty::pretty_format_batches(&batches)?);
            println!("{rows} row(s)");
        }
        QueryFormat::Csv => {
            let mut writer = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(stdout.lock());
            while let Some(batch) = stream.try_next().await? {
                rows += batch.num_rows();
                writer.write(&batch)?;
            }
        }
        QueryFormat::Json => {
            let mut writer = arrow::json::LineDelimitedWriter::new(stdout.lock());
            while let Some(batch) = stream.try_next().await? {
                rows += batch.num_rows();
                writer.write(&batch)?;
            }
            writer.finish()?;
        }
    }
    if rows >= limits.max_rows {
        eprintln!(
            "(stopped at --max-rows {}; raise it to see more)",
            limits.max_rows
        );
    }
    Ok(())
}

/// Writes every failed record of a run as CSV (as the API's `Accept: text/csv` does); returns
/// how many.
async fn write_failures_csv(engine: &Engine, run_id: &str, path: &Path) -> Result<u64> {
    use std::io::Write as _;
    let file = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    let mut offset = 0u64;
    loop {
        let page = engine.metadata().failures(run_id, offset, 10_000).await?;
        if page.is_empty() && offset > 0 {
            break;
        }
        out.write_all(&sluice_engine::metadata::failures_csv(&page, offset == 0))?;
        if page.is_empty() {
            break;
        }
        offset += page.len() as u64;
    }
    out.flush()?;
    Ok(offset)
}

/// Writes what the mappings would send, and a summary per mapping on stderr.
async fn dry_run(
    engine: &Engine,
    mappings: Vec<String>,
    full: bool,
    filter: Option<&str>,
    output: Option<&Path>,
) -> Result<ExitCode> {
    let names: Vec<String> = if mappings.is_empty() {
        engine.project().config.mappings.keys().cloned().collect()
    } else {
        mappings
    };
    let out: Box<dyn std::io::Write + Send> = match output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
        )),
        None => Box::new(std::io::stdout()),
    };
    let sink = sluice_engine::DryRunSink::new(out);
    let observer = progress::TerminalProgress::new();
    let mut summaries = Vec::new();
    for name in &names {
        let before = sink.requests();
        let run = engine.dry_run(name, full, filter, &sink, &observer).await?;
        summaries.push((name.clone(), run, sink.requests() - before));
    }
    observer.finish();
    for (name, run, requests) in summaries {
        eprintln!(
            "dry run {name}: {} extracted, {} added, {} updated, {} deleted; would send {} record(s) in {requests} request(s), {} would fail unsent; nothing was sent or committed",
            run.counts.extracted,
            run.counts.added,
            run.counts.updated,
            run.counts.deleted,
            run.counts.delivered,
            run.counts.failed
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs mappings with progress on the terminal and prints their load results.
pub async fn run(engine: &Engine, request: RunRequest) -> Result<Vec<sluice_engine::metadata::RunRecord>> {
    let observer = progress::TerminalProgress::new();
    let runs = engine.run(&request, &observer).await?;
    observer.finish();
    report::print_runs(&runs);
    Ok(runs)
}

async fn secrets(action: SecretsAction) -> Result<ExitCode> {
    use sluice_engine::secrets::{KEY_ENV, PREVIOUS_KEYS_ENV, SecretKey};
    match action {
        SecretsAction::NewKey => {
            println!("{}", SecretKey::generate()?);
            eprintln!(
                "a new key; to rotate to it, see `sluice secrets rotate-key --help` (the earlier key goes in {PREVIOUS_KEYS_ENV} until the rotation is done)"
            );
        }
        SecretsAction::RotateKey { config } => {
            let Some(key) = SecretKey::from_env()? else {
                anyhow::bail!(
                    "{KEY_ENV} is not set: set it to the new key (`sluice secrets new-key` makes one) and {PREVIOUS_KEYS_ENV} to the earlier one"
                );
            };
            let engine = open(&config.config).await?;
            let report = engine.metadata().reseal_secrets(&key).await;
            engine.close().await;
            let report = report?;
            println!(
                "{} secret(s) in {} definition(s) sealed again under key {}; {} definition(s) were under it already",
                report.secrets,
                report.definitions,
                key.id(),
                report.current
            );
            if !report.changed_meanwhile.is_empty() {
                println!(
                    "changed while this ran (run it again to be sure): {}",
                    report.changed_meanwhile.join(", ")
                );
                return Ok(ExitCode::FAILURE);
            }
            eprintln!(
                "every stored secret is under key {}; {PREVIOUS_KEYS_ENV} can be removed once every sluice process runs with the new {KEY_ENV}",
                key.id()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn token(action: TokenAction) -> Result<ExitCode> {
    use sluice_engine::tokens::Scope;
    match action {
        TokenAction::Create { name, scope, config } => {
            let engine = open(&config.config).await?;
            let scope = Scope::parse(&scope).context("--scope is read or admin")?;
            let created = engine.metadata().create_token(&name, scope).await;
            engine.close().await;
            println!("{}", created?);
            eprintln!(
                "token `{name}` ({scope}) created; it is shown only now. Send it as `Authorization: Bearer <token>`."
            );
        }
        TokenAction::List { config } => {
            let engine = open(&config.config).await?;
            let tokens = engine.metadata().tokens().await;
            engine.close().await;
            let mut table = comfy_table::Table::new();
            table.load_style(comfy_table::presets::UTF8_FULL_CONDENSED);
            table.set_header(["name", "scope", "created (UTC)", "from"]);
            for t in tokens? {
                table.add_row([
                    t.name,
                    t.scope.to_string(),
                    t.created_at.format("%Y-%m-%d %H:%M").to_string(),
                    "sluice token create".to_string(),
                ]);
            }
            for t in &engine.project().config.api.tokens {
                table.add_row([
                    t.name.clone(),
                    t.scope.to_string(),
                    "-".to_string(),
                    format!("api.tokens in {} ({})", engine.project().path.display(), t.token),
                ]);
            }
            println!("{table}");
        }
        TokenAction::Revoke { name, config } => {
            let engine = open(&config.config).await?;
            let revoked = engine.metadata().revoke_token(&name).await;
            engine.close().await;
            if !revoked? {
                anyhow::bail!(
                    "no token named `{name}` was made with `sluice token create` (`sluice token list` shows them)"
                );
            }
            eprintln!("token `{name}` revoked");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn exit_code(runs: &[sluice_engine::metadata::RunRecord]) -> ExitCode {
    if runs.iter().any(|r| {
        matches!(
            r.status,
            RunStatus::Failed | RunStatus::Interrupted | RunStatus::Cancelled
        )
    }) {
        ExitCode::FAILURE
    } else if runs.iter().any(|r| r.status == RunStatus::Partial) {
        // Committed, but some records failed and wait for the next run.
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}

async fn check(config: &Path, names: &[String]) -> Result<ExitCode> {
    let engine = open(config).await?;
    let project = engine.project();
    let wanted = |name: &String| names.is_empty() || names.contains(name);
    for name in names {
        if !project.config.sources.contains_key(name)
            && !project.config.destinations.contains_key(name)
            && !project.config.models.contains_key(name)
            && !project.config.mappings.contains_key(name)
        {
            anyhow::bail!(
                "`{name}` is not a source, model, destination or mapping in {}",
                config.display()
            );
        }
    }
    let mut failed = false;
    for problem in engine.problems().iter().filter(|p| wanted(&p.name)) {
        failed = true;
        println!(
            "FAILED  {} {} (made through the API): {}",
            problem.kind, problem.name, problem.message
        );
    }
    for name in project.config.sources.keys().filter(|n| wanted(n)) {
        match engine.source(name)?.check().await {
            Ok(()) => println!("ok      source {name}"),
            Err(e) => {
                failed = true;
                println!("FAILED  source {name}: {e}");
            }
        }
    }
    // A model is checked when named, or with its source, or when nothing is named.
    let models: Vec<&String> = project
        .config
        .models
        .iter()
        .filter(|(name, model)| wanted(name) || (!names.is_empty() && names.contains(&model.source)))
        .map(|(name, _)| name)
        .collect();
    for name in models {
        match engine.check_model(name).await {
            Ok(()) => println!("ok      model {name}"),
            Err(e) => {
                failed = true;
                println!("FAILED  model {name}: {e}");
            }
        }
    }
    // A mapping is checked when named, or with its model or destination, or when nothing is.
    let mappings: Vec<&String> = project
        .config
        .mappings
        .iter()
        .filter(|(name, m)| {
            wanted(name)
                || (!names.is_empty() && (names.contains(&m.model) || names.contains(&m.destination)))
        })
        .map(|(name, _)| name)
        .collect();
    for name in mappings {
        match engine.check_mapping(name).await {
            Ok(()) => println!("ok      mapping {name}"),
            Err(e) => {
                failed = true;
                println!("FAILED  mapping {name}: {e}");
            }
        }
    }
    for name in project.config.destinations.keys().filter(|n| wanted(n)) {
        match engine.destination(name)?.check().await {
            Ok(()) => println!("ok      destination {name}"),
            Err(e) => {
                failed = true;
                println!("FAILED  destination {name}: {e}");
            }
        }
    }
    engine.close().await;
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
