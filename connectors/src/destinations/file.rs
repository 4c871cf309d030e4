//! `type: file`: each run's records written as one JSONL, CSV or Parquet file, on a local
//! directory or any object_store URL.
//!
//! ```yaml
//! destinations:
//!   exports:
//!     type: file
//!     url: exports/              # or s3://bucket/prefix, gs://…, az://…
//!     format: jsonl              # jsonl (default), csv or parquet
//! ```
//!
//! A run writes `<url>/<mapping>/<UTC start time>-<run id>.<ext>` and nothing when it has no
//! records. The file appears only when the run's delivery completes (an object store upload is
//! completed, a local file renamed into place). JSONL lines are sluice's envelope
//! (`{"op":…,"message_id":…,"key":{…},"data":{…}}`); CSV and Parquet have the columns `_op`,
//! `_message_id`, `_key` (the key as JSON) and then the mapped fields, dotted names kept as
//! column names; nested values become JSON text in CSV.

use std::ops::Range;
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use indexmap::IndexMap;
use object_store::buffered::BufWriter;
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;
use schemars::JsonSchema;
use serde::Deserialize;
use sluice_engine::destination::{
    DeliveryPolicy, Destination, DestinationWriter, OutgoingBatch, Payload, PreparedRequest, RetryPolicy,
    RunInfo, SendOutcome,
};
use sluice_engine::json::encode_column;
use sluice_engine::source::ConnectorEnv;
use sluice_engine::{ConfigString, DestinationError};
use sluice_snapshots::SnapshotStore;
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use crate::parquet_writer::ParallelParquetWriter;

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Directory or object_store URL the files go under.
    #[serde(alias = "path")]
    pub url: ConfigString,
    /// File format: `jsonl` (default), `csv` or `parquet`.
    #[serde(default)]
    pub format: FileFormat,
    /// Compression of a Parquet file's pages: `snappy` (default: every Parquet reader has
    /// it), `lz4` (LZ4_RAW: the fastest to write; older readers may lack it), `zstd` (level 1,
    /// usually the smallest) or `none`. Only for `format: parquet`.
    #[serde(default)]
    pub compression: Option<ParquetCompression>,
    /// Options for the object_store builder (credentials, region, endpoint).
    #[serde(default)]
    pub options: IndexMap<String, ConfigString>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    #[default]
    #[serde(alias = "ndjson", alias = "json")]
    Jsonl,
    Csv,
    Parquet,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ParquetCompression {
    #[default]
    Snappy,
    Lz4,
    Zstd,
    #[serde(alias = "uncompressed")]
    None,
}

impl ParquetCompression {
    fn codec(self) -> parquet::basic::Compression {
        match self {
            ParquetCompression::Snappy => parquet::basic::Compression::SNAPPY,
            ParquetCompression::Lz4 => parquet::basic::Compression::LZ4_RAW,
            // Level 1: zstd's fast end, usually still smaller than Snappy's.
            ParquetCompression::Zstd => {
                parquet::basic::Compression::ZSTD(parquet::basic::ZstdLevel::default())
            }
            ParquetCompression::None => parquet::basic::Compression::UNCOMPRESSED,
        }
    }
}

impl FileFormat {
    fn extension(self) -> &'static str {
        match self {
            FileFormat::Jsonl => "jsonl",
            FileFormat::Csv => "csv",
            FileFormat::Parquet => "parquet",
        }
    }
}

pub struct FileDestination {
    name: String,
    store: SnapshotStore,
    format: FileFormat,
    compression: ParquetCompression,
}

impl FileDestination {
    pub fn new(name: &str, config: FileConfig, env: &ConnectorEnv) -> Result<Self, String> {
        let options = config
            .options
            .iter()
            .map(|(k, v)| (k.clone(), v.expose().to_string()));
        if config.compression.is_some() && config.format != FileFormat::Parquet {
            return Err(format!(
                "`compression` applies to Parquet files only; destination `{name}` writes {}",
                config.format.extension()
            ));
        }
        let store =
            SnapshotStore::open(config.url.expose(), &env.base_dir, options).map_err(|e| e.to_string())?;
        Ok(Self {
            name: name.to_string(),
            store,
            format: config.format,
            compression: config.compression.unwrap_or_default(),
        })
    }
}

#[async_trait]
impl Destination for FileDestination {
    fn kind(&self) -> &'static str {
        "file"
    }

    async fn check(&self) -> Result<(), DestinationError> {
        let probe = format!(".sluice-check-{}", uuid_like());
        self.store
            .put(&probe, bytes::Bytes::from_static(b"ok"))
            .await
            .and(self.store.delete(&probe).await)
            .map_err(|e| DestinationError::Unreachable {
                destination: self.name.clone(),
                message: e.to_string(),
            })
    }

    /// Its files become visible only once complete (see [`FileWriter`]).
    fn acknowledges_at_finish(&self) -> bool {
        true
    }

    async fn open(&self, run: &RunInfo) -> Result<Box<dyn DestinationWriter>, DestinationError> {
        let relative = format!(
            "{}/{}-{}.{}",
            run.mapping,
            run.started_at.format("%Y%m%dT%H%M%SZ"),
            run.run_id,
            self.format.extension()
        );
        Ok(Box::new(FileWriter {
            destination: self.name.clone(),
            store: self.store.clone(),
            relative,
            format: self.format,
            compression: self.compression,
            sink: Mutex::new(None),
        }))
    }
}

fn uuid_like() -> String {
    format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    )
}

enum Sink {
    Jsonl(BufWriter),
    Csv { writer: BufWriter, header_written: bool },
    Parquet(Box<ParquetSink>),
}

/// A Parquet file being written. Encoding is the CPU-heavy part of a file destination's run:
/// it happens on blocking threads, a column per task, so the run's task goes on reading and
/// preparing the next batch meanwhile (encoded inline, it held that task and a run's delivery
/// used one core); the bytes it produces are streamed to the store as row groups complete.
struct ParquetSink {
    /// `None` only while a batch is being encoded.
    encoder: Option<ParallelParquetWriter<EncodedBytes>>,
    encoded: EncodedBytes,
    out: BufWriter,
    schema: SchemaRef,
}

/// Rows per row group of a Parquet file the destination writes.
const PARQUET_ROW_GROUP_ROWS: usize = 256 * 1024;
/// The dictionary page size past which a column chunk falls back to plain encoding.
const DICTIONARY_PAGE_BYTES: usize = 64 * 1024;

/// Bytes the encoder has written and the store has not yet received.
#[derive(Clone, Default)]
struct EncodedBytes(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for EncodedBytes {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("a Parquet encoder stopped mid-write"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ParquetSink {
    fn new(out: BufWriter, schema: SchemaRef, compression: ParquetCompression) -> Result<Self, String> {
        let encoded = EncodedBytes::default();
        // A row group is held in memory until it is complete: 256K rows kept a 10M-row run's
        // peak under 1 GiB where the default 1M rows went over, for about 0.3 s more encoding.
        let properties = WriterProperties::builder()
            // Compressed pages cost CPU, uncompressed ones page-cache writes: on the benchmark's
            // machine a 10M-row first sync took 10.4-10.7 s with Snappy (683 MB), 10.0-10.2 s
            // with LZ4 (693 MB) and 10.8 s uncompressed (1,146 MB; BENCHMARKS.md).
            .set_compression(compression.codec())
            .set_max_row_group_row_count(Some(PARQUET_ROW_GROUP_ROWS))
            // A column of mostly distinct values (ids, emails, timestamps) gives up on its
            // dictionary after 64 KiB of them instead of 1 MiB: building and dropping
            // dictionaries was 9% of a 10M-row first sync's delivery.
            .set_dictionary_page_size_limit(DICTIONARY_PAGE_BYTES)
            // A record's message id and key are unique: a dictionary would only be built to be
            // dropped once it outgrew its page.
            .set_column_dictionary_enabled(ColumnPath::from("_message_id"), false)
            .set_column_dictionary_enabled(ColumnPath::from("_key"), false)
            .build();
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let encoder = ParallelParquetWriter::try_new(encoded.clone(), schema.clone(), properties, threads)
            .map_err(|e| e.to_string())?;
        Ok(Self {
            encoder: Some(encoder),
            encoded,
            out,
            schema,
        })
    }

    async fn write(&mut self, rows: RecordBatch) -> Result<(), String> {
        let mut encoder = self.encoder.take().ok_or("the file was already completed")?;
        let (encoder, written) = tokio::task::spawn_blocking(move || {
            let written = encoder.write(&rows);
            (encoder, written)
        })
        .await
        .map_err(|e| format!("encoding Parquet stopped: {e}"))?;
        self.encoder = Some(encoder);
        written.map_err(|e| e.to_string())?;
        self.send_encoded().await
    }

    async fn send_encoded(&mut self) -> Result<(), String> {
        let bytes = std::mem::take(
            &mut *self
                .encoded
                .0
                .lock()
                .map_err(|_| "a Parquet encoder stopped mid-write".to_string())?,
        );
        if bytes.is_empty() {
            return Ok(());
        }
        self.out.write_all(&bytes).await.map_err(|e| e.to_string())
    }

    async fn finish(mut self) -> Result<(), String> {
        let encoder = self.encoder.take().ok_or("the file was already completed")?;
        tokio::task::spawn_blocking(move || encoder.close())
            .await
            .map_err(|e| format!("encoding Parquet stopped: {e}"))?
            .map_err(|e| e.to_string())?;
        self.send_encoded().await?;
        self.out.shutdown().await.map_err(|e| e.to_string())
    }
}

struct FileWriter {
    destination: String,
    store: SnapshotStore,
    relative: String,
    format: FileFormat,
    compression: ParquetCompression,
    sink: Mutex<Option<Sink>>,
}

impl FileWriter {
    fn buf_writer(&self) -> BufWriter {
        BufWriter::new(self.store.object_store(), self.store.path(&self.relative))
    }

    async fn write(&self, batch: &OutgoingBatch, range: Range<usize>) -> Result<(), String> {
        let mut guard = self.sink.lock().await;
        match self.format {
            FileFormat::Jsonl => {
                let mut out = Vec::with_capacity(batch.approximate_bytes(range.clone()));
                for record in batch.records(range) {
                    record.write_envelope(&mut out);
                    out.push(b'\n');
                }
                let sink = guard.get_or_insert_with(|| Sink::Jsonl(self.buf_writer()));
                let Sink::Jsonl(writer) = sink else {
                    return Err("internal: sink of another format".into());
                };
                writer.write_all(&out).await.map_err(|e| e.to_string())
            }
            FileFormat::Csv => {
                let rows = columns_of(batch, range, true)?;
                let sink = guard.get_or_insert_with(|| Sink::Csv {
                    writer: self.buf_writer(),
                    header_written: false,
                });
                let Sink::Csv {
                    writer,
                    header_written,
                } = sink
                else {
                    return Err("internal: sink of another format".into());
                };
                let mut out = Vec::new();
                {
                    let mut csv = arrow::csv::WriterBuilder::new()
                        .with_header(!*header_written)
                        .build(&mut out);
                    csv.write(&rows).map_err(|e| e.to_string())?;
                }
                *header_written = true;
                writer.write_all(&out).await.map_err(|e| e.to_string())
            }
            FileFormat::Parquet => {
                let rows = columns_of(batch, range, false)?;
                if guard.is_none() {
                    let sink = ParquetSink::new(self.buf_writer(), rows.schema(), self.compression)?;
                    *guard = Some(Sink::Parquet(Box::new(sink)));
                }
                let Some(Sink::Parquet(sink)) = guard.as_mut() else {
                    return Err("internal: sink of another format".into());
                };
                // Later batches (deleted rows of an older snapshot, say) take the file's types.
                let rows = conform(&rows, &sink.schema)?;
                sink.write(rows).await
            }
        }
    }
}

#[async_trait]
impl DestinationWriter for FileWriter {
    fn policy(&self) -> DeliveryPolicy {
        // One writer, in order; a batch is written whole.
        DeliveryPolicy {
            max_records: 8192,
            max_bytes: usize::MAX,
            concurrency: 1,
            retry: RetryPolicy {
                max_attempts: 1,
                ..RetryPolicy::default()
            },
            ..DeliveryPolicy::default()
        }
    }

    /// The file becomes visible only once complete: a run cut short delivered nothing.
    fn acknowledges_at_finish(&self) -> bool {
        true
    }

    fn payload(&self) -> Payload {
        // CSV and Parquet hold the mapped fields as columns; JSON lines the records' bodies.
        match self.format {
            FileFormat::Jsonl => Payload::Json,
            FileFormat::Csv | FileFormat::Parquet => Payload::Columns,
        }
    }

    async fn prepare(&self, batch: &OutgoingBatch, range: Range<usize>) -> Vec<PreparedRequest> {
        let body = match self.format {
            FileFormat::Jsonl => {
                let mut out = Vec::new();
                for record in batch.records(range.clone()) {
                    record.write_envelope(&mut out);
                    out.push(b'\n');
                }
                serde_json::Value::String(String::from_utf8_lossy(&out).into_owned())
            }
            FileFormat::Csv | FileFormat::Parquet => match columns_of(batch, range.clone(), true) {
                Ok(rows) => {
                    let mut out = Vec::new();
                    let written = {
                        let mut writer = arrow::json::ArrayWriter::new(&mut out);
                        writer.write(&rows).and_then(|_| writer.finish())
                    };
                    match written {
                        Ok(()) => serde_json::from_slice(&out).unwrap_or(serde_json::Value::Null),
                        Err(e) => serde_json::Value::String(e.to_string()),
                    }
                }
                Err(e) => serde_json::Value::String(e),
            },
        };
        vec![PreparedRequest {
            method: "WRITE".into(),
            target: self.store.path(&self.relative).to_string(),
            records: range.len(),
            body,
        }]
    }

    async fn send(&self, batch: &OutgoingBatch, range: Range<usize>) -> SendOutcome {
        match self.write(batch, range).await {
            Ok(()) => SendOutcome::Accepted,
            Err(reason) => SendOutcome::Rejected {
                reason: format!("writing {}: {reason}", self.relative),
            },
        }
    }

    async fn finish(self: Box<Self>) -> Result<(), DestinationError> {
        let failed = |e: String| DestinationError::Storage {
            destination: self.destination.clone(),
            message: format!("completing {}: {e}", self.relative),
        };
        match self.sink.into_inner() {
            None => Ok(()),
            Some(Sink::Jsonl(mut writer)) | Some(Sink::Csv { mut writer, .. }) => {
                writer.shutdown().await.map_err(|e| failed(e.to_string()))
            }
            Some(Sink::Parquet(sink)) => sink.finish().await.map_err(failed),
        }
    }

    async fn abort(self: Box<Self>) {
        let result = match self.sink.into_inner() {
            None => Ok(()),
            Some(Sink::Jsonl(mut writer)) | Some(Sink::Csv { mut writer, .. }) => writer.abort().await,
            Some(Sink::Parquet(mut sink)) => sink.out.abort().await,
        };
        if let Err(e) = result {
            tracing::warn!(file = self.relative, error = %e, "could not abandon a partly written file");
        }
    }
}

/// `_op`, `_message_id`, `_key` and the mapped fields of records `range`. With `flatten_nested`,
/// lists, structs and maps become JSON text (CSV has no nested values).
fn columns_of(
    batch: &OutgoingBatch,
    range: Range<usize>,
    flatten_nested: bool,
) -> Result<RecordBatch, String> {
    let ops = StringArray::from_iter_values(batch.ops[range.clone()].iter().map(|op| op.as_str()));
    let ids = StringArray::from_iter_values(batch.message_ids[range.clone()].iter().map(|id| id.as_str()));
    let keys =
        StringArray::from_iter_values(range.clone().map(|i| String::from_utf8_lossy(batch.keys.get(i))));
    let mut fields = vec![
        Field::new("_op", DataType::Utf8, false),
        Field::new("_message_id", DataType::Utf8, false),
        Field::new("_key", DataType::Utf8, false),
    ];
    let mut columns: Vec<ArrayRef> = vec![Arc::new(ops), Arc::new(ids), Arc::new(keys)];
    let mapped = batch.fields.slice(range.start, range.len());
    for (field, column) in mapped.schema().fields().iter().zip(mapped.columns()) {
        let nested = matches!(
            field.data_type(),
            DataType::List(_)
                | DataType::LargeList(_)
                | DataType::FixedSizeList(_, _)
                | DataType::Struct(_)
                | DataType::Map(_, _)
        );
        if flatten_nested && nested {
            let json = encode_column(column).map_err(|e| e.to_string())?;
            let text = StringArray::from_iter((0..json.len()).map(|i| {
                let value = json.get(i);
                (value != b"null").then(|| String::from_utf8_lossy(value).into_owned())
            }));
            fields.push(Field::new(field.name(), DataType::Utf8, true));
            columns.push(Arc::new(text));
        } else {
            fields.push(Field::new(field.name(), column.data_type().clone(), true));
            columns.push(column.clone());
        }
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).map_err(|e| e.to_string())
}

/// Casts `rows` to `schema` (same column names in the same order).
fn conform(rows: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, String> {
    if rows.schema().fields() == schema.fields() {
        return Ok(rows.clone());
    }
    if rows.num_columns() != schema.fields().len() {
        return Err("the mapped fields changed within a run".into());
    }
    let columns = rows
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(column, field)| {
            arrow::compute::cast(column, field.data_type())
                .map_err(|e| format!("column `{}`: {e}", field.name()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: serde_json::Value) -> FileConfig {
        serde_json::from_value(json).expect("a file destination's config")
    }

    #[test]
    fn parquet_pages_are_snappy_unless_the_config_names_another_codec() {
        let dir = tempfile::tempdir().expect("dir");
        let env = ConnectorEnv::rooted_at(dir.path());
        let parquet = |compression: Option<&str>| {
            let mut json = serde_json::json!({"url": "exports", "format": "parquet"});
            if let Some(name) = compression {
                json["compression"] = name.into();
            }
            config(json)
        };
        let default = FileDestination::new("out", parquet(None), &env).expect("valid");
        assert_eq!(default.compression.codec(), parquet::basic::Compression::SNAPPY);
        for (name, codec) in [
            ("lz4", parquet::basic::Compression::LZ4_RAW),
            ("none", parquet::basic::Compression::UNCOMPRESSED),
            ("uncompressed", parquet::basic::Compression::UNCOMPRESSED),
        ] {
            let destination = FileDestination::new("out", parquet(Some(name)), &env).expect("valid");
            assert_eq!(destination.compression.codec(), codec, "{name}");
        }
        let zstd = FileDestination::new("out", parquet(Some("zstd")), &env).expect("valid");
        assert!(matches!(
            zstd.compression.codec(),
            parquet::basic::Compression::ZSTD(_)
        ));
    }

    #[test]
    fn compression_is_refused_for_formats_other_than_parquet() {
        let dir = tempfile::tempdir().expect("dir");
        let env = ConnectorEnv::rooted_at(dir.path());
        let jsonl = config(serde_json::json!({"url": "exports", "compression": "zstd"}));
        let error = FileDestination::new("out", jsonl, &env).err().expect("refused");
        assert!(
            error.contains("Parquet files only") && error.contains("`out`"),
            "{error}"
        );
        let unknown = serde_json::json!({"url": "x", "format": "parquet", "compression": "brotli"});
        assert!(serde_json::from_value::<FileConfig>(unknown).is_err());
    }
}
