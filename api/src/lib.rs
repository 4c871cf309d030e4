//! sluice's HTTP API: a thin axum shell over the engine's control plane
//! ([`sluice_engine::service::Service`]), versioned under `/api/v1`, with its OpenAPI 3.1
//! document generated from the handlers and types (utoipa) and served at
//! `/api/v1/openapi.json`. Every route but `/healthz` and `/readyz` needs a bearer token
//! ([`auth`]); every error is `{"error": {"code", "message", "details"}}` ([`error`]).

use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use sluice_engine::service::Service;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{OpenApi as OpenApiDocument, Ref, RefOr};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub mod auth;
mod cache;
mod connector_types;
mod console;
mod dbt_models;
mod definitions;
pub mod error;
mod extract;
mod query;
mod rows;
mod runs;
mod schedules;
pub mod session;
pub mod triggers;
pub mod views;

use error::{ApiError, ErrorBody};

/// Largest request body accepted (definitions and queries are small).
pub const BODY_LIMIT: usize = 1024 * 1024;

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    pub service: Arc<Service>,
    pub auth: Arc<auth::Authenticator>,
    openapi: Arc<OnceLock<OpenApiDocument>>,
    cache: Arc<cache::ReadCache>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "sluice",
        description = "Reverse ETL: manage sources, models, destinations and mappings; trigger runs and backfills; read load results; query snapshot history with SQL. Every route but /healthz, /readyz and the signed dbt Cloud webhook (/api/v1/triggers/dbt) needs `Authorization: Bearer <token>`: a `read` token may list, get, read runs and query; an `admin` token may also change and trigger."
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    components(schemas(ErrorBody)),
    tags(
        (name = "sources", description = "Where models are queried"),
        (name = "models", description = "SQL queries with a primary key"),
        (name = "destinations", description = "Where records are sent"),
        (name = "mappings", description = "Which records of a model go to a destination, with which fields"),
        (name = "runs", description = "Runs, backfills, load results and failed records"),
        (name = "query", description = "SQL over snapshot history"),
        (name = "system", description = "Health, readiness, metrics and this document"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut OpenApiDocument) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                Http::builder()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API token (`sluice token create`, or `api.tokens` in sluice.yaml)",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "dbt_signature",
            SecurityScheme::ApiKey(utoipa::openapi::security::ApiKey::Header(
                utoipa::openapi::security::ApiKeyValue::with_description(
                    "Authorization",
                    "dbt Cloud's webhook signature: the hex HMAC-SHA256 of the body under `dbt.webhook_secret`",
                ),
            )),
        );
    }
}

/// The routes under `/api/v1` and their documentation.
fn v1() -> OpenApiRouter<AppState> {
    use definitions::*;
    OpenApiRouter::new()
        .routes(routes!(list_sources, create_source))
        .routes(routes!(get_source, update_source, delete_source))
        .routes(routes!(test_source))
        .routes(routes!(test_draft_connection))
        .routes(routes!(preview_source_sql))
        .routes(routes!(list_models, create_model))
        .routes(routes!(get_model, update_model, delete_model))
        .routes(routes!(preview_model))
        .routes(routes!(test_record))
        .routes(routes!(list_destinations, create_destination))
        .routes(routes!(get_destination, update_destination, delete_destination))
        .routes(routes!(test_destination))
        .routes(routes!(destination_shape))
        .routes(routes!(list_mappings, create_mapping))
        .routes(routes!(
            get_mapping,
            update_mapping,
            delete_mapping,
            patch_mapping
        ))
        .routes(routes!(runs::trigger_run))
        .routes(routes!(runs::mapping_progress))
        .routes(routes!(runs::list_runs))
        .routes(routes!(runs::get_run))
        .routes(routes!(runs::run_failures))
        .routes(routes!(runs::cancel_run))
        .routes(routes!(runs::dry_run_requests))
        .routes(routes!(query::query))
        .routes(routes!(query::history_tables))
        .routes(routes!(schedules::preview_schedule))
        .routes(routes!(dbt_models::dbt_models))
        .routes(routes!(connector_types::connector_catalog))
        .routes(routes!(openapi_json))
}

/// The routes that need a token (the whole API but the health checks).
fn protected_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .nest("/api/v1", v1())
        .routes(routes!(metrics))
}

fn public_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        // Signed by dbt Cloud, not token-authenticated.
        .routes(routes!(triggers::dbt_webhook))
}

/// The API's routes over `service`, and the state its handlers share.
pub fn app(service: Arc<Service>) -> (Router, AppState) {
    let auth = Arc::new(auth::Authenticator::new(
        &service.engine().file_project().config.api,
    ));
    let state = AppState {
        service,
        auth,
        openapi: Arc::new(OnceLock::new()),
        cache: Default::default(),
    };
    let protected = protected_routes().layer(axum::middleware::from_fn_with_state(
        state.clone(),
        auth::require_token,
    ));
    let (router, mut document) = protected.merge(public_routes()).split_for_parts();
    // The console and its sign-in pages: not part of the API, so not in its document.
    let router = router
        .route(
            "/login",
            axum::routing::get(session::login_page).post(session::login),
        )
        .route("/logout", axum::routing::post(session::logout))
        .route("/", axum::routing::get(console::index))
        .route("/assets/{*path}", axum::routing::get(console::asset));
    document_errors(&mut document);
    let _ = state.openapi.set(document);
    let router = router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
        .with_state(state.clone());
    (router, state)
}

/// The API's routes over `service`.
pub fn router(service: Arc<Service>) -> Router {
    app(service).0
}

/// The OpenAPI document, as `/api/v1/openapi.json` serves it.
pub fn openapi() -> OpenApiDocument {
    let mut document = protected_routes().merge(public_routes()).into_openapi();
    document_errors(&mut document);
    document
}

/// Every operation may answer with the shared error body: the statuses it names, and any other
/// as `default`.
fn document_errors(document: &mut OpenApiDocument) {
    let components = document.components.get_or_insert_with(Default::default);
    components.responses.insert(
        "Error".into(),
        utoipa::openapi::ResponseBuilder::new()
            .description("An error: `{\"error\": {\"code\", \"message\", \"details\"}}`")
            .content(
                "application/json",
                utoipa::openapi::ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .into(),
    );
    for (path, item) in document.paths.paths.iter_mut() {
        let public = path == "/healthz" || path == "/readyz";
        let signed = path == triggers::DBT_WEBHOOK_PATH;
        for operation in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            let mut codes = vec!["default"];
            if signed {
                codes.extend(["400", "401", "404", "405", "413"]);
            } else if !public {
                codes.extend(["400", "401", "403", "404", "405", "413", "415"]);
            }
            for code in codes {
                operation
                    .responses
                    .responses
                    .entry(code.to_string())
                    .or_insert_with(|| RefOr::Ref(Ref::from_response_name("Error")));
            }
            if public {
                operation.security = Some(Vec::new());
            }
        }
    }
}

/// This API's OpenAPI 3.1 document.
#[utoipa::path(get, path = "/openapi.json", tag = "system",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object)))]
async fn openapi_json(State(state): State<AppState>) -> Response {
    match state.openapi.get() {
        Some(document) => Json(document).into_response(),
        None => Json(openapi()).into_response(),
    }
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "system", security(()),
    responses((status = 200, description = "Alive", body = views::Health)))]
async fn healthz() -> Json<views::Health> {
    Json(views::Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    })
}

/// Prometheus scrape endpoint (OpenMetrics text).
#[utoipa::path(get, path = "/metrics", tag = "system",
    responses((status = 200, description = "OpenMetrics text", content_type = "application/openmetrics-text", body = String)))]
async fn metrics() -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            sluice_engine::metrics::CONTENT_TYPE,
        )],
        sluice_engine::metrics::encode(),
    )
}

/// Readiness: the metadata store answers and the snapshot store can be listed.
#[utoipa::path(get, path = "/readyz", tag = "system", security(()),
    responses(
        (status = 200, description = "Ready", body = views::Readiness),
        (status = 503, description = "A store does not answer", body = views::Readiness)))]
async fn readyz(State(state): State<AppState>) -> Response {
    let engine = state.service.engine();
    let metadata = engine
        .metadata()
        .catalog_version()
        .await
        .map(|_| ())
        .map_err(|e| {
            tracing::warn!(error = %e, "readiness: the metadata store does not answer");
        });
    let snapshots = engine.snapshots().list("models").await.map(|_| ()).map_err(|e| {
        tracing::warn!(error = %e, "readiness: the snapshot store cannot be listed");
    });
    let status = if metadata.is_ok() && snapshots.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    // Anyone may ask (a load balancer has no token): the answer says which store, the log why.
    let state_of = |ok: bool| {
        if ok {
            "ok".to_string()
        } else {
            "unavailable (the server's log says why)".to_string()
        }
    };
    let body = views::Readiness {
        metadata_store: state_of(metadata.is_ok()),
        snapshot_store: state_of(snapshots.is_ok()),
    };
    (status, Json(body)).into_response()
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route; `GET /api/v1/openapi.json` lists them")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method; `GET /api/v1/openapi.json` lists what it takes",
    )
}

fn panicked(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "sluice failed to answer this request; the server's log says why",
    )
    .into_response()
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: Arc<Service>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    tracing::info!(address = ?listener.local_addr().ok(), "serving the sluice API");
    let (router, state) = app(service);
    if !state.auth.has_tokens(&state).await {
        tracing::warn!(
            "no API tokens exist, so every API request but /healthz and /readyz is refused; create one with `sluice token create NAME --scope admin`"
        );
    }
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}
