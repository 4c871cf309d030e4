//! Secrets in definitions: which values are secrets, how they are shown (never: `"********"`),
//! and how the ones created through the API are kept at rest (sealed with AES-256-GCM under a
//! key from the environment, `SLUICE_SECRET_KEY`).
//!
//! A definition is the JSON of a source, model, destination or mapping as `sluice.yaml` writes
//! it. In a source's or destination's options, a string is a secret when the connector declares
//! the option's type [`crate::Secret`] or [`crate::SecretUrl`] (the `x-sluice-secret` keyword in
//! its options schema, [`SecretSchemas`]); as a second net, and for the keys of free-form maps
//! that no type can declare (object_store `options`), when a key on its path is named like one
//! ([`is_secret_key`]). In a mapping, an alert's `urls` are secrets; and a URL's password is a
//! secret wherever the URL is. A connectors test fails when an option named like a credential is
//! not declared secret by its type.
//!
//! Sealed, a secret becomes `{"$sealed": "v1.<key id>.<nonce+ciphertext, base64>", "display":
//! "********"}`: the display form (a URL keeps everything but its password) is what the API
//! returns, and sending the display form back in an update keeps the sealed value.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde_json::{Map, Value};

use crate::catalog::Kind;

/// What a secret is shown as.
pub const REDACTED: &str = "********";
/// The environment variable holding the key that seals secrets at rest.
pub const KEY_ENV: &str = "SLUICE_SECRET_KEY";
const SEALED: &str = "$sealed";
/// Shorter values of a definition are not scrubbed from its connection test's answer: they
/// cannot be told from ordinary words.
const MIN_SCRUBBED: usize = 4;
/// Shorter values are not scrubbed from everything the process writes (a short password would
/// take ordinary words out of every message); real credentials are longer.
const MIN_KNOWN: usize = 8;
const DISPLAY: &str = "display";

/// Why a secret could not be sealed or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error(
        "secrets cannot be stored: set {KEY_ENV} in sluice's environment to 32 random bytes, base64-encoded (for example the output of `openssl rand -base64 32`), then restart it"
    )]
    NoKey,
    #[error("{KEY_ENV} is not 32 bytes encoded as base64: {0}")]
    BadKey(String),
    #[error(
        "`{path}` was sealed with another {KEY_ENV} (key id {found}; this process has {have}); set the key it was created with (an earlier key goes in {PREVIOUS_KEYS_ENV}), or send the secret again"
    )]
    WrongKey {
        path: String,
        found: String,
        have: String,
    },
    #[error("`{path}` is sealed, and {KEY_ENV} is not set; set the key it was created with")]
    KeyNeeded { path: String },
    #[error("`{path}` cannot be opened: {message}")]
    Corrupt { path: String, message: String },
    #[error(
        "`{path}` is the placeholder for a secret (`{REDACTED}`), and there is no stored value to keep; send the secret itself"
    )]
    Placeholder { path: String },
}

/// The environment variable holding earlier keys (comma-separated), which open secrets sealed
/// before a rotation but never seal.
pub const PREVIOUS_KEYS_ENV: &str = "SLUICE_SECRET_KEY_PREVIOUS";

/// The key that seals secrets at rest, with the earlier keys that still open what they sealed.
#[derive(Clone)]
pub struct SecretKey {
    key: std::sync::Arc<LessSafeKey>,
    /// First bytes of the key's SHA-256, to tell keys apart in messages.
    id: String,
    /// Keys of before a rotation: they open, never seal.
    previous: Vec<SecretKey>,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretKey({})", self.id)
    }
}

impl SecretKey {
    /// The key in `SLUICE_SECRET_KEY`, if set, with the earlier ones in
    /// `SLUICE_SECRET_KEY_PREVIOUS`.
    pub fn from_env() -> Result<Option<Self>, SecretError> {
        let key = match std::env::var(KEY_ENV) {
            Ok(text) if !text.trim().is_empty() => Self::from_base64(text.trim())?,
            _ => return Ok(None),
        };
        let previous = std::env::var(PREVIOUS_KEYS_ENV).unwrap_or_default();
        let previous = previous
            .split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(|k| {
                Self::from_base64(k).map_err(|e| SecretError::BadKey(format!("in {PREVIOUS_KEYS_ENV}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(key.with_previous(previous)))
    }

    /// This key, opening also what `previous` keys sealed.
    pub fn with_previous(mut self, previous: Vec<SecretKey>) -> Self {
        self.previous = previous
            .into_iter()
            .filter(|k| k.id != self.id)
            .map(|mut k| {
                k.previous.clear();
                k
            })
            .collect();
        self
    }

    /// A new random key, base64 (what `SLUICE_SECRET_KEY` takes).
    pub fn generate() -> Result<String, SecretError> {
        let mut bytes = [0u8; 32];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| SecretError::BadKey("no randomness for a key".into()))?;
        Ok(STANDARD.encode(bytes))
    }

    pub fn from_base64(text: &str) -> Result<Self, SecretError> {
        let bytes = STANDARD
            .decode(text)
            .or_else(|_| URL_SAFE_NO_PAD.decode(text.trim_end_matches('=')))
            .map_err(|e| SecretError::BadKey(e.to_string()))?;
        Self::from_bytes(&bytes)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SecretError> {
        if bytes.len() != 32 {
            return Err(SecretError::BadKey(format!(
                "it decodes to {} bytes",
                bytes.len()
            )));
        }
        let unbound = UnboundKey::new(&AES_256_GCM, bytes)
            .map_err(|_| SecretError::BadKey("rejected by AES-256-GCM".into()))?;
        let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
        let id = hex(&digest.as_ref()[..4]);
        Ok(Self {
            key: std::sync::Arc::new(LessSafeKey::new(unbound)),
            id,
            previous: Vec::new(),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// `v1.<key id>.<base64 of nonce and ciphertext>`; the key id is authenticated too.
    fn seal(&self, plaintext: &str) -> Result<String, SecretError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| SecretError::Corrupt {
                path: String::new(),
                message: "no randomness for a nonce".into(),
            })?;
        let mut data = plaintext.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(self.id.as_bytes()),
                &mut data,
            )
            .map_err(|_| SecretError::Corrupt {
                path: String::new(),
                message: "sealing failed".into(),
            })?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Ok(format!("v1.{}.{}", self.id, STANDARD.encode(out)))
    }

    fn open(&self, sealed: &str, path: &str) -> Result<String, SecretError> {
        let corrupt = |message: &str| SecretError::Corrupt {
            path: path.to_string(),
            message: message.to_string(),
        };
        let mut parts = sealed.splitn(3, '.');
        let (Some("v1"), Some(id), Some(body)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(corrupt("not a sealed value sluice wrote"));
        };
        let Some(key) = std::iter::once(self).chain(&self.previous).find(|k| k.id == id) else {
            let mut have = self.id.clone();
            for k in &self.previous {
                have.push_str(", ");
                have.push_str(&k.id);
            }
            return Err(SecretError::WrongKey {
                path: path.to_string(),
                found: id.to_string(),
                have,
            });
        };
        let bytes = STANDARD.decode(body).map_err(|_| corrupt("not base64"))?;
        if bytes.len() < NONCE_LEN {
            return Err(corrupt("too short"));
        }
        let (nonce, ciphertext) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| corrupt("bad nonce"))?;
        let mut data = ciphertext.to_vec();
        let plain = key
            .key
            .open_in_place(nonce, Aad::from(key.id.as_bytes()), &mut data)
            .map_err(|_| corrupt("authentication failed (changed or damaged)"))?;
        String::from_utf8(plain.to_vec()).map_err(|_| corrupt("not UTF-8"))
    }
}

/// `bytes` as lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One step of a path into a definition.
#[derive(Debug, Clone, Copy)]
enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

fn path_text(path: &[Step]) -> String {
    let mut out = String::new();
    for step in path {
        match step {
            Step::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Step::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Whether an option named `key` holds a secret.
pub fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    // Public despite their names: an SSH server's public host key.
    if key == "host_key" {
        return false;
    }
    key.contains("password")
        || key.contains("secret")
        || key.contains("token")
        || key.ends_with("_key")
        || key.ends_with("_sas")
        || key == "service_account"
        || key == "credentials"
        || key == "headers"
}

/// Each connector type's options schema, as the catalog gives it: where the types declared
/// [`crate::Secret`] and [`crate::SecretUrl`] options (the `x-sluice-secret` keyword).
#[derive(Debug, Clone, Default)]
pub struct SecretSchemas {
    sources: std::collections::HashMap<String, Value>,
    destinations: std::collections::HashMap<String, Value>,
}

impl SecretSchemas {
    pub fn from_catalog(catalog: &crate::connector_types::ConnectorCatalog) -> Self {
        let index = |types: &[crate::connector_types::ConnectorType]| {
            types
                .iter()
                .map(|t| (t.kind.clone(), t.options.clone()))
                .collect()
        };
        Self {
            sources: index(&catalog.sources),
            destinations: index(&catalog.destinations),
        }
    }

    /// The options schema of a `kind` definition, by its `type`.
    fn of(&self, kind: Kind, definition: &Value) -> Option<&Value> {
        let kind_name = definition.get("type")?.as_str()?;
        match kind {
            Kind::Source => self.sources.get(kind_name),
            Kind::Destination => self.destinations.get(kind_name),
            Kind::Model | Kind::Mapping => None,
        }
    }
}

/// How a secret string is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shown {
    /// As the placeholder.
    Placeholder,
    /// As its scheme and host: a URL that is a credential as a whole.
    UrlHost,
}

fn marker(schema: &Value) -> Option<Shown> {
    match schema.get(crate::config::SECRET_KEYWORD)? {
        Value::Bool(true) => Some(Shown::Placeholder),
        Value::String(s) if s == "url" => Some(Shown::UrlHost),
        _ => None,
    }
}

/// `schema` and the branches of its `anyOf`/`oneOf`/`allOf` (an optional option is `anyOf
/// [T, null]`).
fn branches(schema: &Value) -> Vec<&Value> {
    let mut out = vec![schema];
    for alternatives in ["anyOf", "oneOf", "allOf"] {
        if let Some(Value::Array(items)) = schema.get(alternatives) {
            for item in items {
                out.extend(branches(item));
            }
        }
    }
    out
}

/// Whether the options schema declares the option at `path`, or one containing it, secret.
fn declared_secret(schema: &Value, path: &[Step]) -> Option<Shown> {
    let mut nodes: Vec<&Value> = branches(schema);
    for step in path {
        if let Some(shown) = nodes.iter().find_map(|n| marker(n)) {
            return Some(shown);
        }
        let mut next = Vec::new();
        for node in nodes {
            let child = match step {
                Step::Key(key) => node
                    .get("properties")
                    .and_then(|p| p.get(*key))
                    .or_else(|| node.get("additionalProperties").filter(|a| a.is_object())),
                Step::Index(_) => node.get("items"),
            };
            if let Some(child) = child {
                next.extend(branches(child));
            }
        }
        nodes = next;
    }
    nodes.iter().find_map(|n| marker(n))
}

/// Whether the string at `path` of a `kind` definition is a secret as a whole, and how it is
/// shown. Declared by type in the connector's options (`schema`); by name for what a type
/// cannot declare (the keys of free-form maps such as object_store `options`), which also
/// stays as a second net under every connector option.
fn secret_path(kind: Kind, schema: Option<&Value>, path: &[Step]) -> Option<Shown> {
    let keys: Vec<&str> = path
        .iter()
        .filter_map(|s| match s {
            Step::Key(k) => Some(*k),
            Step::Index(_) => None,
        })
        .collect();
    match kind {
        Kind::Source | Kind::Destination => {
            schema
                .and_then(|schema| declared_secret(schema, path))
                .or_else(|| {
                    keys.iter()
                        .any(|k| is_secret_key(k))
                        .then_some(Shown::Placeholder)
                })
        }
        // An alert's webhook URL is itself the credential (Slack's hooks.slack.com/services/...).
        Kind::Mapping => keys.starts_with(&["alerts", "urls"]).then_some(Shown::UrlHost),
        Kind::Model => None,
    }
}

/// `scheme://host[:port]/…`: what may be shown of a URL that is a credential as a whole.
pub fn url_host_display(text: &str) -> String {
    match url::Url::parse(text) {
        Ok(parsed) => match parsed.host_str() {
            Some(host) => match parsed.port() {
                Some(port) => format!("{}://{host}:{port}/…", parsed.scheme()),
                None => format!("{}://{host}/…", parsed.scheme()),
            },
            None => REDACTED.to_string(),
        },
        Err(_) => REDACTED.to_string(),
    }
}

/// Whether a URL's query parameter named `name` carries a credential: the option-name rule,
/// and the names signing and API schemes give them (`sig` of an Azure SAS, `X-Amz-Signature` of
/// a presigned S3 URL, `key` of Google APIs, ...).
pub fn is_secret_param(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    is_secret_key(&name)
        || matches!(
            name.as_str(),
            "key"
                | "apikey"
                | "api-key"
                | "sig"
                | "signature"
                | "auth"
                | "code"
                | "x-amz-signature"
                | "x-amz-credential"
                | "x-amz-security-token"
                | "x-goog-signature"
                | "x-goog-credential"
        )
}

/// `text` as a URL with its password and credential-looking query values replaced by the
/// placeholder; `None` when it has neither, or is not a URL.
pub fn hide_url_credentials(text: &str) -> Option<String> {
    let mut parsed = url::Url::parse(text).ok()?;
    if parsed.cannot_be_a_base() {
        return None;
    }
    let mut changed = false;
    if parsed.password().is_some() {
        parsed.set_password(Some(REDACTED)).ok()?;
        changed = true;
    }
    let pairs: Vec<(String, String)> = parsed.query_pairs().into_owned().collect();
    if pairs.iter().any(|(name, _)| is_secret_param(name)) {
        let mut query = parsed.query_pairs_mut();
        query.clear();
        for (name, value) in &pairs {
            let value = if is_secret_param(name) {
                REDACTED
            } else {
                value.as_str()
            };
            query.append_pair(name, value);
        }
        drop(query);
        changed = true;
    }
    changed.then(|| parsed.to_string())
}

/// A location (URL or path) as an error may quote it: credentials hidden, and an address that
/// does not parse, yet looks like it carries some (`@`, `?`), not quoted at all.
pub fn shown_location(text: &str) -> String {
    if let Some(hidden) = hide_url_credentials(text) {
        return hidden;
    }
    if url::Url::parse(text).is_err() && (text.contains('@') || text.contains('?')) {
        return "(the location given)".to_string();
    }
    text.to_string()
}

/// `url` with its credentials hidden, when it has any.
fn url_display(text: &str) -> Option<String> {
    hide_url_credentials(text)
}

/// How a plain string at `path` is shown: `None` when it is not secret.
fn display_of(kind: Kind, schema: Option<&Value>, path: &[Step], text: &str) -> Option<String> {
    match secret_path(kind, schema, path) {
        Some(Shown::Placeholder) => Some(REDACTED.to_string()),
        Some(Shown::UrlHost) => Some(url_host_display(text)),
        None => url_display(text),
    }
}

/// A definition as the API shows it: secrets (plain or sealed) replaced by their display form.
pub fn redact(kind: Kind, schemas: &SecretSchemas, value: &Value) -> Value {
    fn walk<'a>(kind: Kind, schema: Option<&Value>, value: &'a Value, path: &mut Vec<Step<'a>>) -> Value {
        match value {
            Value::String(text) => {
                Value::String(display_of(kind, schema, path, text).unwrap_or_else(|| text.clone()))
            }
            Value::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    path.push(Step::Index(i));
                    out.push(walk(kind, schema, item, path));
                    path.pop();
                }
                Value::Array(out)
            }
            Value::Object(map) => {
                if let Some(display) = sealed_display(map) {
                    return Value::String(display);
                }
                let mut out = Map::new();
                for (key, item) in map {
                    path.push(Step::Key(key));
                    out.insert(key.clone(), walk(kind, schema, item, path));
                    path.pop();
                }
                Value::Object(out)
            }
            other => other.clone(),
        }
    }
    walk(kind, schemas.of(kind, value), value, &mut Vec::new())
}

fn sealed_display(map: &Map<String, Value>) -> Option<String> {
    map.get(SEALED)?.as_str()?;
    Some(
        map.get(DISPLAY)
            .and_then(Value::as_str)
            .unwrap_or(REDACTED)
            .to_string(),
    )
}

fn sealed_value(value: &Value) -> Option<&str> {
    value.as_object()?.get(SEALED)?.as_str()
}

fn visit_strings<'a>(value: &'a Value, path: &mut Vec<Step<'a>>, f: &mut dyn FnMut(&[Step<'a>], &'a str)) {
    match value {
        Value::String(text) => f(path, text),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push(Step::Index(i));
                visit_strings(item, path, f);
                path.pop();
            }
        }
        Value::Object(map) => {
            for (key, item) in map {
                path.push(Step::Key(key));
                visit_strings(item, path, f);
                path.pop();
            }
        }
        _ => {}
    }
}

/// Seals the secrets of a definition sent to the API. A secret sent as its display form (the
/// placeholder, or a URL with the placeholder for its password) keeps the sealed value that
/// `previous` (the stored definition) has at the same path.
pub fn seal(
    kind: Kind,
    schemas: &SecretSchemas,
    value: &Value,
    previous: Option<&Value>,
    key: Option<&SecretKey>,
) -> Result<Value, SecretError> {
    fn walk<'a>(
        kind: Kind,
        schema: Option<&Value>,
        value: &'a Value,
        previous: Option<&Value>,
        key: Option<&SecretKey>,
        path: &mut Vec<Step<'a>>,
    ) -> Result<Value, SecretError> {
        match value {
            Value::String(text) => {
                let Some(display) = display_of(kind, schema, path, text) else {
                    return Ok(value.clone());
                };
                if *text == display || text == REDACTED {
                    // The client sent back what it was shown: keep what is stored.
                    return match previous.filter(|p| sealed_value(p).is_some()) {
                        Some(kept) => Ok(kept.clone()),
                        None => Err(SecretError::Placeholder {
                            path: path_text(path),
                        }),
                    };
                }
                let key = key.ok_or(SecretError::NoKey)?;
                let sealed = key.seal(text).map_err(|e| match e {
                    SecretError::Corrupt { message, .. } => SecretError::Corrupt {
                        path: path_text(path),
                        message,
                    },
                    other => other,
                })?;
                let mut map = Map::new();
                map.insert(SEALED.into(), Value::String(sealed));
                map.insert(DISPLAY.into(), Value::String(display));
                Ok(Value::Object(map))
            }
            Value::Array(items) => {
                let before = previous.and_then(Value::as_array);
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    path.push(Step::Index(i));
                    out.push(walk(
                        kind,
                        schema,
                        item,
                        before.and_then(|b| b.get(i)),
                        key,
                        path,
                    )?);
                    path.pop();
                }
                Ok(Value::Array(out))
            }
            Value::Object(map) => {
                let before = previous.and_then(Value::as_object);
                let mut out = Map::new();
                for (k, item) in map {
                    path.push(Step::Key(k));
                    out.insert(
                        k.clone(),
                        walk(kind, schema, item, before.and_then(|b| b.get(k)), key, path)?,
                    );
                    path.pop();
                }
                Ok(Value::Object(out))
            }
            other => Ok(other.clone()),
        }
    }
    walk(
        kind,
        schemas.of(kind, value),
        value,
        previous,
        key,
        &mut Vec::new(),
    )
}

/// The definition with its sealed secrets opened, as the connectors read it. Opened secrets are
/// literal text: `${` in them is written `$${` so that no environment reference is expanded.
pub fn open(value: &Value, key: Option<&SecretKey>) -> Result<Value, SecretError> {
    map_sealed(value, &mut |_, sealed, path| {
        let key = key.ok_or_else(|| SecretError::KeyNeeded {
            path: path.to_string(),
        })?;
        let plain = key.open(sealed, path)?;
        Ok(Value::String(plain.replace("${", "$${")))
    })
}

/// A definition with every secret sealed under an earlier key sealed again under `key` (the
/// display form kept), and how many were; values already under `key` are left as they are.
pub fn reseal(value: &Value, key: &SecretKey) -> Result<(Value, usize), SecretError> {
    let mut count = 0;
    let resealed = map_sealed(value, &mut |map, sealed, path| {
        if sealed.split('.').nth(1) == Some(key.id()) {
            return Ok(Value::Object(map.clone()));
        }
        let plain = key.open(sealed, path)?;
        let mut out = map.clone();
        out.insert(SEALED.into(), Value::String(key.seal(&plain)?));
        count += 1;
        Ok(Value::Object(out))
    })?;
    Ok((resealed, count))
}

/// What [`map_sealed`] makes of a sealed secret: from its object, its sealed text and its path
/// (as text), the value to put in its place.
type SealedMap<'f> = dyn FnMut(&Map<String, Value>, &str, &str) -> Result<Value, SecretError> + 'f;

/// `value` with each sealed secret replaced by what `f` makes of it; everything else copied.
fn map_sealed(value: &Value, f: &mut SealedMap<'_>) -> Result<Value, SecretError> {
    fn walk<'a>(
        value: &'a Value,
        path: &mut Vec<Step<'a>>,
        f: &mut SealedMap<'_>,
    ) -> Result<Value, SecretError> {
        match value {
            Value::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    path.push(Step::Index(i));
                    out.push(walk(item, path, f)?);
                    path.pop();
                }
                Ok(Value::Array(out))
            }
            Value::Object(map) => {
                if let Some(sealed) = sealed_value(value) {
                    return f(map, sealed, &path_text(path));
                }
                let mut out = Map::new();
                for (k, item) in map {
                    path.push(Step::Key(k));
                    out.insert(k.clone(), walk(item, path, f)?);
                    path.pop();
                }
                Ok(Value::Object(out))
            }
            other => Ok(other.clone()),
        }
    }
    walk(value, &mut Vec::new(), f)
}

/// The first plain (not secret) string of a connector definition that holds an environment
/// reference: definitions made through the API are literal, so `${` there is refused rather
/// than expanded (a reference would let a client read the server's environment).
pub fn env_reference(kind: Kind, schemas: &SecretSchemas, value: &Value) -> Option<String> {
    let schema = schemas.of(kind, value);
    let mut found = None;
    visit_strings(value, &mut Vec::new(), &mut |path, text| {
        if found.is_none() && display_of(kind, schema, path, text).is_none() && text.contains("${") {
            found = Some(path_text(path));
        }
    });
    found
}

/// The secret values a definition holds, longest first: whole secrets, a URL's password and
/// its credential-looking query values, and the path of a URL that is a secret as a whole.
/// [`scrub`] takes them out of free text (a connector's error) before a caller sees it.
pub fn secret_values(kind: Kind, schemas: &SecretSchemas, value: &Value) -> Vec<String> {
    let schema = schemas.of(kind, value);
    let mut out = Vec::new();
    visit_strings(value, &mut Vec::new(), &mut |path, text| {
        let parsed = url::Url::parse(text).ok();
        match secret_path(kind, schema, path) {
            Some(shown) => {
                out.push(text.to_string());
                if let (Shown::UrlHost, Some(url)) = (shown, &parsed) {
                    // Errors print URLs normalised; the part after the host is the secret.
                    out.push(url.path().to_string());
                    if let Some(query) = url.query() {
                        out.push(query.to_string());
                    }
                }
            }
            None => {
                if let Some(url) = &parsed {
                    if let Some(password) = url.password() {
                        out.push(password.to_string());
                    }
                    for (name, value) in url.query_pairs() {
                        if is_secret_param(&name) {
                            out.push(value.into_owned());
                        }
                    }
                }
            }
        }
    });
    // A header value's credential goes alone too (a system echoes the key, not `Bearer key`).
    let parts: Vec<String> = out.iter().flat_map(|v| credential_parts(v)).collect();
    out.extend(parts);
    // Too short to tell from ordinary text, or already what is shown.
    out.retain(|v| v.chars().count() >= MIN_SCRUBBED && v != REDACTED && v != "/");
    out.sort_by_key(|v| std::cmp::Reverse(v.len()));
    out.dedup();
    out
}

/// The credential inside a value written with an authorization scheme: `Bearer <token>` gives
/// the token, `Basic <base64>` the decoded `user:password` and the password.
fn credential_parts(value: &str) -> Vec<String> {
    let Some((scheme, credential)) = value.trim().rsplit_once(char::is_whitespace) else {
        return Vec::new();
    };
    let mut parts = vec![credential.to_string()];
    if scheme.trim().eq_ignore_ascii_case("basic")
        && let Ok(decoded) = STANDARD.decode(credential)
        && let Ok(decoded) = String::from_utf8(decoded)
    {
        if let Some((_, password)) = decoded.split_once(':') {
            parts.push(password.to_string());
        }
        parts.push(decoded);
    }
    parts
}

/// `text` with every one of `secrets` replaced by the placeholder.
pub fn scrub(text: &str, secrets: &[String]) -> String {
    // Longest first, so a secret that contains another goes whole.
    let mut ordered: Vec<&String> = secrets.iter().collect();
    ordered.sort_by_key(|v| std::cmp::Reverse(v.len()));
    let mut out = text.to_string();
    for secret in ordered {
        if out.contains(secret.as_str()) {
            out = out.replace(secret.as_str(), REDACTED);
        }
    }
    out
}

/// Every secret value this process has been configured with (connector credentials, alert
/// and webhook addresses, API tokens from the file), longest first. Errors the API answers,
/// run records and failure samples as they are stored, and log lines as they are written are
/// scrubbed of them: a system's error may echo a credential it was sent, and no path out of
/// sluice should carry one. Values once known stay known (an old key may still be quoted by a
/// run that started before a change).
static KNOWN: std::sync::RwLock<Vec<String>> = std::sync::RwLock::new(Vec::new());

/// Adds values to the ones [`scrub_known`] takes out.
pub fn remember(values: impl IntoIterator<Item = String>) {
    let fresh: Vec<String> = values
        .into_iter()
        .filter(|v| v.chars().count() >= MIN_KNOWN && v != REDACTED)
        .collect();
    if fresh.is_empty() {
        return;
    }
    let mut known = KNOWN.write().unwrap_or_else(std::sync::PoisonError::into_inner);
    let before = known.len();
    for value in fresh {
        if !known.contains(&value) {
            known.push(value);
        }
    }
    if known.len() != before {
        known.sort_by_key(|v| std::cmp::Reverse(v.len()));
    }
}

/// Whether `text` holds a secret value this process knows.
pub fn contains_known(text: &str) -> bool {
    let known = KNOWN.read().unwrap_or_else(std::sync::PoisonError::into_inner);
    known.iter().any(|secret| text.contains(secret.as_str()))
}

/// Every string of `value` scrubbed of the secret values this process knows.
pub fn scrub_known_strings(value: Value) -> Value {
    match value {
        Value::String(text) => match scrub_known(&text) {
            std::borrow::Cow::Borrowed(_) => Value::String(text),
            std::borrow::Cow::Owned(scrubbed) => Value::String(scrubbed),
        },
        Value::Array(items) => Value::Array(items.into_iter().map(scrub_known_strings).collect()),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (k, scrub_known_strings(v)))
                .collect(),
        ),
        other => other,
    }
}

/// `text` with every secret value this process knows replaced by the placeholder.
pub fn scrub_known(text: &str) -> std::borrow::Cow<'_, str> {
    let known = KNOWN.read().unwrap_or_else(std::sync::PoisonError::into_inner);
    if !known.iter().any(|secret| text.contains(secret.as_str())) {
        return std::borrow::Cow::Borrowed(text);
    }
    std::borrow::Cow::Owned(scrub(text, &known))
}

/// A string's value with its `${VAR}` references expanded (as a connector will see it).
fn expanded(text: &str) -> String {
    if !text.contains('$') {
        return text.to_string();
    }
    crate::config::ConfigString::resolve(text)
        .map(|c| c.expose().to_string())
        .unwrap_or_else(|_| text.to_string())
}

/// A definition with every string's `${VAR}` references expanded.
pub fn expand_env(value: &Value) -> Value {
    match value {
        Value::String(text) => Value::String(expanded(text)),
        Value::Array(items) => Value::Array(items.iter().map(expand_env).collect()),
        Value::Object(map) => Value::Object(map.iter().map(|(k, v)| (k.clone(), expand_env(v))).collect()),
        other => other.clone(),
    }
}

/// The secret parts of a URL that is a credential as a whole (an alert hook): its path, its
/// query and its password.
pub fn whole_url_secret_values(text: &str) -> Vec<String> {
    let text = expanded(text);
    let mut out = vec![text.clone()];
    if let Ok(url) = url::Url::parse(&text) {
        if url.path() != "/" {
            out.push(url.path().to_string());
        }
        out.extend(url.query().map(str::to_string));
        out.extend(url.password().map(str::to_string));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key() -> SecretKey {
        SecretKey::from_bytes(&[7u8; 32]).unwrap()
    }

    #[test]
    fn a_rotation_reseals_under_the_new_key_and_earlier_keys_only_open() {
        let old = key();
        let schemas = SecretSchemas::default();
        let spec = json!({"type": "postgres", "password": "hunter2-old", "host": "db"});
        let sealed = seal(Kind::Source, &schemas, &spec, None, Some(&old)).unwrap();
        let new = SecretKey::from_bytes(&[9u8; 32]).unwrap();
        // The new key alone cannot open it, and says which keys it has.
        let refused = open(&sealed, Some(&new)).unwrap_err();
        assert!(matches!(refused, SecretError::WrongKey { .. }), "{refused}");
        assert!(refused.to_string().contains(PREVIOUS_KEYS_ENV), "{refused}");
        let both = new.clone().with_previous(vec![old.clone()]);
        assert_eq!(open(&sealed, Some(&both)).unwrap(), spec);
        let (resealed, count) = reseal(&sealed, &both).unwrap();
        assert_eq!(count, 1);
        assert_eq!(
            redact(Kind::Source, &schemas, &resealed),
            redact(Kind::Source, &schemas, &sealed)
        );
        // Now the new key alone opens it, and a second pass changes nothing.
        assert_eq!(open(&resealed, Some(&new)).unwrap(), spec);
        assert!(open(&resealed, Some(&old)).is_err());
        let (again, count) = reseal(&resealed, &both).unwrap();
        assert_eq!((again, count), (resealed, 0));
    }

    #[test]
    fn a_header_credential_is_scrubbed_without_its_scheme() {
        let schemas = SecretSchemas::default();
        let spec = json!({"type": "webhook", "headers": {
            "Authorization": "Bearer tok-QQ-1234567",
            "Proxy-Authorization": format!("Basic {}", STANDARD.encode("svc:pw-QQ-7654321")),
        }});
        let values = secret_values(Kind::Destination, &schemas, &spec);
        let echoed = "bad token tok-QQ-1234567; user svc:pw-QQ-7654321; password pw-QQ-7654321";
        assert_eq!(
            scrub(echoed, &values),
            "bad token ********; user ********; password ********"
        );
    }

    #[test]
    fn known_secrets_are_scrubbed_from_any_text_and_short_ones_left() {
        remember(["QQ-known-secret-3b8f".to_string(), "short".to_string()]);
        assert_eq!(
            scrub_known("server said: token QQ-known-secret-3b8f is revoked"),
            "server said: token ******** is revoked"
        );
        assert!(contains_known("x QQ-known-secret-3b8f y"));
        assert_eq!(scrub_known("a short word"), "a short word");
        assert_eq!(
            scrub_known_strings(json!({"sql": "SELECT 'QQ-known-secret-3b8f'", "n": 1})),
            json!({"sql": "SELECT '********'", "n": 1})
        );
    }

    #[test]
    fn every_connector_secret_is_recognised() {
        // Each connector's secret options, as sluice.yaml names them.
        for name in [
            "password",
            "write_key",
            "token",
            "api_key",
            "api_secret",
            "secret",
            "client_secret",
            "private_key",
            "service_account",
            "project_token",
            "aws_secret_access_key",
            "aws_session_token",
            "google_service_account_key",
            "azure_storage_account_key",
            "azure_storage_sas",
            "headers",
        ] {
            assert!(is_secret_key(name), "{name}");
        }
        for name in [
            "host", "user", "url", "host_key", "site_id", "region", "object", "sql", "port",
        ] {
            assert!(!is_secret_key(name), "{name}");
        }
    }

    #[test]
    fn options_declared_secret_by_type_are_hidden_whatever_their_name() {
        // The options schema of a connector whose credentials have names no rule would catch.
        let catalog = crate::connector_types::ConnectorCatalog {
            sources: Vec::new(),
            destinations: vec![crate::connector_types::ConnectorType {
                kind: "hook".into(),
                title: "Hook".into(),
                summary: String::new(),
                options: json!({
                    "type": "object",
                    "properties": {
                        "url": {"type": "string", "writeOnly": true, "x-sluice-secret": "url"},
                        "signing": {"anyOf": [{"type": "string", "x-sluice-secret": true}, {"type": "null"}]},
                        "extra": {"type": "object", "additionalProperties": {"type": "string", "x-sluice-secret": true}},
                        "name": {"type": "string"}
                    }
                }),
                actions: Vec::new(),
                mapping_options: None,
            }],
        };
        let schemas = SecretSchemas::from_catalog(&catalog);
        let spec = json!({
            "type": "hook",
            "url": "https://hooks.example.com/services/T0/B0/XoXoSecretPath?api_key=QQSECRET",
            "signing": "whsec_1",
            "extra": {"X-Anything": "v1"},
            "name": "visible"
        });
        let shown = redact(Kind::Destination, &schemas, &spec);
        assert_eq!(shown["url"], "https://hooks.example.com/…");
        assert_eq!(shown["signing"], REDACTED);
        assert_eq!(shown["extra"]["X-Anything"], REDACTED);
        assert_eq!(shown["name"], "visible");
        let sealed = seal(Kind::Destination, &schemas, &spec, None, Some(&key())).unwrap();
        assert!(!sealed.to_string().contains("QQSECRET"), "{sealed}");
        // Sent back as shown, the stored URL is kept.
        let kept = seal(Kind::Destination, &schemas, &shown, Some(&sealed), Some(&key())).unwrap();
        assert_eq!(kept["url"], sealed["url"]);
        // An environment reference in a declared secret is the secret's business, not refused.
        assert_eq!(
            env_reference(
                Kind::Destination,
                &schemas,
                &json!({"type": "hook", "signing": "${S}"})
            ),
            None
        );
    }

    #[test]
    fn errors_are_scrubbed_of_the_definitions_secrets() {
        let spec = json!({
            "type": "postgres",
            "url": "postgres://app:hunter22@db.internal/prod?sslmode=require",
            "password": "correct horse",
            "host": "db.internal"
        });
        let secrets = secret_values(Kind::Source, &SecretSchemas::default(), &spec);
        let error = "login as app with `correct horse` to postgres://app:hunter22@db.internal failed";
        let scrubbed = scrub(error, &secrets);
        assert!(
            !scrubbed.contains("correct horse") && !scrubbed.contains("hunter22"),
            "{scrubbed}"
        );
        assert!(scrubbed.contains("db.internal"), "{scrubbed}");
        // A whole-URL secret: its path is taken out of errors that print the URL normalised.
        let alerts = json!({"alerts": {"urls": ["https://hooks.slack.com/services/T0/B0/XoXo"]}});
        let secrets = secret_values(Kind::Mapping, &SecretSchemas::default(), &alerts);
        let scrubbed = scrub(
            "POST https://hooks.slack.com/services/T0/B0/XoXo/ refused",
            &secrets,
        );
        assert!(!scrubbed.contains("XoXo"), "{scrubbed}");
    }

    #[test]
    fn url_credentials_in_query_strings_are_hidden_and_sealed() {
        let presigned = "https://bucket.s3.amazonaws.com/f.parquet?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=abc123&x-id=GetObject";
        let shown = hide_url_credentials(presigned).unwrap();
        assert!(!shown.contains("abc123") && !shown.contains("AKIA"), "{shown}");
        assert!(shown.contains("x-id=GetObject"), "{shown}");
        assert_eq!(
            hide_url_credentials("https://acct.blob.core.windows.net/c?sv=2024&sig=s3cr3t").as_deref(),
            Some("https://acct.blob.core.windows.net/c?sv=2024&sig=********")
        );
        assert_eq!(hide_url_credentials("https://example.com/a?page=2"), None);
        assert_eq!(hide_url_credentials("not a url"), None);
        let spec = json!({"type": "files", "tables": {"t": "https://example.com/x.csv?token=T0K3N"}});
        let sealed = seal(Kind::Source, &SecretSchemas::default(), &spec, None, Some(&key())).unwrap();
        assert!(!sealed.to_string().contains("T0K3N"), "{sealed}");
        let shown = redact(Kind::Source, &SecretSchemas::default(), &sealed);
        assert_eq!(shown["tables"]["t"], "https://example.com/x.csv?token=********");
    }

    #[test]
    fn redaction_hides_secrets_and_url_passwords_only() {
        let spec = json!({
            "type": "postgres",
            "url": "postgres://app:hunter2@db.internal:5432/prod",
            "password": "hunter2",
            "ssh_tunnel": {"host": "bastion", "user": "tunnel", "host_key": "ssh-ed25519 AAAA"},
            "headers": {"Authorization": "Bearer abc"},
            "port": 5432
        });
        let shown = redact(Kind::Source, &SecretSchemas::default(), &spec);
        assert_eq!(shown["password"], REDACTED);
        assert_eq!(shown["url"], "postgres://app:********@db.internal:5432/prod");
        assert_eq!(shown["ssh_tunnel"]["host_key"], "ssh-ed25519 AAAA");
        assert_eq!(shown["ssh_tunnel"]["user"], "tunnel");
        assert_eq!(shown["headers"]["Authorization"], REDACTED);
        // Alerts are a mapping's; models hold no secrets at all (`primary_key` is a column).
        let mapping = json!({"model": "m", "destination": "d", "alerts": {"urls": ["https://hooks.slack.com/services/T/B/X"]}});
        assert_eq!(
            redact(Kind::Mapping, &SecretSchemas::default(), &mapping)["alerts"]["urls"][0],
            "https://hooks.slack.com/…"
        );
        let model = json!({"source": "s", "sql": "SELECT 1", "primary_key": "id"});
        assert_eq!(redact(Kind::Model, &SecretSchemas::default(), &model), model);
        assert_eq!(shown["port"], 5432);
        assert!(!shown.to_string().contains("hunter2"));
        assert!(!shown.to_string().contains("abc"));
    }

    #[test]
    fn sealed_secrets_round_trip_and_never_show() {
        let key = key();
        let spec =
            json!({"type": "hubspot", "token": "pat-na1-${not-a-ref}", "url": "https://api.hubapi.com"});
        let sealed = seal(
            Kind::Destination,
            &SecretSchemas::default(),
            &spec,
            None,
            Some(&key),
        )
        .unwrap();
        let text = sealed.to_string();
        assert!(!text.contains("pat-na1"), "{text}");
        assert_eq!(sealed["url"], "https://api.hubapi.com");
        assert_eq!(
            redact(Kind::Destination, &SecretSchemas::default(), &sealed)["token"],
            REDACTED
        );
        let opened = open(&sealed, Some(&key)).unwrap();
        // Literal: a `${` in a secret is escaped so it is never expanded.
        assert_eq!(opened["token"], "pat-na1-$${not-a-ref}");
        let resolved =
            crate::ConfigString::resolve_with(opened["token"].as_str().unwrap(), |_| None).unwrap();
        assert_eq!(resolved.expose(), "pat-na1-${not-a-ref}");
    }

    #[test]
    fn the_placeholder_keeps_the_stored_secret() {
        let key = key();
        let first = seal(
            Kind::Source,
            &SecretSchemas::default(),
            &json!({"password": "one", "host": "a"}),
            None,
            Some(&key),
        )
        .unwrap();
        let update = json!({"password": REDACTED, "host": "b"});
        let second = seal(
            Kind::Source,
            &SecretSchemas::default(),
            &update,
            Some(&first),
            Some(&key),
        )
        .unwrap();
        assert_eq!(second["password"], first["password"]);
        assert_eq!(open(&second, Some(&key)).unwrap()["password"], "one");
        // With nothing stored, the placeholder is refused.
        assert!(matches!(
            seal(Kind::Source, &SecretSchemas::default(), &update, None, Some(&key)),
            Err(SecretError::Placeholder { .. })
        ));
        // A URL sent back with its placeholder password keeps the stored URL.
        let url = seal(
            Kind::Source,
            &SecretSchemas::default(),
            &json!({"url": "postgres://u:pw@h/db"}),
            None,
            Some(&key),
        )
        .unwrap();
        let shown = redact(Kind::Source, &SecretSchemas::default(), &url);
        let kept = seal(
            Kind::Source,
            &SecretSchemas::default(),
            &shown,
            Some(&url),
            Some(&key),
        )
        .unwrap();
        assert_eq!(open(&kept, Some(&key)).unwrap()["url"], "postgres://u:pw@h/db");
    }

    #[test]
    fn keys_are_required_and_checked() {
        assert_eq!(
            seal(
                Kind::Destination,
                &SecretSchemas::default(),
                &json!({"api_key": "k"}),
                None,
                None
            ),
            Err(SecretError::NoKey)
        );
        let sealed = seal(
            Kind::Destination,
            &SecretSchemas::default(),
            &json!({"api_key": "k"}),
            None,
            Some(&key()),
        )
        .unwrap();
        assert!(matches!(open(&sealed, None), Err(SecretError::KeyNeeded { .. })));
        let other = SecretKey::from_bytes(&[8u8; 32]).unwrap();
        assert!(matches!(
            open(&sealed, Some(&other)),
            Err(SecretError::WrongKey { .. })
        ));
        // A changed ciphertext is detected.
        let mut tampered = sealed.clone();
        let text = tampered["api_key"]["$sealed"].as_str().unwrap().to_string();
        let mut bytes = text.into_bytes();
        let last = bytes.len() - 3;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        tampered["api_key"]["$sealed"] = Value::String(String::from_utf8(bytes).unwrap());
        assert!(open(&tampered, Some(&key())).is_err());
        assert!(SecretKey::from_base64("c2hvcnQ=").is_err());
    }

    #[test]
    fn environment_references_in_plain_options_are_found() {
        assert_eq!(
            env_reference(
                Kind::Destination,
                &SecretSchemas::default(),
                &json!({"url": "http://x/${HOME}", "token": "${T}"})
            ),
            Some("url".to_string())
        );
        assert_eq!(
            env_reference(
                Kind::Destination,
                &SecretSchemas::default(),
                &json!({"token": "${T}"})
            ),
            None
        );
    }
}
