//! Bearer-token authentication. Every route but the health checks needs a token: `GET`s and
//! `POST /api/v1/query` a `read` one, everything else an `admin` one. Tokens come from
//! `sluice.yaml` (`api.tokens`, `${ENV}` references) and from `sluice token create` (the
//! metadata store keeps their SHA-256). Tokens made by another process are accepted within a
//! tenth of a second, and revocations take effect within ten.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sluice_engine::tokens::{self, Scope};

use crate::AppState;
use crate::error::ApiError;
use crate::session;

/// Who made a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub token_name: String,
    pub scope: Scope,
}

/// An unknown token makes the stored tokens be read again, at most this often.
const RELOAD_ON_MISS: Duration = Duration::from_millis(100);
/// Stored tokens are read again at least this often, so a revocation takes effect.
const RELOAD_ALWAYS: Duration = Duration::from_secs(10);

/// The tokens the API accepts, by SHA-256.
pub struct Authenticator {
    from_file: HashMap<String, Arc<Caller>>,
    stored: tokio::sync::RwLock<Stored>,
    /// One reload at a time; requests arriving meanwhile use its result.
    reloading: tokio::sync::Mutex<()>,
}

struct Stored {
    loaded: Option<Instant>,
    callers: HashMap<String, Arc<Caller>>,
}

impl Authenticator {
    pub fn new(config: &sluice_engine::tokens::ApiConfig) -> Self {
        let from_file = config
            .tokens
            .iter()
            .map(|t| {
                (
                    tokens::hash(t.token.expose()),
                    Arc::new(Caller {
                        token_name: t.name.clone(),
                        scope: t.scope,
                    }),
                )
            })
            .collect();
        Self {
            from_file,
            stored: tokio::sync::RwLock::new(Stored {
                loaded: None,
                callers: HashMap::new(),
            }),
            reloading: tokio::sync::Mutex::new(()),
        }
    }

    /// Whether any token could be accepted.
    pub async fn has_tokens(&self, state: &AppState) -> bool {
        if !self.from_file.is_empty() {
            return true;
        }
        self.reload(state, Duration::ZERO).await;
        !self.stored.read().await.callers.is_empty()
    }

    /// Reads the stored tokens again unless they were read less than `max_age` ago.
    async fn reload(&self, state: &AppState, max_age: Duration) {
        let _one = self.reloading.lock().await;
        if let Some(loaded) = self.stored.read().await.loaded
            && !max_age.is_zero()
            && loaded.elapsed() < max_age
        {
            return;
        }
        let metadata = state.service.engine().metadata().clone();
        match metadata.tokens().await {
            Ok(list) => {
                let callers = list
                    .into_iter()
                    .map(|t| {
                        (
                            t.hash,
                            Arc::new(Caller {
                                token_name: t.name,
                                scope: t.scope,
                            }),
                        )
                    })
                    .collect();
                *self.stored.write().await = Stored {
                    loaded: Some(Instant::now()),
                    callers,
                };
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the API tokens"),
        }
    }

    /// The caller a token belongs to. Tokens are looked up by their SHA-256, never compared as
    /// text, so how long a refusal takes says nothing about how much of a token was right.
    pub async fn caller(&self, state: &AppState, token: &str) -> Option<Arc<Caller>> {
        self.caller_by_hash(state, &tokens::hash(token)).await
    }

    /// The caller of a console session: the token it was opened with, if that is still
    /// accepted. A session that was signed out, has expired, or whose token was revoked has none.
    pub async fn session_caller(&self, state: &AppState, session_id: &str) -> Option<Arc<Caller>> {
        let metadata = state.service.engine().metadata().clone();
        match metadata.session_token_hash(session_id).await {
            Ok(Some(hash)) => self.caller_by_hash(state, &hash).await,
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the console sessions");
                None
            }
        }
    }

    /// The caller whose token has SHA-256 `hash`.
    pub async fn caller_by_hash(&self, state: &AppState, hash: &str) -> Option<Arc<Caller>> {
        if let Some(caller) = self.from_file.get(hash) {
            return Some(caller.clone());
        }
        let (found, age) = {
            let stored = self.stored.read().await;
            (
                stored.callers.get(hash).cloned(),
                stored.loaded.map(|t| t.elapsed()),
            )
        };
        let stale = age.is_none_or(|a| a >= RELOAD_ALWAYS);
        let retry = found.is_none() && age.is_none_or(|a| a >= RELOAD_ON_MISS);
        if stale || retry {
            let max_age = if stale { RELOAD_ALWAYS } else { RELOAD_ON_MISS };
            self.reload(state, max_age).await;
            return self.stored.read().await.callers.get(hash).cloned();
        }
        found
    }
}

/// The scope a request needs.
fn needed_scope(method: &Method, path: &str) -> Scope {
    // A query, a schedule preview and a destination's record shape only read.
    if method == Method::GET
        || method == Method::HEAD
        || path == "/api/v1/query"
        || path == "/api/v1/schedules/preview"
        || (path.starts_with("/api/v1/destinations/") && path.ends_with("/shape"))
    {
        Scope::Read
    } else {
        Scope::Admin
    }
}

/// Middleware: checks the token (a bearer token, or a console session's cookie with its CSRF
/// token on changes; see [`crate::session`]) and the scope, and hands the caller to the handler.
pub async fn require_token(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string);
    let caller = match bearer {
        Some(token) => state.auth.caller(&state, &token).await,
        None => match session::cookie(request.headers(), session::SESSION_COOKIE) {
            Some(session_id) => {
                let provided = request
                    .headers()
                    .get(session::CSRF_HEADER)
                    .and_then(|v| v.to_str().ok());
                if !session::is_safe(request.method()) && !session::csrf_matches(request.headers(), provided)
                {
                    return ApiError::new(
                        StatusCode::FORBIDDEN,
                        "csrf",
                        "a change made with the console's session cookie needs the session's CSRF token in the `X-CSRF-Token` header",
                    )
                    .into_response();
                }
                state.auth.session_caller(&state, &session_id).await
            }
            None => {
                return ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "send an API token as `Authorization: Bearer <token>` (`sluice token create` makes one)",
                )
                .into_response();
            }
        },
    };
    let Some(caller) = caller else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the API token is not known (revoked, or mistyped; a console session ends when you sign out); `sluice token list` shows the tokens there are",
        )
        .into_response();
    };
    let needed = needed_scope(request.method(), request.uri().path());
    if !caller.scope.allows(needed) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "token `{}` has the `{}` scope; this request needs `{needed}`",
                caller.token_name, caller.scope
            ),
        )
        .into_response();
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_need_read_and_changes_need_admin() {
        assert_eq!(needed_scope(&Method::GET, "/api/v1/runs"), Scope::Read);
        assert_eq!(needed_scope(&Method::POST, "/api/v1/query"), Scope::Read);
        assert_eq!(
            needed_scope(&Method::POST, "/api/v1/mappings/m/runs"),
            Scope::Admin
        );
        assert_eq!(needed_scope(&Method::DELETE, "/api/v1/models/m"), Scope::Admin);
        assert_eq!(needed_scope(&Method::PATCH, "/api/v1/mappings/m"), Scope::Admin);
    }
}
