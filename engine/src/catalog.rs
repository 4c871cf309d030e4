//! The catalog: sources, models, destinations and mappings created through the HTTP API, kept in
//! the metadata store beside what `sluice.yaml` declares, so they survive restarts and every
//! `sluice` command sees them. A definition is stored as the JSON that `sluice.yaml` would hold
//! for it, with its secrets sealed ([`crate::secrets`]); the engine reads it with the same
//! parsers as the file, so the API has no second set of rules.
//!
//! What the file declares wins: a name defined there cannot be created, changed or deleted
//! through the API. A mapping can still be enabled or disabled through the API (a *switch*,
//! stored here and applied over its definition), since that is operating it, not defining it.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::Row;

use crate::error::{EngineError, Result};
use crate::metadata::{MetadataStore, parse_time};

/// What a definition defines, in the order definitions depend on each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Source,
    Destination,
    Model,
    Mapping,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Source, Kind::Destination, Kind::Model, Kind::Mapping];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Source => "source",
            Kind::Destination => "destination",
            Kind::Model => "model",
            Kind::Mapping => "mapping",
        }
    }

    /// The section of `sluice.yaml` (and the API's collection) that holds this kind.
    pub fn section(self) -> &'static str {
        match self {
            Kind::Source => "sources",
            Kind::Destination => "destinations",
            Kind::Model => "models",
            Kind::Mapping => "mappings",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == text || k.section() == text)
    }

    /// Whether definitions of this kind are connectors (with a `type` and its options).
    pub fn is_connector(self) -> bool {
        matches!(self, Kind::Source | Kind::Destination)
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a definition comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `sluice.yaml`: read-only through the API.
    File,
    /// Created through the API, stored in the metadata store.
    Api,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::File => "file",
            Origin::Api => "api",
        }
    }
}

/// A definition as stored: its JSON with secrets sealed.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredDefinition {
    pub kind: Kind,
    pub name: String,
    pub spec: Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Everything the catalog holds, as read at one moment.
#[derive(Debug, Clone, Default)]
pub struct CatalogState {
    /// Bumped by every change, so processes sharing the store notice one.
    pub version: i64,
    pub definitions: Vec<StoredDefinition>,
    /// Mappings enabled or disabled through the API.
    pub switches: BTreeMap<String, bool>,
}

impl CatalogState {
    pub fn get(&self, kind: Kind, name: &str) -> Option<&StoredDefinition> {
        self.definitions.iter().find(|d| d.kind == kind && d.name == name)
    }

    /// This state with `definition` put in place of any of the same kind and name.
    pub fn with(&self, definition: StoredDefinition) -> Self {
        let mut next = self.clone();
        next.definitions
            .retain(|d| !(d.kind == definition.kind && d.name == definition.name));
        next.definitions.push(definition);
        next
    }

    /// This state without the definition of `kind` and `name`.
    pub fn without(&self, kind: Kind, name: &str) -> Self {
        let mut next = self.clone();
        next.definitions.retain(|d| !(d.kind == kind && d.name == name));
        if kind == Kind::Mapping {
            next.switches.remove(name);
        }
        next
    }

    pub fn with_switch(&self, mapping: &str, enabled: bool) -> Self {
        let mut next = self.clone();
        next.switches.insert(mapping.to_string(), enabled);
        next
    }
}

/// A definition that could not be taken into the project (its source is gone, its secrets
/// cannot be opened, its options no longer parse, ...). The rest of the project works; this
/// one is reported by the API, `sluice check` and a warning at every start until it is fixed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub kind: Kind,
    pub name: String,
    pub message: String,
}

impl MetadataStore {
    /// The catalog as it is now.
    pub async fn catalog(&self) -> Result<CatalogState> {
        let mut tx = self.pool().begin().await.map_err(self.err())?;
        let version: i64 = sqlx::query(self.sql("SELECT version FROM catalog_version WHERE id = 1"))
            .fetch_one(&mut *tx)
            .await
            .map_err(self.err())?
            .get("version");
        let rows = sqlx::query(self.sql("SELECT * FROM definitions ORDER BY kind, name"))
            .fetch_all(&mut *tx)
            .await
            .map_err(self.err())?;
        let mut definitions = Vec::with_capacity(rows.len());
        for row in rows {
            let kind_text: String = row.get("kind");
            let name: String = row.get("name");
            let kind = Kind::parse(&kind_text).ok_or_else(|| {
                EngineError::Internal(format!(
                    "the metadata store holds a definition of unknown kind `{kind_text}`"
                ))
            })?;
            let text: String = row.get("spec");
            let spec = serde_json::from_str(&text).map_err(|e| {
                EngineError::Internal(format!("stored definition of {kind} `{name}` is not JSON: {e}"))
            })?;
            definitions.push(StoredDefinition {
                kind,
                name,
                spec,
                created_at: parse_time(row.get("created_at")),
                updated_at: parse_time(row.get("updated_at")),
            });
        }
        let switches = sqlx::query(self.sql("SELECT mapping, enabled FROM mapping_switches"))
            .fetch_all(&mut *tx)
            .await
            .map_err(self.err())?
            .iter()
            .map(|r| (r.get::<String, _>("mapping"), r.get::<i64, _>("enabled") != 0))
            .collect();
        tx.commit().await.map_err(self.err())?;
        Ok(CatalogState {
            version,
            definitions,
            switches,
        })
    }

    /// The catalog's version (cheap: one row).
    pub async fn catalog_version(&self) -> Result<i64> {
        Ok(
            sqlx::query(self.sql("SELECT version FROM catalog_version WHERE id = 1"))
                .fetch_one(self.pool())
                .await
                .map_err(self.err())?
                .get("version"),
        )
    }

    /// Stores a definition, creating or replacing it; returns it as stored.
    pub async fn put_definition(&self, kind: Kind, name: &str, spec: &Value) -> Result<StoredDefinition> {
        let now = Utc::now();
        let text = serde_json::to_string(spec)
            .map_err(|e| EngineError::Internal(format!("cannot serialise a definition: {e}")))?;
        let mut tx = self.pool().begin().await.map_err(self.err())?;
        bump(self, &mut tx).await?;
        sqlx::query(self.sql(
            "INSERT INTO definitions (kind, name, spec, created_at, updated_at) VALUES (?, ?, ?, ?, ?) \
             ON CONFLICT (kind, name) DO UPDATE SET spec = excluded.spec, updated_at = excluded.updated_at",
        ))
        .bind(kind.as_str())
        .bind(name)
        .bind(&text)
        .bind(now.to_rfc3339())
        .bind(now.to_rfc3339())
        .execute(&mut *tx)
        .await
        .map_err(self.err())?;
        let created: String =
            sqlx::query(self.sql("SELECT created_at FROM definitions WHERE kind = ? AND name = ?"))
                .bind(kind.as_str())
                .bind(name)
                .fetch_one(&mut *tx)
                .await
                .map_err(self.err())?
                .get("created_at");
        tx.commit().await.map_err(self.err())?;
        Ok(StoredDefinition {
            kind,
            name: name.to_string(),
            spec: spec.clone(),
            created_at: parse_time(&created),
            updated_at: now,
        })
    }

    /// Seals every stored secret again under `key` (the current `SLUICE_SECRET_KEY`), opening
    /// each with whichever of `key`'s keys sealed it: the step of a key rotation that lets the
    /// earlier key go. One definition at a time, each only if no one changed it meanwhile (a
    /// changed one is counted as skipped: a change seals under the current key anyway).
    pub async fn reseal_secrets(&self, key: &crate::secrets::SecretKey) -> Result<Resealed> {
        let mut report = Resealed::default();
        for definition in self.catalog().await?.definitions {
            let what = format!("{} `{}`", definition.kind, definition.name);
            let (resealed, count) = crate::secrets::reseal(&definition.spec, key)
                .map_err(|e| EngineError::Usage(format!("{what}: {e}")))?;
            if count == 0 {
                report.current += 1;
                continue;
            }
            let before = serde_json::to_string(&definition.spec)
                .map_err(|e| EngineError::Internal(format!("cannot serialise a definition: {e}")))?;
            let after = serde_json::to_string(&resealed)
                .map_err(|e| EngineError::Internal(format!("cannot serialise a definition: {e}")))?;
            let mut tx = self.pool().begin().await.map_err(self.err())?;
            let changed = sqlx::query(
                self.sql("UPDATE definitions SET spec = ? WHERE kind = ? AND name = ? AND spec = ?"),
            )
            .bind(&after)
            .bind(definition.kind.as_str())
            .bind(&definition.name)
            .bind(&before)
            .execute(&mut *tx)
            .await
            .map_err(self.err())?
            .rows_affected();
            if changed == 1 {
                // Running servers take the definition in again (the same values, sealed anew).
                bump(self, &mut tx).await?;
                tx.commit().await.map_err(self.err())?;
                report.definitions += 1;
                report.secrets += count;
            } else {
                tx.rollback().await.map_err(self.err())?;
                report.changed_meanwhile.push(what);
            }
        }
        Ok(report)
    }

    /// Deletes a definition; `false` when there was none. Deleting a mapping also forgets what
    /// its destination was sent (so a new mapping of that name starts with a full sync) and its
    /// switch; its runs stay in the history.
    pub async fn delete_definition(&self, kind: Kind, name: &str) -> Result<bool> {
        let mut tx = self.pool().begin().await.map_err(self.err())?;
        let removed = sqlx::query(self.sql("DELETE FROM definitions WHERE kind = ? AND name = ?"))
            .bind(kind.as_str())
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(self.err())?
            .rows_affected();
        if removed > 0 && kind == Kind::Mapping {
            for table in ["mapping_switches", "mapping_state"] {
                sqlx::query(self.sql(&format!("DELETE FROM {table} WHERE mapping = ?")))
                    .bind(name)
                    .execute(&mut *tx)
                    .await
                    .map_err(self.err())?;
            }
        }
        if removed > 0 {
            bump(self, &mut tx).await?;
        }
        tx.commit().await.map_err(self.err())?;
        Ok(removed > 0)
    }

    /// Enables or disables a mapping over what its definition says.
    pub async fn set_mapping_switch(&self, mapping: &str, enabled: bool) -> Result<()> {
        let mut tx = self.pool().begin().await.map_err(self.err())?;
        bump(self, &mut tx).await?;
        sqlx::query(self.sql(
            "INSERT INTO mapping_switches (mapping, enabled, updated_at) VALUES (?, ?, ?) \
             ON CONFLICT (mapping) DO UPDATE SET enabled = excluded.enabled, updated_at = excluded.updated_at",
        ))
        .bind(mapping)
        .bind(enabled as i64)
        .bind(Utc::now().to_rfc3339())
        .execute(&mut *tx)
        .await
        .map_err(self.err())?;
        tx.commit().await.map_err(self.err())
    }
}

/// Bumps the catalog version inside a change's transaction (which also takes SQLite's write
/// lock first, so concurrent changes queue instead of failing).
/// What [`MetadataStore::reseal_secrets`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resealed {
    /// Definitions sealed anew, and the secrets in them.
    pub definitions: usize,
    pub secrets: usize,
    /// Definitions whose secrets were all under the current key already (or that hold none).
    pub current: usize,
    /// Definitions changed by someone else while this ran (sealed under the current key by
    /// that change, or to be resealed by running the command again).
    pub changed_meanwhile: Vec<String>,
}

async fn bump(store: &MetadataStore, tx: &mut sqlx::AnyConnection) -> Result<()> {
    sqlx::query(store.sql("UPDATE catalog_version SET version = version + 1 WHERE id = 1"))
        .execute(&mut *tx)
        .await
        .map_err(store.err())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn definitions_persist_and_each_change_bumps_the_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let store = MetadataStore::open_sqlite(&path).await.unwrap();
        assert_eq!(store.catalog_version().await.unwrap(), 0);
        let spec = json!({"type": "webhook", "url": "http://127.0.0.1:1/x"});
        let first = store
            .put_definition(Kind::Destination, "crm", &spec)
            .await
            .unwrap();
        let changed = json!({"type": "webhook", "url": "http://127.0.0.1:2/x"});
        let second = store
            .put_definition(Kind::Destination, "crm", &changed)
            .await
            .unwrap();
        assert_eq!(second.created_at, first.created_at);
        store.set_mapping_switch("m", false).await.unwrap();
        assert_eq!(store.catalog_version().await.unwrap(), 3);
        store.close().await;

        let store = MetadataStore::open_sqlite(&path).await.unwrap();
        let catalog = store.catalog().await.unwrap();
        assert_eq!(catalog.version, 3);
        assert_eq!(catalog.get(Kind::Destination, "crm").unwrap().spec, changed);
        assert_eq!(catalog.switches.get("m"), Some(&false));
        assert!(store.delete_definition(Kind::Destination, "crm").await.unwrap());
        assert!(!store.delete_definition(Kind::Destination, "crm").await.unwrap());
        assert_eq!(store.catalog_version().await.unwrap(), 4);
    }
}
