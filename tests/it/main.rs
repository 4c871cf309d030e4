//! Integration tests, one binary (linking DataFusion once).

mod api;
#[cfg(feature = "ballista")]
mod ballista;
mod cli;
mod common;
mod convergence;
mod diff_properties;
mod faults;
mod mysql;
mod postgres;
mod postgres_destination;
mod postgres_metadata;
mod serve;
mod services;
mod vendors;
