//! sluice's HTTP API: a thin axum shell over engine calls. So far: health, readiness and
//! Prometheus metrics; the management API is built on the same router.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use serde_json::json;
use sluice_engine::Engine;

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    pub engine: Arc<Engine>,
}

/// The API's routes.
pub fn router(engine: Arc<Engine>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AppState { engine })
}

async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok", "version": env!("CARGO_PKG_VERSION") }))
}

/// Prometheus scrape endpoint (OpenMetrics text).
async fn metrics() -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            sluice_engine::metrics::CONTENT_TYPE,
        )],
        sluice_engine::metrics::encode(),
    )
}

/// Ready when the metadata store answers and the snapshot store can be listed.
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let metadata = state
        .engine
        .metadata()
        .runs(None, 1)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
    let snapshots = state
        .engine
        .snapshots()
        .list("models")
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
    let body = json!({
        "metadata_store": metadata.as_ref().err().map(String::as_str).unwrap_or("ok"),
        "snapshot_store": snapshots.as_ref().err().map(String::as_str).unwrap_or("ok"),
    });
    let status = if metadata.is_ok() && snapshots.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    engine: Arc<Engine>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    tracing::info!(address = ?listener.local_addr().ok(), "serving the sluice API");
    axum::serve(listener, router(engine))
        .with_graceful_shutdown(shutdown)
        .await
}
