//! sluice's engine: the domain of reverse ETL.
//!
//! - [`config`]: `sluice.yaml` (sources, models, destinations, mappings);
//! - [`model`]: model SQL templates and limits;
//! - [`source`] and [`destination`]: the traits connectors implement; [`connector_types`]: the
//!   types a build has and the JSON Schema of their options;
//! - [`diff`]: new snapshot against a mapping's baseline, in DataFusion;
//! - [`mapping`] and [`json`]: rows to destination records, column at a time;
//! - [`delivery`]: batching, concurrency, retries and per-record results for every destination;
//! - [`run`]: extract, diff, deliver, commit;
//! - [`metadata`]: runs, failures and baselines in SQLite or Postgres;
//! - [`catalog`], [`secrets`], [`tokens`]: definitions made through the API, their sealed
//!   secrets, and the API's bearer tokens;
//! - [`service`]: the control plane `sluice serve` and its API drive (definitions that change
//!   while running, triggered and cancelled runs, the scheduler);
//! - [`schedule`]: when mappings run (intervals, days and times, cron) in their time zones.

pub mod alerts;
#[cfg(feature = "ballista")]
pub mod ballista;
pub mod catalog;
pub mod checkpoint;
pub mod config;
pub mod connector_types;
pub mod dbt;
pub mod delivery;
pub mod destination;
pub mod diff;
mod engine;
mod error;
pub mod exceptions;
pub mod json;
pub mod mapping;
pub mod metadata;
pub mod metrics;
pub mod model;
#[cfg(feature = "openapi")]
pub mod openapi;
pub mod pii;
#[doc = "How far this process's runs have got, for the API and console."]
pub mod progress;
pub mod query;
pub mod retention;
pub mod run;
pub mod schedule;
pub mod scheduler;
pub mod secrets;
pub mod service;
pub mod source;
#[cfg(test)]
mod test_support;
pub mod tokens;
pub mod triggers;
pub mod workload;

pub use config::{ConfigString, ConnectorConfig, Op, Project, SECRET_KEYWORD, Secret, SecretUrl};
pub use engine::{Engine, METADATA_FILE, PayloadPreview, Preview};
pub use error::{ConfigError, DestinationError, EngineError, MappingError, Result, SourceError};
pub use metadata::Trigger;
pub use model::Limits;
pub use run::{DryRunSink, Quiet, RunControls, RunEvent, RunObserver, RunRequest, Shutdown};

/// Re-exported so connectors build on the exact versions the engine uses.
pub use arrow;
pub use datafusion;
