//! The connector types this build has and the JSON Schema of their options: what the console's
//! source and destination forms, and its mapping form's actions and options, are built from.

use axum::extract::State;
use sluice_engine::connector_types::ConnectorCatalog;

use crate::AppState;

/// Every source and destination type of this build: title, summary, the JSON Schema (2020-12)
/// of its options with secrets marked `writeOnly`, and a destination's actions and mapping
/// options.
#[utoipa::path(get, path = "/connectors", tag = "sources",
    responses((status = 200, description = "The connector types", body = ConnectorCatalog)))]
pub async fn connector_catalog(State(state): State<AppState>) -> axum::Json<ConnectorCatalog> {
    axum::Json(state.service.connector_catalog())
}
