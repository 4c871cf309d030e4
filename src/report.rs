//! Load results as tables.

use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{Cell, CellAlignment, Table};
use sluice_engine::metadata::{FailureRow, RunRecord};

pub fn print_runs(runs: &[RunRecord]) {
    if runs.is_empty() {
        println!("no runs");
        return;
    }
    let mut table = Table::new();
    table.load_style(UTF8_FULL_CONDENSED).set_header(vec![
        "mapping",
        "status",
        "extracted",
        "added",
        "updated",
        "deleted",
        "delivered",
        "failed",
        "skipped",
        "retried",
        "trigger",
        "seconds",
        "run",
    ]);
    for run in runs {
        let seconds = run
            .finished_at
            .map(|f| format!("{:.2}", (f - run.started_at).num_milliseconds() as f64 / 1000.0))
            .unwrap_or_else(|| "-".into());
        let number = |n: u64| Cell::new(n).set_alignment(CellAlignment::Right);
        table.add_row(vec![
            Cell::new(&run.mapping),
            Cell::new(run.status),
            number(run.counts.extracted),
            number(run.counts.added),
            number(run.counts.updated),
            number(run.counts.deleted),
            number(run.counts.delivered),
            number(run.counts.failed),
            number(run.counts.skipped),
            number(run.counts.retried),
            Cell::new(run.trigger),
            Cell::new(seconds).set_alignment(CellAlignment::Right),
            Cell::new(short_id(&run.id)),
        ]);
    }
    println!("{table}");
    for run in runs {
        if let Some(change) = &run.schema_change {
            println!(
                "{}: the model's columns changed since the last sync: {change}",
                run.mapping
            );
        }
        if let Some(error) = &run.error {
            println!("{} ({}): {error}", run.mapping, run.status);
        }
        if let Some(action) = &run.recommended_action {
            println!("{}: {action}", run.mapping);
        }
    }
}

/// Run ids are UUIDv7s; their tail tells runs apart (`sluice runs show` takes the tail too).
fn short_id(id: &str) -> &str {
    id.get(id.len().saturating_sub(12)..).unwrap_or(id)
}

/// One run in full, with its first failed records.
pub fn print_run(run: &RunRecord, failures: &[FailureRow]) {
    let time = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M:%S%.3f UTC").to_string();
    let mut table = Table::new();
    table.load_style(UTF8_FULL_CONDENSED);
    let mut row = |name: &str, value: String| {
        table.add_row(vec![Cell::new(name), Cell::new(value)]);
    };
    row("run", run.id.clone());
    row("mapping", run.mapping.clone());
    row("model", run.model.clone());
    row("destination", run.destination.clone());
    row("trigger", run.trigger.to_string());
    row("status", run.status.to_string());
    row("started", time(run.started_at));
    row("finished", run.finished_at.map_or("-".into(), time));
    row(
        "duration",
        run.duration().map_or("-".into(), |d| {
            format!("{:.3} s", d.num_milliseconds() as f64 / 1000.0)
        }),
    );
    row("snapshot", run.snapshot_id.clone().unwrap_or_else(|| "-".into()));
    row(
        "baseline",
        run.baseline_snapshot_id
            .clone()
            .unwrap_or_else(|| "- (every row sent as added)".into()),
    );
    let c = run.counts;
    row("extracted", c.extracted.to_string());
    row(
        "changes",
        format!("{} added, {} updated, {} deleted", c.added, c.updated, c.deleted),
    );
    row(
        "records",
        format!(
            "{} sent, {} delivered, {} failed, {} retried from earlier runs, {} not selected by `send`",
            c.sent, c.delivered, c.failed, c.retried, c.skipped
        ),
    );
    let t = run.timings;
    row(
        "stages",
        format!(
            "extract {} ms, diff {} ms, read rows {} ms, render {} ms, deliver {} ms, checkpoints {} ms",
            t.extract_ms, t.diff_ms, t.read_ms, t.render_ms, t.deliver_ms, t.checkpoint_ms
        ),
    );
    if let Some(change) = &run.schema_change {
        row("schema change", change.clone());
    }
    if let Some(error) = &run.error {
        row("error", error.clone());
    }
    if let Some(action) = &run.recommended_action {
        row("recommended action", action.clone());
    }
    println!("{table}");
    if !failures.is_empty() {
        print_failures(run, failures);
        if (failures.len() as u64) < run.counts.failed {
            println!(
                "(first {} of {}; `sluice failures {} --csv FILE` writes them all)",
                failures.len(),
                run.counts.failed,
                run.id
            );
        }
    }
}

pub fn print_failures(run: &RunRecord, failures: &[FailureRow]) {
    println!("failed records of run {} ({}):", run.id, run.mapping);
    let mut table = Table::new();
    table.load_style(UTF8_FULL_CONDENSED).set_header(vec![
        "key",
        "operation",
        "attempts",
        "first failed",
        "error",
    ]);
    for f in failures {
        table.add_row(vec![
            Cell::new(&f.record_key),
            Cell::new(&f.op),
            Cell::new(f.attempts),
            Cell::new(f.first_failed_at.format("%Y-%m-%d %H:%M:%S")),
            Cell::new(&f.error),
        ]);
    }
    println!("{table}");
}

/// A model's column types, then its first rows.
pub fn print_preview(preview: &sluice_engine::Preview) -> anyhow::Result<()> {
    let mut types = Table::new();
    types.load_style(UTF8_FULL_CONDENSED);
    types.set_header(vec!["column", "type"]);
    for field in preview.schema.fields() {
        types.add_row(vec![field.name().clone(), field.data_type().to_string()]);
    }
    println!("{types}");
    let rows: usize = preview.batches.iter().map(|b| b.num_rows()).sum();
    if rows == 0 {
        println!("(the query returned no rows)");
    } else {
        println!(
            "{}",
            sluice_engine::arrow::util::pretty::pretty_format_batches(&preview.batches)?
        );
        println!("{rows} row(s)");
    }
    Ok(())
}
