//! Metrics in the Prometheus (OpenMetrics) text format, served at `/metrics` by `sluice serve`.
//!
//! One process-wide registry: runs by status, records by outcome and destination, run
//! durations, destination requests by status code with their latency, retries and rate-limit
//! waits. Labels are mapping, destination and vendor names, never record values, so their
//! number stays bounded by the project's size.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::metadata::RunRecord;

type Labels = Vec<(&'static str, String)>;

struct Metrics {
    registry: Registry,
    runs: Family<Labels, Counter>,
    records: Family<Labels, Counter>,
    run_seconds: Family<Labels, Histogram>,
    requests: Family<Labels, Counter>,
    request_seconds: Family<Labels, Histogram>,
    retries: Family<Labels, Counter>,
    rate_limit_waits: Family<Labels, Counter>,
}

fn run_histogram() -> Histogram {
    // 0.1 s to ~7 h.
    Histogram::new(exponential_buckets(0.1, 3.0, 11))
}

fn request_histogram() -> Histogram {
    // 5 ms to ~80 s.
    Histogram::new(exponential_buckets(0.005, 2.5, 11))
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut registry = Registry::with_prefix("sluice");
    let runs = Family::<Labels, Counter>::default();
    registry.register("runs", "Runs by mapping and final status", runs.clone());
    let records = Family::<Labels, Counter>::default();
    registry.register(
        "records",
        "Records by mapping, destination and outcome (sent, delivered, failed, retried)",
        records.clone(),
    );
    let run_seconds = Family::<Labels, Histogram>::new_with_constructor(run_histogram as fn() -> Histogram);
    registry.register(
        "run_duration_seconds",
        "Wall-clock duration of runs",
        run_seconds.clone(),
    );
    let requests = Family::<Labels, Counter>::default();
    registry.register(
        "destination_requests",
        "Requests to destinations by vendor and HTTP status (`error` when no answer came)",
        requests.clone(),
    );
    let request_seconds =
        Family::<Labels, Histogram>::new_with_constructor(request_histogram as fn() -> Histogram);
    registry.register(
        "destination_request_duration_seconds",
        "Latency of requests to destinations",
        request_seconds.clone(),
    );
    let retries = Family::<Labels, Counter>::default();
    registry.register(
        "delivery_retries",
        "Requests sent again after a transient failure",
        retries.clone(),
    );
    let rate_limit_waits = Family::<Labels, Counter>::default();
    registry.register(
        "rate_limit_waits",
        "Times a destination's rate limit (429 or Retry-After) made delivery wait",
        rate_limit_waits.clone(),
    );
    Metrics {
        registry,
        runs,
        records,
        run_seconds,
        requests,
        request_seconds,
        retries,
        rate_limit_waits,
    }
});

/// Counts a finished run.
pub fn run_finished(run: &RunRecord) {
    let m = &*METRICS;
    m.runs
        .get_or_create(&vec![
            ("mapping", run.mapping.clone()),
            ("status", run.status.to_string()),
        ])
        .inc();
    let c = run.counts;
    for (outcome, n) in [
        ("sent", c.sent),
        ("delivered", c.delivered),
        ("failed", c.failed),
        ("retried", c.retried),
    ] {
        if n > 0 {
            m.records
                .get_or_create(&vec![
                    ("mapping", run.mapping.clone()),
                    ("destination", run.destination.clone()),
                    ("outcome", outcome.to_string()),
                ])
                .inc_by(n);
        }
    }
    if let Some(duration) = run.duration() {
        m.run_seconds
            .get_or_create(&vec![("mapping", run.mapping.clone())])
            .observe(duration.num_milliseconds().max(0) as f64 / 1000.0);
    }
}

/// Counts one request to a destination: `status` is the HTTP status, `None` when no answer came.
pub fn destination_request(vendor: &str, status: Option<u16>, elapsed: Duration) {
    let m = &*METRICS;
    let status = status.map_or_else(|| "error".to_string(), |s| s.to_string());
    m.requests
        .get_or_create(&vec![("vendor", vendor.to_string()), ("status", status)])
        .inc();
    m.request_seconds
        .get_or_create(&vec![("vendor", vendor.to_string())])
        .observe(elapsed.as_secs_f64());
}

/// Counts the retries and rate-limit waits of a delivered batch.
pub fn delivery_waits(destination: &str, retries: u64, rate_limited: u64) {
    let m = &*METRICS;
    let labels = vec![("destination", destination.to_string())];
    if retries > 0 {
        m.retries.get_or_create(&labels).inc_by(retries);
    }
    if rate_limited > 0 {
        m.rate_limit_waits.get_or_create(&labels).inc_by(rate_limited);
    }
}

/// Content type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Every metric in the OpenMetrics text format.
pub fn encode() -> String {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &METRICS.registry).is_err() {
        out.clear();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::RunStatus;

    #[test]
    fn runs_and_requests_are_counted() {
        let mut run = RunRecord::starting("metrics_test_mapping", "users", "crm", false);
        run.status = RunStatus::Partial;
        run.counts.sent = 10;
        run.counts.delivered = 8;
        run.counts.failed = 2;
        run.finished_at = Some(run.started_at + chrono::Duration::seconds(3));
        run_finished(&run);
        destination_request("HubSpot", Some(429), Duration::from_millis(40));
        destination_request("HubSpot", None, Duration::from_millis(40));
        delivery_waits("crm", 2, 1);
        let text = encode();
        assert!(
            text.contains(r#"sluice_runs_total{mapping="metrics_test_mapping",status="partial"} 1"#),
            "{text}"
        );
        assert!(text.contains(
            r#"sluice_records_total{mapping="metrics_test_mapping",destination="crm",outcome="failed"} 2"#
        ));
        assert!(text.contains(r#"sluice_destination_requests_total{vendor="HubSpot",status="429"}"#));
        assert!(text.contains(r#"sluice_destination_requests_total{vendor="HubSpot",status="error"}"#));
        assert!(text.contains("sluice_run_duration_seconds_bucket"));
        assert!(text.contains(r#"sluice_rate_limit_waits_total{destination="crm"}"#));
        assert!(text.ends_with("# EOF\n"));
    }
}
