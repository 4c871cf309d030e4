//! Snapshots as DataFusion tables.

use datafusion::dataframe::DataFrame;
use datafusion::prelude::{ParquetReadOptions, SessionContext};

use crate::error::Result;
use crate::manifest::{SnapshotFile, SnapshotManifest};
use crate::store::SnapshotStore;

/// A DataFrame over some files of a snapshot, or `None` when `files` is empty.
pub async fn read_files<'a>(
    ctx: &SessionContext,
    store: &SnapshotStore,
    files: impl IntoIterator<Item = &'a SnapshotFile>,
) -> Result<Option<DataFrame>> {
    let urls: Vec<String> = files
        .into_iter()
        .map(|f| store.url(&f.path).to_string())
        .collect();
    if urls.is_empty() {
        return Ok(None);
    }
    store.register_with(ctx);
    Ok(Some(ctx.read_parquet(urls, ParquetReadOptions::default()).await?))
}

/// A DataFrame over a whole snapshot (every snapshot has at least one file, even when empty).
pub async fn read_snapshot(
    ctx: &SessionContext,
    store: &SnapshotStore,
    manifest: &SnapshotManifest,
) -> Result<DataFrame> {
    read_files(ctx, store, &manifest.files)
        .await?
        .ok_or_else(|| crate::SnapshotError::BadManifest {
            path: SnapshotStore::manifest_path(&manifest.model, &manifest.id),
            reason: "the manifest lists no data files".into(),
        })
}

/// Registers a whole snapshot as table `name` in `ctx`.
pub async fn register_snapshot(
    ctx: &SessionContext,
    name: &str,
    store: &SnapshotStore,
    manifest: &SnapshotManifest,
) -> Result<()> {
    let df = read_snapshot(ctx, store, manifest).await?;
    ctx.register_table(name, df.into_view())?;
    Ok(())
}
