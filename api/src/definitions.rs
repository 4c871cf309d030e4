//! Sources, models, destinations and mappings: list, get, create, update, delete; connection
//! tests, model previews, enabling and disabling mappings. Every rule lives in the engine
//! ([`sluice_engine::service::Service`]): these handlers only move JSON.

use std::borrow::Cow;

use axum::Extension;
use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value;
use sluice_engine::catalog::Kind;
use utoipa::openapi::{RefOr, schema::Schema};
use utoipa::{IntoParams, PartialSchema, ToSchema};

use crate::AppState;
use crate::cache::{FOR_OTHERS, to_json};
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, ApiPath, ApiQuery, optional_body};
use crate::views::{
    Column, Definition, DefinitionPage, FieldAlias, FieldFormat, Preview, RecordShape, TestResult,
};

/// Most items one page of definitions holds.
const MAX_PAGE: usize = 1000;

/// A source as sluice.yaml writes it: `type` and its options.
pub struct SourceSpec;
/// A destination as sluice.yaml writes it: `type` and its options.
pub struct DestinationSpec;

impl PartialSchema for SourceSpec {
    fn schema() -> RefOr<Schema> {
        sluice_engine::openapi::connector_schema("source")
    }
}
impl ToSchema for SourceSpec {
    fn name() -> Cow<'static, str> {
        "SourceSpec".into()
    }
}
impl PartialSchema for DestinationSpec {
    fn schema() -> RefOr<Schema> {
        sluice_engine::openapi::connector_schema("destination")
    }
}
impl ToSchema for DestinationSpec {
    fn name() -> Cow<'static, str> {
        "DestinationSpec".into()
    }
}

/// Paging of a list of definitions.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Items per page (default 100, at most 1000).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

fn page(
    items: Vec<sluice_engine::service::DefinitionView>,
    params: &ListParams,
) -> ApiResult<DefinitionPage> {
    let limit = params.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::bad_request(format!("`limit` is 1 to {MAX_PAGE}")));
    }
    let after = params.cursor.as_deref().unwrap_or("");
    let mut rest: Vec<Definition> = items
        .into_iter()
        .filter(|d| d.name.as_str() > after)
        .take(limit + 1)
        .map(Definition::from)
        .collect();
    let next_cursor = if rest.len() > limit {
        rest.truncate(limit);
        rest.last().map(|d| d.name.clone())
    } else {
        None
    };
    Ok(DefinitionPage {
        items: rest,
        next_cursor,
    })
}

async fn list(state: &AppState, uri: &Uri, kind: Kind, params: &ListParams) -> ApiResult<Response> {
    let generation = state.service.generation();
    state
        .cache
        .json(&uri.to_string(), generation, FOR_OTHERS, || async {
            state.service.current().await?;
            to_json(&page(state.service.definitions(kind), params)?)
        })
        .await
}

async fn get_one(state: &AppState, uri: &Uri, kind: Kind, name: &str) -> ApiResult<Response> {
    let generation = state.service.generation();
    state
        .cache
        .json(&uri.to_string(), generation, FOR_OTHERS, || async {
            state.service.current().await?;
            to_json(&Definition::from(state.service.definition(kind, name)?))
        })
        .await
}

async fn create(
    state: &AppState,
    kind: Kind,
    name: String,
    definition: Value,
    who: &str,
) -> ApiResult<Response> {
    let view = state.service.put(kind, &name, definition, true).await?;
    tracing::info!(kind = %kind, name, token = who, "definition created");
    let location = format!("/api/v1/{}/{}", kind.section(), view.name);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        axum::Json(Definition::from(view)),
    )
        .into_response())
}

async fn update(
    state: &AppState,
    kind: Kind,
    name: String,
    definition: Value,
    who: &str,
) -> ApiResult<axum::Json<Definition>> {
    let view = state.service.put(kind, &name, definition, false).await?;
    tracing::info!(kind = %kind, name, token = who, "definition updated");
    Ok(axum::Json(view.into()))
}

async fn delete(state: &AppState, kind: Kind, name: &str, who: &str) -> ApiResult<StatusCode> {
    state.service.delete(kind, name).await?;
    tracing::info!(kind = %kind, name, token = who, "definition deleted");
    Ok(StatusCode::NO_CONTENT)
}

type Caller = Extension<std::sync::Arc<crate::auth::Caller>>;

/// The five handlers of one kind of definition, with their documentation.
macro_rules! collection {
    (
        $kind:expr, $section:literal, $tag:literal, $spec:ty,
        $create_body:ident, $update_body:ident,
        $list:ident, $get:ident, $create:ident, $update:ident, $delete:ident
    ) => {
        #[doc = concat!("Creates a ", $tag, " (`name` and its `definition`, as in sluice.yaml).")]
        #[derive(Debug, Deserialize, ToSchema)]
        #[serde(deny_unknown_fields)]
        pub struct $create_body {
            /// Letters, digits, `_` and `-`, starting with a letter or `_`; at most 64.
            pub name: String,
            #[schema(value_type = $spec)]
            pub definition: Value,
        }

        #[doc = concat!("Replaces a ", $tag, "'s definition.")]
        #[derive(Debug, Deserialize, ToSchema)]
        #[serde(deny_unknown_fields)]
        pub struct $update_body {
            #[schema(value_type = $spec)]
            pub definition: Value,
        }

        #[doc = concat!("Lists the ", $section, " (from sluice.yaml and the API), by name.")]
        #[utoipa::path(get, path = concat!("/", $section), tag = $tag, params(ListParams),
            responses((status = 200, description = "One page", body = DefinitionPage)))]
        pub async fn $list(
            State(state): State<AppState>,
            uri: Uri,
            ApiQuery(params): ApiQuery<ListParams>,
        ) -> ApiResult<Response> {
            list(&state, &uri, $kind, &params).await
        }

        #[doc = concat!("One ", $tag, ".")]
        #[utoipa::path(get, path = concat!("/", $section, "/{name}"), tag = $tag,
            params(("name" = String, Path)),
            responses((status = 200, description = "The definition", body = Definition)))]
        pub async fn $get(
            State(state): State<AppState>,
            uri: Uri,
            ApiPath(name): ApiPath<String>,
        ) -> ApiResult<Response> {
            get_one(&state, &uri, $kind, &name).await
        }

        #[doc = concat!("Creates a ", $tag, "; it persists in the metadata store. Secrets are sealed at rest and never returned.")]
        #[utoipa::path(post, path = concat!("/", $section), tag = $tag,
            request_body = $create_body,
            responses(
                (status = 201, description = "Created", body = Definition),
                (status = 409, description = "The name is taken (or defined in sluice.yaml)", body = crate::error::ErrorBody),
                (status = 422, description = "The definition cannot be used as it is", body = crate::error::ErrorBody)))]
        pub async fn $create(
            State(state): State<AppState>,
            Extension(caller): Caller,
            ApiJson(body): ApiJson<$create_body>,
        ) -> ApiResult<Response> {
            create(&state, $kind, body.name, body.definition, &caller.token_name).await
        }

        #[doc = concat!("Replaces a ", $tag, " made through the API. A secret sent as `\"********\"` keeps its stored value.")]
        #[utoipa::path(put, path = concat!("/", $section, "/{name}"), tag = $tag,
            params(("name" = String, Path)),
            request_body = $update_body,
            responses(
                (status = 200, description = "Replaced", body = Definition),
                (status = 409, description = "Defined in sluice.yaml", body = crate::error::ErrorBody),
                (status = 422, description = "The definition cannot be used as it is", body = crate::error::ErrorBody)))]
        pub async fn $update(
            State(state): State<AppState>,
            Extension(caller): Caller,
            ApiPath(name): ApiPath<String>,
            ApiJson(body): ApiJson<$update_body>,
        ) -> ApiResult<axum::Json<Definition>> {
            update(&state, $kind, name, body.definition, &caller.token_name).await
        }

        #[doc = concat!("Deletes a ", $tag, " made through the API (refused while something uses it).")]
        #[utoipa::path(delete, path = concat!("/", $section, "/{name}"), tag = $tag,
            params(("name" = String, Path)),
            responses(
                (status = 204, description = "Deleted"),
                (status = 409, description = "Defined in sluice.yaml, in use, or running", body = crate::error::ErrorBody)))]
        pub async fn $delete(
            State(state): State<AppState>,
            Extension(caller): Caller,
            ApiPath(name): ApiPath<String>,
        ) -> ApiResult<StatusCode> {
            delete(&state, $kind, &name, &caller.token_name).await
        }
    };
}

collection!(
    Kind::Source,
    "sources",
    "sources",
    SourceSpec,
    CreateSource,
    UpdateSource,
    list_sources,
    get_source,
    create_source,
    update_source,
    delete_source
);
collection!(
    Kind::Destination,
    "destinations",
    "destinations",
    DestinationSpec,
    CreateDestination,
    UpdateDestination,
    list_destinations,
    get_destination,
    create_destination,
    update_destination,
    delete_destination
);
collection!(
    Kind::Model,
    "models",
    "models",
    sluice_engine::config::ModelConfig,
    CreateModel,
    UpdateModel,
    list_models,
    get_model,
    create_model,
    update_model,
    delete_model
);
collection!(
    Kind::Mapping,
    "mappings",
    "mappings",
    sluice_engine::config::MappingConfig,
    CreateMapping,
    UpdateMapping,
    list_mappings,
    get_mapping,
    create_mapping,
    update_mapping,
    delete_mapping
);

/// Enables or disables a mapping.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MappingSwitch {
    /// `false`: neither the scheduler nor a trigger runs it; `true`: its next run sends
    /// everything that changed since its last successful run.
    pub enabled: bool,
}

/// Enables or disables a mapping (from sluice.yaml or the API).
#[utoipa::path(patch, path = "/mappings/{name}", tag = "mappings",
    params(("name" = String, Path)),
    request_body = MappingSwitch,
    responses((status = 200, description = "The mapping", body = Definition)))]
pub async fn patch_mapping(
    State(state): State<AppState>,
    Extension(caller): Caller,
    ApiPath(name): ApiPath<String>,
    ApiJson(body): ApiJson<MappingSwitch>,
) -> ApiResult<axum::Json<Definition>> {
    let view = state.service.set_enabled(&name, body.enabled).await?;
    tracing::info!(
        mapping = name,
        enabled = body.enabled,
        token = caller.token_name,
        "mapping switched"
    );
    Ok(axum::Json(view.into()))
}

/// Connects to a source and reports its own error when it cannot.
#[utoipa::path(post, path = "/sources/{name}/test", tag = "sources",
    params(("name" = String, Path)),
    responses((status = 200, description = "The outcome (`ok: false` with the source's error when it failed)", body = TestResult)))]
pub async fn test_source(
    State(state): State<AppState>,
    Extension(caller): Caller,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<axum::Json<TestResult>> {
    let engine = state.service.current().await?;
    let source = engine.source(&name)?.clone();
    let what = format!("the connection test of source `{name}`");
    connection_test(&engine, &caller, what, async move { source.check().await }).await
}

/// Connects to a destination (and authenticates) and reports its error when it cannot.
#[utoipa::path(post, path = "/destinations/{name}/test", tag = "destinations",
    params(("name" = String, Path)),
    responses((status = 200, description = "The outcome (`ok: false` with the destination's error when it failed)", body = TestResult)))]
pub async fn test_destination(
    State(state): State<AppState>,
    Extension(caller): Caller,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<axum::Json<TestResult>> {
    let engine = state.service.current().await?;
    let destination = engine.destination(&name)?.clone();
    let what = format!("the connection test of destination `{name}`");
    connection_test(&engine, &caller, what, async move { destination.check().await }).await
}

/// Runs a connection check as a probe for `caller` (bounded in time and number, off the
/// control plane) and answers with its outcome.
async fn connection_test<E: std::fmt::Display + Send + 'static>(
    engine: &sluice_engine::Engine,
    caller: &crate::auth::Caller,
    what: String,
    check: impl std::future::Future<Output = Result<(), E>> + Send + 'static,
) -> ApiResult<axum::Json<TestResult>> {
    let checked = engine
        .workloads()
        .probe(&caller.token_name, what, async move { Ok(check.await) })
        .await;
    connection_outcome(checked)
}

/// A connection test's answer: a system that never answered within the time limit is a
/// failed test, like any other error of the system; being refused (too many tests at once)
/// is an error answer.
fn connection_outcome<E: std::fmt::Display>(
    checked: sluice_engine::Result<Result<(), E>>,
) -> ApiResult<axum::Json<TestResult>> {
    match checked {
        Ok(checked) => Ok(axum::Json(outcome(checked))),
        Err(sluice_engine::EngineError::TimedOut { message, .. }) => Ok(axum::Json(TestResult {
            ok: false,
            error: Some(message),
        })),
        Err(e) => Err(e.into()),
    }
}

/// `POST /api/v1/connection-tests`: a source or destination to try before it is saved.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DraftConnection {
    /// `source` or `destination`.
    #[schema(pattern = "^(source|destination)$")]
    pub kind: String,
    /// The name it would be saved as; a secret sent as `"********"` keeps the value stored for
    /// an API-made one of that name.
    pub name: String,
    /// Its definition, as `POST /sources` or `POST /destinations` would take it.
    #[schema(value_type = SourceSpec)]
    pub definition: Value,
}

/// Connects with a source or destination definition that is not saved (what a form's "Test
/// connection" calls before "Add"), and reports the system's own error. Nothing is saved.
#[utoipa::path(post, path = "/connection-tests", tag = "sources",
    request_body = DraftConnection,
    responses(
        (status = 200, description = "The outcome (`ok: false` with the system's error, or why the options cannot be used)", body = TestResult),
        (status = 409, description = "The name is defined in sluice.yaml", body = crate::error::ErrorBody)))]
pub async fn test_draft_connection(
    State(state): State<AppState>,
    Extension(caller): Caller,
    ApiJson(body): ApiJson<DraftConnection>,
) -> ApiResult<axum::Json<TestResult>> {
    let kind = match body.kind.as_str() {
        "source" => Kind::Source,
        "destination" => Kind::Destination,
        other => {
            return Err(ApiError::bad_request(format!(
                "`kind` is `source` or `destination`, not `{other}`"
            )));
        }
    };
    let checked = state
        .service
        .test_draft(kind, &body.name, body.definition, &caller.token_name)
        .await?;
    Ok(axum::Json(outcome(checked)))
}

/// `POST /api/v1/destinations/{name}/shape`: an action and mapping options to check.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShapeRequest {
    /// As a mapping's `action:` (the destination's default when absent).
    pub action: Option<String>,
    /// As a mapping's `options:`.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub options: serde_json::Map<String, Value>,
}

/// Checks an action and mapping options against a destination, as a mapping using them would
/// be, and describes the records it writes: top-level fields, where other fields go, what
/// identifies a record and what must be filled. Nothing is sent or saved.
#[utoipa::path(post, path = "/destinations/{name}/shape", tag = "destinations",
    params(("name" = String, Path)),
    request_body(content = Option<ShapeRequest>, description = "Optional; the default action with no options by default"),
    responses(
        (status = 200, description = "The record layout", body = RecordShape),
        (status = 422, description = "The destination refuses the action or options", body = crate::error::ErrorBody)))]
pub async fn destination_shape(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    body: bytes::Bytes,
) -> ApiResult<axum::Json<RecordShape>> {
    let request = optional_body::<ShapeRequest>(&body)?;
    let engine = state.service.current().await?;
    let destination = engine.destination(&name)?;
    let spec = destination
        .action(request.action.as_deref(), &request.options)
        .map_err(|message| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_definition", message))?;
    let Some(spec) = spec else {
        // sluice's envelope: every change with its operation, deletes included.
        return Ok(axum::Json(RecordShape {
            deletes: true,
            ..RecordShape::default()
        }));
    };
    let shape = spec.shape;
    let mut filled: Vec<String> = shape.fixed.into_iter().map(|(field, _)| field).collect();
    filled.extend(shape.message_id);
    Ok(axum::Json(RecordShape {
        action: Some(spec.name),
        modes: spec.modes.iter().map(|m| m.to_string()).collect(),
        deletes: spec.deletes,
        events: spec.events,
        top_level: shape.top_level,
        container: shape.container,
        identity: shape.identity,
        required: shape.required,
        aliases: shape
            .aliases
            .into_iter()
            .map(|(column, field)| FieldAlias { column, field })
            .collect(),
        filled,
        formats: shape
            .formats
            .into_iter()
            .map(|(field, format)| FieldFormat { field, format })
            .collect(),
    }))
}

/// A connection test's outcome, with the system's own error when it failed.
fn outcome(checked: Result<(), impl std::fmt::Display>) -> TestResult {
    match checked {
        Ok(()) => TestResult {
            ok: true,
            error: None,
        },
        Err(e) => TestResult {
            ok: false,
            // A system's error may quote the credential it refused.
            error: Some(sluice_engine::secrets::scrub_known(&e.to_string()).into_owned()),
        },
    }
}

/// How many rows a preview shows.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PreviewRequest {
    /// Rows to show (default 10, at most 1000).
    #[schema(minimum = 0, maximum = 1000)]
    #[serde(default = "ten")]
    pub limit: u32,
}

fn ten() -> u32 {
    10
}

impl Default for PreviewRequest {
    fn default() -> Self {
        Self { limit: ten() }
    }
}

/// Runs a model's query and returns its first rows and column types (no snapshot is written).
#[utoipa::path(post, path = "/models/{name}/preview", tag = "models",
    params(("name" = String, Path)),
    request_body(content = Option<PreviewRequest>, description = "Optional; `{\"limit\": 10}` by default"),
    responses(
        (status = 200, description = "Rows and column types", body = Preview),
        (status = 422, description = "The query failed in its source", body = crate::error::ErrorBody)))]
pub async fn preview_model(
    State(state): State<AppState>,
    Extension(caller): Caller,
    ApiPath(name): ApiPath<String>,
    body: bytes::Bytes,
) -> ApiResult<axum::Json<Preview>> {
    let limit = optional_body::<PreviewRequest>(&body)?.limit;
    if limit > 1000 {
        return Err(ApiError::bad_request("`limit` is at most 1000"));
    }
    let engine = state.service.current().await?;
    let on = engine.clone();
    let preview = engine
        .workloads()
        .probe(
            &caller.token_name,
            format!("the preview of model `{name}`"),
            async move { on.preview(&name, limit as usize).await },
        )
        .await?;
    preview_view(preview)
}

/// A preview as the API shows it: column names and types, and rows as JSON objects.
fn preview_view(preview: sluice_engine::Preview) -> ApiResult<axum::Json<Preview>> {
    let columns = preview
        .schema
        .fields()
        .iter()
        .map(|f| Column {
            name: f.name().clone(),
            data_type: f.data_type().to_string(),
            nullable: f.is_nullable(),
        })
        .collect();
    let rows = crate::rows::to_json_rows(&preview.batches)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "unrenderable", e))?;
    Ok(axum::Json(Preview {
        sql: preview.sql,
        columns,
        rows,
    }))
}

/// `POST /api/v1/mappings/{name}/test-record`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TestRecordRequest {
    /// The record's primary key, one value per key column in order, compared as text (the
    /// model's first row when absent).
    pub key: Option<Vec<String>>,
    /// `added` (default), `updated` or `deleted`: the operation to render it as.
    pub op: Option<String>,
}

/// Renders one model row through the mapping (a "test record"): runs the model's query for
/// that key and returns the exact payload, sending nothing.
#[utoipa::path(post, path = "/mappings/{name}/test-record", tag = "mappings",
    params(("name" = String, Path)),
    request_body(content = Option<TestRecordRequest>, description = "Optional; the model's first row, as added, by default"),
    responses(
        (status = 200, description = "The request(s) that would carry the record", body = sluice_engine::PayloadPreview),
        (status = 422, description = "The query failed in its source", body = crate::error::ErrorBody)))]
pub async fn test_record(
    State(state): State<AppState>,
    Extension(caller): Caller,
    ApiPath(name): ApiPath<String>,
    body: bytes::Bytes,
) -> ApiResult<axum::Json<sluice_engine::PayloadPreview>> {
    let request = optional_body::<TestRecordRequest>(&body)?;
    let op = match request.op.as_deref() {
        None => sluice_engine::Op::Added,
        Some(text) => sluice_engine::Op::parse(text).ok_or_else(|| {
            ApiError::bad_request(format!("`op` is added, updated or deleted, not `{text}`"))
        })?,
    };
    let engine = state.service.current().await?;
    let on = engine.clone();
    let preview = engine
        .workloads()
        .probe(
            &caller.token_name,
            format!("the test record of mapping `{name}`"),
            async move { on.preview_payload(&name, request.key.as_deref(), op).await },
        )
        .await?;
    Ok(axum::Json(preview))
}

/// `POST /api/v1/sources/{name}/preview`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SqlPreviewRequest {
    /// A query in the source's own SQL (templates such as `{{last_sync_time}}` allowed).
    pub sql: String,
    /// Rows to return (default 10).
    #[schema(minimum = 0, maximum = 1000)]
    #[serde(default = "ten")]
    pub limit: u32,
}

/// Runs a query that is not a model yet in a source and returns its first rows and column
/// types: what a model editor shows before its primary key is picked. Nothing is saved.
#[utoipa::path(post, path = "/sources/{name}/preview", tag = "sources",
    params(("name" = String, Path)),
    request_body = SqlPreviewRequest,
    responses(
        (status = 200, description = "Rows and column types", body = Preview),
        (status = 422, description = "The query failed in its source", body = crate::error::ErrorBody)))]
pub async fn preview_source_sql(
    State(state): State<AppState>,
    Extension(caller): Caller,
    ApiPath(name): ApiPath<String>,
    ApiJson(request): ApiJson<SqlPreviewRequest>,
) -> ApiResult<axum::Json<Preview>> {
    if request.limit > 1000 {
        return Err(ApiError::bad_request("`limit` is at most 1000"));
    }
    if request.sql.trim().is_empty() {
        return Err(ApiError::bad_request("`sql` is empty"));
    }
    let engine = state.service.current().await?;
    let on = engine.clone();
    let what = format!("the preview of a query in source `{name}`");
    let preview = engine
        .workloads()
        .probe(&caller.token_name, what, async move {
            on.preview_sql(&name, &request.sql, request.limit as usize).await
        })
        .await?;
    preview_view(preview)
}
