//! `type: tiktok`: TikTok's Events API 2.0 (`POST /open_api/v1.3/event/track/`): each record is
//! one web, app, offline or CRM event, matched to people by hashed customer information.
//!
//! ```yaml
//! destinations:
//!   tiktok:
//!     type: tiktok
//!     access_token: ${TIKTOK_ACCESS_TOKEN}   # Events Manager > the pixel or event set > Settings
//!     event_source: web                      # web | app | offline | crm
//!     event_source_id: CJ1ABCDEFGHIJKL        # the pixel code, app id or event set id
//! mappings:
//!   purchases_to_tiktok:
//!     model: purchases
//!     destination: tiktok
//!     fields:
//!       event_time: purchased_at              # sent as Unix seconds
//!       user.email: email                     # hashed: never sent raw
//!       user.phone: phone                     # E.164 with +, hashed
//!       value: amount                         # into properties
//!       currency: currency
//!     constants: { event: CompletePayment }
//! ```
//!
//! Up to 1,000 events a request. `event_id` is sluice's message id unless mapped, so TikTok
//! deduplicates an event sluice sends again. `user.email`, `user.phone`, `user.external_id`,
//! `user.first_name`, `user.last_name` and `user.zip_code` are normalised and SHA-256 hashed as
//! TikTok asks unless mapped with an explicit `as:`; `ip`, `user_agent`, `ttclid` and `ttp` go
//! as they are. Fields outside the event's own go into `properties`.
//!
//! TikTok answers HTTP 200 whatever happened and puts the outcome in `code`: 40002 refuses the
//! whole request for one event (its message names `Batch.N`), so that event fails alone and
//! the others go again; 40100 is throttling (waits); 40001 and 40105 (permission, token) stop
//! the run with what to do.

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
    array_envelope, secret_header, snippet,
};

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TiktokConfig {
    /// An Events API access token, generated in Events Manager for the pixel or event set.
    pub access_token: Secret,
    /// Where the events come from: `web` (a pixel), `app`, `offline` or `crm` (an event set).
    #[serde(default)]
    pub event_source: Option<EventSource>,
    /// The pixel code, TikTok App ID, or offline or CRM event set id the events go to.
    pub event_source_id: ConfigString,
    /// Events Manager's test code: events show under Test Events.
    #[serde(default)]
    pub test_event_code: Option<ConfigString>,
    /// The Business API's address (default https://business-api.tiktok.com; the sandbox is
    /// https://sandbox-business-api.tiktok.com).
    #[serde(default)]
    pub url: Option<ConfigString>,
    #[serde(default)]
    pub delivery: DeliverySettings,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventSource {
    #[default]
    Web,
    App,
    Offline,
    Crm,
}

impl EventSource {
    fn as_str(self) -> &'static str {
        match self {
            EventSource::Web => "web",
            EventSource::App => "app",
            EventSource::Offline => "offline",
            EventSource::Crm => "crm",
        }
    }
}

pub const ACTIONS: &[&str] = &["events"];
const AUTH_HINT: &str = "the access token is invalid, revoked or not for this pixel or event set: generate one in Events Manager (it goes in the Access-Token header, without Bearer)";

/// The event's own fields; any other mapped field goes into `properties`.
const EVENT_FIELDS: &[&str] = &[
    "event",
    "event_time",
    "event_id",
    "user",
    "properties",
    "page",
    "app",
    "ad",
    "lead",
    "limited_data_use",
];

/// Customer information TikTok takes only hashed, and how each is normalised.
const HASHED: &[(&str, Option<ValueFormat>)] = &[
    ("user.email", Some(ValueFormat::Sha256Email)),
    ("user.phone", Some(ValueFormat::Sha256Phone)),
    ("user.external_id", Some(ValueFormat::Sha256)),
    ("user.first_name", Some(ValueFormat::Sha256Name)),
    ("user.last_name", Some(ValueFormat::Sha256Name)),
    ("user.zip_code", Some(ValueFormat::Sha256Zip)),
];

/// What TikTok matches an event to a person by: a record needs one of these.
const MATCH_KEYS: &[&str] = &[
    "user.email",
    "user.phone",
    "user.external_id",
    "user.ttclid",
    "user.ttp",
    "user.idfa",
    "user.idfv",
    "user.ip",
];

pub struct TiktokDestination {
    name: String,
    events: reqwest::Url,
    token: String,
    event_source: EventSource,
    event_source_id: String,
    test_event_code: Option<String>,
    delivery: HttpDelivery,
}

impl TiktokDestination {
    pub fn new(name: &str, config: TiktokConfig) -> Result<Self, String> {
        let base = match &config.url {
            Some(url) => super::http::parse_url_option("url", url.expose())?,
            None => super::http::parse_url_option("url", "https://business-api.tiktok.com")?,
        };
        let events = base
            .join("/open_api/v1.3/event/track/")
            .map_err(|e| e.to_string())?;
        let event_source_id = config.event_source_id.expose().trim().to_string();
        if event_source_id.is_empty() {
            return Err(
                "`event_source_id` is the pixel code, app id or event set id the events go to".into(),
            );
        }
        let delivery = HttpDelivery::new(
            &config.delivery,
            // 1,000 events a request.
            VendorLimits::per_request(1000, 4 * 1024 * 1024),
        )?;
        Ok(Self {
            name: name.to_string(),
            events,
            token: config.access_token.expose().to_string(),
            event_source: config.event_source.unwrap_or_default(),
            event_source_id,
            test_event_code: config
                .test_event_code
                .as_ref()
                .map(|c| c.expose().to_string())
                .filter(|c| !c.is_empty()),
            delivery,
        })
    }

    fn api(&self) -> Result<TiktokApi, String> {
        let mut headers = HeaderMap::new();
        headers.insert("access-token", secret_header(&self.token)?);
        // Everything but `data` is the same in every request.
        let mut envelope = vec![
            (
                "event_source",
                serde_json::Value::String(self.event_source.as_str().into()),
            ),
            (
                "event_source_id",
                serde_json::Value::String(self.event_source_id.clone()),
            ),
        ];
        if let Some(code) = &self.test_event_code {
            envelope.push(("test_event_code", serde_json::Value::String(code.clone())));
        }
        Ok(TiktokApi {
            events: self.events.clone(),
            headers,
            envelope,
        })
    }
}

#[async_trait]
impl Destination for TiktokDestination {
    fn kind(&self) -> &'static str {
        "tiktok"
    }

    fn action(
        &self,
        action: Option<&str>,
        options: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Option<ActionSpec>, String> {
        match action.unwrap_or("events") {
            "events" => {
                crate::destinations::http::no_options("tiktok", options)?;
                let shape = PayloadShape::default()
                    .top_level(EVENT_FIELDS)
                    .container("properties")
                    .message_id("event_id")
                    .identity(MATCH_KEYS)
                    .required(&["event", "event_time"])
                    .format("event_time", ValueFormat::UnixSeconds)
                    .formats(HASHED);
                Ok(Some(ActionSpec::new("events", shape).events()))
            }
            other => Err(format!(
                "unknown action `{other}`; the tiktok destination offers {}",
                ACTIONS.join(", ")
            )),
        }
    }

    /// Sends a request with no events, which records nothing: a refused token (40105) or a
    /// pixel or event set the token may not use (40001) fails the check; TikTok's verdict on
    /// the empty list itself does not matter.
    async fn check(&self) -> Result<(), DestinationError> {
        let api = self.api().map_err(|message| DestinationError::Config {
            destination: self.name.clone(),
            message,
        })?;
        let body = array_envelope("data", std::iter::empty(), 0, &api.envelope);
        let response = self
            .delivery
            .client
            .post(self.events.clone())
            .headers(api.headers.clone())
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| DestinationError::Unreachable {
                destination: self.name.clone(),
                message: format!(
                    "TikTok: {}",
                    crate::destinations::http::describe_reqwest_error(&e)
                ),
            })?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        match serde_json::from_str::<TiktokAnswer>(&text) {
            Ok(answer) if matches!(answer.code, 40001 | 40105) => Err(DestinationError::Unreachable {
                destination: self.name.clone(),
                message: format!("TikTok: {}; {AUTH_HINT}", answer.describe()),
            }),
            Ok(_) => Ok(()),
            Err(_) if status.is_success() => Ok(()),
            Err(_) => Err(DestinationError::Unreachable {
                destination: self.name.clone(),
                message: format!("HTTP {status} from TikTok{}", snippet(&text)),
            }),
        }
    }

    async fn open(&self, _run: &RunInfo) -> Result<Box<dyn DestinationWriter>, DestinationError> {
        let api = self.api().map_err(|message| DestinationError::Config {
            destination: self.name.clone(),
            message,
        })?;
        Ok(HttpWriter::boxed(api, &self.delivery))
    }
}

struct TiktokApi {
    events: reqwest::Url,
    headers: HeaderMap,
    envelope: Vec<(&'static str, serde_json::Value)>,
}

/// `{"code": 0, "message": "OK", "request_id": "...", "data": {}}`, for success and failure
/// alike, usually with HTTP 200.
#[derive(Debug, Deserialize)]
struct TiktokAnswer {
    code: i64,
    #[serde(default)]
    message: String,
    #[serde(default)]
    request_id: Option<String>,
}

impl TiktokAnswer {
    fn describe(&self) -> String {
        match &self.request_id {
            Some(id) => format!("{} (code {}, request_id {id})", self.message, self.code),
            None => format!("{} (code {})", self.message, self.code),
        }
    }

    /// The event a 40002 names: `Batch.3.user.email: Not a valid string` is the fourth.
    fn event_index(&self) -> Option<usize> {
        let rest = &self.message[self.message.find("Batch.")? + "Batch.".len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    }

    fn outcome(&self, answer: &HttpAnswer, records: usize) -> SendOutcome {
        let reason = format!("TikTok: {}", self.describe());
        match self.code {
            0 => SendOutcome::Accepted,
            40100 => SendOutcome::RateLimited {
                reason,
                after: answer.retry_after(),
            },
            40105 => SendOutcome::Fatal {
                reason: format!("{reason}; {AUTH_HINT}"),
            },
            40001 => SendOutcome::Fatal {
                reason: format!(
                    "{reason}; the token has no permission on this pixel or event set: check `event_source_id` and the token's advertiser"
                ),
            },
            // One event's parameter is wrong, and TikTok refuses the request for it.
            40002 => match self.event_index() {
                Some(index) if index < records => {
                    SendOutcome::RefusedBecauseOf(vec![RecordFailure { index, error: reason }])
                }
                _ => SendOutcome::Invalid { reason },
            },
            // TikTok's system errors.
            code if code >= 50000 => SendOutcome::Retry {
                reason,
                after: answer.retry_after(),
            },
            _ => SendOutcome::Rejected { reason },
        }
    }
}

#[async_trait]
impl VendorApi for TiktokApi {
    fn vendor(&self) -> &'static str {
        "TikTok"
    }

    fn auth_hint(&self) -> &'static str {
        AUTH_HINT
    }

    async fn request(&self, batch: &OutgoingBatch, range: Range<usize>) -> Result<ApiRequest, String> {
        let body = array_envelope(
            "data",
            range.clone().map(|i| batch.bodies.get(i)),
            batch.bodies.bytes_of(range),
            &self.envelope,
        );
        Ok(ApiRequest::json(
            Method::POST,
            self.events.clone(),
            self.headers.clone(),
            body,
        ))
    }

    fn on_success(&self, answer: &HttpAnswer, _batch: &OutgoingBatch, range: Range<usize>) -> SendOutcome {
        match serde_json::from_str::<TiktokAnswer>(&answer.body) {
            Ok(parsed) => parsed.outcome(answer, range.len()),
            Err(_) => SendOutcome::Retry {
                reason: format!(
                    "TikTok answered HTTP {} without its envelope{}",
                    answer.status,
                    snippet(&answer.body)
                ),
                after: None,
            },
        }
    }

    fn on_error(&self, answer: &HttpAnswer, _batch: &OutgoingBatch, range: Range<usize>) -> SendOutcome {
        match serde_json::from_str::<TiktokAnswer>(&answer.body) {
            Ok(parsed) if parsed.code != 0 => parsed.outcome(answer, range.len()),
            _ => crate::destinations::http::classify("TikTok", answer, AUTH_HINT),
        }
    }
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

    fn api() -> TiktokApi {
        let config: TiktokConfig =
            serde_json::from_value(serde_json::json!({"access_token": "t", "event_source_id": "CJ1"}))
                .unwrap();
        TiktokDestination::new("tiktok", config).unwrap().api().unwrap()
    }

    #[test]
    fn outcomes_are_read_from_tiktok_s_code_not_the_status() {
        let api = api();
        let batch = OutgoingBatch::empty();
        let outcome = |body: &str| api.on_success(&answer(200, body), &batch, 0..3);
        assert!(matches!(
            outcome(r#"{"code":0,"message":"OK","request_id":"2025","data":{}}"#),
            SendOutcome::Accepted
        ));
        assert!(matches!(
            outcome(r#"{"code":40100,"message":"Too many requests. Please retry in some time."}"#),
            SendOutcome::RateLimited { .. }
        ));
        assert!(
            matches!(outcome(r#"{"code":40105,"message":"Access token is incorrect or has been revoked."}"#), SendOutcome::Fatal { reason } if reason.contains("without Bearer"))
        );
        assert!(matches!(
            outcome(r#"{"code":40001,"message":"No permission to operate pixel code: CJ1"}"#),
            SendOutcome::Fatal { .. }
        ));
        match outcome(
            r#"{"code":40002,"message":"Batch.2.properties.contents.0.content_id: Not a valid string"}"#,
        ) {
            SendOutcome::RefusedBecauseOf(failures) => {
                assert_eq!(failures.len(), 1);
                assert_eq!(failures[0].index, 2);
                assert!(failures[0].error.contains("content_id: Not a valid string"));
            }
            other => panic!("{other:?}"),
        }
        // An index outside the request, or none: split the request to find the event.
        assert!(matches!(
            outcome(r#"{"code":40002,"message":"Batch.7.event: Missing data for required field."}"#),
            SendOutcome::Invalid { .. }
        ));
        assert!(matches!(
            outcome(r#"{"code":40002,"message":"event_source_id: Missing data"}"#),
            SendOutcome::Invalid { .. }
        ));
        assert!(matches!(
            outcome(r#"{"code":50002,"message":"Internal error"}"#),
            SendOutcome::Retry { .. }
        ));
        assert!(matches!(
            api.on_error(&answer(502, "<html>bad gateway</html>"), &batch, 0..3),
            SendOutcome::Retry { .. }
        ));
    }

    #[test]
    fn the_envelope_names_the_source_and_the_token_is_a_header() {
        let api = api();
        assert_eq!(
            api.events.as_str(),
            "https://business-api.tiktok.com/open_api/v1.3/event/track/"
        );
        assert!(api.headers["access-token"].is_sensitive());
        let body = array_envelope("data", [&b"{\"event\":\"x\"}"[..]].into_iter(), 16, &api.envelope);
        let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            parsed,
            serde_json::json!({"data": [{"event": "x"}], "event_source": "web", "event_source_id": "CJ1"})
        );
    }
}
