//! The dbt models a sluice model can read, from the project's dbt manifest: what the console's
//! model form offers instead of pasted SQL.

use axum::extract::State;
use axum::response::Json;
use serde::Serialize;
use utoipa::ToSchema;

use crate::AppState;
use crate::error::ApiResult;

/// `GET /api/v1/dbt/models`.
#[derive(Debug, Serialize, ToSchema)]
pub struct DbtModels {
    /// The manifest in use; `null` when the project names none (`dbt.manifest`).
    pub manifest: Option<DbtManifestInfo>,
    pub models: Vec<DbtModelView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DbtManifestInfo {
    /// When dbt wrote it.
    pub generated_at: String,
    pub project_name: Option<String>,
    pub dbt_version: Option<String>,
}

/// A model (seed, snapshot) of the dbt project.
#[derive(Debug, Serialize, ToSchema)]
pub struct DbtModelView {
    /// What `dbt_model:` takes: `name`, or `package.name` for another package's.
    pub reference: String,
    pub name: String,
    pub package: String,
    pub unique_id: String,
    /// The relation dbt builds, as a query names it.
    pub relation: String,
    pub description: String,
    /// The columns the dbt project documents.
    pub columns: Vec<DbtColumnView>,
    /// The key sluice takes from dbt; `null` when dbt names none (or several).
    pub primary_key: Option<Vec<String>>,
    /// Where the key comes from (`its unique test on id`), or why there is none.
    pub key_note: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DbtColumnView {
    pub name: String,
    pub description: String,
    pub data_type: Option<String>,
}

/// The dbt models a sluice model can read (`dbt_model:`), from the manifest in use (taken in
/// anew when dbt writes it while `sluice serve` runs).
#[utoipa::path(get, path = "/dbt/models", tag = "models",
    responses((status = 200, description = "The manifest's models", body = DbtModels)))]
pub async fn dbt_models(State(state): State<AppState>) -> ApiResult<Json<DbtModels>> {
    let engine = state.service.current().await?;
    let project = engine.project();
    let Some(manifest) = project.dbt_manifest() else {
        return Ok(Json(DbtModels {
            manifest: None,
            models: Vec::new(),
        }));
    };
    let root = manifest.metadata.project_name.clone();
    let models = manifest
        .models()
        .into_iter()
        .map(|(model, problem)| {
            let package = model.package().to_string();
            let reference = if root.as_deref() == Some(package.as_str()) || package.is_empty() {
                model.name.clone()
            } else {
                format!("{package}.{}", model.name)
            };
            let (primary_key, key_note) = match (model.primary_key, problem) {
                (Some((key, origin)), _) => (Some(key), format!("from {origin}")),
                (None, problem) => (None, problem.unwrap_or_default()),
            };
            DbtModelView {
                reference,
                name: model.name,
                package,
                unique_id: model.unique_id,
                relation: model.relation,
                description: model.description,
                columns: model
                    .columns
                    .into_iter()
                    .map(|c| DbtColumnView {
                        name: c.name,
                        description: c.description,
                        data_type: c.data_type,
                    })
                    .collect(),
                primary_key,
                key_note,
            }
        })
        .collect();
    Ok(Json(DbtModels {
        manifest: Some(DbtManifestInfo {
            generated_at: manifest.metadata.generated_at.clone(),
            project_name: root,
            dbt_version: manifest.metadata.dbt_version.clone(),
        }),
        models,
    }))
}
