//! Where snapshots live: an object_store location (a local directory by default, or any
//! `s3://`, `gs://`, `az://`, `memory://` URL) and the layout under it:
//!
//! ```text
//! <root>/models/<model>/snapshots/<id>/bucket-0003-of-0016.parquet   data, one file per bucket
//! <root>/models/<model>/snapshots/<id>.json                          manifest: commits the snapshot
//! <root>/mappings/<mapping>/...                                      per-mapping state files
//! ```
//!
//! A snapshot is visible only once its manifest exists; the manifest is written with a single
//! atomic `put` after every data file is complete, so a reader never sees a half-written snapshot.
//! Retiring deletes the manifest first, then the data.

use std::path::Path as FsPath;
use std::sync::Arc;

use bytes::Bytes;
use datafusion::prelude::SessionContext;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use url::Url;

use crate::error::{Result, SnapshotError};
use crate::manifest::SnapshotManifest;
use crate::storage::{UploadJanitor, open_store};

#[derive(Debug, Clone)]
pub struct SnapshotStore {
    /// URL of the root, always ending in `/`.
    root_url: Url,
    store: Arc<dyn ObjectStore>,
    /// Path of the root inside `store`.
    prefix: Path,
    /// Local directory for spill files while a snapshot is written.
    temp_dir: std::path::PathBuf,
    /// Finds multipart uploads a killed writer left unfinished (S3, GCS).
    janitor: Option<UploadJanitor>,
}

impl SnapshotStore {
    /// Opens a store from a local path (relative paths resolve against `base_dir`) or an
    /// object_store URL. `options` configure the provider (credentials, region, endpoint, ...;
    /// see [`open_store`]), which also reads its usual environment variables (`AWS_*`,
    /// `GOOGLE_*`, `AZURE_*`).
    pub fn open(
        location: &str,
        base_dir: &FsPath,
        options: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self> {
        let url = location_url(location, base_dir)?;
        if url.scheme() == "file" {
            let dir = url.to_file_path().map_err(|_| SnapshotError::InvalidLocation {
                location: location.to_string(),
                reason: "not a valid local path".into(),
            })?;
            std::fs::create_dir_all(&dir).map_err(|e| SnapshotError::InvalidLocation {
                location: dir.display().to_string(),
                reason: format!("cannot create the directory: {e}"),
            })?;
        }
        let opened = open_store(&url, options).map_err(|e| SnapshotError::InvalidLocation {
            location: location.to_string(),
            reason: e.0,
        })?;
        Ok(Self {
            root_url: url,
            store: opened.store,
            prefix: opened.prefix,
            temp_dir: std::env::temp_dir().join("sluice"),
            janitor: opened.janitor,
        })
    }

    /// Wraps an existing object store (tests, or stores built by hand).
    pub fn from_parts(root_url: Url, store: Arc<dyn ObjectStore>, prefix: Path) -> Self {
        Self {
            root_url: with_trailing_slash(root_url),
            store,
            prefix,
            temp_dir: std::env::temp_dir().join("sluice"),
            janitor: None,
        }
    }

    /// Uses `dir` (on local disk) for spill files while snapshots are written.
    pub fn with_temp_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.temp_dir = dir.into();
        self
    }

    /// The local directory spill files go under.
    pub fn temp_dir(&self) -> std::path::PathBuf {
        self.temp_dir.clone()
    }

    pub fn root_url(&self) -> &Url {
        &self.root_url
    }

    pub fn object_store(&self) -> Arc<dyn ObjectStore> {
        self.store.clone()
    }

    /// Makes this store's URLs readable by `ctx` (DataFusion resolves object stores by the
    /// scheme and authority of a table's URL).
    pub fn register_with(&self, ctx: &SessionContext) {
        if self.root_url.scheme() != "file" {
            let mut base = self.root_url.clone();
            base.set_path("/");
            ctx.register_object_store(&base, self.store.clone());
        }
    }

    /// Full path inside the object store of a path relative to the root.
    pub fn path(&self, relative: &str) -> Path {
        let mut path = self.prefix.clone();
        for part in relative.split('/').filter(|p| !p.is_empty()) {
            path = path.clone().join(part);
        }
        path
    }

    /// URL of a path relative to the root, as DataFusion wants it.
    pub fn url(&self, relative: &str) -> Url {
        let mut url = self.root_url.clone();
        let joined = format!("{}{}", url.path(), relative.trim_start_matches('/'));
        url.set_path(&joined);
        url
    }

    pub(crate) fn store_error(&self, source: object_store::Error) -> SnapshotError {
        SnapshotError::Store {
            location: self.root_url.to_string(),
            source,
        }
    }

    pub async fn put(&self, relative: &str, bytes: Bytes) -> Result<()> {
        self.store
            .put(&self.path(relative), PutPayload::from_bytes(bytes))
            .await
            .map_err(|e| self.store_error(e))?;
        Ok(())
    }

    /// Reads a whole object, or `None` when it does not exist.
    pub async fn get(&self, relative: &str) -> Result<Option<Bytes>> {
        match self.store.get(&self.path(relative)).await {
            Ok(result) => Ok(Some(result.bytes().await.map_err(|e| self.store_error(e))?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.store_error(e)),
        }
    }

    /// Deletes an object; deleting one that is already gone is not an error, so retiring can be
    /// interrupted and repeated, or run from two processes at once.
    pub async fn delete(&self, relative: &str) -> Result<()> {
        match self.store.delete(&self.path(relative)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.store_error(e)),
        }
    }

    /// Metadata of every object under `relative_prefix`.
    async fn list_objects(&self, relative_prefix: &str) -> Result<Vec<object_store::ObjectMeta>> {
        self.store
            .list(Some(&self.path(relative_prefix)))
            .try_collect()
            .await
            .map_err(|e| self.store_error(e))
    }

    /// A path inside the object store, relative to the root.
    fn relative(&self, location: &Path) -> String {
        let root_parts = self.prefix.parts().count();
        location
            .parts()
            .skip(root_parts)
            .map(|p| p.as_ref().to_string())
            .collect::<Vec<_>>()
            .join("/")
    }

    /// Paths (relative to the root) of every object under `relative_prefix`.
    pub async fn list(&self, relative_prefix: &str) -> Result<Vec<String>> {
        let metas = self.list_objects(relative_prefix).await?;
        Ok(metas.iter().map(|m| self.relative(&m.location)).collect())
    }

    pub(crate) fn manifest_path(model: &str, id: &str) -> String {
        format!("models/{model}/snapshots/{id}.json")
    }

    pub(crate) fn data_dir(model: &str, id: &str) -> String {
        format!("models/{model}/snapshots/{id}")
    }

    /// Where a writer of a delta marks which parent it builds on while it runs.
    pub(crate) fn marker_path(model: &str, id: &str) -> String {
        format!("models/{model}/snapshots/{id}.writing")
    }

    /// Committed snapshots of `model`, oldest first.
    pub async fn list_snapshots(&self, model: &str) -> Result<Vec<SnapshotManifest>> {
        let mut ids: Vec<String> = self
            .list(&format!("models/{model}/snapshots"))
            .await?
            .into_iter()
            .filter_map(|p| {
                let name = p.rsplit('/').next()?;
                // Only top-level manifests: `<id>.json` directly under `snapshots/`.
                let parent_is_snapshots = p.split('/').rev().nth(1) == Some("snapshots");
                name.strip_suffix(".json")
                    .filter(|_| parent_is_snapshots)
                    .map(str::to_string)
            })
            .collect();
        ids.sort();
        let manifests = futures::stream::iter(ids)
            .map(|id| async move { self.snapshot(model, &id).await })
            .buffered(8)
            .try_collect::<Vec<_>>()
            .await?;
        Ok(manifests)
    }

    /// The manifest of one committed snapshot.
    pub async fn snapshot(&self, model: &str, id: &str) -> Result<SnapshotManifest> {
        let path = Self::manifest_path(model, id);
        let bytes = self.get(&path).await?.ok_or_else(|| SnapshotError::NotFound {
            model: model.to_string(),
            id: id.to_string(),
        })?;
        let manifest: SnapshotManifest =
            serde_json::from_slice(&bytes).map_err(|e| SnapshotError::BadManifest {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if manifest.format_version > crate::FORMAT_VERSION {
            return Err(SnapshotError::BadManifest {
                path,
                reason: format!(
                    "it has format version {}, and this sluice reads up to version {}; upgrade sluice",
                    manifest.format_version,
                    crate::FORMAT_VERSION
                ),
            });
        }
        Ok(manifest)
    }

    /// Every data file (relative path) that a committed snapshot of `model` or a running
    /// writer needs: what retiring and cleaning up must leave in place.
    /// Markers last written before `markers_since` (writers that died) do not count.
    async fn referenced_files(
        &self,
        model: &str,
        markers_since: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<std::collections::HashSet<String>> {
        let mut referenced = std::collections::HashSet::new();
        for manifest in self.list_snapshots(model).await? {
            referenced.extend(manifest.referenced_files().map(|f| f.path.clone()));
        }
        for meta in self.list_objects(&format!("models/{model}/snapshots")).await? {
            let path = self.relative(&meta.location);
            if !path.ends_with(".writing") || markers_since.is_some_and(|since| meta.last_modified < since) {
                continue;
            }
            let Some(bytes) = self.get(&path).await? else {
                continue;
            };
            match serde_json::from_slice::<WriterMarker>(&bytes) {
                Ok(marker) => referenced.extend(marker.files),
                Err(e) => tracing::warn!(path, error = %e, "an unreadable snapshot writer's marker"),
            }
        }
        Ok(referenced)
    }

    /// Retires a snapshot: the manifest goes first so the snapshot stops being visible, then its
    /// data files that nothing else refers to. A delta's layers are earlier snapshots' own
    /// rows: they stay while a committed delta, or a writer building one, needs them, and
    /// [`SnapshotStore::remove_uncommitted`] removes them once nothing does. Safe to interrupt
    /// and to repeat.
    pub async fn retire(&self, model: &str, id: &str) -> Result<()> {
        self.delete(&Self::manifest_path(model, id)).await?;
        // Listed after the manifest is gone: a writer that picked this snapshot as its parent
        // has either marked its files already (and they stay), or will find the parent gone
        // when it checks after marking, and write a base.
        let referenced = self.referenced_files(model, None).await?;
        for path in self.list(&Self::data_dir(model, id)).await? {
            if !referenced.contains(&path) {
                self.delete(&path).await?;
            }
        }
        Ok(())
    }

    /// Deletes data files of `model` that no committed snapshot (or running writer's parent)
    /// refers to and that were created before `older_than`: left by a writer that was killed or
    /// failed, or layers of retired snapshots that no delta needs any more; and markers of
    /// writers that died.
    pub async fn remove_uncommitted(
        &self,
        model: &str,
        older_than: chrono::DateTime<chrono::Utc>,
    ) -> Result<usize> {
        let metas = self.list_objects(&format!("models/{model}/snapshots")).await?;
        let referenced = self.referenced_files(model, Some(older_than)).await?;
        let mut removed = 0;
        for meta in metas {
            let relative = self.relative(&meta.location);
            let is_data = meta.location.extension() == Some("parquet");
            let is_marker = meta.location.extension() == Some("writing");
            if (is_data && !referenced.contains(&relative) || is_marker) && meta.last_modified < older_than {
                self.delete(&relative).await?;
                removed += usize::from(is_data);
            }
        }
        Ok(removed)
    }

    /// Aborts the multipart uploads under `relative_prefix` that were started before
    /// `older_than` and never completed (a writer killed mid-upload leaves one: invisible to
    /// listings, but its parts are stored until aborted). Returns how many were aborted; 0 on
    /// stores without multipart uploads to find (local, memory, Azure, which discards
    /// uncommitted blocks itself after seven days).
    pub async fn abort_unfinished_uploads(
        &self,
        relative_prefix: &str,
        older_than: chrono::DateTime<chrono::Utc>,
    ) -> Result<usize> {
        let Some(janitor) = &self.janitor else {
            return Ok(0);
        };
        let prefix = self.path(relative_prefix);
        let uploads = janitor
            .unfinished(&prefix)
            .await
            .map_err(|e| self.store_error(e))?;
        let mut aborted = 0;
        for upload in uploads.iter().filter(|u| u.initiated < older_than) {
            janitor.abort(upload).await.map_err(|e| self.store_error(e))?;
            tracing::info!(path = %upload.path, initiated = %upload.initiated, "aborted an unfinished upload");
            aborted += 1;
        }
        Ok(aborted)
    }

    /// Unfinished multipart uploads under `relative_prefix` (paths relative to the root).
    pub async fn unfinished_uploads(&self, relative_prefix: &str) -> Result<Vec<String>> {
        let Some(janitor) = &self.janitor else {
            return Ok(Vec::new());
        };
        let uploads = janitor
            .unfinished(&self.path(relative_prefix))
            .await
            .map_err(|e| self.store_error(e))?;
        Ok(uploads.iter().map(|u| self.relative(&u.path)).collect())
    }
}

/// What a writer of a delta leaves beside the manifests while it runs: the parent it builds on
/// and the files of the parent it reads or will refer to.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct WriterMarker {
    pub parent: String,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub files: Vec<String>,
}

fn with_trailing_slash(mut url: Url) -> Url {
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    url
}

/// Turns a configured location into a URL: anything with a `scheme://` is a URL, anything else
/// a local path.
fn location_url(location: &str, base_dir: &FsPath) -> Result<Url> {
    if location.contains("://") {
        let url = Url::parse(location).map_err(|e| SnapshotError::InvalidLocation {
            location: location.to_string(),
            reason: e.to_string(),
        })?;
        return Ok(with_trailing_slash(url));
    }
    let path = FsPath::new(location);
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        base_dir.join(path)
    };
    let absolute = normalize(&absolute);
    Url::from_directory_path(&absolute).map_err(|_| SnapshotError::InvalidLocation {
        location: location.to_string(),
        reason: "cannot turn the path into a file URL (is the base directory absolute?)".into(),
    })
}

/// Removes `.` and `..` components without touching the file system (the directory may not
/// exist yet).
fn normalize(path: &FsPath) -> std::path::PathBuf {
    use std::path::Component;
    let mut out = std::path::PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_paths_become_directory_urls() {
        let url = location_url(".sluice/snapshots", FsPath::new("/srv/app")).unwrap();
        assert_eq!(url.as_str(), "file:///srv/app/.sluice/snapshots/");
        let url = location_url("../shared/snaps", FsPath::new("/srv/app")).unwrap();
        assert_eq!(url.as_str(), "file:///srv/shared/snaps/");
        let url = location_url("s3://bucket/prefix", FsPath::new("/srv/app")).unwrap();
        assert_eq!(url.as_str(), "s3://bucket/prefix/");
    }

    #[tokio::test]
    async fn put_get_list_delete_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open("snaps", dir.path(), []).unwrap();
        store.put("a/b.txt", Bytes::from_static(b"hi")).await.unwrap();
        assert_eq!(store.get("a/b.txt").await.unwrap().unwrap(), "hi");
        assert_eq!(store.list("a").await.unwrap(), vec!["a/b.txt".to_string()]);
        store.delete("a/b.txt").await.unwrap();
        store.delete("a/b.txt").await.unwrap();
        assert!(store.get("a/b.txt").await.unwrap().is_none());
        assert!(dir.path().join("snaps").is_dir());
    }

    #[tokio::test]
    async fn memory_urls_work() {
        let store = SnapshotStore::open("memory:///root", FsPath::new("/"), []).unwrap();
        store.put("x", Bytes::from_static(b"1")).await.unwrap();
        assert_eq!(store.list("").await.unwrap(), vec!["x".to_string()]);
        assert_eq!(
            store.url("models/m/a.parquet").as_str(),
            "memory:///root/models/m/a.parquet"
        );
    }
}

#[cfg(test)]
mod retire_tests {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Int64Array, RecordBatch};

    use super::*;
    use crate::{SnapshotSpec, SnapshotWriter};

    async fn snapshot(store: &SnapshotStore) -> SnapshotManifest {
        let spec = SnapshotSpec {
            model: "m".into(),
            run_id: "r".into(),
            key_columns: vec!["id".into()],
            buckets: Some(2),
        };
        let mut writer = SnapshotWriter::new(store.clone(), spec);
        let batch = RecordBatch::try_from_iter(vec![(
            "id",
            Arc::new(Int64Array::from(vec![1, 2, 3])) as ArrayRef,
        )])
        .unwrap();
        writer.write(batch).await.unwrap();
        writer.commit().await.unwrap()
    }

    #[tokio::test]
    async fn retiring_removes_the_manifest_then_the_data_and_can_be_repeated() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open("s", dir.path(), [])
            .unwrap()
            .with_temp_dir(dir.path().join("tmp"));
        let kept = snapshot(&store).await;
        let retired = snapshot(&store).await;
        store.retire("m", &retired.id).await.unwrap();
        store.retire("m", &retired.id).await.unwrap();
        assert_eq!(store.list_snapshots("m").await.unwrap(), vec![kept.clone()]);
        assert!(
            store
                .list(&SnapshotStore::data_dir("m", &retired.id))
                .await
                .unwrap()
                .is_empty()
        );
        assert!(matches!(
            store.snapshot("m", &retired.id).await,
            Err(SnapshotError::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn data_no_manifest_commits_is_removed_once_old_enough() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open("s", dir.path(), [])
            .unwrap()
            .with_temp_dir(dir.path().join("tmp"));
        let kept = snapshot(&store).await;
        // A writer killed before its manifest: data files, no manifest.
        store
            .put(
                "models/m/snapshots/orphan/bucket-0000-of-0001.parquet",
                Bytes::from_static(b"x"),
            )
            .await
            .unwrap();
        let now = chrono::Utc::now();
        assert_eq!(
            store
                .remove_uncommitted("m", now - chrono::Duration::hours(1))
                .await
                .unwrap(),
            0
        );
        assert_eq!(
            store
                .remove_uncommitted("m", now + chrono::Duration::seconds(5))
                .await
                .unwrap(),
            1
        );
        assert_eq!(store.list_snapshots("m").await.unwrap(), vec![kept]);
    }
}
