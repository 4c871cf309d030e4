//! `type: linkedin`: LinkedIn's Conversions API (`POST /rest/conversionEvents`, a batch of up
//! to 5,000 events): offline conversions matched to LinkedIn members by hashed email, LinkedIn's
//! first-party click id or the member's name and company.
//!
//! ```yaml
//! destinations:
//!   linkedin:
//!     type: linkedin
//!     access_token: ${LINKEDIN_TOKEN}   # OAuth, scopes rw_conversions and r_ads
//! mappings:
//!   leads_to_linkedin:
//!     model: leads
//!     destination: linkedin
//!     options: { conversion_id: "104012" }  # the conversion rule (method: Conversions API)
//!     fields:
//!       conversionHappenedAt: converted_at  # sent as Unix milliseconds
//!       email: email                        # hashed: never sent raw
//!       conversionValue.amount: amount      # sent as text, as LinkedIn asks
//!       conversionValue.currencyCode: currency
//! ```
//!
//! `eventId` is sluice's message id unless mapped, so LinkedIn deduplicates an event sent again
//! (and one the Insight Tag sent with that id). `email` (SHA-256 of the trimmed, lower-case
//! address), `li_fat_id` (LinkedIn's first-party ads tracking UUID) and `external_id` become
//! `user.userIds` and `user.externalIds`; `first_name`, `last_name`, `title`, `company_name`
//! and `country_code` become `user.userInfo`. LinkedIn answers a batch with one status per
//! event; it refuses a whole batch for one bad event and names it in the message (`Index: 3`),
//! so that event fails alone and the others go again.

use std::ops::Range;

use async_trait::async_trait;
use reqwest::Method;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use sluice_engine::destination::{
    ActionSpec, Destination, DestinationWriter, OutgoingBatch, PayloadShape, RecordFailure, RunInfo,
    SendOutcome, ValueFormat,
};
use sluice_engine::{ConfigString, DestinationError, Secret};

use crate::destinations::http::{
    ApiRequest, DeliverySettings, HttpAnswer, HttpDelivery, HttpWriter, VendorApi, VendorLimits,
    secret_header,
};

/// The Marketing API version used unless `api_version` says otherwise (`YYYYMM`; LinkedIn
/// keeps a version for a year).
pub const DEFAULT_API_VERSION: &str = "202606";

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LinkedinConfig {
    /// An OAuth access token of a member with a role on the ad account, with the
    /// `rw_conversions` scope (LinkedIn's tokens last 60 days).
    pub access_token: Secret,
    /// The Marketing API version, `YYYYMM` (default 202606).
    #[serde(default)]
    pub api_version: Option<String>,
    /// The API's address (default https://api.linkedin.com).
    #[serde(default)]
    pub url: Option<ConfigString>,
    #[serde(default)]
    pub delivery: DeliverySettings,
}

/// A mapping's `options:`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConversionOptions {
    /// The conversion rule's id (its method must be the Conversions API).
    conversion_id: String,
}

impl ConversionOptions {
    fn parse(options: &Map<String, Value>) -> Result<Self, String> {
        let parsed: Self = serde_json::from_value(Value::Object(options.clone())).map_err(|e| {
            format!("LinkedIn mapping `options`: {e} (write `options: {{conversion_id: \"104012\"}}`)")
        })?;
        let id = parsed.conversion_id.trim();
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
            return Err(
                "`options.conversion_id` is the conversion rule's numeric id, from Campaign Manager".into(),
            );
        }
        Ok(parsed)
    }
}

pub const ACTIONS: &[&str] = &["conversions"];
const AUTH_HINT: &str = "the access token is invalid, expired (LinkedIn's last 60 days) or lacks rw_conversions: generate a new one for a member with a role on the ad account";

/// The event's own fields; the identifier fields are restructured into `user`.
const EVENT_FIELDS: &[&str] = &["conversionHappenedAt", "conversionValue", "eventId", "user"];

/// Mapped fields that identify the member, and where they go.
const USER_FIELDS: &[&str] = &[
    "email",
    "li_fat_id",
    "external_id",
    "first_name",
    "last_name",
    "title",
    "company_name",
    "country_code",
];

/// What LinkedIn matches a conversion by: a record needs one of these.
const MATCH_KEYS: &[&str] = &["email", "li_fat_id", "external_id", "last_name"];

pub struct LinkedinDestination {
    name: String,
    base: reqwest::Url,
    version: String,
    token: String,
    delivery: HttpDelivery,
}

impl LinkedinDestination {
    pub fn new(name: &str, config: LinkedinConfig) -> Result<Self, String> {
        let base = match &config.url {
            Some(url) => super::http::parse_url_option("url", url.expose())?,
            None => super::http::parse_url_option("url", "https://api.linkedin.com")?,
        };
        let version = config
            .api_version
            .as_deref()
            .unwrap_or(DEFAULT_API_VERSION)
            .trim()
            .to_string();
        if version.len() != 6 || !version.chars().all(|c| c.is_ascii_digit()) {
            return Err(format!(
                "`api_version: {version}` is not a LinkedIn API version; write it as YYYYMM ({DEFAULT_API_VERSION})"
            ));
        }
        Ok(Self {
            name: name.to_string(),
            base,
            version,
            token: config.access_token.expose().to_string(),
            // 5,000 events a batch.
            delivery: HttpDelivery::new(&config.delivery, VendorLimits::per_request(5000, 4 * 1024 * 1024))?,
        })
    }

    fn headers(&self) -> Result<HeaderMap, String> {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, secret_header(&format!("Bearer {}", self.token))?);
        headers.insert(
            "linkedin-version",
            HeaderValue::from_str(&self.version).map_err(|e| e.to_string())?,
        );
        headers.insert("x-restli-protocol-version", HeaderValue::from_static("2.0.0"));
        Ok(headers)
    }
}

#[async_trait]
impl Destination for LinkedinDestination {
    fn kind(&self) -> &'static str {
        "linkedin"
    }

    fn action(
        &self,
        action: Option<&str>,
        options: &Map<String, Value>,
    ) -> Result<Option<ActionSpec>, String> {
        match action.unwrap_or("conversions") {
            "conversions" => {
                ConversionOptions::parse(options)?;
                let mut top: Vec<&str> = EVENT_FIELDS.to_vec();
                top.extend(USER_FIELDS);
                let shape = PayloadShape::default()
                    .top_level(&top)
                    .message_id("eventId")
                    .identity(MATCH_KEYS)
                    .required(&["conversionHappenedAt"])
                    .format("conversionHappenedAt", ValueFormat::UnixMs)
                    .format("email", ValueFormat::Sha256Email)
                    .format("conversionValue.amount", ValueFormat::String);
                Ok(Some(ActionSpec::new("conversions", shape).events()))
            }
            other => Err(format!(
                "unknown action `{other}`; the linkedin destination offers {}",
                ACTIONS.join(", ")
            )),
        }
    }

    /// Reads the member's ad accounts: a refused token fails the check.
    async fn check(&self) -> Result<(), DestinationError> {
        let mut url = self
            .base
            .join("/rest/adAccountUsers")
            .map_err(|e| DestinationError::Config {
                destination: self.name.clone(),
                message: e.to_string(),
            })?;
        url.query_pairs_mut().append_pair("q", "authenticatedUser");
        let headers = self.headers().map_err(|message| DestinationError::Config {
            destination: self.name.clone(),
            message,
        })?;
        crate::destinations::http::check_request(
            &self.name,
            "LinkedIn",
            &self.delivery.client,
            self.delivery.client.get(url).headers(headers),
            AUTH_HINT,
        )
        .await
    }

    async fn open(&self, run: &RunInfo) -> Result<Box<dyn DestinationWriter>, DestinationError> {
        let config = |message: String| DestinationError::Config {
            destination: self.name.clone(),
            message,
        };
        let options = ConversionOptions::parse(&run.options).map_err(config)?;
        let mut headers = self.headers().map_err(config)?;
        headers.insert("x-restli-method", HeaderValue::from_static("BATCH_CREATE"));
        Ok(HttpWriter::boxed(
            ConversionsApi {
                url: self
                    .base
                    .join("/rest/conversionEvents")
                    .map_err(|e| config(e.to_string()))?,
                headers,
                conversion: format!("urn:lla:llaPartnerConversion:{}", options.conversion_id.trim()),
            },
            &self.delivery,
        ))
    }
}

struct ConversionsApi {
    url: reqwest::Url,
    headers: HeaderMap,
    conversion: String,
}

impl ConversionsApi {
    /// A record as LinkedIn's conversion event: the identifier fields under `user`.
    fn element(&self, body: &[u8]) -> Result<Value, String> {
        let mut record: Map<String, Value> = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        let mut take = |name: &str| match record.remove(name) {
            Some(Value::Null) | None => None,
            Some(Value::String(text)) => Some(text),
            Some(other) => Some(other.to_string()),
        };
        let mut ids = Vec::new();
        if let Some(email) = take("email") {
            ids.push(json!({"idType": "SHA256_EMAIL", "idValue": email}));
        }
        if let Some(uuid) = take("li_fat_id") {
            ids.push(json!({"idType": "LINKEDIN_FIRST_PARTY_ADS_TRACKING_UUID", "idValue": uuid}));
        }
        let external = take("external_id");
        let mut info = Map::new();
        for (field, name) in [
            ("first_name", "firstName"),
            ("last_name", "lastName"),
            ("title", "title"),
            ("company_name", "companyName"),
            ("country_code", "countryCode"),
        ] {
            if let Some(value) = take(field) {
                info.insert(name.into(), Value::String(value));
            }
        }
        let mut user = match record.remove("user") {
            Some(Value::Object(user)) => user,
            _ => Map::new(),
        };
        if !ids.is_empty() {
            user.insert("userIds".into(), Value::Array(ids));
        }
        if !info.is_empty() {
            user.insert("userInfo".into(), Value::Object(info));
        }
        if let Some(external) = external {
            user.insert("externalIds".into(), json!([external]));
        }
        record.insert("user".into(), Value::Object(user));
        record.insert("conversion".into(), Value::String(self.conversion.clone()));
        Ok(Value::Object(record))
    }
}

/// LinkedIn's error body: `{"status", "serviceErrorCode", "code", "message"}`.
#[derive(Debug, Deserialize)]
struct LinkedinError {
    #[serde(default)]
    message: String,
    #[serde(default)]
    code: Option<String>,
    #[serde(default, rename = "serviceErrorCode")]
    service_error_code: Option<i64>,
}

impl LinkedinError {
    fn describe(&self) -> String {
        let mut text = self.message.trim().to_string();
        match (&self.code, self.service_error_code) {
            (Some(code), Some(service)) => text.push_str(&format!(" ({code}, serviceErrorCode {service})")),
            (Some(code), None) => text.push_str(&format!(" ({code})")),
            (None, Some(service)) => text.push_str(&format!(" (serviceErrorCode {service})")),
            (None, None) => {}
        }
        text
    }

    /// The events the message names: `Index: 3, ERROR :: ...` (one line each) or
    /// `indices [0, 2] (0-indexed)`.
    fn indices(&self) -> Vec<usize> {
        let mut found = Vec::new();
        for (at, _) in self.message.match_indices("Index: ") {
            let digits: String = self.message[at + 7..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            found.extend(digits.parse::<usize>().ok());
        }
        if let Some(at) = self.message.find("indices [") {
            let list = &self.message[at + 9..];
            let list = &list[..list.find(']').unwrap_or(list.len())];
            found.extend(list.split(',').filter_map(|n| n.trim().parse::<usize>().ok()));
        }
        found.sort_unstable();
        found.dedup();
        found
    }
}

#[async_trait]
impl VendorApi for ConversionsApi {
    fn vendor(&self) -> &'static str {
        "LinkedIn"
    }

    fn auth_hint(&self) -> &'static str {
        AUTH_HINT
    }

    async fn request(&self, batch: &OutgoingBatch, range: Range<usize>) -> Result<ApiRequest, String> {
        let elements = range
            .map(|i| self.element(batch.bodies.get(i)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ApiRequest::json(
            Method::POST,
            self.url.clone(),
            self.headers.clone(),
            serde_json::to_vec(&json!({ "elements": elements })).map_err(|e| e.to_string())?,
        ))
    }

    /// `{"elements": [{"status": 201}, ...]}`, in the order sent: an event with another
    /// status fails with its error.
    fn on_success(&self, answer: &HttpAnswer, _batch: &OutgoingBatch, range: Range<usize>) -> SendOutcome {
        let Ok(parsed) = serde_json::from_str::<Value>(&answer.body) else {
            return SendOutcome::Accepted;
        };
        let failures: Vec<RecordFailure> = parsed["elements"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
            .filter(|(index, element)| {
                *index < range.len()
                    && element["status"]
                        .as_u64()
                        .is_some_and(|s| !(200..300).contains(&s))
            })
            .map(|(index, element)| RecordFailure {
                index,
                error: format!(
                    "LinkedIn: status {}: {}",
                    element["status"],
                    element["error"]["message"].as_str().unwrap_or("refused")
                ),
            })
            .collect();
        if failures.is_empty() {
            SendOutcome::Accepted
        } else {
            SendOutcome::Partial(failures)
        }
    }

    fn on_error(&self, answer: &HttpAnswer, _batch: &OutgoingBatch, range: Range<usize>) -> SendOutcome {
        let Ok(error) = serde_json::from_str::<LinkedinError>(&answer.body) else {
            return crate::destinations::http::classify("LinkedIn", answer, AUTH_HINT);
        };
        let reason = format!("LinkedIn: {}", error.describe());
        match answer.status.as_u16() {
            401 | 403 => SendOutcome::Fatal {
                reason: format!("{reason}; {AUTH_HINT}"),
            },
            426 => SendOutcome::Fatal {
                reason: format!(
                    "{reason}; LinkedIn no longer serves this API version: set `api_version` to a recent YYYYMM"
                ),
            },
            400 | 422 => {
                let named: Vec<RecordFailure> = error
                    .indices()
                    .into_iter()
                    .filter(|i| *i < range.len())
                    .map(|index| RecordFailure {
                        index,
                        error: reason.clone(),
                    })
                    .collect();
                if named.is_empty() {
                    SendOutcome::Invalid { reason }
                } else {
                    SendOutcome::RefusedBecauseOf(named)
                }
            }
            _ => crate::destinations::http::classify("LinkedIn", answer, AUTH_HINT),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api() -> ConversionsApi {
        ConversionsApi {
            url: reqwest::Url::parse("https://api.linkedin.com/rest/conversionEvents").unwrap(),
            headers: HeaderMap::new(),
            conversion: "urn:lla:llaPartnerConversion:104012".into(),
        }
    }

    fn answer(status: u16, body: Value) -> HttpAnswer {
        HttpAnswer {
            status: reqwest::StatusCode::from_u16(status).unwrap(),
            headers: HeaderMap::new(),
            body: body.to_string(),
        }
    }

    #[test]
    fn a_record_becomes_a_conversion_event_with_its_member_under_user() {
        let element = api()
            .element(br#"{"conversionHappenedAt":1764590001000,"conversionValue":{"amount":"10.5","currencyCode":"USD"},"eventId":"m1","email":"abc","first_name":"Ada","last_name":"Lovelace","external_id":"42"}"#)
            .unwrap();
        assert_eq!(
            element,
            json!({"conversionHappenedAt": 1764590001000u64, "conversionValue": {"amount": "10.5", "currencyCode": "USD"}, "eventId": "m1",
                   "user": {"userIds": [{"idType": "SHA256_EMAIL", "idValue": "abc"}], "userInfo": {"firstName": "Ada", "lastName": "Lovelace"}, "externalIds": ["42"]},
                   "conversion": "urn:lla:llaPartnerConversion:104012"})
        );
    }

    #[test]
    fn refusals_name_their_events_by_index() {
        let batch = OutgoingBatch::empty();
        let unprocessable = json!({"status": 422, "message": "Index: 1, ERROR :: /conversionValue/amount :: field is required but not found and has no default value\nIndex: 3, ERROR :: /user/userInfo/firstName :: field is required\n"});
        match api().on_error(&answer(422, unprocessable), &batch, 0..4) {
            SendOutcome::RefusedBecauseOf(failures) => {
                assert_eq!(failures.iter().map(|f| f.index).collect::<Vec<_>>(), [1, 3])
            }
            other => panic!("{other:?}"),
        }
        let bad = json!({"status": 400, "message": "Incorrect conversions information provided. Conversion's method should be CONVERSIONS_API, indices [0, 2] (0-indexed)"});
        assert!(
            matches!(api().on_error(&answer(400, bad), &batch, 0..4), SendOutcome::RefusedBecauseOf(f) if f.len() == 2)
        );
        let revoked = json!({"status": 401, "serviceErrorCode": 65601, "code": "REVOKED_ACCESS_TOKEN", "message": "The token used in the request has been revoked by the user"});
        assert!(
            matches!(api().on_error(&answer(401, revoked), &batch, 0..4), SendOutcome::Fatal { reason } if reason.contains("REVOKED_ACCESS_TOKEN"))
        );
        let partial =
            json!({"elements": [{"status": 201}, {"status": 400, "error": {"message": "bad event"}}]});
        assert!(
            matches!(api().on_success(&answer(200, partial), &batch, 0..2), SendOutcome::Partial(f) if f[0].index == 1)
        );
    }
}
