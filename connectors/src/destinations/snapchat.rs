//! `type: snapchat`: Snap's Conversions API v3 (`POST /v3/{pixel_id}/events`): each record is
//! one web, app or offline conversion, matched to Snapchatters by hashed customer information.
//!
//! ```yaml
//! destinations:
//!   snapchat:
//!     type: snapchat
//!     access_token: ${SNAP_CAPI_TOKEN}      # Events Manager > the pixel > Conversions API token
//!     pixel_id: 6b8c1bd4-0f60-4bd5-9c44-0d7b9c41e5a1
//! mappings:
//!   purchases_to_snap:
//!     model: purchases
//!     destination: snapchat
//!     fields:
//!       event_time: purchased_at            # sent as Unix seconds
//!       user_data.em: email                 # hashed: never sent raw
//!       value: amount                       # into custom_data
//!       currency: currency
//!     constants: { event_name: PURCHASE, action_source: OFFLINE }
//! ```
//!
//! The request is the one Snap's published OpenAPI document (`Snapchat/business-sdk-v3-java`,
//! `api/openapi.yaml`) describes: up to 1,000 events in `data`, the token as `access_token`.
//! `event_id` is sluice's message id unless mapped, so Snap deduplicates an event sent again.
//! Customer information under `user_data` is normalised and SHA-256 hashed as Snap asks (`em`,
//! `ph` as digits without `+`, `fn`, `ln`, `ge`, `ct`, `st`, `zp`, `country`, `external_id`,
//! `db`) unless mapped with an explicit `as:`, and the fields Snap takes as lists (`em`, `ph`,
//! `fn`, `ln`, `ge`, `ct`, `st`, `zp`, `country`) are sent as one-element lists. Fields outside
//! the event's own go into `custom_data`.
//!
//! Snap refuses a request with `status: INVALID` and the index of the event at fault: that
//! event fails with Snap's messages and the others go again (their `event_id`s let Snap drop
//! any it already kept).

use std::ops::Range;

use async_trait::async_trait;
use reqwest::Method;
use reqwest::header::HeaderMap;
use schemars::JsonSchema;
use serde::Deserialize;
use sluice_engine::destination::{
    ActionSpec, Destination, DestinationWriter, OutgoingBatch, PayloadShape, RecordFailure, RunInfo,
    SendOutcome, ValueFormat,
};
use sluice_engine::{ConfigString, DestinationError, Secret};

use crate::destinations::http::{
    ApiRequest, DeliverySettings, HttpAnswer, HttpDelivery, HttpWriter, VendorApi, VendorLimits,
    array_envelope, snippet,
};

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapchatConfig {
    /// A Conversions API token (Events Manager, or a long-lived token of the pixel's
    /// organisation).
    pub access_token: Secret,
    /// The Snap Pixel ID (web and offline events) or Snap App ID (app events).
    pub pixel_id: ConfigString,
    /// Events Manager's test code: the events show as test events.
    #[serde(default)]
    pub test_event_code: Option<ConfigString>,
    /// The Conversions API's address (default https://tr.snapchat.com).
    #[serde(default)]
    pub url: Option<ConfigString>,
    #[serde(default)]
    pub delivery: DeliverySettings,
}

pub const ACTIONS: &[&str] = &["conversions"];
const AUTH_HINT: &str = "the Conversions API token is invalid or not for this pixel: generate one in Events Manager for the pixel (or app)";

/// The event's own fields (Snap's `CapiEvent`); any other mapped field goes into
/// `custom_data`.
const EVENT_FIELDS: &[&str] = &[
    "event_name",
    "event_time",
    "event_id",
    "action_source",
    "event_source_url",
    "opt_out",
    "data_processing_options",
    "data_processing_options_country",
    "data_processing_options_state",
    "user_data",
    "custom_data",
    "app_data",
    "integration",
];

/// Customer information Snap takes only hashed, and how each is normalised.
const HASHED: &[(&str, Option<ValueFormat>)] = &[
    ("user_data.em", Some(ValueFormat::Sha256Email)),
    ("user_data.ph", Some(ValueFormat::Sha256PhoneDigits)),
    ("user_data.fn", Some(ValueFormat::Sha256Name)),
    ("user_data.ln", Some(ValueFormat::Sha256Name)),
    ("user_data.ge", Some(ValueFormat::Sha256Gender)),
    ("user_data.ct", Some(ValueFormat::Sha256City)),
    ("user_data.st", Some(ValueFormat::Sha256State)),
    ("user_data.zp", Some(ValueFormat::Sha256Zip)),
    ("user_data.country", Some(ValueFormat::Sha256Country)),
    ("user_data.external_id", Some(ValueFormat::Sha256)),
    ("user_data.db", Some(ValueFormat::Sha256DateOfBirth)),
];

/// `user_data` fields Snap's OpenAPI document types as lists of strings.
const LISTS: &[&str] = &["em", "ph", "fn", "ln", "ge", "ct", "st", "zp", "country"];

/// What Snap matches an event to a person by: a record needs one of these.
const MATCH_KEYS: &[&str] = &[
    "user_data.em",
    "user_data.ph",
    "user_data.madid",
    "user_data.mobile_ad_id",
    "user_data.external_id",
    "user_data.sc_click_id",
    "user_data.sc_cookie1",
    "user_data.client_ip_address",
];

pub struct SnapchatDestination {
    name: String,
    base: reqwest::Url,
    pixel_id: String,
    token: String,
    test_event_code: Option<String>,
    delivery: HttpDelivery,
}

impl SnapchatDestination {
    pub fn new(name: &str, config: SnapchatConfig) -> Result<Self, String> {
        let base = match &config.url {
            Some(url) => super::http::parse_url_option("url", url.expose())?,
            None => super::http::parse_url_option("url", "https://tr.snapchat.com")?,
        };
        let pixel_id = config.pixel_id.expose().trim().to_string();
        if pixel_id.is_empty() || pixel_id.contains('/') {
            return Err(
                "`pixel_id` is the Snap Pixel ID (or Snap App ID), as Events Manager shows it".into(),
            );
        }
        let delivery = HttpDelivery::new(&config.delivery, VendorLimits::per_request(1000, 4 * 1024 * 1024))?;
        Ok(Self {
            name: name.to_string(),
            base,
            pixel_id,
            token: config.access_token.expose().to_string(),
            test_event_code: config
                .test_event_code
                .as_ref()
                .map(|c| c.expose().to_string())
                .filter(|c| !c.is_empty()),
            delivery,
        })
    }

    /// `/v3/{pixel_id}/{path}` with the token as `access_token`, as Snap documents it (shown
    /// URLs hide it).
    fn url(&self, path: &str) -> Result<reqwest::Url, String> {
        let mut url = self
            .base
            .join(&format!("/v3/{}/{path}", self.pixel_id))
            .map_err(|e| e.to_string())?;
        url.query_pairs_mut().append_pair("access_token", &self.token);
        Ok(url)
    }
}

#[async_trait]
impl Destination for SnapchatDestination {
    fn kind(&self) -> &'static str {
        "snapchat"
    }

    fn action(
        &self,
        action: Option<&str>,
        options: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Option<ActionSpec>, String> {
        match action.unwrap_or("conversions") {
            "conversions" => {
                crate::destinations::http::no_options("snapchat", options)?;
                let shape = PayloadShape::default()
                    .top_level(EVENT_FIELDS)
                    .container("custom_data")
                    .message_id("event_id")
                    .identity(MATCH_KEYS)
                    .required(&["event_name", "event_time", "action_source"])
                    .format("event_time", ValueFormat::UnixSeconds)
                    .formats(HASHED);
                Ok(Some(ActionSpec::new("conversions", shape).events()))
            }
            other => Err(format!(
                "unknown action `{other}`; the snapchat destination offers {}",
                ACTIONS.join(", ")
            )),
        }
    }

    /// Posts no events to the validation endpoint (`/events/validate`), which records
    /// nothing: a refused token fails the check.
    async fn check(&self) -> Result<(), DestinationError> {
        let failed = |message: String| DestinationError::Unreachable {
            destination: self.name.clone(),
            message,
        };
        let url = self.url("events/validate").map_err(&failed)?;
        let response = self
            .delivery
            .client
            .post(url)
            .header("content-type", "application/json")
            .body(r#"{"data":[]}"#)
            .send()
            .await
            .map_err(|e| {
                failed(format!(
                    "Snap: {}",
                    crate::destinations::http::describe_reqwest_error(&e)
                ))
            })?;
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        let answer = serde_json::from_str::<SnapAnswer>(&body).ok();
        if matches!(status.as_u16(), 401 | 403) || answer.as_ref().is_some_and(SnapAnswer::is_token_refusal) {
            let said = answer.map_or_else(|| snippet(&body), |a| format!(": {}", a.describe()));
            return Err(failed(format!("HTTP {status} from Snap{said}; {AUTH_HINT}")));
        }
        if status.is_server_error() || status.as_u16() == 404 {
            return Err(failed(format!(
                "HTTP {status} from Snap{}; check `pixel_id`",
                snippet(&body)
            )));
        }
        Ok(())
    }

    async fn open(&self, _run: &RunInfo) -> Result<Box<dyn DestinationWriter>, DestinationError> {
        let events = self.url("events").map_err(|message| DestinationError::Config {
            destination: self.name.clone(),
            message,
        })?;
        Ok(HttpWriter::boxed(
            SnapApi {
                events,
                envelope: self
                    .test_event_code
                    .iter()
                    .map(|code| ("test_event_code", serde_json::Value::String(code.clone())))
                    .collect(),
            },
            &self.delivery,
        ))
    }
}

struct SnapApi {
    events: reqwest::Url,
    envelope: Vec<(&'static str, serde_json::Value)>,
}

/// Snap's `EventResponse`: `{"status": "VALID"|"INVALID", "reason", "event", "errors":
/// {"codes": [...], "error_msgs": [...]}}`, for success and refusal alike.
#[derive(Debug, Deserialize)]
struct SnapAnswer {
    #[serde(default)]
    status: String,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    event: Option<usize>,
    #[serde(default)]
    errors: Option<SnapErrors>,
}

#[derive(Debug, Default, Deserialize)]
struct SnapErrors {
    #[serde(default)]
    codes: Vec<String>,
    #[serde(default)]
    error_msgs: Vec<String>,
}

impl SnapAnswer {
    fn describe(&self) -> String {
        let mut parts: Vec<String> = self.reason.iter().cloned().collect();
        if let Some(errors) = &self.errors {
            for (i, message) in errors.error_msgs.iter().enumerate() {
                match errors.codes.get(i) {
                    Some(code) => parts.push(format!("{message} ({code})")),
                    None => parts.push(message.clone()),
                }
            }
        }
        if parts.is_empty() {
            parts.push(format!("status {}", self.status));
        }
        parts.join("; ")
    }

    fn is_token_refusal(&self) -> bool {
        self.status == "INVALID" && self.describe().to_lowercase().contains("access token")
    }
}

#[async_trait]
impl VendorApi for SnapApi {
    fn vendor(&self) -> &'static str {
        "Snap"
    }

    fn auth_hint(&self) -> &'static str {
        AUTH_HINT
    }

    async fn request(&self, batch: &OutgoingBatch, range: Range<usize>) -> Result<ApiRequest, String> {
        let mut events = Vec::with_capacity(range.len());
        for i in range.clone() {
            events.push(listed(batch.bodies.get(i))?);
        }
        let body = array_envelope(
            "data",
            events.iter().map(Vec::as_slice),
            batch.bodies.bytes_of(range),
            &self.envelope,
        );
        Ok(ApiRequest::json(
            Method::POST,
            self.events.clone(),
            HeaderMap::new(),
            body,
        ))
    }

    fn on_success(&self, answer: &HttpAnswer, batch: &OutgoingBatch, range: Range<usize>) -> SendOutcome {
        match serde_json::from_str::<SnapAnswer>(&answer.body) {
            Ok(parsed) if parsed.status == "INVALID" => self.on_error(answer, batch, range),
            _ => SendOutcome::Accepted,
        }
    }

    fn on_error(&self, answer: &HttpAnswer, _batch: &OutgoingBatch, range: Range<usize>) -> SendOutcome {
        let Ok(parsed) = serde_json::from_str::<SnapAnswer>(&answer.body) else {
            return crate::destinations::http::classify("Snap", answer, AUTH_HINT);
        };
        let reason = format!("Snap: {}", parsed.describe());
        if answer.status.as_u16() == 401 || parsed.is_token_refusal() {
            return SendOutcome::Fatal {
                reason: format!("{reason}; {AUTH_HINT}"),
            };
        }
        if answer.status.as_u16() == 429 || answer.status.is_server_error() {
            return crate::destinations::http::classify("Snap", answer, AUTH_HINT);
        }
        match parsed.event {
            Some(index) if index < range.len() => {
                SendOutcome::RefusedBecauseOf(vec![RecordFailure { index, error: reason }])
            }
            _ => SendOutcome::Invalid { reason },
        }
    }
}

/// The event with the `user_data` fields Snap takes as lists written as one-element lists.
fn listed(body: &[u8]) -> Result<Vec<u8>, String> {
    let mut event: serde_json::Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    if let Some(user) = event
        .get_mut("user_data")
        .and_then(serde_json::Value::as_object_mut)
    {
        for key in LISTS {
            if let Some(value) = user.get_mut(*key)
                && !value.is_array()
                && !value.is_null()
            {
                *value = serde_json::Value::Array(vec![value.take()]);
            }
        }
    }
    serde_json::to_vec(&event).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &str) -> HttpAnswer {
        HttpAnswer {
            status: reqwest::StatusCode::from_u16(status).unwrap(),
            headers: HeaderMap::new(),
            body: body.to_string(),
        }
    }

    #[test]
    fn snap_s_answers_name_the_event_at_fault() {
        let api = SnapApi {
            events: reqwest::Url::parse("https://tr.snapchat.com/v3/p/events").unwrap(),
            envelope: Vec::new(),
        };
        let batch = OutgoingBatch::empty();
        assert!(matches!(
            api.on_success(
                &answer(
                    200,
                    r#"{"status":"VALID","reason":"Events have been processed successfully."}"#
                ),
                &batch,
                0..3
            ),
            SendOutcome::Accepted
        ));
        let invalid = r#"{"status":"INVALID","event":1,"errors":{"codes":["INVALID_EVENT_TIME"],"error_msgs":["event_time is older than 37 days"]}}"#;
        match api.on_error(&answer(400, invalid), &batch, 0..3) {
            SendOutcome::RefusedBecauseOf(failures) => {
                assert_eq!(failures[0].index, 1);
                assert!(
                    failures[0]
                        .error
                        .contains("older than 37 days (INVALID_EVENT_TIME)")
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            api.on_error(
                &answer(400, r#"{"status":"INVALID","reason":"bad request"}"#),
                &batch,
                0..3
            ),
            SendOutcome::Invalid { .. }
        ));
        assert!(matches!(
            api.on_error(
                &answer(401, r#"{"status":"INVALID","reason":"Invalid access token"}"#),
                &batch,
                0..3
            ),
            SendOutcome::Fatal { .. }
        ));
        assert!(matches!(
            api.on_error(
                &answer(400, r#"{"status":"INVALID","reason":"Invalid access token"}"#),
                &batch,
                0..3
            ),
            SendOutcome::Fatal { .. }
        ));
        assert!(matches!(
            api.on_error(
                &answer(429, r#"{"status":"INVALID","reason":"rate limited"}"#),
                &batch,
                0..3
            ),
            SendOutcome::RateLimited { .. }
        ));
    }

    #[test]
    fn user_data_lists_are_lists() {
        let event = listed(br#"{"event_name":"PURCHASE","user_data":{"em":"ab","ph":null,"client_ip_address":"1.2.3.4","fn":["x"]}}"#).unwrap();
        let event: serde_json::Value = serde_json::from_slice(&event).unwrap();
        assert_eq!(
            event["user_data"],
            serde_json::json!({"em": ["ab"], "ph": null, "client_ip_address": "1.2.3.4", "fn": ["x"]})
        );
    }
}
