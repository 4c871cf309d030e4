//! Snapshot retention: retiring a model's old snapshots by its `retain:` policy, and removing
//! files that no committed state refers to.
//!
//! Never retired: the newest snapshot; any snapshot a mapping uses as its baseline; any snapshot
//! an exceptions file points at (rows of records awaiting retry, which a delete needs); the
//! snapshot of a run still going or of a stopped run whose checkpoints have not been taken in.
//! Retiring deletes the manifest first (the snapshot stops being visible), then the data files,
//! and every delete of a missing object succeeds, so it is safe to interrupt, to repeat, and to
//! run from two processes at once.

use std::collections::HashSet;

use chrono::{DateTime, Utc};

use crate::engine::Engine;
use crate::error::{EngineError, Result};

/// What a retention pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetireReport {
    pub model: String,
    pub kept: usize,
    pub retired: Vec<String>,
    /// Kept although the policy would retire them, because something still needs them.
    pub protected: Vec<String>,
    pub orphan_files_removed: usize,
    /// Multipart uploads a writer that died left unfinished, aborted (S3, GCS).
    pub uploads_aborted: usize,
}

impl Engine {
    /// Retires the snapshots of `model` that its `retain:` policy lets go and nothing needs,
    /// and removes files no state refers to.
    pub async fn retire_snapshots(&self, model: &str) -> Result<RetireReport> {
        self.retire_snapshots_at(model, Utc::now()).await
    }

    pub(crate) async fn retire_snapshots_at(&self, model: &str, now: DateTime<Utc>) -> Result<RetireReport> {
        let config = self.project.model(model).ok_or_else(|| EngineError::Unknown {
            kind: "model",
            name: model.to_string(),
            available: self.project.config.models.keys().cloned().collect(),
        })?;
        let policy = config.retain;
        let snapshots = self.snapshots.list_snapshots(model).await?;
        let needed = self.snapshots_in_use(model).await?;
        let mut report = RetireReport {
            model: model.to_string(),
            ..Default::default()
        };
        let count = snapshots.len();
        for (i, snapshot) in snapshots.iter().enumerate() {
            // `i` counts from the oldest; the newest is `count - 1`.
            let newer = count - 1 - i;
            let by_runs = policy.runs.is_some_and(|n| newer < n as usize);
            let by_days = policy
                .days
                .is_some_and(|d| now - snapshot.extracted_at < chrono::Duration::days(d as i64));
            if newer == 0 || by_runs || by_days {
                report.kept += 1;
            } else if needed.contains(&snapshot.id) {
                report.kept += 1;
                report.protected.push(snapshot.id.clone());
            } else {
                self.snapshots.retire(model, &snapshot.id).await?;
                tracing::info!(model, snapshot = snapshot.id, "snapshot retired");
                report.retired.push(snapshot.id.clone());
            }
        }
        // What a writer that died left: a live writer of a snapshot finishes long before.
        let abandoned_before =
            now - chrono::Duration::from_std(policy.abandoned_after).unwrap_or(chrono::Duration::days(2));
        report.orphan_files_removed = self.snapshots.remove_uncommitted(model, abandoned_before).await?;
        report.orphan_files_removed += self.remove_orphan_mapping_files(model).await?;
        report.uploads_aborted = self
            .snapshots
            .abort_unfinished_uploads(&format!("models/{model}"), abandoned_before)
            .await?;
        for mapping in self.mappings_of(model) {
            report.uploads_aborted += self
                .snapshots
                .abort_unfinished_uploads(&format!("mappings/{mapping}"), abandoned_before)
                .await?;
        }
        Ok(report)
    }

    /// Ids of the snapshots of `model` something still needs.
    async fn snapshots_in_use(&self, model: &str) -> Result<HashSet<String>> {
        let mut needed = HashSet::new();
        for state in self.metadata.mapping_states().await? {
            if state.model != model {
                continue;
            }
            needed.extend(state.baseline_snapshot_id.clone());
            if let Some(path) = &state.exceptions_path {
                needed.extend(crate::exceptions::referenced_snapshot_ids(&self.snapshots, path).await?);
            }
        }
        let unsettled = self.metadata.unsettled_runs().await?;
        for run in unsettled.iter().filter(|r| r.model == model) {
            needed.extend(run.snapshot_id.clone());
        }
        // A snapshot being extracted for a running run carries that run's id in its manifest.
        let running: HashSet<&str> = unsettled.iter().map(|r| r.id.as_str()).collect();
        for snapshot in self.snapshots.list_snapshots(model).await? {
            if running.contains(snapshot.run_id.as_str()) {
                needed.insert(snapshot.id);
            }
        }
        Ok(needed)
    }

    /// Names of the mappings of `model`.
    fn mappings_of(&self, model: &str) -> Vec<String> {
        self.project
            .config
            .mappings
            .iter()
            .filter(|(_, m)| m.model == model)
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Exceptions files no mapping state points at, and checkpoint files of settled runs, of the
    /// mappings of `model`.
    async fn remove_orphan_mapping_files(&self, model: &str) -> Result<usize> {
        let states = self.metadata.mapping_states().await?;
        let current: HashSet<String> = states.iter().filter_map(|s| s.exceptions_path.clone()).collect();
        let unsettled: HashSet<String> = self
            .metadata
            .unsettled_runs()
            .await?
            .into_iter()
            .map(|r| r.id)
            .collect();
        let mut removed = 0;
        for mapping in self.mappings_of(model) {
            for path in self
                .snapshots
                .list(&format!("mappings/{mapping}/exceptions"))
                .await?
            {
                // `<run id>.parquet` or `<run id>-recovered.parquet`
                let Some(name) = path.rsplit('/').next().and_then(|n| n.strip_suffix(".parquet")) else {
                    continue;
                };
                let run_id = name.strip_suffix("-recovered").unwrap_or(name);
                if current.contains(&path) || unsettled.contains(run_id) {
                    continue;
                }
                // A run that just finished writing its exceptions file commits it a moment
                // later; only a superseded file's run is finished.
                // (A run is recorded before it writes anything, so a file without a run is an
                // orphan.)
                if let Some(run) = self.metadata.run(run_id).await?
                    && run.finished_at.is_none()
                {
                    continue;
                }
                self.snapshots.delete(&path).await?;
                removed += 1;
            }
            for path in self
                .snapshots
                .list(&format!("mappings/{mapping}/checkpoints"))
                .await?
            {
                let run_id = path.rsplit('/').nth(1).unwrap_or_default();
                if unsettled.contains(run_id) {
                    continue;
                }
                if let Some(run) = self.metadata.run(run_id).await?
                    && run.finished_at.is_none()
                {
                    continue;
                }
                self.snapshots.delete(&path).await?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}
