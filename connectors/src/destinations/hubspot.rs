//! `type: hubspot`: HubSpot CRM v3 objects (contacts, companies, deals, tickets, custom
//! objects) through the batch endpoints, 100 records a request, with a private app's token.
//!
//! ```yaml
//! destinations:
//!   hubspot:
//!     type: hubspot
//!     token: ${HUBSPOT_TOKEN}           # private app access token
//!     delivery: { rate_limit: 190/10s } # default 100/10s (Free and Starter plans)
//! mappings:
//!   contacts:
//!     model: users
//!     destination: hubspot
//!     mode: upsert                      # upsert (default), update, insert or mirror
//!     options:
//!       object: contacts                # or companies, deals, tickets, a custom object's type id
//!       id_property: email              # a unique property records are matched by
//! ```
//!
//! Every mapped field is a property (`properties`). `upsert` and `mirror` use `batch/upsert`
//! by `id_property`; `update` (and rows whose `_update` is true) `batch/update` by
//! `id_property`; `insert` `batch/create`. Deleted records are looked up by `id_property`
//! (`batch/read`) and archived (`batch/archive`); records HubSpot no longer has count as
//! deleted. Per-record errors of a 207 answer are mapped back to their records by id.

use std::collections::HashMap;
use std::ops::Range;

use async_trait::async_trait;
use reqwest::Method;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use schemars::JsonSchema;
use serde::Deserialize;
use sluice_engine::destination::{
    ActionSpec, Destination, DestinationWriter, OutgoingBatch, PayloadShape, RecordAction, RecordFailure,
    RunInfo, SendOutcome, SyncMode,
};
use sluice_engine::{ConfigString, DestinationError, Secret};

use crate::destinations::http::{
    ApiRequest, DeliverySettings, HttpAnswer, HttpDelivery, HttpWriter, VendorApi, VendorLimits,
    check_request, classify, describe_reqwest_error, secret_header, snippet,
};

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HubspotConfig {
    /// The private app's access token (Settings → Integrations → Private apps).
    pub token: Secret,
    /// API base URL (default `https://api.hubapi.com`); change it only for a proxy or a test server.
    #[serde(default = "default_url")]
    pub url: ConfigString,
    #[serde(default)]
    pub delivery: DeliverySettings,
}

fn default_url() -> ConfigString {
    ConfigString::literal("https://api.hubapi.com")
}

/// A mapping's `options:` for HubSpot.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HubspotMappingOptions {
    /// `contacts`, `companies`, `deals`, `tickets`, or a custom object's type id (`2-123456`).
    pub object: String,
    /// The unique property records are matched by; defaults to `email` for contacts and
    /// `domain` for companies, and must be given for other objects.
    pub id_property: Option<String>,
}

impl HubspotMappingOptions {
    fn parse(options: &serde_json::Map<String, serde_json::Value>) -> Result<Self, String> {
        let options: Self = serde_json::from_value(serde_json::Value::Object(options.clone())).map_err(|e| {
            format!("HubSpot mapping `options`: {e} (write `options: {{object: contacts, id_property: email}}`)")
        })?;
        if options.object.is_empty()
            || !options
                .object
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
        {
            return Err(format!(
                "`options.object` `{}` is not a HubSpot object type",
                options.object
            ));
        }
        Ok(options)
    }

    fn id_property(&self) -> Result<String, String> {
        match (&self.id_property, self.object.as_str()) {
            (Some(p), _) => Ok(p.clone()),
            (None, "contacts") => Ok("email".into()),
            (None, "companies") => Ok("domain".into()),
            (None, other) => Err(format!(
                "`options.id_property` is needed for object `{other}`: a unique property records are matched by"
            )),
        }
    }
}

pub struct HubspotDestination {
    name: String,
    base: reqwest::Url,
    auth: HeaderValue,
    delivery: HttpDelivery,
}

impl HubspotDestination {
    pub fn new(name: &str, config: HubspotConfig) -> Result<Self, String> {
        let base = super::http::parse_url_option("url", config.url.expose())?;
        let delivery = HttpDelivery::new(
            &config.delivery,
            VendorLimits {
                max_records: 100,
                per_action: Vec::new(),
                max_bytes: 3 * 1024 * 1024,
                max_record_bytes: None,
                concurrency: 4,
                rate: Some((100, std::time::Duration::from_secs(10))),
                gzip: false,
            },
        )?;
        Ok(Self {
            name: name.to_string(),
            base,
            auth: secret_header(&format!("Bearer {}", config.token.expose()))?,
            delivery,
        })
    }

    fn url(&self, path: &str) -> Result<reqwest::Url, String> {
        self.base.join(path).map_err(|e| e.to_string())
    }
}

const AUTH_HINT: &str = "the private app token expired, was rotated, or lacks the scopes of the object (e.g. crm.objects.contacts.write)";

#[async_trait]
impl Destination for HubspotDestination {
    fn kind(&self) -> &'static str {
        "hubspot"
    }

    fn action(
        &self,
        action: Option<&str>,
        options: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Option<ActionSpec>, String> {
        if let Some(action) = action
            && action != "objects"
        {
            return Err(format!(
                "unknown action `{action}`; the hubspot destination writes CRM objects (`objects`, the default), chosen by `options.object`"
            ));
        }
        let options = HubspotMappingOptions::parse(options)?;
        let id_property = options.id_property()?;
        let shape = PayloadShape::default()
            .top_level(&["properties"])
            .container("properties")
            .identity(&[&format!("properties.{id_property}")]);
        Ok(Some(
            ActionSpec::new("objects", shape)
                .modes(&[
                    SyncMode::Upsert,
                    SyncMode::Update,
                    SyncMode::Insert,
                    SyncMode::Mirror,
                ])
                .deletes(),
        ))
    }

    async fn check(&self) -> Result<(), DestinationError> {
        let url = self
            .url("/account-info/v3/details")
            .map_err(|message| DestinationError::Config {
                destination: self.name.clone(),
                message,
            })?;
        let request = self
            .delivery
            .client
            .get(url)
            .header(AUTHORIZATION, self.auth.clone());
        check_request(&self.name, "HubSpot", &self.delivery.client, request, AUTH_HINT).await
    }

    async fn open(&self, run: &RunInfo) -> Result<Box<dyn DestinationWriter>, DestinationError> {
        let config_error = |message: String| DestinationError::Config {
            destination: self.name.clone(),
            message,
        };
        let options = HubspotMappingOptions::parse(&run.options).map_err(config_error)?;
        let id_property = options.id_property().map_err(config_error)?;
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, self.auth.clone());
        let objects = self
            .url(&format!("/crm/v3/objects/{}/batch/", options.object))
            .map_err(config_error)?;
        Ok(HttpWriter::boxed(
            HubspotApi {
                objects,
                id_property,
                headers,
                client: self.delivery.client.clone(),
                dry_run: run.dry_run,
            },
            &self.delivery,
        ))
    }
}

struct HubspotApi {
    /// `…/crm/v3/objects/<object>/batch/`
    objects: reqwest::Url,
    id_property: String,
    headers: HeaderMap,
    client: reqwest::Client,
    dry_run: bool,
}

impl HubspotApi {
    /// Each record's value of the id property (from its identity fields).
    fn ids(&self, batch: &OutgoingBatch, range: Range<usize>) -> Result<Vec<String>, String> {
        let path = format!("properties.{}", self.id_property);
        range
            .map(|i| {
                batch.identity_text(i, &path)?.ok_or_else(|| {
                    format!(
                        "the record has no value for `{}`, which HubSpot matches records by",
                        self.id_property
                    )
                })
            })
            .collect()
    }

    fn endpoint(&self, name: &str) -> Result<reqwest::Url, String> {
        self.objects.join(name).map_err(|e| e.to_string())
    }

    /// HubSpot's internal ids of the records whose id property has these values.
    async fn lookup(&self, values: &[String]) -> Result<HashMap<String, String>, String> {
        #[derive(Deserialize)]
        struct Found {
            id: String,
            #[serde(default)]
            properties: HashMap<String, Option<String>>,
        }
        #[derive(Deserialize)]
        struct Read {
            #[serde(default)]
            results: Vec<Found>,
        }
        let body = serde_json::json!({
            "idProperty": self.id_property,
            "properties": [self.id_property],
            "inputs": values.iter().map(|v| serde_json::json!({"id": v})).collect::<Vec<_>>(),
        });
        let response = self
            .client
            .post(self.endpoint("read")?)
            .headers(self.headers.clone())
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| format!("looking up records to archive: {}", describe_reqwest_error(&e)))?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(format!(
                "looking up records to archive: HTTP {status} from HubSpot{}",
                snippet(&text)
            ));
        }
        let read: Read = serde_json::from_str(&text)
            .map_err(|e| format!("looking up records to archive: unexpected answer from HubSpot ({e})"))?;
        Ok(read
            .results
            .into_iter()
            .filter_map(|found| {
                let value = found.properties.get(&self.id_property).cloned().flatten()?;
                Some((value, found.id))
            })
            .collect())
    }
}

#[derive(Deserialize)]
struct BatchErrors {
    #[serde(default)]
    errors: Vec<BatchError>,
}

#[derive(Deserialize)]
struct BatchError {
    #[serde(default)]
    message: String,
    #[serde(default)]
    category: Option<String>,
    #[serde(default)]
    context: HashMap<String, Vec<String>>,
}

#[async_trait]
impl VendorApi for HubspotApi {
    fn vendor(&self) -> &'static str {
        "HubSpot"
    }

    fn auth_hint(&self) -> &'static str {
        AUTH_HINT
    }

    async fn request(&self, batch: &OutgoingBatch, range: Range<usize>) -> Result<ApiRequest, String> {
        let action = batch.actions[range.start];
        let mut body = Vec::with_capacity(batch.bodies.bytes_of(range.clone()) + range.len() * 64);
        body.extend_from_slice(b"{\"inputs\":[");
        let endpoint = match action {
            RecordAction::Insert => {
                for (n, i) in range.clone().enumerate() {
                    if n > 0 {
                        body.push(b',');
                    }
                    body.extend_from_slice(batch.bodies.get(i));
                }
                "create"
            }
            RecordAction::Upsert | RecordAction::Update => {
                let ids = self.ids(batch, range.clone())?;
                let id_property = serde_json::to_string(&self.id_property).map_err(|e| e.to_string())?;
                for (n, (i, id)) in range.clone().zip(&ids).enumerate() {
                    if n > 0 {
                        body.push(b',');
                    }
                    body.extend_from_slice(b"{\"idProperty\":");
                    body.extend_from_slice(id_property.as_bytes());
                    body.extend_from_slice(b",\"id\":");
                    body.extend_from_slice(serde_json::to_string(id).map_err(|e| e.to_string())?.as_bytes());
                    let record = batch.bodies.get(i);
                    body.push(b',');
                    body.extend_from_slice(&record[1..]);
                }
                if action == RecordAction::Upsert {
                    "upsert"
                } else {
                    "update"
                }
            }
            RecordAction::Delete => {
                let values = self.ids(batch, range.clone())?;
                // In a dry run nothing is looked up: the archive shows the id property values.
                let internal: Vec<String> = if self.id_property == "hs_object_id" || self.dry_run {
                    values
                } else {
                    let found = self.lookup(&values).await?;
                    values.iter().filter_map(|v| found.get(v).cloned()).collect()
                };
                for (n, id) in internal.iter().enumerate() {
                    if n > 0 {
                        body.push(b',');
                    }
                    body.extend_from_slice(b"{\"id\":");
                    body.extend_from_slice(serde_json::to_string(id).map_err(|e| e.to_string())?.as_bytes());
                    body.push(b'}');
                }
                "archive"
            }
        };
        body.extend_from_slice(b"]}");
        Ok(ApiRequest::json(
            Method::POST,
            self.endpoint(endpoint)?,
            self.headers.clone(),
            body,
        ))
    }

    /// 200 and 204 accept everything; a 207 lists the records that failed, by id.
    fn on_success(&self, answer: &HttpAnswer, batch: &OutgoingBatch, range: Range<usize>) -> SendOutcome {
        if answer.status.as_u16() != 207 {
            return SendOutcome::Accepted;
        }
        let errors = match serde_json::from_str::<BatchErrors>(&answer.body) {
            Ok(report) => report.errors,
            Err(e) => {
                return SendOutcome::Rejected {
                    reason: format!("HubSpot answered 207 with a body sluice cannot read ({e})"),
                };
            }
        };
        let ids = self.ids(batch, range.clone()).unwrap_or_default();
        let mut failures = Vec::new();
        for error in errors {
            let message = match &error.category {
                Some(category) => format!("HubSpot: {category}: {}", error.message),
                None => format!("HubSpot: {}", error.message),
            };
            let named: Vec<&String> = error.context.values().flatten().collect();
            let matched: Vec<usize> = ids
                .iter()
                .enumerate()
                .filter(|(_, id)| named.contains(id))
                .map(|(i, _)| i)
                .collect();
            if matched.is_empty() {
                // An error that names no record of ours fails them all, rather than lose one.
                failures.extend((0..range.len()).map(|index| RecordFailure {
                    index,
                    error: message.clone(),
                }));
            } else {
                failures.extend(matched.into_iter().map(|index| RecordFailure {
                    index,
                    error: message.clone(),
                }));
            }
        }
        if failures.is_empty() {
            SendOutcome::Accepted
        } else {
            SendOutcome::Partial(failures)
        }
    }

    fn on_error(&self, answer: &HttpAnswer, _batch: &OutgoingBatch, _range: Range<usize>) -> SendOutcome {
        // A record that already exists (create) or a duplicate id in the batch: find it by
        // splitting the request.
        if answer.status.as_u16() == 429 && answer.body.contains("DAILY") {
            return SendOutcome::Fatal {
                reason: format!(
                    "{} from HubSpot: the account's daily API limit is used up; runs resume sending when it resets at midnight in the account's time zone",
                    answer.describe()
                ),
            };
        }
        if answer.status.as_u16() == 409 {
            return SendOutcome::Invalid {
                reason: format!("{} from HubSpot", answer.describe()),
            };
        }
        classify("HubSpot", answer, AUTH_HINT)
    }
}
