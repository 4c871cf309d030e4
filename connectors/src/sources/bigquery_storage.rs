//! The BigQuery Storage Read API (gRPC, `google.cloud.bigquery.storage.v1.BigQueryRead`): a
//! finished query's result table read as Arrow record batches over several streams at once.
//!
//! Only the messages and fields sluice uses are declared here (prost derives, field numbers as
//! in Google's `storage.proto`, `stream.proto` and `arrow.proto`); a `oneof` member is encoded
//! on the wire as the optional field it is.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::buffer::Buffer;
use arrow::datatypes::SchemaRef;
use arrow::ipc::reader::StreamDecoder;
use bytes::Bytes;
use futures::StreamExt;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use url::Url;

use super::unload::BatchStream;

pub const SERVICE: &str = "google.cloud.bigquery.storage.v1.BigQueryRead";
const CREATE_READ_SESSION: &str = "/google.cloud.bigquery.storage.v1.BigQueryRead/CreateReadSession";
const READ_ROWS: &str = "/google.cloud.bigquery.storage.v1.BigQueryRead/ReadRows";
/// `DataFormat.ARROW`.
pub const ARROW: i32 = 2;

#[derive(Clone, PartialEq, prost::Message)]
pub struct CreateReadSessionRequest {
    /// `projects/{project}`: who owns (and pays for) the session.
    #[prost(string, tag = "1")]
    pub parent: String,
    #[prost(message, optional, tag = "2")]
    pub read_session: Option<ReadSession>,
    #[prost(int32, tag = "3")]
    pub max_stream_count: i32,
    #[prost(int32, tag = "4")]
    pub preferred_min_stream_count: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ReadSession {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(int32, tag = "3")]
    pub data_format: i32,
    #[prost(message, optional, tag = "5")]
    pub arrow_schema: Option<ArrowSchema>,
    /// `projects/{project}/datasets/{dataset}/tables/{table}`.
    #[prost(string, tag = "6")]
    pub table: String,
    #[prost(message, repeated, tag = "10")]
    pub streams: Vec<ReadStream>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ArrowSchema {
    /// An encapsulated IPC schema message.
    #[prost(bytes = "bytes", tag = "1")]
    pub serialized_schema: Bytes,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ReadStream {
    #[prost(string, tag = "1")]
    pub name: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ReadRowsRequest {
    #[prost(string, tag = "1")]
    pub read_stream: String,
    #[prost(int64, tag = "2")]
    pub offset: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ReadRowsResponse {
    #[prost(message, optional, tag = "4")]
    pub arrow_record_batch: Option<ArrowRecordBatch>,
    #[prost(int64, tag = "6")]
    pub row_count: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ArrowRecordBatch {
    /// An encapsulated IPC record batch message (the schema comes with the session).
    #[prost(bytes = "bytes", tag = "1")]
    pub serialized_record_batch: Bytes,
    #[prost(int64, tag = "2")]
    pub row_count: i64,
}

/// A refusal, with the gRPC code for the caller to decide (a permission refused falls back).
#[derive(Debug)]
pub struct StorageError {
    pub code: tonic::Code,
    pub message: String,
}

impl std::fmt::Display for StorageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the Storage Read API: {} ({:?})", self.message, self.code)
    }
}

impl From<tonic::Status> for StorageError {
    fn from(status: tonic::Status) -> Self {
        Self {
            code: status.code(),
            message: status.message().to_string(),
        }
    }
}

fn transport_error(message: String) -> StorageError {
    StorageError {
        code: tonic::Code::Unavailable,
        message,
    }
}

/// A Storage Read API client on one HTTP/2 connection (streams are multiplexed on it).
#[derive(Clone)]
pub struct StorageClient {
    channel: Channel,
}

impl StorageClient {
    /// A client of the API at `endpoint` (`https://bigquerystorage.googleapis.com`), connected
    /// on first use.
    pub fn new(endpoint: &Url) -> Result<Self, String> {
        let mut builder = Endpoint::from_shared(endpoint.as_str().trim_end_matches('/').to_string())
            .map_err(|e| format!("`storage_url` `{endpoint}`: {e}"))?
            .connect_timeout(std::time::Duration::from_secs(10))
            .http2_adaptive_window(true);
        if endpoint.scheme() == "https" {
            builder = builder
                .tls_config(ClientTlsConfig::new().with_webpki_roots())
                .map_err(|e| format!("TLS for `{endpoint}`: {e}"))?;
        }
        Ok(Self {
            channel: builder.connect_lazy(),
        })
    }

    fn request<T>(message: T, token: &str, routing: &str) -> Result<tonic::Request<T>, StorageError> {
        let mut request = tonic::Request::new(message);
        let bearer = MetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|e| transport_error(format!("an access token that is not a header value: {e}")))?;
        let params = MetadataValue::try_from(routing)
            .map_err(|e| transport_error(format!("a routing header that is not a header value: {e}")))?;
        request.metadata_mut().insert("authorization", bearer);
        // Google routes by the resource the call is about.
        request.metadata_mut().insert("x-goog-request-params", params);
        Ok(request)
    }

    /// Opens a read session on `table` (`projects/p/datasets/d/tables/t`) in Arrow, with at
    /// most `streams` streams, billed to `project`.
    pub async fn create_session(
        &self,
        token: &str,
        project: &str,
        table: &str,
        streams: i32,
    ) -> Result<ReadSession, StorageError> {
        let message = CreateReadSessionRequest {
            parent: format!("projects/{project}"),
            read_session: Some(ReadSession {
                table: table.to_string(),
                data_format: ARROW,
                ..Default::default()
            }),
            max_stream_count: streams,
            preferred_min_stream_count: 0,
        };
        let request = Self::request(message, token, &format!("read_session.table={table}"))?;
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready()
            .await
            .map_err(|e| transport_error(format!("connecting: {e}")))?;
        let response = grpc
            .unary(
                request,
                PathAndQuery::from_static(CREATE_READ_SESSION),
                tonic_prost::ProstCodec::<CreateReadSessionRequest, ReadSession>::default(),
            )
            .await?;
        Ok(response.into_inner())
    }

    /// The record batches of one stream, decoded with the session's schema and cast to
    /// `schema`; the stream ends after its last batch.
    pub async fn read_stream(
        &self,
        token: &str,
        stream: &str,
        session_schema: Bytes,
        schema: SchemaRef,
    ) -> Result<BatchStream, StorageError> {
        let request = Self::request(
            ReadRowsRequest {
                read_stream: stream.to_string(),
                offset: 0,
            },
            token,
            &format!("read_stream={stream}"),
        )?;
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready()
            .await
            .map_err(|e| transport_error(format!("connecting: {e}")))?;
        let responses = grpc
            .server_streaming(
                request,
                PathAndQuery::from_static(READ_ROWS),
                tonic_prost::ProstCodec::<ReadRowsRequest, ReadRowsResponse>::default(),
            )
            .await?
            .into_inner();
        let mut decoder = StreamDecoder::new();
        let mut schema_message = Buffer::from(session_schema);
        decoder
            .decode(&mut schema_message)
            .map_err(|e| transport_error(format!("the session's Arrow schema does not decode: {e}")))?;
        let decoder = Arc::new(std::sync::Mutex::new(decoder));
        Ok(responses
            .filter_map(move |response| {
                let decoder = decoder.clone();
                let schema = schema.clone();
                async move {
                    let response = match response {
                        Ok(response) => response,
                        Err(status) => return Some(Err(StorageError::from(status).to_string())),
                    };
                    let batch = response.arrow_record_batch?;
                    let expected = response.row_count.max(batch.row_count);
                    Some(decode_batch(
                        &decoder,
                        batch.serialized_record_batch,
                        expected,
                        &schema,
                    ))
                }
            })
            .boxed())
    }
}

/// One serialized batch through the stream's decoder, checked against its row count and cast
/// to the model's schema.
fn decode_batch(
    decoder: &std::sync::Mutex<StreamDecoder>,
    bytes: Bytes,
    expected_rows: i64,
    schema: &SchemaRef,
) -> Result<RecordBatch, String> {
    let mut buffer = Buffer::from(bytes);
    let mut decoder = decoder
        .lock()
        .map_err(|_| "a stream decoder was poisoned".to_string())?;
    let mut decoded = None;
    while !buffer.is_empty() {
        if let Some(batch) = decoder
            .decode(&mut buffer)
            .map_err(|e| format!("a record batch from the Storage Read API does not decode: {e}"))?
        {
            decoded = Some(batch);
        }
    }
    let batch = decoded.ok_or("a Storage Read API response held no whole record batch")?;
    if expected_rows > 0 && batch.num_rows() as i64 != expected_rows {
        return Err(format!(
            "a Storage Read API response announced {expected_rows} rows but held {}",
            batch.num_rows()
        ));
    }
    super::unload::conform(&batch, schema)
}
