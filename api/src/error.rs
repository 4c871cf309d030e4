//! Every error the API answers with: a 4xx or 5xx status and
//! `{"error": {"code", "message", "details"}}`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;
use sluice_engine::EngineError;
use utoipa::ToSchema;

/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Machine-readable: `not_found`, `invalid_request`, `invalid_definition`,
    /// `defined_in_file`, `run_in_progress`, `unauthorized`, `forbidden`, ...
    pub code: String,
    /// What went wrong and what to do, for a person.
    pub message: String,
    /// More about it, when there is more (the run in the way, the names defined, ...).
    #[schema(value_type = Option<Object>)]
    pub details: Option<Value>,
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// (Boxed: errors travel in `Result`s, which stay small.)
    pub details: Option<Box<Value>>,
    /// Seconds to wait before asking again (`Retry-After`), for 429s.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: None,
            retry_after: None,
        }
    }

    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(Box::new(details));
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.code, self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                // A system's error may quote a credential it was sent.
                message: sluice_engine::secrets::scrub_known(&self.message).into_owned(),
                details: self.details.map(|d| *d),
            },
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"sluice\""),
            );
        }
        response
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> Self {
        let text = error.to_string();
        match error {
            EngineError::Unknown {
                kind,
                name,
                available,
            } => Self::not_found(text)
                .with_details(serde_json::json!({ "kind": kind, "name": name, "defined": available })),
            EngineError::Conflict {
                code,
                message,
                run_id,
            } => {
                let error = Self::new(StatusCode::CONFLICT, code, message);
                match run_id {
                    Some(run_id) => error.with_details(serde_json::json!({ "run_id": run_id })),
                    None => error,
                }
            }
            EngineError::Invalid { message } => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_definition", message)
            }
            EngineError::Usage(message) => Self::bad_request(message),
            // Too much interactive work at once: ask again later.
            EngineError::Busy {
                code,
                message,
                retry_after,
            } => Self {
                retry_after: Some(retry_after.as_secs().max(1)),
                ..Self::new(StatusCode::TOO_MANY_REQUESTS, code, message)
            },
            EngineError::TimedOut { code, message } => Self::new(StatusCode::GATEWAY_TIMEOUT, code, message),
            EngineError::TooLarge { code, message } => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
            }
            e @ (EngineError::Config(_) | EngineError::Mapping(_)) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_definition",
                e.to_string(),
            ),
            // A source or destination that fails to answer is the definition's problem (or
            // its system's), not the API's: 422 with the system's own words.
            e @ (EngineError::Source(_)
            | EngineError::Destination(_)
            | EngineError::IncompatibleBaseline { .. }) => {
                let action = e.recommended_action();
                let error = Self::new(StatusCode::UNPROCESSABLE_ENTITY, "upstream_error", e.to_string());
                match action {
                    Some(action) => error.with_details(serde_json::json!({ "recommended_action": action })),
                    None => error,
                }
            }
            e @ (EngineError::Metadata { .. } | EngineError::Migration(_)) => {
                tracing::error!(error = %e, "metadata store");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "metadata_unavailable",
                    "the metadata store did not answer; see the server's log",
                )
            }
            e @ (EngineError::Snapshot { .. } | EngineError::SnapshotStore(_)) => {
                tracing::error!(error = %e, "snapshot store");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "snapshots_unavailable",
                    "the snapshot store did not answer; see the server's log",
                )
            }
            other => {
                tracing::error!(error = %other, "internal error answering a request");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "sluice failed to answer this request; the server's log says why",
                )
            }
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
