//! The engine: a loaded project with its connectors, snapshot store and metadata store.

use std::sync::Arc;

use indexmap::IndexMap;
use sluice_snapshots::SnapshotStore;

use crate::config::Project;
use crate::destination::Destination;
use crate::error::{EngineError, Result};
use crate::metadata::MetadataStore;
use crate::source::{ConnectorEnv, ConnectorFactory, Source};

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

    /// Closes the metadata store cleanly.
    pub async fn close(&self) {
        self.metadata.close().await;
    }
}
