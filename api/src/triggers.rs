//! Runs started by systems outside sluice: dbt Cloud's job webhooks.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Json;
use sluice_engine::triggers::WebhookRefusal;

use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::views::DbtWebhookAnswer;

/// The path dbt Cloud's webhook subscription points at.
pub const DBT_WEBHOOK_PATH: &str = "/api/v1/triggers/dbt";

/// A dbt Cloud job webhook (`job.run.completed`): a successful run starts the mappings
/// scheduled `after_dbt:` that wait for its job. Signed, not token-authenticated: the
/// `Authorization` header is the hex HMAC-SHA256 of the body under `dbt.webhook_secret` (the
/// secret dbt Cloud shows for the subscription). Other events and failed runs are acknowledged
/// and start nothing.
#[utoipa::path(post, path = "/api/v1/triggers/dbt", tag = "runs",
    security(("dbt_signature" = [])),
    request_body(content = Object, content_type = "application/json",
        description = "dbt Cloud's webhook event: `eventId`, `eventType`, `data.jobId`, `data.jobName`, `data.runStatus`, ..."),
    responses(
        (status = 200, description = "Taken in: `accepted` says whether it starts mappings", body = DbtWebhookAnswer),
        (status = 400, description = "Not a dbt Cloud job event", body = crate::error::ErrorBody),
        (status = 401, description = "No signature, or not this body's", body = crate::error::ErrorBody),
        (status = 404, description = "No `dbt.webhook_secret` is set", body = crate::error::ErrorBody)))]
pub async fn dbt_webhook(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> ApiResult<Json<DbtWebhookAnswer>> {
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match state.service.dbt_webhook(&body, authorization).await? {
        Ok(outcome) => Ok(Json(DbtWebhookAnswer {
            event_id: outcome.event_id,
            accepted: outcome.accepted,
            reason: outcome.reason,
            mappings: outcome.mappings,
        })),
        Err(refusal @ WebhookRefusal::NotConfigured) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "dbt_webhook_not_configured",
            refusal.to_string(),
        )),
        Err(refusal @ WebhookRefusal::BadSignature) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_signature",
            refusal.to_string(),
        )),
        Err(refusal @ WebhookRefusal::NotAnEvent(_)) => Err(ApiError::bad_request(refusal.to_string())),
    }
}
