//! Snowflake's driver protocol: the HTTP endpoints its own connectors (Python, Go, JDBC) use.
//!
//! It is the one Snowflake interface that returns results as Arrow: the public SQL API
//! (`/api/v2/statements`) answers only JSON rowsets of strings. A session is opened with
//! `POST /session/v1/login-request` (key-pair JWT, OAuth access token or password); a statement
//! runs with `POST /queries/v1/query-request`, whose answer carries the column types
//! (`rowtype`), the first part of the result inline (`rowsetBase64`) and the rest as **chunks**
//! on presigned cloud-storage URLs, downloaded without the session token (with the result's
//! key, `qrmk`, as the SSE-C header, or the `chunkHeaders` given). A statement still running
//! after Snowflake's wait answers `333333` with a `getResultUrl` to poll; a session token that
//! expired answers `390112` and is renewed with the master token.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};
use url::Url;

use super::convert::RowType;
use crate::destinations::http::{describe_reqwest_error, snippet};

/// Statement still running (or detached): poll `getResultUrl`.
const IN_PROGRESS: &[&str] = &["333333", "333334"];
/// The session token expired: renew it.
const SESSION_EXPIRED: &str = "390112";
/// Attempts of one HTTP call that failed on the network or with 429/5xx.
const ATTEMPTS: u32 = 5;
/// Lifetime of a key-pair JWT (what Snowflake's own connectors use).
const JWT_LIFETIME_SECONDS: i64 = 60;

/// How the session is authenticated.
pub enum Credentials {
    /// Key-pair authentication: a JWT signed with the user's private key.
    KeyPair {
        key: Arc<ring::signature::RsaKeyPair>,
        /// `SHA256:<base64 of the public key's SHA-256>`, as `DESC USER` shows it.
        fingerprint: String,
    },
    /// An OAuth access token from the account's security integration.
    OAuth(String),
    Password(String),
}

impl Credentials {
    pub fn key_pair(pem: &str) -> Result<Self, String> {
        if pem.contains("ENCRYPTED PRIVATE KEY") {
            return Err("`private_key` is encrypted; give the unencrypted PKCS#8 key (e.g. `openssl pkcs8 -topk8 -nocrypt -in rsa_key.p8`)".into());
        }
        let key = crate::destinations::oauth::rsa_key(pem)?;
        let fingerprint = public_key_fingerprint(&key);
        Ok(Self::KeyPair {
            key: Arc::new(key),
            fingerprint,
        })
    }

    fn authenticator(&self) -> &'static str {
        match self {
            Self::KeyPair { .. } => "SNOWFLAKE_JWT",
            Self::OAuth(_) => "OAUTH",
            Self::Password(_) => "SNOWFLAKE",
        }
    }
}

/// `SHA256:` and the base64 SHA-256 of the DER SubjectPublicKeyInfo of the key's public half.
pub fn public_key_fingerprint(key: &ring::signature::RsaKeyPair) -> String {
    use ring::signature::KeyPair as _;
    // ring gives the PKCS#1 RSAPublicKey; Snowflake fingerprints the SubjectPublicKeyInfo around it.
    let pkcs1 = key.public_key().as_ref();
    let algorithm: &[u8] = &[
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut bit_string = vec![0u8];
    bit_string.extend_from_slice(pkcs1);
    let mut body = algorithm.to_vec();
    body.extend(der_element(0x03, &bit_string));
    let spki = der_element(0x30, &body);
    let digest = ring::digest::digest(&ring::digest::SHA256, &spki);
    format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
    )
}

fn der_element(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len.to_be_bytes().into_iter().skip_while(|b| *b == 0).collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

/// Where and as whom to connect.
pub struct ClientConfig {
    pub base: Url,
    /// The account locator or `org-account` name, as in the host name.
    pub account: String,
    pub user: String,
    pub credentials: Credentials,
    pub warehouse: Option<String>,
    pub database: Option<String>,
    pub schema: Option<String>,
    pub role: Option<String>,
    pub statement_timeout: Option<Duration>,
    pub connect_timeout: Duration,
}

/// What went wrong talking to Snowflake.
#[derive(Debug)]
pub enum ProtocolError {
    /// No answer (network, TLS, timeout) or an HTTP error status.
    Transport(String),
    /// Snowflake answered with an error of its own.
    Snowflake {
        code: String,
        message: String,
        sql_state: Option<String>,
    },
    /// An answer that does not follow the protocol.
    Unexpected(String),
}

impl std::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Transport(message) | Self::Unexpected(message) => f.write_str(message),
            Self::Snowflake {
                code,
                message,
                sql_state,
            } => {
                write!(f, "{message} (Snowflake error {code}")?;
                if let Some(state) = sql_state {
                    write!(f, ", SQL state {state}")?;
                }
                f.write_str(")")
            }
        }
    }
}

impl ProtocolError {
    /// Snowflake's error code, when it gave one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Snowflake { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// An open session.
pub struct Session {
    token: String,
    master_token: Option<String>,
    sequence: u64,
}

/// A statement's answer (`data` of a query response).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueryData {
    #[serde(default)]
    pub rowtype: Vec<RowType>,
    #[serde(default)]
    pub query_result_format: Option<String>,
    #[serde(default)]
    pub rowset_base64: Option<String>,
    #[serde(default)]
    pub rowset: Option<Value>,
    #[serde(default)]
    pub chunks: Vec<Chunk>,
    #[serde(default)]
    pub qrmk: Option<String>,
    #[serde(default)]
    pub chunk_headers: Option<HashMap<String, String>>,
    #[serde(default)]
    pub query_id: Option<String>,
    #[serde(default)]
    pub statement_type_id: Option<i64>,
    #[serde(default)]
    pub total: Option<u64>,
}

/// One part of a result on cloud storage.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Chunk {
    pub url: String,
    #[serde(default)]
    pub row_count: Option<u64>,
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(default)]
    data: Option<Value>,
    #[serde(default)]
    code: Option<Value>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    success: bool,
}

impl Envelope {
    fn code(&self) -> Option<String> {
        match &self.code {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        }
    }

    fn error(&self) -> ProtocolError {
        let sql_state = self
            .data
            .as_ref()
            .and_then(|d| d.get("sqlState"))
            .and_then(Value::as_str)
            .map(str::to_string);
        ProtocolError::Snowflake {
            code: self.code().unwrap_or_else(|| "unknown".into()),
            message: self.message.clone().unwrap_or_else(|| "no message".into()),
            sql_state,
        }
    }
}

pub struct Client {
    http: reqwest::Client,
    config: ClientConfig,
}

impl Client {
    pub fn new(config: ClientConfig) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
        Ok(Self { http, config })
    }

    /// The account name as the login wants it: the host name's first label, upper-cased.
    fn account_name(&self) -> String {
        self.config
            .account
            .split('.')
            .next()
            .unwrap_or(&self.config.account)
            .to_ascii_uppercase()
    }

    fn url(&self, path: &str, query: &[(&str, &str)]) -> Result<Url, ProtocolError> {
        let mut url = self
            .config
            .base
            .join(path.trim_start_matches('/'))
            .map_err(|e| ProtocolError::Unexpected(format!("bad path `{path}`: {e}")))?;
        {
            let mut pairs = url.query_pairs_mut();
            for (k, v) in query {
                pairs.append_pair(k, v);
            }
            pairs.append_pair("requestId", &uuid::Uuid::now_v7().to_string());
        }
        Ok(url)
    }

    /// Opens a session.
    pub async fn login(&self) -> Result<Session, ProtocolError> {
        let config = &self.config;
        let mut data = json!({
            "CLIENT_APP_ID": "sluice",
            "CLIENT_APP_VERSION": env!("CARGO_PKG_VERSION"),
            "ACCOUNT_NAME": self.account_name(),
            "LOGIN_NAME": config.user,
            "AUTHENTICATOR": config.credentials.authenticator(),
            "CLIENT_ENVIRONMENT": { "APPLICATION": "sluice", "OS": std::env::consts::OS },
            "SESSION_PARAMETERS": self.session_parameters(),
        });
        match &config.credentials {
            Credentials::KeyPair { key, fingerprint } => {
                let account = self.account_name();
                let user = config.user.to_ascii_uppercase();
                let now = chrono::Utc::now().timestamp();
                let claims = json!({
                    "iss": format!("{account}.{user}.{fingerprint}"),
                    "sub": format!("{account}.{user}"),
                    "iat": now,
                    "exp": now + JWT_LIFETIME_SECONDS,
                });
                let jwt =
                    crate::destinations::oauth::sign_jwt(key, &claims).map_err(ProtocolError::Unexpected)?;
                data["TOKEN"] = Value::String(jwt);
            }
            Credentials::OAuth(token) => data["TOKEN"] = Value::String(token.clone()),
            Credentials::Password(password) => data["PASSWORD"] = Value::String(password.clone()),
        }
        let mut query: Vec<(&str, &str)> = Vec::new();
        if let Some(v) = &config.database {
            query.push(("databaseName", v));
        }
        if let Some(v) = &config.schema {
            query.push(("schemaName", v));
        }
        if let Some(v) = &config.warehouse {
            query.push(("warehouse", v));
        }
        if let Some(v) = &config.role {
            query.push(("roleName", v));
        }
        let url = self.url("/session/v1/login-request", &query)?;
        let envelope = self.post(url, None, &json!({ "data": data })).await?;
        if !envelope.success {
            return Err(envelope.error());
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct LoginData {
            token: String,
            #[serde(default)]
            master_token: Option<String>,
        }
        let data: LoginData = serde_json::from_value(envelope.data.unwrap_or_default())
            .map_err(|e| ProtocolError::Unexpected(format!("unexpected login answer ({e})")))?;
        Ok(Session {
            token: data.token,
            master_token: data.master_token,
            sequence: 0,
        })
    }

    fn session_parameters(&self) -> Value {
        // Snowflake picks the result format (Arrow or JSON rowsets); both are read.
        let mut parameters = serde_json::Map::new();
        if let Some(timeout) = self.config.statement_timeout {
            parameters.insert(
                "STATEMENT_TIMEOUT_IN_SECONDS".into(),
                json!(timeout.as_secs().max(1)),
            );
        }
        Value::Object(parameters)
    }

    /// Runs one statement (or only compiles it, `describe_only`) and returns its answer once it
    /// finished, polling while it runs and renewing the session when its token expires.
    pub async fn query(
        &self,
        session: &mut Session,
        sql: &str,
        describe_only: bool,
    ) -> Result<QueryData, ProtocolError> {
        session.sequence += 1;
        let body = json!({
            "sqlText": sql,
            "asyncExec": false,
            "sequenceId": session.sequence,
            "querySubmissionTime": chrono::Utc::now().timestamp_millis(),
            "describeOnly": describe_only,
            "isInternal": false,
            "parameters": {},
            "bindings": {},
        });
        let mut renewed = false;
        let mut envelope = loop {
            let url = self.url("/queries/v1/query-request", &[])?;
            let envelope = self.post(url, Some(&session.token), &body).await?;
            if envelope.code().as_deref() == Some(SESSION_EXPIRED) && !renewed {
                self.renew(session).await?;
                renewed = true;
                continue;
            }
            break envelope;
        };
        let mut wait = Duration::from_millis(250);
        loop {
            let code = envelope.code();
            if code.as_deref().is_some_and(|c| IN_PROGRESS.contains(&c)) {
                let result_path = envelope
                    .data
                    .as_ref()
                    .and_then(|d| d.get("getResultUrl"))
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .ok_or_else(|| {
                        ProtocolError::Unexpected("a running statement without `getResultUrl`".into())
                    })?;
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
                envelope = self.poll(session, &result_path).await?;
                continue;
            }
            if !envelope.success {
                return Err(envelope.error());
            }
            return serde_json::from_value(envelope.data.take().unwrap_or_default())
                .map_err(|e| ProtocolError::Unexpected(format!("unexpected query answer ({e})")));
        }
    }

    async fn poll(&self, session: &mut Session, result_path: &str) -> Result<Envelope, ProtocolError> {
        let mut renewed = false;
        loop {
            let mut url = self
                .config
                .base
                .join(result_path.trim_start_matches('/'))
                .map_err(|e| ProtocolError::Unexpected(format!("bad `getResultUrl` {result_path}: {e}")))?;
            url.query_pairs_mut()
                .append_pair("requestId", &uuid::Uuid::now_v7().to_string());
            let envelope = self
                .send(|| self.authorized(self.http.get(url.clone()), &session.token))
                .await?;
            if envelope.code().as_deref() == Some(SESSION_EXPIRED) && !renewed {
                self.renew(session).await?;
                renewed = true;
                continue;
            }
            return Ok(envelope);
        }
    }

    /// Renews an expired session token with the master token; without one, logs in again.
    async fn renew(&self, session: &mut Session) -> Result<(), ProtocolError> {
        let Some(master) = session.master_token.clone() else {
            let fresh = self.login().await?;
            session.token = fresh.token;
            session.master_token = fresh.master_token;
            return Ok(());
        };
        let url = self.url("/session/token-request", &[])?;
        let body = json!({ "oldSessionToken": session.token, "requestType": "RENEW" });
        let envelope = self.post(url, Some(&master), &body).await?;
        if !envelope.success {
            // The master token expired too (after hours): a new session.
            tracing::debug!(error = %envelope.error(), "renewing the Snowflake session failed; logging in again");
            let fresh = self.login().await?;
            session.token = fresh.token;
            session.master_token = fresh.master_token;
            return Ok(());
        }
        let data = envelope.data.unwrap_or_default();
        let token = data
            .get("sessionToken")
            .and_then(Value::as_str)
            .ok_or_else(|| ProtocolError::Unexpected("a renewal answer without `sessionToken`".into()))?;
        session.token = token.to_string();
        if let Some(master) = data.get("masterToken").and_then(Value::as_str) {
            session.master_token = Some(master.to_string());
        }
        Ok(())
    }

    fn authorized(&self, request: reqwest::RequestBuilder, token: &str) -> reqwest::RequestBuilder {
        request
            .header("authorization", format!("Snowflake Token=\"{token}\""))
            .header("accept", "application/snowflake")
    }

    async fn post(&self, url: Url, token: Option<&str>, body: &Value) -> Result<Envelope, ProtocolError> {
        let body = serde_json::to_vec(body).map_err(|e| ProtocolError::Unexpected(e.to_string()))?;
        self.send(|| {
            let request = self
                .http
                .post(url.clone())
                .header("content-type", "application/json")
                .body(body.clone());
            match token {
                Some(token) => self.authorized(request, token),
                None => request.header("accept", "application/json"),
            }
        })
        .await
    }

    /// Sends a request, retrying network failures, 429 and 5xx with backoff, and parses
    /// Snowflake's envelope. Statements are only ever reads, so sending one again is harmless.
    async fn send(&self, request: impl Fn() -> reqwest::RequestBuilder) -> Result<Envelope, ProtocolError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let outcome = request().send().await;
            let retry = match outcome {
                Ok(response) => {
                    let status = response.status();
                    let text = response
                        .text()
                        .await
                        .map_err(|e| ProtocolError::Transport(describe_reqwest_error(&e)))?;
                    if status.is_success() || (status.is_client_error() && status.as_u16() != 429) {
                        // Snowflake puts its errors in the envelope, with 200 or a 4xx.
                        return match serde_json::from_str::<Envelope>(&text) {
                            Ok(envelope) => Ok(envelope),
                            Err(_) if status.is_success() => Err(ProtocolError::Unexpected(format!(
                                "an answer that is not Snowflake's JSON: {}",
                                snippet(&text)
                            ))),
                            Err(_) => Err(ProtocolError::Transport(format!(
                                "HTTP {status}{}",
                                snippet(&text)
                            ))),
                        };
                    }
                    format!("HTTP {status}{}", snippet(&text))
                }
                Err(e) => describe_reqwest_error(&e),
            };
            if attempt >= ATTEMPTS {
                return Err(ProtocolError::Transport(format!(
                    "{retry} (after {attempt} attempts)"
                )));
            }
            tracing::debug!(attempt, error = retry, "Snowflake request failed; retrying");
            tokio::time::sleep(Duration::from_millis(200 * 2u64.pow(attempt))).await;
        }
    }

    /// Downloads one chunk of a result, with the query's key (`qrmk`) as the SSE-C header or
    /// the headers Snowflake gave, never the session token.
    pub async fn download(&self, chunk: &Chunk, data: &ChunkAccess) -> Result<Bytes, ProtocolError> {
        let headers: Vec<(String, String)> = match (&data.headers, &data.qrmk) {
            (Some(headers), _) => headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            (None, Some(key)) => vec![
                (
                    "x-amz-server-side-encryption-customer-algorithm".into(),
                    "AES256".into(),
                ),
                ("x-amz-server-side-encryption-customer-key".into(), key.clone()),
            ],
            (None, None) => Vec::new(),
        };
        crate::sources::chunks::download(&self.http, &chunk.url, &headers)
            .await
            .map_err(|e| ProtocolError::Transport(format!("downloading a result chunk: {e}")))
    }
}

/// What a chunk download needs from the query's answer.
#[derive(Debug, Clone, Default)]
pub struct ChunkAccess {
    pub qrmk: Option<String>,
    pub headers: Option<HashMap<String, String>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_the_sha256_of_the_subject_public_key_info() {
        let pem = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/test_rsa_key.pem"
        ))
        .unwrap();
        let Credentials::KeyPair { fingerprint, .. } = Credentials::key_pair(&pem).unwrap() else {
            unreachable!()
        };
        // `openssl rsa -in tests/fixtures/test_rsa_key.pem -pubout -outform DER | openssl dgst -sha256 -binary | base64`
        assert_eq!(
            fingerprint,
            include_str!("../../../../tests/fixtures/test_rsa_key.fingerprint").trim()
        );
    }

    #[test]
    fn encrypted_keys_are_refused_with_the_command_that_decrypts_them() {
        let err = Credentials::key_pair(
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----",
        )
        .err()
        .unwrap();
        assert!(err.contains("-nocrypt"), "{err}");
    }
}
