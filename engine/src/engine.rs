//! The engine: a loaded project with its connectors, snapshot store and metadata store.

use std::sync::Arc;

use futures::StreamExt;
use indexmap::IndexMap;
use sluice_snapshots::SnapshotStore;

use crate::catalog::{CatalogState, Kind, Origin, Problem, StoredDefinition};
use crate::config::{ConnectorConfig, MappingConfig, ModelConfig, ModelKind, Op, Project};
use crate::destination::{ActionSpec, Destination, SyncMode};
use crate::error::{EngineError, Result, SourceError};
use crate::metadata::MetadataStore;
use crate::secrets::SecretKey;
use crate::source::{ConnectorEnv, ConnectorFactory, ModelQuery, Source};

/// File name of the SQLite metadata store inside the state directory.
pub const METADATA_FILE: &str = "sluice.db";

pub struct Engine {
    /// The project as it runs: `sluice.yaml` with the API's definitions taken in.
    pub(crate) project: Arc<Project>,
    /// `sluice.yaml` alone, as loaded.
    pub(crate) file: Arc<Project>,
    /// The API's definitions this engine was built from.
    pub(crate) catalog: Arc<CatalogState>,
    /// API definitions that could not be taken in, and why.
    pub(crate) problems: Vec<Problem>,
    /// Seals and opens the API's secrets (`SLUICE_SECRET_KEY`).
    pub(crate) secret_key: Option<SecretKey>,
    pub(crate) snapshots: SnapshotStore,
    pub(crate) metadata: MetadataStore,
    pub(crate) sources: IndexMap<String, Arc<dyn Source>>,
    pub(crate) destinations: IndexMap<String, Arc<dyn Destination>>,
    /// Each mapping's destination action, checked when the project was opened (`None` for
    /// destinations that take sluice's envelope).
    pub(crate) actions: IndexMap<String, Option<ActionSpec>>,
    /// Set by SIGTERM/Ctrl-C: runs stop at their next commit point.
    pub(crate) shutdown: crate::run::Shutdown,
    pub(crate) alert_sender: Option<Arc<dyn crate::alerts::AlertSender>>,
    /// Runs of this process and their stop switches, shared by every engine built from this
    /// one (a run started before a definition changed can still be cancelled).
    pub(crate) controls: Arc<crate::run::RunControls>,
    /// Where runs and interactive work run, and how much interactive work is admitted.
    pub(crate) workloads: Arc<crate::workload::Workloads>,
}

impl Engine {
    /// Opens the stores, takes in the definitions made through the API, and builds every source
    /// and destination (so a misconfigured one is reported before anything runs).
    pub async fn open(project: Project, connectors: &dyn ConnectorFactory) -> Result<Self> {
        let secret_key = SecretKey::from_env().map_err(|e| EngineError::Usage(e.to_string()))?;
        Self::open_with_key(project, connectors, secret_key).await
    }

    /// [`Engine::open`] with `secret_key` sealing the API's secrets instead of the one in
    /// `SLUICE_SECRET_KEY` (for embedding sluice, and tests).
    pub async fn open_with_key(
        mut project: Project,
        connectors: &dyn ConnectorFactory,
        secret_key: Option<SecretKey>,
    ) -> Result<Self> {
        if project.dbt_pending()
            && let Some(dbt) = project.config.dbt.clone()
        {
            let bytes = crate::dbt::read_manifest(&dbt)
                .await
                .map_err(|m| project.error_at(&["dbt", "manifest"], format!("the dbt manifest: {m}")))?;
            project.take_in_dbt(&bytes)?;
            project.validate()?;
        }
        let state_dir = project.state_dir();
        let snapshot_location = match &project.config.snapshot_store {
            Some(location) => location.expose().to_string(),
            None => state_dir.join("snapshots").display().to_string(),
        };
        let options = project
            .config
            .snapshot_store_options
            .iter()
            .map(|(k, v)| (k.clone(), v.expose().to_string()));
        let snapshots = SnapshotStore::open(&snapshot_location, &project.base_dir, options)
            .map_err(|e| project.error_at(&["snapshot_store"], e.to_string()))?
            .with_temp_dir(state_dir.join("tmp"));
        let metadata = MetadataStore::open(
            project.config.metadata_store.as_ref().map(|m| m.expose()),
            &state_dir.join(METADATA_FILE),
        )
        .await?
        .with_lease_ttl(project.config.lease_ttl);
        let workloads = crate::workload::Workloads::inline(&project.config.api.limits, state_dir.join("tmp"))
            .map_err(|e| project.error_at(&["api", "limits"], e.to_string()))?;
        let catalog = Arc::new(metadata.catalog().await?);
        let engine = Self::assemble(
            Arc::new(project),
            catalog,
            Shared {
                snapshots,
                metadata,
                secret_key,
                shutdown: Default::default(),
                alert_sender: connectors.alert_sender(),
                controls: Default::default(),
                workloads: Arc::new(workloads),
            },
            connectors,
            None,
        )?;
        for problem in &engine.problems {
            tracing::warn!(
                kind = %problem.kind,
                name = problem.name,
                "a definition made through the API is not in use: {}",
                problem.message
            );
        }
        Ok(engine)
    }

    /// This engine with `catalog` in place of its API definitions (sources and destinations
    /// whose settings did not change are kept, with their connections and rate limits).
    pub fn with_catalog(&self, catalog: CatalogState, connectors: &dyn ConnectorFactory) -> Result<Self> {
        Self::assemble(
            self.file.clone(),
            Arc::new(catalog),
            self.shared(),
            connectors,
            Some(self),
        )
    }

    /// What every engine built from this one shares with it: stores, key, stop switches.
    fn shared(&self) -> Shared {
        Shared {
            snapshots: self.snapshots.clone(),
            metadata: self.metadata.clone(),
            secret_key: self.secret_key.clone(),
            shutdown: self.shutdown.clone(),
            alert_sender: self.alert_sender.clone(),
            controls: self.controls.clone(),
            workloads: self.workloads.clone(),
        }
    }

    /// This engine with the dbt manifest read again, when dbt wrote a new one (its
    /// `generated_at` moved): models that read dbt models take the relations and keys it gives.
    /// `Ok(None)` when the manifest is the one in use, or gone (dbt writes it anew at the start
    /// of each invocation); an error when the new manifest cannot be used (a model sluice
    /// reads is gone, say), and then this engine stays in use.
    pub async fn with_new_manifest(&self, connectors: &dyn ConnectorFactory) -> Result<Option<Self>> {
        let Some((dbt, location)) = self
            .file
            .config
            .dbt
            .as_ref()
            .and_then(|dbt| Some((dbt, dbt.manifest_location()?)))
        else {
            return Ok(None);
        };
        let manifest_error = |m: String| {
            self.file
                .error_at(&["dbt", "manifest"], format!("the dbt manifest: {m}"))
        };
        let Some(bytes) = crate::dbt::read_artifact(dbt, location, &self.file.base_dir)
            .await
            .map_err(manifest_error)?
        else {
            return Ok(None);
        };
        let manifest = crate::dbt::Manifest::parse(&bytes).map_err(manifest_error)?;
        if Some(manifest.metadata.generated_at.as_str()) == self.file.dbt_manifest_generated_at() {
            return Ok(None);
        }
        // (Parsed once: the manifest of a large dbt project runs to tens of megabytes.)
        let file = self.file.with_manifest(manifest)?;
        Self::assemble(
            Arc::new(file),
            self.catalog.clone(),
            self.shared(),
            connectors,
            Some(self),
        )
        .map(Some)
    }

    /// `sluice.yaml` with the API's definitions taken in; connectors built (or kept from
    /// `previous` when their settings are the same).
    fn assemble(
        file: Arc<Project>,
        catalog: Arc<CatalogState>,
        shared: Shared,
        connectors: &dyn ConnectorFactory,
        previous: Option<&Engine>,
    ) -> Result<Self> {
        let mut project = (*file).clone();
        let mut problems = Vec::new();
        let mut from_api: Vec<(Kind, String)> = Vec::new();
        let mut definitions: Vec<&StoredDefinition> = catalog.definitions.iter().collect();
        definitions.sort_by(|a, b| (a.kind, &a.name).cmp(&(b.kind, &b.name)));
        for definition in definitions {
            let (kind, name) = (definition.kind, definition.name.clone());
            if defines(&file, kind, &name) {
                problems.push(Problem {
                    kind,
                    name,
                    message: format!(
                        "{file} defines a {kind} of this name too; the file's is used (delete this one through the API)",
                        file = file.path.display()
                    ),
                });
                continue;
            }
            match take_in(&mut project, definition, shared.secret_key.as_ref()) {
                Ok(()) => {
                    project.mark_api_defined(kind.section(), &name);
                    from_api.push((kind, name));
                }
                Err(message) => problems.push(Problem { kind, name, message }),
            }
        }
        for (mapping, enabled) in &catalog.switches {
            if let Some(config) = project.config.mappings.get_mut(mapping) {
                config.enabled = *enabled;
            }
        }
        project.resolve_defaults();
        // Before any connector is built (its error may quote an option): the secrets this
        // project holds are scrubbed from every error, run record and log line from now on.
        crate::secrets::remember(project_secret_values(&project, connectors));
        let is_api = |kind: Kind, name: &str| from_api.iter().any(|(k, n)| *k == kind && n == name);
        let leave_out =
            |project: &mut Project, problems: &mut Vec<Problem>, kind: Kind, name: &str, message: String| {
                remove(project, kind, name);
                problems.push(Problem {
                    kind,
                    name: name.to_string(),
                    message,
                });
            };

        let env = ConnectorEnv {
            base_dir: project.base_dir.clone(),
            state_dir: project.state_dir(),
        };
        let sources = build_connectors(
            &mut project,
            &mut problems,
            Kind::Source,
            &from_api,
            |p| &p.config.sources,
            |name, config| {
                previous
                    .filter(|p| p.project.config.sources.get(name) == Some(config))
                    .and_then(|p| p.sources.get(name).cloned())
            },
            |name, config| connectors.source(name, config, &env),
        )?;
        let destinations = build_connectors(
            &mut project,
            &mut problems,
            Kind::Destination,
            &from_api,
            |p| &p.config.destinations,
            |name, config| {
                previous
                    .filter(|p| p.project.config.destinations.get(name) == Some(config))
                    .and_then(|p| p.destinations.get(name).cloned())
            },
            |name, config| connectors.destination(name, config, &env),
        )?;
        // The API's models that read dbt models, resolved against the manifest.
        for (kind, name) in from_api.clone() {
            if kind == Kind::Model
                && let Err(e) = project.resolve_dbt_model(&name)
            {
                leave_out(&mut project, &mut problems, kind, &name, e.message);
            }
        }
        // The API's models and mappings against what is left (a model whose source could not
        // be built is left out, and so are its mappings).
        for (kind, name) in &from_api {
            let checked = match kind {
                Kind::Model => project
                    .config
                    .models
                    .get(name)
                    .map(|m| project.validate_model(name, m)),
                Kind::Mapping => project
                    .config
                    .mappings
                    .get(name)
                    .map(|m| project.validate_mapping(name, m)),
                _ => None,
            };
            if let Some(Err(e)) = checked {
                leave_out(&mut project, &mut problems, *kind, name, e.message);
            }
        }
        let mut actions = IndexMap::new();
        for name in project.config.mappings.keys().cloned().collect::<Vec<_>>() {
            match resolve_action(&project, &name, &destinations) {
                Ok(Some((resolved, spec))) => {
                    project.config.mappings.insert(name.clone(), resolved);
                    actions.insert(name, spec);
                }
                Ok(None) => {}
                Err(e) if is_api(Kind::Mapping, &name) => {
                    leave_out(&mut project, &mut problems, Kind::Mapping, &name, e.message)
                }
                Err(e) => return Err(e.into()),
            }
        }
        for problem in &mut problems {
            problem.message = crate::secrets::scrub_known(&problem.message).into_owned();
        }
        Ok(Self {
            project: Arc::new(project),
            file,
            catalog,
            problems,
            secret_key: shared.secret_key,
            snapshots: shared.snapshots,
            metadata: shared.metadata,
            sources,
            destinations,
            actions,
            shutdown: shared.shutdown,
            alert_sender: shared.alert_sender,
            controls: shared.controls,
            workloads: shared.workloads,
        })
    }

    /// The API's definitions this engine was built from.
    pub fn catalog(&self) -> &CatalogState {
        &self.catalog
    }

    /// API definitions that are not in use, and why.
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    /// `sluice.yaml` alone, without the API's definitions.
    pub fn file_project(&self) -> &Project {
        &self.file
    }

    /// The key that seals the API's secrets, when `SLUICE_SECRET_KEY` is set.
    pub fn secret_key(&self) -> Option<&SecretKey> {
        self.secret_key.as_ref()
    }

    /// Where a definition comes from, if it exists (in use or not).
    pub fn origin(&self, kind: Kind, name: &str) -> Option<Origin> {
        if defines(&self.file, kind, name) {
            Some(Origin::File)
        } else if self.catalog.get(kind, name).is_some() {
            Some(Origin::Api)
        } else {
            None
        }
    }

    /// A mapping's config, or an error listing the mappings there are.
    pub fn mapping_config(&self, mapping: &str) -> Result<crate::config::MappingConfig> {
        self.project
            .mapping(mapping)
            .cloned()
            .ok_or_else(|| EngineError::Unknown {
                kind: "mapping",
                name: mapping.to_string(),
                available: self.project.config.mappings.keys().cloned().collect(),
            })
    }

    /// The destination action a mapping was checked against when the project was opened.
    pub fn action(&self, mapping: &str) -> Option<&ActionSpec> {
        self.actions.get(mapping).and_then(|a| a.as_ref())
    }

    pub fn project(&self) -> &Project {
        &self.project
    }

    pub fn snapshots(&self) -> &SnapshotStore {
        &self.snapshots
    }

    /// Requests that runs stop at their next commit point (the batch in flight finishes and is
    /// checkpointed; the runs end `interrupted`).
    /// Where this engine's runs and interactive work run (see [`crate::workload`]).
    pub fn workloads(&self) -> &crate::workload::Workloads {
        &self.workloads
    }

    pub fn shutdown(&self) -> &crate::run::Shutdown {
        &self.shutdown
    }

    pub fn metadata(&self) -> &MetadataStore {
        &self.metadata
    }

    pub fn source(&self, name: &str) -> Result<&Arc<dyn Source>> {
        self.sources.get(name).ok_or_else(|| EngineError::Unknown {
            kind: "source",
            name: name.to_string(),
            available: self.sources.keys().cloned().collect(),
        })
    }

    pub fn destination(&self, name: &str) -> Result<&Arc<dyn Destination>> {
        self.destinations.get(name).ok_or_else(|| EngineError::Unknown {
            kind: "destination",
            name: name.to_string(),
            available: self.destinations.keys().cloned().collect(),
        })
    }

    /// The first `limit` rows of a model and its column types, without writing a snapshot.
    pub async fn preview(&self, model: &str, limit: usize) -> Result<Preview> {
        let template = self.template_values(model, chrono::Utc::now()).await?;
        let query = self.model_query(model, &template)?;
        let config = self.project.model(model).ok_or_else(|| EngineError::Unknown {
            kind: "model",
            name: model.to_string(),
            available: self.project.config.models.keys().cloned().collect(),
        })?;
        self.preview_query(&config.source, query, limit).await
    }

    /// The first rows and column types of a query not saved as a model yet (the console's model
    /// editor, before a primary key is picked from its columns). Templates render as for a
    /// model that never ran (`{{last_sync_time}}` is the epoch).
    pub async fn preview_sql(&self, source: &str, sql: &str, limit: usize) -> Result<Preview> {
        let template = crate::model::TemplateValues {
            last_sync_time: None,
            run_started_at: chrono::Utc::now(),
        };
        let label = format!("(draft on {source})");
        let limit_error = |message: String| SourceError::Limit {
            model: label.clone(),
            message,
        };
        let rendered = crate::model::render_sql(sql, &template).map_err(limit_error)?;
        self.project
            .config
            .limits
            .check_query(&rendered)
            .map_err(limit_error)?;
        let query = ModelQuery::new(label.clone(), rendered);
        self.preview_query(source, query, limit).await
    }

    async fn preview_query(&self, source_name: &str, query: ModelQuery, limit: usize) -> Result<Preview> {
        let source = self.source(source_name)?;
        let limited = ModelQuery::new(query.model.clone(), source.limit_sql(&query.sql, limit as u64));
        let mut stream = source.extract(&limited).await?;
        let schema = stream.schema();
        let mut batches = Vec::new();
        let mut rows = 0;
        while rows < limit {
            let Some(batch) = stream.next().await else { break };
            let batch = batch.map_err(|e| SourceError::Query {
                model: query.model.clone(),
                source_name: source_name.to_string(),
                message: e.to_string(),
                hint: None,
            })?;
            let take = batch.num_rows().min(limit - rows);
            rows += take;
            batches.push(batch.slice(0, take));
        }
        Ok(Preview {
            sql: query.sql,
            schema,
            batches,
        })
    }

    /// One record of a mapping's model as the mapping would send it (the seed products' "test
    /// record"): the row whose primary key is `key` (values in key column order, compared as
    /// text), or the model's first row. Nothing is sent and nothing is written.
    pub async fn preview_payload(
        &self,
        mapping: &str,
        key: Option<&[String]>,
        op: Op,
    ) -> Result<PayloadPreview> {
        let config = self.mapping_config(mapping)?;
        let model = config.model.clone();
        let model_config = self
            .project
            .model(&model)
            .ok_or_else(|| EngineError::Internal(format!("model `{model}` vanished")))?;
        let key_columns = model_config.primary_key.0.clone();
        if let Some(key) = key
            && key.len() != key_columns.len()
        {
            return Err(EngineError::Usage(format!(
                "model `{model}`'s primary key has {} column(s) ({}); give one --key value for each, in that order",
                key_columns.len(),
                key_columns.join(", ")
            )));
        }
        let template = self.template_values(&model, chrono::Utc::now()).await?;
        let mut query = self.model_query(&model, &template)?;
        let source = self.source(&model_config.source)?;
        if key.is_none() {
            query.sql = source.limit_sql(&query.sql, 1);
        }
        let mut stream = source.extract(&query).await?;
        let query_error = |e: datafusion::error::DataFusionError| SourceError::Query {
            model: model.clone(),
            source_name: model_config.source.clone(),
            message: e.to_string(),
            hint: None,
        };
        let mut found = None;
        while let Some(batch) = stream.next().await {
            let batch = batch.map_err(query_error)?;
            let row = match key {
                None => (batch.num_rows() > 0).then_some(0),
                Some(values) => find_row(&batch, &key_columns, values)?,
            };
            if let Some(row) = row {
                found = Some(batch.slice(row, 1));
                break;
            }
        }
        drop(stream);
        let Some(row) = found else {
            return Err(EngineError::Usage(match key {
                Some(values) => format!("model `{model}` returned no row with key {}", values.join(", ")),
                None => format!("model `{model}` returned no rows"),
            }));
        };
        let plan = crate::mapping::MappingPlan::compile(
            mapping,
            &config,
            &model,
            &row.schema(),
            &key_columns,
            self.action(mapping),
        )?;
        let hashes = sluice_snapshots::hash::row_hashes(&row, &key_columns).unwrap_or_else(|_| vec![0]);
        let encoded = plan.encode(&row, vec![op], &hashes)?;
        let destination = self.destination(&config.destination)?;
        let run = crate::metadata::RunRecord::starting(mapping, &model, &config.destination, false);
        let writer = destination
            .open(&self.run_info(mapping, &config, &run, true))
            .await?;
        let policy = writer.policy();
        let blocked = self.blocked_records(encoded.unsendable, &encoded.records, &policy);
        let key_json: serde_json::Value =
            serde_json::from_slice(encoded.records.keys.get(0)).unwrap_or(serde_json::Value::Null);
        let preview = match blocked.into_iter().next() {
            Some(failure) => PayloadPreview {
                key: key_json,
                requests: Vec::new(),
                unsendable: Some(failure.error),
            },
            None => PayloadPreview {
                key: key_json,
                requests: writer.prepare(&encoded.records, 0..1).await,
                unsendable: None,
            },
        };
        writer.abort().await;
        Ok(preview)
    }

    /// Checks a mapping against its model's columns (as the model's query returns them now) and
    /// its destination's action: the checks a run makes before it sends anything.
    pub async fn check_mapping(&self, mapping: &str) -> Result<()> {
        let config = self.mapping_config(mapping)?;
        let preview = self.preview(&config.model, 0).await?;
        let key_columns = self
            .project
            .model(&config.model)
            .map(|m| m.primary_key.0.clone())
            .unwrap_or_default();
        crate::mapping::MappingPlan::compile(
            mapping,
            &config,
            &config.model,
            &preview.schema,
            &key_columns,
            self.action(mapping),
        )?;
        Ok(())
    }

    /// Checks that a model's query is valid and readable in its source, without reading rows.
    pub async fn check_model(&self, model: &str) -> Result<()> {
        let template = self.template_values(model, chrono::Utc::now()).await?;
        let query = self.model_query(model, &template)?;
        let config = self
            .project
            .model(model)
            .ok_or_else(|| EngineError::Internal(format!("model `{model}` vanished")))?;
        match self.project.dbt_models.get(model) {
            // Its 0-row preview is the query's check too.
            Some(dbt) => self.check_dbt_columns(model, dbt, &config.primary_key.0).await,
            None => Ok(self.source(&config.source)?.check_query(&query).await?),
        }
    }

    /// A model that reads a dbt model: the relation still has the columns the dbt project
    /// documents and the key sluice diffs on (a dbt change that dropped or renamed one, or a
    /// manifest newer than what was built, shows here rather than in a failed run).
    async fn check_dbt_columns(&self, model: &str, dbt: &crate::dbt::DbtModel, key: &[String]) -> Result<()> {
        let preview = self.preview(model, 0).await?;
        let present: std::collections::HashSet<String> = preview
            .schema
            .fields()
            .iter()
            .map(|f| f.name().to_lowercase())
            .collect();
        let lacks = |column: &str| !present.contains(&column.trim_matches('"').to_lowercase());
        let missing_key: Vec<&str> = key.iter().map(String::as_str).filter(|c| lacks(c)).collect();
        let missing_documented: Vec<&str> = dbt
            .columns
            .iter()
            .map(|c| c.name.as_str())
            .filter(|c| lacks(c))
            .collect();
        if missing_key.is_empty() && missing_documented.is_empty() {
            return Ok(());
        }
        let mut problems = Vec::new();
        if !missing_key.is_empty() {
            problems.push(format!("its key column(s) {} are gone", missing_key.join(", ")));
        }
        if !missing_documented.is_empty() {
            problems.push(format!(
                "the dbt project documents column(s) {} that the relation does not have",
                missing_documented.join(", ")
            ));
        }
        let mut columns: Vec<&str> = preview
            .schema
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        columns.sort_unstable();
        Err(EngineError::Invalid {
            message: format!(
                "dbt model `{}` ({}) changed its columns: {}; it has {}. Run `dbt build` if the manifest is newer than the warehouse, or update the model's key and the mappings that read it",
                dbt.name,
                dbt.relation,
                problems.join("; "),
                columns.join(", ")
            ),
        })
    }

    /// Closes the metadata store cleanly.
    pub async fn close(&self) {
        self.metadata.close().await;
    }
}

/// Checks a mapping's `action`, `mode`, `send` and `options` against what its destination
/// offers, and settles its `send`: the mapping as it runs, and its action. `None` when its
/// destination is not there (the mapping was already reported).
fn resolve_action(
    project: &Project,
    name: &str,
    destinations: &IndexMap<String, Arc<dyn Destination>>,
) -> Result<Option<(MappingConfig, Option<ActionSpec>)>, crate::error::ConfigError> {
    {
        let Some(config) = project.config.mappings.get(name).cloned() else {
            return Ok(None);
        };
        let events_model = project
            .config
            .models
            .get(&config.model)
            .is_some_and(|m| m.kind == ModelKind::Events);
        let Some(destination) = destinations.get(&config.destination) else {
            return Ok(None);
        };
        let at = |key: &str, message: String| {
            project.error_at(&["mappings", name, key], format!("mapping `{name}`: {message}"))
        };
        let spec = destination
            .action(config.action.as_deref(), &config.options)
            .map_err(|m| {
                at(
                    if config.action.is_some() {
                        "action"
                    } else {
                        "options"
                    },
                    m,
                )
            })?;
        let mut resolved = config.clone();
        match &spec {
            None => {
                if let Some(mode) = config.mode {
                    return Err(at(
                        "mode",
                        format!(
                            "destination `{}` ({}) sends every change with its operation; `mode: {mode}` does not apply",
                            config.destination,
                            destination.kind()
                        ),
                    ));
                }
                resolved.resolve_send(events_model);
            }
            Some(spec) => {
                let mode = config.mode.unwrap_or(spec.modes[0]);
                if !spec.modes.contains(&mode) {
                    let modes: Vec<&str> = spec.modes.iter().map(|m| m.as_str()).collect();
                    return Err(at(
                        "mode",
                        format!(
                            "action `{}` of destination `{}` supports mode {}, not `{mode}`",
                            spec.name,
                            config.destination,
                            modes.join(", ")
                        ),
                    ));
                }
                resolved.mode = Some(mode);
                resolved.resolve_send_for(events_model, spec.events, mode);
                let send = &resolved.send;
                if send.contains(&Op::Deleted) && !spec.deletes {
                    return Err(at(
                        "send",
                        format!(
                            "action `{}` of destination `{}` cannot delete records; remove `deleted` from `send`",
                            spec.name, config.destination
                        ),
                    ));
                }
                if mode == SyncMode::Insert && send.contains(&Op::Updated) {
                    return Err(at(
                        "send",
                        "mode `insert` only creates records, so it cannot send `updated` ones; use mode `upsert` or `update`".into(),
                    ));
                }
                if mode == SyncMode::Mirror && resolved.send.len() != 3 {
                    return Err(at(
                        "send",
                        "mode `mirror` keeps the destination equal to the model, so it sends added, updated and deleted records; drop `send`, or use mode `upsert`".into(),
                    ));
                }
                if config.send_given() && resolved.send.is_empty() {
                    return Err(at(
                        "send",
                        "`send` must list at least one of added, updated, deleted".into(),
                    ));
                }
            }
        }
        Ok(Some((resolved, spec)))
    }
}

/// Builds the sources or destinations of `project` (`kept` gives the one an earlier engine
/// built for the same settings). One made through the API that cannot be built is left out,
/// with its problem; one of the file's fails the project, pointing at its line.
#[allow(clippy::too_many_arguments)]
fn build_connectors<T: ?Sized>(
    project: &mut Project,
    problems: &mut Vec<Problem>,
    kind: Kind,
    from_api: &[(Kind, String)],
    configs: impl Fn(&Project) -> &IndexMap<String, ConnectorConfig>,
    kept: impl Fn(&str, &ConnectorConfig) -> Option<Arc<T>>,
    build: impl Fn(&str, &ConnectorConfig) -> std::result::Result<Arc<T>, String>,
) -> Result<IndexMap<String, Arc<T>>> {
    let mut built = IndexMap::new();
    for (name, config) in configs(project).clone() {
        match kept(&name, &config).map_or_else(|| build(&name, &config), Ok) {
            Ok(connector) => {
                built.insert(name, connector);
            }
            Err(m) if from_api.iter().any(|(k, n)| *k == kind && *n == name) => {
                remove(project, kind, &name);
                problems.push(Problem {
                    kind,
                    message: format!("{kind} `{name}`: {m}"),
                    name,
                });
            }
            Err(m) => {
                return Err(project
                    .error_at(&[kind.section(), &name], format!("{kind} `{name}`: {m}"))
                    .into());
            }
        }
    }
    Ok(built)
}

/// Whether `sluice.yaml` defines `kind` `name`.
fn defines(file: &Project, kind: Kind, name: &str) -> bool {
    let c = &file.config;
    match kind {
        Kind::Source => c.sources.contains_key(name),
        Kind::Destination => c.destinations.contains_key(name),
        Kind::Model => c.models.contains_key(name),
        Kind::Mapping => c.mappings.contains_key(name),
    }
}

/// Takes an API definition into the project, parsed as `sluice.yaml` would parse it.
fn take_in(
    project: &mut Project,
    definition: &StoredDefinition,
    key: Option<&SecretKey>,
) -> Result<(), String> {
    let name = &definition.name;
    crate::config::check_name(name)?;
    let opened = crate::secrets::open(&definition.spec, key).map_err(|e| e.to_string())?;
    let kind = definition.kind;
    let parse_error = |e: serde_json::Error| format!("{kind} `{name}`: {e}");
    let c = &mut project.config;
    match kind {
        Kind::Source => {
            let config: ConnectorConfig = serde_json::from_value(opened).map_err(parse_error)?;
            c.sources.insert(name.clone(), config);
        }
        Kind::Destination => {
            let config: ConnectorConfig = serde_json::from_value(opened).map_err(parse_error)?;
            c.destinations.insert(name.clone(), config);
        }
        Kind::Model => {
            let config: ModelConfig = serde_json::from_value(opened).map_err(parse_error)?;
            c.models.insert(name.clone(), config);
        }
        Kind::Mapping => {
            let config: MappingConfig = serde_json::from_value(opened).map_err(parse_error)?;
            c.mappings.insert(name.clone(), config);
        }
    }
    Ok(())
}

/// Leaves `kind` `name` out of the project.
fn remove(project: &mut Project, kind: Kind, name: &str) {
    let c = &mut project.config;
    match kind {
        Kind::Source => {
            c.sources.shift_remove(name);
        }
        Kind::Destination => {
            c.destinations.shift_remove(name);
        }
        Kind::Model => {
            c.models.shift_remove(name);
        }
        Kind::Mapping => {
            c.mappings.shift_remove(name);
        }
    }
}

/// What every engine built from one `Engine::open` shares.
/// The secret values of a project as its connectors will see them (`${VAR}` expanded, sealed
/// values open): connector credentials by their declared types, alert addresses, the stores'
/// credentials and the API tokens the file declares.
fn project_secret_values(project: &Project, connectors: &dyn ConnectorFactory) -> Vec<String> {
    use crate::secrets;
    let schemas = secrets::SecretSchemas::from_catalog(&connectors.catalog());
    let mut out = Vec::new();
    for (kind, configs) in [
        (Kind::Source, &project.config.sources),
        (Kind::Destination, &project.config.destinations),
    ] {
        for config in configs.values() {
            let mut spec = serde_json::Value::Object(config.options.clone());
            if let serde_json::Value::Object(map) = &mut spec {
                map.insert("type".into(), serde_json::Value::String(config.kind.clone()));
            }
            out.extend(secrets::secret_values(
                kind,
                &schemas,
                &secrets::expand_env(&spec),
            ));
        }
    }
    for mapping in project.config.mappings.values() {
        for url in mapping.alerts.iter().flat_map(|a| &a.urls) {
            out.extend(secrets::whole_url_secret_values(url.expose()));
        }
    }
    for location in [&project.config.metadata_store, &project.config.snapshot_store]
        .into_iter()
        .flatten()
    {
        if let Ok(url) = url::Url::parse(location.expose()) {
            out.extend(url.password().map(str::to_string));
        }
    }
    for (key, value) in &project.config.snapshot_store_options {
        if secrets::is_secret_key(key) {
            out.push(value.expose().to_string());
        }
    }
    if let Some(dbt) = &project.config.dbt {
        out.extend(dbt.webhook_secret.iter().map(|s| s.expose().to_string()));
        out.extend(
            dbt.options
                .iter()
                .filter(|(key, _)| secrets::is_secret_key(key))
                .map(|(_, value)| value.expose().to_string()),
        );
    }
    out.extend(
        project
            .config
            .api
            .tokens
            .iter()
            .map(|t| t.token.expose().to_string()),
    );
    out
}

struct Shared {
    snapshots: SnapshotStore,
    metadata: MetadataStore,
    secret_key: Option<SecretKey>,
    shutdown: crate::run::Shutdown,
    alert_sender: Option<Arc<dyn crate::alerts::AlertSender>>,
    controls: Arc<crate::run::RunControls>,
    workloads: Arc<crate::workload::Workloads>,
}

/// The index of the first row of `batch` whose key columns, as text, equal `values`.
fn find_row(
    batch: &arrow::array::RecordBatch,
    key_columns: &[String],
    values: &[String],
) -> Result<Option<usize>> {
    use arrow::array::{Array, AsArray};
    let mut texts = Vec::with_capacity(key_columns.len());
    for column in key_columns {
        let array = batch.column_by_name(column).ok_or_else(|| {
            EngineError::Usage(format!(
                "the model does not return its primary key column `{column}`"
            ))
        })?;
        texts.push(arrow::compute::cast(array, &arrow::datatypes::DataType::Utf8)?);
    }
    Ok((0..batch.num_rows()).find(|&row| {
        texts.iter().zip(values).all(|(text, value)| {
            let text = text.as_string::<i32>();
            text.is_valid(row) && text.value(row) == value
        })
    }))
}

/// One record as its mapping would send it.
#[derive(Debug, Clone, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PayloadPreview {
    /// The record's primary key.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub key: serde_json::Value,
    /// The request(s) that would carry it alone (credentials left out).
    pub requests: Vec<crate::destination::PreparedRequest>,
    /// Why the record would fail without being sent, when it would.
    pub unsendable: Option<String>,
}

/// A model's first rows, as `sluice preview` shows them.
#[derive(Debug)]
pub struct Preview {
    /// The SQL that ran, template rendered.
    pub sql: String,
    pub schema: arrow::datatypes::SchemaRef,
    pub batches: Vec<arrow::array::RecordBatch>,
}
