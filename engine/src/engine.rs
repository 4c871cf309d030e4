//! The engine: a loaded project with its connectors, snapshot store and metadata store.

use std::sync::Arc;

use futures::StreamExt;
use indexmap::IndexMap;
use sluice_snapshots::SnapshotStore;

use crate::config::Project;
use crate::destination::Destination;
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
}

impl Engine {
    /// Builds every source and destination of `project` (so a misconfigured one is reported
    /// before anything runs) and opens the stores.
    pub async fn open(project: Project, connectors: &dyn ConnectorFactory) -> Result<Self> {
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
        let metadata = MetadataStore::open_sqlite(&state_dir.join(METADATA_FILE)).await?;
        Ok(Self {
            project: Arc::new(project),
            snapshots,
            metadata,
            sources,
            destinations,
        })
    }

    pub fn project(&self) -> &Project {
        &self.project
    }

    pub fn snapshots(&self) -> &SnapshotStore {
        &self.snapshots
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

/// A model's first rows, as `sluice preview` shows them.
#[derive(Debug)]
pub struct Preview {
    /// The SQL that ran, template rendered.
    pub sql: String,
    pub schema: arrow::datatypes::SchemaRef,
    pub batches: Vec<arrow::array::RecordBatch>,
}
