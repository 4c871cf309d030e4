//! Arrow record batches as JSON, CSV and Arrow IPC bytes, a batch at a time (so a large
//! result streams in bounded memory).

use serde_json::Value;
use sluice_engine::arrow;
use sluice_engine::arrow::array::RecordBatch;

/// Rows as JSON objects (nulls written out).
pub fn to_json_rows(batches: &[RecordBatch]) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    for batch in batches {
        let mut writer = arrow::json::WriterBuilder::new()
            .with_explicit_nulls(true)
            .build::<_, arrow::json::writer::JsonArray>(Vec::new());
        writer.write(batch).map_err(|e| e.to_string())?;
        writer.finish().map_err(|e| e.to_string())?;
        let bytes = writer.into_inner();
        if bytes.is_empty() {
            continue;
        }
        match serde_json::from_slice::<Value>(&bytes).map_err(|e| e.to_string())? {
            Value::Array(rows) => out.extend(rows),
            other => out.push(other),
        }
    }
    Ok(out)
}

/// How query results are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line (`application/x-ndjson`).
    JsonLines,
    /// CSV with a header line (`text/csv`).
    Csv,
    /// The Arrow IPC stream format (`application/vnd.apache.arrow.stream`).
    Arrow,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::JsonLines => "application/x-ndjson",
            Format::Csv => "text/csv; charset=utf-8",
            Format::Arrow => "application/vnd.apache.arrow.stream",
        }
    }
}

/// Writes batches in one format, each batch's bytes as they are ready.
pub enum Encoder {
    JsonLines,
    Csv { header: bool },
    Arrow(Box<arrow::ipc::writer::StreamWriter<Vec<u8>>>),
}

impl Encoder {
    pub fn new(format: Format, schema: &arrow::datatypes::Schema) -> Result<Self, String> {
        Ok(match format {
            Format::JsonLines => Encoder::JsonLines,
            Format::Csv => Encoder::Csv { header: true },
            Format::Arrow => Encoder::Arrow(Box::new(
                arrow::ipc::writer::StreamWriter::try_new(Vec::new(), schema).map_err(|e| e.to_string())?,
            )),
        })
    }

    /// The bytes of one batch (for Arrow, the schema message comes with the first).
    pub fn batch(&mut self, batch: &RecordBatch) -> Result<Vec<u8>, String> {
        match self {
            Encoder::JsonLines => {
                let mut writer = arrow::json::WriterBuilder::new()
                    .with_explicit_nulls(true)
                    .build::<_, arrow::json::writer::LineDelimited>(Vec::new());
                writer.write(batch).map_err(|e| e.to_string())?;
                writer.finish().map_err(|e| e.to_string())?;
                Ok(writer.into_inner())
            }
            Encoder::Csv { header } => {
                let mut writer = arrow::csv::WriterBuilder::new()
                    .with_header(*header)
                    .build(Vec::new());
                writer.write(batch).map_err(|e| e.to_string())?;
                *header = false;
                Ok(writer.into_inner())
            }
            Encoder::Arrow(writer) => {
                writer.write(batch).map_err(|e| e.to_string())?;
                Ok(std::mem::take(writer.get_mut()))
            }
        }
    }

    /// What ends the stream (the Arrow end-of-stream marker; a CSV header when no batch came).
    pub fn finish(&mut self, schema: &arrow::datatypes::Schema) -> Result<Vec<u8>, String> {
        match self {
            Encoder::JsonLines => Ok(Vec::new()),
            Encoder::Csv { header: true } => {
                let empty = RecordBatch::new_empty(std::sync::Arc::new(schema.clone()));
                self.batch(&empty)
            }
            Encoder::Csv { .. } => Ok(Vec::new()),
            Encoder::Arrow(writer) => {
                writer.finish().map_err(|e| e.to_string())?;
                Ok(std::mem::take(writer.get_mut()))
            }
        }
    }
}
