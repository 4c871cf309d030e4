//! `type: salesforce`: sObject records through the composite sObject collections API (200
//! records a request), with an OAuth 2.0 client-credentials or JWT bearer token.
//!
//! ```yaml
//! destinations:
//!   salesforce:
//!     type: salesforce
//!     login_url: https://acme.my.salesforce.com   # My Domain (client credentials), or
//!                                                 # https://login.salesforce.com (JWT)
//!     client_id: ${SF_CLIENT_ID}                  # the connected app's consumer key
//!     client_secret: ${SF_CLIENT_SECRET}          # client-credentials flow, or:
//!     # username: integration@acme.com            # JWT bearer flow, with
//!     # private_key: ${SF_PRIVATE_KEY_PEM}        # the key whose certificate the app has
//!     api_version: "62.0"
//! mappings:
//!   contacts:
//!     model: users
//!     destination: salesforce
//!     mode: mirror
//!     options: { object: Contact, external_id: External_Id__c }
//!     fields: { External_Id__c: id, Email: email, LastName: last_name }
//! ```
//!
//! Every field is a field of the sObject. `upsert` and `mirror` upsert by the external id field
//! (`PATCH /composite/sobjects/{object}/{external_id}`), `insert` creates (`POST
//! /composite/sobjects`); deleted records (mode `mirror`) are looked up by external id (SOQL)
//! and deleted (`DELETE /composite/sobjects?ids=`). Requests use `allOrNone: false`, and each
//! record's own result (`success`, `errors[].statusCode`, `message`) decides whether it failed.
//! The token is fetched on first use and again when Salesforce answers 401.

use std::ops::Range;

use async_trait::async_trait;
use reqwest::Method;
use reqwest::header::{AUTHORIZATION, HeaderMap};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;
use sluice_engine::destination::{
    ActionSpec, Destination, DestinationWriter, OutgoingBatch, PayloadShape, RecordAction, RecordFailure,
    RunInfo, SendOutcome, SyncMode,
};
use sluice_engine::{ConfigString, DestinationError, Secret};
use tokio::sync::Mutex;

use crate::destinations::http::{
    ApiRequest, DeliverySettings, HttpAnswer, HttpDelivery, HttpWriter, VendorApi, VendorLimits, classify,
    describe_reqwest_error, secret_header, snippet,
};
use crate::destinations::oauth::{request_token, rsa_key, sign_jwt};

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SalesforceConfig {
    /// Token endpoint: your My Domain URL (client credentials) or `https://login.salesforce.com` (JWT).
    pub login_url: ConfigString,
    /// The connected app's consumer key.
    pub client_id: ConfigString,
    /// The connected app's consumer secret, for the client-credentials flow.
    #[serde(default)]
    pub client_secret: Option<Secret>,
    /// Salesforce user to act as, for the JWT bearer flow (with `private_key`).
    #[serde(default)]
    pub username: Option<ConfigString>,
    /// PEM (PKCS#8 or PKCS#1) RSA private key for the JWT bearer flow.
    #[serde(default)]
    pub private_key: Option<Secret>,
    /// REST API version (default `62.0`).
    #[serde(default = "default_version")]
    pub api_version: String,
    /// How often a Bulk API job's state is polled (default 2s).
    #[serde(default)]
    pub bulk_poll_interval: Option<crate::HumanDuration>,
    #[serde(default)]
    pub delivery: DeliverySettings,
}

fn default_version() -> String {
    "62.0".into()
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SalesforceOptions {
    object: String,
    external_id: Option<String>,
    /// `composite` (default): sObject collections, 200 records a request, results at once;
    /// `bulk`: Bulk API 2.0 ingest jobs of up to 10,000 records, for large runs.
    #[serde(default)]
    api: Api,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
enum Api {
    #[default]
    Composite,
    Bulk,
}

fn parse_options(options: &serde_json::Map<String, serde_json::Value>) -> Result<SalesforceOptions, String> {
    let parsed: SalesforceOptions = serde_json::from_value(serde_json::Value::Object(options.clone())).map_err(|e| {
        format!("Salesforce mapping `options`: {e} (write `options: {{object: Contact, external_id: External_Id__c}}`)")
    })?;
    let plain = |name: &str| !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !plain(&parsed.object) || parsed.external_id.as_deref().is_some_and(|e| !plain(e)) {
        return Err(
            "`options.object` and `options.external_id` must be API names (letters, digits, `_`)".into(),
        );
    }
    Ok(parsed)
}

const AUTH_HINT: &str = "check the connected app's `client_id` and `client_secret` (or `username` and `private_key`), that its policies allow the flow, and the user's permission on the object";

/// How tokens are obtained.
#[derive(Clone)]
enum Flow {
    ClientCredentials {
        secret: String,
    },
    Jwt {
        username: String,
        key: std::sync::Arc<ring::signature::RsaKeyPair>,
    },
}

#[derive(Clone)]
struct Token {
    access_token: String,
    instance_url: reqwest::Url,
}

pub struct SalesforceDestination {
    name: String,
    login_url: reqwest::Url,
    client_id: String,
    flow: Flow,
    api_version: String,
    delivery: HttpDelivery,
    token: std::sync::Arc<Mutex<Option<Token>>>,
    bulk_poll_interval: std::time::Duration,
}

/// Records per Bulk API 2.0 job.
const BULK_RECORDS: usize = 10_000;

impl SalesforceDestination {
    pub fn new(name: &str, config: SalesforceConfig) -> Result<Self, String> {
        let login_url = super::http::parse_url_option("login_url", config.login_url.expose())?;
        let flow = match (&config.client_secret, &config.username, &config.private_key) {
            (Some(secret), None, None) => Flow::ClientCredentials {
                secret: secret.expose().to_string(),
            },
            (None, Some(username), Some(key)) => Flow::Jwt {
                username: username.expose().to_string(),
                key: std::sync::Arc::new(rsa_key(key.expose())?),
            },
            _ => {
                return Err(
                    "give `client_secret` (client-credentials flow) or `username` and `private_key` (JWT bearer flow)"
                        .into(),
                );
            }
        };
        if !config.api_version.chars().all(|c| c.is_ascii_digit() || c == '.') {
            return Err(format!(
                "`api_version` `{}` is not a version like 62.0",
                config.api_version
            ));
        }
        let delivery = HttpDelivery::new(&config.delivery, VendorLimits::per_request(200, 6 * 1024 * 1024))?;
        Ok(Self {
            name: name.to_string(),
            login_url,
            client_id: config.client_id.expose().to_string(),
            flow,
            api_version: config.api_version,
            delivery,
            token: std::sync::Arc::new(Mutex::new(None)),
            bulk_poll_interval: config
                .bulk_poll_interval
                .map_or(std::time::Duration::from_secs(2), |d| d.0),
        })
    }
}

#[async_trait]
impl Destination for SalesforceDestination {
    fn kind(&self) -> &'static str {
        "salesforce"
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
                "unknown action `{action}`; the salesforce destination writes sObject records (`objects`, the default), chosen by `options.object`"
            ));
        }
        let options = parse_options(options)?;
        let mut shape = if options.api == Api::Bulk {
            PayloadShape::default()
        } else {
            PayloadShape::default().fixed("attributes", json!({"type": options.object}))
        };
        let mut modes = vec![SyncMode::Insert];
        if let Some(external_id) = &options.external_id {
            shape = shape.identity(&[external_id]);
            modes = vec![SyncMode::Upsert, SyncMode::Insert, SyncMode::Mirror];
        }
        let spec = ActionSpec::new("objects", shape).modes(&modes);
        Ok(Some(if options.external_id.is_some() {
            spec.deletes()
        } else {
            spec
        }))
    }

    async fn check(&self) -> Result<(), DestinationError> {
        let api = self.api(None);
        api.fetch_token()
            .await
            .map_err(|message| DestinationError::Unreachable {
                destination: self.name.clone(),
                message,
            })?;
        Ok(())
    }

    async fn open(&self, run: &RunInfo) -> Result<Box<dyn DestinationWriter>, DestinationError> {
        let options = parse_options(&run.options).map_err(|message| DestinationError::Config {
            destination: self.name.clone(),
            message,
        })?;
        if options.api == Api::Bulk {
            let mut policy = self.delivery.policy.clone();
            policy.max_records = policy.max_records.max(BULK_RECORDS);
            policy.max_bytes = 100 * 1024 * 1024;
            return Ok(Box::new(BulkWriter {
                api: self.api(Some(options)),
                policy,
                poll_interval: self.bulk_poll_interval,
            }));
        }
        Ok(HttpWriter::boxed(self.api(Some(options)), &self.delivery))
    }
}

impl SalesforceDestination {
    fn api(&self, options: Option<SalesforceOptions>) -> SalesforceApi {
        SalesforceApi {
            login_url: self.login_url.clone(),
            client_id: self.client_id.clone(),
            flow: self.flow.clone(),
            version: self.api_version.clone(),
            object: options.as_ref().map(|o| o.object.clone()).unwrap_or_default(),
            external_id: options.and_then(|o| o.external_id),
            client: self.delivery.client.clone(),
            token: self.token.clone(),
        }
    }
}

struct SalesforceApi {
    login_url: reqwest::Url,
    client_id: String,
    flow: Flow,
    version: String,
    object: String,
    external_id: Option<String>,
    client: reqwest::Client,
    token: std::sync::Arc<Mutex<Option<Token>>>,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    instance_url: String,
}

#[derive(Deserialize)]
struct RecordResult {
    #[serde(default)]
    id: Option<String>,
    success: bool,
    #[serde(default)]
    errors: Vec<RecordError>,
}

#[derive(Deserialize)]
struct RecordError {
    #[serde(rename = "statusCode", default)]
    status_code: String,
    #[serde(default)]
    message: String,
}

impl SalesforceApi {
    async fn fetch_token(&self) -> Result<Token, String> {
        let url = self
            .login_url
            .join("/services/oauth2/token")
            .map_err(|e| e.to_string())?;
        let form: Vec<(&str, String)> = match &self.flow {
            Flow::ClientCredentials { secret } => vec![
                ("grant_type", "client_credentials".into()),
                ("client_id", self.client_id.clone()),
                ("client_secret", secret.clone()),
            ],
            Flow::Jwt { username, key } => {
                let audience = self.login_url.origin().ascii_serialization();
                let claims = json!({
                    "iss": self.client_id,
                    "sub": username,
                    "aud": audience,
                    "exp": chrono::Utc::now().timestamp() + 180,
                });
                vec![
                    ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer".into()),
                    ("assertion", sign_jwt(key, &claims)?),
                ]
            }
        };
        let form: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let answer: TokenAnswer = request_token(&self.client, url, &form, "Salesforce", AUTH_HINT).await?;
        let instance_url = reqwest::Url::parse(&answer.instance_url)
            .map_err(|e| format!("Salesforce gave an invalid instance_url: {e}"))?;
        Ok(Token {
            access_token: answer.access_token,
            instance_url,
        })
    }

    async fn current_token(&self) -> Option<Token> {
        self.token.lock().await.clone()
    }

    fn data_url(&self, instance: &reqwest::Url, path: &str) -> Result<reqwest::Url, String> {
        instance
            .join(&format!("/services/data/v{}/{path}", self.version))
            .map_err(|e| e.to_string())
    }

    /// Salesforce ids of the records with these external id values.
    async fn lookup(
        &self,
        token: &Token,
        external_id: &str,
        values: &[String],
    ) -> Result<Vec<(String, String)>, String> {
        let quoted: Vec<String> = values
            .iter()
            .map(|v| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'")))
            .collect();
        let soql = format!(
            "SELECT Id, {external_id} FROM {} WHERE {external_id} IN ({})",
            self.object,
            quoted.join(",")
        );
        let mut url = self.data_url(&token.instance_url, "query")?;
        url.query_pairs_mut().append_pair("q", &soql);
        let response = self
            .client
            .get(url)
            .header(AUTHORIZATION, format!("Bearer {}", token.access_token))
            .send()
            .await
            .map_err(|e| format!("looking up records to delete: {}", describe_reqwest_error(&e)))?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(format!(
                "looking up records to delete: HTTP {status}{}",
                snippet(&text)
            ));
        }
        let answer: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("unexpected query answer ({e})"))?;
        Ok(answer["records"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| {
                let id = r["Id"].as_str()?.to_string();
                let value = match &r[external_id] {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Null => return None,
                    other => other.to_string(),
                };
                Some((value, id))
            })
            .collect())
    }

    fn external_ids(&self, batch: &OutgoingBatch, range: Range<usize>) -> Result<Vec<String>, String> {
        let field = self.external_id.as_deref().unwrap_or_default();
        range
            .map(|i| {
                batch
                    .identity_text(i, field)?
                    .ok_or_else(|| format!("the record has no `{field}`"))
            })
            .collect()
    }
}

/// Bulk API 2.0: each request is one ingest job (create, upload CSV, close, wait, read the
/// failed results), so per-record results are known when `send` returns.
struct BulkWriter {
    api: SalesforceApi,
    policy: sluice_engine::destination::DeliveryPolicy,
    poll_interval: std::time::Duration,
}

impl BulkWriter {
    /// The CSV of records `range`: the mapped fields (nulls as `#N/A`, which clears a field), or
    /// for deletes the Salesforce ids.
    fn csv(
        &self,
        batch: &OutgoingBatch,
        range: Range<usize>,
        delete_ids: Option<&[String]>,
    ) -> Result<Vec<u8>, String> {
        if let Some(ids) = delete_ids {
            let mut out = b"Id\n".to_vec();
            for id in ids {
                out.extend_from_slice(id.as_bytes());
                out.push(b'\n');
            }
            return Ok(out);
        }
        let fields = batch.fields.slice(range.start, range.len());
        let mut out = Vec::new();
        {
            let mut writer = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .with_null("#N/A".to_string())
                .build(&mut out);
            writer
                .write(&fields)
                .map_err(|e| format!("writing the job's CSV: {e}"))?;
        }
        Ok(out)
    }

    async fn call(
        &self,
        method: Method,
        url: reqwest::Url,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<String, SendOutcome> {
        let token = self.api.current_token().await.ok_or_else(|| SendOutcome::Retry {
            reason: "no Salesforce token".into(),
            after: None,
        })?;
        let response = self
            .api
            .client
            .request(method, url)
            .header(AUTHORIZATION, format!("Bearer {}", token.access_token))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .map_err(|e| SendOutcome::Retry {
                reason: format!("Salesforce: {}", describe_reqwest_error(&e)),
                after: None,
            })?;
        let answer = HttpAnswer {
            status: response.status(),
            headers: response.headers().clone(),
            body: response.text().await.unwrap_or_default(),
        };
        if answer.status.is_success() {
            Ok(answer.body)
        } else {
            Err(self.api.on_error(&answer, &OutgoingBatch::empty(), 0..0))
        }
    }

    async fn job(&self, batch: &OutgoingBatch, range: Range<usize>) -> Result<SendOutcome, SendOutcome> {
        self.api.authorize().await?;
        let token = self.api.current_token().await.ok_or_else(|| SendOutcome::Retry {
            reason: "no Salesforce token".into(),
            after: None,
        })?;
        let action = batch.actions[range.start];
        let (operation, delete_ids) = match action {
            RecordAction::Delete => {
                let field = self.api.external_id.clone().unwrap_or_default();
                let values = self
                    .api
                    .external_ids(batch, range.clone())
                    .map_err(|reason| SendOutcome::Rejected { reason })?;
                let found = self
                    .api
                    .lookup(&token, &field, &values)
                    .await
                    .map_err(|reason| SendOutcome::Retry { reason, after: None })?;
                let ids: Vec<String> = found.into_iter().map(|(_, id)| id).collect();
                if ids.is_empty() {
                    return Ok(SendOutcome::Accepted);
                }
                ("delete", Some(ids))
            }
            RecordAction::Insert => ("insert", None),
            _ if self.api.external_id.is_some() => ("upsert", None),
            _ => ("insert", None),
        };
        let csv = self
            .csv(batch, range.clone(), delete_ids.as_deref())
            .map_err(|reason| SendOutcome::Rejected { reason })?;
        let jobs = self
            .api
            .data_url(&token.instance_url, "jobs/ingest")
            .map_err(|reason| SendOutcome::Fatal { reason })?;
        let mut spec = json!({"object": self.api.object, "contentType": "CSV", "operation": operation, "lineEnding": "LF"});
        if operation == "upsert" {
            spec["externalIdFieldName"] = json!(self.api.external_id);
        }
        let created = self
            .call(
                Method::POST,
                jobs.clone(),
                "application/json",
                spec.to_string().into_bytes(),
            )
            .await?;
        let id = serde_json::from_str::<serde_json::Value>(&created)
            .ok()
            .and_then(|v| v["id"].as_str().map(str::to_string))
            .ok_or_else(|| SendOutcome::Rejected {
                reason: format!("Salesforce did not return a job id{}", snippet(&created)),
            })?;
        let job = jobs
            .join(&format!("ingest/{id}/"))
            .map_err(|e| SendOutcome::Fatal {
                reason: e.to_string(),
            })?;
        let job_url = jobs
            .join(&format!("ingest/{id}"))
            .map_err(|e| SendOutcome::Fatal {
                reason: e.to_string(),
            })?;
        let endpoint = |path: &str| {
            job.join(path).map_err(|e| SendOutcome::Fatal {
                reason: e.to_string(),
            })
        };
        self.call(Method::PUT, endpoint("batches")?, "text/csv", csv)
            .await?;
        self.call(
            Method::PATCH,
            job_url.clone(),
            "application/json",
            br#"{"state":"UploadComplete"}"#.to_vec(),
        )
        .await?;
        // Salesforce processes the job on its own schedule: wait for it, up to an hour.
        let started = std::time::Instant::now();
        let state = loop {
            let answer = self
                .call(Method::GET, job_url.clone(), "application/json", Vec::new())
                .await?;
            let status: serde_json::Value = serde_json::from_str(&answer).unwrap_or_default();
            match status["state"].as_str().unwrap_or_default() {
                "JobComplete" => break status,
                "Failed" | "Aborted" => {
                    return Ok(SendOutcome::Invalid {
                        reason: format!(
                            "Salesforce Bulk API job {id} {}: {}",
                            status["state"].as_str().unwrap_or_default(),
                            status["errorMessage"].as_str().unwrap_or("no message")
                        ),
                    });
                }
                _ if started.elapsed() > std::time::Duration::from_secs(3600) => {
                    return Ok(SendOutcome::Retry {
                        reason: format!("Salesforce Bulk API job {id} did not complete within an hour"),
                        after: None,
                    });
                }
                _ => tokio::time::sleep(self.poll_interval).await,
            }
        };
        if state["numberRecordsFailed"].as_u64() == Some(0) {
            return Ok(SendOutcome::Accepted);
        }
        let failed = self
            .call(
                Method::GET,
                endpoint("failedResults/")?,
                "application/json",
                Vec::new(),
            )
            .await?;
        Ok(self.failures(&failed, batch, range, operation == "delete"))
    }

    /// Maps the job's failed-results CSV (`"sf__Id","sf__Error",<columns>`) back to records, by
    /// external id (or, for deletes, fails them all with the errors).
    fn failures(&self, csv: &str, batch: &OutgoingBatch, range: Range<usize>, delete: bool) -> SendOutcome {
        let mut lines = csv.lines();
        let header = split_csv_line(lines.next().unwrap_or_default());
        let error_column = header.iter().position(|h| h == "sf__Error");
        let key_column = self
            .api
            .external_id
            .as_ref()
            .and_then(|field| header.iter().position(|h| h == field));
        let rows: Vec<Vec<String>> = lines.filter(|l| !l.is_empty()).map(split_csv_line).collect();
        if rows.is_empty() {
            return SendOutcome::Accepted;
        }
        let error_of = |row: &Vec<String>| {
            format!(
                "Salesforce: {}",
                error_column
                    .and_then(|c| row.get(c))
                    .map_or("refused", |e| e.as_str())
            )
        };
        let values = self.api.external_ids(batch, range.clone()).unwrap_or_default();
        let mut failures = Vec::new();
        match key_column {
            Some(column) if !delete => {
                for row in &rows {
                    if let Some(value) = row.get(column)
                        && let Some(index) = values.iter().position(|v| v == value)
                    {
                        failures.push(RecordFailure {
                            index,
                            error: error_of(row),
                        });
                    }
                }
            }
            _ => {
                let errors: Vec<String> = rows.iter().map(error_of).collect();
                failures.extend((0..range.len()).map(|index| RecordFailure {
                    index,
                    error: errors.join("; "),
                }));
            }
        }
        if failures.is_empty() {
            SendOutcome::Accepted
        } else {
            SendOutcome::Partial(failures)
        }
    }
}

/// The fields of one CSV line (double-quoted fields with `""` escapes).
fn split_csv_line(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => fields.push(std::mem::take(&mut field)),
            (c, _) => field.push(c),
        }
    }
    fields.push(field);
    fields
}

#[async_trait]
impl DestinationWriter for BulkWriter {
    fn policy(&self) -> sluice_engine::destination::DeliveryPolicy {
        self.policy.clone()
    }

    async fn prepare(
        &self,
        batch: &OutgoingBatch,
        range: Range<usize>,
    ) -> Vec<sluice_engine::destination::PreparedRequest> {
        let csv = self
            .csv(batch, range.clone(), None)
            .unwrap_or_else(|e| e.into_bytes());
        vec![sluice_engine::destination::PreparedRequest {
            method: "PUT".into(),
            target: format!(
                "Bulk API 2.0 ingest job ({}) on {}",
                batch.actions[range.start].as_str(),
                self.api.object
            ),
            records: range.len(),
            body: serde_json::Value::String(String::from_utf8_lossy(&csv).into_owned()),
        }]
    }

    async fn send(&self, batch: &OutgoingBatch, range: Range<usize>) -> SendOutcome {
        match self.job(batch, range).await {
            Ok(outcome) | Err(outcome) => outcome,
        }
    }

    async fn finish(self: Box<Self>) -> Result<(), DestinationError> {
        Ok(())
    }
}

#[async_trait]
impl VendorApi for SalesforceApi {
    fn vendor(&self) -> &'static str {
        "Salesforce"
    }

    fn auth_hint(&self) -> &'static str {
        AUTH_HINT
    }

    async fn authorize(&self) -> Result<(), SendOutcome> {
        let mut token = self.token.lock().await;
        if token.is_none() {
            *token = Some(
                self.fetch_token()
                    .await
                    .map_err(|reason| SendOutcome::Fatal { reason })?,
            );
        }
        Ok(())
    }

    async fn request(&self, batch: &OutgoingBatch, range: Range<usize>) -> Result<ApiRequest, String> {
        // A dry run has no token: it shows the requests against the login URL.
        let token = self.current_token().await;
        let (instance, mut headers) = match &token {
            Some(token) => {
                let mut headers = HeaderMap::new();
                headers.insert(
                    AUTHORIZATION,
                    secret_header(&format!("Bearer {}", token.access_token))?,
                );
                (token.instance_url.clone(), headers)
            }
            None => (self.login_url.clone(), HeaderMap::new()),
        };
        headers.insert(
            "sforce-call-options",
            "client=sluice".parse().map_err(|_| "header")?,
        );
        match batch.actions[range.start] {
            RecordAction::Delete => {
                let field = self
                    .external_id
                    .clone()
                    .ok_or("deletes need `options.external_id`")?;
                let values = self.external_ids(batch, range.clone())?;
                let ids: Vec<String> = match &token {
                    Some(token) => {
                        let found = self.lookup(token, &field, &values).await?;
                        values
                            .iter()
                            .filter_map(|v| {
                                found
                                    .iter()
                                    .find(|(value, _)| value == v)
                                    .map(|(_, id)| id.clone())
                            })
                            .collect()
                    }
                    None => values,
                };
                let mut url = self.data_url(&instance, "composite/sobjects")?;
                url.query_pairs_mut()
                    .append_pair("ids", &ids.join(","))
                    .append_pair("allOrNone", "false");
                Ok(ApiRequest::json(Method::DELETE, url, headers, Vec::new()))
            }
            action => {
                let mut body = Vec::with_capacity(batch.bodies.bytes_of(range.clone()) + range.len() + 32);
                body.extend_from_slice(b"{\"allOrNone\":false,\"records\":");
                crate::destinations::http::write_array(&mut body, range.map(|i| batch.bodies.get(i)));
                body.push(b'}');
                let (method, path) = match (&self.external_id, action) {
                    (Some(field), RecordAction::Upsert | RecordAction::Update) => (
                        Method::PATCH,
                        format!("composite/sobjects/{}/{field}", self.object),
                    ),
                    _ => (Method::POST, "composite/sobjects".to_string()),
                };
                Ok(ApiRequest::json(
                    method,
                    self.data_url(&instance, &path)?,
                    headers,
                    body,
                ))
            }
        }
    }

    /// One result per record, in request order (deletes: per id, so matched by id).
    fn on_success(&self, answer: &HttpAnswer, batch: &OutgoingBatch, range: Range<usize>) -> SendOutcome {
        let results: Vec<RecordResult> = match serde_json::from_str(&answer.body) {
            Ok(results) => results,
            Err(_) if batch.actions[range.start] == RecordAction::Delete && answer.body.trim().is_empty() => {
                return SendOutcome::Accepted;
            }
            Err(e) => {
                return SendOutcome::Rejected {
                    reason: format!("Salesforce answered with a body sluice cannot read ({e})"),
                };
            }
        };
        let describe = |r: &RecordResult| {
            r.errors
                .iter()
                .map(|e| format!("{}: {}", e.status_code, e.message))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let failures: Vec<RecordFailure> = if batch.actions[range.start] == RecordAction::Delete {
            // Results are per Salesforce id, which records were looked up by; a failure (other
            // than a record already deleted) fails the request's records, to be deleted again.
            let failed: Vec<String> = results
                .iter()
                .filter(|r| !r.success && !r.errors.iter().any(|e| e.status_code == "ENTITY_IS_DELETED"))
                .map(|r| format!("{}: {}", r.id.as_deref().unwrap_or("?"), describe(r)))
                .collect();
            if failed.is_empty() {
                Vec::new()
            } else {
                (0..range.len())
                    .map(|index| RecordFailure {
                        index,
                        error: format!("Salesforce refused deletes: {}", failed.join("; ")),
                    })
                    .collect()
            }
        } else {
            results
                .iter()
                .enumerate()
                .filter(|(i, r)| !r.success && *i < range.len())
                .map(|(index, r)| RecordFailure {
                    index,
                    error: format!("Salesforce: {}", describe(r)),
                })
                .collect()
        };
        if failures.is_empty() {
            SendOutcome::Accepted
        } else {
            SendOutcome::Partial(failures)
        }
    }

    fn on_error(&self, answer: &HttpAnswer, _batch: &OutgoingBatch, _range: Range<usize>) -> SendOutcome {
        if answer.status.as_u16() == 401 {
            // The session expired: drop the token so the retry fetches a new one.
            if let Ok(mut token) = self.token.try_lock() {
                *token = None;
            }
            return SendOutcome::Retry {
                reason: format!(
                    "{} from Salesforce (session expired; a new token is fetched)",
                    answer.describe()
                ),
                after: None,
            };
        }
        if answer.body.contains("REQUEST_LIMIT_EXCEEDED") {
            return SendOutcome::Fatal {
                reason: format!(
                    "{} from Salesforce: the org's daily API request allocation is used up; runs resume when it frees up",
                    answer.describe()
                ),
            };
        }
        classify("Salesforce", answer, AUTH_HINT)
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;

    use super::*;

    /// A throwaway 2048-bit key made for tests (`openssl genpkey -algorithm RSA`).
    const TEST_KEY: &str = include_str!("../../../tests/fixtures/test_rsa_key.pem");

    #[test]
    fn jwts_are_signed_rs256_and_verify() {
        let key = rsa_key(TEST_KEY).unwrap();
        let jwt = sign_jwt(&key, &json!({"iss": "client", "sub": "user@example.com", "aud": "https://login.salesforce.com", "exp": 1})).unwrap();
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header: serde_json::Value = serde_json::from_slice(&engine.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header["alg"], "RS256");
        let claims: serde_json::Value = serde_json::from_slice(&engine.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(claims["sub"], "user@example.com");
        let public = ring::signature::UnparsedPublicKey::new(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            ring::signature::KeyPair::public_key(&key).as_ref().to_vec(),
        );
        let signed = format!("{}.{}", parts[0], parts[1]);
        public
            .verify(signed.as_bytes(), &engine.decode(parts[2]).unwrap())
            .unwrap();
        assert!(
            public
                .verify(b"tampered", &engine.decode(parts[2]).unwrap())
                .is_err()
        );
        assert!(rsa_key("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----").is_err());
    }

    #[test]
    fn options_and_credentials_are_checked() {
        let config = |extra: serde_json::Value| -> SalesforceConfig {
            let mut base = json!({"login_url": "https://acme.my.salesforce.com", "client_id": "c"});
            base.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            serde_json::from_value(base).unwrap()
        };
        assert!(SalesforceDestination::new("s", config(json!({}))).is_err());
        let destination = SalesforceDestination::new("s", config(json!({"client_secret": "x"}))).unwrap();
        let options = |v: serde_json::Value| v.as_object().unwrap().clone();
        let spec = destination
            .action(
                None,
                &options(json!({"object": "Contact", "external_id": "Ext__c"})),
            )
            .unwrap()
            .unwrap();
        assert!(spec.deletes && spec.modes.contains(&SyncMode::Mirror));
        let insert_only = destination
            .action(None, &options(json!({"object": "Lead"})))
            .unwrap()
            .unwrap();
        assert_eq!(insert_only.modes, [SyncMode::Insert]);
        assert!(
            destination
                .action(None, &options(json!({"object": "Contact; DROP"})))
                .is_err()
        );
    }
}
