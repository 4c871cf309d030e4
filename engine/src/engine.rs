//! The engine: a loaded project with its connectors, snapshot store and metadata store.

use std::sync::Arc;

use futures::StreamExt;
use indexmap::IndexMap;
use sluice_snapshots::SnapshotStore;

use crate::config::Project;
use crate::config::{ModelKind, Op};
use crate::destination::{ActionSpec, Destination, SyncMode};
use crate::error::{EngineError, Result, SourceError};
use crate::metadata::MetadataStore;
use crate::source::{ConnectorEnv, ConnectorFactory, ModelQuery, Source};

/// File name of the SQLite metadata store inside the state directory.
pub const METADATA_FILE: &str = "sluice.db";

pub struct Engine {
    pub(crate) project: Arc<Project>,
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
}

impl Engine {
    /// Builds every source and destination of `project` (so a misconfigured one is reported
    /// before anything runs) and opens the stores.
    pub async fn open(mut project: Project, connectors: &dyn ConnectorFactory) -> Result<Self> {
        let env = ConnectorEnv {
            base_dir: project.base_dir.clone(),
            state_dir: project.state_dir(),
        };
        let mut sources = IndexMap::new();
        for (name, config) in &project.config.sources {
            let source = connectors
                .source(name, config, &env)
                .map_err(|m| project.error_at(&["sources", name], format!("source `{name}`: {m}")))?;
            sources.insert(name.clone(), source);
        }
        let mut destinations = IndexMap::new();
        for (name, config) in &project.config.destinations {
            let destination = connectors.destination(name, config, &env).map_err(|m| {
                project.error_at(&["destinations", name], format!("destination `{name}`: {m}"))
            })?;
            destinations.insert(name.clone(), destination);
        }
        let actions = resolve_actions(&mut project, &destinations)?;
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
        .await?;
        Ok(Self {
            project: Arc::new(project),
            snapshots,
            metadata,
            sources,
            destinations,
            actions,
            shutdown: Default::default(),
            alert_sender: connectors.alert_sender(),
        })
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
        let source = self.source(&config.source)?;
        let limited = ModelQuery {
            model: query.model.clone(),
            sql: crate::source::limit_sql(&query.sql, limit as u64),
        };
        let mut stream = source.extract(&limited).await?;
        let schema = stream.schema();
        let mut batches = Vec::new();
        let mut rows = 0;
        while rows < limit {
            let Some(batch) = stream.next().await else { break };
            let batch = batch.map_err(|e| SourceError::Query {
                model: model.to_string(),
                source_name: config.source.clone(),
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
        if key.is_none() {
            query.sql = crate::source::limit_sql(&query.sql, 1);
        }
        let source = self.source(&model_config.source)?;
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
        self.source(&config.source)?.check_query(&query).await?;
        Ok(())
    }

    /// Closes the metadata store cleanly.
    pub async fn close(&self) {
        self.metadata.close().await;
    }
}

/// Checks every mapping's `action`, `mode`, `send` and `options` against what its destination
/// offers, and settles each mapping's `send`.
fn resolve_actions(
    project: &mut Project,
    destinations: &IndexMap<String, Arc<dyn Destination>>,
) -> Result<IndexMap<String, Option<ActionSpec>>> {
    use crate::config::Op;
    let mut actions = IndexMap::new();
    let names: Vec<String> = project.config.mappings.keys().cloned().collect();
    for name in names {
        let config = project.config.mappings[&name].clone();
        let events_model = project
            .config
            .models
            .get(&config.model)
            .is_some_and(|m| m.kind == ModelKind::Events);
        let Some(destination) = destinations.get(&config.destination) else {
            continue;
        };
        let at = |key: &str, message: String| {
            project.error_at(&["mappings", &name, key], format!("mapping `{name}`: {message}"))
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
                    )
                    .into());
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
                    )
                    .into());
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
                    )
                    .into());
                }
                if mode == SyncMode::Insert && send.contains(&Op::Updated) {
                    return Err(at(
                        "send",
                        "mode `insert` only creates records, so it cannot send `updated` ones; use mode `upsert` or `update`".into(),
                    )
                    .into());
                }
                if mode == SyncMode::Mirror && resolved.send.len() != 3 {
                    return Err(at(
                        "send",
                        "mode `mirror` keeps the destination equal to the model, so it sends added, updated and deleted records; drop `send`, or use mode `upsert`".into(),
                    )
                    .into());
                }
                if config.send_given() && resolved.send.is_empty() {
                    return Err(at(
                        "send",
                        "`send` must list at least one of added, updated, deleted".into(),
                    )
                    .into());
                }
            }
        }
        project.config.mappings.insert(name.clone(), resolved);
        actions.insert(name, spec);
    }
    Ok(actions)
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
pub struct PayloadPreview {
    /// The record's primary key.
    pub key: serde_json::Value,
    /// The request(s) that would carry it alone.
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
