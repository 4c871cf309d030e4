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
