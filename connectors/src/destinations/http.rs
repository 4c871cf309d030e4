//! What every HTTP destination shares: delivery settings (`delivery:` in a destination's
//! config), a client with a timeout, gzip request bodies, and the default reading of an HTTP
//! status into a [`SendOutcome`]. A vendor adapter implements [`VendorApi`]: how records become
//! one request, and how the vendor's answer becomes per-record results. [`HttpWriter`] does the
//! rest, the same way for every vendor.

use std::io::Write as _;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::{CONTENT_ENCODING, CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER, USER_AGENT};
use reqwest::{Method, StatusCode};
use schemars::JsonSchema;
use serde::Deserialize;
use sluice_engine::DestinationError;
use sluice_engine::destination::{
    DeliveryPolicy, DestinationWriter, OutgoingBatch, PreparedRequest, RateLimit, RetryPolicy, SendOutcome,
};

use crate::HumanDuration;

/// `delivery:` in a destination's config: how requests are batched, paced and retried. Every
/// setting has the vendor's published limit or a safe value as its default.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeliverySettings {
    /// Records per request (at most the vendor's limit).
    pub batch_size: Option<usize>,
    /// Requests in flight at once.
    pub concurrency: Option<usize>,
    /// Requests per period: `100/10s`, `5/s`, or `off`.
    pub rate_limit: Option<RateSpec>,
    /// Time allowed for one request.
    pub timeout: Option<HumanDuration>,
    /// Attempts per request on errors that may pass (5xx, timeouts); waiting out a rate limit
    /// is not an attempt.
    pub max_attempts: Option<u32>,
    /// Wait before the first retry, doubled per retry with jitter (default 500ms).
    pub initial_backoff: Option<HumanDuration>,
    /// Longest wait between retries (default 30s).
    pub max_backoff: Option<HumanDuration>,
    /// Compress request bodies, where the vendor accepts it.
    pub gzip: Option<bool>,
}

/// A rate limit as written: `100/10s`, `5/s`, `3000/3s`, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateSpec {
    Off,
    Limit(u32, Duration),
}

impl JsonSchema for RateSpec {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> std::borrow::Cow<'static, str> {
        "RateSpec".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "examples": ["100/10s", "5/s", "off"],
        })
    }
}

impl<'de> Deserialize<'de> for RateSpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        RateSpec::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl RateSpec {
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text == "off" || text == "none" {
            return Ok(RateSpec::Off);
        }
        let bad = || {
            format!(
                "`{text}` is not a rate limit; write requests per period, like `100/10s` or `5/s`, or `off`"
            )
        };
        let (count, period) = text.split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        let period = period.trim();
        let period = if period.chars().next().is_some_and(|c| c.is_ascii_digit()) {
            humantime::parse_duration(period).map_err(|_| bad())?
        } else {
            humantime::parse_duration(&format!("1{period}")).map_err(|_| bad())?
        };
        if count == 0 || period.is_zero() {
            return Err(bad());
        }
        Ok(RateSpec::Limit(count, period))
    }
}

/// A vendor's limits and defaults, which `delivery:` may tighten (or, for pacing, change).
#[derive(Debug, Clone)]
pub struct VendorLimits {
    pub max_records: usize,
    /// Lower record limits of some actions' endpoints (deletes).
    pub per_action: Vec<(sluice_engine::destination::RecordAction, usize)>,
    pub max_bytes: usize,
    pub max_record_bytes: Option<usize>,
    pub concurrency: usize,
    pub rate: Option<(u32, Duration)>,
    pub gzip: bool,
}

impl VendorLimits {
    /// `max_records` and `max_bytes` a request, four requests in flight, no pacing, no gzip:
    /// what most vendors take; a vendor that needs more sets those fields on it.
    pub fn per_request(max_records: usize, max_bytes: usize) -> Self {
        Self {
            max_records,
            per_action: Vec::new(),
            max_bytes,
            max_record_bytes: None,
            concurrency: 4,
            rate: None,
            gzip: false,
        }
    }
}

/// A destination's resolved delivery: its policy (with a rate limiter shared by every run of
/// the destination in this process), its HTTP client and whether bodies are gzipped.
#[derive(Clone)]
pub struct HttpDelivery {
    pub policy: DeliveryPolicy,
    pub client: reqwest::Client,
    pub gzip: bool,
}

impl HttpDelivery {
    pub fn new(settings: &DeliverySettings, vendor: VendorLimits) -> Result<Self, String> {
        let batch_size = settings.batch_size.unwrap_or(vendor.max_records);
        if batch_size == 0 || batch_size > vendor.max_records {
            return Err(format!(
                "`delivery.batch_size` must be between 1 and {} (the vendor's limit per request)",
                vendor.max_records
            ));
        }
        let concurrency = settings.concurrency.unwrap_or(vendor.concurrency);
        let max_attempts = settings.max_attempts.unwrap_or(5);
        if concurrency == 0 || max_attempts == 0 {
            return Err("`delivery.concurrency` and `delivery.max_attempts` must be at least 1".into());
        }
        let rate_limit = match settings.rate_limit {
            Some(RateSpec::Off) => None,
            Some(RateSpec::Limit(n, per)) => RateLimit::new(n, per),
            None => vendor.rate.and_then(|(n, per)| RateLimit::new(n, per)),
        };
        let defaults = RetryPolicy::default();
        let client = reqwest::Client::builder()
            .timeout(settings.timeout.map_or(Duration::from_secs(30), |t| t.0))
            .connect_timeout(Duration::from_secs(10))
            .default_headers({
                let mut headers = HeaderMap::new();
                headers.insert(
                    USER_AGENT,
                    HeaderValue::from_static(concat!("sluice/", env!("CARGO_PKG_VERSION"))),
                );
                headers
            })
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
        Ok(Self {
            policy: DeliveryPolicy {
                max_records: batch_size,
                max_records_by_action: vendor.per_action,
                max_bytes: vendor.max_bytes,
                max_record_bytes: vendor.max_record_bytes,
                concurrency,
                retry: RetryPolicy {
                    max_attempts,
                    initial_backoff: settings.initial_backoff.map_or(defaults.initial_backoff, |d| d.0),
                    max_backoff: settings.max_backoff.map_or(defaults.max_backoff, |d| d.0),
                    max_rate_limited_wait: defaults.max_rate_limited_wait,
                },
                rate_limit,
            },
            client,
            gzip: settings.gzip.unwrap_or(vendor.gzip),
        })
    }
}

/// One request to a vendor, built from records.
#[derive(Debug, Clone)]
pub struct ApiRequest {
    pub method: Method,
    pub url: reqwest::Url,
    /// Headers besides content type and encoding (auth is added by the vendor here; values are
    /// marked sensitive and never shown).
    pub headers: HeaderMap,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl ApiRequest {
    pub fn json(method: Method, url: reqwest::Url, headers: HeaderMap, body: Vec<u8>) -> Self {
        Self {
            method,
            url,
            headers,
            content_type: "application/json",
            body,
        }
    }
}

/// A vendor's answer.
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl HttpAnswer {
    /// `Retry-After` as seconds or an HTTP date.
    pub fn retry_after(&self) -> Option<Duration> {
        self.headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after)
    }

    /// `HTTP 400 Bad Request: <the start of the body>`.
    pub fn describe(&self) -> String {
        format!("HTTP {}{}", self.status, snippet(&self.body))
    }
}

/// How a vendor's API turns records into a request and its answer into results.
#[async_trait]
pub trait VendorApi: Send + Sync + 'static {
    /// The vendor's name, for messages (`HubSpot`).
    fn vendor(&self) -> &'static str;

    /// Gets what requests need before they are built (an OAuth token); a failure stops the
    /// run. Not called for dry runs, whose requests are built without credentials.
    async fn authorize(&self) -> Result<(), SendOutcome> {
        Ok(())
    }

    /// The request carrying records `range` of `batch`, which all have the same action.
    /// `Err` fails those records with the reason (nothing is sent).
    async fn request(&self, batch: &OutgoingBatch, range: Range<usize>) -> Result<ApiRequest, String>;

    /// Per-record results of a 2xx answer. The default accepts everything.
    fn on_success(&self, answer: &HttpAnswer, batch: &OutgoingBatch, range: Range<usize>) -> SendOutcome {
        let _ = (answer, batch, range);
        SendOutcome::Accepted
    }

    /// The outcome of any other answer. The default reads the status (see [`classify`]); a
    /// vendor that reports per-record errors with a 4xx overrides it.
    fn on_error(&self, answer: &HttpAnswer, batch: &OutgoingBatch, range: Range<usize>) -> SendOutcome {
        let _ = (batch, range);
        classify(self.vendor(), answer, self.auth_hint())
    }

    /// What to do when the vendor refuses the credentials.
    fn auth_hint(&self) -> &'static str {
        "check the destination's credentials and their permissions"
    }
}

/// The default reading of a non-2xx status: 401 and 403 stop the run (with what to do), 404
/// too (the object or account does not exist); 429 is a rate limit; 408 and 5xx are retried;
/// 400, 413 and 422 refuse the request's content, so it is split to find the bad records; any
/// other status refuses the records.
pub fn classify(vendor: &str, answer: &HttpAnswer, auth_hint: &str) -> SendOutcome {
    let reason = format!("{} from {vendor}", answer.describe());
    match answer.status.as_u16() {
        401 | 403 => SendOutcome::Fatal {
            reason: format!("{reason}; the credentials were refused: {auth_hint}"),
        },
        404 => SendOutcome::Fatal {
            reason: format!("{reason}; check the destination's URL, region and object names"),
        },
        429 => SendOutcome::RateLimited {
            reason,
            after: answer.retry_after(),
        },
        408 => SendOutcome::Retry {
            reason,
            after: answer.retry_after(),
        },
        400 | 413 | 422 => SendOutcome::Invalid { reason },
        s if s >= 500 => SendOutcome::Retry {
            reason,
            after: answer.retry_after(),
        },
        _ => SendOutcome::Rejected { reason },
    }
}

/// The session writer of every HTTP destination.
pub struct HttpWriter<V: VendorApi> {
    pub api: Arc<V>,
    pub delivery: HttpDelivery,
}

impl<V: VendorApi> HttpWriter<V> {
    pub fn boxed(api: V, delivery: &HttpDelivery) -> Box<dyn DestinationWriter> {
        Box::new(Self {
            api: Arc::new(api),
            delivery: delivery.clone(),
        })
    }

    async fn execute(&self, request: ApiRequest) -> Result<HttpAnswer, SendOutcome> {
        let mut headers = request.headers;
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(request.content_type));
        let body = if self.delivery.gzip {
            headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            gzip(&request.body).map_err(|e| SendOutcome::Rejected {
                reason: format!("cannot gzip the request body: {e}"),
            })?
        } else {
            request.body
        };
        let started = std::time::Instant::now();
        let response = self
            .delivery
            .client
            .request(request.method, request.url)
            .headers(headers)
            .body(body)
            .send()
            .await
            .map_err(|e| {
                sluice_engine::metrics::destination_request(self.api.vendor(), None, started.elapsed());
                SendOutcome::Retry {
                    reason: format!("{}: {}", self.api.vendor(), describe_reqwest_error(&e)),
                    after: None,
                }
            })?;
        let status = response.status();
        sluice_engine::metrics::destination_request(
            self.api.vendor(),
            Some(status.as_u16()),
            started.elapsed(),
        );
        let headers = response.headers().clone();
        let body = response.text().await.map_err(|e| SendOutcome::Retry {
            reason: format!(
                "{}: reading the answer to a request failed: {}",
                self.api.vendor(),
                describe_reqwest_error(&e)
            ),
            after: None,
        })?;
        Ok(HttpAnswer {
            status,
            headers,
            body,
        })
    }
}

#[async_trait]
impl<V: VendorApi> DestinationWriter for HttpWriter<V> {
    fn policy(&self) -> DeliveryPolicy {
        self.delivery.policy.clone()
    }

    async fn prepare(&self, batch: &OutgoingBatch, range: Range<usize>) -> Vec<PreparedRequest> {
        let request = self.api.request(batch, range.clone()).await;
        vec![match request {
            Ok(request) => PreparedRequest {
                method: request.method.to_string(),
                target: redact_url(&request.url),
                records: range.len(),
                body: serde_json::from_slice(&request.body).unwrap_or_else(|_| {
                    serde_json::Value::String(String::from_utf8_lossy(&request.body).into_owned())
                }),
            },
            Err(reason) => PreparedRequest {
                method: "NONE".into(),
                target: String::new(),
                records: range.len(),
                body: serde_json::json!({ "error": reason }),
            },
        }]
    }

    async fn send(&self, batch: &OutgoingBatch, range: Range<usize>) -> SendOutcome {
        if let Err(outcome) = self.api.authorize().await {
            return outcome;
        }
        let request = match self.api.request(batch, range.clone()).await {
            Ok(request) => request,
            Err(reason) => return SendOutcome::Rejected { reason },
        };
        let answer = match self.execute(request).await {
            Ok(answer) => answer,
            Err(outcome) => return outcome,
        };
        if answer.status.is_success() {
            self.api.on_success(&answer, batch, range)
        } else {
            self.api.on_error(&answer, batch, range)
        }
    }

    async fn finish(self: Box<Self>) -> Result<(), DestinationError> {
        Ok(())
    }
}

/// Checks credentials with one request: any 2xx passes; the vendor's refusal is the error.
pub async fn check_request(
    destination: &str,
    vendor: &str,
    client: &reqwest::Client,
    request: reqwest::RequestBuilder,
    auth_hint: &str,
) -> Result<(), DestinationError> {
    let _ = client;
    let response = request.send().await.map_err(|e| DestinationError::Unreachable {
        destination: destination.to_string(),
        message: format!("{vendor}: {}", describe_reqwest_error(&e)),
    })?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let body = response.text().await.unwrap_or_default();
    let message = format!("HTTP {status} from {vendor}{}", snippet(&body));
    Err(DestinationError::Unreachable {
        destination: destination.to_string(),
        message: if matches!(status.as_u16(), 401 | 403) {
            format!("{message}; the credentials were refused: {auth_hint}")
        } else {
            message
        },
    })
}

/// Refuses mapping `options` for a destination type that takes none.
pub fn no_options(kind: &str, options: &serde_json::Map<String, serde_json::Value>) -> Result<(), String> {
    match options.keys().next() {
        Some(key) => Err(format!(
            "the {kind} destination takes no mapping `options` (got `{key}`)"
        )),
        None => Ok(()),
    }
}

/// Parses a connector's URL option (`option` names it in the error). The text is not quoted
/// back: an address can be a credential, and one that does not parse cannot be shown safely.
pub fn parse_url_option(option: &str, text: &str) -> Result<reqwest::Url, String> {
    reqwest::Url::parse(text).map_err(|e| {
        format!("`{option}` is not a valid URL ({e}); give a whole address, as in https://api.example.com")
    })
}

/// A URL without credentials or secret query values, for display.
pub fn redact_url(url: &reqwest::Url) -> String {
    let mut shown = url.clone();
    let _ = shown.set_password(None);
    let _ = shown.set_username("");
    let text = shown.to_string();
    sluice_engine::secrets::hide_url_credentials(&text).unwrap_or(text)
}

pub fn gzip(body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut encoder =
        flate2::write::GzEncoder::new(Vec::with_capacity(body.len() / 4), flate2::Compression::fast());
    encoder.write_all(body)?;
    encoder.finish()
}

/// A header value that is never printed.
pub fn secret_header(value: &str) -> Result<HeaderValue, String> {
    let mut header = HeaderValue::from_str(value)
        .map_err(|_| "a credential holds characters a header cannot carry".to_string())?;
    header.set_sensitive(true);
    Ok(header)
}

/// `Basic base64(user:password)`, sensitive.
pub fn basic_auth(user: &str, password: &str) -> Result<HeaderValue, String> {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    secret_header(&format!("Basic {encoded}"))
}

/// `Retry-After` as seconds or an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    if let Ok(seconds) = value.trim().parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = chrono::DateTime::parse_from_rfc2822(value.trim()).ok()?;
    let wait = date.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(wait.to_std().unwrap_or(Duration::ZERO))
}

pub fn snippet(text: &str) -> String {
    let text = text.trim();
    if text.is_empty() {
        return String::new();
    }
    let cut: String = text.chars().take(300).collect();
    if cut.len() < text.len() {
        format!(": {cut}…")
    } else {
        format!(": {cut}")
    }
}

pub fn describe_reqwest_error(e: &reqwest::Error) -> String {
    describe_reqwest_error_showing(e, e.url().map(redact_url))
}

/// [`describe_reqwest_error`] with the request's URL written as `shown` (a destination whose
/// whole URL is a credential shows its scheme and host only).
pub fn describe_reqwest_error_showing(e: &reqwest::Error, shown: Option<String>) -> String {
    let message = describe_reqwest_error_raw(e);
    match (e.url(), shown) {
        (Some(url), Some(shown)) => message.replace(url.as_str(), &shown),
        _ => message,
    }
}

fn describe_reqwest_error_raw(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    let mut message = format!("{kind}: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        message.push_str(&format!(": {inner}"));
        source = inner.source();
    }
    message
}

/// Appends the JSON array `[a,b,…]` of the records' `part` (bodies, ids) for `range`.
pub fn write_array<'a>(out: &mut Vec<u8>, parts: impl Iterator<Item = &'a [u8]>) {
    out.push(b'[');
    for (i, part) in parts.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(part);
    }
    out.push(b']');
}

/// `{"<key>":[<parts>],"<name>":<value>,…}`: records' bodies as an array under `key`, then the
/// request's other members (`test_event_code`, the event source). `capacity` is the parts'
/// byte count.
pub fn array_envelope<'a>(
    key: &str,
    parts: impl Iterator<Item = &'a [u8]>,
    capacity: usize,
    members: &[(&str, serde_json::Value)],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(capacity + key.len() + 64);
    out.push(b'{');
    write_json_key(&mut out, key);
    write_array(&mut out, parts);
    for (name, value) in members {
        out.push(b',');
        write_json_key(&mut out, name);
        // Serialising a JSON value into memory cannot fail.
        let _ = serde_json::to_writer(&mut out, value);
    }
    out.push(b'}');
    out
}

fn write_json_key(out: &mut Vec<u8>, key: &str) {
    let _ = serde_json::to_writer(&mut *out, key);
    out.push(b':');
}

/// A cached access token the vendor refused: the next request drops it and fetches another,
/// once; refused again before any request is accepted, the credentials themselves are wrong
/// and the run stops. (A token can expire between being fetched and being used.)
#[derive(Debug, Default)]
pub struct TokenRefusals {
    stale: std::sync::atomic::AtomicBool,
    refused: std::sync::atomic::AtomicBool,
}

impl TokenRefusals {
    /// Whether the cached token must be dropped before the next request; asking clears it.
    pub fn take_stale(&self) -> bool {
        self.stale.swap(false, std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the next request drops the cached token.
    pub fn is_stale(&self) -> bool {
        self.stale.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The outcome of a refused token: a retry with a new one, or the run's end with `hint`.
    pub fn refused(&self, reason: String, hint: &str) -> SendOutcome {
        if self.refused.swap(true, std::sync::atomic::Ordering::Relaxed) {
            return SendOutcome::Fatal {
                reason: format!("{reason}; {hint}"),
            };
        }
        self.stale.store(true, std::sync::atomic::Ordering::Relaxed);
        SendOutcome::Retry {
            reason,
            after: Some(Duration::from_millis(50)),
        }
    }

    /// A request was accepted: the token works.
    pub fn accepted(&self) {
        self.refused.store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Appends `{<extra>,<rest of object>}`: `object` with `extra` (`"k":v` pairs, no braces)
/// inserted first. `object` must be a JSON object.
pub fn write_object_with(out: &mut Vec<u8>, extra: &[u8], object: &[u8]) {
    out.push(b'{');
    out.extend_from_slice(extra);
    let inner = &object[1..object.len().saturating_sub(1).max(1)];
    if !inner.is_empty() {
        if !extra.is_empty() {
            out.push(b',');
        }
        out.extend_from_slice(inner);
    }
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limits_parse() {
        assert_eq!(
            RateSpec::parse("100/10s").unwrap(),
            RateSpec::Limit(100, Duration::from_secs(10))
        );
        assert_eq!(
            RateSpec::parse("5/s").unwrap(),
            RateSpec::Limit(5, Duration::from_secs(1))
        );
        assert_eq!(
            RateSpec::parse("3000 / 3s").unwrap(),
            RateSpec::Limit(3000, Duration::from_secs(3))
        );
        assert_eq!(RateSpec::parse("off").unwrap(), RateSpec::Off);
        assert!(RateSpec::parse("fast").is_err());
        assert!(RateSpec::parse("0/s").is_err());
    }

    #[test]
    fn objects_take_extra_fields_first() {
        let mut out = Vec::new();
        write_object_with(&mut out, br#""type":"identify""#, br#"{"userId":"u"}"#);
        assert_eq!(out, br#"{"type":"identify","userId":"u"}"#);
        out.clear();
        write_object_with(&mut out, br#""a":1"#, b"{}");
        assert_eq!(out, br#"{"a":1}"#);
    }

    #[test]
    fn statuses_are_classified() {
        let answer = |status: u16| HttpAnswer {
            status: StatusCode::from_u16(status).unwrap(),
            headers: HeaderMap::new(),
            body: "{}".into(),
        };
        assert!(matches!(
            classify("V", &answer(401), "x"),
            SendOutcome::Fatal { .. }
        ));
        assert!(matches!(
            classify("V", &answer(429), "x"),
            SendOutcome::RateLimited { .. }
        ));
        assert!(matches!(
            classify("V", &answer(503), "x"),
            SendOutcome::Retry { .. }
        ));
        assert!(matches!(
            classify("V", &answer(400), "x"),
            SendOutcome::Invalid { .. }
        ));
        assert!(matches!(
            classify("V", &answer(409), "x"),
            SendOutcome::Rejected { .. }
        ));
    }

    #[test]
    fn retry_after_accepts_seconds_and_dates() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
