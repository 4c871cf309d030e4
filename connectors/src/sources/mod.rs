pub mod files;
pub mod sqlite;
