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
        "seconds",
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
            Cell::new(seconds).set_alignment(CellAlignment::Right),
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
        } else if run.counts.failed > 0 {
            println!(
                "{}: {} record(s) failed and will be sent again by the next run (see `sluice runs {} --failures 20`)",
                run.mapping, run.counts.failed, run.mapping
            );
        }
    }
}

pub fn print_failures(run: &RunRecord, failures: &[FailureRow]) {
    println!("failed records of run {} ({}):", run.id, run.mapping);
    let mut table = Table::new();
    table
        .load_style(UTF8_FULL_CONDENSED)
        .set_header(vec!["key", "operation", "attempts", "error"]);
    for f in failures {
        table.add_row(vec![
            Cell::new(&f.record_key),
            Cell::new(&f.op),
            Cell::new(f.attempts),
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
