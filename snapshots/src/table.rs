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

/// Columns the history table adds to a model's own.
pub const SNAPSHOT_ID_COLUMN: &str = "_snapshot_id";
pub const RUN_ID_COLUMN: &str = "_run_id";
pub const EXTRACTED_AT_COLUMN: &str = "_extracted_at";

/// Registers the snapshot history of `model` in `ctx`: table `<model>` is its latest snapshot,
/// and `<model>_history` every committed snapshot, oldest first, with `_snapshot_id`, `_run_id`
/// (the run that extracted it) and `_extracted_at`; sluice's own columns are left out. Snapshots
/// whose columns differ are aligned by name (a column missing from one is null there). Returns
/// the number of snapshots; nothing is registered for a model without any.
pub async fn register_history(ctx: &SessionContext, store: &SnapshotStore, model: &str) -> Result<usize> {
    use datafusion::prelude::{Expr, cast, ident, lit};

    let manifests = store.list_snapshots(model).await?;
    let mut history: Option<DataFrame> = None;
    let mut latest: Option<DataFrame> = None;
    for manifest in &manifests {
        let df = read_snapshot(ctx, store, manifest).await?;
        let columns: Vec<Expr> = df
            .schema()
            .fields()
            .iter()
            .map(|f| f.name())
            .filter(|n| !n.starts_with(crate::manifest::RESERVED_PREFIX))
            .map(ident)
            .collect();
        let own = df.select(columns.clone())?;
        let mut with_meta = columns;
        with_meta.push(lit(manifest.id.as_str()).alias(SNAPSHOT_ID_COLUMN));
        with_meta.push(lit(manifest.run_id.as_str()).alias(RUN_ID_COLUMN));
        with_meta.push(
            cast(
                lit(manifest.extracted_at.timestamp_micros()),
                arrow::datatypes::DataType::Timestamp(
                    arrow::datatypes::TimeUnit::Microsecond,
                    Some("UTC".into()),
                ),
            )
            .alias(EXTRACTED_AT_COLUMN),
        );
        let part = own.clone().select(with_meta)?;
        history = Some(match history {
            None => part,
            Some(h) => h.union_by_name(part)?,
        });
        latest = Some(own);
    }
    if let (Some(history), Some(latest)) = (history, latest) {
        ctx.register_table(model, latest.into_view())?;
        ctx.register_table(format!("{model}_history").as_str(), history.into_view())?;
    }
    Ok(manifests.len())
}
