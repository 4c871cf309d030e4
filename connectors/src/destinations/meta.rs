//! `type: meta`: Meta's Conversions API (`POST /{version}/{pixel_id}/events`): each record is
//! one server event, offline or enriched conversions that Meta matches to people by hashed
//! customer information.
//!
//! ```yaml
//! destinations:
//!   meta:
//!     type: meta
//!     access_token: ${META_ACCESS_TOKEN}    # a system user token with ads_management
//!     pixel_id: "1234567890"                # the dataset (pixel) the events go to
//! mappings:
//!   purchases_to_meta:
//!     model: purchases
//!     destination: meta
//!     action: conversions
//!     fields:
//!       event_time: purchased_at            # sent as Unix seconds
//!       user_data.em: email                 # hashed: never sent raw
//!       user_data.ph: phone
//!       value: amount                       # into custom_data
//!       currency: currency
//!     constants: { event_name: Purchase, action_source: system_generated }
//! ```
//!
//! Up to 1,000 events a request. `event_id` is sluice's message id unless mapped, so Meta
//! deduplicates an event sluice sends again (and one the pixel also sent with that id).
//! Customer information under `user_data` is normalised and SHA-256 hashed as Meta asks (`em`,
//! `ph`, `fn`, `ln`, `ct`, `st`, `zp`, `country`, `ge`, `db`, `external_id`) unless mapped with
//! an explicit `as:`; `client_ip_address`, `client_user_agent`, `fbc` and `fbp` go as they are.
//! Fields outside the event's own go into `custom_data`. Meta refuses a whole request for one
//! bad event (code 100), so the delivery layer splits it to find that event, which fails alone
//! with Meta's message. Throttling (codes 4, 17, 32, 341, 613, 80000–80014) waits and retries;
//! an expired or invalid token (code 190) stops the run.
//!
//! Action `audience` keeps a Custom Audience's members: `options: {audience_name: ...}` finds
//! the audience in `ad_account_id` or creates it on the first run (`{audience_id: ...}` names
//! an existing one). Fields are Meta's schema keys (`EMAIL`, `PHONE`, `FN`, `LN`, `CT`, `ST`,
//! `ZIP`, `COUNTRY`, `GEN`, `DOBY`, `EXTERN_ID`, `MADID`, ...), hashed as Meta asks but for
//! `EXTERN_ID` and `MADID`. Added and changed rows join (`POST /{audience}/users`); with mode
//! `mirror`, deleted rows leave (`DELETE`). Each request of up to 10,000 members is one whole
//! session.

use std::ops::Range;

use async_trait::async_trait;
use reqwest::Method;
use reqwest::header::HeaderMap;
use schemars::JsonSchema;
use serde::Deserialize;
use sluice_engine::destination::{
    ActionSpec, Destination, DestinationWriter, OutgoingBatch, PayloadShape, RunInfo, SendOutcome, SyncMode,
    ValueFormat,
};
use sluice_engine::{ConfigString, DestinationError, Secret};

use crate::destinations::http::{
    ApiRequest, DeliverySettings, HttpAnswer, HttpDelivery, HttpWriter, VendorApi, VendorLimits, snippet,
};

/// The Graph API version used unless `api_version` says otherwise.
pub const DEFAULT_API_VERSION: &str = "v26.0";

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MetaConfig {
    /// A system user access token with `ads_management` on the dataset (pixel).
    pub access_token: Secret,
    /// The dataset (pixel) id the events go to (action `conversions`).
    #[serde(default)]
    pub pixel_id: Option<ConfigString>,
    /// The ad account (`act_123` or `123`) where action `audience` finds or creates its
    /// audience by name.
    #[serde(default)]
    pub ad_account_id: Option<ConfigString>,
    /// The Graph API version (default v26.0).
    #[serde(default)]
    pub api_version: Option<String>,
    /// Events Manager's test code: events show under Test Events (Meta still processes them).
    #[serde(default)]
    pub test_event_code: Option<ConfigString>,
    /// The Graph API's address (default https://graph.facebook.com).
    #[serde(default)]
    pub url: Option<ConfigString>,
    #[serde(default)]
    pub delivery: DeliverySettings,
}

pub const ACTIONS: &[&str] = &["conversions", "audience"];
const AUTH_HINT: &str = "the access token is invalid, expired or lacks ads_management on this dataset: generate a system user token in Business Settings";

/// The server event's own fields; any other mapped field goes into `custom_data`.
const EVENT_FIELDS: &[&str] = &[
    "event_name",
    "event_time",
    "event_id",
    "event_source_url",
    "action_source",
    "opt_out",
    "user_data",
    "custom_data",
    "app_data",
    "referrer_url",
    "original_event_data",
    "data_processing_options",
    "data_processing_options_country",
    "data_processing_options_state",
];

/// Customer information Meta takes only hashed, and how each is normalised.
const HASHED: &[(&str, Option<ValueFormat>)] = &[
    ("user_data.em", Some(ValueFormat::Sha256Email)),
    ("user_data.ph", Some(ValueFormat::Sha256PhoneDigits)),
    ("user_data.fn", Some(ValueFormat::Sha256Name)),
    ("user_data.ln", Some(ValueFormat::Sha256Name)),
    ("user_data.ct", Some(ValueFormat::Sha256City)),
    ("user_data.st", Some(ValueFormat::Sha256State)),
    ("user_data.zp", Some(ValueFormat::Sha256Zip)),
    ("user_data.country", Some(ValueFormat::Sha256Country)),
    ("user_data.ge", Some(ValueFormat::Sha256Gender)),
    ("user_data.db", Some(ValueFormat::Sha256DateOfBirth)),
    ("user_data.external_id", Some(ValueFormat::Sha256)),
];

/// What Meta matches an event to a person by: a record needs one of these.
const MATCH_KEYS: &[&str] = &[
    "user_data.em",
    "user_data.ph",
    "user_data.external_id",
    "user_data.fbc",
    "user_data.fbp",
    "user_data.client_ip_address",
    "user_data.madid",
];

/// A Custom Audience's schema keys (the mapping's field names) and how each is normalised
/// before hashing; `EXTERN_ID` and `MADID` go as they are, as Meta asks.
const AUDIENCE_KEYS: &[(&str, Option<ValueFormat>)] = &[
    ("EMAIL", Some(ValueFormat::Sha256Email)),
    ("PHONE", Some(ValueFormat::Sha256PhoneDigits)),
    ("FN", Some(ValueFormat::Sha256Name)),
    ("LN", Some(ValueFormat::Sha256Name)),
    ("FI", Some(ValueFormat::Sha256Name)),
    ("CT", Some(ValueFormat::Sha256City)),
    ("ST", Some(ValueFormat::Sha256State)),
    ("ZIP", Some(ValueFormat::Sha256Zip)),
    ("COUNTRY", Some(ValueFormat::Sha256Country)),
    ("GEN", Some(ValueFormat::Sha256Gender)),
    ("DOBY", Some(ValueFormat::Sha256)),
    ("DOBM", Some(ValueFormat::Sha256)),
    ("DOBD", Some(ValueFormat::Sha256)),
    ("EXTERN_ID", None),
    ("MADID", None),
];

/// A mapping's `options:` for action `audience`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AudienceOptions {
    /// An existing Custom Audience.
    #[serde(default)]
    audience_id: Option<String>,
    /// Or the audience's name: found in the ad account, or created on the first run.
    #[serde(default)]
    audience_name: Option<String>,
    #[serde(default)]
    description: Option<String>,
}

impl AudienceOptions {
    fn parse(options: &serde_json::Map<String, serde_json::Value>) -> Result<Self, String> {
        let parsed: Self = serde_json::from_value(serde_json::Value::Object(options.clone())).map_err(|e| {
            format!("Meta audience `options`: {e} (write `options: {{audience_name: Newsletter subscribers}}` or `{{audience_id: \"2385...\"}}`)")
        })?;
        match (&parsed.audience_id, &parsed.audience_name) {
            (Some(id), None) if !id.trim().is_empty() && id.trim().chars().all(|c| c.is_ascii_digit()) => Ok(parsed),
            (None, Some(name)) if !name.trim().is_empty() => Ok(parsed),
            _ => Err("a Meta audience mapping names its audience: `options: {audience_name: ...}` (found or created in `ad_account_id`), or `{audience_id: ...}` (a numeric id)".into()),
        }
    }
}

/// The Graph API's addresses, with the token.
#[derive(Clone)]
struct Graph {
    base: reqwest::Url,
    version: String,
    token: String,
}

impl Graph {
    /// `/{version}/{path}` with the token as `access_token`, as Meta documents it (URLs are
    /// shown with it hidden, and requests are never logged).
    fn url(&self, path: &str) -> Result<reqwest::Url, String> {
        let mut url = self
            .base
            .join(&format!("/{}/{path}", self.version))
            .map_err(|e| e.to_string())?;
        url.query_pairs_mut().append_pair("access_token", &self.token);
        Ok(url)
    }
}

pub struct MetaDestination {
    name: String,
    graph: Graph,
    pixel_id: Option<String>,
    ad_account: Option<String>,
    test_event_code: Option<String>,
    delivery: HttpDelivery,
    audience_delivery: HttpDelivery,
}

impl MetaDestination {
    pub fn new(name: &str, config: MetaConfig) -> Result<Self, String> {
        let base = match &config.url {
            Some(url) => super::http::parse_url_option("url", url.expose())?,
            None => super::http::parse_url_option("url", "https://graph.facebook.com")?,
        };
        let version = config.api_version.as_deref().unwrap_or(DEFAULT_API_VERSION);
        if !version.starts_with('v') || version[1..].parse::<f32>().is_err() {
            return Err(format!(
                "`api_version: {version}` is not a Graph API version; write it as {DEFAULT_API_VERSION}"
            ));
        }
        let pixel_id = config.pixel_id.as_ref().map(|p| p.expose().trim().to_string());
        if let Some(pixel_id) = &pixel_id
            && (pixel_id.is_empty() || !pixel_id.chars().all(|c| c.is_ascii_digit()))
        {
            return Err("`pixel_id` is the dataset's numeric id, as Events Manager shows it".into());
        }
        let ad_account = config.ad_account_id.as_ref().map(|a| {
            let id = a.expose().trim();
            id.strip_prefix("act_").unwrap_or(id).to_string()
        });
        if let Some(account) = &ad_account
            && (account.is_empty() || !account.chars().all(|c| c.is_ascii_digit()))
        {
            return Err("`ad_account_id` is the ad account's id (`act_123` or `123`)".into());
        }
        let limits = |max_records: usize| VendorLimits::per_request(max_records, 4 * 1024 * 1024);
        // 1,000 events a Conversions API request; 10,000 members an audience request.
        let delivery = HttpDelivery::new(&config.delivery, limits(1000))?;
        let audience_delivery = HttpDelivery::new(&config.delivery, limits(10_000))?;
        Ok(Self {
            name: name.to_string(),
            graph: Graph {
                base,
                version: version.to_string(),
                token: config.access_token.expose().to_string(),
            },
            pixel_id,
            ad_account,
            test_event_code: config
                .test_event_code
                .as_ref()
                .map(|c| c.expose().to_string())
                .filter(|c| !c.is_empty()),
            delivery,
            audience_delivery,
        })
    }
}

#[async_trait]
impl Destination for MetaDestination {
    fn kind(&self) -> &'static str {
        "meta"
    }

    fn action(
        &self,
        action: Option<&str>,
        options: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Option<ActionSpec>, String> {
        match action.unwrap_or("conversions") {
            "conversions" => {
                crate::destinations::http::no_options("meta", options)?;
                if self.pixel_id.is_none() {
                    return Err(
                        "action `conversions` sends events to a dataset: give the destination its `pixel_id`"
                            .into(),
                    );
                }
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
            "audience" => {
                let parsed = AudienceOptions::parse(options)?;
                if parsed.audience_name.is_some() && self.ad_account.is_none() {
                    return Err("an audience named by `audience_name` is found or created in an ad account: give the destination its `ad_account_id`".into());
                }
                let keys: Vec<&str> = AUDIENCE_KEYS.iter().map(|(k, _)| *k).collect();
                let shape = PayloadShape::default()
                    .top_level(&keys)
                    .identity(&keys)
                    .formats(AUDIENCE_KEYS);
                Ok(Some(
                    ActionSpec::new("audience", shape)
                        .modes(&[SyncMode::Upsert, SyncMode::Mirror])
                        .deletes(),
                ))
            }
            other => Err(format!(
                "unknown action `{other}`; the meta destination offers {}",
                ACTIONS.join(", ")
            )),
        }
    }

    /// Reads the dataset: a refused token or an unknown dataset says so.
    async fn check(&self) -> Result<(), DestinationError> {
        let target = match (&self.pixel_id, &self.ad_account) {
            (Some(pixel), _) => pixel.clone(),
            (None, Some(account)) => format!("act_{account}"),
            (None, None) => {
                return Err(DestinationError::Config {
                    destination: self.name.clone(),
                    message: "give `pixel_id` (conversions) or `ad_account_id` (audiences)".into(),
                });
            }
        };
        let mut url = self
            .graph
            .url(&target)
            .map_err(|message| DestinationError::Config {
                destination: self.name.clone(),
                message,
            })?;
        url.query_pairs_mut().append_pair("fields", "id");
        let response =
            self.delivery
                .client
                .get(url)
                .send()
                .await
                .map_err(|e| DestinationError::Unreachable {
                    destination: self.name.clone(),
                    message: format!("Meta: {}", crate::destinations::http::describe_reqwest_error(&e)),
                })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let body = response.text().await.unwrap_or_default();
        let message = failure(
            status,
            &body,
            "check `pixel_id` (or `ad_account_id`), and that the token's system user is assigned it",
        );
        Err(DestinationError::Unreachable {
            destination: self.name.clone(),
            message,
        })
    }

    async fn open(&self, run: &RunInfo) -> Result<Box<dyn DestinationWriter>, DestinationError> {
        let config = |message: String| DestinationError::Config {
            destination: self.name.clone(),
            message,
        };
        if run.action.as_deref() == Some("audience") {
            let options = AudienceOptions::parse(&run.options).map_err(config)?;
            let audience = match (&options.audience_id, &options.audience_name) {
                (Some(id), _) => id.trim().to_string(),
                // A dry run creates nothing: its requests name the audience.
                (None, Some(name)) if run.dry_run => format!("audience:{name}"),
                (None, Some(name)) => {
                    self.find_or_create_audience(name.trim(), options.description.as_deref())
                        .await?
                }
                (None, None) => return Err(config("no audience named".into())),
            };
            return Ok(HttpWriter::boxed(
                AudienceApi {
                    users: self.graph.url(&format!("{audience}/users")).map_err(config)?,
                },
                &self.audience_delivery,
            ));
        }
        let pixel = self
            .pixel_id
            .as_deref()
            .ok_or_else(|| config("action `conversions` needs the destination's `pixel_id`".into()))?;
        Ok(HttpWriter::boxed(
            MetaApi {
                events: self.graph.url(&format!("{pixel}/events")).map_err(config)?,
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

impl MetaDestination {
    /// The id of the ad account's Custom Audience named `name`, created (`subtype: CUSTOM`,
    /// from a customer list) when there is none.
    async fn find_or_create_audience(
        &self,
        name: &str,
        description: Option<&str>,
    ) -> Result<String, DestinationError> {
        let failed = |message: String| DestinationError::Unreachable {
            destination: self.name.clone(),
            message,
        };
        let account = self
            .ad_account
            .as_deref()
            .ok_or_else(|| failed("no `ad_account_id` to find the audience in".into()))?;
        let answer = |status, body: &str| {
            failure(
                status,
                body,
                "check `ad_account_id`, and that the token's system user is assigned it",
            )
        };
        #[derive(Deserialize)]
        struct Page {
            #[serde(default)]
            data: Vec<Audience>,
            #[serde(default)]
            paging: Option<Paging>,
        }
        #[derive(Deserialize)]
        struct Audience {
            id: String,
            #[serde(default)]
            name: String,
        }
        #[derive(Deserialize)]
        struct Paging {
            #[serde(default)]
            next: Option<String>,
        }
        let mut url = self
            .graph
            .url(&format!("act_{account}/customaudiences"))
            .map_err(failed)?;
        url.query_pairs_mut()
            .append_pair("fields", "id,name")
            .append_pair("limit", "500");
        // Pages of 500; an account holds at most 500 customer-list audiences.
        for _ in 0..20 {
            let response = self.delivery.client.get(url.clone()).send().await.map_err(|e| {
                failed(format!(
                    "Meta: {}",
                    crate::destinations::http::describe_reqwest_error(&e)
                ))
            })?;
            let status = response.status();
            let body = response.text().await.unwrap_or_default();
            if !status.is_success() {
                return Err(failed(answer(status, &body)));
            }
            let page: Page = serde_json::from_str(&body).map_err(|e| {
                failed(format!(
                    "Meta answered the audience list with {e}{}",
                    snippet(&body)
                ))
            })?;
            if let Some(found) = page.data.into_iter().find(|a| a.name == name) {
                return Ok(found.id);
            }
            match page.paging.and_then(|p| p.next).map(|n| reqwest::Url::parse(&n)) {
                Some(Ok(next)) => url = next,
                _ => break,
            }
        }
        let mut body = serde_json::json!({
            "name": name,
            "subtype": "CUSTOM",
            "customer_file_source": "USER_PROVIDED_ONLY",
        });
        if let Some(description) = description {
            body["description"] = serde_json::Value::String(description.to_string());
        }
        let response = self
            .delivery
            .client
            .post(
                self.graph
                    .url(&format!("act_{account}/customaudiences"))
                    .map_err(failed)?,
            )
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| {
                failed(format!(
                    "Meta: {}",
                    crate::destinations::http::describe_reqwest_error(&e)
                ))
            })?;
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(failed(answer(status, &body)));
        }
        #[derive(Deserialize)]
        struct Created {
            id: String,
        }
        let created: Created = serde_json::from_str(&body).map_err(|e| {
            failed(format!(
                "Meta answered the new audience with {e}{}",
                snippet(&body)
            ))
        })?;
        tracing::info!(
            audience = name,
            id = created.id,
            "created the Meta Custom Audience"
        );
        Ok(created.id)
    }
}

/// What a refused call outside the delivery layer says: Meta's error, with what to do for a
/// refused token (code 190) or an unknown or unassigned object (code 100, `on_unknown`).
fn failure(status: reqwest::StatusCode, body: &str, on_unknown: &str) -> String {
    match GraphError::parse(body) {
        Some(error) if error.code == 190 => format!("Meta: {}; {AUTH_HINT}", error.describe()),
        Some(error) if error.code == 100 => format!("Meta: {}; {on_unknown}", error.describe()),
        Some(error) => format!("Meta: {}", error.describe()),
        None => format!("HTTP {status} from Meta{}", snippet(body)),
    }
}

/// Action `audience`: members added (`POST /{audience}/users`) and removed (`DELETE`), each
/// request a whole session of its own.
struct AudienceApi {
    users: reqwest::Url,
}

#[derive(Deserialize)]
struct UsersAnswer {
    #[serde(default)]
    num_received: Option<usize>,
    #[serde(default)]
    num_invalid_entries: Option<usize>,
}

#[async_trait]
impl VendorApi for AudienceApi {
    fn vendor(&self) -> &'static str {
        "Meta"
    }

    fn auth_hint(&self) -> &'static str {
        AUTH_HINT
    }

    /// `{"payload": {"schema": [...], "data": [[...], ...]}, "session": {...}}`: the schema is
    /// the mapped keys, each row their values in that order (`""` for none).
    async fn request(&self, batch: &OutgoingBatch, range: Range<usize>) -> Result<ApiRequest, String> {
        let remove = batch.actions[range.start] == sluice_engine::destination::RecordAction::Delete;
        let mut schema: Vec<String> = Vec::new();
        let mut data = Vec::with_capacity(range.len());
        for i in range.clone() {
            let member: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(batch.ids.get(i)).map_err(|e| e.to_string())?;
            if schema.is_empty() {
                schema = member.keys().cloned().collect();
            }
            let row: Vec<serde_json::Value> = schema
                .iter()
                .map(|key| match member.get(key) {
                    Some(serde_json::Value::String(text)) => serde_json::Value::String(text.clone()),
                    Some(serde_json::Value::Null) | None => serde_json::Value::String(String::new()),
                    Some(other) => serde_json::Value::String(other.to_string()),
                })
                .collect();
            data.push(serde_json::Value::Array(row));
        }
        // A positive int64 naming this request's session (one batch, the last).
        let session_id = uuid::Uuid::now_v7().as_u64_pair().1 & (i64::MAX as u64);
        let body = serde_json::json!({
            "payload": {"schema": schema, "data": data},
            "session": {"session_id": session_id, "batch_seq": 1, "last_batch_flag": true, "estimated_num_total": range.len()},
        });
        Ok(ApiRequest::json(
            if remove { Method::DELETE } else { Method::POST },
            self.users.clone(),
            HeaderMap::new(),
            body.to_string().into_bytes(),
        ))
    }

    /// `{"audience_id", "session_id", "num_received", "num_invalid_entries",
    /// "invalid_entry_samples"}`: Meta says how many entries it could not use, not which, so
    /// only a request none of whose entries it could use fails its records.
    fn on_success(&self, answer: &HttpAnswer, _batch: &OutgoingBatch, range: Range<usize>) -> SendOutcome {
        match serde_json::from_str::<UsersAnswer>(&answer.body) {
            Ok(UsersAnswer {
                num_received: Some(received),
                num_invalid_entries: Some(invalid),
            }) if invalid > 0 => {
                if invalid >= range.len() && received <= range.len() {
                    return SendOutcome::Rejected {
                        reason: format!(
                            "Meta could not use any of the {} entries (num_invalid_entries {invalid}); check the mapped keys' formats",
                            range.len()
                        ),
                    };
                }
                tracing::warn!(
                    invalid,
                    sent = range.len(),
                    "Meta could not use some audience entries (it does not say which)"
                );
                SendOutcome::Accepted
            }
            _ => SendOutcome::Accepted,
        }
    }

    fn on_error(&self, answer: &HttpAnswer, batch: &OutgoingBatch, range: Range<usize>) -> SendOutcome {
        classify_graph_error(answer, batch, range)
    }
}

struct MetaApi {
    events: reqwest::Url,
    /// `test_event_code`, when there is one.
    envelope: Vec<(&'static str, serde_json::Value)>,
}

/// Graph API's error envelope: `{"error": {"message", "type", "code", "error_subcode",
/// "error_user_title", "error_user_msg", "is_transient", "fbtrace_id"}}`.
#[derive(Debug, Deserialize)]
struct GraphError {
    #[serde(default)]
    message: String,
    #[serde(default)]
    code: i64,
    #[serde(default)]
    error_subcode: Option<i64>,
    #[serde(default)]
    error_user_msg: Option<String>,
    #[serde(default)]
    is_transient: bool,
    #[serde(default)]
    fbtrace_id: Option<String>,
}

impl GraphError {
    fn parse(body: &str) -> Option<Self> {
        #[derive(Deserialize)]
        struct Envelope {
            error: GraphError,
        }
        serde_json::from_str::<Envelope>(body).ok().map(|e| e.error)
    }

    fn describe(&self) -> String {
        let mut text = self.message.clone();
        if let Some(user) = self.error_user_msg.as_deref().filter(|m| !m.is_empty()) {
            text.push_str(": ");
            text.push_str(user);
        }
        text.push_str(&format!(" (code {}", self.code));
        if let Some(subcode) = self.error_subcode {
            text.push_str(&format!(", subcode {subcode}"));
        }
        if let Some(trace) = &self.fbtrace_id {
            text.push_str(&format!(", fbtrace_id {trace}"));
        }
        text.push(')');
        text
    }
}

#[derive(Deserialize)]
struct EventsAnswer {
    #[serde(default)]
    events_received: Option<usize>,
}

#[async_trait]
impl VendorApi for MetaApi {
    fn vendor(&self) -> &'static str {
        "Meta"
    }

    fn auth_hint(&self) -> &'static str {
        AUTH_HINT
    }

    async fn request(&self, batch: &OutgoingBatch, range: Range<usize>) -> Result<ApiRequest, String> {
        let body = crate::destinations::http::array_envelope(
            "data",
            range.clone().map(|i| batch.bodies.get(i)),
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

    /// `{"events_received": n, "messages": [], "fbtrace_id": "..."}`: Meta takes a request
    /// whole or not at all.
    fn on_success(&self, answer: &HttpAnswer, _batch: &OutgoingBatch, range: Range<usize>) -> SendOutcome {
        match serde_json::from_str::<EventsAnswer>(&answer.body) {
            Ok(EventsAnswer {
                events_received: Some(received),
            }) if received < range.len() => SendOutcome::Invalid {
                reason: format!(
                    "Meta received {received} of the {} events sent{}",
                    range.len(),
                    snippet(&answer.body)
                ),
            },
            _ => SendOutcome::Accepted,
        }
    }

    /// Classified by the error's code, not the HTTP status (Meta answers 400 for throttling
    /// and for expired tokens alike).
    fn on_error(&self, answer: &HttpAnswer, batch: &OutgoingBatch, range: Range<usize>) -> SendOutcome {
        classify_graph_error(answer, batch, range)
    }
}

/// A Graph API error, classified by Meta's code, not the HTTP status (Meta answers 400 for
/// throttling and for expired tokens alike).
fn classify_graph_error(answer: &HttpAnswer, _batch: &OutgoingBatch, _range: Range<usize>) -> SendOutcome {
    {
        let Some(error) = GraphError::parse(&answer.body) else {
            return crate::destinations::http::classify("Meta", answer, AUTH_HINT);
        };
        let reason = format!("Meta: {}", error.describe());
        match error.code {
            190 | 102 => SendOutcome::Fatal {
                reason: format!("{reason}; {AUTH_HINT}"),
            },
            10 | 200..=299 => SendOutcome::Fatal {
                reason: format!(
                    "{reason}; the token's system user lacks a permission on this dataset (ads_management)"
                ),
            },
            4 | 17 | 32 | 341 | 613 | 80000..=80014 => SendOutcome::RateLimited {
                reason,
                after: answer.retry_after(),
            },
            1 | 2 => SendOutcome::Retry {
                reason,
                after: answer.retry_after(),
            },
            _ if error.is_transient => SendOutcome::Retry {
                reason,
                after: answer.retry_after(),
            },
            // An invalid parameter: one event may be the cause, so the request is split.
            100 => SendOutcome::Invalid { reason },
            // "Something went wrong" updating an audience: try again.
            2650 if error.error_subcode == Some(1870148) => SendOutcome::Retry {
                reason,
                after: answer.retry_after(),
            },
            _ if answer.status.is_server_error() => SendOutcome::Retry {
                reason,
                after: answer.retry_after(),
            },
            _ => SendOutcome::Rejected { reason },
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

    fn api() -> MetaApi {
        MetaApi {
            events: reqwest::Url::parse("https://graph.facebook.com/v26.0/1/events").unwrap(),
            envelope: Vec::new(),
        }
    }

    fn outcome(status: u16, body: &str) -> SendOutcome {
        let batch = OutgoingBatch::empty();
        api().on_error(&answer(status, body), &batch, 0..1)
    }

    #[test]
    fn errors_are_classified_by_meta_s_code_not_the_status() {
        let expired = r#"{"error":{"message":"Error validating access token: Session has expired on Friday, 04-Dec-26 10:00:00 PST.","type":"OAuthException","code":190,"error_subcode":463,"fbtrace_id":"AbC"}}"#;
        assert!(
            matches!(outcome(400, expired), SendOutcome::Fatal { reason } if reason.contains("code 190, subcode 463") && reason.contains("system user token"))
        );
        let throttled = r#"{"error":{"message":"(#80004) There have been too many calls to this ad-account. Wait a bit and try again.","type":"OAuthException","code":80004,"error_subcode":2446079,"fbtrace_id":"AbC"}}"#;
        assert!(matches!(outcome(400, throttled), SendOutcome::RateLimited { .. }));
        let app_limit = r#"{"error":{"message":"(#4) Application request limit reached","type":"OAuthException","is_transient":true,"code":4,"fbtrace_id":"AbC"}}"#;
        assert!(matches!(outcome(403, app_limit), SendOutcome::RateLimited { .. }));
        let invalid = r#"{"error":{"message":"Invalid parameter","type":"OAuthException","code":100,"error_subcode":2804019,"error_user_title":"Invalid event","error_user_msg":"The event_name is missing","fbtrace_id":"AbC"}}"#;
        assert!(
            matches!(outcome(400, invalid), SendOutcome::Invalid { reason } if reason.contains("The event_name is missing"))
        );
        let down = r#"{"error":{"message":"An unknown error occurred","type":"OAuthException","code":1,"fbtrace_id":"AbC"}}"#;
        assert!(matches!(outcome(500, down), SendOutcome::Retry { .. }));
        assert!(matches!(
            outcome(502, "<html>bad gateway</html>"),
            SendOutcome::Retry { .. }
        ));
    }

    #[test]
    fn an_audience_mapping_names_its_audience_and_a_wholly_unusable_request_fails() {
        let options = |value: serde_json::Value| AudienceOptions::parse(value.as_object().unwrap());
        assert!(options(serde_json::json!({"audience_name": "Lead scorers"})).is_ok());
        assert!(options(serde_json::json!({"audience_id": "23850000000000999"})).is_ok());
        assert!(
            options(serde_json::json!({}))
                .unwrap_err()
                .contains("names its audience")
        );
        assert!(options(serde_json::json!({"audience_id": "list-1"})).is_err());
        assert!(
            options(serde_json::json!({"audience": "x"}))
                .unwrap_err()
                .contains("audience_name")
        );
        let api = AudienceApi {
            users: reqwest::Url::parse("https://graph.facebook.com/v26.0/1/users").unwrap(),
        };
        let batch = OutgoingBatch::empty();
        let answer = |invalid: usize| HttpAnswer {
            status: reqwest::StatusCode::OK,
            headers: HeaderMap::new(),
            body: format!(
                r#"{{"audience_id":"1","session_id":"9","num_received":2,"num_invalid_entries":{invalid},"invalid_entry_samples":{{}}}}"#
            ),
        };
        assert!(matches!(
            api.on_success(&answer(0), &batch, 0..2),
            SendOutcome::Accepted
        ));
        assert!(matches!(
            api.on_success(&answer(1), &batch, 0..2),
            SendOutcome::Accepted
        ));
        assert!(matches!(
            api.on_success(&answer(2), &batch, 0..2),
            SendOutcome::Rejected { .. }
        ));
    }

    #[test]
    fn events_go_a_thousand_a_request_and_audience_members_ten_thousand() {
        let config: MetaConfig = serde_json::from_value(serde_json::json!({
            "access_token": "token", "pixel_id": "1", "ad_account_id": "act_2"
        }))
        .unwrap();
        let meta = MetaDestination::new("meta", config).unwrap();
        assert_eq!(meta.delivery.policy.max_records, 1000);
        assert_eq!(meta.audience_delivery.policy.max_records, 10_000);
        let bad: MetaConfig =
            serde_json::from_value(serde_json::json!({"access_token": "token", "pixel_id": "px-1"})).unwrap();
        assert!(
            MetaDestination::new("meta", bad)
                .err()
                .unwrap_or_default()
                .contains("pixel_id")
        );
    }

    #[test]
    fn a_request_is_taken_whole() {
        let batch = OutgoingBatch::empty();
        let api = api();
        assert!(matches!(
            api.on_success(
                &answer(200, r#"{"events_received":2,"messages":[],"fbtrace_id":"x"}"#),
                &batch,
                0..2
            ),
            SendOutcome::Accepted
        ));
        assert!(matches!(
            api.on_success(
                &answer(200, r#"{"events_received":1,"messages":[],"fbtrace_id":"x"}"#),
                &batch,
                0..2
            ),
            SendOutcome::Invalid { .. }
        ));
    }
}
