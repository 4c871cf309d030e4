//! `type: klaviyo`: profiles (bulk import jobs), events (bulk create jobs) and list
//! subscriptions, through Klaviyo's JSON:API endpoints.
//!
//! ```yaml
//! destinations:
//!   klaviyo:
//!     type: klaviyo
//!     api_key: ${KLAVIYO_PRIVATE_KEY}
//! mappings:
//!   profiles:
//!     model: users
//!     destination: klaviyo
//!     action: profiles                  # profiles, events or subscribe
//!     options: { list_id: Y6nRLr }      # profiles: also add them to a list; subscribe: required
//!     fields: { email: email, first_name: first_name, plan: plan }
//! ```
//!
//! A profile is identified by `email`, `phone_number` or `external_id` (a `user_id` column);
//! Klaviyo's standard attributes (`first_name`, `location`, ...) stay attributes and every other
//! field goes into `properties`.
//! - `profiles`: `POST /api/profile-bulk-import-jobs`, 10,000 profiles and 5 MB a job; mode
//!   `mirror` requests a data-privacy deletion for deleted records (by email or phone number,
//!   one a request).
//! - `events`: `POST /api/event-bulk-create-jobs`, 1,000 events a job; `metric` (the event
//!   name, from a column or a constant) is required; `time`, `value`, `value_currency` are the
//!   event's, `unique_id` is sluice's message id unless mapped; every other field is a property.
//! - `subscribe`: `POST /api/profile-subscription-bulk-create-jobs` (email marketing consent,
//!   1,000 a job) to `options.list_id`; deleted records are unsubscribed from that list
//!   (`profile-subscription-bulk-delete-jobs`, 100 a job).
//!
//! Jobs are accepted (202) as a whole; a job Klaviyo refuses (400) is split to find the records
//! at fault. Requests carry `revision: 2026-07-15`.

use std::ops::Range;

use async_trait::async_trait;
use reqwest::Method;
use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderMap, HeaderValue};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use sluice_engine::destination::{
    ActionSpec, Destination, DestinationWriter, OutgoingBatch, PayloadShape, RecordAction, RunInfo, SyncMode,
};
use sluice_engine::{ConfigString, DestinationError, Secret};

use crate::destinations::http::{
    ApiRequest, DeliverySettings, HttpDelivery, HttpWriter, VendorApi, VendorLimits, check_request,
    secret_header,
};

/// The API revision requests are written for.
pub const REVISION: &str = "2026-07-15";

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KlaviyoConfig {
    /// A private API key with the profiles, events, lists and subscriptions write scopes.
    pub api_key: Secret,
    /// API base URL (default `https://a.klaviyo.com`); change it only for a proxy or a test server.
    #[serde(default)]
    pub url: Option<ConfigString>,
    /// The API revision sent with every request (default 2026-07-15).
    #[serde(default = "default_revision")]
    pub revision: String,
    #[serde(default)]
    pub delivery: DeliverySettings,
}

fn default_revision() -> String {
    REVISION.to_string()
}

#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct KlaviyoOptions {
    list_id: Option<String>,
}

pub const ACTIONS: &[&str] = &["profiles", "events", "subscribe"];
const IDENTIFIERS: &[&str] = &["email", "phone_number", "external_id"];
/// Profile attributes Klaviyo defines; every other field is a custom property.
const PROFILE_ATTRIBUTES: &[&str] = &[
    "email",
    "phone_number",
    "external_id",
    "anonymous_id",
    "_kx",
    "first_name",
    "last_name",
    "organization",
    "locale",
    "title",
    "image",
    "location",
    "properties",
];
const EVENT_ATTRIBUTES: &[&str] = &[
    "properties",
    "time",
    "value",
    "value_currency",
    "unique_id",
    "metric",
    "email",
    "phone_number",
    "external_id",
    "anonymous_id",
];
const AUTH_HINT: &str = "check `api_key` (a private key) and its scopes (profiles:write, events:write, lists:write, subscriptions:write)";

pub struct KlaviyoDestination {
    name: String,
    base: reqwest::Url,
    headers: HeaderMap,
    delivery: HttpDelivery,
    events: HttpDelivery,
    subscriptions: HttpDelivery,
}

impl KlaviyoDestination {
    pub fn new(name: &str, config: KlaviyoConfig) -> Result<Self, String> {
        let base = config
            .url
            .as_ref()
            .map_or("https://a.klaviyo.com".to_string(), |u| u.expose().to_string());
        let base = super::http::parse_url_option("url", &base)?;
        let mut headers = HeaderMap::new();
        headers.insert(
            AUTHORIZATION,
            secret_header(&format!("Klaviyo-API-Key {}", config.api_key.expose()))?,
        );
        headers.insert(
            "revision",
            HeaderValue::from_str(&config.revision).map_err(|_| "`revision` is not a valid header value")?,
        );
        headers.insert(ACCEPT, HeaderValue::from_static("application/vnd.api+json"));
        // Bulk jobs: burst 10/s, steady 150/min; 2 a second keeps under both.
        let limits = |max_records: usize, per_action: Vec<(RecordAction, usize)>| VendorLimits {
            max_records,
            per_action,
            max_bytes: 5 * 1000 * 1000 - 64 * 1024,
            max_record_bytes: Some(100 * 1024),
            concurrency: 2,
            rate: Some((2, std::time::Duration::from_secs(1))),
            gzip: false,
        };
        Ok(Self {
            name: name.to_string(),
            base,
            headers,
            delivery: HttpDelivery::new(&config.delivery, limits(10_000, vec![(RecordAction::Delete, 1)]))?,
            events: HttpDelivery::new(&config.delivery, limits(1000, Vec::new()))?,
            subscriptions: HttpDelivery::new(
                &config.delivery,
                limits(1000, vec![(RecordAction::Delete, 100)]),
            )?,
        })
    }
}

fn parse_options(options: &Map<String, Value>) -> Result<KlaviyoOptions, String> {
    serde_json::from_value(Value::Object(options.clone()))
        .map_err(|e| format!("Klaviyo mapping `options`: {e} (it takes `list_id`)"))
}

#[async_trait]
impl Destination for KlaviyoDestination {
    fn kind(&self) -> &'static str {
        "klaviyo"
    }

    fn action(
        &self,
        action: Option<&str>,
        options: &Map<String, Value>,
    ) -> Result<Option<ActionSpec>, String> {
        let action = action.ok_or_else(|| format!("choose an `action`: {}", ACTIONS.join(", ")))?;
        let options = parse_options(options)?;
        let spec = match action {
            "profiles" => ActionSpec::new(
                action,
                PayloadShape::default()
                    .top_level(PROFILE_ATTRIBUTES)
                    .container("properties")
                    .identity(IDENTIFIERS)
                    .alias("user_id", "external_id"),
            )
            .modes(&[SyncMode::Upsert, SyncMode::Mirror])
            .deletes(),
            "events" => ActionSpec::new(
                action,
                PayloadShape::default()
                    .top_level(EVENT_ATTRIBUTES)
                    .container("properties")
                    .identity(IDENTIFIERS)
                    .alias("user_id", "external_id")
                    .alias("event", "metric")
                    .required(&["metric"])
                    .message_id("unique_id"),
            )
            .events(),
            "subscribe" => {
                if options.list_id.is_none() {
                    return Err(
                        "action `subscribe` needs `options.list_id`, the list to subscribe profiles to"
                            .into(),
                    );
                }
                ActionSpec::new(
                    action,
                    PayloadShape::default()
                        .top_level(&["email", "phone_number", "subscriptions"])
                        .container("properties")
                        .fixed(
                            "subscriptions",
                            json!({"email": {"marketing": {"consent": "SUBSCRIBED"}}}),
                        )
                        .identity(&["email"]),
                )
                .modes(&[SyncMode::Upsert, SyncMode::Mirror])
                .deletes()
            }
            other => {
                return Err(format!(
                    "unknown action `{other}`; the klaviyo destination offers {}",
                    ACTIONS.join(", ")
                ));
            }
        };
        Ok(Some(spec))
    }

    async fn check(&self) -> Result<(), DestinationError> {
        let url = self
            .base
            .join("/api/accounts")
            .map_err(|e| DestinationError::Config {
                destination: self.name.clone(),
                message: e.to_string(),
            })?;
        let request = self.delivery.client.get(url).headers(self.headers.clone());
        check_request(&self.name, "Klaviyo", &self.delivery.client, request, AUTH_HINT).await
    }

    async fn open(&self, run: &RunInfo) -> Result<Box<dyn DestinationWriter>, DestinationError> {
        let options = parse_options(&run.options).map_err(|message| DestinationError::Config {
            destination: self.name.clone(),
            message,
        })?;
        let action = match run.action.as_deref() {
            Some("events") => KlaviyoAction::Events,
            Some("subscribe") => KlaviyoAction::Subscribe,
            _ => KlaviyoAction::Profiles,
        };
        let delivery = match action {
            KlaviyoAction::Profiles => &self.delivery,
            KlaviyoAction::Events => &self.events,
            KlaviyoAction::Subscribe => &self.subscriptions,
        };
        Ok(HttpWriter::boxed(
            KlaviyoApi {
                action,
                base: self.base.clone(),
                headers: self.headers.clone(),
                list_id: options.list_id,
            },
            delivery,
        ))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KlaviyoAction {
    Profiles,
    Events,
    Subscribe,
}

struct KlaviyoApi {
    action: KlaviyoAction,
    base: reqwest::Url,
    headers: HeaderMap,
    list_id: Option<String>,
}

impl KlaviyoApi {
    fn request_to(&self, path: &str, body: Value) -> Result<ApiRequest, String> {
        let url = self.base.join(path).map_err(|e| e.to_string())?;
        Ok(ApiRequest {
            method: Method::POST,
            url,
            headers: self.headers.clone(),
            content_type: "application/vnd.api+json",
            body: body.to_string().into_bytes(),
        })
    }

    fn list(&self) -> Value {
        json!({"type": "list", "id": self.list_id})
    }
}

fn object(bytes: &[u8]) -> Result<Map<String, Value>, String> {
    match serde_json::from_slice(bytes).map_err(|e| e.to_string())? {
        Value::Object(map) => Ok(map),
        _ => Err("internal: a record is not a JSON object".into()),
    }
}

#[async_trait]
impl VendorApi for KlaviyoApi {
    fn vendor(&self) -> &'static str {
        "Klaviyo"
    }

    fn auth_hint(&self) -> &'static str {
        AUTH_HINT
    }

    // JSON:API nests every record a few levels deep, and events move the profile's
    // identifiers out of the event; Klaviyo's jobs are small (rate limited to a few a second),
    // so records are restructured as JSON values here.
    async fn request(&self, batch: &OutgoingBatch, range: Range<usize>) -> Result<ApiRequest, String> {
        let delete = batch.actions[range.start] == RecordAction::Delete;
        match (self.action, delete) {
            (KlaviyoAction::Profiles, false) => {
                let profiles: Vec<Value> = range
                    .map(|i| Ok(json!({"type": "profile", "attributes": object(batch.bodies.get(i))?})))
                    .collect::<Result<_, String>>()?;
                let mut data = json!({
                    "type": "profile-bulk-import-job",
                    "attributes": {"profiles": {"data": profiles}},
                });
                if self.list_id.is_some() {
                    data["relationships"] = json!({"lists": {"data": [self.list()]}});
                }
                self.request_to("/api/profile-bulk-import-jobs", json!({ "data": data }))
            }
            (KlaviyoAction::Profiles, true) => {
                let ids = object(batch.ids.get(range.start))?;
                // Exactly one identifier: the email, else the phone number.
                let identifier = ["email", "phone_number"]
                    .into_iter()
                    .find_map(|key| ids.get(key).filter(|v| !v.is_null()).map(|v| (key, v.clone())))
                    .ok_or("Klaviyo deletes profiles by email or phone number, and the record has neither")?;
                let mut attributes = Map::new();
                attributes.insert(identifier.0.to_string(), identifier.1);
                self.request_to(
                    "/api/data-privacy-deletion-jobs",
                    json!({"data": {"type": "data-privacy-deletion-job", "attributes": {
                        "profile": {"data": {"type": "profile", "attributes": attributes}}
                    }}}),
                )
            }
            (KlaviyoAction::Events, _) => {
                let mut entries = Vec::with_capacity(range.len());
                for i in range {
                    let mut event = object(batch.bodies.get(i))?;
                    let mut profile = Map::new();
                    for key in ["email", "phone_number", "external_id", "anonymous_id"] {
                        if let Some(value) = event.remove(key) {
                            profile.insert(key.to_string(), value);
                        }
                    }
                    let name = event.remove("metric").unwrap_or(Value::Null);
                    event.insert(
                        "metric".into(),
                        json!({"data": {"type": "metric", "attributes": {"name": name}}}),
                    );
                    event.entry("properties").or_insert_with(|| json!({}));
                    entries.push(json!({
                        "type": "event-bulk-create",
                        "attributes": {
                            "profile": {"data": {"type": "profile", "attributes": profile}},
                            "events": {"data": [{"type": "event", "attributes": event}]},
                        }
                    }));
                }
                self.request_to(
                    "/api/event-bulk-create-jobs",
                    json!({"data": {"type": "event-bulk-create-job", "attributes": {
                        "events-bulk-create": {"data": entries}
                    }}}),
                )
            }
            (KlaviyoAction::Subscribe, _) => {
                let consent = if delete { "UNSUBSCRIBED" } else { "SUBSCRIBED" };
                let profiles: Vec<Value> = range
                    .map(|i| {
                        let ids = object(batch.ids.get(i))?;
                        Ok(json!({"type": "profile", "attributes": {
                            "email": ids.get("email").cloned().unwrap_or(Value::Null),
                            "subscriptions": {"email": {"marketing": {"consent": consent}}},
                        }}))
                    })
                    .collect::<Result<_, String>>()?;
                let (path, kind) = if delete {
                    (
                        "/api/profile-subscription-bulk-delete-jobs",
                        "profile-subscription-bulk-delete-job",
                    )
                } else {
                    (
                        "/api/profile-subscription-bulk-create-jobs",
                        "profile-subscription-bulk-create-job",
                    )
                };
                self.request_to(
                    path,
                    json!({"data": {
                        "type": kind,
                        "attributes": {"profiles": {"data": profiles}},
                        "relationships": {"list": {"data": self.list()}},
                    }}),
                )
            }
        }
    }
}
