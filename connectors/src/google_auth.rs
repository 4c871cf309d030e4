//! Google access tokens, from the credentials Google's own client libraries accept
//! (Application Default Credentials):
//!
//! - a **service account key** (`"type": "service_account"`): a self-signed RS256 JWT exchanged
//!   at the key's `token_uri` (RFC 7523);
//! - **workload identity federation** (`"type": "external_account"`): a token from the workload's
//!   own identity provider (a file such as a Kubernetes projected token, or a URL such as
//!   Azure's IMDS), exchanged at Google's STS (RFC 8693), then for a service account's token
//!   when the configuration names one to impersonate;
//! - a **user's credentials** (`"type": "authorized_user"`, from `gcloud auth
//!   application-default login`): its refresh token;
//! - with nothing configured: the file `GOOGLE_APPLICATION_CREDENTIALS` names, else the
//!   **metadata server** of the VM, GKE pod (GKE workload identity) or Cloud Run service
//!   (`GCE_METADATA_HOST` overrides its address, as for Google's libraries).
//!
//! Tokens are cached until a minute before they expire.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Value, json};
use sluice_engine::source::ConnectorEnv;
use url::Url;

use crate::destinations::http::{describe_reqwest_error, snippet};
use crate::destinations::oauth::{request_token, rsa_key, sign_jwt};

const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
const DEFAULT_METADATA_HOST: &str = "metadata.google.internal";
/// What Google's STS issues for, and what impersonation narrows to the API's scope.
const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";

/// Where a Google client gets its access tokens, and its cache.
pub struct GoogleAuth {
    credentials: Credentials,
    /// The original credentials' JSON text when it is a service account key (object_store
    /// takes the key whole for Cloud Storage).
    key_json: Option<String>,
    http: reqwest::Client,
    cache: tokio::sync::Mutex<Option<(String, Instant)>>,
}

enum Credentials {
    ServiceAccount {
        client_email: String,
        key: ring::signature::RsaKeyPair,
        token_uri: Url,
    },
    AuthorizedUser {
        client_id: String,
        client_secret: String,
        refresh_token: String,
        token_uri: Url,
    },
    ExternalAccount(ExternalAccount),
    Metadata {
        base: Url,
    },
}

struct ExternalAccount {
    audience: String,
    subject_token_type: String,
    token_url: Url,
    impersonation_url: Option<Url>,
    subject: SubjectToken,
}

/// Where the workload's own token comes from.
enum SubjectToken {
    File {
        path: PathBuf,
        json_field: Option<String>,
    },
    Url {
        url: Url,
        headers: Vec<(String, String)>,
        json_field: Option<String>,
    },
}

/// The credential file's fields, whichever its type.
#[derive(Deserialize)]
struct CredentialFile {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    // service_account
    #[serde(default)]
    client_email: Option<String>,
    #[serde(default)]
    private_key: Option<String>,
    #[serde(default)]
    token_uri: Option<String>,
    // authorized_user
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default)]
    client_secret: Option<String>,
    #[serde(default)]
    refresh_token: Option<String>,
    // external_account
    #[serde(default)]
    audience: Option<String>,
    #[serde(default)]
    subject_token_type: Option<String>,
    #[serde(default)]
    token_url: Option<String>,
    #[serde(default)]
    service_account_impersonation_url: Option<String>,
    #[serde(default)]
    credential_source: Option<Value>,
}

impl GoogleAuth {
    /// The credentials `configured` holds (a credential JSON, or the path of its file), or with
    /// none, Application Default Credentials: `GOOGLE_APPLICATION_CREDENTIALS`, then the
    /// metadata server.
    pub fn new(configured: Option<&str>, env: &ConnectorEnv, http: reqwest::Client) -> Result<Self, String> {
        let text = match configured.map(str::trim).filter(|t| !t.is_empty()) {
            Some(text) if text.starts_with('{') => Some(text.to_string()),
            Some(path) => {
                let path = env.resolve_path(path);
                Some(std::fs::read_to_string(&path).map_err(|e| {
                    format!("cannot read the Google credentials file {}: {e}", path.display())
                })?)
            }
            None => match std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS") {
                Some(path) => Some(std::fs::read_to_string(&path).map_err(|e| {
                    format!(
                        "cannot read GOOGLE_APPLICATION_CREDENTIALS {}: {e}",
                        PathBuf::from(&path).display()
                    )
                })?),
                None => None,
            },
        };
        let (credentials, key_json) = match text {
            Some(text) => {
                let file: CredentialFile = serde_json::from_str(&text)
                    .map_err(|e| format!("the Google credentials are not a credential JSON: {e}"))?;
                let is_key = file.kind.as_deref().is_none_or(|k| k == "service_account");
                (Self::parse(file, env)?, is_key.then_some(text))
            }
            None => {
                let host =
                    std::env::var("GCE_METADATA_HOST").unwrap_or_else(|_| DEFAULT_METADATA_HOST.into());
                let base = Url::parse(&format!("http://{host}/"))
                    .map_err(|e| format!("GCE_METADATA_HOST `{host}` is not a host: {e}"))?;
                (Credentials::Metadata { base }, None)
            }
        };
        Ok(Self {
            credentials,
            key_json,
            http,
            cache: tokio::sync::Mutex::default(),
        })
    }

    fn parse(file: CredentialFile, env: &ConnectorEnv) -> Result<Credentials, String> {
        let url = |text: Option<String>, default: &str, what: &str| {
            let text = text.unwrap_or_else(|| default.to_string());
            Url::parse(&text).map_err(|e| format!("`{what}` of the Google credentials: {e}"))
        };
        let required = |value: Option<String>, what: &str, kind: &str| {
            value.ok_or_else(|| format!("the {kind} credentials have no `{what}`"))
        };
        match file.kind.as_deref().unwrap_or("service_account") {
            "service_account" => Ok(Credentials::ServiceAccount {
                key: rsa_key(&required(file.private_key, "private_key", "service account")?)?,
                client_email: required(file.client_email, "client_email", "service account")?,
                token_uri: url(file.token_uri, DEFAULT_TOKEN_URI, "token_uri")?,
            }),
            "authorized_user" => Ok(Credentials::AuthorizedUser {
                client_id: required(file.client_id, "client_id", "authorized_user")?,
                client_secret: required(file.client_secret, "client_secret", "authorized_user")?,
                refresh_token: required(file.refresh_token, "refresh_token", "authorized_user")?,
                token_uri: url(file.token_uri, DEFAULT_TOKEN_URI, "token_uri")?,
            }),
            "external_account" => {
                let source = file
                    .credential_source
                    .ok_or("the external_account credentials have no `credential_source`")?;
                let json_field = match source["format"]["type"].as_str() {
                    Some("json") => Some(
                        source["format"]["subject_token_field_name"]
                            .as_str()
                            .ok_or(
                                "`credential_source.format` of type json needs `subject_token_field_name`",
                            )?
                            .to_string(),
                    ),
                    Some("text") | None => None,
                    Some(other) => {
                        return Err(format!(
                            "`credential_source.format.type` `{other}` is not text or json"
                        ));
                    }
                };
                let subject = if let Some(path) = source["file"].as_str() {
                    SubjectToken::File {
                        path: env.resolve_path(path),
                        json_field,
                    }
                } else if let Some(address) = source["url"].as_str() {
                    let headers = source["headers"]
                        .as_object()
                        .map(|h| {
                            h.iter()
                                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                                .collect()
                        })
                        .unwrap_or_default();
                    SubjectToken::Url {
                        url: Url::parse(address).map_err(|e| format!("`credential_source.url`: {e}"))?,
                        headers,
                        json_field,
                    }
                } else if source.get("environment_id").is_some() {
                    return Err(
                        "external_account credentials sourced from AWS are not supported: use a file- or URL-sourced configuration, or a service account key"
                            .into(),
                    );
                } else {
                    return Err(
                        "`credential_source` must name a `file` or a `url` (executable sources are not supported)".into(),
                    );
                };
                Ok(Credentials::ExternalAccount(ExternalAccount {
                    audience: required(file.audience, "audience", "external_account")?,
                    subject_token_type: required(
                        file.subject_token_type,
                        "subject_token_type",
                        "external_account",
                    )?,
                    token_url: url(file.token_url, "https://sts.googleapis.com/v1/token", "token_url")?,
                    impersonation_url: file
                        .service_account_impersonation_url
                        .map(|u| {
                            Url::parse(&u).map_err(|e| format!("`service_account_impersonation_url`: {e}"))
                        })
                        .transpose()?,
                    subject,
                }))
            }
            other => Err(format!(
                "Google credentials of type `{other}` are not supported (use service_account, external_account or authorized_user)"
            )),
        }
    }

    /// Who the tokens act as, for hints about missing permissions.
    pub fn principal(&self) -> String {
        match &self.credentials {
            Credentials::ServiceAccount { client_email, .. } => format!("the service account {client_email}"),
            Credentials::AuthorizedUser { .. } => "the user of the authorized_user credentials".into(),
            Credentials::ExternalAccount(account) => match account
                .impersonation_url
                .as_ref()
                .and_then(|u| u.path().rsplit('/').next())
                .and_then(|last| last.split(':').next())
            {
                Some(email) => {
                    format!("the service account {email} (impersonated through workload identity federation)")
                }
                None => format!("the workload identity pool principal of {}", account.audience),
            },
            Credentials::Metadata { .. } => {
                "the service account of this VM, pod or service (from the metadata server)".into()
            }
        }
    }

    /// The service account key's JSON, when these credentials are one.
    pub fn key_json(&self) -> Option<&str> {
        self.key_json.as_deref()
    }

    /// Forgets the cached token (after the API refused it).
    pub async fn forget(&self) {
        *self.cache.lock().await = None;
    }

    /// An access token for `scope`, cached until a minute before it expires. The error says
    /// what was refused and `hint`.
    pub async fn token(&self, scope: &str, hint: &str) -> Result<String, String> {
        let mut cached = self.cache.lock().await;
        if let Some((token, expires)) = cached.as_ref()
            && Instant::now() < *expires
        {
            return Ok(token.clone());
        }
        let (token, lifetime) = self.fetch(scope, hint).await?;
        *cached = Some((
            token.clone(),
            Instant::now() + lifetime.saturating_sub(Duration::from_secs(60)),
        ));
        Ok(token)
    }

    async fn fetch(&self, scope: &str, hint: &str) -> Result<(String, Duration), String> {
        #[derive(Deserialize)]
        struct Answer {
            access_token: String,
            #[serde(default)]
            expires_in: Option<u64>,
        }
        let lifetime = |answer: &Answer| Duration::from_secs(answer.expires_in.unwrap_or(3600));
        match &self.credentials {
            Credentials::ServiceAccount {
                client_email,
                key,
                token_uri,
            } => {
                let now = chrono::Utc::now().timestamp();
                let claims = json!({"iss": client_email, "scope": scope, "aud": token_uri.as_str(), "iat": now, "exp": now + 3600});
                let assertion = sign_jwt(key, &claims)?;
                let form = [
                    ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                    ("assertion", assertion.as_str()),
                ];
                let answer: Answer =
                    request_token(&self.http, token_uri.clone(), &form, "Google", hint).await?;
                Ok((answer.access_token.clone(), lifetime(&answer)))
            }
            Credentials::AuthorizedUser {
                client_id,
                client_secret,
                refresh_token,
                token_uri,
            } => {
                let form = [
                    ("grant_type", "refresh_token"),
                    ("client_id", client_id.as_str()),
                    ("client_secret", client_secret.as_str()),
                    ("refresh_token", refresh_token.as_str()),
                ];
                let answer: Answer =
                    request_token(&self.http, token_uri.clone(), &form, "Google", hint).await?;
                Ok((answer.access_token.clone(), lifetime(&answer)))
            }
            Credentials::Metadata { base } => {
                let mut url = base
                    .join("computeMetadata/v1/instance/service-accounts/default/token")
                    .map_err(|e| e.to_string())?;
                url.query_pairs_mut().append_pair("scopes", scope);
                let answer: Answer = self
                    .get_json(url, &[("Metadata-Flavor", "Google")], "the metadata server")
                    .await
                    .map_err(|e| {
                        format!("{e}; with no `service_account` configured, sluice asks the metadata server of a Google Cloud VM, GKE pod or Cloud Run service")
                    })?;
                Ok((answer.access_token.clone(), lifetime(&answer)))
            }
            Credentials::ExternalAccount(account) => self.federated(account, scope, hint).await,
        }
    }

    /// Workload identity federation: the subject token exchanged at STS, then for the
    /// impersonated service account's token when one is named.
    async fn federated(
        &self,
        account: &ExternalAccount,
        scope: &str,
        hint: &str,
    ) -> Result<(String, Duration), String> {
        let subject = match &account.subject {
            SubjectToken::File { path, json_field } => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read the subject token file {}: {e}", path.display()))?;
                field_or_text(&text, json_field.as_deref())?
            }
            SubjectToken::Url {
                url,
                headers,
                json_field,
            } => {
                let mut request = self.http.get(url.clone());
                for (name, value) in headers {
                    request = request.header(name, value);
                }
                let response = request
                    .send()
                    .await
                    .map_err(|e| format!("the subject token URL: {}", describe_reqwest_error(&e)))?;
                let status = response.status();
                let text = response.text().await.unwrap_or_default();
                if !status.is_success() {
                    return Err(format!(
                        "the subject token URL answered HTTP {status}{}",
                        snippet(&text)
                    ));
                }
                field_or_text(&text, json_field.as_deref())?
            }
        };
        #[derive(Deserialize)]
        struct StsAnswer {
            access_token: String,
            #[serde(default)]
            expires_in: Option<u64>,
        }
        // Impersonation narrows to `scope`; the federated token itself is for cloud-platform.
        let sts_scope = if account.impersonation_url.is_some() {
            CLOUD_PLATFORM
        } else {
            scope
        };
        let form = [
            ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
            ("audience", account.audience.as_str()),
            ("scope", sts_scope),
            (
                "requested_token_type",
                "urn:ietf:params:oauth:token-type:access_token",
            ),
            ("subject_token", subject.as_str()),
            ("subject_token_type", account.subject_token_type.as_str()),
        ];
        let federated: StsAnswer = request_token(
            &self.http,
            account.token_url.clone(),
            &form,
            "Google STS",
            "check the workload identity pool provider (`audience`) and that it trusts this workload's token",
        )
        .await?;
        let Some(impersonation) = &account.impersonation_url else {
            return Ok((
                federated.access_token,
                Duration::from_secs(federated.expires_in.unwrap_or(3600)),
            ));
        };
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Impersonated {
            access_token: String,
            #[serde(default)]
            expire_time: Option<String>,
        }
        let response = self
            .http
            .post(impersonation.clone())
            .bearer_auth(&federated.access_token)
            .header("content-type", "application/json")
            .body(json!({"scope": [scope], "lifetime": "3600s"}).to_string())
            .send()
            .await
            .map_err(|e| {
                format!(
                    "impersonating the service account: {}",
                    describe_reqwest_error(&e)
                )
            })?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(format!(
                "impersonating the service account was refused: HTTP {status}{}; the pool's principal needs roles/iam.workloadIdentityUser on it; {hint}",
                snippet(&text)
            ));
        }
        let answer: Impersonated =
            serde_json::from_str(&text).map_err(|e| format!("unexpected impersonation answer ({e})"))?;
        let lifetime = answer
            .expire_time
            .as_deref()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .and_then(|t| (t.with_timezone(&chrono::Utc) - chrono::Utc::now()).to_std().ok())
            .unwrap_or(Duration::from_secs(3600));
        Ok((answer.access_token, lifetime))
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        url: Url,
        headers: &[(&str, &str)],
        what: &str,
    ) -> Result<T, String> {
        let mut request = self.http.get(url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("{what}: {}", describe_reqwest_error(&e)))?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(format!("{what} answered HTTP {status}{}", snippet(&text)));
        }
        serde_json::from_str(&text).map_err(|e| format!("unexpected answer from {what} ({e})"))
    }
}

/// The subject token: the text itself, or one field of it as JSON.
fn field_or_text(text: &str, field: Option<&str>) -> Result<String, String> {
    match field {
        None => Ok(text.trim().to_string()),
        Some(field) => {
            let value: Value =
                serde_json::from_str(text).map_err(|e| format!("the subject token is not JSON ({e})"))?;
            value[field]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("the subject token JSON has no string field `{field}`"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> ConnectorEnv {
        ConnectorEnv::rooted_at(std::env::temp_dir())
    }

    #[test]
    fn credential_types_are_told_apart_and_explained() {
        let http = reqwest::Client::new();
        let user =
            json!({"type": "authorized_user", "client_id": "c", "client_secret": "s", "refresh_token": "r"});
        let auth = GoogleAuth::new(Some(&user.to_string()), &env(), http.clone()).unwrap();
        assert!(auth.key_json().is_none());
        assert!(auth.principal().contains("authorized_user"));

        let federated = json!({"type": "external_account", "audience": "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/k",
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt", "token_url": "https://sts.googleapis.com/v1/token",
            "service_account_impersonation_url": "https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/sluice@p.iam.gserviceaccount.com:generateAccessToken",
            "credential_source": {"file": "/var/run/secrets/token"}});
        let auth = GoogleAuth::new(Some(&federated.to_string()), &env(), http.clone()).unwrap();
        assert!(
            auth.principal().contains("sluice@p.iam.gserviceaccount.com"),
            "{}",
            auth.principal()
        );

        let aws = json!({"type": "external_account", "audience": "a", "subject_token_type": "t",
            "credential_source": {"environment_id": "aws1", "regional_cred_verification_url": "x"}});
        let error = GoogleAuth::new(Some(&aws.to_string()), &env(), http.clone())
            .err()
            .unwrap();
        assert!(error.contains("AWS"), "{error}");

        let unknown = json!({"type": "impersonated_service_account"});
        let error = GoogleAuth::new(Some(&unknown.to_string()), &env(), http)
            .err()
            .unwrap();
        assert!(error.contains("impersonated_service_account"), "{error}");
    }

    #[test]
    fn subject_tokens_are_read_as_text_or_a_json_field() {
        assert_eq!(field_or_text(" eyJ.a.b\n", None).unwrap(), "eyJ.a.b");
        assert_eq!(
            field_or_text(r#"{"access_token": "t"}"#, Some("access_token")).unwrap(),
            "t"
        );
        assert!(field_or_text(r#"{"x": 1}"#, Some("access_token")).is_err());
    }
}
