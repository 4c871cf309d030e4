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
    let select = |files: &[SnapshotFile]| -> Vec<SnapshotFile> {
        match bucket {
            Some((b, of)) => crate::manifest::covering(files, manifest.buckets, b, of)
                .cloned()
                .collect(),
            None => files.to_vec(),
        }
    };
    read_rows_in(ctx, store, manifest, &select).await
}

/// The rows of a snapshot held in the files `select` keeps of each file list (its own rows,
/// its index, its layers'): a set of buckets, since every list is split alike.
pub(crate) async fn read_rows_in(
    ctx: &SessionContext,
    store: &SnapshotStore,
    manifest: &SnapshotManifest,
    select: &(dyn Fn(&[SnapshotFile]) -> Vec<SnapshotFile> + Sync),
) -> Result<Option<DataFrame>> {
    use datafusion::logical_expr::JoinType;
    use datafusion::prelude::{ident, lit};

    if manifest.is_base() {
        return read_files(ctx, store, &select(&manifest.files)).await;
    }
    // Every own row is current. Of the earlier layers, a row is current when the index puts
    // its key in that layer: all the layers' rows, each tagged with its ordinal, semi-joined
    // once with the index on key and layer. (A join per layer scanned the index once per
    // layer: a history of ten deltas opened ~100 files for one key's rows.)
    let own = read_files(ctx, store, &select(&manifest.files)).await?;
    let mut earlier: Option<DataFrame> = None;
    for ordinal in 0..manifest.own_layer() {
        let Some((_, files)) = manifest.layer(ordinal) else {
            continue;
        };
        let Some(rows) = read_files(ctx, store, &select(files)).await? else {
            continue;
        };
        let tagged = rows.with_column(LAYER_TAG, lit(ordinal))?;
        earlier = Some(match earlier {
            None => tagged,
            Some(all) => all.union(tagged)?,
        });
    }
    let current_earlier = match (earlier, read_files(ctx, store, &select(&manifest.index)).await?) {
        (Some(earlier), Some(index)) => {
            let keys: Vec<&str> = manifest.key_columns.iter().map(String::as_str).collect();
            let index_keys: Vec<String> = (0..keys.len()).map(index_key).collect();
            let mut left: Vec<&str> = keys.clone();
            left.push(LAYER_TAG);
            let mut right: Vec<&str> = index_keys.iter().map(String::as_str).collect();
            right.push(crate::manifest::LAYER_COLUMN);
            let mut projection: Vec<_> = keys
                .iter()
                .zip(&index_keys)
                .map(|(k, alias)| ident(*k).alias(alias))
                .collect();
            projection.push(ident(crate::manifest::LAYER_COLUMN));
            let in_earlier = index
                .filter(ident(crate::manifest::LAYER_COLUMN).lt(lit(manifest.own_layer())))?
                .select(projection)?;
            let joined = earlier.join(in_earlier, JoinType::LeftSemi, &left, &right, None)?;
            Some(joined.drop_columns(&[LAYER_TAG])?)
        }
        _ => None,
    };
    Ok(match (own, current_earlier) {
        (Some(own), Some(earlier)) => Some(own.union(earlier)?),
        (own, earlier) => own.or(earlier),
    })
}

/// The layer ordinal an earlier layer's rows are tagged with while they are matched against
/// the index.
pub(crate) const LAYER_TAG: &str = "__sluice_layer_of_row";

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

/// The model's own columns of a frame: sluice's left out.
pub(crate) fn model_columns(df: &DataFrame) -> Vec<datafusion::prelude::Expr> {
    df.schema()
        .fields()
        .iter()
        .map(|f| f.name())
        .filter(|n| !n.starts_with(crate::manifest::RESERVED_PREFIX))
        .map(datafusion::prelude::ident)
        .collect()
}

/// The index's key columns, renamed apart from the rows' while the two are joined.
pub(crate) fn index_key(i: usize) -> String {
    format!("__sluice_index_key_{i}")
}
