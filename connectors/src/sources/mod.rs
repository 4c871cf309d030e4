pub mod files;
pub mod mysql;
pub mod postgres;
pub mod sqlite;
