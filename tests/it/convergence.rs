//! Property test of the run loop: a model changing at random between runs, a destination that
//! refuses records at random. After every run the destination must hold exactly the model's rows,
//! except for the records it refused in that run, which keep their previous state; every record
//! sent must change the destination (nothing it already has is sent again); and once the
//! destination stops refusing, one run makes it equal to the model.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use async_trait::async_trait;
use proptest::prelude::*;
use sluice_connectors::Connectors;
use sluice_engine::destination::{
    DeliveryPolicy, Destination, DestinationWriter, OutgoingBatch, RecordFailure, RetryPolicy, RunInfo,
    SendOutcome,
};
use sluice_engine::source::{ConnectorEnv, ConnectorFactory, Source};
use sluice_engine::{ConnectorConfig, DestinationError, Engine, Op, Project, Quiet, RunRequest};

use crate::common::write_parquet;

type Rows = BTreeMap<i64, (String, i64)>;

/// What the destination holds: key -> the record's `data` JSON.
#[derive(Default)]
struct Memory {
    state: BTreeMap<i64, String>,
    /// Keys to refuse in the current run.
    refuse: HashSet<i64>,
    refused: HashSet<i64>,
    violations: Vec<String>,
}

struct MemoryDestination(Arc<Mutex<Memory>>);

#[async_trait]
impl Destination for MemoryDestination {
    fn kind(&self) -> &'static str {
        "memory"
    }
    async fn check(&self) -> Result<(), DestinationError> {
        Ok(())
    }
    async fn open(&self, _run: &RunInfo) -> Result<Box<dyn DestinationWriter>, DestinationError> {
        Ok(Box::new(MemoryDestination(self.0.clone())))
    }
}

#[async_trait]
impl DestinationWriter for MemoryDestination {
    fn policy(&self) -> DeliveryPolicy {
        DeliveryPolicy {
            max_records: 3,
            max_bytes: usize::MAX,
            concurrency: 2,
            retry: RetryPolicy {
                max_attempts: 1,
                ..RetryPolicy::default()
            },
            ..DeliveryPolicy::default()
        }
    }
    async fn send(&self, batch: &OutgoingBatch, range: Range<usize>) -> SendOutcome {
        let mut memory = self.0.lock().expect("lock");
        let mut failures = Vec::new();
        for (i, record) in batch.records(range).enumerate() {
            let key: serde_json::Value = serde_json::from_slice(record.key).expect("key json");
            let id = key["id"].as_i64().expect("id");
            let data = String::from_utf8(record.body.to_vec()).expect("utf8");
            // Nothing the destination already has is sent again.
            let current = memory.state.get(&id).cloned();
            let needed = match record.op {
                Op::Added => current.is_none(),
                Op::Updated => current.as_ref().is_some_and(|c| *c != data),
                Op::Deleted => current.is_some(),
            };
            if !needed {
                memory.violations.push(format!(
                    "{} of key {id} sent needlessly (destination has {current:?})",
                    record.op
                ));
            }
            if memory.refuse.contains(&id) {
                memory.refused.insert(id);
                failures.push(RecordFailure {
                    index: i,
                    error: "refused".into(),
                });
                continue;
            }
            match record.op {
                Op::Deleted => {
                    memory.state.remove(&id);
                }
                _ => {
                    memory.state.insert(id, data);
                }
            }
        }
        if failures.is_empty() {
            SendOutcome::Accepted
        } else {
            SendOutcome::Partial(failures)
        }
    }
    async fn finish(self: Box<Self>) -> Result<(), DestinationError> {
        Ok(())
    }
}

struct Factory(Arc<Mutex<Memory>>);

impl ConnectorFactory for Factory {
    fn source(
        &self,
        name: &str,
        config: &ConnectorConfig,
        env: &ConnectorEnv,
    ) -> Result<Arc<dyn Source>, String> {
        Connectors.source(name, config, env)
    }
    fn destination(
        &self,
        _: &str,
        _: &ConnectorConfig,
        _: &ConnectorEnv,
    ) -> Result<Arc<dyn Destination>, String> {
        Ok(Arc::new(MemoryDestination(self.0.clone())))
    }
}

const CONFIG: &str = r#"
sources:
  files: { type: files, tables: { t: data/t.parquet } }
models:
  m: { source: files, sql: "SELECT id, name, score FROM t", primary_key: id }
destinations:
  memory: { type: memory }
mappings:
  m_to_memory: { model: m, destination: memory }
"#;

fn write_rows(dir: &std::path::Path, rows: &Rows) {
    let batch = RecordBatch::try_from_iter(vec![
        (
            "id",
            Arc::new(Int64Array::from_iter_values(rows.keys().copied())) as ArrayRef,
        ),
        (
            "name",
            Arc::new(StringArray::from_iter_values(rows.values().map(|v| v.0.clone()))) as ArrayRef,
        ),
        (
            "score",
            Arc::new(Int64Array::from_iter_values(rows.values().map(|v| v.1))) as ArrayRef,
        ),
    ])
    .expect("batch");
    write_parquet(&dir.join("data/t.parquet"), &batch);
}

fn expected_data(row: &(String, i64), id: i64) -> String {
    serde_json::json!({ "id": id, "name": row.0, "score": row.1 }).to_string()
}

/// A step: the model's rows, and the keys the destination refuses in that run.
fn steps() -> impl Strategy<Value = Vec<(Rows, HashSet<i64>)>> {
    let rows = prop::collection::btree_map(
        0i64..25,
        (
            prop::sample::select(vec!["a", "b", "ü"]).prop_map(String::from),
            0i64..3,
        ),
        0..20,
    );
    let refuse = prop::collection::hash_set(0i64..25, 0..8);
    prop::collection::vec((rows, refuse), 1..5)
}

async fn simulate(steps: Vec<(Rows, HashSet<i64>)>) -> Result<(), String> {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("data")).expect("data");
    std::fs::write(dir.path().join("sluice.yaml"), CONFIG).expect("config");
    let memory = Arc::new(Mutex::new(Memory::default()));
    let project = Project::load(&dir.path().join("sluice.yaml")).map_err(|e| e.to_string())?;
    let engine = Engine::open(project, &Factory(memory.clone()))
        .await
        .map_err(|e| e.to_string())?;
    let last = steps.last().map(|(rows, _)| rows.clone()).unwrap_or_default();
    // The last step runs again with nothing refused: the destination must converge.
    let steps = steps.into_iter().chain(std::iter::once((last, HashSet::new())));
    for (n, (rows, refuse)) in steps.enumerate() {
        write_rows(dir.path(), &rows);
        let before = {
            let mut m = memory.lock().expect("lock");
            m.refuse = refuse;
            m.refused.clear();
            m.state.clone()
        };
        let runs = engine
            .run(&RunRequest::default(), &Quiet)
            .await
            .map_err(|e| e.to_string())?;
        if let Some(error) = &runs[0].error {
            return Err(format!("run {n} failed: {error}"));
        }
        let m = memory.lock().expect("lock");
        if !m.violations.is_empty() {
            return Err(format!("run {n}: {:?}", m.violations));
        }
        if runs[0].counts.failed != m.refused.len() as u64 {
            return Err(format!(
                "run {n}: {} failed records reported, {} refused",
                runs[0].counts.failed,
                m.refused.len()
            ));
        }
        let keys: HashSet<i64> = rows
            .keys()
            .chain(before.keys())
            .chain(m.state.keys())
            .copied()
            .collect();
        for key in keys {
            let want = if m.refused.contains(&key) {
                before.get(&key).cloned()
            } else {
                rows.get(&key).map(|row| expected_data(row, key))
            };
            if m.state.get(&key) != want.as_ref() {
                return Err(format!(
                    "run {n}, key {key}: destination has {:?}, expected {want:?}",
                    m.state.get(&key)
                ));
            }
        }
    }
    engine.close().await;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn destinations_converge_on_the_model_despite_refused_records(steps in steps()) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        let outcome = runtime.block_on(simulate(steps));
        prop_assert!(outcome.is_ok(), "{}", outcome.unwrap_err());
    }
}
