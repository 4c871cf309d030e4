//! `POST /api/v1/query`: SQL over snapshot history (the engine's read-only query, as `sluice
//! query` runs it), streamed back a batch at a time as JSON lines, CSV or Arrow IPC.

use std::time::Duration;

use axum::Extension;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;
use sluice_engine::query::{HistoryTable, QueryLimits};
use utoipa::ToSchema;

use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::extract::ApiJson;
use crate::rows::{Encoder, Format};

/// Rows a query returns at most, whatever it asks for.
pub const MAX_ROWS: usize = 1_000_000;
/// Rows a query returns when it does not say.
const DEFAULT_ROWS: usize = 10_000;
/// A query's whole answer must be streamed within this.
const TOTAL_TIME: Duration = Duration::from_secs(300);

/// A query over snapshot history.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QueryRequest {
    /// A read-only SELECT (DataFusion's dialect). Every model is a table of its latest
    /// snapshot; `<model>_history` holds every snapshot with `_snapshot_id`, `_run_id` and
    /// `_extracted_at`. `GET /query/tables` (or `SHOW TABLES`) lists them.
    #[schema(min_length = 1, max_length = 131072)]
    pub sql: String,
    /// Rows returned at most (default 10,000; at most 1,000,000).
    #[schema(minimum = 1, maximum = 1000000)]
    pub max_rows: Option<usize>,
}

/// The format `Accept` asks for; JSON lines when it names none of ours.
fn format_of(headers: &HeaderMap) -> ApiResult<Format> {
    let accepts: Vec<String> = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
        .filter(|v| !v.is_empty())
        .collect();
    for accept in &accepts {
        match accept.as_str() {
            "text/csv" => return Ok(Format::Csv),
            "application/vnd.apache.arrow.stream" => return Ok(Format::Arrow),
            "application/x-ndjson" | "application/jsonl" | "application/json" | "*/*" | "application/*" => {
                return Ok(Format::JsonLines);
            }
            _ => {}
        }
    }
    if accepts.is_empty() {
        return Ok(Format::JsonLines);
    }
    Err(ApiError::new(
        StatusCode::NOT_ACCEPTABLE,
        "not_acceptable",
        "results come as application/x-ndjson, text/csv or application/vnd.apache.arrow.stream; ask for one in `Accept`",
    ))
}

/// Lists the tables `POST /query` can read and their columns, from the snapshots' manifests:
/// cheap, and not a query (it takes no place under `api.limits`). A model with no snapshot
/// yet has no table.
#[utoipa::path(get, path = "/query/tables", tag = "query",
    responses((status = 200, description = "Every model's two tables, models without a snapshot left out", body = Vec<HistoryTable>)))]
pub async fn history_tables(State(state): State<AppState>) -> ApiResult<axum::Json<Vec<HistoryTable>>> {
    let engine = state.service.current().await?;
    let tables = engine.history_tables().await?;
    Ok(axum::Json(tables))
}

/// Runs a read-only SQL query over snapshot history and streams the rows back.
#[utoipa::path(post, path = "/query", tag = "query",
    request_body = QueryRequest,
    responses(
        (status = 200, description = "The rows, in the format `Accept` asks for", content(
            (String = "application/x-ndjson"),
            (String = "text/csv"),
            ("application/vnd.apache.arrow.stream"))),
        (status = 400, description = "Not a read-only query over the snapshot tables", body = crate::error::ErrorBody),
        (status = 406, description = "An `Accept` this endpoint cannot answer", body = crate::error::ErrorBody),
        (status = 422, description = "The query needs more memory than `api.limits.query_memory`, even spilling to disk", body = crate::error::ErrorBody),
        (status = 429, description = "As many queries run as `api.limits` allows (for this token, or in all); `Retry-After` says when to ask again", body = crate::error::ErrorBody),
        (status = 504, description = "No rows within `api.limits.query_timeout`; the query was stopped", body = crate::error::ErrorBody)))]
pub async fn query(
    State(state): State<AppState>,
    Extension(caller): Extension<std::sync::Arc<crate::auth::Caller>>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<QueryRequest>,
) -> ApiResult<Response> {
    let format = format_of(&headers)?;
    let max_rows = request.max_rows.unwrap_or(DEFAULT_ROWS);
    if max_rows == 0 || max_rows > MAX_ROWS {
        return Err(ApiError::bad_request(format!("`max_rows` is 1 to {MAX_ROWS}")));
    }
    if request.sql.trim().is_empty() {
        return Err(ApiError::bad_request("`sql` is empty"));
    }
    let engine = state.service.current().await?;
    let limits = QueryLimits {
        max_rows,
        ..Default::default()
    };
    let stream = engine.query(&request.sql, limits, &caller.token_name).await?;
    let schema = stream.schema();
    let encoder = Box::new(Encoder::new(format, &schema).map_err(ApiError::bad_request)?);
    let deadline = tokio::time::Instant::now() + TOTAL_TIME;
    // Encoded on the interactive runtime too, a batch at a time, two batches ahead of the
    // client at most; a query that fails or overruns mid-way ends the body early (the client
    // sees a cut-off transfer, never a well-formed partial answer). A client that goes away
    // drops the receiver, which stops the encoding task and, with its stream, the query.
    let (sender, receiver) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(2);
    engine.workloads().spawn_interactive(async move {
        let mut stream = stream;
        let mut encoder = encoder;
        loop {
            let next = tokio::select! {
                _ = sender.closed() => return,
                next = tokio::time::timeout_at(deadline, stream.next()) => next,
            };
            let chunk = match next {
                Err(_) => Err(std::io::Error::other(format!(
                    "the query ran longer than {} s",
                    TOTAL_TIME.as_secs()
                ))),
                Ok(None) => match encoder.finish(&schema) {
                    Ok(bytes) if bytes.is_empty() => return,
                    Ok(bytes) => {
                        let _ = sender.send(Ok(bytes::Bytes::from(bytes))).await;
                        return;
                    }
                    Err(e) => Err(std::io::Error::other(e)),
                },
                Ok(Some(Err(e))) => {
                    tracing::warn!(error = %e, "a query failed while streaming");
                    Err(std::io::Error::other(e.to_string()))
                }
                Ok(Some(Ok(batch))) => match encoder.batch(&batch) {
                    Ok(bytes) => Ok(bytes::Bytes::from(bytes)),
                    Err(e) => Err(std::io::Error::other(e)),
                },
            };
            let failed = chunk.is_err();
            if sender.send(chunk).await.is_err() || failed {
                return;
            }
        }
    });
    let body = futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|chunk| (chunk, receiver))
    });
    Ok((
        [(header::CONTENT_TYPE, format.content_type())],
        Body::from_stream(body),
    )
        .into_response())
}
