//! `type: braze`: user attributes, custom events and purchases through `/users/track`, and user
//! deletion through `/users/delete`.
//!
//! ```yaml
//! destinations:
//!   braze:
//!     type: braze
//!     api_key: ${BRAZE_REST_KEY}
//!     url: https://rest.iad-01.braze.com   # your instance's REST endpoint
//! mappings:
//!   users_to_braze:
//!     model: users
//!     destination: braze
//!     action: attributes                  # attributes, events or purchases
//!     mode: mirror                        # upsert (default), update or mirror (attributes)
//!     fields: { external_id: id, email: email, plan: plan }
//! ```
//!
//! Every record is one object of the request's `attributes`, `events` or `purchases` array, 75
//! a request; it is identified by `external_id` (a `user_id` column fills it), `braze_id`,
//! `user_alias`, `email` or `phone`. Attributes are flat custom attributes; `update` (and rows
//! whose `_update` is true) sends `_update_existing_only: true`, so Braze never creates a user.
//! Events need `name` and `time`, purchases `product_id`, `currency`, `price` and `time`; other
//! fields go into `properties`. Deleted records (mode `mirror`) are deleted by `external_id`
//! with `/users/delete`, 50 a request. Errors Braze lists per object (`input_array`, `index`)
//! fail those records.

use std::ops::Range;

use async_trait::async_trait;
use reqwest::Method;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use schemars::JsonSchema;
use serde::Deserialize;
use sluice_engine::destination::{
    ActionSpec, Destination, DestinationWriter, OutgoingBatch, PayloadShape, RecordAction, RecordFailure,
    RunInfo, SendOutcome, SyncMode, ValueFormat,
};
use sluice_engine::{ConfigString, DestinationError, Secret};

use crate::destinations::http::{
    ApiRequest, DeliverySettings, HttpAnswer, HttpDelivery, HttpWriter, VendorApi, VendorLimits,
    secret_header, snippet,
};

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BrazeConfig {
    /// A REST API key with the `users.track` and `users.delete` permissions.
    pub api_key: Secret,
    /// The instance's REST endpoint (`https://rest.iad-01.braze.com`, `https://rest.fra-01.braze.eu`).
    pub url: ConfigString,
    #[serde(default)]
    pub delivery: DeliverySettings,
}

pub const ACTIONS: &[&str] = &["attributes", "events", "purchases"];
const IDENTIFIERS: &[&str] = &["external_id", "braze_id", "user_alias", "email", "phone"];
const AUTH_HINT: &str =
    "the REST API key is wrong for this instance's URL, or lacks the users.track / users.delete permission";

pub struct BrazeDestination {
    name: String,
    base: reqwest::Url,
    auth: HeaderValue,
    delivery: HttpDelivery,
}

impl BrazeDestination {
    pub fn new(name: &str, config: BrazeConfig) -> Result<Self, String> {
        let base = super::http::parse_url_option("url", config.url.expose())?;
        let delivery = HttpDelivery::new(
            &config.delivery,
            VendorLimits {
                // 75 objects a request; /users/delete takes 50 ids.
                max_records: 75,
                per_action: vec![(RecordAction::Delete, 50)],
                max_bytes: 4 * 1024 * 1024,
                max_record_bytes: None,
                concurrency: 4,
                rate: Some((3000, std::time::Duration::from_secs(3))),
                gzip: false,
            },
        )?;
        Ok(Self {
            name: name.to_string(),
            base,
            auth: secret_header(&format!("Bearer {}", config.api_key.expose()))?,
            delivery,
        })
    }
}

#[async_trait]
impl Destination for BrazeDestination {
    fn kind(&self) -> &'static str {
        "braze"
    }

    fn action(
        &self,
        action: Option<&str>,
        options: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Option<ActionSpec>, String> {
        crate::destinations::http::no_options("braze", options)?;
        let action = action.ok_or_else(|| format!("choose an `action`: {}", ACTIONS.join(", ")))?;
        let base = PayloadShape::default()
            .identity(IDENTIFIERS)
            .alias("user_id", "external_id");
        let spec = match action {
            "attributes" => ActionSpec::new(action, base.top_level(IDENTIFIERS))
                .modes(&[SyncMode::Upsert, SyncMode::Update, SyncMode::Mirror])
                .deletes(),
            "events" => {
                let top: Vec<&str> = IDENTIFIERS
                    .iter()
                    .copied()
                    .chain(["app_id", "name", "time", "properties"])
                    .collect();
                let shape = base
                    .top_level(&top)
                    .container("properties")
                    .required(&["name", "time"]);
                ActionSpec::new(action, shape).events()
            }
            "purchases" => {
                let top: Vec<&str> = IDENTIFIERS
                    .iter()
                    .copied()
                    .chain([
                        "app_id",
                        "product_id",
                        "currency",
                        "price",
                        "quantity",
                        "time",
                        "properties",
                    ])
                    .collect();
                let shape = base
                    .top_level(&top)
                    .container("properties")
                    .required(&["product_id", "currency", "price", "time"])
                    .format("product_id", ValueFormat::String);
                ActionSpec::new(action, shape).events()
            }
            other => {
                return Err(format!(
                    "unknown action `{other}`; the braze destination offers {}",
                    ACTIONS.join(", ")
                ));
            }
        };
        Ok(Some(spec))
    }

    /// An empty `/users/track` is refused for its content (400) with a valid key, and with 401
    /// otherwise.
    async fn check(&self) -> Result<(), DestinationError> {
        let url = self
            .base
            .join("/users/track")
            .map_err(|e| DestinationError::Config {
                destination: self.name.clone(),
                message: e.to_string(),
            })?;
        let response = self
            .delivery
            .client
            .post(url)
            .header(AUTHORIZATION, self.auth.clone())
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .map_err(|e| DestinationError::Unreachable {
                destination: self.name.clone(),
                message: format!("Braze: {}", crate::destinations::http::describe_reqwest_error(&e)),
            })?;
        let status = response.status();
        if matches!(status.as_u16(), 401 | 403 | 404) {
            let body = response.text().await.unwrap_or_default();
            return Err(DestinationError::Unreachable {
                destination: self.name.clone(),
                message: format!("HTTP {status} from Braze{}; {AUTH_HINT}", snippet(&body)),
            });
        }
        Ok(())
    }

    async fn open(&self, run: &RunInfo) -> Result<Box<dyn DestinationWriter>, DestinationError> {
        let url = |path: &str| {
            self.base.join(path).map_err(|e| DestinationError::Config {
                destination: self.name.clone(),
                message: e.to_string(),
            })
        };
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, self.auth.clone());
        Ok(HttpWriter::boxed(
            BrazeApi {
                array: match run.action.as_deref() {
                    Some("events") => "events",
                    Some("purchases") => "purchases",
                    _ => "attributes",
                },
                track: url("/users/track")?,
                delete: url("/users/delete")?,
                headers,
            },
            &self.delivery,
        ))
    }
}

struct BrazeApi {
    /// `attributes`, `events` or `purchases`.
    array: &'static str,
    track: reqwest::Url,
    delete: reqwest::Url,
    headers: HeaderMap,
}

#[derive(Deserialize)]
struct TrackAnswer {
    #[serde(default)]
    message: String,
    #[serde(default)]
    errors: Vec<TrackError>,
}

#[derive(Deserialize)]
struct TrackError {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    input_array: Option<String>,
    #[serde(default)]
    index: Option<usize>,
}

#[async_trait]
impl VendorApi for BrazeApi {
    fn vendor(&self) -> &'static str {
        "Braze"
    }

    fn auth_hint(&self) -> &'static str {
        AUTH_HINT
    }

    async fn request(&self, batch: &OutgoingBatch, range: Range<usize>) -> Result<ApiRequest, String> {
        let action = batch.actions[range.start];
        let mut body = Vec::with_capacity(batch.bodies.bytes_of(range.clone()) + range.len() * 32);
        if action == RecordAction::Delete {
            let mut ids = Vec::with_capacity(range.len());
            for i in range {
                let identity: serde_json::Value =
                    serde_json::from_slice(batch.ids.get(i)).map_err(|e| e.to_string())?;
                match identity.get("external_id") {
                    Some(serde_json::Value::Null) | None => {
                        return Err("Braze deletes users by `external_id`, and the record has none".into());
                    }
                    Some(id) => ids.push(id.clone()),
                }
            }
            body.extend_from_slice(b"{\"external_ids\":");
            body.extend_from_slice(serde_json::Value::Array(ids).to_string().as_bytes());
            body.push(b'}');
            return Ok(ApiRequest::json(
                Method::POST,
                self.delete.clone(),
                self.headers.clone(),
                body,
            ));
        }
        let extra: &[u8] = match (self.array, action) {
            ("attributes", RecordAction::Update) => b"\"_update_existing_only\":true",
            ("attributes", _) => b"\"_update_existing_only\":false",
            _ => b"",
        };
        body.push(b'{');
        body.extend_from_slice(format!("\"{}\":[", self.array).as_bytes());
        for (n, i) in range.enumerate() {
            if n > 0 {
                body.push(b',');
            }
            crate::destinations::http::write_object_with(&mut body, extra, batch.bodies.get(i));
        }
        body.extend_from_slice(b"]}");
        Ok(ApiRequest::json(
            Method::POST,
            self.track.clone(),
            self.headers.clone(),
            body,
        ))
    }

    /// `{"message":"success","errors":[{"type":…,"input_array":"attributes","index":1}]}`: the
    /// listed objects were refused, the rest processed. A delete answers `{"deleted": n}`.
    fn on_success(&self, answer: &HttpAnswer, _batch: &OutgoingBatch, range: Range<usize>) -> SendOutcome {
        let Ok(report) = serde_json::from_str::<TrackAnswer>(&answer.body) else {
            return SendOutcome::Accepted;
        };
        let failures: Vec<RecordFailure> = report
            .errors
            .iter()
            .filter(|e| e.input_array.as_deref().is_none_or(|a| a == self.array))
            .filter_map(|e| {
                let index = e.index?;
                (index < range.len()).then(|| RecordFailure {
                    index,
                    error: format!("Braze: {}", e.kind),
                })
            })
            .collect();
        if failures.is_empty() {
            if report.message.is_empty() || report.message == "success" || report.message == "queued" {
                SendOutcome::Accepted
            } else {
                SendOutcome::Invalid {
                    reason: format!("Braze: {}", report.message),
                }
            }
        } else {
            SendOutcome::Partial(failures)
        }
    }
}
