//! The diff on a Ballista cluster (`diff: {engine: ballista}`): DataFusion's own distributed
//! scheduler and executors run each bucket's diff, so a model too large for one machine's diff
//! is spread over many. Only the diff moves; extraction, materialising full rows for the changes
//! and delivery stay in the process that runs the mapping.
//!
//! Each bucket's diff ([`crate::diff::Differ::changes_frame`]) is sent to the scheduler as a
//! logical plan (Parquet scans of the two snapshots' bucket files, the full outer join on the
//! key, the classification); the scheduler plans it into stages, shuffles both sides by key and
//! joins them on its executors, and the change rows stream back. Executors read the snapshot
//! files themselves, so they must reach the same snapshot store: an `s3://`, `gs://` or `az://`
//! store with credentials in the executors' environment (a local directory only works in
//! standalone mode, where the executor is this process).
//!
//! With no `scheduler`, a scheduler and an executor start inside this process (Ballista's
//! standalone mode) on a loopback port: the same code path as a cluster, for tests and trials.

use std::collections::HashMap;
use std::sync::OnceLock;

use ballista::prelude::{SessionConfigExt, SessionContextExt};
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::SessionStateBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};
use sluice_snapshots::SnapshotStore;

use crate::config::DiffConfig;

/// Partitions of a bucket's join on a remote cluster when `partitions` is not given.
const REMOTE_PARTITIONS: usize = 16;

/// Sessions by scheduler ("" for the standalone one): a process starts its standalone cluster
/// once, however many engines (one per change of definitions) it builds.
static SESSIONS: OnceLock<tokio::sync::Mutex<HashMap<String, SessionContext>>> = OnceLock::new();

/// A session whose queries run on the Ballista cluster `config` names, with `store` registered
/// so the scheduler and executors can read the snapshots.
pub async fn session(config: &DiffConfig, store: &SnapshotStore) -> Result<SessionContext> {
    let key = config
        .scheduler
        .as_ref()
        .map(|s| s.expose().to_string())
        .unwrap_or_default();
    let mut sessions = SESSIONS.get_or_init(Default::default).lock().await;
    if let Some(ctx) = sessions.get(&key) {
        store.register_with(ctx);
        return Ok(ctx.clone());
    }
    let ctx = match &config.scheduler {
        None => {
            let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
            let session_config = SessionConfig::new_with_ballista()
                .with_target_partitions(config.partitions.unwrap_or(2 * cores).max(1))
                .with_ballista_standalone_parallelism(cores);
            let state = SessionStateBuilder::new()
                .with_default_features()
                .with_config(session_config)
                .build();
            // The standalone scheduler and executor share this state's object stores.
            let local = SessionContext::new_with_state(state);
            store.register_with(&local);
            SessionContext::standalone_with_state(local.state())
                .await
                .map_err(|e| cluster_error("starting the in-process Ballista scheduler and executor", e))?
        }
        Some(url) => {
            let session_config = SessionConfig::new_with_ballista()
                .with_target_partitions(config.partitions.unwrap_or(REMOTE_PARTITIONS).max(1));
            let state = SessionStateBuilder::new()
                .with_default_features()
                .with_config(session_config)
                .build();
            SessionContext::remote_with_state(url.expose(), state)
                .await
                .map_err(|e| cluster_error(&format!("connecting to the Ballista scheduler at {url}"), e))?
        }
    };
    store.register_with(&ctx);
    sessions.insert(key, ctx.clone());
    Ok(ctx)
}

fn cluster_error(doing: &str, e: DataFusionError) -> DataFusionError {
    DataFusionError::Execution(format!("{doing}: {e}"))
}
