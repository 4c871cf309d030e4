//! Alerts: a mapping may name webhook URLs (Slack-compatible: the body has a `text` field) to
//! notify when a run fails, when too large a share of its records fail, or when a model's
//! extracted row count moves sharply away from its recent runs (a broken upstream table is
//! better caught before it empties a CRM).
//!
//! ```yaml
//! alerts:
//!   urls: [https://hooks.slack.com/services/...]
//!   on_failure: true          # failed or interrupted runs (default true)
//!   failed_ratio: 0.05        # more than 5% of the records sent failed
//!   extracted_change: 0.5     # extracted rows differ by more than 50% from the median of the last 5 runs
//! ```
//!
//! An alert never fails a run: posting is bounded in time and its errors are logged.

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;

use crate::metadata::{RunRecord, RunStatus};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AlertConfig {
    /// Webhook URLs to POST alerts to.
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<String>))]
    pub urls: Vec<crate::config::ConfigString>,
    #[serde(default = "yes")]
    pub on_failure: bool,
    /// Alert when failed / (sent + unsendable) exceeds this share (0 to 1).
    #[serde(default)]
    pub failed_ratio: Option<f64>,
    /// Alert when extracted rows differ from the median of the last five runs by more than
    /// this share of it.
    #[serde(default)]
    pub extracted_change: Option<f64>,
}

fn yes() -> bool {
    true
}

/// Why an alert fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertKind {
    RunFailed,
    FailedRatio,
    ExtractedChange,
}

impl AlertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::RunFailed => "run_failed",
            AlertKind::FailedRatio => "failed_ratio",
            AlertKind::ExtractedChange => "extracted_change",
        }
    }
}

/// One alert about one run.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    pub kind: AlertKind,
    pub mapping: String,
    pub run_id: String,
    pub status: RunStatus,
    /// One line a person can read in a chat channel.
    pub text: String,
}

impl Alert {
    /// The JSON body posted: Slack's `text`, plus the fields for other receivers.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "text": self.text,
            "sluice": {
                "alert": self.kind.as_str(),
                "mapping": self.mapping,
                "run_id": self.run_id,
                "status": self.status.as_str(),
            }
        })
    }
}

/// Posts alerts (implemented over HTTP by the connectors).
#[async_trait]
pub trait AlertSender: Send + Sync {
    async fn post(&self, url: &str, body: &serde_json::Value) -> Result<(), String>;
}

/// The alerts a finished run raises. `recent` holds earlier runs of the mapping, newest first.
pub fn evaluate(config: &AlertConfig, run: &RunRecord, recent: &[RunRecord]) -> Vec<Alert> {
    let mut alerts = Vec::new();
    let alert = |kind, text: String| Alert {
        kind,
        mapping: run.mapping.clone(),
        run_id: run.id.clone(),
        status: run.status,
        text,
    };
    if config.on_failure && matches!(run.status, RunStatus::Failed | RunStatus::Interrupted) {
        let mut text = format!(
            "sluice: mapping `{}` run {} {}: {}",
            run.mapping,
            run.id,
            run.status,
            run.error.as_deref().unwrap_or("no error recorded")
        );
        if let Some(action) = &run.recommended_action {
            text.push_str(&format!(" — {action}"));
        }
        alerts.push(alert(AlertKind::RunFailed, text));
    }
    if let Some(threshold) = config.failed_ratio {
        let attempted = run.counts.delivered + run.counts.failed;
        if attempted > 0 {
            let ratio = run.counts.failed as f64 / attempted as f64;
            if ratio > threshold {
                alerts.push(alert(
                    AlertKind::FailedRatio,
                    format!(
                        "sluice: mapping `{}` run {}: {} of {} records failed ({:.1}%, above {:.1}%); `sluice failures {}` lists them",
                        run.mapping,
                        run.id,
                        run.counts.failed,
                        attempted,
                        ratio * 100.0,
                        threshold * 100.0,
                        run.id
                    ),
                ));
            }
        }
    }
    if let Some(threshold) = config.extracted_change
        && run.snapshot_id.is_some()
    {
        let mut previous: Vec<u64> = recent
            .iter()
            .filter(|r| r.id != run.id && r.snapshot_id.is_some())
            .filter(|r| matches!(r.status, RunStatus::Succeeded | RunStatus::Partial))
            .take(5)
            .map(|r| r.counts.extracted)
            .collect();
        if previous.len() >= 3 {
            previous.sort_unstable();
            let median = previous[previous.len() / 2] as f64;
            let now = run.counts.extracted as f64;
            let change = if median == 0.0 {
                if now == 0.0 { 0.0 } else { f64::INFINITY }
            } else {
                (now - median).abs() / median
            };
            if change > threshold {
                alerts.push(alert(
                    AlertKind::ExtractedChange,
                    format!(
                        "sluice: mapping `{}` run {}: the model returned {} rows, against a median of {} over its last {} runs ({:+.0}%); check the model's source tables",
                        run.mapping,
                        run.id,
                        run.counts.extracted,
                        median as u64,
                        previous.len(),
                        (now - median) / median.max(1.0) * 100.0
                    ),
                ));
            }
        }
    }
    alerts
}

/// Posts `alerts` to every URL, each within ten seconds; failures are logged.
pub async fn send(sender: &Arc<dyn AlertSender>, config: &AlertConfig, alerts: &[Alert]) {
    for alert in alerts {
        let body = alert.body();
        for url in &config.urls {
            let posted = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                sender.post(url.expose(), &body),
            )
            .await;
            match posted {
                Ok(Ok(())) => {
                    tracing::info!(mapping = alert.mapping, alert = alert.kind.as_str(), "alert sent")
                }
                Ok(Err(e)) => tracing::warn!(mapping = alert.mapping, error = %e, "could not send an alert"),
                Err(_) => tracing::warn!(mapping = alert.mapping, "sending an alert timed out"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AlertConfig {
        serde_norway::from_str("urls: [http://127.0.0.1:9/hook]\nfailed_ratio: 0.1\nextracted_change: 0.5\n")
            .unwrap()
    }

    fn run(status: RunStatus, extracted: u64, delivered: u64, failed: u64) -> RunRecord {
        let mut run = RunRecord::starting("crm_sync", "users", "crm", false);
        run.status = status;
        run.snapshot_id = Some("s".into());
        run.counts.extracted = extracted;
        run.counts.delivered = delivered;
        run.counts.failed = failed;
        run
    }

    #[test]
    fn failures_ratios_and_row_count_swings_raise_alerts() {
        let c = config();
        assert!(c.on_failure);
        let history: Vec<RunRecord> = (0..5).map(|_| run(RunStatus::Succeeded, 1000, 10, 0)).collect();
        assert!(evaluate(&c, &run(RunStatus::Succeeded, 1100, 10, 0), &history).is_empty());

        let mut failed = run(RunStatus::Failed, 1000, 0, 0);
        failed.error = Some("HTTP 401".into());
        let alerts = evaluate(&c, &failed, &history);
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].kind, AlertKind::RunFailed);
        assert!(alerts[0].text.contains("HTTP 401"));
        assert_eq!(alerts[0].body()["sluice"]["alert"], "run_failed");

        let kinds: Vec<AlertKind> = evaluate(&c, &run(RunStatus::Partial, 100, 80, 20), &history)
            .iter()
            .map(|a| a.kind)
            .collect();
        assert_eq!(kinds, [AlertKind::FailedRatio, AlertKind::ExtractedChange]);

        // Too little history: no judgement on row counts.
        assert!(evaluate(&c, &run(RunStatus::Succeeded, 1, 1, 0), &history[..2]).is_empty());
    }
}
