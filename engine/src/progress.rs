//! How far the runs this process is making have got, from the run observer's events: a run's
//! record is written when it ends, so this is what the API and the console show while it goes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::run::{RunEvent, RunObserver};

/// A running mapping's progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunProgress {
    /// `extracting`: the model's query is streaming into a snapshot; `delivering`: changes are
    /// being diffed and sent, bucket by bucket.
    pub stage: ProgressStage,
    /// Rows of the model read so far (all of them once extraction is done).
    pub extracted_rows: u64,
    /// Key-hash buckets of the snapshot diffed and delivered, of `buckets`.
    pub buckets_done: u32,
    pub buckets: u32,
    /// Changes found so far.
    pub added: u64,
    pub updated: u64,
    pub deleted: u64,
    /// Records the destination acknowledged so far, and records it refused.
    pub delivered: u64,
    pub failed: u64,
    /// When the last event came.
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum ProgressStage {
    Extracting,
    Delivering,
}

#[derive(Debug, Default)]
struct Board {
    /// Per model: rows read, whether its extraction is still going, and when it started.
    models: HashMap<String, (u64, bool, DateTime<Utc>)>,
    /// Per mapping past extraction: its progress and when its delivery started.
    mappings: HashMap<String, (RunProgress, DateTime<Utc>)>,
}

/// The progress of every mapping running in this process.
#[derive(Debug, Default)]
pub struct ProgressBoard {
    board: Mutex<Board>,
}

impl ProgressBoard {
    /// `mapping`'s progress (its model is `model`) as far as this process has seen it. Only
    /// meaningful while the mapping's run is running: the caller checks that.
    pub fn get(&self, mapping: &str, model: &str) -> Option<RunProgress> {
        let board = self.board.lock().unwrap_or_else(|e| e.into_inner());
        let delivering = board.mappings.get(mapping);
        if let Some(&(rows, true, started)) = board.models.get(model)
            // An extraction that began after this mapping's last delivery is its new run's.
            && delivering.is_none_or(|(_, since)| *since < started)
        {
            return Some(RunProgress {
                stage: ProgressStage::Extracting,
                extracted_rows: rows,
                buckets_done: 0,
                buckets: 0,
                added: 0,
                updated: 0,
                deleted: 0,
                delivered: 0,
                failed: 0,
                updated_at: Utc::now(),
            });
        }
        delivering.map(|(progress, _)| progress.clone())
    }

    fn apply(&self, event: &RunEvent) {
        let mut board = self.board.lock().unwrap_or_else(|e| e.into_inner());
        let now = Utc::now();
        match event {
            RunEvent::ExtractStarted { model } => {
                board.models.insert(model.clone(), (0, true, now));
            }
            RunEvent::ExtractProgress { model, rows } => {
                if let Some(entry) = board.models.get_mut(model) {
                    entry.0 = *rows;
                }
            }
            RunEvent::ExtractFinished { model, rows, .. } => {
                if let Some(entry) = board.models.get_mut(model) {
                    *entry = (*rows, false, entry.2);
                }
            }
            RunEvent::MappingStarted {
                mapping,
                model,
                buckets,
            } => {
                let extracted_rows = board.models.get(model).map_or(0, |&(rows, _, _)| rows);
                let progress = RunProgress {
                    stage: ProgressStage::Delivering,
                    extracted_rows,
                    buckets_done: 0,
                    buckets: *buckets,
                    added: 0,
                    updated: 0,
                    deleted: 0,
                    delivered: 0,
                    failed: 0,
                    updated_at: now,
                };
                board.mappings.insert(mapping.clone(), (progress, now));
            }
            RunEvent::MappingProgress {
                mapping,
                buckets_done,
                buckets,
                changes,
                delivered,
                failed,
            } => {
                if let Some((progress, _)) = board.mappings.get_mut(mapping) {
                    progress.buckets_done = *buckets_done;
                    progress.buckets = *buckets;
                    progress.added = changes.added;
                    progress.updated = changes.updated;
                    progress.deleted = changes.deleted;
                    progress.delivered = *delivered;
                    progress.failed = *failed;
                    progress.updated_at = now;
                }
            }
            RunEvent::MappingFinished { run } => {
                board.mappings.remove(&run.mapping);
            }
        }
    }
}

/// An observer that keeps a [`ProgressBoard`] up to date and passes every event on.
pub struct Tracking {
    pub board: Arc<ProgressBoard>,
    pub next: Arc<dyn RunObserver>,
}

impl RunObserver for Tracking {
    fn on_event(&self, event: RunEvent) {
        self.board.apply(&event);
        self.next.on_event(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diff::ChangeCounts;

    #[test]
    fn a_run_goes_from_extracting_to_delivering_and_is_gone_when_it_ends() {
        let board = ProgressBoard::default();
        assert_eq!(board.get("to_crm", "users"), None);
        board.apply(&RunEvent::ExtractStarted {
            model: "users".into(),
        });
        board.apply(&RunEvent::ExtractProgress {
            model: "users".into(),
            rows: 65_536,
        });
        let extracting = board.get("to_crm", "users").expect("extracting");
        assert_eq!(
            (extracting.stage, extracting.extracted_rows),
            (ProgressStage::Extracting, 65_536)
        );
        assert_eq!(
            board.get("to_crm", "orders"),
            None,
            "another model's extraction is not this mapping's"
        );

        board.apply(&RunEvent::ExtractFinished {
            model: "users".into(),
            rows: 100_000,
            snapshot_id: "s".into(),
        });
        board.apply(&RunEvent::MappingStarted {
            mapping: "to_crm".into(),
            model: "users".into(),
            buckets: 8,
        });
        board.apply(&RunEvent::MappingProgress {
            mapping: "to_crm".into(),
            buckets_done: 3,
            buckets: 8,
            changes: ChangeCounts {
                added: 10,
                updated: 2,
                deleted: 1,
            },
            delivered: 9,
            failed: 1,
        });
        let delivering = board.get("to_crm", "users").expect("delivering");
        assert_eq!(delivering.stage, ProgressStage::Delivering);
        assert_eq!(delivering.extracted_rows, 100_000);
        assert_eq!((delivering.buckets_done, delivering.buckets), (3, 8));
        assert_eq!(
            (delivering.added, delivering.updated, delivering.deleted),
            (10, 2, 1)
        );
        assert_eq!((delivering.delivered, delivering.failed), (9, 1));

        // The next run's extraction is shown, not the last delivery; a finished run is gone.
        std::thread::sleep(std::time::Duration::from_millis(2));
        board.apply(&RunEvent::ExtractStarted {
            model: "users".into(),
        });
        assert_eq!(
            board.get("to_crm", "users").map(|p| p.stage),
            Some(ProgressStage::Extracting)
        );
        board.apply(&RunEvent::ExtractFinished {
            model: "users".into(),
            rows: 5,
            snapshot_id: "t".into(),
        });
        board.apply(&RunEvent::MappingFinished {
            run: Box::new(crate::metadata::RunRecord::starting(
                "to_crm", "users", "crm", false,
            )),
        });
        assert_eq!(board.get("to_crm", "users"), None);
    }
}
