//! Integration tests, one binary (linking DataFusion once).

mod cli;
mod common;
mod diff_properties;
