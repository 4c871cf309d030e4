//! Integration tests, one binary (linking DataFusion once).

mod ads;
mod api;
#[cfg(feature = "ballista")]
mod ballista;
mod bigquery;
mod buckets;
mod cli;
mod common;
mod convergence;
mod databricks;
mod dbt;
mod diff_properties;
mod faults;
mod gcs;
mod history_properties;
mod isolation;
mod mysql;
mod object_storage;
mod object_store_faults;
mod postgres;
mod postgres_destination;
mod postgres_metadata;
mod redshift;
mod replicas;
mod s3_proxy;
mod security;
mod serve;
mod services;
mod snowflake;
mod sqlserver;
mod tds;
mod vendors;
