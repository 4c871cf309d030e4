//! Unload paths: for a whole sync, a warehouse writes the model's result as Parquet files to
//! object storage (Redshift `UNLOAD`, Snowflake `COPY INTO <location>`, BigQuery `EXPORT DATA`)
//! and sluice reads them back through object_store, several files at once. For large models
//! this beats any row protocol: the warehouse writes in parallel from every node, and the files
//! are columnar already.
//!
//! Each extraction writes under a prefix of its own, `<url>/<model>/<time>-<id>/`, so two runs
//! never read each other's files, and its files are deleted once read (or when the read fails:
//! the next run unloads afresh). A process killed mid-read leaves its prefix behind; a lifecycle
//! rule on the bucket (expire after a day) clears those.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch, StringArray};
use arrow::compute::{CastOptions, cast_with_options};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use futures::{StreamExt, TryStreamExt};
use indexmap::IndexMap;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt};
use parquet::arrow::ParquetRecordBatchStreamBuilder;
use sluice_engine::datafusion::error::DataFusionError;
use sluice_engine::source::SendableRecordBatchStream;
use sluice_engine::{ConfigString, SourceError};
use sluice_snapshots::ObjectFileReader;
use tokio::sync::mpsc;
use url::Url;

/// Files read at once. Each is a Parquet stream decoded on the runtime; two keep both cores
/// busy while a third file's first bytes are on their way.
const FILES_AT_ONCE: usize = 3;

/// Rows per batch read back.
const BATCH_ROWS: usize = 65_536;

/// An object-store prefix a warehouse unloads into and sluice reads back from.
pub struct UnloadLocation {
    source_name: String,
    /// The location, ending in `/`: `s3://bucket/sluice-unload/`.
    url: Url,
    store: Arc<dyn ObjectStore>,
    /// The URL's path inside `store`.
    root: Path,
    keep_files: bool,
}

/// One extraction's prefix under the location.
#[derive(Debug, Clone)]
pub struct UnloadPrefix {
    /// The prefix as a URL, ending in `/`, in the location's own scheme.
    pub url: String,
    /// The prefix relative to the location, ending in `/`: `<model>/<time>-<id>/`.
    pub relative: String,
    /// The prefix inside the store.
    pub path: Path,
}

/// A file the warehouse wrote, and how many rows it says the file holds when it says.
#[derive(Debug, Clone)]
pub struct UnloadedFile {
    pub path: Path,
    pub size: Option<u64>,
}

/// What a read of unloaded files is about, for its errors and its check.
pub struct UnloadRead {
    pub model: String,
    /// The model's columns as the source describes them: the files' columns are cast to these,
    /// by position, so a sync reads the same types whichever path it takes.
    pub schema: SchemaRef,
    pub files: Vec<UnloadedFile>,
    /// The row count the warehouse reported, checked once every file is read.
    pub expected_rows: Option<u64>,
    /// Objects to delete once read besides the files (a manifest).
    pub also_delete: Vec<Path>,
}

impl UnloadLocation {
    /// Opens `url` with object_store `options`. The error says what is wrong, without values.
    pub fn open(
        source_name: &str,
        url: &str,
        options: &IndexMap<String, ConfigString>,
        keep_files: bool,
    ) -> Result<Self, String> {
        let shown = sluice_engine::secrets::shown_location(url);
        let mut parsed = Url::parse(url).map_err(|e| format!("unload `url` `{shown}` is not a URL: {e}"))?;
        if !parsed.path().ends_with('/') {
            let path = format!("{}/", parsed.path());
            parsed.set_path(&path);
        }
        let options: Vec<(String, String)> = options
            .iter()
            .map(|(k, v)| (k.clone(), v.expose().to_string()))
            .collect();
        let opened = sluice_snapshots::open_store(&parsed, options)
            .map_err(|e| format!("unload `url` `{shown}`: {e}"))?;
        Ok(Self {
            source_name: source_name.to_string(),
            url: parsed,
            store: opened.store,
            root: opened.prefix,
            keep_files,
        })
    }

    pub fn url(&self) -> &Url {
        &self.url
    }

    /// A fresh prefix for one extraction of `model`.
    pub fn fresh_prefix(&self, model: &str) -> UnloadPrefix {
        let model: String = model
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let id = format!(
            "{}-{}",
            chrono::Utc::now().format("%Y%m%dT%H%M%SZ"),
            &uuid::Uuid::now_v7().simple().to_string()[20..]
        );
        let path = self.root.clone().join(model.as_str()).join(id.as_str());
        UnloadPrefix {
            url: format!("{}{model}/{id}/", self.url),
            relative: format!("{model}/{id}/"),
            path,
        }
    }

    /// The path inside the store of a file the warehouse names by its full URL (a manifest's
    /// entries), which must lie under this location.
    pub fn path_of(&self, file_url: &str) -> Result<Path, String> {
        let parsed = Url::parse(file_url).map_err(|e| format!("`{file_url}` is not a URL: {e}"))?;
        if parsed.host_str() != self.url.host_str() || !parsed.path().starts_with(self.url.path()) {
            return Err(format!(
                "`{file_url}` is not under the unload location `{}`",
                self.url
            ));
        }
        Path::from_url_path(parsed.path()).map_err(|e| format!("`{file_url}`: {e}"))
    }

    /// One object's bytes (a manifest the warehouse wrote).
    pub async fn get(&self, path: &Path) -> Result<bytes::Bytes, String> {
        let got = self.store.get(path).await.map_err(|e| e.to_string())?;
        got.bytes().await.map_err(|e| e.to_string())
    }

    /// Every object under `prefix`, for warehouses that do not list what they wrote.
    pub async fn list(&self, model: &str, prefix: &UnloadPrefix) -> Result<Vec<ObjectMeta>, SourceError> {
        let mut objects: Vec<ObjectMeta> =
            self.store
                .list(Some(&prefix.path))
                .try_collect()
                .await
                .map_err(|e| {
                    self.error(
                        model,
                        format!("listing the unloaded files under {}: {e}", prefix.url),
                    )
                })?;
        objects.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(objects)
    }

    /// Deletes what an extraction left under `prefix` (after a failure before its read began).
    pub async fn discard(&self, model: &str, prefix: &UnloadPrefix) {
        if self.keep_files {
            return;
        }
        match self.list(model, prefix).await {
            Ok(objects) => delete_all(&self.store, objects.into_iter().map(|o| o.location).collect()).await,
            Err(e) => {
                tracing::warn!(error = %e, prefix = %prefix.url, "could not list unloaded files to delete")
            }
        }
    }

    /// Streams the files' rows as `read.schema`, then checks the row count and deletes the files.
    pub fn read(&self, read: UnloadRead) -> SendableRecordBatchStream {
        let (tx, rx) = mpsc::channel(4);
        let schema = read.schema.clone();
        let store = self.store.clone();
        let source_name = self.source_name.clone();
        let keep_files = self.keep_files;
        tokio::spawn(async move {
            let mut delete: Vec<Path> = read.files.iter().map(|f| f.path.clone()).collect();
            delete.extend(read.also_delete.iter().cloned());
            let outcome = read_files(&store, &source_name, &read, &tx).await;
            if !keep_files {
                delete_all(&store, delete).await;
            }
            if let Err(e) = outcome {
                let _ = tx.send(Err(DataFusionError::External(Box::new(e)))).await;
            }
        });
        super::receiver_stream(schema, rx)
    }

    fn error(&self, model: &str, message: String) -> SourceError {
        SourceError::Query {
            model: model.to_string(),
            source_name: self.source_name.clone(),
            message,
            hint: Some("the unload location's `options` must let sluice list, read and delete there".into()),
        }
    }
}

/// Reads every file, `FILES_AT_ONCE` at a time, into `tx`; stops early when the receiver is gone.
async fn read_files(
    store: &Arc<dyn ObjectStore>,
    source_name: &str,
    read: &UnloadRead,
    tx: &mpsc::Sender<Result<RecordBatch, DataFusionError>>,
) -> Result<(), SourceError> {
    let error = |message: String| SourceError::Query {
        model: read.model.clone(),
        source_name: source_name.to_string(),
        message,
        hint: None,
    };
    // Owned pieces only: the pipeline is boxed as a 'static stream.
    let files = read.files.clone();
    let store = store.clone();
    let streams: BatchStream = futures::stream::iter(files.into_iter().map(move |file| {
        let store = store.clone();
        async move {
            let size = match file.size {
                Some(size) => size,
                None => {
                    store
                        .head(&file.path)
                        .await
                        .map_err(|e| format!("reading unloaded file {}: {e}", file.path))?
                        .size
                }
            };
            let reader = ObjectFileReader::new(store, file.path.clone(), size);
            let stream = ParquetRecordBatchStreamBuilder::new(reader)
                .await
                .map_err(|e| format!("reading unloaded file {}: {e}", file.path))?
                .with_batch_size(BATCH_ROWS)
                .build()
                .map_err(|e| format!("reading unloaded file {}: {e}", file.path))?;
            let path = file.path.clone();
            let batches: BatchStream = stream
                .map(move |batch| batch.map_err(|e| format!("reading unloaded file {path}: {e}")))
                .boxed();
            Ok::<_, String>(batches)
        }
    }))
    .buffer_unordered(FILES_AT_ONCE)
    .map(stream_or_error)
    .flatten_unordered(FILES_AT_ONCE)
    .boxed();
    futures::pin_mut!(streams);
    let mut rows: u64 = 0;
    while let Some(batch) = streams.next().await {
        let batch = batch.map_err(error)?;
        let batch = conform(&batch, &read.schema).map_err(error)?;
        rows += batch.num_rows() as u64;
        if tx.send(Ok(batch)).await.is_err() {
            return Ok(());
        }
    }
    if let Some(expected) = read.expected_rows
        && expected != rows
    {
        return Err(error(format!(
            "the warehouse reported {expected} rows unloaded, but its files hold {rows}"
        )));
    }
    Ok(())
}

/// Batches of one file or stream, errors as text for the caller to wrap.
pub(crate) type BatchStream = futures::stream::BoxStream<'static, Result<RecordBatch, String>>;

/// An opened stream, or one yielding why it could not be opened (for reading several at once
/// with `flatten_unordered`).
pub(crate) fn stream_or_error(opened: Result<BatchStream, String>) -> BatchStream {
    match opened {
        Ok(stream) => stream,
        Err(message) => futures::stream::once(async move { Err(message) }).boxed(),
    }
}

/// `batch` with the model's column names and types: columns are matched by position (the
/// warehouse writes them in the query's order, under names it may have changed the case of).
pub fn conform(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, String> {
    if batch.num_columns() != schema.fields().len() {
        return Err(format!(
            "the unloaded files have {} columns, the model has {}",
            batch.num_columns(),
            schema.fields().len()
        ));
    }
    let options = CastOptions {
        safe: false,
        ..Default::default()
    };
    let columns = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(column, field)| {
            if column.data_type() == field.data_type() {
                return Ok(column.clone());
            }
            // Records and arrays travel as JSON text (as the row protocols give them).
            if field.data_type() == &DataType::Utf8 && column.data_type().is_nested() {
                return nested_as_json(column).map_err(|e| format!("column `{}`: {e}", field.name()));
            }
            cast_with_options(column, field.data_type(), &options).map_err(|e| {
                format!(
                    "column `{}`: the unloaded {} cannot be read as {}: {e}",
                    field.name(),
                    column.data_type(),
                    field.data_type()
                )
            })
        })
        .collect::<Result<Vec<ArrayRef>, String>>()?;
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| e.to_string())
}

/// Each value of a struct, list or map column as JSON text (nulls inside kept as `null`).
fn nested_as_json(column: &ArrayRef) -> Result<ArrayRef, String> {
    let schema = Arc::new(Schema::new(vec![Field::new(
        "v",
        column.data_type().clone(),
        true,
    )]));
    let batch = RecordBatch::try_new(schema, vec![column.clone()]).map_err(|e| e.to_string())?;
    let mut text = Vec::new();
    let mut writer = arrow::json::WriterBuilder::new()
        .with_explicit_nulls(true)
        .build::<_, arrow::json::writer::LineDelimited>(&mut text);
    writer.write(&batch).map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())?;
    drop(writer);
    let text = String::from_utf8(text).map_err(|e| e.to_string())?;
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() != column.len() {
        return Err(format!("{} JSON lines for {} values", lines.len(), column.len()));
    }
    let values: Vec<Option<&str>> = lines
        .iter()
        .enumerate()
        .map(|(i, line)| {
            if column.is_null(i) {
                None
            } else {
                line.strip_prefix("{\"v\":").and_then(|l| l.strip_suffix('}'))
            }
        })
        .collect();
    Ok(Arc::new(StringArray::from(values)))
}

async fn delete_all(store: &Arc<dyn ObjectStore>, paths: Vec<Path>) {
    let deletions = futures::stream::iter(paths.into_iter().map(|path| {
        let store = store.clone();
        async move {
            match store.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => tracing::warn!(error = %e, file = %path, "could not delete an unloaded file"),
            }
        }
    }))
    .buffer_unordered(8);
    deletions.collect::<()>().await;
}

/// A string literal in SQL: single quotes doubled, and backslashes doubled for warehouses that
/// read backslash escapes in literals (Redshift, Snowflake).
pub fn quote_literal(text: &str, backslash_escapes: bool) -> String {
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('\'');
    for c in text.chars() {
        match c {
            '\'' => quoted.push_str("''"),
            '\\' if backslash_escapes => quoted.push_str("\\\\"),
            c => quoted.push(c),
        }
    }
    quoted.push('\'');
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int32Array, Int64Array, ListArray, StructArray};
    use arrow::datatypes::Int64Type;

    #[test]
    fn conform_casts_by_position_and_renames() {
        let file = RecordBatch::try_from_iter(vec![
            ("ID", Arc::new(Int32Array::from(vec![1, 2])) as ArrayRef),
            ("NAME", Arc::new(StringArray::from(vec!["a", "b"])) as ArrayRef),
        ])
        .unwrap();
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("name", DataType::Utf8, true),
        ]));
        let conformed = conform(&file, &schema).unwrap();
        assert_eq!(conformed.schema(), schema);
        assert_eq!(
            conformed
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .values(),
            &[1, 2]
        );
    }

    #[test]
    fn conform_names_the_column_it_cannot_cast() {
        let file = RecordBatch::try_from_iter(vec![(
            "x",
            Arc::new(StringArray::from(vec!["not a number"])) as ArrayRef,
        )])
        .unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new("amount", DataType::Int64, true)]));
        let error = conform(&file, &schema).unwrap_err();
        assert!(error.contains("column `amount`"), "{error}");
        let two = Arc::new(Schema::new(vec![
            Field::new("a", DataType::Utf8, true),
            Field::new("b", DataType::Utf8, true),
        ]));
        assert!(
            conform(&file, &two)
                .unwrap_err()
                .contains("1 columns, the model has 2")
        );
    }

    #[test]
    fn records_and_arrays_become_json_text() {
        let tags = ListArray::from_iter_primitive::<Int64Type, _, _>(vec![Some(vec![Some(1), None]), None]);
        let address = StructArray::from(vec![
            (
                Arc::new(Field::new("city", DataType::Utf8, true)),
                Arc::new(StringArray::from(vec![Some("Paris"), None])) as ArrayRef,
            ),
            (
                Arc::new(Field::new("zip", DataType::Int64, true)),
                Arc::new(Int64Array::from(vec![75001, 1])) as ArrayRef,
            ),
        ]);
        let file = RecordBatch::try_from_iter(vec![
            ("tags", Arc::new(tags) as ArrayRef),
            ("address", Arc::new(address) as ArrayRef),
        ])
        .unwrap();
        let schema = Arc::new(Schema::new(vec![
            Field::new("tags", DataType::Utf8, true),
            Field::new("address", DataType::Utf8, true),
        ]));
        let conformed = conform(&file, &schema).unwrap();
        let tags = conformed
            .column(0)
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        assert_eq!(tags.value(0), "[1,null]");
        assert!(tags.is_null(1));
        let address = conformed
            .column(1)
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        assert_eq!(address.value(0), r#"{"city":"Paris","zip":75001}"#);
        assert_eq!(address.value(1), r#"{"city":null,"zip":1}"#);
    }

    #[test]
    fn literals_are_quoted_for_each_dialect() {
        assert_eq!(quote_literal(r"it's a\b", true), r"'it''s a\\b'");
        assert_eq!(quote_literal(r"it's a\b", false), r"'it''s a\b'");
    }

    #[tokio::test]
    async fn prefixes_are_fresh_and_files_must_lie_under_the_location() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/unload", dir.path().display());
        let location = UnloadLocation::open("wh", &url, &IndexMap::new(), false).unwrap();
        let a = location.fresh_prefix("daily users");
        let b = location.fresh_prefix("daily users");
        assert_ne!(a.url, b.url);
        assert!(a.url.starts_with(&format!("{url}/daily_users/")), "{}", a.url);
        assert!(a.url.ends_with('/'));
        let file = format!("{}0000_part_00.parquet", a.url);
        assert_eq!(
            location.path_of(&file).unwrap().to_string(),
            format!("{}/0000_part_00.parquet", a.path)
        );
        assert!(location.path_of("file:///elsewhere/x.parquet").is_err());
    }
}
