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

/// A DataFrame over every row of a snapshot: the model's columns and the row hash. A base's
/// rows are its own files (every base has at least one, even when empty); a delta's are its own
/// rows and, of each earlier layer, the rows its index says that layer holds.
pub async fn read_snapshot(
    ctx: &SessionContext,
    store: &SnapshotStore,
    manifest: &SnapshotManifest,
) -> Result<DataFrame> {
    read_rows(ctx, store, manifest, None)
        .await?
        .ok_or_else(|| crate::SnapshotError::BadManifest {
            path: SnapshotStore::manifest_path(&manifest.model, &manifest.id),
            reason: "the manifest lists no data files".into(),
        })
}

/// The rows of a snapshot ([`read_snapshot`]), or of its bucket `b` of `of` when `bucket` is
/// `Some((b, of))`; `None` when no file holds any.
pub async fn read_rows(
    ctx: &SessionContext,
    store: &SnapshotStore,
    manifest: &SnapshotManifest,
    bucket: Option<(u32, u32)>,
) -> Result<Option<DataFrame>> {
    use datafusion::logical_expr::JoinType;
    use datafusion::prelude::{ident, lit};

    let select = |files: &'_ [SnapshotFile]| -> Vec<SnapshotFile> {
        match bucket {
            Some((b, of)) => crate::manifest::covering(files, manifest.buckets, b, of)
                .cloned()
                .collect(),
            None => files.to_vec(),
        }
    };
    if manifest.is_base() {
        return read_files(ctx, store, &select(&manifest.files)).await;
    }
    let keys: Vec<&str> = manifest.key_columns.iter().map(String::as_str).collect();
    let index_keys: Vec<String> = (0..keys.len())
        .map(|i| format!("__sluice_index_key_{i}"))
        .collect();
    let index_key_refs: Vec<&str> = index_keys.iter().map(String::as_str).collect();
    let index_files = select(&manifest.index);
    let mut frames: Vec<DataFrame> = Vec::new();
    for ordinal in 0..=manifest.own_layer() {
        let Some((_, files)) = manifest.layer(ordinal) else {
            continue;
        };
        let Some(rows) = read_files(ctx, store, &select(files)).await? else {
            continue;
        };
        if ordinal == manifest.own_layer() {
            // Every own row is current.
            frames.push(rows);
            continue;
        }
        let Some(index) = read_files(ctx, store, &index_files).await? else {
            continue;
        };
        let in_layer = index
            .filter(ident(crate::manifest::LAYER_COLUMN).eq(lit(ordinal)))?
            .select(
                keys.iter()
                    .zip(&index_keys)
                    .map(|(k, alias)| ident(*k).alias(alias))
                    .collect::<Vec<_>>(),
            )?;
        frames.push(rows.join(in_layer, JoinType::LeftSemi, &keys, &index_key_refs, None)?);
    }
    let mut frames = frames.into_iter();
    let Some(first) = frames.next() else {
        return Ok(None);
    };
    Ok(Some(frames.try_fold(first, |all, frame| all.union(frame))?))
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
