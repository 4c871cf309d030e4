use std::path::PathBuf;

use thiserror::Error;

/// A problem in `sluice.yaml`: where it is and what to do about it.
#[derive(Debug, Error)]
#[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct ConfigError {
    pub path: PathBuf,
    /// 1-based line, when it could be found.
    pub line: Option<usize>,
    pub message: String,
}

/// What a source reports when it cannot connect or a model's query fails.
#[derive(Debug, Clone, Error)]
pub enum SourceError {
    #[error("cannot connect to source `{source_name}`: {message}{}", hint_suffix(hint))]
    Connect {
        source_name: String,
        message: String,
        hint: Option<String>,
    },
    #[error(
        "model `{model}`: the query failed in source `{source_name}`: {message}{}",
        hint_suffix(hint)
    )]
    Query {
        model: String,
        source_name: String,
        message: String,
        hint: Option<String>,
    },
    #[error(
        "model `{model}`: column `{column}` has database type {database_type}, which sluice cannot carry; {hint}"
    )]
    UnsupportedType {
        model: String,
        column: String,
        database_type: String,
        hint: String,
    },
    #[error("source `{source_name}` is misconfigured: {message}")]
    Config { source_name: String, message: String },
    /// The model's output broke one of sluice's limits (`limits:` in sluice.yaml).
    #[error("model `{model}`: {message}")]
    Limit { model: String, message: String },
}

/// What a destination reports outside of per-record results.
#[derive(Debug, Error)]
pub enum DestinationError {
    #[error("destination `{destination}` is misconfigured: {message}")]
    Config { destination: String, message: String },
    #[error("cannot reach destination `{destination}`: {message}")]
    Unreachable { destination: String, message: String },
    #[error("destination `{destination}` failed: {message}")]
    Failed { destination: String, message: String },
    /// A destination that writes files could not complete one on its object store.
    #[error("destination `{destination}` could not write to its object store: {message}")]
    Storage { destination: String, message: String },
}

/// A mapping that cannot be applied to its model's columns.
#[derive(Debug, Error)]
#[error("mapping `{mapping}`: {message}")]
pub struct MappingError {
    pub mapping: String,
    pub message: String,
}

/// Everything a run can fail with.
#[derive(Debug, Error)]
pub enum EngineError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Destination(#[from] DestinationError),
    #[error(transparent)]
    Mapping(#[from] MappingError),
    #[error("model `{model}`: {source}")]
    Snapshot {
        model: String,
        #[source]
        source: sluice_snapshots::SnapshotError,
    },
    #[error("snapshot store: {0}")]
    SnapshotStore(#[from] sluice_snapshots::SnapshotError),
    #[error("mapping `{mapping}`: diff failed: {source}")]
    Diff {
        mapping: String,
        #[source]
        source: datafusion::error::DataFusionError,
    },
    #[error("metadata store ({location}): {source}")]
    Metadata {
        location: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("metadata store migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error(
        "mapping `{mapping}`: the baseline cannot be compared with the new snapshot: {reason}. Run it once with --full to send every row again and start a new baseline"
    )]
    IncompatibleBaseline { mapping: String, reason: String },
    #[error("unknown {kind} `{name}`{}", available_suffix(available))]
    Unknown {
        kind: &'static str,
        name: String,
        available: Vec<String>,
    },
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error(
        "mapping `{mapping}`: run {run_id} lost its claim on the mapping (its lease lapsed, and another run took the mapping over); it stopped, and what it delivered since its last commit point is sent again"
    )]
    LeaseLost { mapping: String, run_id: String },
    /// A shutdown was requested (SIGTERM, Ctrl-C); the run stopped at a commit point.
    #[error("interrupted by a shutdown request: {0}")]
    Interrupted(String),
    /// Someone cancelled the run; it stopped at a commit point.
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// A request that cannot be served as asked (no such record, wrong number of values).
    #[error("{0}")]
    Usage(String),
    /// A request that conflicts with the state things are in (a name the file defines, a
    /// mapping that is running, a source models still use).
    #[error("{message}")]
    Conflict {
        /// Machine-readable reason (`defined_in_file`, `run_in_progress`, `in_use`, ...).
        code: &'static str,
        message: String,
        /// The run in the way, when it is one.
        run_id: Option<String>,
    },
    /// A definition sent through the API that cannot be taken in as it is.
    #[error("{message}")]
    Invalid { message: String },
    #[error("{0}")]
    Internal(String),
    /// Too much of one kind of interactive work is going on (`api.limits`); ask again after
    /// `retry_after`.
    #[error("{message}")]
    Busy {
        code: &'static str,
        message: String,
        retry_after: std::time::Duration,
    },
    /// Interactive work (a query, a preview, a connection test) ran past its time limit and
    /// was stopped.
    #[error("{message}")]
    TimedOut { code: &'static str, message: String },
    /// Interactive work that cannot be done within the process's bounds as asked (a query
    /// needing more memory than `api.limits.query_memory`, even spilling).
    #[error("{message}")]
    TooLarge { code: &'static str, message: String },
}

impl EngineError {
    /// What a user can do about this error, when sluice can tell.
    pub fn recommended_action(&self) -> Option<String> {
        let text = self.to_string();
        match self {
            EngineError::Source(SourceError::Connect { .. }) => Some(
                "check the source's connection settings and that the database is up; `sluice check` tests the connection".into(),
            ),
            EngineError::Source(SourceError::Query { .. }) => {
                Some("fix the model's SQL; `sluice preview MODEL` runs it and shows the rows".into())
            }
            EngineError::Source(SourceError::UnsupportedType { .. }) => {
                Some("cast the column in the model's SQL to a type sluice carries (text, number, timestamp)".into())
            }
            EngineError::Source(SourceError::Limit { .. }) => {
                Some("narrow the model, or raise the limit named in the error under `limits:`".into())
            }
            EngineError::Config(_) | EngineError::Mapping(_) | EngineError::Unknown { .. } => {
                Some("fix sluice.yaml where the error points, then `sluice check`".into())
            }
            EngineError::IncompatibleBaseline { .. } => {
                Some("run the mapping once with --full (a backfill) to start a new baseline".into())
            }
            EngineError::Destination(DestinationError::Config { .. }) => {
                Some("fix the destination's settings in sluice.yaml, then `sluice check`".into())
            }
            EngineError::Destination(DestinationError::Unreachable { .. }) => Some(
                "check the network path to the destination; the next run sends every undelivered record".into(),
            ),
            EngineError::Destination(DestinationError::Failed { .. }) => Some(destination_action(&text)),
            EngineError::Destination(DestinationError::Storage { .. }) => Some(
                sluice_snapshots::store_action(&text)
                    .unwrap_or("check the destination's URL, its credentials and the store's status; the next run writes every record again")
                    .into(),
            ),
            EngineError::Metadata { .. } | EngineError::Migration(_) => {
                Some("check that the metadata store (state.metadata) is reachable and writable".into())
            }
            EngineError::Snapshot { .. } | EngineError::SnapshotStore(_) => Some(
                sluice_snapshots::store_action(&text)
                    .unwrap_or("check that the snapshot store (`snapshot_store`) is reachable, writable and has space")
                    .into(),
            ),
            EngineError::LeaseLost { .. } => Some(
                "the process could not renew its lease within `lease_ttl` (it was paused, or the metadata store was out of reach that long); nothing is lost, the next run goes on".into(),
            ),
            EngineError::Interrupted(_) | EngineError::Cancelled(_) => {
                Some("nothing to do: the next run sends what this one did not".into())
            }
            // Reading snapshots for a diff, or writing an exceptions file, meets the store too.
            EngineError::Diff { .. } | EngineError::Internal(_) => {
                sluice_snapshots::store_action(&text).map(Into::into)
            }
            _ => None,
        }
    }
}

/// The action for a destination that stopped a run, read from the status it answered.
fn destination_action(message: &str) -> String {
    known_destination_action(message).unwrap_or_else(|| {
        "read the destination's error above; the next run sends every record it did not acknowledge".into()
    })
}

/// The action for a destination's error, when its status or wording says what is wrong.
pub(crate) fn known_destination_action(message: &str) -> Option<String> {
    let has = |needle: &str| message.contains(needle);
    let action = if has("401") || has("403") || has("nauthori") || has("orbidden") {
        "the destination refused the credentials: renew the token or key, and check that it has the write scopes the error names"
    } else if has("404") {
        "the destination does not know the object or endpoint: check the mapping's action and options (object names, list ids)"
    } else if has("429") || has("rate limit") {
        "the destination kept limiting requests: lower `delivery.rate` or run less often"
    } else if has("timed out") || has("timeout") || has("connection") {
        "the destination did not answer in time: check its status page; the next run sends every undelivered record"
    } else {
        return None;
    };
    Some(action.to_string())
}

fn hint_suffix(hint: &Option<String>) -> String {
    hint.as_ref().map(|h| format!(" (hint: {h})")).unwrap_or_default()
}

fn available_suffix(available: &[String]) -> String {
    if available.is_empty() {
        String::new()
    } else {
        format!(" (defined: {})", available.join(", "))
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recommended_actions_follow_the_error() {
        let auth = known_destination_action("HTTP 401 Unauthorized from HubSpot: expired token");
        assert!(auth.is_some_and(|a| a.contains("credentials")));
        assert!(known_destination_action("invalid email").is_none());
        let failed = EngineError::Destination(DestinationError::Failed {
            destination: "crm".into(),
            message: "HTTP 403 from Braze".into(),
        });
        assert!(
            failed
                .recommended_action()
                .is_some_and(|a| a.contains("write scopes"))
        );
        let baseline = EngineError::IncompatibleBaseline {
            mapping: "m".into(),
            reason: "key changed".into(),
        };
        assert!(
            baseline
                .recommended_action()
                .is_some_and(|a| a.contains("--full"))
        );
    }
}
