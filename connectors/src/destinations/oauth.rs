//! OAuth 2.0 JWT bearer assertions (RFC 7523), signed RS256 with `ring`: Salesforce's JWT flow
//! and Google service accounts.

use base64::Engine as _;

/// An RSA private key from PEM (`BEGIN PRIVATE KEY` or `BEGIN RSA PRIVATE KEY`).
pub fn rsa_key(pem: &str) -> Result<ring::signature::RsaKeyPair, String> {
    let pkcs1 = pem.contains("BEGIN RSA PRIVATE KEY");
    let body: String = pem
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with("-----") && !l.is_empty())
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|e| format!("`private_key` is not PEM: {e}"))?;
    let key = if pkcs1 {
        ring::signature::RsaKeyPair::from_der(&der)
    } else {
        ring::signature::RsaKeyPair::from_pkcs8(&der)
    };
    key.map_err(|e| format!("`private_key` is not an RSA private key: {e}"))
}

/// A signed RS256 JWT with `claims`.
pub fn sign_jwt(key: &ring::signature::RsaKeyPair, claims: &serde_json::Value) -> Result<String, String> {
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let signing_input = format!(
        "{}.{}",
        engine.encode(br#"{"alg":"RS256","typ":"JWT"}"#),
        engine.encode(claims.to_string())
    );
    let mut signature = vec![0; key.public().modulus_len()];
    key.sign(
        &ring::signature::RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        signing_input.as_bytes(),
        &mut signature,
    )
    .map_err(|_| "signing the JWT failed".to_string())?;
    Ok(format!("{signing_input}.{}", engine.encode(signature)))
}

/// Posts an OAuth token request (a form) and returns the answer's JSON, or an error naming the
/// vendor, the status and what to check.
pub async fn request_token<T: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    url: reqwest::Url,
    form: &[(&str, &str)],
    vendor: &str,
    hint: &str,
) -> Result<T, String> {
    let body = form
        .iter()
        .map(|(k, v)| {
            format!(
                "{k}={}",
                url::form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>()
            )
        })
        .collect::<Vec<_>>()
        .join("&");
    let response = client
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .map_err(|e| {
            format!(
                "{vendor} token request: {}",
                crate::destinations::http::describe_reqwest_error(&e)
            )
        })?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    if !status.is_success() {
        return Err(format!(
            "{vendor} refused the token request: HTTP {status}{}; {hint}",
            crate::destinations::http::snippet(&text)
        ));
    }
    serde_json::from_str(&text).map_err(|e| format!("unexpected token answer from {vendor} ({e})"))
}

/// A Google service account key file (the fields sluice uses).
#[derive(serde::Deserialize)]
pub struct ServiceAccountKey {
    pub client_email: String,
    pub private_key: String,
    #[serde(default = "default_token_uri")]
    pub token_uri: String,
}

impl ServiceAccountKey {
    /// The key from `service_account`: its JSON as written, or the path of the key file.
    pub fn load(text: &str, env: &sluice_engine::source::ConnectorEnv) -> Result<Self, String> {
        let text = Self::json_text(text, env)?;
        serde_json::from_str(&text)
            .map_err(|e| format!("`service_account` is not a service account key JSON: {e}"))
    }

    /// The key's JSON text from `service_account` (as written, or read from the key file), for
    /// clients that take the key whole (object_store's `google_service_account_key`).
    pub fn json_text(text: &str, env: &sluice_engine::source::ConnectorEnv) -> Result<String, String> {
        let text = text.trim();
        if text.starts_with('{') {
            return Ok(text.to_string());
        }
        let path = env.resolve_path(text);
        std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read the service account key {}: {e}", path.display()))
    }
}

fn default_token_uri() -> String {
    "https://oauth2.googleapis.com/token".into()
}

/// A Google access token for `scope`, from a service account's signed JWT (RFC 7523), cached in
/// `cache` until a minute before it expires.
pub async fn google_token(
    cache: &tokio::sync::Mutex<Option<(String, std::time::Instant)>>,
    client: &reqwest::Client,
    token_uri: &reqwest::Url,
    client_email: &str,
    key: &ring::signature::RsaKeyPair,
    scope: &str,
    hint: &str,
) -> Result<String, String> {
    let mut cached = cache.lock().await;
    if let Some((token, expires)) = cached.as_ref()
        && std::time::Instant::now() < *expires
    {
        return Ok(token.clone());
    }
    let now = chrono::Utc::now().timestamp();
    let claims = serde_json::json!({"iss": client_email, "scope": scope, "aud": token_uri.as_str(), "iat": now, "exp": now + 3600});
    let assertion = sign_jwt(key, &claims)?;
    #[derive(serde::Deserialize)]
    struct Answer {
        access_token: String,
        #[serde(default)]
        expires_in: Option<u64>,
    }
    let form = [
        ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
        ("assertion", assertion.as_str()),
    ];
    let answer: Answer = request_token(client, token_uri.clone(), &form, "Google", hint).await?;
    let lifetime = std::time::Duration::from_secs(answer.expires_in.unwrap_or(3600).saturating_sub(60));
    *cached = Some((answer.access_token.clone(), std::time::Instant::now() + lifetime));
    Ok(answer.access_token)
}
