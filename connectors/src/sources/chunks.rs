//! Result chunks on cloud storage: warehouses (Snowflake, Databricks) answer a large query with
//! presigned URLs to the parts of its result. They are downloaded without the warehouse's
//! credentials (a presigned URL carries its own), with the headers the warehouse names,
//! retried on network errors, 429 and 5xx, and gunzipped when the body is gzip without saying so.

use std::io::Read;
use std::time::Duration;

use bytes::Bytes;

use crate::destinations::http::{describe_reqwest_error, snippet};

/// Attempts of one chunk download.
const ATTEMPTS: u32 = 5;

/// Downloads one chunk. The error says what failed, for the caller to name the chunk.
pub async fn download(
    http: &reqwest::Client,
    url: &str,
    headers: &[(String, String)],
) -> Result<Bytes, String> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut request = http.get(url);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let failure = match request.send().await {
            Ok(response) if response.status().is_success() => match response.bytes().await {
                Ok(bytes) => return gunzip_if_needed(bytes),
                Err(e) => describe_reqwest_error(&e),
            },
            Ok(response) => {
                let status = response.status();
                let text = response.text().await.unwrap_or_default();
                let message = format!("HTTP {status}{}", snippet(&text));
                if status.is_client_error() && status.as_u16() != 429 {
                    return Err(format!("{message} (its presigned URL may have expired)"));
                }
                message
            }
            Err(e) => describe_reqwest_error(&e),
        };
        if attempt >= ATTEMPTS {
            return Err(format!("{failure} (after {attempt} attempts)"));
        }
        tracing::debug!(
            attempt,
            error = failure,
            "downloading a result chunk failed; retrying"
        );
        tokio::time::sleep(Duration::from_millis(200 * 2u64.pow(attempt))).await;
    }
}

fn gunzip_if_needed(bytes: Bytes) -> Result<Bytes, String> {
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return Ok(bytes);
    }
    let mut out = Vec::with_capacity(bytes.len() * 4);
    flate2::read::MultiGzDecoder::new(bytes.as_ref())
        .read_to_end(&mut out)
        .map_err(|e| format!("the chunk is not valid gzip: {e}"))?;
    Ok(out.into())
}

/// Arrow IPC stream bytes into record batches, each column passed through `convert`.
pub fn decode_arrow_stream(
    bytes: &[u8],
    schema: &arrow::datatypes::SchemaRef,
    convert: impl Fn(usize, &arrow::array::ArrayRef) -> Result<arrow::array::ArrayRef, String>,
) -> Result<Vec<arrow::array::RecordBatch>, String> {
    let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
        .map_err(|e| format!("a result part is not an Arrow stream: {e}"))?;
    let mut batches = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| format!("reading a result part: {e}"))?;
        if batch.num_columns() != schema.fields().len() {
            return Err(format!(
                "a result part has {} columns, the query {}",
                batch.num_columns(),
                schema.fields().len()
            ));
        }
        let columns = batch
            .columns()
            .iter()
            .enumerate()
            .map(|(i, array)| {
                convert(i, array).map_err(|e| format!("column `{}`: {e}", schema.field(i).name()))
            })
            .collect::<Result<Vec<_>, String>>()?;
        batches.push(arrow::array::RecordBatch::try_new(schema.clone(), columns).map_err(|e| e.to_string())?);
    }
    Ok(batches)
}
