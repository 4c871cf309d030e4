//! Runs: trigger (and backfill), list, get, failed records (JSON pages or CSV), cancel, and a
//! dry run's requests.

use axum::Extension;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use sluice_engine::metadata::RunQuery;
use sluice_engine::service::TriggerOptions;
use utoipa::{IntoParams, ToSchema};

use crate::AppState;
use crate::cache::{FOR_OTHERS, to_json};
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiPath, ApiQuery, optional_body};
use crate::views::{Failure, FailurePage, Run, RunPage, RunStatusView};

/// Most runs (or failed records) one page holds.
const MAX_PAGE: u32 = 500;
/// Failed records read from the store at a time for CSV.
const CSV_CHUNK: u32 = 5_000;

/// How to run a mapping.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TriggerRequest {
    /// A backfill: ignore what was sent before and send every row as added.
    #[serde(default)]
    pub full: bool,
    /// Compute what would be sent (`GET /runs/{id}/requests` has it); send and commit nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// With `full`: send again only the rows matching this SQL predicate over the model's
    /// columns (`plan = 'pro' AND country = 'FR'`); everything else goes as in a normal run.
    pub filter: Option<String>,
}

/// Starts a run of a mapping and answers at once with the run (status `running`); poll
/// `GET /runs/{id}` until it finishes.
#[utoipa::path(post, path = "/mappings/{name}/runs", tag = "runs",
    params(("name" = String, Path)),
    request_body(content = Option<TriggerRequest>, description = "Optional; a normal run by default"),
    responses(
        (status = 202, description = "Started", body = Run),
        (status = 409, description = "A run of the mapping is going (`details.run_id`), or the mapping is disabled", body = crate::error::ErrorBody),
        (status = 429, description = "A dry run, when as many previews, tests and dry runs run as `api.limits` allows", body = crate::error::ErrorBody)))]
pub async fn trigger_run(
    State(state): State<AppState>,
    Extension(caller): Extension<std::sync::Arc<crate::auth::Caller>>,
    ApiPath(name): ApiPath<String>,
    body: bytes::Bytes,
) -> ApiResult<Response> {
    let request: TriggerRequest = optional_body(&body)?;
    let run = state
        .service
        .trigger(
            &name,
            TriggerOptions {
                full: request.full,
                dry_run: request.dry_run,
                filter: request.filter,
                caller: Some(caller.token_name.clone()),
            },
        )
        .await?;
    tracing::info!(
        mapping = name,
        run_id = run.id,
        full = request.full,
        dry_run = request.dry_run,
        token = caller.token_name,
        "run triggered"
    );
    let location = format!("/api/v1/runs/{}", run.id);
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        axum::Json(Run::from(&run)),
    )
        .into_response())
}

/// Which runs to list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RunParams {
    /// Only this mapping's runs.
    pub mapping: Option<String>,
    /// Only runs in this status.
    pub status: Option<RunStatusView>,
    /// Runs per page (default 50, at most 500).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

fn run_cursor(run: &sluice_engine::metadata::RunRecord) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}|{}", run.started_at.to_rfc3339(), run.id))
}

fn parse_run_cursor(cursor: &str) -> ApiResult<(chrono::DateTime<chrono::Utc>, String)> {
    let invalid =
        || ApiError::bad_request("`cursor` is not one this API gave out; use a page's `next_cursor`");
    let bytes = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let (time, id) = text.split_once('|').ok_or_else(invalid)?;
    let time = chrono::DateTime::parse_from_rfc3339(time).map_err(|_| invalid())?;
    Ok((time.with_timezone(&chrono::Utc), id.to_string()))
}

/// Runs, most recent first.
#[utoipa::path(get, path = "/runs", tag = "runs", params(RunParams),
    responses((status = 200, description = "One page", body = RunPage)))]
pub async fn list_runs(
    State(state): State<AppState>,
    uri: Uri,
    ApiQuery(params): ApiQuery<RunParams>,
) -> ApiResult<Response> {
    let limit = params.limit.unwrap_or(50);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::bad_request(format!("`limit` is 1 to {MAX_PAGE}")));
    }
    let after = params.cursor.as_deref().map(parse_run_cursor).transpose()?;
    let engine = state.service.engine();
    let metadata = engine.metadata();
    let query = RunQuery {
        mapping: params.mapping,
        status: params.status.map(Into::into),
        after,
        limit: limit + 1,
    };
    state
        .cache
        .json(&uri.to_string(), metadata.run_writes(), FOR_OTHERS, || async {
            let mut runs = metadata.runs_page(&query).await?;
            let next_cursor = if runs.len() > limit as usize {
                runs.truncate(limit as usize);
                runs.last().map(run_cursor)
            } else {
                None
            };
            to_json(&RunPage {
                runs: runs.iter().map(Run::from).collect(),
                next_cursor,
            })
        })
        .await
}

async fn find_run(state: &AppState, id: &str) -> ApiResult<sluice_engine::metadata::RunRecord> {
    let engine = state.service.engine();
    engine
        .metadata()
        .run(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no run `{id}` (`GET /api/v1/runs` lists them)")))
}

/// One run: status, timings, load results, error and what to do about it.
#[utoipa::path(get, path = "/runs/{id}", tag = "runs", params(("id" = String, Path)),
    responses((status = 200, description = "The run", body = Run)))]
pub async fn get_run(
    State(state): State<AppState>,
    uri: Uri,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Response> {
    let writes = state.service.engine().metadata().run_writes();
    state
        .cache
        .json(&uri.to_string(), writes, FOR_OTHERS, || async {
            to_json(&Run::from(&find_run(&state, &id).await?))
        })
        .await
}

/// Asks a running run to stop at its next commit point; what it delivered is kept, and the
/// next run goes on from there.
#[utoipa::path(post, path = "/runs/{id}/cancel", tag = "runs", params(("id" = String, Path)),
    responses(
        (status = 202, description = "Cancellation requested", body = Run),
        (status = 409, description = "The run is not running", body = crate::error::ErrorBody)))]
pub async fn cancel_run(
    State(state): State<AppState>,
    Extension(caller): Extension<std::sync::Arc<crate::auth::Caller>>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Response> {
    let run = state.service.cancel(&id).await?;
    tracing::info!(
        run_id = id,
        token = caller.token_name,
        "run cancellation requested"
    );
    Ok((StatusCode::ACCEPTED, axum::Json(Run::from(&run))).into_response())
}

/// Paging of failed records.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FailureParams {
    /// Records per page (default 100, at most 500); ignored for CSV, which has them all.
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// `csv`: every record as CSV, as `Accept: text/csv` asks (for a plain download link).
    #[param(inline)]
    pub format: Option<FailureFormat>,
}

/// The form failed records come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FailureFormat {
    Json,
    Csv,
}

/// Whether the client asked for CSV (`Accept: text/csv`).
fn wants_csv(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.trim().starts_with("text/csv"))
}

/// A run's failed records: key, operation, the destination's error, attempts, payload. JSON
/// pages, or every record as CSV with `Accept: text/csv` or `?format=csv`.
#[utoipa::path(get, path = "/runs/{id}/failures", tag = "runs", params(("id" = String, Path), FailureParams),
    responses((status = 200, description = "One page, or all of them as CSV", content(
        (FailurePage = "application/json"),
        (String = "text/csv")))))]
pub async fn run_failures(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(params): ApiQuery<FailureParams>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let run = find_run(&state, &id).await?;
    let metadata = state.service.engine().metadata().clone();
    let csv = match params.format {
        Some(format) => format == FailureFormat::Csv,
        None => wants_csv(&headers),
    };
    if csv {
        let run_id = run.id.clone();
        let body = futures::stream::unfold(Some(0u64), move |offset| {
            let metadata = metadata.clone();
            let run_id = run_id.clone();
            async move {
                let offset = offset?;
                match metadata.failures(&run_id, offset, CSV_CHUNK).await {
                    Ok(rows) if rows.is_empty() && offset > 0 => None,
                    Ok(rows) => {
                        let next = (rows.len() as u32 == CSV_CHUNK).then_some(offset + rows.len() as u64);
                        let bytes = sluice_engine::metadata::failures_csv(&rows, offset == 0);
                        Some((Ok::<_, std::io::Error>(bytes::Bytes::from(bytes)), next))
                    }
                    Err(e) => {
                        tracing::error!(run_id, error = %e, "reading failed records for CSV");
                        Some((Err(std::io::Error::other(e.to_string())), None))
                    }
                }
            }
        });
        let filename = format!(
            "attachment; filename=\"sluice-{}-{}-failures.csv\"",
            run.mapping, run.id
        );
        return Ok((
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
                (header::CONTENT_DISPOSITION, filename),
            ],
            Body::from_stream(body),
        )
            .into_response());
    }
    let limit = params.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::bad_request(format!("`limit` is 1 to {MAX_PAGE}")));
    }
    let offset = match params.cursor.as_deref() {
        None => 0,
        Some(cursor) => URL_SAFE_NO_PAD
            .decode(cursor)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|t| t.strip_prefix("offset:").and_then(|n| n.parse::<u64>().ok()))
            .ok_or_else(|| {
                ApiError::bad_request("`cursor` is not one this API gave out; use a page's `next_cursor`")
            })?,
    };
    let mut rows = metadata.failures(&run.id, offset, limit + 1).await?;
    let next_cursor = if rows.len() > limit as usize {
        rows.truncate(limit as usize);
        Some(URL_SAFE_NO_PAD.encode(format!("offset:{}", offset + limit as u64)))
    } else {
        None
    };
    Ok(axum::Json(FailurePage {
        failures: rows.iter().map(Failure::from).collect(),
        next_cursor,
    })
    .into_response())
}

/// A dry run's requests, one JSON object per line: `{"request": {method, target, records,
/// body}}`, or `{"unsent": {key, op, error}}` for a record that would fail unsent.
#[utoipa::path(get, path = "/runs/{id}/requests", tag = "runs", params(("id" = String, Path)),
    responses(
        (status = 200, description = "The requests, as JSON lines", content_type = "application/x-ndjson", body = String),
        (status = 409, description = "Not a dry run, or not finished", body = crate::error::ErrorBody)))]
pub async fn dry_run_requests(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Response> {
    let run = find_run(&state, &id).await?;
    if !run.dry_run {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_a_dry_run",
            format!(
                "run {id} sent its records; only a dry run keeps its requests (trigger with \"dry_run\": true)"
            ),
        ));
    }
    if !run.status.is_finished() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "run_in_progress",
            format!("dry run {id} is still going; its requests are here once it finishes"),
        )
        .with_details(serde_json::json!({ "run_id": id })));
    }
    let requests = state.service.dry_run_requests(&run).await?.ok_or_else(|| {
        ApiError::not_found(format!(
            "dry run {id} left no requests ({}); it may have failed before computing them, or been retired",
            run.status
        ))
    })?;
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(requests),
    )
        .into_response())
}

/// How far a mapping's run has got while it runs in this server (a run's counts are recorded
/// when it ends): its stage, rows extracted, buckets delivered and records so far. `null` when
/// it is not running here (not running, or run by another process).
#[utoipa::path(get, path = "/mappings/{name}/progress", tag = "runs",
    params(("name" = String, Path)),
    responses((status = 200, description = "The progress, or null", body = Option<sluice_engine::progress::RunProgress>)))]
pub async fn mapping_progress(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<axum::Json<Option<sluice_engine::progress::RunProgress>>> {
    Ok(axum::Json(state.service.progress(&name).await?))
}
