//! `type: segment`: the Segment-spec HTTP tracking API (`POST /v1/batch`), which Segment,
//! RudderStack, Customer.io's Data Pipelines and other Segment-compatible collectors accept.
//!
//! ```yaml
//! destinations:
//!   segment:
//!     type: segment
//!     write_key: ${SEGMENT_WRITE_KEY}
//!     url: https://api.segment.io      # RudderStack: your data plane URL;
//!                                      # Customer.io: https://cdp.customer.io
//!     delivery: { rate_limit: 500/s }  # optional, see `delivery:`
//! mappings:
//!   users_to_segment:
//!     model: users
//!     destination: segment
//!     action: identify                 # identify, track, group, page or screen
//!     fields: { userId: id }
//! ```
//!
//! Each record is one message. Reserved fields (`userId`, `anonymousId`, `messageId`,
//! `timestamp`, `context`, `integrations`, and per action `event`, `groupId`, `name`,
//! `category`) stay at the top level; every other field goes into `traits` (identify, group) or
//! `properties` (track, page, screen). Columns named `user_id`, `anonymous_id`, `group_id` and
//! `message_id` fill the reserved fields when those are not mapped. `messageId` is sluice's
//! deterministic id unless the mapping fills it. A record with neither `userId` nor
//! `anonymousId` fails without being sent.

use std::ops::Range;

use async_trait::async_trait;
use reqwest::Method;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;
use sluice_engine::destination::{
    ActionSpec, Destination, DestinationWriter, OutgoingBatch, PayloadShape, RunInfo,
};
use sluice_engine::{ConfigString, DestinationError, Secret};

use crate::destinations::http::{
    ApiRequest, DeliverySettings, HttpDelivery, HttpWriter, VendorApi, VendorLimits, basic_auth,
    check_request, write_array,
};

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SegmentConfig {
    /// Write key of the source the records go to (Segment, RudderStack or Customer.io Data Pipelines).
    pub write_key: Secret,
    /// Base URL of the collector; `/v1/batch` is appended.
    #[serde(default = "default_url")]
    pub url: ConfigString,
    /// Sent as `X-Strict-Mode: 1`, which makes Customer.io's CDP API refuse invalid messages
    /// with a 400 instead of dropping them silently.
    #[serde(default)]
    pub strict: bool,
    #[serde(default)]
    pub delivery: DeliverySettings,
}

fn default_url() -> ConfigString {
    ConfigString::literal("https://api.segment.io")
}

pub const ACTIONS: &[&str] = &["identify", "track", "group", "page", "screen"];

/// Fields every Segment message may carry at its top level.
const COMMON: &[&str] = &[
    "type",
    "userId",
    "anonymousId",
    "messageId",
    "timestamp",
    "context",
    "integrations",
];

/// The layout of a Segment-spec message for `action`.
pub fn segment_action(action: &str) -> Option<ActionSpec> {
    let (extra, container, required): (&[&str], &str, &[&str]) = match action {
        "identify" => (&[], "traits", &[]),
        "track" => (&["event"], "properties", &["event"]),
        "group" => (&["groupId"], "traits", &["groupId"]),
        "page" => (&["name", "category"], "properties", &[]),
        "screen" => (&["name"], "properties", &[]),
        _ => return None,
    };
    let top: Vec<&str> = COMMON.iter().chain(extra).copied().collect();
    let mut shape = PayloadShape::default()
        .top_level(&top)
        .container(container)
        .fixed("type", json!(action))
        .message_id("messageId")
        .identity(&["userId", "anonymousId"])
        .required(required)
        .alias("user_id", "userId")
        .alias("anonymous_id", "anonymousId")
        .alias("message_id", "messageId");
    if action == "group" {
        shape = shape.alias("group_id", "groupId");
    }
    let spec = ActionSpec::new(action, shape);
    Some(if matches!(action, "identify" | "group") {
        spec
    } else {
        spec.events()
    })
}

pub struct SegmentDestination {
    name: String,
    batch_url: reqwest::Url,
    auth: HeaderValue,
    strict: bool,
    delivery: HttpDelivery,
}

impl SegmentDestination {
    pub fn new(name: &str, config: SegmentConfig) -> Result<Self, String> {
        let base = super::http::parse_url_option("url", config.url.expose())?;
        let batch_url = base
            .join(&format!("{}/v1/batch", base.path().trim_end_matches('/')))
            .map_err(|e| format!("`url` {}: {e}", config.url))?;
        if config.write_key.expose().is_empty() {
            return Err("`write_key` is empty".into());
        }
        let delivery = HttpDelivery::new(
            &config.delivery,
            VendorLimits {
                // Segment: at most 2,500 messages and 500 KB a request, 32 KB a message.
                max_records: 2500,
                per_action: Vec::new(),
                max_bytes: 475_000,
                max_record_bytes: Some(32 * 1024),
                concurrency: 4,
                rate: Some((1000, std::time::Duration::from_secs(1))),
                gzip: false,
            },
        )?;
        Ok(Self {
            name: name.to_string(),
            batch_url,
            auth: basic_auth(config.write_key.expose(), "")?,
            strict: config.strict,
            delivery,
        })
    }

    fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, self.auth.clone());
        if self.strict {
            headers.insert("x-strict-mode", HeaderValue::from_static("1"));
        }
        headers
    }
}

#[async_trait]
impl Destination for SegmentDestination {
    fn kind(&self) -> &'static str {
        "segment"
    }

    fn action(
        &self,
        action: Option<&str>,
        options: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Option<ActionSpec>, String> {
        crate::destinations::http::no_options("segment", options)?;
        let action = action.ok_or_else(|| format!("choose an `action`: {}", ACTIONS.join(", ")))?;
        segment_action(action).map(Some).ok_or_else(|| {
            format!(
                "unknown action `{action}`; the segment destination offers {}",
                ACTIONS.join(", ")
            )
        })
    }

    /// Collectors accept any write key for an empty batch, so this proves the URL answers.
    async fn check(&self) -> Result<(), DestinationError> {
        let request = self
            .delivery
            .client
            .post(self.batch_url.clone())
            .headers(self.headers())
            .header("content-type", "application/json")
            .body(r#"{"batch":[]}"#);
        check_request(
            &self.name,
            "Segment",
            &self.delivery.client,
            request,
            "check `write_key`",
        )
        .await
    }

    async fn open(&self, _run: &RunInfo) -> Result<Box<dyn DestinationWriter>, DestinationError> {
        Ok(HttpWriter::boxed(
            SegmentApi {
                url: self.batch_url.clone(),
                headers: self.headers(),
            },
            &self.delivery,
        ))
    }
}

struct SegmentApi {
    url: reqwest::Url,
    headers: HeaderMap,
}

#[async_trait]
impl VendorApi for SegmentApi {
    fn vendor(&self) -> &'static str {
        "Segment"
    }

    fn auth_hint(&self) -> &'static str {
        "check `write_key` (it is the source's write key, sent as the basic-auth user name)"
    }

    async fn request(&self, batch: &OutgoingBatch, range: Range<usize>) -> Result<ApiRequest, String> {
        let mut body = Vec::with_capacity(batch.bodies.bytes_of(range.clone()) + range.len() + 64);
        body.extend_from_slice(b"{\"batch\":");
        write_array(&mut body, range.map(|i| batch.bodies.get(i)));
        body.extend_from_slice(b",\"sentAt\":\"");
        body.extend_from_slice(
            chrono::Utc::now()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                .as_bytes(),
        );
        body.extend_from_slice(b"\"}");
        Ok(ApiRequest::json(
            Method::POST,
            self.url.clone(),
            self.headers.clone(),
            body,
        ))
    }
}
