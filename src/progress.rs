//! Progress on a terminal while a run goes: a spinner per extraction, a bar per mapping.
//! Nothing is drawn when stderr is not a terminal.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use sluice_engine::{RunEvent, RunObserver};

pub struct TerminalProgress {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
}

impl TerminalProgress {
    pub fn new() -> Self {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(8));
        Self {
            multi,
            bars: Mutex::new(HashMap::new()),
        }
    }

    fn bar(&self, key: &str, make: impl FnOnce() -> ProgressBar) -> Option<ProgressBar> {
        let mut bars = self.bars.lock().ok()?;
        Some(
            bars.entry(key.to_string())
                .or_insert_with(|| self.multi.add(make()))
                .clone(),
        )
    }

    fn take(&self, key: &str) -> Option<ProgressBar> {
        self.bars.lock().ok()?.remove(key)
    }

    pub fn finish(&self) {
        if let Ok(mut bars) = self.bars.lock() {
            for (_, bar) in bars.drain() {
                bar.finish_and_clear();
            }
        }
        let _ = self.multi.clear();
    }
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl RunObserver for TerminalProgress {
    fn on_event(&self, event: RunEvent) {
        match event {
            RunEvent::ExtractStarted { model } => {
                if let Some(bar) = self.bar(&format!("extract:{model}"), || {
                    let bar = ProgressBar::new_spinner();
                    bar.set_style(
                        ProgressStyle::with_template("{spinner} extracting {prefix}: {msg} ({elapsed})")
                            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                    );
                    bar.enable_steady_tick(Duration::from_millis(120));
                    bar
                }) {
                    bar.set_prefix(model);
                    bar.set_message("starting");
                }
            }
            RunEvent::ExtractProgress { model, rows } => {
                if let Some(bar) = self.bar(&format!("extract:{model}"), ProgressBar::new_spinner) {
                    bar.set_message(format!("{} rows", thousands(rows)));
                }
            }
            RunEvent::ExtractFinished { model, rows, .. } => {
                if let Some(bar) = self.take(&format!("extract:{model}")) {
                    bar.finish_and_clear();
                }
                let _ = self
                    .multi
                    .println(format!("extracted {model}: {} rows", thousands(rows)));
            }
            RunEvent::MappingStarted { mapping, buckets, .. } => {
                if let Some(bar) = self.bar(&format!("map:{mapping}"), || {
                    let bar = ProgressBar::new(buckets as u64);
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{prefix} [{bar:30}] {pos}/{len} buckets, {msg} ({elapsed})",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                    );
                    bar
                }) {
                    bar.set_prefix(mapping);
                }
            }
            RunEvent::MappingProgress {
                mapping,
                buckets_done,
                changes,
                delivered,
                failed,
                ..
            } => {
                if let Some(bar) = self.bar(&format!("map:{mapping}"), ProgressBar::new_spinner) {
                    bar.set_position(buckets_done as u64);
                    bar.set_message(format!(
                        "{} changed, {} delivered, {} failed",
                        thousands(changes.total()),
                        thousands(delivered),
                        thousands(failed)
                    ));
                }
            }
            RunEvent::MappingFinished { run } => {
                if let Some(bar) = self.take(&format!("map:{}", run.mapping)) {
                    bar.finish_and_clear();
                }
            }
        }
    }
}

/// Progress as log lines, for `sluice serve` (no terminal to draw on).
pub struct LogProgress;

impl RunObserver for LogProgress {
    fn on_event(&self, event: RunEvent) {
        match event {
            RunEvent::ExtractFinished {
                model,
                rows,
                snapshot_id,
            } => tracing::info!(model, rows, snapshot = snapshot_id, "extracted"),
            RunEvent::MappingFinished { run } => {
                let c = run.counts;
                tracing::info!(
                    run_id = run.id,
                    mapping = run.mapping,
                    trigger = %run.trigger,
                    status = %run.status,
                    extracted = c.extracted,
                    added = c.added,
                    updated = c.updated,
                    deleted = c.deleted,
                    sent = c.sent,
                    delivered = c.delivered,
                    failed = c.failed,
                    retried = c.retried,
                    error = run.error.as_deref().unwrap_or(""),
                    "run finished"
                );
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn thousands_are_grouped() {
        assert_eq!(super::thousands(0), "0");
        assert_eq!(super::thousands(1234567), "1,234,567");
        assert_eq!(super::thousands(100), "100");
    }
}
