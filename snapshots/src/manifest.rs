//! The manifest that commits a snapshot: a small JSON document written after every data file,
//! whose presence is what makes a snapshot visible.

use arrow::datatypes::Schema;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Version of the snapshot layout and hash definition (see [`crate::hash`]).
pub const FORMAT_VERSION: u32 = 1;

/// Name of the column holding each row's hash of its non-key columns.
pub const ROW_HASH_COLUMN: &str = "__sluice_row_hash";
/// Prefix reserved for sluice's own columns; model columns may not start with it.
pub const RESERVED_PREFIX: &str = "__sluice";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotManifest {
    pub format_version: u32,
    /// Unique, time-ordered id (UUIDv7).
    pub id: String,
    pub model: String,
    /// The run that extracted it.
    pub run_id: String,
    pub extracted_at: DateTime<Utc>,
    pub key_columns: Vec<String>,
    /// Number of key-hash buckets (a power of two); one data file per non-empty bucket.
    pub buckets: u32,
    pub rows: u64,
    /// The model's columns as extracted (without sluice's own columns).
    pub columns: Vec<ColumnInfo>,
    pub files: Vec<SnapshotFile>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ColumnInfo {
    pub name: String,
    pub data_type: String,
    pub nullable: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotFile {
    /// Path relative to the snapshot store root.
    pub path: String,
    pub bucket: u32,
    pub rows: u64,
    pub bytes: u64,
}

impl SnapshotManifest {
    /// Files that may hold rows of bucket `bucket` when the key space is split into `of`
    /// buckets (`of` a power of two). Buckets nest: when `of` is at most this snapshot's bucket
    /// count, coarse bucket `b` is exactly this snapshot's buckets `b`, `b + of`, `b + 2*of`, ...;
    /// when `of` is larger, the one file of bucket `b % buckets` holds bucket `b` among others,
    /// and the reader must filter by key.
    pub fn files_covering(&self, bucket: u32, of: u32) -> impl Iterator<Item = &SnapshotFile> {
        let buckets = self.buckets;
        self.files.iter().filter(move |f| {
            if of <= buckets {
                f.bucket % of == bucket
            } else {
                f.bucket == bucket % buckets
            }
        })
    }

    /// Describes how this snapshot's columns differ from `previous`'s, or `None` when they match.
    pub fn schema_change_since(&self, previous: &SnapshotManifest) -> Option<String> {
        let mut changes = Vec::new();
        for column in &self.columns {
            match previous.columns.iter().find(|c| c.name == column.name) {
                None => changes.push(format!("added `{}` ({})", column.name, column.data_type)),
                Some(old) if old.data_type != column.data_type => changes.push(format!(
                    "retyped `{}` from {} to {}",
                    column.name, old.data_type, column.data_type
                )),
                Some(_) => {}
            }
        }
        for old in &previous.columns {
            if !self.columns.iter().any(|c| c.name == old.name) {
                changes.push(format!("removed `{}`", old.name));
            }
        }
        (!changes.is_empty()).then(|| changes.join(", "))
    }
}

pub fn column_infos(schema: &Schema) -> Vec<ColumnInfo> {
    schema
        .fields()
        .iter()
        .map(|f| ColumnInfo {
            name: f.name().clone(),
            data_type: f.data_type().to_string(),
            nullable: f.is_nullable(),
        })
        .collect()
}
