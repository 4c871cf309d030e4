//! `type: customerio`: Customer.io's Track API v2 (`POST /api/v2/batch`): people, their events,
//! and objects.
//!
//! ```yaml
//! destinations:
//!   customerio:
//!     type: customerio
//!     site_id: ${CIO_SITE_ID}
//!     api_key: ${CIO_TRACK_API_KEY}
//!     region: us                        # us (default) or eu
//! mappings:
//!   people:
//!     model: users
//!     destination: customerio
//!     action: person                    # person, event or object
//!     mode: mirror
//!     fields: { identifiers.id: id, email: email, plan: plan }
//! ```
//!
//! - `person`: `{"type":"person","action":"identify","identifiers":{"id"|"email"|"cio_id"},
//!   "attributes":{...}}`; a `customer_id` or `user_id` column fills `identifiers.id`; deleted
//!   records (mode `mirror`) send `"action":"delete"`.
//! - `event`: `{"type":"person","action":"event","identifiers":…,"name",…}`; `name` is required,
//!   `timestamp` is sent in seconds; other fields are the event's `attributes`.
//! - `object`: `{"type":"object","action":"identify","identifiers":{"object_type_id",
//!   "object_id"}}` with `options: {object_type_id: "1"}`; deleted records delete the object.
//!
//! A batch is at most 500 KB (an entity 32 KB); errors Customer.io lists by `batch_index` fail
//! those records.

use std::ops::Range;

use async_trait::async_trait;
use reqwest::Method;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;
use sluice_engine::destination::{
    ActionSpec, Destination, DestinationWriter, OutgoingBatch, PayloadShape, RecordAction, RecordFailure,
    RunInfo, SendOutcome, SyncMode, ValueFormat,
};
use sluice_engine::{ConfigString, DestinationError, Secret};

use crate::destinations::http::{
    ApiRequest, DeliverySettings, HttpAnswer, HttpDelivery, HttpWriter, VendorApi, VendorLimits, basic_auth,
    write_object_with,
};

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CustomerioConfig {
    /// The workspace's Site ID, shown with its Track API key.
    pub site_id: ConfigString,
    /// The workspace's Track API key (not an App API key).
    pub api_key: Secret,
    /// Data center of the workspace: `us` (default) or `eu`.
    #[serde(default)]
    pub region: Region,
    /// Overrides the region's URL (a proxy, or a test server).
    #[serde(default)]
    pub url: Option<ConfigString>,
    #[serde(default)]
    pub delivery: DeliverySettings,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Region {
    #[default]
    Us,
    Eu,
}

#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CustomerioOptions {
    object_type_id: Option<serde_json::Value>,
}

pub const ACTIONS: &[&str] = &["person", "event", "object"];
const AUTH_HINT: &str = "check `site_id` and `api_key` (a Track API key) and `region`";

pub struct CustomerioDestination {
    name: String,
    batch_url: reqwest::Url,
    auth: HeaderValue,
    delivery: HttpDelivery,
}

impl CustomerioDestination {
    pub fn new(name: &str, config: CustomerioConfig) -> Result<Self, String> {
        let base = match &config.url {
            Some(url) => url.expose().to_string(),
            None => match config.region {
                Region::Us => "https://track.customer.io".into(),
                Region::Eu => "https://track-eu.customer.io".into(),
            },
        };
        let base = super::http::parse_url_option("url", &base)?;
        let batch_url = base.join("/api/v2/batch").map_err(|e| e.to_string())?;
        let delivery = HttpDelivery::new(
            &config.delivery,
            VendorLimits {
                max_records: 1000,
                per_action: Vec::new(),
                max_bytes: 480 * 1024,
                max_record_bytes: Some(32 * 1024),
                concurrency: 4,
                rate: Some((100, std::time::Duration::from_secs(1))),
                gzip: false,
            },
        )?;
        Ok(Self {
            name: name.to_string(),
            batch_url,
            auth: basic_auth(config.site_id.expose(), config.api_key.expose())?,
            delivery,
        })
    }
}

fn parse_options(options: &serde_json::Map<String, serde_json::Value>) -> Result<CustomerioOptions, String> {
    serde_json::from_value(serde_json::Value::Object(options.clone()))
        .map_err(|e| format!("Customer.io mapping `options`: {e} (it takes `object_type_id`)"))
}

#[async_trait]
impl Destination for CustomerioDestination {
    fn kind(&self) -> &'static str {
        "customerio"
    }

    fn action(
        &self,
        action: Option<&str>,
        options: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Option<ActionSpec>, String> {
        let action = action.ok_or_else(|| format!("choose an `action`: {}", ACTIONS.join(", ")))?;
        let options = parse_options(options)?;
        let common = ["type", "action", "identifiers", "attributes", "cio_relationships"];
        let spec = match action {
            "person" => ActionSpec::new(
                action,
                PayloadShape::default()
                    .top_level(&common)
                    .container("attributes")
                    .fixed("type", json!("person"))
                    .fixed("action", json!("identify"))
                    .identity(&["identifiers.id", "identifiers.email", "identifiers.cio_id"])
                    .alias("customer_id", "identifiers.id")
                    .alias("user_id", "identifiers.id")
                    .alias("cio_id", "identifiers.cio_id")
                    .format("identifiers.id", ValueFormat::String),
            )
            .modes(&[SyncMode::Upsert, SyncMode::Mirror])
            .deletes(),
            "event" => {
                let top: Vec<&str> = common.iter().copied().chain(["name", "timestamp"]).collect();
                ActionSpec::new(
                    action,
                    PayloadShape::default()
                        .top_level(&top)
                        .container("attributes")
                        .fixed("type", json!("person"))
                        .fixed("action", json!("event"))
                        .identity(&["identifiers.id", "identifiers.email", "identifiers.cio_id"])
                        .alias("customer_id", "identifiers.id")
                        .alias("user_id", "identifiers.id")
                        .alias("event", "name")
                        .required(&["name"])
                        .format("identifiers.id", ValueFormat::String)
                        .format("timestamp", ValueFormat::UnixSeconds),
                )
                .events()
            }
            "object" => {
                let type_id = options.object_type_id.clone().ok_or(
                    "action `object` needs `options.object_type_id` (the object type's id, e.g. \"1\")",
                )?;
                let type_id = match type_id {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                ActionSpec::new(
                    action,
                    PayloadShape::default()
                        .top_level(&common)
                        .container("attributes")
                        .fixed("type", json!("object"))
                        .fixed("action", json!("identify"))
                        .fixed("identifiers.object_type_id", json!(type_id))
                        .identity(&["identifiers.object_id"])
                        .alias("object_id", "identifiers.object_id")
                        .format("identifiers.object_id", ValueFormat::String),
                )
                .modes(&[SyncMode::Upsert, SyncMode::Mirror])
                .deletes()
            }
            other => {
                return Err(format!(
                    "unknown action `{other}`; the customerio destination offers {}",
                    ACTIONS.join(", ")
                ));
            }
        };
        if action != "object" && options.object_type_id.is_some() {
            return Err("`options.object_type_id` only applies to action `object`".into());
        }
        Ok(Some(spec))
    }

    /// An empty batch passes with valid credentials and is refused with 401 otherwise.
    async fn check(&self) -> Result<(), DestinationError> {
        let request = self
            .delivery
            .client
            .post(self.batch_url.clone())
            .header(AUTHORIZATION, self.auth.clone())
            .header("content-type", "application/json")
            .body(r#"{"batch":[]}"#);
        crate::destinations::http::check_request(
            &self.name,
            "Customer.io",
            &self.delivery.client,
            request,
            AUTH_HINT,
        )
        .await
    }

    async fn open(&self, run: &RunInfo) -> Result<Box<dyn DestinationWriter>, DestinationError> {
        let options = parse_options(&run.options).map_err(|message| DestinationError::Config {
            destination: self.name.clone(),
            message,
        })?;
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, self.auth.clone());
        let object_type_id = options.object_type_id.map(|t| match t {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        });
        Ok(HttpWriter::boxed(
            CustomerioApi {
                url: self.batch_url.clone(),
                headers,
                object_type_id,
            },
            &self.delivery,
        ))
    }
}

struct CustomerioApi {
    url: reqwest::Url,
    headers: HeaderMap,
    /// Set for objects: deletes name the type.
    object_type_id: Option<String>,
}

#[derive(Deserialize)]
struct BatchAnswer {
    #[serde(default)]
    errors: Vec<BatchError>,
}

#[derive(Deserialize)]
struct BatchError {
    batch_index: Option<usize>,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    field: Option<String>,
    #[serde(default)]
    message: String,
}

#[async_trait]
impl VendorApi for CustomerioApi {
    fn vendor(&self) -> &'static str {
        "Customer.io"
    }

    fn auth_hint(&self) -> &'static str {
        AUTH_HINT
    }

    async fn request(&self, batch: &OutgoingBatch, range: Range<usize>) -> Result<ApiRequest, String> {
        let mut body = Vec::with_capacity(batch.bodies.bytes_of(range.clone()) + range.len() + 16);
        body.extend_from_slice(b"{\"batch\":[");
        for (n, i) in range.enumerate() {
            if n > 0 {
                body.push(b',');
            }
            let record = batch.record(i);
            if record.action == RecordAction::Delete {
                // The identity is `{"identifiers":{...}}`; an object's also names its type.
                let extra = match &self.object_type_id {
                    Some(type_id) => {
                        let mut ids: serde_json::Value =
                            serde_json::from_slice(record.ids).map_err(|e| e.to_string())?;
                        ids["identifiers"]["object_type_id"] = json!(type_id);
                        format!(
                            r#""type":"object","action":"delete","identifiers":{}"#,
                            ids["identifiers"]
                        )
                    }
                    None => {
                        let ids: serde_json::Value =
                            serde_json::from_slice(record.ids).map_err(|e| e.to_string())?;
                        format!(
                            r#""type":"person","action":"delete","identifiers":{}"#,
                            ids["identifiers"]
                        )
                    }
                };
                write_object_with(&mut body, extra.as_bytes(), b"{}");
            } else {
                body.extend_from_slice(record.body);
            }
        }
        body.extend_from_slice(b"]}");
        Ok(ApiRequest::json(
            Method::POST,
            self.url.clone(),
            self.headers.clone(),
            body,
        ))
    }

    /// A 207 (or 200) lists refused entities by `batch_index`.
    fn on_success(&self, answer: &HttpAnswer, _batch: &OutgoingBatch, range: Range<usize>) -> SendOutcome {
        let Ok(report) = serde_json::from_str::<BatchAnswer>(&answer.body) else {
            return SendOutcome::Accepted;
        };
        let failures: Vec<RecordFailure> = report
            .errors
            .into_iter()
            .filter_map(|e| {
                let index = e.batch_index.filter(|i| *i < range.len())?;
                let field = e.field.map(|f| format!(" `{f}`")).unwrap_or_default();
                Some(RecordFailure {
                    index,
                    error: format!("Customer.io: {}{field}: {}", e.reason, e.message),
                })
            })
            .collect();
        if failures.is_empty() {
            SendOutcome::Accepted
        } else {
            SendOutcome::Partial(failures)
        }
    }
}
