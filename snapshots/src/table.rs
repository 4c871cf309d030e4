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
const LAYER_TAG: &str = "__sluice_layer_of_row";

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
    let manifests = store.list_snapshots(model).await?;
    let Some(last) = manifests.last() else {
        return Ok(0);
    };
    let latest = read_snapshot(ctx, store, last).await?;
    let columns = model_columns(&latest);
    let latest = latest.select(columns)?;
    let history = read_history(ctx, store, &manifests).await?;
    ctx.register_table(model, latest.into_view())?;
    if let Some(history) = history {
        ctx.register_table(format!("{model}_history").as_str(), history.into_view())?;
    }
    Ok(manifests.len())
}

/// The model's own columns of a frame: sluice's left out.
fn model_columns(df: &DataFrame) -> Vec<datafusion::prelude::Expr> {
    df.schema()
        .fields()
        .iter()
        .map(|f| f.name())
        .filter(|n| !n.starts_with(crate::manifest::RESERVED_PREFIX))
        .map(datafusion::prelude::ident)
        .collect()
}

/// Every row of every snapshot in `manifests`, with the snapshot's id, run and time.
///
/// Read as the layers are stored, each file once: every snapshot's own rows are its own; the
/// rows a delta shares with earlier snapshots are in those snapshots' files, found through the
/// delta's index. So the earlier layers' rows (each file read once, tagged with its layer) are
/// joined once with every delta's index (each tagged with its delta): one join for the whole
/// history, not one per snapshot and layer, and a key's predicate reaches every file.
async fn read_history(
    ctx: &SessionContext,
    store: &SnapshotStore,
    manifests: &[SnapshotManifest],
) -> Result<Option<DataFrame>> {
    use std::collections::BTreeMap;

    use datafusion::logical_expr::{JoinType, case};
    use datafusion::prelude::{Expr, cast, ident, lit};

    let meta_values = |manifest: &SnapshotManifest| -> [Expr; 3] {
        [
            lit(manifest.id.as_str()),
            lit(manifest.run_id.as_str()),
            cast(
                lit(manifest.extracted_at.timestamp_micros()),
                arrow::datatypes::DataType::Timestamp(
                    arrow::datatypes::TimeUnit::Microsecond,
                    Some("UTC".into()),
                ),
            ),
        ]
    };
    let meta = |manifest: &SnapshotManifest| -> Vec<Expr> {
        let [id, run, at] = meta_values(manifest);
        vec![
            id.alias(SNAPSHOT_ID_COLUMN),
            run.alias(RUN_ID_COLUMN),
            at.alias(EXTRACTED_AT_COLUMN),
        ]
    };
    let union = |all: Option<DataFrame>, part: DataFrame| -> Result<DataFrame> {
        Ok(match all {
            None => part,
            Some(all) => all.union_by_name(part)?,
        })
    };
    // The history's columns: the first snapshot's, its metadata, then each column a later
    // snapshot adds, in the order they appeared.
    let mut order: Vec<String> = Vec::new();
    let mut parts: Option<DataFrame> = None;
    // Deltas grouped by their key columns (one join each; the key rarely changes).
    struct Shared {
        layers: Option<DataFrame>,
        members: Option<DataFrame>,
        /// The snapshots (ordinals into `manifests`) whose indexes `members` holds.
        members_of: Vec<u32>,
        tags: BTreeMap<String, u32>,
    }
    let mut shared: BTreeMap<Vec<String>, Shared> = BTreeMap::new();
    for (i, manifest) in manifests.iter().enumerate() {
        for column in &manifest.columns {
            if !order.contains(&column.name) {
                order.push(column.name.clone());
            }
        }
        if i == 0 {
            order.extend([SNAPSHOT_ID_COLUMN, RUN_ID_COLUMN, EXTRACTED_AT_COLUMN].map(String::from));
        }
        if let Some(own) = read_files(ctx, store, &manifest.files).await? {
            let mut columns = model_columns(&own);
            columns.extend(meta(manifest));
            parts = Some(union(parts, own.select(columns)?)?);
        }
        if manifest.is_base() {
            continue;
        }
        let group = shared.entry(manifest.key_columns.clone()).or_insert(Shared {
            layers: None,
            members: None,
            members_of: Vec::new(),
            tags: BTreeMap::new(),
        });
        // Each earlier layer's rows, read once for every delta that points into them.
        let mut tag_of_ordinal: Vec<(u32, u32)> = Vec::new();
        for ordinal in 0..manifest.own_layer() {
            let Some((snapshot, files)) = manifest.layer(ordinal) else {
                continue;
            };
            let next = group.tags.len() as u32;
            let tag = match group.tags.get(snapshot) {
                Some(tag) => *tag,
                None => {
                    group.tags.insert(snapshot.to_string(), next);
                    if let Some(rows) = read_files(ctx, store, files).await? {
                        let mut columns = model_columns(&rows);
                        columns.push(lit(next).alias(LAYER_TAG));
                        group.layers = Some(union(group.layers.take(), rows.select(columns)?)?);
                    }
                    next
                }
            };
            tag_of_ordinal.push((ordinal, tag));
        }
        let Some(index) = read_files(ctx, store, &manifest.index).await? else {
            continue;
        };
        let mut tag = case(ident(crate::manifest::LAYER_COLUMN));
        for (ordinal, layer_tag) in &tag_of_ordinal {
            tag = tag.when(lit(*ordinal), lit(*layer_tag));
        }
        let mut columns: Vec<Expr> = manifest
            .key_columns
            .iter()
            .enumerate()
            .map(|(i, k)| ident(k).alias(index_key(i)))
            .collect();
        columns.push(tag.end()?.alias(MEMBER_TAG));
        // Which snapshot, as an ordinal: its id, run and time come from it after the join.
        // (Literal metadata here would make DataFusion take each branch as sorted by
        // `_extracted_at` and drop the sort an `ORDER BY _extracted_at` needs.)
        columns.push(lit(i as u32).alias(MEMBER_SNAPSHOT));
        let members = index
            .filter(ident(crate::manifest::LAYER_COLUMN).lt(lit(manifest.own_layer())))?
            .select(columns)?;
        group.members = Some(union(group.members.take(), members)?);
        group.members_of.push(i as u32);
    }
    for (keys, group) in shared {
        let (Some(layers), Some(members)) = (group.layers, group.members) else {
            continue;
        };
        let index_keys: Vec<String> = (0..keys.len()).map(index_key).collect();
        let mut left: Vec<&str> = keys.iter().map(String::as_str).collect();
        left.push(LAYER_TAG);
        let mut right: Vec<&str> = index_keys.iter().map(String::as_str).collect();
        right.push(MEMBER_TAG);
        // (The layer tag is sluice's own column, so not among the model's.)
        let mut columns = model_columns(&layers);
        let mut id = case(ident(MEMBER_SNAPSHOT));
        let mut run = case(ident(MEMBER_SNAPSHOT));
        let mut at = case(ident(MEMBER_SNAPSHOT));
        for &i in &group.members_of {
            let [snapshot_id, run_id, extracted_at] = meta_values(&manifests[i as usize]);
            id = id.when(lit(i), snapshot_id);
            run = run.when(lit(i), run_id);
            at = at.when(lit(i), extracted_at);
        }
        columns.push(id.end()?.alias(SNAPSHOT_ID_COLUMN));
        columns.push(run.end()?.alias(RUN_ID_COLUMN));
        columns.push(at.end()?.alias(EXTRACTED_AT_COLUMN));
        let joined = layers
            .join(members, JoinType::Inner, &left, &right, None)?
            .select(columns)?;
        parts = Some(union(parts, joined)?);
    }
    let Some(history) = parts else {
        return Ok(None);
    };
    Ok(Some(history.select(order.iter().map(ident).collect::<Vec<_>>())?))
}

/// The index's key columns, renamed apart from the rows' while the two are joined.
fn index_key(i: usize) -> String {
    format!("__sluice_index_key_{i}")
}

/// The layer a delta's index puts a key in, as a tag of [`read_history`]'s layers.
const MEMBER_TAG: &str = "__sluice_member_layer";
/// The snapshot whose index a member row comes from, as an ordinal of [`read_history`]'s list.
const MEMBER_SNAPSHOT: &str = "__sluice_member_snapshot";
