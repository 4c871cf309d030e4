//! `type: iterable`: users through `/api/users/bulkUpdate`, events through
//! `/api/events/trackBulk`, and user deletion.
//!
//! ```yaml
//! destinations:
//!   iterable:
//!     type: iterable
//!     api_key: ${ITERABLE_API_KEY}
//!     region: us                        # us (default) or eu
//! mappings:
//!   users_to_iterable:
//!     model: users
//!     destination: iterable
//!     action: users                     # users or events
//!     fields: { email: email, userId: id }
//! ```
//!
//! A record is identified by `email` or `userId` (a `user_id` column fills it); every other
//! field goes into `dataFields`. `users` upserts with `preferUserId: true` (mode `upsert`, or
//! `mirror`, whose deleted records are deleted one request each, by userId or email: Iterable
//! has no bulk delete); `events` needs `eventName`, sends `createdAt` in seconds and sluice's
//! message id as the event `id` (Iterable updates an event sent again with the same id).
//! Iterable reports refused records by email or userId (`failedUpdates`); those records fail
//! with the list they were in.

use std::collections::HashMap;
use std::ops::Range;

use async_trait::async_trait;
use reqwest::Method;
use reqwest::header::{HeaderMap, HeaderValue};
use schemars::JsonSchema;
use serde::Deserialize;
use sluice_engine::destination::{
    ActionSpec, Destination, DestinationWriter, OutgoingBatch, PayloadShape, RecordAction, RecordFailure,
    RunInfo, SendOutcome, SyncMode, ValueFormat,
};
use sluice_engine::{ConfigString, DestinationError, Secret};

use crate::destinations::http::{
    ApiRequest, DeliverySettings, HttpAnswer, HttpDelivery, HttpWriter, VendorApi, VendorLimits,
    check_request, secret_header,
};

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IterableConfig {
    /// A server-side API key of the project (Integrations → API Keys).
    pub api_key: Secret,
    /// Data center of the project: `us` (default) or `eu`.
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

pub const ACTIONS: &[&str] = &["users", "events"];
const AUTH_HINT: &str = "check `api_key` (a server-side key of the project) and `region`";

pub struct IterableDestination {
    name: String,
    base: reqwest::Url,
    key: HeaderValue,
    users: HttpDelivery,
    events: HttpDelivery,
}

impl IterableDestination {
    pub fn new(name: &str, config: IterableConfig) -> Result<Self, String> {
        let base = match &config.url {
            Some(url) => url.expose().to_string(),
            None => match config.region {
                Region::Us => "https://api.iterable.com".into(),
                Region::Eu => "https://api.eu.iterable.com".into(),
            },
        };
        let base = super::http::parse_url_option("url", &base)?;
        let limits = |rate: u32| VendorLimits {
            max_records: 1000,
            // Deletes go one user a request.
            per_action: vec![(RecordAction::Delete, 1)],
            max_bytes: 4 * 1000 * 1000 - 64 * 1024,
            max_record_bytes: None,
            concurrency: 2,
            rate: Some((rate, std::time::Duration::from_secs(1))),
            gzip: false,
        };
        Ok(Self {
            name: name.to_string(),
            base,
            key: secret_header(config.api_key.expose())?,
            // Published limits: bulkUpdate 5 requests/s, trackBulk 10/s, per project.
            users: HttpDelivery::new(&config.delivery, limits(5))?,
            events: HttpDelivery::new(&config.delivery, limits(10))?,
        })
    }
}

#[async_trait]
impl Destination for IterableDestination {
    fn kind(&self) -> &'static str {
        "iterable"
    }

    fn action(
        &self,
        action: Option<&str>,
        options: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Option<ActionSpec>, String> {
        crate::destinations::http::no_options("iterable", options)?;
        let action = action.ok_or_else(|| format!("choose an `action`: {}", ACTIONS.join(", ")))?;
        let base = PayloadShape::default()
            .container("dataFields")
            .identity(&["email", "userId"])
            .alias("user_id", "userId")
            .format("userId", ValueFormat::String);
        let spec = match action {
            "users" => ActionSpec::new(
                action,
                base.top_level(&[
                    "email",
                    "userId",
                    "dataFields",
                    "preferUserId",
                    "mergeNestedObjects",
                ])
                .fixed("preferUserId", serde_json::json!(true)),
            )
            .modes(&[SyncMode::Upsert, SyncMode::Mirror])
            .deletes(),
            "events" => ActionSpec::new(
                action,
                base.top_level(&[
                    "email",
                    "userId",
                    "dataFields",
                    "eventName",
                    "id",
                    "createdAt",
                    "campaignId",
                    "templateId",
                ])
                .required(&["eventName"])
                .alias("event_name", "eventName")
                .alias("created_at", "createdAt")
                .message_id("id")
                .format("createdAt", ValueFormat::UnixSeconds),
            )
            .events(),
            other => {
                return Err(format!(
                    "unknown action `{other}`; the iterable destination offers {}",
                    ACTIONS.join(", ")
                ));
            }
        };
        Ok(Some(spec))
    }

    async fn check(&self) -> Result<(), DestinationError> {
        let url = self
            .base
            .join("/api/lists")
            .map_err(|e| DestinationError::Config {
                destination: self.name.clone(),
                message: e.to_string(),
            })?;
        let request = self.users.client.get(url).header("api-key", self.key.clone());
        check_request(&self.name, "Iterable", &self.users.client, request, AUTH_HINT).await
    }

    async fn open(&self, run: &RunInfo) -> Result<Box<dyn DestinationWriter>, DestinationError> {
        let events = run.action.as_deref() == Some("events");
        let mut headers = HeaderMap::new();
        headers.insert("api-key", self.key.clone());
        let path = if events {
            "/api/events/trackBulk"
        } else {
            "/api/users/bulkUpdate"
        };
        let url = self.base.join(path).map_err(|e| DestinationError::Config {
            destination: self.name.clone(),
            message: e.to_string(),
        })?;
        Ok(HttpWriter::boxed(
            IterableApi {
                events,
                url,
                base: self.base.clone(),
                headers,
            },
            if events { &self.events } else { &self.users },
        ))
    }
}

struct IterableApi {
    events: bool,
    url: reqwest::Url,
    base: reqwest::Url,
    headers: HeaderMap,
}

/// Each record's `(email, userId)`.
fn identities(batch: &OutgoingBatch, range: Range<usize>) -> Vec<(Option<String>, Option<String>)> {
    range
        .map(|i| {
            let text = |key: &str| batch.identity_text(i, key).ok().flatten();
            (text("email"), text("userId"))
        })
        .collect()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BulkAnswer {
    #[serde(default)]
    failed_updates: HashMap<String, Vec<String>>,
    #[serde(default)]
    disallowed_event_names: Vec<String>,
}

#[async_trait]
impl VendorApi for IterableApi {
    fn vendor(&self) -> &'static str {
        "Iterable"
    }

    fn auth_hint(&self) -> &'static str {
        AUTH_HINT
    }

    async fn request(&self, batch: &OutgoingBatch, range: Range<usize>) -> Result<ApiRequest, String> {
        if batch.actions[range.start] == RecordAction::Delete {
            let (email, user_id) = identities(batch, range.clone())
                .into_iter()
                .next()
                .ok_or("internal: an empty delete request")?;
            let mut url = self.base.clone();
            match (user_id, email) {
                (Some(user_id), _) => {
                    url.path_segments_mut()
                        .map_err(|_| "the base URL cannot take a path")?
                        .extend(["api", "users", "byUserId", &user_id]);
                }
                (None, Some(email)) => {
                    url.path_segments_mut()
                        .map_err(|_| "the base URL cannot take a path")?
                        .extend(["api", "users", &email]);
                }
                (None, None) => {
                    return Err(
                        "Iterable deletes users by userId or email, and the record has neither".into(),
                    );
                }
            }
            return Ok(ApiRequest::json(
                Method::DELETE,
                url,
                self.headers.clone(),
                Vec::new(),
            ));
        }
        let array: &[u8] = if self.events {
            b"{\"events\":"
        } else {
            b"{\"users\":"
        };
        let mut body = Vec::with_capacity(batch.bodies.bytes_of(range.clone()) + range.len() + 16);
        body.extend_from_slice(array);
        crate::destinations::http::write_array(&mut body, range.map(|i| batch.bodies.get(i)));
        body.push(b'}');
        Ok(ApiRequest::json(
            Method::POST,
            self.url.clone(),
            self.headers.clone(),
            body,
        ))
    }

    /// Deleting a user Iterable does not have is done already.
    fn on_error(&self, answer: &HttpAnswer, batch: &OutgoingBatch, range: Range<usize>) -> SendOutcome {
        if batch.actions[range.start] == RecordAction::Delete
            && answer.status.as_u16() == 400
            && answer.body.contains("does not exist")
        {
            return SendOutcome::Accepted;
        }
        crate::destinations::http::classify("Iterable", answer, AUTH_HINT)
    }

    /// Refused records come back as lists of emails and userIds (`failedUpdates.invalidEmails`,
    /// `notFoundUserIds`, ...), and for events as disallowed event names.
    fn on_success(&self, answer: &HttpAnswer, batch: &OutgoingBatch, range: Range<usize>) -> SendOutcome {
        let Ok(report) = serde_json::from_str::<BulkAnswer>(&answer.body) else {
            return SendOutcome::Accepted;
        };
        let identities = identities(batch, range.clone());
        let mut failures = Vec::new();
        for (list, values) in &report.failed_updates {
            let by_user_id = list.ends_with("UserIds");
            for value in values {
                for (index, (email, user_id)) in identities.iter().enumerate() {
                    let matches = if by_user_id {
                        user_id.as_deref() == Some(value)
                    } else {
                        email.as_deref() == Some(value)
                    };
                    if matches {
                        failures.push(RecordFailure {
                            index,
                            error: format!("Iterable: {list}: {value}"),
                        });
                    }
                }
            }
        }
        if self.events && !report.disallowed_event_names.is_empty() {
            for index in 0..range.len() {
                let body: serde_json::Value =
                    serde_json::from_slice(batch.bodies.get(range.start + index)).unwrap_or_default();
                if let Some(name) = body.get("eventName").and_then(|n| n.as_str())
                    && report.disallowed_event_names.iter().any(|d| d == name)
                {
                    failures.push(RecordFailure {
                        index,
                        error: format!("Iterable: the event name `{name}` is not allowed in this project"),
                    });
                }
            }
        }
        if failures.is_empty() {
            SendOutcome::Accepted
        } else {
            SendOutcome::Partial(failures)
        }
    }
}
