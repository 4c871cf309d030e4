//! `type: google_ads`: offline conversions and Customer Match lists in Google Ads, through
//! Google's Data Manager API (`datamanager.googleapis.com`), the API Google names for both
//! since the Google Ads API closed its conversion uploads (2026-06-15) and Customer Match
//! (2026-04-01) to new adopters.
//!
//! ```yaml
//! destinations:
//!   google_ads:
//!     type: google_ads
//!     service_account: ${GOOGLE_CREDENTIALS}  # a service account key, or authorized_user JSON
//!     customer_id: 123-456-7890               # the Google Ads account
//!     login_customer_id: 987-654-3210         # the manager account the credentials act through
//!     consent: { ad_user_data: granted, ad_personalization: granted }
//! mappings:
//!   purchases_to_google:
//!     model: purchases
//!     destination: google_ads
//!     action: conversions
//!     options: { conversion_action_id: "6543210987" }
//!     fields:
//!       eventTimestamp: purchased_at          # RFC 3339
//!       adIdentifiers.gclid: gclid
//!       email: email                          # hashed: never sent raw
//!       conversionValue: amount
//!       currency: currency
//!     constants: { eventSource: WEB }
//!   vips_to_customer_match:
//!     model: vips
//!     destination: google_ads
//!     action: customer_match
//!     mode: mirror
//!     options: { user_list_name: VIP customers }
//!     fields: { email: email, phone: phone }
//! ```
//!
//! Action `conversions` posts up to 2,000 events a request to `events:ingest`. An event's
//! `transactionId` is the model's key unless mapped, so a changed row restates its conversion
//! (Google overwrites value and currency of the same transaction) rather than adding another.
//! `email`, `phone`, `first_name`, `last_name`, `region_code` and `postal_code` become the
//! event's `userData.userIdentifiers` (email, phone and names hashed as Google asks, Gmail
//! addresses without dots or `+tag`); any field that is not one of the event's own becomes a
//! custom variable.
//!
//! Action `customer_match` keeps a Customer Match list's members: `options: {user_list_name:
//! ...}` finds the list in the account or creates it on the first run (`{user_list_id: ...}`
//! names an existing one). Added and changed rows are ingested (`audienceMembers:ingest`, up to
//! 10,000 a request); with mode `mirror`, deleted rows are removed (`audienceMembers:remove`)
//! with the values the list last received. Google requires the account's acceptance of the
//! Customer Match terms with every upload, so the destination must say
//! `customer_match_terms_accepted: true`.
//!
//! Google refuses a whole request when one record fails validation and names it in
//! `fieldViolations` (`events[3].user_data...`): those records fail with Google's reasons and
//! the rest go again. 429 waits; an expired access token is fetched again once; refused
//! credentials or a disabled API stop the run with what to do.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::Method;
use reqwest::header::{AUTHORIZATION, HeaderMap};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use sluice_engine::destination::{
    ActionSpec, Destination, DestinationWriter, OutgoingBatch, PayloadShape, RecordAction, RecordFailure,
    RunInfo, SendOutcome, SyncMode, ValueFormat,
};
use sluice_engine::source::ConnectorEnv;
use sluice_engine::{ConfigString, DestinationError, Secret};

use crate::destinations::http::{
    ApiRequest, DeliverySettings, HttpAnswer, HttpDelivery, HttpWriter, TokenRefusals, VendorApi,
    VendorLimits, secret_header, snippet,
};
use crate::google_auth::GoogleAuth;

const SCOPE: &str = "https://www.googleapis.com/auth/datamanager";
const AUTH_HINT: &str = "check the Google credentials: they need the datamanager scope (https://www.googleapis.com/auth/datamanager), and their user or service account access to the Google Ads account (through `login_customer_id` when access comes from a manager account)";

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GoogleAdsConfig {
    /// Google credentials: a service account key, or an `authorized_user` credential (an OAuth
    /// client's id and secret with a refresh token), or an `external_account`; its JSON text or
    /// the path of its file. Without it: `GOOGLE_APPLICATION_CREDENTIALS`, else the metadata
    /// server.
    #[serde(default)]
    pub service_account: Option<Secret>,
    /// The Google Ads account the conversions and lists belong to (`123-456-7890`).
    pub customer_id: ConfigString,
    /// The manager account the credentials reach the account through, if any.
    #[serde(default)]
    pub login_customer_id: Option<ConfigString>,
    /// The consent sent with every request (a mapped `consent.adUserData` of an event
    /// overrides it): required for people in the EEA.
    #[serde(default)]
    pub consent: Option<ConsentConfig>,
    /// Whether the account accepted Google's Customer Match terms; Google requires saying so
    /// with every Customer Match upload.
    #[serde(default)]
    pub customer_match_terms_accepted: bool,
    /// The Data Manager API's address (default https://datamanager.googleapis.com).
    #[serde(default)]
    pub url: Option<ConfigString>,
    #[serde(default)]
    pub delivery: DeliverySettings,
}

#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsentConfig {
    /// Consent to sending user data to Google for advertising.
    #[serde(default)]
    pub ad_user_data: Option<Grant>,
    /// Consent to personalised advertising.
    #[serde(default)]
    pub ad_personalization: Option<Grant>,
}

#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Grant {
    Granted,
    Denied,
}

impl ConsentConfig {
    /// Data Manager's `Consent`: `{"adUserData": "CONSENT_GRANTED", ...}`.
    fn to_json(&self) -> Option<Value> {
        let status = |grant: Grant| match grant {
            Grant::Granted => "CONSENT_GRANTED",
            Grant::Denied => "CONSENT_DENIED",
        };
        let mut consent = Map::new();
        if let Some(grant) = self.ad_user_data {
            consent.insert("adUserData".into(), status(grant).into());
        }
        if let Some(grant) = self.ad_personalization {
            consent.insert("adPersonalization".into(), status(grant).into());
        }
        (!consent.is_empty()).then_some(Value::Object(consent))
    }
}

pub const ACTIONS: &[&str] = &["conversions", "customer_match"];

/// An event's own fields (Data Manager's `Event`); other mapped fields become custom
/// variables.
const EVENT_FIELDS: &[&str] = &[
    "transactionId",
    "eventTimestamp",
    "lastUpdatedTimestamp",
    "eventSource",
    "eventName",
    "conversionValue",
    "conversionCount",
    "currency",
    "adIdentifiers",
    "consent",
    "cartData",
    "customVariables",
    "userId",
    "clientId",
];

/// The mapped fields that become `userData.userIdentifiers`, and how each is written: email
/// and phone hashed, an address's names hashed, its region and postal code as they are.
const IDENTIFIERS: &[(&str, Option<ValueFormat>)] = &[
    ("email", Some(ValueFormat::Sha256EmailGoogle)),
    ("phone", Some(ValueFormat::Sha256Phone)),
    ("first_name", Some(ValueFormat::Sha256Name)),
    ("last_name", Some(ValueFormat::Sha256Name)),
    ("region_code", None),
    ("postal_code", None),
];

/// What a conversion is matched by: a click id or customer information.
const CONVERSION_MATCH: &[&str] = &[
    "adIdentifiers.gclid",
    "adIdentifiers.gbraid",
    "adIdentifiers.wbraid",
    "email",
    "phone",
    "last_name",
];

/// A mapping's `options:`.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct MappingOptions {
    /// Action `conversions`: the conversion action (an "Import from clicks" action's id).
    #[serde(default)]
    conversion_action_id: Option<String>,
    /// Action `customer_match`: an existing list.
    #[serde(default)]
    user_list_id: Option<String>,
    /// Or the list's name: found in the account, or created on the first run.
    #[serde(default)]
    user_list_name: Option<String>,
    /// Action `customer_match`: the description of a list sluice creates.
    #[serde(default)]
    description: Option<String>,
}

fn digits_only(text: &str) -> bool {
    !text.is_empty() && text.chars().all(|c| c.is_ascii_digit())
}

impl MappingOptions {
    fn parse(action: &str, options: &Map<String, Value>) -> Result<Self, String> {
        let parsed: Self = serde_json::from_value(Value::Object(options.clone()))
            .map_err(|e| format!("Google Ads mapping `options`: {e}"))?;
        match action {
            "conversions" => match parsed.conversion_action_id.as_deref().map(str::trim) {
                Some(id) if digits_only(id) && parsed.user_list_id.is_none() && parsed.user_list_name.is_none() => Ok(parsed),
                _ => Err("a Google Ads conversions mapping names its conversion action: `options: {conversion_action_id: \"6543210987\"}` (the numeric id in the conversion action's URL, `ctId=`)".into()),
            },
            _ => match (parsed.user_list_id.as_deref().map(str::trim), parsed.user_list_name.as_deref().map(str::trim)) {
                (Some(id), None) if digits_only(id) => Ok(parsed),
                (None, Some(name)) if !name.is_empty() => Ok(parsed),
                _ => Err("a Google Ads customer_match mapping names its list: `options: {user_list_name: VIP customers}` (found or created) or `{user_list_id: \"5555555555\"}`".into()),
            },
        }
    }
}

/// A Google Ads account id without dashes.
fn account_id(option: &str, text: &str) -> Result<String, String> {
    let id: String = text.trim().chars().filter(|c| *c != '-').collect();
    if id.len() == 10 && digits_only(&id) {
        Ok(id)
    } else {
        Err(format!(
            "`{option}` is a Google Ads account id: ten digits, as in 123-456-7890"
        ))
    }
}

pub struct GoogleAdsDestination {
    name: String,
    base: reqwest::Url,
    customer_id: String,
    login_customer_id: Option<String>,
    consent: Option<Value>,
    terms_accepted: bool,
    auth: Arc<GoogleAuth>,
    events_delivery: HttpDelivery,
    members_delivery: HttpDelivery,
}

impl GoogleAdsDestination {
    pub fn new(name: &str, config: GoogleAdsConfig, env: &ConnectorEnv) -> Result<Self, String> {
        let base = match &config.url {
            Some(url) => super::http::parse_url_option("url", url.expose())?,
            None => super::http::parse_url_option("url", "https://datamanager.googleapis.com")?,
        };
        let limits = |max_records: usize| VendorLimits {
            concurrency: 2,
            // Data Manager allows a project 300 ingestion requests a minute.
            rate: Some((5, Duration::from_secs(1))),
            ..VendorLimits::per_request(max_records, 8 * 1024 * 1024)
        };
        let events_delivery = HttpDelivery::new(&config.delivery, limits(2000))?;
        let members_delivery = HttpDelivery::new(&config.delivery, limits(10_000))?;
        Ok(Self {
            name: name.to_string(),
            base,
            customer_id: account_id("customer_id", config.customer_id.expose())?,
            login_customer_id: config
                .login_customer_id
                .as_ref()
                .map(|id| account_id("login_customer_id", id.expose()))
                .transpose()?,
            consent: config.consent.as_ref().and_then(ConsentConfig::to_json),
            terms_accepted: config.customer_match_terms_accepted,
            auth: Arc::new(GoogleAuth::new(
                config.service_account.as_ref().map(|s| s.expose()),
                env,
                events_delivery.client.clone(),
            )?),
            events_delivery,
            members_delivery,
        })
    }

    /// Data Manager's `Destination` for a conversion action or user list.
    fn destination(&self, product_destination_id: &str) -> Value {
        let mut destination = json!({
            "operatingAccount": {"accountType": "GOOGLE_ADS", "accountId": self.customer_id},
            "productDestinationId": product_destination_id,
        });
        if let Some(login) = &self.login_customer_id {
            destination["loginAccount"] = json!({"accountType": "GOOGLE_ADS", "accountId": login});
        }
        destination
    }

    fn url(&self, path: &str) -> Result<reqwest::Url, String> {
        self.base.join(path).map_err(|e| e.to_string())
    }

    fn failed(&self, message: String) -> DestinationError {
        DestinationError::Unreachable {
            destination: self.name.clone(),
            message,
        }
    }

    /// One call outside the delivery layer (the list lookup and creation), with a token; a
    /// token refused as expired is fetched again once.
    async fn call(
        &self,
        method: Method,
        url: reqwest::Url,
        body: Option<Value>,
    ) -> Result<Value, DestinationError> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let token = self
                .auth
                .token(SCOPE, AUTH_HINT)
                .await
                .map_err(|m| self.failed(m))?;
            let mut request = self
                .events_delivery
                .client
                .request(method.clone(), url.clone())
                .bearer_auth(token);
            if let Some(body) = &body {
                request = request
                    .header("content-type", "application/json")
                    .body(body.to_string());
            }
            let response = request.send().await.map_err(|e| {
                self.failed(format!(
                    "Google Data Manager: {}",
                    crate::destinations::http::describe_reqwest_error(&e)
                ))
            })?;
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            if status.as_u16() == 401 && attempts == 1 {
                self.auth.forget().await;
                continue;
            }
            if !status.is_success() {
                let said = GoogleError::parse(&text)
                    .map_or_else(|| snippet(&text), |e| format!(": {}", e.describe()));
                let hint = if matches!(status.as_u16(), 401 | 403) {
                    format!("; {AUTH_HINT}")
                } else {
                    String::new()
                };
                return Err(self.failed(format!("HTTP {status} from Google Data Manager{said}{hint}")));
            }
            return serde_json::from_str(&text).map_err(|e| {
                self.failed(format!("Google Data Manager answered with {e}{}", snippet(&text)))
            });
        }
    }

    /// The id of the account's Customer Match list named `name`, created (contact information,
    /// first party) when there is none.
    async fn find_or_create_list(
        &self,
        name: &str,
        description: Option<&str>,
    ) -> Result<String, DestinationError> {
        let lists = format!(
            "/v1/accountTypes/GOOGLE_ADS/accounts/{}/userLists",
            self.customer_id
        );
        let quoted = name.replace('\\', "\\\\").replace('"', "\\\"");
        let mut page_token: Option<String> = None;
        for _ in 0..100 {
            let mut url = self.url(&lists).map_err(|m| self.failed(m))?;
            url.query_pairs_mut()
                .append_pair("filter", &format!("display_name = \"{quoted}\""))
                .append_pair("pageSize", "1000");
            if let Some(token) = &page_token {
                url.query_pairs_mut().append_pair("pageToken", token);
            }
            let page = self.call(Method::GET, url, None).await?;
            let found = page["userLists"].as_array().and_then(|lists| {
                lists
                    .iter()
                    .find(|list| list["displayName"] == name)
                    .and_then(|list| list["id"].as_str().map(str::to_string))
            });
            if let Some(id) = found {
                return Ok(id);
            }
            match page["nextPageToken"].as_str().filter(|t| !t.is_empty()) {
                Some(token) => page_token = Some(token.to_string()),
                None => break,
            }
        }
        let mut list = json!({
            "displayName": name,
            "ingestedUserListInfo": {
                "uploadKeyTypes": ["CONTACT_ID"],
                "contactIdInfo": {"dataSourceType": "DATA_SOURCE_TYPE_FIRST_PARTY"},
            },
        });
        if let Some(description) = description {
            list["description"] = Value::String(description.to_string());
        }
        let created = self
            .call(
                Method::POST,
                self.url(&lists).map_err(|m| self.failed(m))?,
                Some(list),
            )
            .await?;
        let id = created["id"].as_str().map(str::to_string).ok_or_else(|| {
            self.failed(format!(
                "Google Data Manager created the list `{name}` but sent no id: {created}"
            ))
        })?;
        tracing::info!(list = name, id, "created the Google Ads Customer Match list");
        Ok(id)
    }
}

#[async_trait]
impl Destination for GoogleAdsDestination {
    fn kind(&self) -> &'static str {
        "google_ads"
    }

    fn action(
        &self,
        action: Option<&str>,
        options: &Map<String, Value>,
    ) -> Result<Option<ActionSpec>, String> {
        match action.unwrap_or("conversions") {
            "conversions" => {
                MappingOptions::parse("conversions", options)?;
                let mut top: Vec<&str> = EVENT_FIELDS.to_vec();
                top.extend(IDENTIFIERS.iter().map(|(name, _)| *name));
                let shape = PayloadShape::default()
                    .top_level(&top)
                    .container("customVariables")
                    .identity(CONVERSION_MATCH)
                    .required(&["eventTimestamp"])
                    .format("eventTimestamp", ValueFormat::Rfc3339)
                    .format("lastUpdatedTimestamp", ValueFormat::Rfc3339)
                    .formats(IDENTIFIERS);
                Ok(Some(ActionSpec::new("conversions", shape)))
            }
            "customer_match" => {
                MappingOptions::parse("customer_match", options)?;
                if !self.terms_accepted {
                    return Err("Google requires every Customer Match upload to say the account accepted the Customer Match terms (Google Ads > Audience manager): once it has, set `customer_match_terms_accepted: true` on the destination".into());
                }
                let names: Vec<&str> = IDENTIFIERS.iter().map(|(name, _)| *name).collect();
                let shape = PayloadShape::default()
                    .top_level(&names)
                    .identity(&names)
                    .formats(IDENTIFIERS);
                Ok(Some(
                    ActionSpec::new("customer_match", shape)
                        .modes(&[SyncMode::Upsert, SyncMode::Mirror])
                        .deletes(),
                ))
            }
            other => Err(format!(
                "unknown action `{other}`; the google_ads destination offers {}",
                ACTIONS.join(", ")
            )),
        }
    }

    /// Gets a token and reads the account's first user list: refused credentials, a disabled
    /// API or an account the credentials cannot reach fail the check.
    async fn check(&self) -> Result<(), DestinationError> {
        let mut url = self
            .url(&format!(
                "/v1/accountTypes/GOOGLE_ADS/accounts/{}/userLists",
                self.customer_id
            ))
            .map_err(|m| self.failed(m))?;
        url.query_pairs_mut().append_pair("pageSize", "1");
        self.call(Method::GET, url, None).await.map(|_| ())
    }

    async fn open(&self, run: &RunInfo) -> Result<Box<dyn DestinationWriter>, DestinationError> {
        let action = run.action.as_deref().unwrap_or("conversions");
        let options =
            MappingOptions::parse(action, &run.options).map_err(|message| DestinationError::Config {
                destination: self.name.clone(),
                message,
            })?;
        let (target, delivery) = if action == "conversions" {
            (
                options
                    .conversion_action_id
                    .unwrap_or_default()
                    .trim()
                    .to_string(),
                &self.events_delivery,
            )
        } else {
            let list = match (&options.user_list_id, &options.user_list_name) {
                (Some(id), _) => id.trim().to_string(),
                // A dry run creates nothing: its requests name the list.
                (None, Some(name)) if run.dry_run => format!("list:{}", name.trim()),
                (None, Some(name)) => {
                    self.find_or_create_list(name.trim(), options.description.as_deref())
                        .await?
                }
                (None, None) => String::new(),
            };
            (list, &self.members_delivery)
        };
        let url = |path: &str| {
            self.url(path).map_err(|message| DestinationError::Config {
                destination: self.name.clone(),
                message,
            })
        };
        Ok(HttpWriter::boxed(
            DataManagerApi {
                conversions: action == "conversions",
                ingest_events: url("/v1/events:ingest")?,
                ingest_members: url("/v1/audienceMembers:ingest")?,
                remove_members: url("/v1/audienceMembers:remove")?,
                destination: self.destination(&target),
                consent: self.consent.clone(),
                auth: self.auth.clone(),
                token: tokio::sync::Mutex::new(None),
                tokens: TokenRefusals::default(),
            },
            delivery,
        ))
    }
}

/// The requests of one mapping's run.
struct DataManagerApi {
    conversions: bool,
    ingest_events: reqwest::Url,
    ingest_members: reqwest::Url,
    remove_members: reqwest::Url,
    destination: Value,
    consent: Option<Value>,
    auth: Arc<GoogleAuth>,
    /// The access token requests carry (none in a dry run).
    token: tokio::sync::Mutex<Option<String>>,
    tokens: TokenRefusals,
}

/// Google's error envelope: `{"error": {"code", "message", "status", "details": [...]}}`,
/// with `google.rpc.BadRequest` field violations, `ErrorInfo` and `RetryInfo` among the
/// details.
#[derive(Debug, Deserialize)]
struct GoogleError {
    #[serde(default)]
    message: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    details: Vec<Value>,
}

impl GoogleError {
    fn parse(body: &str) -> Option<Self> {
        #[derive(Deserialize)]
        struct Envelope {
            error: GoogleError,
        }
        serde_json::from_str::<Envelope>(body).ok().map(|e| e.error)
    }

    fn detail(&self, kind: &str) -> Option<&Value> {
        self.details
            .iter()
            .find(|d| d["@type"].as_str().is_some_and(|t| t.ends_with(kind)))
    }

    fn describe(&self) -> String {
        let mut text = format!("{} ({})", self.message, self.status);
        if let Some(info) = self.detail("google.rpc.ErrorInfo") {
            if let Some(reason) = info["reason"].as_str() {
                text.push_str(&format!(", reason {reason}"));
            }
            if let Some(url) = info["metadata"]["activationUrl"].as_str() {
                text.push_str(&format!("; enable the API at {url}"));
            }
            if let Some(id) = info["metadata"]["requestId"].as_str() {
                text.push_str(&format!(", requestId {id}"));
            }
        }
        text
    }

    /// The field violations naming a record of the request, by its index: `events[3]...` or
    /// `audience_members[0]...` (Google has written the path as `events.events[0]` too).
    fn record_violations(&self, array: &[&str]) -> (Vec<RecordFailure>, Vec<String>) {
        let mut records = Vec::new();
        let mut others = Vec::new();
        let Some(bad_request) = self.detail("google.rpc.BadRequest") else {
            return (records, others);
        };
        for violation in bad_request["fieldViolations"].as_array().into_iter().flatten() {
            let field = violation["field"].as_str().unwrap_or_default();
            let description = violation["description"].as_str().unwrap_or_default();
            let reason = violation["reason"].as_str().unwrap_or_default();
            let said = format!("Google Data Manager: {field}: {description} ({reason})");
            let index = array.iter().find_map(|name| {
                let at = field.find(&format!("{name}["))? + name.len() + 1;
                field[at..].split(']').next()?.parse::<usize>().ok()
            });
            match index {
                Some(index) => records.push(RecordFailure { index, error: said }),
                None => others.push(said),
            }
        }
        (records, others)
    }

    /// `RetryInfo.retryDelay` (`"12s"`).
    fn retry_delay(&self) -> Option<Duration> {
        let delay = self.detail("google.rpc.RetryInfo")?["retryDelay"].as_str()?;
        let seconds: f64 = delay.strip_suffix('s')?.parse().ok()?;
        (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds))
    }
}

impl DataManagerApi {
    /// `{"userIdentifiers": [{"emailAddress"}, {"phoneNumber"}, {"address": {...}}]}` from the
    /// mapped identifier fields of `record`, which are taken out of it.
    fn user_data(record: &mut Map<String, Value>) -> Option<Value> {
        let mut identifiers = Vec::new();
        let mut take = |name: &str| match record.remove(name) {
            Some(Value::Null) | None => None,
            Some(Value::String(text)) => Some(Value::String(text)),
            Some(other) => Some(Value::String(other.to_string())),
        };
        if let Some(email) = take("email") {
            identifiers.push(json!({ "emailAddress": email }));
        }
        if let Some(phone) = take("phone") {
            identifiers.push(json!({ "phoneNumber": phone }));
        }
        let mut address = Map::new();
        for (field, name) in [
            ("first_name", "givenName"),
            ("last_name", "familyName"),
            ("region_code", "regionCode"),
            ("postal_code", "postalCode"),
        ] {
            if let Some(value) = take(field) {
                let value = match (name, value) {
                    ("regionCode", Value::String(code)) => Value::String(code.trim().to_uppercase()),
                    (_, value) => value,
                };
                address.insert(name.into(), value);
            }
        }
        if !address.is_empty() {
            identifiers.push(json!({ "address": address }));
        }
        (!identifiers.is_empty()).then(|| json!({ "userIdentifiers": identifiers }))
    }

    /// A record as Data Manager's `Event`: identifiers under `userData`, other fields as
    /// custom variables, and the model's key as `transactionId` unless mapped.
    fn event(batch: &OutgoingBatch, i: usize) -> Result<Value, String> {
        let mut record: Map<String, Value> =
            serde_json::from_slice(batch.bodies.get(i)).map_err(|e| e.to_string())?;
        if let Some(user_data) = Self::user_data(&mut record) {
            record.insert("userData".into(), user_data);
        }
        if let Some(Value::Object(variables)) = record.remove("customVariables") {
            let variables: Vec<Value> = variables
                .into_iter()
                .filter(|(_, value)| !value.is_null())
                .map(|(name, value)| {
                    let value = match value {
                        Value::String(text) => text,
                        other => other.to_string(),
                    };
                    json!({"variable": name, "value": value})
                })
                .collect();
            if !variables.is_empty() {
                record.insert("customVariables".into(), Value::Array(variables));
            }
        }
        if !record.contains_key("transactionId") {
            record.insert("transactionId".into(), Value::String(key_text(batch.keys.get(i))));
        }
        Ok(Value::Object(record))
    }

    /// A record's identifying fields as an `AudienceMember` (the values the list last got,
    /// for a removal).
    fn member(batch: &OutgoingBatch, i: usize) -> Result<Value, String> {
        let mut record: Map<String, Value> =
            serde_json::from_slice(batch.ids.get(i)).map_err(|e| e.to_string())?;
        let user_data =
            Self::user_data(&mut record).ok_or("the record has none of the list's identifiers")?;
        Ok(json!({ "userData": user_data }))
    }
}

/// The primary key as text: its value for one column (`42`, `ORD-1`), else its values joined
/// by `|`.
fn key_text(key: &[u8]) -> String {
    match serde_json::from_slice::<Map<String, Value>>(key) {
        Ok(map) => map
            .values()
            .map(|value| match value {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            })
            .collect::<Vec<_>>()
            .join("|"),
        Err(_) => String::from_utf8_lossy(key).into_owned(),
    }
}

#[async_trait]
impl VendorApi for DataManagerApi {
    fn vendor(&self) -> &'static str {
        "Google Data Manager"
    }

    fn auth_hint(&self) -> &'static str {
        AUTH_HINT
    }

    async fn authorize(&self) -> Result<(), SendOutcome> {
        if self.tokens.take_stale() {
            self.auth.forget().await;
        }
        let token = self
            .auth
            .token(SCOPE, AUTH_HINT)
            .await
            .map_err(|reason| SendOutcome::Fatal { reason })?;
        *self.token.lock().await = Some(token);
        Ok(())
    }

    async fn request(&self, batch: &OutgoingBatch, range: Range<usize>) -> Result<ApiRequest, String> {
        let mut headers = HeaderMap::new();
        if let Some(token) = self.token.lock().await.as_ref() {
            headers.insert(AUTHORIZATION, secret_header(&format!("Bearer {token}"))?);
        }
        let (url, body) = if self.conversions {
            let events = range
                .map(|i| Self::event(batch, i))
                .collect::<Result<Vec<_>, _>>()?;
            let mut body = json!({
                "destinations": [self.destination],
                "events": events,
                "encoding": "HEX",
            });
            if let Some(consent) = &self.consent {
                body["consent"] = consent.clone();
            }
            (self.ingest_events.clone(), body)
        } else {
            let members = range
                .clone()
                .map(|i| Self::member(batch, i))
                .collect::<Result<Vec<_>, _>>()?;
            if batch.actions[range.start] == RecordAction::Delete {
                let body = json!({
                    "destinations": [self.destination],
                    "audienceMembers": members,
                    "encoding": "HEX",
                });
                (self.remove_members.clone(), body)
            } else {
                let mut body = json!({
                    "destinations": [self.destination],
                    "audienceMembers": members,
                    "termsOfService": {"customerMatchTermsOfServiceStatus": "ACCEPTED"},
                    "encoding": "HEX",
                });
                if let Some(consent) = &self.consent {
                    body["consent"] = consent.clone();
                }
                (self.ingest_members.clone(), body)
            }
        };
        Ok(ApiRequest::json(
            Method::POST,
            url,
            headers,
            serde_json::to_vec(&body).map_err(|e| e.to_string())?,
        ))
    }

    /// `{"requestId": "...", "fieldWarnings": [...]}`: the request was taken whole; warnings
    /// are about optional fields Google ignored.
    fn on_success(&self, answer: &HttpAnswer, _batch: &OutgoingBatch, range: Range<usize>) -> SendOutcome {
        self.tokens.accepted();
        if let Ok(parsed) = serde_json::from_str::<Value>(&answer.body)
            && let Some(warnings) = parsed["fieldWarnings"].as_array().filter(|w| !w.is_empty())
        {
            tracing::warn!(
                request_id = parsed["requestId"].as_str().unwrap_or_default(),
                records = range.len(),
                first = %warnings[0],
                count = warnings.len(),
                "Google Data Manager ignored some optional fields"
            );
        }
        SendOutcome::Accepted
    }

    fn on_error(&self, answer: &HttpAnswer, _batch: &OutgoingBatch, range: Range<usize>) -> SendOutcome {
        let Some(error) = GoogleError::parse(&answer.body) else {
            return crate::destinations::http::classify("Google Data Manager", answer, AUTH_HINT);
        };
        let reason = format!("Google Data Manager: {}", error.describe());
        match answer.status.as_u16() {
            401 => self.tokens.refused(reason, AUTH_HINT),
            403 | 404 => SendOutcome::Fatal {
                reason: format!(
                    "{reason}; check `customer_id`, `login_customer_id`, the mapping's conversion action or list, and the credentials' access ({AUTH_HINT})"
                ),
            },
            429 => SendOutcome::RateLimited {
                reason,
                after: error.retry_delay().or_else(|| answer.retry_after()),
            },
            400 => {
                let (records, others) =
                    error.record_violations(&["events", "audience_members", "audienceMembers"]);
                if records.iter().any(|f| f.index < range.len()) {
                    SendOutcome::RefusedBecauseOf(records)
                } else if !others.is_empty() {
                    // The request itself (its destination, consent or terms) is wrong: every
                    // request of the run would be.
                    SendOutcome::Fatal {
                        reason: format!("{reason}: {}", others.join("; ")),
                    }
                } else {
                    SendOutcome::Invalid { reason }
                }
            }
            _ => crate::destinations::http::classify("Google Data Manager", answer, AUTH_HINT),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: Value) -> HttpAnswer {
        HttpAnswer {
            status: reqwest::StatusCode::from_u16(status).unwrap(),
            headers: HeaderMap::new(),
            body: body.to_string(),
        }
    }

    fn destination() -> GoogleAdsDestination {
        let config: GoogleAdsConfig = serde_json::from_value(json!({
            "service_account": r#"{"type":"authorized_user","client_id":"c","client_secret":"s","refresh_token":"r"}"#,
            "customer_id": "123-456-7890",
            "login_customer_id": "9876543210",
            "consent": {"ad_user_data": "granted", "ad_personalization": "denied"},
            "customer_match_terms_accepted": true,
        }))
        .unwrap();
        let env = ConnectorEnv {
            base_dir: std::env::temp_dir(),
            state_dir: std::env::temp_dir(),
        };
        GoogleAdsDestination::new("google", config, &env).unwrap()
    }

    fn api(destination: &GoogleAdsDestination) -> DataManagerApi {
        DataManagerApi {
            conversions: true,
            ingest_events: destination.url("/v1/events:ingest").unwrap(),
            ingest_members: destination.url("/v1/audienceMembers:ingest").unwrap(),
            remove_members: destination.url("/v1/audienceMembers:remove").unwrap(),
            destination: destination.destination("6543210987"),
            consent: destination.consent.clone(),
            auth: destination.auth.clone(),
            token: tokio::sync::Mutex::new(None),
            tokens: TokenRefusals::default(),
        }
    }

    #[test]
    fn accounts_options_and_consent_are_read_as_google_writes_them() {
        let google = destination();
        assert_eq!(google.customer_id, "1234567890");
        assert_eq!(
            google.destination("1"),
            json!({"operatingAccount": {"accountType": "GOOGLE_ADS", "accountId": "1234567890"},
                   "loginAccount": {"accountType": "GOOGLE_ADS", "accountId": "9876543210"},
                   "productDestinationId": "1"})
        );
        assert_eq!(
            google.consent,
            Some(json!({"adUserData": "CONSENT_GRANTED", "adPersonalization": "CONSENT_DENIED"}))
        );
        assert!(account_id("customer_id", "123-456-789").is_err());
        let options = |value: Value| value.as_object().unwrap().clone();
        assert!(
            google
                .action(Some("conversions"), &options(json!({})))
                .unwrap_err()
                .contains("conversion_action_id")
        );
        assert!(
            google
                .action(
                    Some("conversions"),
                    &options(json!({"conversion_action_id": "65432"}))
                )
                .is_ok()
        );
        assert!(
            google
                .action(Some("customer_match"), &options(json!({"user_list_name": "VIP"})))
                .is_ok()
        );
        assert!(
            google
                .action(Some("customer_match"), &options(json!({"user_list_id": "list"})))
                .is_err()
        );
    }

    #[test]
    fn field_violations_fail_the_records_they_name() {
        let google = destination();
        let api = api(&google);
        let batch = OutgoingBatch::empty();
        let refused = json!({"error": {"code": 400, "message": "There was a problem with the request.", "status": "INVALID_ARGUMENT", "details": [
            {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "INVALID_ARGUMENT", "domain": "datamanager.googleapis.com", "metadata": {"requestId": "t-6bc8"}},
            {"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [
                {"field": "events.events[0].user_data.user_identifiers[1]", "description": "The HEX encoded value is malformed.", "reason": "INVALID_HEX_ENCODING"},
                {"field": "events[2].currency", "description": "Invalid currency code.", "reason": "INVALID_CURRENCY_CODE"}]}]}});
        match api.on_error(&answer(400, refused), &batch, 0..3) {
            SendOutcome::RefusedBecauseOf(failures) => {
                let named: Vec<usize> = failures.iter().map(|f| f.index).collect();
                assert_eq!(named, [0, 2]);
                assert!(
                    failures[1]
                        .error
                        .contains("Invalid currency code. (INVALID_CURRENCY_CODE)")
                );
            }
            other => panic!("{other:?}"),
        }
        let destination_wrong = json!({"error": {"code": 400, "message": "There was a problem with the request.", "status": "INVALID_ARGUMENT", "details": [
            {"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [
                {"field": "destinations[0].product_destination_id", "description": "Invalid conversion action.", "reason": "INVALID_CONVERSION_ACTION_ID"}]}]}});
        assert!(
            matches!(api.on_error(&answer(400, destination_wrong), &batch, 0..3), SendOutcome::Fatal { reason } if reason.contains("INVALID_CONVERSION_ACTION_ID"))
        );
        let disabled = json!({"error": {"code": 403, "message": "Data Manager API has not been used in project 1 before or it is disabled.", "status": "PERMISSION_DENIED", "details": [
            {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "SERVICE_DISABLED", "domain": "googleapis.com", "metadata": {"activationUrl": "https://console.developers.google.com/apis/api/datamanager.googleapis.com/overview?project=1"}}]}});
        assert!(
            matches!(api.on_error(&answer(403, disabled), &batch, 0..3), SendOutcome::Fatal { reason } if reason.contains("enable the API at https://console.developers.google.com"))
        );
        let quota = json!({"error": {"code": 429, "message": "Quota exceeded.", "status": "RESOURCE_EXHAUSTED", "details": [
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}]}});
        assert!(matches!(
            api.on_error(&answer(429, quota), &batch, 0..3),
            SendOutcome::RateLimited { after: Some(after), .. } if after == Duration::from_secs(7)
        ));
    }

    #[tokio::test]
    async fn an_expired_token_is_fetched_again_once() {
        let google = destination();
        let api = api(&google);
        let batch = OutgoingBatch::empty();
        let expired = json!({"error": {"code": 401, "message": "Request had invalid authentication credentials.", "status": "UNAUTHENTICATED"}});
        assert!(matches!(
            api.on_error(&answer(401, expired.clone()), &batch, 0..1),
            SendOutcome::Retry { .. }
        ));
        assert!(api.tokens.is_stale(), "the next request fetches a new token");
        assert!(matches!(
            api.on_error(&answer(401, expired.clone()), &batch, 0..1),
            SendOutcome::Fatal { .. }
        ));
        api.on_success(&answer(200, json!({"requestId": "t-1"})), &batch, 0..1);
        assert!(matches!(
            api.on_error(&answer(401, expired), &batch, 0..1),
            SendOutcome::Retry { .. }
        ));
    }

    #[test]
    fn identifiers_become_user_data_and_other_fields_custom_variables() {
        let mut record = json!({"email": "e", "phone": "p", "first_name": "f", "last_name": "l", "region_code": "us", "postal_code": "94045", "conversionValue": 1})
            .as_object()
            .unwrap()
            .clone();
        let user_data = DataManagerApi::user_data(&mut record).unwrap();
        assert_eq!(
            user_data,
            json!({"userIdentifiers": [{"emailAddress": "e"}, {"phoneNumber": "p"},
                   {"address": {"givenName": "f", "familyName": "l", "regionCode": "US", "postalCode": "94045"}}]})
        );
        assert_eq!(Value::Object(record), json!({"conversionValue": 1}));
        assert_eq!(key_text(br#"{"id":42}"#), "42");
        assert_eq!(key_text(br#"{"order":"A","line":2}"#), "A|2");
    }
}
