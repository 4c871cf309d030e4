//! `type: salesforce_marketing_cloud`: rows of a Marketing Cloud Engagement data extension,
//! upserted through the REST rowset API and, with mode `mirror`, deleted through the SOAP API
//! (Marketing Cloud has no REST call that deletes a row).
//!
//! ```yaml
//! destinations:
//!   sfmc:
//!     type: salesforce_marketing_cloud
//!     subdomain: mc563885gzs27c5t9-63k636ttgm  # from the installed package's auth base URI
//!     client_id: ${SFMC_CLIENT_ID}
//!     client_secret: ${SFMC_CLIENT_SECRET}
//!     account_id: "514009708"                  # the business unit's MID (optional)
//! mappings:
//!   users_to_sfmc:
//!     model: users
//!     destination: sfmc
//!     mode: mirror
//!     options: { external_key: Users_DE, keys: [SubscriberKey] }
//!     fields: { SubscriberKey: { column: id, as: string }, EmailAddress: email, Plan: plan }
//! ```
//!
//! Tokens come from the installed package's client credentials (`/v2/token`, 20 minutes) and
//! are fetched again when refused. Rows go 50 a request (Marketing Cloud's guidance for the
//! synchronous API) to `POST /hub/v1/dataevents/key:{external_key}/rowset`, the `keys` fields
//! under `keys` and the others under `values`. Marketing Cloud refuses such a request for a bad
//! row without saying which (its errors name columns), so a refused request is split until the
//! row at fault fails alone; an upsert sent twice is harmless. Deleted rows go 50 a request as
//! SOAP `Delete` of `DataExtensionObject`s by their keys, each row's result read back by its
//! `OrdinalID`.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use reqwest::Method;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Map, Value};
use sluice_engine::destination::{
    ActionSpec, Destination, DestinationWriter, OutgoingBatch, PayloadShape, RecordAction, RecordFailure,
    RunInfo, SendOutcome, SyncMode,
};
use sluice_engine::{ConfigString, DestinationError, Secret};

use crate::destinations::http::{
    ApiRequest, DeliverySettings, HttpAnswer, HttpDelivery, HttpWriter, TokenRefusals, VendorApi,
    VendorLimits, secret_header, snippet,
};

pub const ACTIONS: &[&str] = &["data_extension"];
const AUTH_HINT: &str = "check `subdomain`, `client_id`, `client_secret` and `account_id`: the installed package must be a server-to-server API integration with the data extensions read and write scopes, and be installed in the business unit";

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SfmcConfig {
    /// The tenant subdomain, from the installed package's base URIs
    /// (`https://<subdomain>.auth.marketingcloudapis.com/`).
    pub subdomain: ConfigString,
    /// The installed package's API integration client id.
    pub client_id: ConfigString,
    /// Its client secret.
    pub client_secret: Secret,
    /// The MID of the business unit the data extensions are in (default: the package's).
    #[serde(default)]
    pub account_id: Option<ConfigString>,
    /// The authentication base URI, when not `https://<subdomain>.auth.marketingcloudapis.com`
    /// (a test server, a proxy). The REST and SOAP addresses come from the token's answer.
    #[serde(default)]
    pub auth_url: Option<ConfigString>,
    #[serde(default)]
    pub delivery: DeliverySettings,
}

/// A mapping's `options:`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct DataExtensionOptions {
    /// The data extension's external key.
    external_key: String,
    /// The data extension's primary key fields (mapped fields), which identify a row.
    keys: Vec<String>,
}

impl DataExtensionOptions {
    fn parse(options: &Map<String, Value>) -> Result<Self, String> {
        let parsed: Self = serde_json::from_value(Value::Object(options.clone())).map_err(|e| {
            format!("Marketing Cloud mapping `options`: {e} (write `options: {{external_key: Users_DE, keys: [SubscriberKey]}}`)")
        })?;
        if parsed.external_key.trim().is_empty() {
            return Err("`options.external_key` is the data extension's external key".into());
        }
        if parsed.keys.is_empty() || parsed.keys.iter().any(|k| k.trim().is_empty()) {
            return Err("`options.keys` names the data extension's primary key fields, as mapped: `keys: [SubscriberKey]`".into());
        }
        Ok(parsed)
    }
}

/// An access token and the tenant's addresses, from `/v2/token`.
#[derive(Clone)]
struct Token {
    access_token: String,
    rest: reqwest::Url,
    soap: reqwest::Url,
    expires: Instant,
}

/// The installed package's client credentials, and the token they last got (shared by the
/// destination's runs: Marketing Cloud asks for few token requests).
struct Credentials {
    auth: reqwest::Url,
    client_id: String,
    client_secret: String,
    account_id: Option<String>,
    http: reqwest::Client,
    cached: tokio::sync::Mutex<Option<Token>>,
}

impl Credentials {
    async fn token(&self) -> Result<Token, String> {
        let mut cached = self.cached.lock().await;
        if let Some(token) = cached.as_ref()
            && Instant::now() < token.expires
        {
            return Ok(token.clone());
        }
        let url = self.auth.join("/v2/token").map_err(|e| e.to_string())?;
        let mut body = serde_json::json!({
            "grant_type": "client_credentials",
            "client_id": self.client_id,
            "client_secret": self.client_secret,
        });
        if let Some(mid) = &self.account_id {
            body["account_id"] = Value::String(mid.clone());
        }
        let response = self
            .http
            .post(url)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| {
                format!(
                    "Marketing Cloud token request: {}",
                    crate::destinations::http::describe_reqwest_error(&e)
                )
            })?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if !status.is_success() {
            let said = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| {
                    v["error_description"]
                        .as_str()
                        .or(v["message"].as_str())
                        .map(|m| format!(": {m}"))
                })
                .unwrap_or_else(|| snippet(&text));
            return Err(format!(
                "Marketing Cloud refused the token request: HTTP {status}{said}; {AUTH_HINT}"
            ));
        }
        #[derive(Deserialize)]
        struct Answer {
            access_token: String,
            #[serde(default)]
            expires_in: Option<u64>,
            rest_instance_url: String,
            soap_instance_url: String,
        }
        let answer: Answer = serde_json::from_str(&text).map_err(|e| {
            format!(
                "Marketing Cloud answered the token request with {e}{}",
                snippet(&text)
            )
        })?;
        // The instance URLs end with `/`; paths are joined to them.
        let base = |text: &str| {
            let text = if text.ends_with('/') {
                text.to_string()
            } else {
                format!("{text}/")
            };
            reqwest::Url::parse(&text)
                .map_err(|e| format!("Marketing Cloud sent an instance URL that is not one: {e}"))
        };
        let lifetime = Duration::from_secs(answer.expires_in.unwrap_or(1080));
        let token = Token {
            access_token: answer.access_token,
            rest: base(&answer.rest_instance_url)?,
            soap: base(&answer.soap_instance_url)?,
            // Refreshed two minutes early, so a request never carries one about to expire.
            expires: Instant::now() + lifetime.saturating_sub(Duration::from_secs(120)),
        };
        *cached = Some(token.clone());
        Ok(token)
    }

    async fn forget(&self) {
        *self.cached.lock().await = None;
    }
}

pub struct SfmcDestination {
    name: String,
    credentials: Arc<Credentials>,
    delivery: HttpDelivery,
}

impl SfmcDestination {
    pub fn new(name: &str, config: SfmcConfig) -> Result<Self, String> {
        let subdomain = config.subdomain.expose().trim().to_lowercase();
        // The subdomain becomes a host name: only what Marketing Cloud's subdomains hold.
        if subdomain.is_empty()
            || subdomain.len() > 64
            || !subdomain.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err("`subdomain` is the tenant subdomain from the installed package's base URIs (letters, digits and dashes, as in mc563885gzs27c5t9-63k636ttgm)".into());
        }
        let auth = match &config.auth_url {
            Some(url) => super::http::parse_url_option("auth_url", url.expose())?,
            None => super::http::parse_url_option(
                "subdomain",
                &format!("https://{subdomain}.auth.marketingcloudapis.com"),
            )?,
        };
        let delivery = HttpDelivery::new(
            &config.delivery,
            // Marketing Cloud's guidance for the synchronous API: 50 rows a request.
            VendorLimits::per_request(50, 5 * 1024 * 1024),
        )?;
        Ok(Self {
            name: name.to_string(),
            credentials: Arc::new(Credentials {
                auth,
                client_id: config.client_id.expose().trim().to_string(),
                client_secret: config.client_secret.expose().to_string(),
                account_id: config
                    .account_id
                    .as_ref()
                    .map(|m| m.expose().trim().to_string())
                    .filter(|m| !m.is_empty()),
                http: delivery.client.clone(),
                cached: tokio::sync::Mutex::new(None),
            }),
            delivery,
        })
    }
}

#[async_trait]
impl Destination for SfmcDestination {
    fn kind(&self) -> &'static str {
        "salesforce_marketing_cloud"
    }

    fn action(
        &self,
        action: Option<&str>,
        options: &Map<String, Value>,
    ) -> Result<Option<ActionSpec>, String> {
        match action.unwrap_or("data_extension") {
            "data_extension" => {
                let options = DataExtensionOptions::parse(options)?;
                let keys: Vec<&str> = options.keys.iter().map(String::as_str).collect();
                // Every key field identifies the row: all are required, and deletes carry
                // the values the data extension last received.
                let shape = PayloadShape::default().identity(&keys).required(&keys);
                Ok(Some(
                    ActionSpec::new("data_extension", shape)
                        .modes(&[SyncMode::Upsert, SyncMode::Mirror])
                        .deletes(),
                ))
            }
            other => Err(format!(
                "unknown action `{other}`; the salesforce_marketing_cloud destination offers {}",
                ACTIONS.join(", ")
            )),
        }
    }

    /// Gets a token: refused credentials, a package not installed in the business unit or an
    /// unknown subdomain fail the check.
    async fn check(&self) -> Result<(), DestinationError> {
        self.credentials
            .token()
            .await
            .map(|_| ())
            .map_err(|message| DestinationError::Unreachable {
                destination: self.name.clone(),
                message,
            })
    }

    async fn open(&self, run: &RunInfo) -> Result<Box<dyn DestinationWriter>, DestinationError> {
        let options =
            DataExtensionOptions::parse(&run.options).map_err(|message| DestinationError::Config {
                destination: self.name.clone(),
                message,
            })?;
        Ok(HttpWriter::boxed(
            DataExtensionApi {
                external_key: options.external_key.trim().to_string(),
                keys: options.keys,
                credentials: self.credentials.clone(),
                token: tokio::sync::Mutex::new(None),
                tokens: TokenRefusals::default(),
            },
            &self.delivery,
        ))
    }
}

struct DataExtensionApi {
    external_key: String,
    keys: Vec<String>,
    credentials: Arc<Credentials>,
    /// The token requests carry (none in a dry run).
    token: tokio::sync::Mutex<Option<Token>>,
    tokens: TokenRefusals,
}

/// Marketing Cloud's REST error envelope: `{"message", "errorcode", "documentation",
/// "additionalErrors": [{"message", "errorcode"}]}`.
#[derive(Debug, Deserialize)]
struct RestError {
    #[serde(default)]
    message: String,
    #[serde(default)]
    errorcode: Option<i64>,
    #[serde(default, rename = "additionalErrors")]
    additional_errors: Vec<RestError>,
}

impl RestError {
    fn describe(&self) -> String {
        let mut text = match self.errorcode {
            Some(code) => format!("{} (errorcode {code})", self.message),
            None => self.message.clone(),
        };
        for inner in &self.additional_errors {
            text.push_str("; ");
            text.push_str(&inner.message);
        }
        text
    }
}

/// One row's result in a SOAP `DeleteResponse`.
#[derive(Debug, Default, Clone, PartialEq)]
struct DeleteResult {
    status_code: String,
    status_message: String,
    ordinal: Option<usize>,
    error_code: Option<String>,
}

/// A SOAP answer: each `Results` of a `DeleteResponse`, and a `soap:Fault`'s `faultstring`.
#[derive(Debug, Default, PartialEq)]
struct SoapAnswer {
    results: Vec<DeleteResult>,
    fault: Option<String>,
}

fn read_soap(xml: &str) -> Result<SoapAnswer, String> {
    use quick_xml::events::Event;
    let bad = |e: &dyn std::fmt::Display| format!("Marketing Cloud's SOAP answer is not XML: {e}");
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut answer = SoapAnswer::default();
    let mut path: Vec<String> = Vec::new();
    let mut current: Option<DeleteResult> = None;
    // The text of the element being read: text events and entity references in turn.
    let mut text = String::new();
    loop {
        match reader.read_event().map_err(|e| bad(&e))? {
            Event::Start(start) => {
                let name = String::from_utf8_lossy(start.local_name().as_ref()).into_owned();
                if name == "Results" {
                    current = Some(DeleteResult::default());
                }
                path.push(name);
                text.clear();
            }
            Event::Text(part) => text.push_str(&part.decode().map_err(|e| bad(&e))?),
            Event::CData(part) => text.push_str(&part.decode().map_err(|e| bad(&e))?),
            Event::GeneralRef(reference) => match reference.resolve_char_ref().map_err(|e| bad(&e))? {
                Some(c) => text.push(c),
                None => text.push_str(match reference.decode().map_err(|e| bad(&e))?.as_ref() {
                    "amp" => "&",
                    "lt" => "<",
                    "gt" => ">",
                    "quot" => "\"",
                    "apos" => "'",
                    _ => "",
                }),
            },
            Event::End(_) => {
                let element = path.pop().unwrap_or_default();
                let value = std::mem::take(&mut text).trim().to_string();
                let in_results = path.last().is_some_and(|p| p == "Results");
                match (element.as_str(), current.as_mut()) {
                    ("Results", _) => answer.results.extend(current.take()),
                    ("faultstring", _) => answer.fault = Some(value),
                    ("StatusCode", Some(result)) if in_results => result.status_code = value,
                    ("StatusMessage", Some(result)) if in_results => result.status_message = value,
                    ("OrdinalID", Some(result)) if in_results => result.ordinal = value.parse().ok(),
                    ("ErrorCode", Some(result)) if in_results => result.error_code = Some(value),
                    _ => {}
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    Ok(answer)
}

/// `text` with XML's five special characters escaped.
fn xml_text(text: &str) -> String {
    quick_xml::escape::escape(text).into_owned()
}

fn value_text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

impl DataExtensionApi {
    /// `[{"keys": {...}, "values": {...}}, ...]`: the key fields under `keys`, the others
    /// under `values`.
    fn rowset(&self, batch: &OutgoingBatch, range: Range<usize>) -> Result<Vec<u8>, String> {
        let mut rows = Vec::with_capacity(range.len());
        for i in range {
            let mut values: Map<String, Value> =
                serde_json::from_slice(batch.bodies.get(i)).map_err(|e| e.to_string())?;
            let mut keys = Map::new();
            for key in &self.keys {
                if let Some(value) = values.remove(key) {
                    keys.insert(key.clone(), value);
                }
            }
            rows.push(serde_json::json!({"keys": keys, "values": values}));
        }
        serde_json::to_vec(&rows).map_err(|e| e.to_string())
    }

    /// A SOAP `DeleteRequest` of one `DataExtensionObject` a record, by its keys.
    fn delete_envelope(
        &self,
        token: Option<&str>,
        batch: &OutgoingBatch,
        range: Range<usize>,
    ) -> Result<Vec<u8>, String> {
        let mut xml = String::with_capacity(512 + range.len() * 256);
        xml.push_str(r#"<?xml version="1.0" encoding="UTF-8"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><s:Header><fueloauth xmlns="http://exacttarget.com">"#);
        // A dry run shows the request without a token.
        xml.push_str(&xml_text(token.unwrap_or("(token)")));
        xml.push_str(r#"</fueloauth></s:Header><s:Body><DeleteRequest xmlns="http://exacttarget.com/wsdl/partnerAPI"><Options/>"#);
        for i in range {
            let ids: Map<String, Value> =
                serde_json::from_slice(batch.ids.get(i)).map_err(|e| e.to_string())?;
            xml.push_str(r#"<Objects xsi:type="DataExtensionObject"><CustomerKey>"#);
            xml.push_str(&xml_text(&self.external_key));
            xml.push_str("</CustomerKey><Keys>");
            for key in &self.keys {
                let value = ids
                    .get(key)
                    .ok_or_else(|| format!("the deleted row has no value for key field `{key}`"))?;
                xml.push_str("<Key><Name>");
                xml.push_str(&xml_text(key));
                xml.push_str("</Name><Value>");
                xml.push_str(&xml_text(&value_text(value)));
                xml.push_str("</Value></Key>");
            }
            xml.push_str("</Keys></Objects>");
        }
        xml.push_str("</DeleteRequest></s:Body></s:Envelope>");
        Ok(xml.into_bytes())
    }

    fn on_delete_answer(&self, answer: &HttpAnswer, range: Range<usize>) -> SendOutcome {
        let parsed = match read_soap(&answer.body) {
            Ok(parsed) => parsed,
            Err(reason) if answer.status.is_server_error() => {
                return SendOutcome::Retry { reason, after: None };
            }
            Err(reason) => return SendOutcome::Rejected { reason },
        };
        if let Some(fault) = parsed.fault {
            let reason = format!("Marketing Cloud SOAP fault: {fault}");
            if fault.to_lowercase().contains("token expired") || answer.status.as_u16() == 401 {
                return self.tokens.refused(reason, AUTH_HINT);
            }
            // Marketing Cloud throttles SOAP calls with HTTP 500.
            if answer.status.is_server_error() {
                return SendOutcome::Retry {
                    reason,
                    after: answer.retry_after(),
                };
            }
            return SendOutcome::Rejected { reason };
        }
        if !answer.status.is_success() {
            return crate::destinations::http::classify("Marketing Cloud", answer, AUTH_HINT);
        }
        self.tokens.accepted();
        let mut failures = Vec::new();
        for (position, result) in parsed.results.iter().enumerate() {
            let ok = result.status_code.eq_ignore_ascii_case("OK")
                // A row already gone is deleted.
                || result.status_message.to_lowercase().contains("not found");
            if !ok {
                let index = result.ordinal.unwrap_or(position);
                failures.push(RecordFailure {
                    index,
                    error: format!(
                        "Marketing Cloud: {}{}",
                        result.status_message,
                        result
                            .error_code
                            .as_ref()
                            .map(|c| format!(" (ErrorCode {c})"))
                            .unwrap_or_default()
                    ),
                });
            }
        }
        if parsed.results.len() < range.len() && failures.is_empty() {
            return SendOutcome::Retry {
                reason: format!(
                    "Marketing Cloud answered {} results for {} deletes{}",
                    parsed.results.len(),
                    range.len(),
                    snippet(&answer.body)
                ),
                after: None,
            };
        }
        if failures.is_empty() {
            SendOutcome::Accepted
        } else {
            SendOutcome::Partial(failures)
        }
    }
}

#[async_trait]
impl VendorApi for DataExtensionApi {
    fn vendor(&self) -> &'static str {
        "Marketing Cloud"
    }

    fn auth_hint(&self) -> &'static str {
        AUTH_HINT
    }

    async fn authorize(&self) -> Result<(), SendOutcome> {
        if self.tokens.take_stale() {
            self.credentials.forget().await;
        }
        let token = self
            .credentials
            .token()
            .await
            .map_err(|reason| SendOutcome::Fatal { reason })?;
        *self.token.lock().await = Some(token);
        Ok(())
    }

    async fn request(&self, batch: &OutgoingBatch, range: Range<usize>) -> Result<ApiRequest, String> {
        let token = self.token.lock().await.clone();
        let placeholder = |path: &str| {
            reqwest::Url::parse(&format!("https://marketing-cloud.invalid/{path}")).map_err(|e| e.to_string())
        };
        if batch.actions[range.start] == RecordAction::Delete {
            let url = match &token {
                Some(token) => token.soap.join("Service.asmx").map_err(|e| e.to_string())?,
                None => placeholder("Service.asmx")?,
            };
            let mut headers = HeaderMap::new();
            headers.insert("soapaction", HeaderValue::from_static("Delete"));
            let body = self.delete_envelope(token.as_ref().map(|t| t.access_token.as_str()), batch, range)?;
            return Ok(ApiRequest {
                method: Method::POST,
                url,
                headers,
                content_type: "text/xml; charset=utf-8",
                body,
            });
        }
        let path = format!(
            "hub/v1/dataevents/key:{}/rowset",
            url::form_urlencoded::byte_serialize(self.external_key.as_bytes()).collect::<String>()
        );
        let mut headers = HeaderMap::new();
        let url = match &token {
            Some(token) => {
                headers.insert(
                    AUTHORIZATION,
                    secret_header(&format!("Bearer {}", token.access_token))?,
                );
                token.rest.join(&path).map_err(|e| e.to_string())?
            }
            None => placeholder(&path)?,
        };
        Ok(ApiRequest::json(
            Method::POST,
            url,
            headers,
            self.rowset(batch, range)?,
        ))
    }

    fn on_success(&self, answer: &HttpAnswer, batch: &OutgoingBatch, range: Range<usize>) -> SendOutcome {
        if batch.actions[range.start] == RecordAction::Delete {
            return self.on_delete_answer(answer, range);
        }
        self.tokens.accepted();
        SendOutcome::Accepted
    }

    fn on_error(&self, answer: &HttpAnswer, batch: &OutgoingBatch, range: Range<usize>) -> SendOutcome {
        if batch.actions[range.start] == RecordAction::Delete {
            return self.on_delete_answer(answer, range);
        }
        let Ok(error) = serde_json::from_str::<RestError>(&answer.body) else {
            return crate::destinations::http::classify("Marketing Cloud", answer, AUTH_HINT);
        };
        let reason = format!("Marketing Cloud: {}", error.describe());
        match (answer.status.as_u16(), error.errorcode) {
            (401, _) => self.tokens.refused(reason, AUTH_HINT),
            (403, _) | (_, Some(20002)) => SendOutcome::Fatal {
                reason: format!("{reason}; {AUTH_HINT}"),
            },
            (404, _) | (_, Some(10001)) => SendOutcome::Fatal {
                reason: format!(
                    "{reason}; check the mapping's `options.external_key` and that the installed package may write this data extension"
                ),
            },
            (429, _) => SendOutcome::RateLimited {
                reason,
                after: answer.retry_after(),
            },
            // "Unable to save rows" with no row errors is transient.
            (400, Some(10006)) if error.additional_errors.is_empty() => SendOutcome::Retry {
                reason,
                after: answer.retry_after(),
            },
            // A row's value is refused, and Marketing Cloud does not say which row.
            (400, _) => SendOutcome::Invalid { reason },
            _ => crate::destinations::http::classify("Marketing Cloud", answer, AUTH_HINT),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soap_delete_results_are_read_by_ordinal() {
        let xml = r#"<?xml version="1.0" encoding="utf-8"?><soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"><soap:Body><DeleteResponse xmlns="http://exacttarget.com/wsdl/partnerAPI">
            <Results><StatusCode>OK</StatusCode><StatusMessage>Deleted</StatusMessage><OrdinalID>0</OrdinalID></Results>
            <Results xsi:type="DataExtensionDeleteResult" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><StatusCode>Error</StatusCode><StatusMessage>Keys Not Found &amp; more</StatusMessage><OrdinalID>1</OrdinalID><ErrorCode>310007</ErrorCode></Results>
            <RequestID>676FA9D6</RequestID><OverallStatus>Has Errors</OverallStatus></DeleteResponse></soap:Body></soap:Envelope>"#;
        let answer = read_soap(xml).unwrap();
        assert_eq!(answer.results.len(), 2);
        assert_eq!(answer.results[1].status_message, "Keys Not Found & more");
        assert_eq!(answer.results[1].ordinal, Some(1));
        assert_eq!(answer.results[1].error_code.as_deref(), Some("310007"));
        let fault = r#"<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"><soap:Body><soap:Fault><faultcode>soap:Client</faultcode><faultstring>Token Expired</faultstring></soap:Fault></soap:Body></soap:Envelope>"#;
        assert_eq!(read_soap(fault).unwrap().fault.as_deref(), Some("Token Expired"));
    }

    #[test]
    fn options_name_the_data_extension_and_its_keys_and_the_subdomain_is_a_host() {
        let options = |v: Value| DataExtensionOptions::parse(v.as_object().unwrap());
        assert!(options(serde_json::json!({"external_key": "Users_DE", "keys": ["SubscriberKey"]})).is_ok());
        assert!(
            options(serde_json::json!({"external_key": "Users_DE"}))
                .unwrap_err()
                .contains("keys")
        );
        assert!(options(serde_json::json!({"external_key": "", "keys": ["K"]})).is_err());
        let config = |subdomain: &str| -> SfmcConfig {
            serde_json::from_value(
                serde_json::json!({"subdomain": subdomain, "client_id": "c", "client_secret": "s"}),
            )
            .unwrap()
        };
        assert!(SfmcDestination::new("sfmc", config("mc563885gzs27c5t9-63k636ttgm")).is_ok());
        assert!(SfmcDestination::new("sfmc", config("evil.example.com/x")).is_err());
    }

    #[test]
    fn rest_errors_split_refused_rows_and_retry_transient_ones() {
        let api = DataExtensionApi {
            external_key: "DE".into(),
            keys: vec!["K".into()],
            credentials: SfmcDestination::new(
                "sfmc",
                serde_json::from_value(
                    serde_json::json!({"subdomain": "mc1", "client_id": "c", "client_secret": "s"}),
                )
                .unwrap(),
            )
            .unwrap()
            .credentials,
            token: tokio::sync::Mutex::new(None),
            tokens: TokenRefusals::default(),
        };
        let mut batch = OutgoingBatch::empty();
        batch.actions.push(RecordAction::Upsert);
        let answer = |status: u16, body: &str| HttpAnswer {
            status: reqwest::StatusCode::from_u16(status).unwrap(),
            headers: HeaderMap::new(),
            body: body.to_string(),
        };
        let refused = r#"{"message":"Unable to save rows for data extension ID dcf7a0f9","errorcode":10006,"documentation":"","additionalErrors":[{"message":"EmailAddress: The value for column [EmailAddress] is not a valid email address.","errorcode":10000,"documentation":""}]}"#;
        assert!(
            matches!(api.on_error(&answer(400, refused), &batch, 0..1), SendOutcome::Invalid { reason } if reason.contains("not a valid email address"))
        );
        let transient = r#"{"message":"Unable to save rows for data extension ID dcf7a0f9","errorcode":10006,"documentation":""}"#;
        assert!(matches!(
            api.on_error(&answer(400, transient), &batch, 0..1),
            SendOutcome::Retry { .. }
        ));
        let throttled =
            r#"{"message":"Rate limit exceeded","errorcode":50100,"retryAfter":5,"documentation":""}"#;
        assert!(matches!(
            api.on_error(&answer(429, throttled), &batch, 0..1),
            SendOutcome::RateLimited { .. }
        ));
        let expired = r#"{"message":"Not Authorized","errorcode":0,"documentation":""}"#;
        assert!(matches!(
            api.on_error(&answer(401, expired), &batch, 0..1),
            SendOutcome::Retry { .. }
        ));
        assert!(matches!(
            api.on_error(&answer(401, expired), &batch, 0..1),
            SendOutcome::Fatal { .. }
        ));
    }
}
