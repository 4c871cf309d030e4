//! The manifest that commits a snapshot: a small JSON document written after every data file,
//! whose presence is what makes a snapshot visible.

use arrow::datatypes::Schema;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Version of the snapshot layout and hash definition (see [`crate::hash`]). Version 2 added
/// layered snapshots (`parent`, `index`, `layers`); a version 1 manifest reads as a base.
pub const FORMAT_VERSION: u32 = 2;

/// Name of the column holding each row's hash of its non-key columns.
pub const ROW_HASH_COLUMN: &str = "__sluice_row_hash";
/// Columns of a delta's changes files (besides the keys, [`ROW_HASH_COLUMN`] for the new hash
/// and [`LAYER_COLUMN`]): the change, and the hash the parent had.
pub const CHANGE_OP_COLUMN: &str = "__sluice_op";
pub const BASE_HASH_COLUMN: &str = "__sluice_base_hash";
/// Change codes in [`CHANGE_OP_COLUMN`] (the same as the diff's).
pub const OP_ADDED: u8 = 1;
pub const OP_UPDATED: u8 = 2;
pub const OP_DELETED: u8 = 3;
/// Name of the index column saying which layer holds a row: an ordinal into the manifest's
/// `layers`, where `layers.len()` is the snapshot itself.
pub const LAYER_COLUMN: &str = "__sluice_layer";
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
    /// This snapshot's own rows, one file per non-empty bucket, sorted by key: every row for a
    /// base, the rows no earlier layer holds for a delta.
    pub files: Vec<SnapshotFile>,
    /// A delta's parent: the snapshot it was compared with when written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// A delta's index: every row's key, row hash and layer, one file per bucket, sorted by key.
    /// Empty for a base, whose own rows are its index (all in layer 0, itself).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub index: Vec<SnapshotFile>,
    /// The earlier snapshots whose own rows a delta's index points into, oldest (the base)
    /// first; ordinal `i` of the index's layer column is `layers[i]`, and `layers.len()` this
    /// snapshot. Empty for a base.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<Layer>,
    /// A delta's changes since its parent, one file per bucket where something changed: what
    /// a mapping whose baseline is the parent has to send, without joining the two indexes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<SnapshotFile>,
}

/// One earlier snapshot's own rows, as a delta refers to them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    pub snapshot: String,
    /// Rows in its files.
    pub rows: u64,
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
    /// Own-row files that may hold rows of bucket `bucket` when the key space is split into
    /// `of` buckets (see [`covering`]).
    pub fn files_covering(&self, bucket: u32, of: u32) -> impl Iterator<Item = &SnapshotFile> {
        covering(&self.files, self.buckets, bucket, of)
    }

    /// Whether this snapshot is a base: its own rows are all its rows, and its index.
    pub fn is_base(&self) -> bool {
        self.index.is_empty() && self.layers.is_empty()
    }

    /// Index files (keys, row hash and, for a delta, layer) covering bucket `bucket` of `of`:
    /// a base's own files.
    pub fn index_covering(&self, bucket: u32, of: u32) -> impl Iterator<Item = &SnapshotFile> {
        let files = if self.is_base() { &self.files } else { &self.index };
        covering(files, self.buckets, bucket, of)
    }

    /// Every index file.
    pub fn index_files(&self) -> &[SnapshotFile] {
        if self.is_base() { &self.files } else { &self.index }
    }

    /// The ordinal of this snapshot's own layer in its index.
    pub fn own_layer(&self) -> u32 {
        self.layers.len() as u32
    }

    /// Id and files of layer `ordinal`, or `None` when there is no such layer.
    pub fn layer(&self, ordinal: u32) -> Option<(&str, &[SnapshotFile])> {
        match self.layers.get(ordinal as usize) {
            Some(layer) => Some((&layer.snapshot, &layer.files)),
            None if ordinal == self.own_layer() => Some((&self.id, &self.files)),
            None => None,
        }
    }

    /// Every data file this snapshot needs: its index, its own rows and its layers' rows.
    pub fn referenced_files(&self) -> impl Iterator<Item = &SnapshotFile> {
        self.index
            .iter()
            .chain(&self.changes)
            .chain(&self.files)
            .chain(self.layers.iter().flat_map(|l| &l.files))
    }

    /// Rows held in delta layers (every layer but the base, counting this snapshot's own rows
    /// when it is a delta): what compaction would fold into a new base.
    pub fn delta_rows(&self) -> u64 {
        if self.is_base() {
            return 0;
        }
        let own: u64 = self.files.iter().map(|f| f.rows).sum();
        self.layers.iter().skip(1).map(|l| l.rows).sum::<u64>() + own
    }

    /// The layers a child written as a delta of this snapshot refers to: this one's, then this
    /// snapshot's own rows (so every ordinal in this index means the same in the child's).
    pub fn layers_for_child(&self) -> Vec<Layer> {
        let mut layers = self.layers.clone();
        layers.push(Layer {
            snapshot: self.id.clone(),
            rows: self.files.iter().map(|f| f.rows).sum(),
            files: self.files.clone(),
        });
        layers
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

/// Of `files` (one per bucket of `buckets`), those that may hold rows of bucket `bucket` when
/// the key space is split into `of` buckets (`of` a power of two). Buckets nest: when `of` is
/// at most `buckets`, coarse bucket `b` is exactly buckets `b`, `b + of`, `b + 2*of`, ...; when
/// `of` is larger, the one file of bucket `b % buckets` holds bucket `b` among others, and the
/// reader must filter by key.
pub fn covering(
    files: &[SnapshotFile],
    buckets: u32,
    bucket: u32,
    of: u32,
) -> impl Iterator<Item = &SnapshotFile> {
    files.iter().filter(move |f| {
        if of <= buckets {
            f.bucket % of == bucket
        } else {
            f.bucket == bucket % buckets
        }
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_1_manifest_reads_as_a_base() {
        let v1 = r#"{
            "format_version": 1, "id": "a", "model": "users", "run_id": "r",
            "extracted_at": "2026-01-01T00:00:00Z", "key_columns": ["id"], "buckets": 2, "rows": 3,
            "columns": [{"name": "id", "data_type": "Int64", "nullable": false}],
            "files": [
                {"path": "models/users/snapshots/a/bucket-0000-of-0002.parquet", "bucket": 0, "rows": 1, "bytes": 10},
                {"path": "models/users/snapshots/a/bucket-0001-of-0002.parquet", "bucket": 1, "rows": 2, "bytes": 10}
            ]
        }"#;
        let manifest: SnapshotManifest = serde_json::from_str(v1).unwrap();
        assert!(manifest.is_base());
        assert_eq!(manifest.own_layer(), 0);
        assert_eq!(manifest.index_files(), manifest.files.as_slice());
        assert_eq!(
            manifest.layer(0).map(|(id, files)| (id, files.len())),
            Some(("a", 2))
        );
        assert!(manifest.layer(1).is_none());
        assert_eq!(manifest.delta_rows(), 0);
        // A delta of it refers to its rows as layer 0, and to itself as layer 1.
        let layers = manifest.layers_for_child();
        assert_eq!(layers.len(), 1);
        assert_eq!((layers[0].snapshot.as_str(), layers[0].rows), ("a", 3));
        // A base serialises without the delta fields, as version 1 did.
        let text = serde_json::to_string(&manifest).unwrap();
        assert!(!text.contains("index") && !text.contains("layers") && !text.contains("parent"));
    }
}
