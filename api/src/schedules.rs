//! Schedules as the console's schedule picker shows them: what a schedule means and when it
//! fires next, computed by the scheduler's own code.

use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sluice_engine::schedule::Schedule;
use utoipa::ToSchema;

use crate::AppState;
use crate::error::{ApiError, ApiResult};
use crate::extract::ApiJson;

/// The most fire times one preview lists.
const MAX_COUNT: u32 = 50;

/// `POST /api/v1/schedules/preview`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SchedulePreviewRequest {
    /// A schedule as `sluice.yaml` writes it: `"manual"`, `{"every": "15m"}`,
    /// `{"days": ["mon", "thu"], "at": "09:00", "timezone": "Europe/Paris"}` or
    /// `{"cron": "0 */2 * * 1-5", "timezone": "America/New_York"}`.
    #[schema(value_type = Object)]
    pub schedule: serde_json::Value,
    /// How many fire times to list (default 5).
    #[serde(default = "five")]
    #[schema(minimum = 1, maximum = 50)]
    pub count: u32,
}

fn five() -> u32 {
    5
}

/// What a schedule means and its next fire times.
#[derive(Debug, Serialize, ToSchema)]
pub struct SchedulePreview {
    /// The schedule in words, as `sluice schedules` prints it.
    pub description: String,
    /// The next fire times (UTC; none for `manual`), as the scheduler computes them, daylight
    /// saving changes included. An `every:` schedule's first run is due at once.
    pub next_runs: Vec<DateTime<Utc>>,
}

/// Describes a schedule and lists its next fire times, without saving anything.
#[utoipa::path(post, path = "/schedules/preview", tag = "mappings",
    request_body = SchedulePreviewRequest,
    responses((status = 200, description = "The schedule in words and its next fire times", body = SchedulePreview)))]
pub async fn preview_schedule(
    State(_state): State<AppState>,
    ApiJson(request): ApiJson<SchedulePreviewRequest>,
) -> ApiResult<axum::Json<SchedulePreview>> {
    if request.count == 0 || request.count > MAX_COUNT {
        return Err(ApiError::bad_request(format!(
            "`count` is between 1 and {MAX_COUNT}"
        )));
    }
    let schedule: Schedule = serde_json::from_value(request.schedule)
        .map_err(|e| ApiError::bad_request(format!("`schedule`: {e}")))?;
    let next_runs = schedule.upcoming(Utc::now(), None, request.count as usize);
    Ok(axum::Json(SchedulePreview {
        description: schedule.to_string(),
        next_runs,
    }))
}
