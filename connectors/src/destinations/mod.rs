pub mod file;
pub mod webhook;
