//! `type: webhook`: HTTP POST of JSON batches to any endpoint.
//!
//! ```yaml
//! destinations:
//!   crm:
//!     type: webhook
//!     url: https://example.com/ingest
//!     headers: { Authorization: "Bearer ${CRM_TOKEN}" }
//!     batch_size: 100        # records per request
//!     timeout: 30s
//!     concurrency: 4         # requests in flight
//!     max_attempts: 5        # per request, on 408, 429, 5xx and network errors
//!     initial_backoff: 500ms # doubled per retry (with jitter) up to max_backoff;
//!     max_backoff: 30s       # a Retry-After header is honoured
//! ```
//!
//! Each request's body is `{"records":[…]}`, each record
//! `{"op":"added|updated|deleted","message_id":"…","key":{…},"data":{…}}`, with headers
//! `X-Sluice-Mapping` and `X-Sluice-Run-Id`. A 2xx answer accepts every record, unless its JSON
//! body lists refused ones: `{"failed":[{"index":3,"error":"invalid email"}]}` (`errors` is
//! accepted for `failed`, `message_id` for `index`, `message` for `error`). 408, 429 and 5xx
//! answers and network errors are retried; any other status refuses the whole request.

use std::collections::HashMap;
use std::ops::Range;
use std::time::Duration;

use async_trait::async_trait;
use indexmap::IndexMap;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER, USER_AGENT};
use schemars::JsonSchema;
use serde::Deserialize;
use sluice_engine::destination::{
    DeliveryPolicy, Destination, DestinationWriter, OutgoingBatch, PreparedRequest, RecordFailure,
    RetryPolicy, RunInfo, SendOutcome,
};
use sluice_engine::{DestinationError, Secret, SecretUrl};

use crate::HumanDuration;
use crate::destinations::http::{describe_reqwest_error_showing, parse_retry_after, snippet};

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Endpoint the JSON batches are POSTed to (http or https).
    pub url: SecretUrl,
    /// Extra headers sent with every request, e.g. `Authorization: Bearer ${TOKEN}`.
    #[serde(default)]
    pub headers: IndexMap<String, Secret>,
    /// Records per request (default 100).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Request body size limit in bytes (approximate).
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
    /// Time allowed for one request (default 30s).
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
    /// Requests in flight at once (default 4).
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Attempts per request, the first included, on 408, 5xx and network errors (default 5).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Wait before the first retry, doubled per retry with jitter (default 500ms).
    #[serde(default = "default_initial_backoff")]
    pub initial_backoff: HumanDuration,
    /// Longest wait between retries (default 30s); a Retry-After header is honoured.
    #[serde(default = "default_max_backoff")]
    pub max_backoff: HumanDuration,
}

fn default_batch_size() -> usize {
    100
}
fn default_max_bytes() -> usize {
    5 * 1024 * 1024
}
fn default_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_concurrency() -> usize {
    4
}
fn default_max_attempts() -> u32 {
    5
}
fn default_initial_backoff() -> HumanDuration {
    HumanDuration(Duration::from_millis(500))
}
fn default_max_backoff() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

pub struct WebhookDestination {
    name: String,
    url: reqwest::Url,
    client: reqwest::Client,
    headers: HeaderMap,
    policy: DeliveryPolicy,
}

impl WebhookDestination {
    /// The address as it may be shown: its scheme and host (the whole URL is a credential).
    fn shown_url(&self) -> String {
        sluice_engine::secrets::url_host_display(self.url.as_str())
    }

    pub fn new(name: &str, config: WebhookConfig) -> Result<Self, String> {
        let url = super::http::parse_url_option("url", config.url.expose())?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("`url` {} must be http or https", config.url));
        }
        if config.batch_size == 0 || config.concurrency == 0 || config.max_attempts == 0 {
            return Err("`batch_size`, `concurrency` and `max_attempts` must be at least 1".into());
        }
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("sluice/", env!("CARGO_PKG_VERSION"))),
        );
        for (name, value) in &config.headers {
            let header = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("header name `{name}` is not valid"))?;
            let mut value = HeaderValue::from_str(value.expose())
                .map_err(|_| format!("the value of header `{name}` ({value}) is not a valid header value"))?;
            value.set_sensitive(true);
            headers.insert(header, value);
        }
        let client = reqwest::Client::builder()
            .timeout(config.timeout.0)
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
        Ok(Self {
            name: name.to_string(),
            url,
            client,
            headers,
            policy: DeliveryPolicy {
                max_records: config.batch_size,
                max_bytes: config.max_bytes,
                concurrency: config.concurrency,
                retry: RetryPolicy {
                    max_attempts: config.max_attempts,
                    initial_backoff: config.initial_backoff.0,
                    max_backoff: config.max_backoff.0,
                    ..RetryPolicy::default()
                },
                ..DeliveryPolicy::default()
            },
        })
    }
}

#[async_trait]
impl Destination for WebhookDestination {
    fn kind(&self) -> &'static str {
        "webhook"
    }

    /// Any HTTP answer means the endpoint is reachable (a webhook may refuse a bare GET).
    async fn check(&self) -> Result<(), DestinationError> {
        self.client
            .get(self.url.clone())
            .headers(self.headers.clone())
            .send()
            .await
            .map(|_| ())
            .map_err(|e| DestinationError::Unreachable {
                destination: self.name.clone(),
                message: describe_reqwest_error_showing(&e, Some(self.shown_url())),
            })
    }

    async fn open(&self, run: &RunInfo) -> Result<Box<dyn DestinationWriter>, DestinationError> {
        let mut headers = self.headers.clone();
        for (name, value) in [
            ("x-sluice-mapping", &run.mapping),
            ("x-sluice-run-id", &run.run_id),
        ] {
            if let Ok(value) = HeaderValue::from_str(value) {
                headers.insert(HeaderName::from_static(name), value);
            }
        }
        Ok(Box::new(WebhookWriter {
            url: self.url.clone(),
            client: self.client.clone(),
            headers,
            policy: self.policy.clone(),
        }))
    }
}

struct WebhookWriter {
    url: reqwest::Url,
    client: reqwest::Client,
    headers: HeaderMap,
    policy: DeliveryPolicy,
}

impl WebhookWriter {
    /// The address as it may be shown: its scheme and host (the whole URL is a credential).
    fn shown_url(&self) -> String {
        sluice_engine::secrets::url_host_display(self.url.as_str())
    }

    fn body(batch: &OutgoingBatch, range: Range<usize>) -> Vec<u8> {
        let mut body = Vec::with_capacity(batch.approximate_bytes(range.clone()) + 16);
        body.extend_from_slice(b"{\"records\":[");
        for (i, record) in batch.records(range).enumerate() {
            if i > 0 {
                body.push(b',');
            }
            record.write_envelope(&mut body);
        }
        body.extend_from_slice(b"]}");
        body
    }
}

#[async_trait]
impl DestinationWriter for WebhookWriter {
    fn policy(&self) -> DeliveryPolicy {
        self.policy.clone()
    }

    async fn prepare(&self, batch: &OutgoingBatch, range: Range<usize>) -> Vec<PreparedRequest> {
        let body = Self::body(batch, range.clone());
        vec![PreparedRequest {
            method: "POST".into(),
            target: self.shown_url(),
            records: range.len(),
            body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        }]
    }

    async fn send(&self, batch: &OutgoingBatch, range: Range<usize>) -> SendOutcome {
        let body = Self::body(batch, range.clone());
        let started = std::time::Instant::now();
        let response = match self
            .client
            .post(self.url.clone())
            .headers(self.headers.clone())
            .body(body)
            .send()
            .await
        {
            Ok(response) => {
                sluice_engine::metrics::destination_request(
                    "webhook",
                    Some(response.status().as_u16()),
                    started.elapsed(),
                );
                response
            }
            Err(e) => {
                sluice_engine::metrics::destination_request("webhook", None, started.elapsed());
                return SendOutcome::Retry {
                    reason: describe_reqwest_error_showing(&e, Some(self.shown_url())),
                    after: None,
                };
            }
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let text = response.text().await.unwrap_or_default();
        if status.is_success() {
            return match per_record_failures(&text, batch, range) {
                Ok(failures) if failures.is_empty() => SendOutcome::Accepted,
                Ok(failures) => SendOutcome::Partial(failures),
                Err(reason) => SendOutcome::Rejected { reason },
            };
        }
        let reason = format!("HTTP {status}{}", snippet(&text));
        if status.as_u16() == 429 {
            SendOutcome::RateLimited {
                reason,
                after: retry_after,
            }
        } else if status.as_u16() == 408 || status.is_server_error() {
            SendOutcome::Retry {
                reason,
                after: retry_after,
            }
        } else {
            SendOutcome::Rejected { reason }
        }
    }

    async fn finish(self: Box<Self>) -> Result<(), DestinationError> {
        Ok(())
    }
}

#[derive(Deserialize)]
struct FailureReport {
    #[serde(alias = "errors")]
    failed: Option<Vec<ReportedFailure>>,
}

#[derive(Deserialize)]
struct ReportedFailure {
    index: Option<usize>,
    message_id: Option<String>,
    #[serde(alias = "message")]
    error: Option<String>,
}

/// Records a 2xx answer reports as refused, by index within `range`. A body that is not a JSON
/// object with `failed`/`errors` accepts everything.
fn per_record_failures(
    text: &str,
    batch: &OutgoingBatch,
    range: Range<usize>,
) -> Result<Vec<RecordFailure>, String> {
    let trimmed = text.trim();
    if !trimmed.starts_with('{') {
        return Ok(Vec::new());
    }
    let Ok(report) = serde_json::from_str::<FailureReport>(trimmed) else {
        return Ok(Vec::new());
    };
    let Some(reported) = report.failed else {
        return Ok(Vec::new());
    };
    let by_id: HashMap<&str, usize> = range
        .clone()
        .enumerate()
        .map(|(i, record)| (batch.message_ids[record].as_str(), i))
        .collect();
    let mut failures = Vec::with_capacity(reported.len());
    for failure in reported {
        let index = match (failure.index, failure.message_id.as_deref()) {
            (Some(index), _) => index,
            (None, Some(id)) => match by_id.get(id) {
                Some(index) => *index,
                None => {
                    tracing::warn!(
                        message_id = id,
                        "the webhook reported a failure for a message id it was not sent"
                    );
                    continue;
                }
            },
            (None, None) => {
                return Err("the webhook's answer lists a failure with neither `index` nor `message_id`; every record of the request is counted as failed".into());
            }
        };
        failures.push(RecordFailure {
            index,
            error: failure.error.unwrap_or_else(|| "refused by the webhook".into()),
        });
    }
    Ok(failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_strict() {
        let bad: Result<WebhookConfig, _> =
            serde_json::from_value(serde_json::json!({"url": "http://x", "batchsize": 3}));
        assert!(bad.unwrap_err().to_string().contains("unknown field `batchsize`"));
        let ok: WebhookConfig =
            serde_json::from_value(serde_json::json!({"url": "http://x", "timeout": "2s"})).unwrap();
        assert_eq!(ok.timeout.0, Duration::from_secs(2));
        assert!(
            WebhookDestination::new(
                "w",
                serde_json::from_value(serde_json::json!({"url": "ftp://x"})).unwrap()
            )
            .is_err()
        );
    }
}
