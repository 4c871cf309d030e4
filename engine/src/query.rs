//! SQL over snapshot history, read-only: every model is a table of its latest snapshot, and
//! `<model>_history` holds every snapshot with `_snapshot_id`, `_run_id` and `_extracted_at`
//! (see [`sluice_snapshots::register_history`]). DDL, DML and statements (`COPY`, `SET`,
//! `CREATE EXTERNAL TABLE`, ...) are refused, so a query reads the snapshot store and nothing
//! else; results stop at a row limit and a query at a time limit.
//!
//! A query is interactive work ([`crate::workload`]): admitted for its caller, planned and
//! executed on the interactive runtime (never on the threads that answer health checks or
//! renew leases), within the memory pool every query shares, which spills to disk.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use datafusion::error::DataFusionError;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::execution::context::SQLOptions;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::prelude::{SessionConfig, SessionContext};
use futures::StreamExt;
use sluice_snapshots::SnapshotStore;

use crate::engine::Engine;
use crate::error::{EngineError, Result};

/// Bounds of one query.
#[derive(Debug, Clone, Copy)]
pub struct QueryLimits {
    /// Rows returned at most; the result says when it was cut.
    pub max_rows: usize,
    /// Time to plan the query and produce its first rows; `None` takes
    /// `api.limits.query_timeout`.
    pub timeout: Option<Duration>,
}

impl Default for QueryLimits {
    fn default() -> Self {
        Self {
            max_rows: 100_000,
            timeout: None,
        }
    }
}

/// A session with every model's snapshot history registered, on `runtime` (its memory pool
/// and spill directory), planning `partitions` ways.
async fn history_context(
    snapshots: &SnapshotStore,
    models: &[String],
    runtime: Arc<RuntimeEnv>,
    partitions: usize,
) -> Result<SessionContext> {
    let config = SessionConfig::new()
        .with_information_schema(true)
        .with_target_partitions(partitions.max(1));
    let state = datafusion::execution::SessionStateBuilder::new()
        .with_config(config)
        .with_runtime_env(runtime)
        .with_default_features()
        .with_physical_optimizer_rule(Arc::new(YieldEverywhere))
        .build();
    let ctx = SessionContext::new_with_state(state);
    snapshots.register_with(&ctx);
    for model in models {
        sluice_snapshots::register_history(&ctx, snapshots, model)
            .await
            .map_err(|source| EngineError::Snapshot {
                model: model.clone(),
                source,
            })?;
    }
    Ok(ctx)
}

/// Makes every operator of a query give its thread back now and then (tokio's task budget,
/// spent a unit per batch), not only the scans DataFusion makes cooperative itself. A join
/// that multiplies rows feeds a sort many batches per scanned one; without this, the task
/// running the sort would keep its thread until the whole join is done, and a stopped query
/// (time limit, client gone) would go on burning a core, holding its place in `api.limits`.
#[derive(Debug)]
struct YieldEverywhere;

impl datafusion::physical_optimizer::PhysicalOptimizerRule for YieldEverywhere {
    fn name(&self) -> &str {
        "sluice_yield_everywhere"
    }

    fn optimize(
        &self,
        plan: Arc<dyn datafusion::physical_plan::ExecutionPlan>,
        _config: &datafusion::config::ConfigOptions,
    ) -> datafusion::error::Result<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
        use datafusion::common::tree_node::{Transformed, TreeNode};
        use datafusion::physical_plan::coop::CooperativeExec;
        plan.transform_up(|node| {
            let wrapped = node.is::<CooperativeExec>() || node.children().is_empty();
            Ok(if wrapped {
                Transformed::no(node)
            } else {
                Transformed::yes(Arc::new(CooperativeExec::new(node)) as _)
            })
        })
        .map(|t| t.data)
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// A query's error as its caller should read it: running out of the shared memory says which
/// limit and what to do.
fn query_failed(error: DataFusionError, memory: u64) -> EngineError {
    if matches!(error.find_root(), DataFusionError::ResourcesExhausted(_)) {
        return EngineError::TooLarge {
            code: "query_memory_exceeded",
            message: format!(
                "the query needs more memory than the {} MiB history queries share (api.limits.query_memory), even spilling to disk: {error}. Filter or aggregate earlier, or raise the limit",
                memory / (1024 * 1024)
            ),
        };
    }
    EngineError::Usage(format!("the query failed: {error}"))
}

/// A table a history query can read.
#[derive(Debug, Clone, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HistoryTable {
    /// The table's name in SQL: the model's (its latest snapshot) or `<model>_history`.
    pub name: String,
    pub model: String,
    /// Whether the table holds every snapshot (with `_snapshot_id`, `_run_id`,
    /// `_extracted_at`) rather than the latest.
    pub history: bool,
    /// Rows of the latest snapshot, or of every snapshot together.
    pub rows: u64,
    /// Snapshots the table reads.
    pub snapshots: usize,
    /// The run that extracted the latest snapshot, and when.
    pub latest_run_id: String,
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub latest_extracted_at: chrono::DateTime<chrono::Utc>,
    /// Its columns as a query sees them (a history table's are every snapshot's, by name).
    pub columns: Vec<HistoryColumn>,
}

/// A column of a [`HistoryTable`].
#[derive(Debug, Clone, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HistoryColumn {
    pub name: String,
    /// The Arrow type, as DataFusion writes it.
    pub data_type: String,
}

impl Engine {
    /// A session with every model's snapshot history registered.
    pub async fn history_context(&self) -> Result<SessionContext> {
        let limits = self.workloads.limits();
        history_context(
            &self.snapshots,
            &self.model_names(),
            self.workloads.query_env()?,
            limits.threads(),
        )
        .await
    }

    /// The tables history queries can read, from the snapshots' manifests alone: cheap, and
    /// not a query (it takes no place under `api.limits`). Models without a snapshot have none.
    pub async fn history_tables(&self) -> Result<Vec<HistoryTable>> {
        use sluice_snapshots::{EXTRACTED_AT_COLUMN, RUN_ID_COLUMN, SNAPSHOT_ID_COLUMN};
        let mut tables = Vec::new();
        for model in self.model_names() {
            let manifests =
                self.snapshots
                    .list_snapshots(&model)
                    .await
                    .map_err(|source| EngineError::Snapshot {
                        model: model.clone(),
                        source,
                    })?;
            let Some(latest) = manifests.last() else {
                continue;
            };
            let column = |c: &sluice_snapshots::ColumnInfo| HistoryColumn {
                name: c.name.clone(),
                data_type: c.data_type.clone(),
            };
            let mut every: Vec<HistoryColumn> = Vec::new();
            for manifest in &manifests {
                for c in &manifest.columns {
                    if !every.iter().any(|seen| seen.name == c.name) {
                        every.push(column(c));
                    }
                }
            }
            every.push(HistoryColumn {
                name: SNAPSHOT_ID_COLUMN.into(),
                data_type: "Utf8".into(),
            });
            every.push(HistoryColumn {
                name: RUN_ID_COLUMN.into(),
                data_type: "Utf8".into(),
            });
            every.push(HistoryColumn {
                name: EXTRACTED_AT_COLUMN.into(),
                data_type: arrow::datatypes::DataType::Timestamp(
                    arrow::datatypes::TimeUnit::Microsecond,
                    Some("UTC".into()),
                )
                .to_string(),
            });
            tables.push(HistoryTable {
                name: model.clone(),
                model: model.clone(),
                history: false,
                rows: latest.rows,
                snapshots: 1,
                latest_run_id: latest.run_id.clone(),
                latest_extracted_at: latest.extracted_at,
                columns: latest.columns.iter().map(column).collect(),
            });
            tables.push(HistoryTable {
                name: format!("{model}_history"),
                model: model.clone(),
                history: true,
                rows: manifests.iter().map(|m| m.rows).sum(),
                snapshots: manifests.len(),
                latest_run_id: latest.run_id.clone(),
                latest_extracted_at: latest.extracted_at,
                columns: every,
            });
        }
        Ok(tables)
    }

    fn model_names(&self) -> Vec<String> {
        self.project.config.models.keys().cloned().collect()
    }

    /// Runs a read-only query for `caller` (an API token's name) over snapshot history; the
    /// rows stream back, at most `limits.max_rows` of them. Refused when the caller or the
    /// process runs as many queries as `api.limits` allows; fails when the query has not
    /// produced its first rows within the time limit, or needs more memory than the pool
    /// queries share. The query runs on the interactive runtime until its stream is dropped.
    pub async fn query(
        &self,
        sql: &str,
        limits: QueryLimits,
        caller: &str,
    ) -> Result<SendableRecordBatchStream> {
        let admission = self.workloads.admit_query(caller)?;
        let timeout = limits.timeout.unwrap_or(self.workloads.limits().query_timeout);
        let memory = self.workloads.limits().query_memory;
        let snapshots = self.snapshots.clone();
        let models = self.model_names();
        let runtime = self.workloads.query_env()?;
        let partitions = self.workloads.limits().threads();
        let sql = sql.to_string();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        // Batches after the first: two in flight at most, so a slow reader slows the query.
        let (rows_tx, rows_rx) = tokio::sync::mpsc::channel::<datafusion::error::Result<RecordBatch>>(2);
        let task = self.workloads.spawn_interactive(async move {
            let ctx = match history_context(&snapshots, &models, runtime, partitions).await {
                Ok(ctx) => ctx,
                Err(e) => {
                    let _ = started_tx.send(Err(e));
                    return;
                }
            };
            let refused = |e: DataFusionError| {
                EngineError::Usage(format!(
                    "the query was refused: {e}. Queries are read-only SELECTs over the models' tables (`sluice query \"SHOW TABLES\"` lists them)"
                ))
            };
            let options = SQLOptions::new()
                .with_allow_ddl(false)
                .with_allow_dml(false)
                .with_allow_statements(false);
            let planned = async {
                let df = ctx.sql_with_options(&sql, options).await.map_err(refused)?;
                let df = df.limit(0, Some(limits.max_rows)).map_err(refused)?;
                df.execute_stream().await.map_err(refused)
            };
            let mut stream = match planned.await {
                Ok(stream) => stream,
                Err(e) => {
                    let _ = started_tx.send(Err(e));
                    return;
                }
            };
            // The first rows (or the end) come back with the schema: a query that fails or
            // runs out of time before them is an error answer, not a cut-off body.
            let first = match stream.next().await {
                Some(Err(e)) => {
                    let _ = started_tx.send(Err(query_failed(e, memory)));
                    return;
                }
                other => other,
            };
            if started_tx.send(Ok((stream.schema(), first))).is_err() {
                return;
            }
            loop {
                tokio::select! {
                    _ = rows_tx.closed() => return,
                    next = stream.next() => {
                        let Some(next) = next else { return };
                        let next = next.map_err(|e| DataFusionError::External(Box::new(query_failed(e, memory))));
                        if rows_tx.send(next).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let abort = AbortOnDrop(task.abort_handle());
        let started = match tokio::time::timeout(timeout, started_rx).await {
            Ok(Ok(started)) => started?,
            Ok(Err(_)) => {
                return Err(EngineError::Internal(
                    "the query stopped before it answered; the server's log may say why".into(),
                ));
            }
            Err(_) => {
                // Stopped at its next batch; its place is given back once it is dropped.
                task.abort();
                let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
                drop(abort);
                return Err(EngineError::TimedOut {
                    code: "query_timeout",
                    message: format!(
                        "the query did not start returning rows within {} (api.limits.query_timeout) and was stopped; narrow it (a WHERE on `_run_id` or the key, fewer joined snapshots) or raise the limit",
                        humantime::format_duration(timeout)
                    ),
                });
            }
        };
        let (schema, first) = started;
        let rest = tokio_stream_of(rows_rx);
        let rows = futures::stream::iter(first).chain(rest).map(move |batch| {
            // Held by the stream: dropping it stops the query and gives its place back (an
            // error above gave it back before it was answered).
            let _keep = (&abort, &admission);
            batch
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, rows)))
    }
}

/// Stops a spawned query when the stream reading it goes.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A receiver as a stream.
fn tokio_stream_of<T: Send + 'static>(
    receiver: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|item| (item, receiver))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_query_memory_says_which_limit() {
        let inner = DataFusionError::ResourcesExhausted("Failed to allocate 64 MB for SortExec".into());
        let wrapped = DataFusionError::Context("sorting".into(), Box::new(inner));
        let error = query_failed(wrapped, 512 * 1024 * 1024);
        assert!(matches!(
            error,
            EngineError::TooLarge {
                code: "query_memory_exceeded",
                ..
            }
        ));
        let text = error.to_string();
        assert!(
            text.contains("512 MiB") && text.contains("api.limits.query_memory"),
            "{text}"
        );
        let other = query_failed(DataFusionError::Plan("no such column".into()), 1);
        assert!(matches!(other, EngineError::Usage(_)));
    }
}
