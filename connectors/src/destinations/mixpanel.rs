//! `type: mixpanel`: events through `/import` and user and group profiles through `/engage`
//! and `/groups`.
//!
//! ```yaml
//! destinations:
//!   mixpanel:
//!     type: mixpanel
//!     region: us                      # us (default), eu or in
//!     project_id: "123456"            # with a service account
//!     service_account: { username: sluice.abc123.mp-service-account, secret: ${MP_SECRET} }
//!     # or api_secret: ${MP_API_SECRET}, the project's secret
//!     project_token: ${MP_TOKEN}      # needed for profiles and groups
//! mappings:
//!   signups:
//!     model: signups
//!     destination: mixpanel
//!     action: track                   # track, profile, profile_unset or group
//!     fields: { event: event_name, distinct_id: user_id, time: created_at }
//! ```
//!
//! - `track`: each record is an event, `{"event", "properties": {...}}`; `distinct_id`, `time`
//!   (sent in milliseconds since the epoch) and `$insert_id` (sluice's deterministic message id
//!   unless mapped) are properties. Sent to `/import?strict=1`, 2,000 events a request,
//!   gzipped; events Mixpanel refuses are failed records with its message.
//! - `profile`: `$set` of every mapped field on the profile `$distinct_id` (a `distinct_id` or
//!   `user_id` column fills it); `options: {set_once: true}` uses `$set_once`; deleted records
//!   `$delete` the profile.
//! - `profile_unset`: `$unset` of the mapped fields' names on each record's profile.
//! - `group`: `$set` on the group `$group_id` of `options.group_key`; deleted records `$delete`
//!   it.

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
    classify, write_object_with,
};

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MixpanelConfig {
    /// Data residency of the project: `us` (default), `eu` or `in`.
    #[serde(default)]
    pub region: Region,
    /// Overrides the region's URL (a proxy, or a test server).
    #[serde(default)]
    pub url: Option<ConfigString>,
    /// The project's numeric id; required with `service_account`.
    #[serde(default)]
    pub project_id: Option<ConfigString>,
    /// Service account for importing events (or give `api_secret` instead).
    #[serde(default)]
    pub service_account: Option<ServiceAccount>,
    /// The project's API secret, instead of a service account (legacy auth).
    #[serde(default)]
    pub api_secret: Option<Secret>,
    /// The project's token; needed for the `profile`, `profile_unset` and `group` actions.
    #[serde(default)]
    pub project_token: Option<Secret>,
    #[serde(default)]
    pub delivery: DeliverySettings,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceAccount {
    /// The service account's user name (`name.abc123.mp-service-account`).
    pub username: ConfigString,
    /// The service account's secret.
    pub secret: Secret,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Region {
    #[default]
    Us,
    Eu,
    In,
}

impl Region {
    fn url(self) -> &'static str {
        match self {
            Region::Us => "https://api.mixpanel.com",
            Region::Eu => "https://api-eu.mixpanel.com",
            Region::In => "https://api-in.mixpanel.com",
        }
    }
}

pub const ACTIONS: &[&str] = &["track", "profile", "profile_unset", "group"];

#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct MixpanelOptions {
    /// `profile`, `group`: `$set_once` instead of `$set`.
    #[serde(default)]
    set_once: bool,
    /// `group`: the group key (`company_id`, say).
    #[serde(default)]
    group_key: Option<String>,
}

impl MixpanelOptions {
    fn parse(options: &serde_json::Map<String, serde_json::Value>) -> Result<Self, String> {
        serde_json::from_value(serde_json::Value::Object(options.clone()))
            .map_err(|e| format!("Mixpanel mapping `options`: {e} (it takes `set_once` and `group_key`)"))
    }
}

pub struct MixpanelDestination {
    name: String,
    base: reqwest::Url,
    import_auth: Option<HeaderValue>,
    project_id: Option<String>,
    project_token: Option<String>,
    events: HttpDelivery,
    profiles: HttpDelivery,
}

impl MixpanelDestination {
    pub fn new(name: &str, config: MixpanelConfig) -> Result<Self, String> {
        let base = match &config.url {
            Some(url) => url.expose().to_string(),
            None => config.region.url().to_string(),
        };
        let base = super::http::parse_url_option("url", &base)?;
        let import_auth = match (&config.service_account, &config.api_secret) {
            (Some(_), Some(_)) => {
                return Err("give either `service_account` or `api_secret`, not both".into());
            }
            (Some(account), None) => {
                if config.project_id.is_none() {
                    return Err("a service account needs `project_id`".into());
                }
                Some(basic_auth(account.username.expose(), account.secret.expose())?)
            }
            (None, Some(secret)) => Some(basic_auth(secret.expose(), "")?),
            (None, None) => match &config.project_token {
                // Mixpanel also takes the project token as the user name on /import.
                Some(token) => Some(basic_auth(token.expose(), "")?),
                None => None,
            },
        };
        let events = HttpDelivery::new(
            &config.delivery,
            VendorLimits {
                max_records: 2000,
                per_action: Vec::new(),
                // Mixpanel's cap applies to the uncompressed body.
                max_bytes: 2 * 1024 * 1024 - 64 * 1024,
                max_record_bytes: Some(1024 * 1024),
                concurrency: 4,
                rate: None,
                gzip: true,
            },
        )?;
        let profiles = HttpDelivery::new(
            &config.delivery,
            VendorLimits {
                max_records: 2000,
                per_action: Vec::new(),
                max_bytes: 2 * 1024 * 1024 - 64 * 1024,
                max_record_bytes: None,
                concurrency: 4,
                rate: None,
                gzip: false,
            },
        )?;
        Ok(Self {
            name: name.to_string(),
            base,
            import_auth,
            project_id: config.project_id.map(|p| p.expose().to_string()),
            project_token: config.project_token.map(|t| t.expose().to_string()),
            events,
            profiles,
        })
    }
}

const AUTH_HINT: &str = "check `service_account` (and `project_id`) or `api_secret`; a service account needs the project's Admin or Owner role";

#[async_trait]
impl Destination for MixpanelDestination {
    fn kind(&self) -> &'static str {
        "mixpanel"
    }

    fn action(
        &self,
        action: Option<&str>,
        options: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Option<ActionSpec>, String> {
        let action = action.ok_or_else(|| format!("choose an `action`: {}", ACTIONS.join(", ")))?;
        let parsed = MixpanelOptions::parse(options)?;
        let spec = match action {
            "track" => {
                if self.import_auth.is_none() {
                    return Err("`track` sends to /import, which needs `service_account`, `api_secret` or `project_token` on the destination".into());
                }
                let shape = PayloadShape::default()
                    .top_level(&["event", "properties"])
                    .container("properties")
                    .alias("user_id", "properties.distinct_id")
                    .alias("message_id", "properties.$insert_id")
                    .alias("insert_id", "properties.$insert_id")
                    .message_id("properties.$insert_id")
                    .identity(&["properties.distinct_id"])
                    .required(&["event", "properties.time"])
                    .format("properties.time", ValueFormat::UnixMs)
                    .format("properties.distinct_id", ValueFormat::String);
                ActionSpec::new("track", shape).events()
            }
            "profile" | "profile_unset" | "group" => {
                if self.project_token.is_none() {
                    return Err(format!("`{action}` needs `project_token` on the destination"));
                }
                let group = action == "group";
                if group && parsed.group_key.is_none() {
                    return Err(
                        "`group` needs `options.group_key`, the group key of the groups (e.g. company_id)"
                            .into(),
                    );
                }
                let id = if group { "$group_id" } else { "$distinct_id" };
                let container = match (action, parsed.set_once) {
                    ("profile_unset", _) => "$unset",
                    (_, true) => "$set_once",
                    (_, false) => "$set",
                };
                let mut shape = PayloadShape::default()
                    .top_level(&[id, container])
                    .container(container)
                    .identity(&[id])
                    .format(id, ValueFormat::String);
                shape = if group {
                    shape.alias("group_id", id)
                } else {
                    shape.alias("distinct_id", id).alias("user_id", id)
                };
                let spec = ActionSpec::new(action, shape);
                if action == "profile_unset" {
                    spec
                } else {
                    spec.modes(&[SyncMode::Upsert, SyncMode::Mirror]).deletes()
                }
            }
            other => {
                return Err(format!(
                    "unknown action `{other}`; the mixpanel destination offers {}",
                    ACTIONS.join(", ")
                ));
            }
        };
        if action != "group" && parsed.group_key.is_some() {
            return Err("`options.group_key` only applies to action `group`".into());
        }
        Ok(Some(spec))
    }

    async fn check(&self) -> Result<(), DestinationError> {
        // An empty import is refused for its content (400) once the credentials pass, and with
        // a 401 when they do not.
        let Some(auth) = &self.import_auth else {
            return Ok(());
        };
        let mut url = self.base.join("/import").map_err(|e| DestinationError::Config {
            destination: self.name.clone(),
            message: e.to_string(),
        })?;
        url.query_pairs_mut().append_pair("strict", "1");
        if let Some(project) = &self.project_id {
            url.query_pairs_mut().append_pair("project_id", project);
        }
        let response = self
            .events
            .client
            .post(url)
            .header(AUTHORIZATION, auth.clone())
            .header("content-type", "application/json")
            .body("[]")
            .send()
            .await
            .map_err(|e| DestinationError::Unreachable {
                destination: self.name.clone(),
                message: format!("Mixpanel: {e}"),
            })?;
        match response.status().as_u16() {
            401 | 403 => Err(DestinationError::Unreachable {
                destination: self.name.clone(),
                message: format!(
                    "HTTP {} from Mixpanel; the credentials were refused: {AUTH_HINT}",
                    response.status()
                ),
            }),
            _ => Ok(()),
        }
    }

    async fn open(&self, run: &RunInfo) -> Result<Box<dyn DestinationWriter>, DestinationError> {
        let config_error = |message: String| DestinationError::Config {
            destination: self.name.clone(),
            message,
        };
        let options = MixpanelOptions::parse(&run.options).map_err(config_error)?;
        let action = run.action.as_deref().unwrap_or("track");
        let mut headers = HeaderMap::new();
        let (path, delivery) = match action {
            "track" => {
                if let Some(auth) = &self.import_auth {
                    headers.insert(AUTHORIZATION, auth.clone());
                }
                ("/import", &self.events)
            }
            "group" => ("/groups", &self.profiles),
            _ => ("/engage", &self.profiles),
        };
        let mut url = self.base.join(path).map_err(|e| config_error(e.to_string()))?;
        if action == "track" {
            url.query_pairs_mut().append_pair("strict", "1");
            if let Some(project) = &self.project_id {
                url.query_pairs_mut().append_pair("project_id", project);
            }
        } else {
            url.query_pairs_mut().append_pair("verbose", "1");
        }
        let token = self.project_token.clone().unwrap_or_default();
        let mut prefix = format!("\"$token\":{}", serde_json::Value::String(token));
        if let Some(key) = &options.group_key {
            prefix.push_str(&format!(
                ",\"$group_key\":{}",
                serde_json::Value::String(key.clone())
            ));
        }
        Ok(HttpWriter::boxed(
            MixpanelApi {
                action: action.to_string(),
                url,
                headers,
                prefix,
            },
            delivery,
        ))
    }
}

struct MixpanelApi {
    action: String,
    url: reqwest::Url,
    headers: HeaderMap,
    /// `"$token":…[,"$group_key":…]` for profile and group updates.
    prefix: String,
}

#[derive(Deserialize)]
struct ImportAnswer {
    #[serde(default)]
    failed_records: Vec<FailedRecord>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct FailedRecord {
    index: usize,
    #[serde(default)]
    field: Option<String>,
    #[serde(default)]
    message: String,
}

#[derive(Deserialize)]
struct EngageAnswer {
    status: i64,
    #[serde(default)]
    error: Option<String>,
}

#[async_trait]
impl VendorApi for MixpanelApi {
    fn vendor(&self) -> &'static str {
        "Mixpanel"
    }

    fn auth_hint(&self) -> &'static str {
        AUTH_HINT
    }

    async fn request(&self, batch: &OutgoingBatch, range: Range<usize>) -> Result<ApiRequest, String> {
        let mut body = Vec::with_capacity(batch.bodies.bytes_of(range.clone()) + range.len() * 64);
        body.push(b'[');
        for (n, i) in range.clone().enumerate() {
            if n > 0 {
                body.push(b',');
            }
            let record = batch.record(i);
            if self.action == "track" {
                body.extend_from_slice(record.body);
            } else if record.action == RecordAction::Delete {
                let extra = format!("{},\"$delete\":null", self.prefix);
                write_object_with(&mut body, extra.as_bytes(), record.ids);
            } else if self.action == "profile_unset" {
                // `$unset` takes the names of the mapped fields, not their values.
                let names: Vec<String> = batch
                    .fields
                    .schema()
                    .fields()
                    .iter()
                    .filter_map(|f| f.name().strip_prefix("$unset.").map(str::to_string))
                    .collect();
                let extra = format!("{},\"$unset\":{}", self.prefix, json!(names));
                write_object_with(&mut body, extra.as_bytes(), record.ids);
            } else {
                write_object_with(&mut body, self.prefix.as_bytes(), record.body);
            }
        }
        body.push(b']');
        Ok(ApiRequest::json(
            Method::POST,
            self.url.clone(),
            self.headers.clone(),
            body,
        ))
    }

    /// `/import` answers 200 when every event was imported; `/engage` and `/groups` (verbose)
    /// answer `{"status":0,"error":…}` when the batch was refused.
    fn on_success(&self, answer: &HttpAnswer, _batch: &OutgoingBatch, _range: Range<usize>) -> SendOutcome {
        if self.action == "track" {
            return SendOutcome::Accepted;
        }
        match serde_json::from_str::<EngageAnswer>(&answer.body) {
            Ok(EngageAnswer { status: 1, .. }) => SendOutcome::Accepted,
            Ok(EngageAnswer { error, .. }) => SendOutcome::Invalid {
                reason: format!(
                    "Mixpanel refused the update: {}",
                    error.unwrap_or_else(|| "no reason given".into())
                ),
            },
            // Without `verbose`, `1` means accepted.
            Err(_) if answer.body.trim() == "1" => SendOutcome::Accepted,
            Err(_) => SendOutcome::Invalid {
                reason: format!("Mixpanel refused the update: {}", answer.describe()),
            },
        }
    }

    /// A strict import's 400 lists the refused events by index; the others were imported.
    fn on_error(&self, answer: &HttpAnswer, _batch: &OutgoingBatch, range: Range<usize>) -> SendOutcome {
        if self.action == "track"
            && answer.status.as_u16() == 400
            && let Ok(report) = serde_json::from_str::<ImportAnswer>(&answer.body)
        {
            if !report.failed_records.is_empty() {
                return SendOutcome::Partial(
                    report
                        .failed_records
                        .into_iter()
                        .filter(|f| f.index < range.len())
                        .map(|f| RecordFailure {
                            index: f.index,
                            error: match f.field {
                                Some(field) => format!("Mixpanel: {field}: {}", f.message),
                                None => format!("Mixpanel: {}", f.message),
                            },
                        })
                        .collect(),
                );
            }
            if let Some(error) = report.error {
                return SendOutcome::Invalid {
                    reason: format!("HTTP 400 from Mixpanel: {error}"),
                };
            }
        }
        classify("Mixpanel", answer, AUTH_HINT)
    }
}
