//! API bearer tokens: made by `sluice token create` (kept in the metadata store as their
//! SHA-256 only, shown once) or declared in `sluice.yaml` as `${ENV}` references. A token has a
//! scope: `read` may list, get, read runs and query; `admin` may also change and trigger.
//!
//! Tokens are 32 random bytes, so a plain SHA-256 is as strong as a password hash would be, and
//! checking one costs a microsecond (the API checks every request).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::config::ConfigString;
use crate::error::{EngineError, Result};
use crate::metadata::MetadataStore;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// List, get, read runs, query snapshot history.
    Read,
    /// Everything: also create, change, delete, trigger and cancel.
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "read" => Some(Scope::Read),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }

    /// Whether a token of this scope may do what `needed` asks for.
    pub fn allows(self, needed: Scope) -> bool {
        self >= needed
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A token declared in `sluice.yaml` under `api.tokens`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    pub name: String,
    /// The token itself, as a `${ENV}` reference.
    pub token: ConfigString,
    pub scope: Scope,
}

/// The `api:` section of `sluice.yaml`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
    /// How much interactive work (history queries, previews, tests) is taken on at once.
    #[serde(default)]
    pub limits: crate::workload::InteractiveLimits,
}

/// A token as the store knows it (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    pub name: String,
    pub scope: Scope,
    /// Hex SHA-256 of the token.
    pub hash: String,
    pub created_at: DateTime<Utc>,
}

/// Hex SHA-256 of a token.
pub fn hash(token: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    // (Checked on every API request: no formatting machinery.)
    let mut out = String::with_capacity(64);
    for byte in digest.as_ref() {
        out.push(HEX[(byte >> 4) as usize] as char);
        out.push(HEX[(byte & 0xf) as usize] as char);
    }
    out
}

/// A new random token: `sluice_` and 32 random bytes, base64url.
pub fn generate() -> Result<String> {
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| EngineError::Internal("no randomness for a token".into()))?;
    Ok(format!("sluice_{}", URL_SAFE_NO_PAD.encode(bytes)))
}

impl MetadataStore {
    /// Creates a token named `name` and returns it (the only time it is shown).
    pub async fn create_token(&self, name: &str, scope: Scope) -> Result<String> {
        if name.trim().is_empty() || name.len() > 64 {
            return Err(EngineError::Usage("a token's name is 1 to 64 characters".into()));
        }
        let token = generate()?;
        let inserted = sqlx::query(self.sql(
            "INSERT INTO api_tokens (name, scope, token_hash, created_at) VALUES (?, ?, ?, ?) \
             ON CONFLICT (name) DO NOTHING",
        ))
        .bind(name)
        .bind(scope.as_str())
        .bind(hash(&token))
        .bind(Utc::now().to_rfc3339())
        .execute(self.pool())
        .await
        .map_err(self.err())?
        .rows_affected();
        if inserted == 0 {
            return Err(EngineError::Usage(format!(
                "a token named `{name}` exists; revoke it first (`sluice token revoke {name}`) or pick another name"
            )));
        }
        Ok(token)
    }

    pub async fn tokens(&self) -> Result<Vec<TokenInfo>> {
        let rows = sqlx::query(self.sql("SELECT * FROM api_tokens ORDER BY name"))
            .fetch_all(self.pool())
            .await
            .map_err(self.err())?;
        Ok(rows
            .iter()
            .map(|r| TokenInfo {
                name: r.get("name"),
                scope: Scope::parse(r.get("scope")).unwrap_or(Scope::Read),
                hash: r.get("token_hash"),
                created_at: crate::metadata::parse_time(r.get("created_at")),
            })
            .collect())
    }

    /// Revokes a token, and ends the console sessions opened with it; `false` when there was no
    /// token of that name.
    pub async fn revoke_token(&self, name: &str) -> Result<bool> {
        let mut tx = self.pool().begin().await.map_err(self.err())?;
        sqlx::query(self.sql(
            "DELETE FROM console_sessions WHERE token_hash IN \
             (SELECT token_hash FROM api_tokens WHERE name = ?)",
        ))
        .bind(name)
        .execute(&mut *tx)
        .await
        .map_err(self.err())?;
        let removed = sqlx::query(self.sql("DELETE FROM api_tokens WHERE name = ?"))
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(self.err())?
            .rows_affected();
        tx.commit().await.map_err(self.err())?;
        Ok(removed > 0)
    }
}

/// How long a console session lasts: a working day and a half.
pub const SESSION_LIFETIME: chrono::Duration = chrono::Duration::hours(36);

fn session_time(t: DateTime<Utc>) -> String {
    // One fixed width, so the store can compare the texts.
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

impl MetadataStore {
    /// Opens a console session for the token whose SHA-256 is `token_hash` and returns the
    /// session's id, the one thing the browser keeps (never the API token itself). Sessions
    /// that have expired are removed on the way.
    pub async fn create_session(&self, token_hash: &str) -> Result<String> {
        let now = Utc::now();
        sqlx::query(self.sql("DELETE FROM console_sessions WHERE expires_at <= ?"))
            .bind(session_time(now))
            .execute(self.pool())
            .await
            .map_err(self.err())?;
        let id = generate()?.replacen("sluice_", "session_", 1);
        sqlx::query(self.sql(
            "INSERT INTO console_sessions (session_hash, token_hash, created_at, expires_at) \
             VALUES (?, ?, ?, ?)",
        ))
        .bind(hash(&id))
        .bind(token_hash)
        .bind(session_time(now))
        .bind(session_time(now + SESSION_LIFETIME))
        .execute(self.pool())
        .await
        .map_err(self.err())?;
        Ok(id)
    }

    /// The SHA-256 of the API token a live session was opened with; `None` for a session that
    /// was ended, has expired, or never was.
    pub async fn session_token_hash(&self, session_id: &str) -> Result<Option<String>> {
        let row = sqlx::query(
            self.sql("SELECT token_hash FROM console_sessions WHERE session_hash = ? AND expires_at > ?"),
        )
        .bind(hash(session_id))
        .bind(session_time(Utc::now()))
        .fetch_optional(self.pool())
        .await
        .map_err(self.err())?;
        Ok(row.map(|r| r.get("token_hash")))
    }

    /// Ends a session (signing out); `false` when there was no such session.
    pub async fn end_session(&self, session_id: &str) -> Result<bool> {
        let removed = sqlx::query(self.sql("DELETE FROM console_sessions WHERE session_hash = ?"))
            .bind(hash(session_id))
            .execute(self.pool())
            .await
            .map_err(self.err())?
            .rows_affected();
        Ok(removed > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tokens_are_shown_once_and_stored_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetadataStore::open_sqlite(&dir.path().join("m.db"))
            .await
            .unwrap();
        let token = store.create_token("ci", Scope::Admin).await.unwrap();
        assert!(token.starts_with("sluice_") && token.len() > 40, "{token}");
        let listed = store.tokens().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].hash, hash(&token));
        assert_ne!(listed[0].hash, token);
        assert!(store.create_token("ci", Scope::Read).await.is_err());
        assert!(store.revoke_token("ci").await.unwrap());
        assert!(!store.revoke_token("ci").await.unwrap());
        assert!(store.tokens().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn sessions_end_when_signed_out_and_keep_no_token() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetadataStore::open_sqlite(&dir.path().join("m.db"))
            .await
            .unwrap();
        let token_hash = hash("sluice_token");
        let id = store.create_session(&token_hash).await.unwrap();
        assert!(id.starts_with("session_") && !id.contains("sluice_token"), "{id}");
        assert_eq!(
            store.session_token_hash(&id).await.unwrap().as_deref(),
            Some(token_hash.as_str())
        );
        let other = store.create_session(&token_hash).await.unwrap();
        assert_ne!(id, other);
        assert!(store.end_session(&id).await.unwrap());
        assert_eq!(store.session_token_hash(&id).await.unwrap(), None);
        assert!(!store.end_session(&id).await.unwrap());
        // Another session of the same token lives on.
        assert!(store.session_token_hash(&other).await.unwrap().is_some());
        assert_eq!(store.session_token_hash("session_made_up").await.unwrap(), None);

        // Revoking a token ends its sessions at once.
        let token = store.create_token("console", Scope::Read).await.unwrap();
        let session = store.create_session(&hash(&token)).await.unwrap();
        assert!(store.session_token_hash(&session).await.unwrap().is_some());
        assert!(store.revoke_token("console").await.unwrap());
        assert_eq!(store.session_token_hash(&session).await.unwrap(), None);
        assert!(store.session_token_hash(&other).await.unwrap().is_some());
    }

    #[test]
    fn hashes_are_hex_sha256() {
        assert_eq!(
            hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn scopes_nest() {
        assert!(Scope::Admin.allows(Scope::Read));
        assert!(Scope::Admin.allows(Scope::Admin));
        assert!(Scope::Read.allows(Scope::Read));
        assert!(!Scope::Read.allows(Scope::Admin));
    }
}
