//! `type: files`: DataFusion over Parquet, CSV and NDJSON files, local or on object storage.
//!
//! ```yaml
//! sources:
//!   lake:
//!     type: files
//!     tables:
//!       users: data/users.parquet              # format from the extension
//!       events: { path: s3://bucket/events/, format: parquet }
//!     options: { aws_region: eu-west-1 }       # object_store options for URLs
//! ```

use std::path::Path;

use arrow::datatypes::DataType;
use async_trait::async_trait;
use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::Deserialize;
use sluice_engine::datafusion::error::DataFusionError;
use sluice_engine::datafusion::prelude::{
    CsvReadOptions, JsonReadOptions, ParquetReadOptions, SQLOptions, SessionConfig, SessionContext,
};
use sluice_engine::source::{ConnectorEnv, ModelQuery, SendableRecordBatchStream, Source};
use sluice_engine::{ConfigString, SourceError};
use url::Url;

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FilesConfig {
    /// Table name -> file, directory or URL (or a table spec).
    pub tables: IndexMap<String, TableSpec>,
    /// Options for object_store builders (credentials, region, endpoint).
    #[serde(default)]
    pub options: IndexMap<String, ConfigString>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum TableSpec {
    Path(ConfigString),
    Full(TableOptions),
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TableOptions {
    pub path: ConfigString,
    #[serde(default)]
    pub format: Option<FileFormat>,
    /// CSV only: whether the first line names the columns (default true).
    #[serde(default)]
    pub has_header: Option<bool>,
    /// CSV only: field delimiter (default `,`).
    #[serde(default)]
    pub delimiter: Option<char>,
    /// Hive-style partition columns (`.../year=2025/month=11/part.parquet`), outermost first:
    /// a list of names (read as strings) or a map of name to type (`string`, `int`, `bigint`,
    /// `date`).
    #[serde(default)]
    pub partitions: Option<Partitions>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Partitions {
    Names(Vec<String>),
    Typed(IndexMap<String, String>),
}

impl Partitions {
    fn columns(&self) -> Result<Vec<(String, DataType)>, String> {
        match self {
            Partitions::Names(names) => Ok(names.iter().map(|n| (n.clone(), DataType::Utf8)).collect()),
            Partitions::Typed(types) => types
                .iter()
                .map(|(name, ty)| {
                    let data_type = match ty.to_ascii_lowercase().as_str() {
                        "string" | "text" | "varchar" => DataType::Utf8,
                        "int" | "integer" => DataType::Int32,
                        "bigint" | "long" => DataType::Int64,
                        "date" => DataType::Date32,
                        other => {
                            return Err(format!(
                                "partition column `{name}`: unknown type `{other}` (use string, int, bigint or date)"
                            ));
                        }
                    };
                    Ok((name.clone(), data_type))
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    Parquet,
    Csv,
    #[serde(alias = "ndjson", alias = "jsonl")]
    Json,
}

#[derive(Debug, Clone)]
struct Table {
    name: String,
    location: String,
    format: FileFormat,
    has_header: bool,
    delimiter: u8,
    partitions: Vec<(String, DataType)>,
}

pub struct FilesSource {
    name: String,
    tables: Vec<Table>,
    options: Vec<(String, String)>,
}

impl FilesSource {
    pub fn new(name: &str, config: FilesConfig, env: &ConnectorEnv) -> Result<Self, String> {
        if config.tables.is_empty() {
            return Err("`tables` must name at least one table".into());
        }
        let mut tables = Vec::new();
        for (table, spec) in config.tables {
            let options = match spec {
                TableSpec::Path(path) => TableOptions {
                    path,
                    format: None,
                    has_header: None,
                    delimiter: None,
                    partitions: None,
                },
                TableSpec::Full(options) => options,
            };
            let location = resolve_location(options.path.expose(), &env.base_dir);
            let format = match options.format {
                Some(format) => format,
                None => format_from_extension(&location).ok_or_else(|| {
                    format!(
                        "table `{table}`: cannot tell the format of `{}` from its extension; add `format: parquet`, `csv` or `json`",
                        options.path
                    )
                })?,
            };
            let delimiter = options.delimiter.unwrap_or(',');
            if !delimiter.is_ascii() {
                return Err(format!(
                    "table `{table}`: the CSV delimiter must be one ASCII character"
                ));
            }
            let partitions = match &options.partitions {
                Some(p) => p.columns().map_err(|e| format!("table `{table}`: {e}"))?,
                None => Vec::new(),
            };
            tables.push(Table {
                name: table,
                location,
                format,
                has_header: options.has_header.unwrap_or(true),
                delimiter: delimiter as u8,
                partitions,
            });
        }
        Ok(Self {
            name: name.to_string(),
            tables,
            options: config
                .options
                .into_iter()
                .map(|(k, v)| (k, v.expose().to_string()))
                .collect(),
        })
    }

    /// A session with every table registered.
    async fn session(&self) -> Result<SessionContext, SourceError> {
        let ctx = SessionContext::new_with_config(SessionConfig::new().with_information_schema(true));
        for table in &self.tables {
            let connect_error = |e: DataFusionError| SourceError::Connect {
                source_name: self.name.clone(),
                message: format!(
                    "table `{}` ({}): {}",
                    table.name,
                    sluice_engine::secrets::shown_location(&table.location),
                    first_line(&e)
                ),
                hint: hint_for(&e),
            };
            if table.location.contains("://") && !table.location.starts_with("file://") {
                self.register_store(&ctx, &table.location)?;
            }
            let location = table.location.as_str();
            match table.format {
                FileFormat::Parquet => {
                    let options = ParquetReadOptions::default()
                        .file_extension(extension_of(location, ".parquet"))
                        .table_partition_cols(table.partitions.clone());
                    ctx.register_parquet(&table.name, location, options).await
                }
                FileFormat::Csv => {
                    let options = CsvReadOptions::new()
                        .has_header(table.has_header)
                        .delimiter(table.delimiter)
                        .file_extension(extension_of(location, ".csv"))
                        .table_partition_cols(table.partitions.clone());
                    ctx.register_csv(&table.name, location, options).await
                }
                FileFormat::Json => {
                    let options = JsonReadOptions::default()
                        .file_extension(extension_of(location, ".json"))
                        .table_partition_cols(table.partitions.clone());
                    ctx.register_json(&table.name, location, options).await
                }
            }
            .map_err(connect_error)?;
        }
        Ok(ctx)
    }

    fn register_store(&self, ctx: &SessionContext, location: &str) -> Result<(), SourceError> {
        let error = |message: String| SourceError::Connect {
            source_name: self.name.clone(),
            message,
            hint: None,
        };
        let shown = sluice_engine::secrets::shown_location(location);
        let url = Url::parse(location).map_err(|e| error(format!("`{shown}` is not a valid URL: {e}")))?;
        let opened = sluice_snapshots::open_store(&url, self.options.clone())
            .map_err(|e| error(format!("cannot open `{shown}`: {e}")))?;
        let mut base = url.clone();
        base.set_path("/");
        base.set_query(None);
        ctx.register_object_store(&base, opened.store);
        Ok(())
    }
}

#[async_trait]
impl Source for FilesSource {
    fn kind(&self) -> &'static str {
        "files"
    }

    async fn check(&self) -> Result<(), SourceError> {
        self.session().await.map(|_| ())
    }

    async fn extract(&self, query: &ModelQuery) -> Result<SendableRecordBatchStream, SourceError> {
        let frame = self.frame(query).await?;
        frame
            .execute_stream()
            .await
            .map_err(|e| self.query_error(query, &e))
    }

    async fn extract_partitions(
        &self,
        query: &ModelQuery,
    ) -> Result<Vec<SendableRecordBatchStream>, SourceError> {
        let frame = self.frame(query).await?;
        frame
            .execute_stream_partitioned()
            .await
            .map_err(|e| self.query_error(query, &e))
    }
}

impl FilesSource {
    fn query_error(&self, query: &ModelQuery, e: &DataFusionError) -> SourceError {
        SourceError::Query {
            model: query.model.clone(),
            source_name: self.name.clone(),
            message: first_line(e),
            hint: hint_for(e),
        }
    }

    /// The model's query planned over the source's tables.
    async fn frame(&self, query: &ModelQuery) -> Result<datafusion::dataframe::DataFrame, SourceError> {
        let ctx = self.session().await?;
        // Models read; they never write or change the session.
        let options = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        ctx.sql_with_options(&query.sql, options)
            .await
            .map_err(|e| self.query_error(query, &e))
    }
}

fn resolve_location(path: &str, base_dir: &Path) -> String {
    if path.contains("://") {
        return path.to_string();
    }
    let p = Path::new(path);
    let absolute = if p.is_absolute() {
        p.to_path_buf()
    } else {
        base_dir.join(p)
    };
    let mut text = absolute.display().to_string();
    if path.ends_with('/') && !text.ends_with('/') {
        text.push('/');
    }
    text
}

fn format_from_extension(location: &str) -> Option<FileFormat> {
    let lower = location.to_ascii_lowercase();
    let lower = lower.trim_end_matches('/');
    if lower.ends_with(".parquet") || lower.ends_with(".pq") {
        Some(FileFormat::Parquet)
    } else if lower.ends_with(".csv") || lower.ends_with(".tsv") {
        Some(FileFormat::Csv)
    } else if lower.ends_with(".json") || lower.ends_with(".jsonl") || lower.ends_with(".ndjson") {
        Some(FileFormat::Json)
    } else {
        None
    }
}

/// The file extension DataFusion should list: the path's own for a file, `default` for a
/// directory.
fn extension_of<'a>(location: &'a str, default: &'static str) -> &'a str {
    let last = location.rsplit('/').next().unwrap_or("");
    match last.rfind('.') {
        Some(pos) if !last.is_empty() => &last[pos..],
        _ => default,
    }
}

fn first_line(e: &DataFusionError) -> String {
    let text = e.to_string();
    text.lines().next().unwrap_or_default().to_string()
}

fn hint_for(e: &DataFusionError) -> Option<String> {
    let text = e.to_string();
    if text.contains("No such file") || text.contains("not found") && text.contains("Object at location") {
        Some("check the path; relative paths resolve against the directory of sluice.yaml".into())
    } else if text.contains("table") && text.contains("not found") {
        Some("tables of a files source are the names under its `tables:`".into())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_come_from_extensions() {
        assert_eq!(
            format_from_extension("a/users.parquet"),
            Some(FileFormat::Parquet)
        );
        assert_eq!(format_from_extension("s3://b/x.CSV"), Some(FileFormat::Csv));
        assert_eq!(format_from_extension("events.ndjson"), Some(FileFormat::Json));
        assert_eq!(format_from_extension("data/dir/"), None);
        assert_eq!(extension_of("/x/users.jsonl", ".json"), ".jsonl");
        assert_eq!(extension_of("/x/dir/", ".csv"), ".csv");
    }

    #[test]
    fn relative_paths_resolve_against_the_config_directory() {
        assert_eq!(
            resolve_location("data/u.parquet", Path::new("/srv")),
            "/srv/data/u.parquet"
        );
        assert_eq!(resolve_location("s3://b/k", Path::new("/srv")), "s3://b/k");
    }
}

#[cfg(test)]
mod extract_tests {
    use std::sync::Arc;

    use futures::TryStreamExt;

    use super::*;

    fn source(dir: &Path, tables: serde_json::Value) -> FilesSource {
        let config: FilesConfig = serde_json::from_value(serde_json::json!({ "tables": tables })).unwrap();
        FilesSource::new("lake", config, &ConnectorEnv::rooted_at(dir)).unwrap()
    }

    async fn rows(source: &FilesSource, sql: &str) -> Result<usize, String> {
        let query = ModelQuery::new("m", sql);
        let stream = source.extract(&query).await.map_err(|e| e.to_string())?;
        let batches: Vec<_> = stream.try_collect().await.map_err(|e| e.to_string())?;
        Ok(batches.iter().map(|b| b.num_rows()).sum())
    }

    #[tokio::test]
    async fn csv_and_ndjson_tables_are_queryable_together() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("users.csv"), "id,email\n1,a@x.io\n2,b@x.io\n").unwrap();
        std::fs::write(
            dir.path().join("plans.jsonl"),
            "{\"id\":1,\"plan\":\"pro\"}\n{\"id\":2,\"plan\":\"free\"}\n",
        )
        .unwrap();
        let s = source(
            dir.path(),
            serde_json::json!({ "users": "users.csv", "plans": "plans.jsonl" }),
        );
        let n = rows(
            &s,
            "SELECT u.id, u.email, p.plan FROM users u JOIN plans p ON u.id = p.id",
        )
        .await
        .unwrap();
        assert_eq!(n, 2);
    }

    #[tokio::test]
    async fn models_cannot_write_and_missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("users.csv"), "id\n1\n").unwrap();
        let s = source(dir.path(), serde_json::json!({ "users": "users.csv" }));
        let err = rows(&s, "CREATE TABLE x AS SELECT 1").await.unwrap_err();
        assert!(err.contains("model `m`"), "{err}");
        let err = rows(&s, "SELEC 1").await.unwrap_err();
        assert!(err.contains("the query failed in source `lake`"), "{err}");
        let missing = source(dir.path(), serde_json::json!({ "users": "nope.parquet" }));
        let err = missing.check().await.unwrap_err().to_string();
        assert!(
            err.contains("table `users`") && err.contains("nope.parquet"),
            "{err}"
        );
    }

    fn write_parquet(path: &Path, ids: &[i64]) {
        use arrow::array::{ArrayRef, Int64Array, RecordBatch};
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let batch =
            RecordBatch::try_from_iter(vec![("id", Arc::new(Int64Array::from(ids.to_vec())) as ArrayRef)])
                .unwrap();
        let file = std::fs::File::create(path).unwrap();
        let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
    }

    #[tokio::test]
    async fn globs_and_hive_partitions_read_a_lakehouse_layout() {
        let dir = tempfile::tempdir().unwrap();
        write_parquet(&dir.path().join("shards/part-0.parquet"), &[1, 2]);
        write_parquet(&dir.path().join("shards/part-1.parquet"), &[3]);
        write_parquet(&dir.path().join("shards/skip.parquet"), &[99]);
        write_parquet(
            &dir.path().join("events/year=2025/month=11/part-0.parquet"),
            &[1, 2],
        );
        write_parquet(&dir.path().join("events/year=2025/month=12/part-0.parquet"), &[3]);
        write_parquet(&dir.path().join("events/year=2026/month=1/part-0.parquet"), &[4]);
        let s = source(
            dir.path(),
            serde_json::json!({
                "shards": "shards/part-*.parquet",
                "events": { "path": "events/", "format": "parquet", "partitions": { "year": "int", "month": "int" } },
                "events_text": { "path": "events/", "format": "parquet", "partitions": ["year", "month"] },
            }),
        );
        assert_eq!(rows(&s, "SELECT id FROM shards").await.unwrap(), 3);
        assert_eq!(
            rows(&s, "SELECT id FROM events WHERE year = 2025").await.unwrap(),
            3
        );
        assert_eq!(
            rows(&s, "SELECT id FROM events WHERE year * 100 + month >= 202512")
                .await
                .unwrap(),
            2
        );
        assert_eq!(
            rows(&s, "SELECT id FROM events_text WHERE month = '1'")
                .await
                .unwrap(),
            1
        );
        let config: FilesConfig = serde_json::from_value(serde_json::json!({
            "tables": { "t": { "path": "events/", "format": "parquet", "partitions": { "year": "decimal" } } }
        }))
        .unwrap();
        let err = FilesSource::new("lake", config, &ConnectorEnv::rooted_at("/"))
            .err()
            .unwrap();
        assert!(err.contains("unknown type `decimal`"), "{err}");
    }

    #[test]
    fn a_path_without_a_known_extension_needs_a_format() {
        let config: FilesConfig =
            serde_json::from_value(serde_json::json!({ "tables": { "t": "data/dir/" } })).unwrap();
        let err = FilesSource::new("lake", config, &ConnectorEnv::rooted_at("/"))
            .err()
            .unwrap();
        assert!(err.contains("add `format: parquet`"), "{err}");
    }
}
