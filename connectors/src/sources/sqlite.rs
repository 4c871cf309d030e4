//! `type: sqlite`: a SQLite database file; the model's SQL runs in SQLite.
//!
//! ```yaml
//! sources:
//!   app:
//!     type: sqlite
//!     path: app.db        # relative to sluice.yaml
//! ```
//!
//! Rows stream from a read-only connection into Arrow builders, 8,192 at a time. SQLite types
//! values per row, so a column's Arrow type comes from its declared type (`INTEGER` -> Int64,
//! `REAL`/`FLOAT`/`DOUBLE` -> Float64, `TEXT`/`CHAR`/`CLOB` -> Utf8, `BLOB` -> Binary,
//! `BOOLEAN` -> Boolean; `DATE`/`DATETIME`/`TIMESTAMP` stay text, as SQLite stores them), or,
//! for expressions and untyped columns, from the values of the first batch. A later value that
//! does not fit its column's type fails the run with the column's name and a hint to `CAST` it.

use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryArray, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use futures::StreamExt;
use schemars::JsonSchema;
use serde::Deserialize;
use sluice_engine::datafusion::error::DataFusionError;
use sluice_engine::source::{ConnectorEnv, ModelQuery, SendableRecordBatchStream, Source};
use sluice_engine::{ConfigString, SourceError};
use sqlx::sqlite::{SqliteConnectOptions, SqliteRow};
use sqlx::{
    AssertSqlSafe, Column, ConnectOptions, Connection, Row, SqlSafeStr, Statement, TypeInfo, ValueRef,
};
use tokio::sync::{mpsc, oneshot};

const BATCH_ROWS: usize = 8192;

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SqliteConfig {
    /// The database file, relative to sluice.yaml.
    pub path: ConfigString,
}

pub struct SqliteSource {
    name: String,
    path: PathBuf,
}

impl SqliteSource {
    pub fn new(name: &str, config: SqliteConfig, env: &ConnectorEnv) -> Self {
        let path = PathBuf::from(config.path.expose());
        let path = if path.is_absolute() {
            path
        } else {
            env.base_dir.join(path)
        };
        Self {
            name: name.to_string(),
            path,
        }
    }

    async fn connect(&self) -> Result<sqlx::SqliteConnection, SourceError> {
        if !self.path.exists() {
            return Err(SourceError::Connect {
                source_name: self.name.clone(),
                message: format!("database file {} does not exist", self.path.display()),
                hint: Some(
                    "check `path`; relative paths resolve against the directory of sluice.yaml".into(),
                ),
            });
        }
        SqliteConnectOptions::new()
            .filename(&self.path)
            .read_only(true)
            .connect()
            .await
            .map_err(|e| SourceError::Connect {
                source_name: self.name.clone(),
                message: format!("{}: {e}", self.path.display()),
                hint: None,
            })
    }
}

#[async_trait]
impl Source for SqliteSource {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    async fn check(&self) -> Result<(), SourceError> {
        let mut conn = self.connect().await?;
        sqlx::query("SELECT count(*) FROM sqlite_master")
            .fetch_one(&mut conn)
            .await
            .map_err(|e| SourceError::Connect {
                source_name: self.name.clone(),
                message: e.to_string(),
                hint: Some("is the file a SQLite database?".into()),
            })?;
        conn.close().await.ok();
        Ok(())
    }

    async fn extract(&self, query: &ModelQuery) -> Result<SendableRecordBatchStream, SourceError> {
        let conn = self.connect().await?;
        let (schema_tx, schema_rx) = oneshot::channel();
        let (batch_tx, batch_rx) = mpsc::channel(2);
        let reader = Reader {
            model: query.model.clone(),
            source: self.name.clone(),
            sql: query.sql.clone(),
        };
        tokio::spawn(reader.run(conn, schema_tx, batch_tx));
        let schema = schema_rx.await.map_err(|_| SourceError::Query {
            model: query.model.clone(),
            source_name: self.name.clone(),
            message: "the reader stopped before producing a schema".into(),
            hint: None,
        })??;
        Ok(super::receiver_stream(schema, batch_rx))
    }
}

/// How a column's values are carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Integer,
    Real,
    Text,
    Blob,
    Boolean,
}

impl Kind {
    fn data_type(self) -> DataType {
        match self {
            Kind::Integer => DataType::Int64,
            Kind::Real => DataType::Float64,
            Kind::Text => DataType::Utf8,
            Kind::Blob => DataType::Binary,
            Kind::Boolean => DataType::Boolean,
        }
    }

    fn from_declared(name: &str) -> Option<Kind> {
        match name {
            "INTEGER" => Some(Kind::Integer),
            "REAL" => Some(Kind::Real),
            "TEXT" | "DATE" | "TIME" | "DATETIME" => Some(Kind::Text),
            "BLOB" => Some(Kind::Blob),
            "BOOLEAN" => Some(Kind::Boolean),
            _ => None, // NULL (an expression) or NUMERIC: decided by the values
        }
    }
}

struct Reader {
    model: String,
    source: String,
    sql: String,
}

type SchemaSender = oneshot::Sender<Result<SchemaRef, SourceError>>;
type BatchSender = mpsc::Sender<Result<RecordBatch, DataFusionError>>;

impl Reader {
    fn query_error(&self, message: String, hint: Option<String>) -> SourceError {
        SourceError::Query {
            model: self.model.clone(),
            source_name: self.source.clone(),
            message,
            hint,
        }
    }

    async fn run(self, mut conn: sqlx::SqliteConnection, schema_tx: SchemaSender, batch_tx: BatchSender) {
        let mut schema_tx = Some(schema_tx);
        let result = self.stream_rows(&mut conn, &mut schema_tx, &batch_tx).await;
        if let Err(e) = result {
            match schema_tx.take() {
                Some(tx) => {
                    let _ = tx.send(Err(e));
                }
                None => {
                    let _ = batch_tx.send(Err(DataFusionError::External(Box::new(e)))).await;
                }
            }
        }
        conn.close().await.ok();
    }

    async fn stream_rows(
        &self,
        conn: &mut sqlx::SqliteConnection,
        schema_tx: &mut Option<SchemaSender>,
        batch_tx: &BatchSender,
    ) -> Result<(), SourceError> {
        // Column names (and declared types) even when the query returns no rows.
        let statement = sqlx::Executor::prepare(&mut *conn, AssertSqlSafe(self.sql.clone()).into_sql_str())
            .await
            .map_err(|e| self.query_error(sqlite_message(&e), sqlite_hint(&e)))?;
        let described: Vec<(String, Option<Kind>)> = statement
            .columns()
            .iter()
            .map(|c| (c.name().to_string(), Kind::from_declared(c.type_info().name())))
            .collect();
        // The model's SQL is the user's own query, run on a read-only connection.
        let mut rows = sqlx::query(AssertSqlSafe(self.sql.clone())).fetch(&mut *conn);
        let mut pending: Vec<SqliteRow> = Vec::with_capacity(BATCH_ROWS);
        let mut columns: Option<Vec<(String, Kind)>> = None;
        loop {
            let next = rows.next().await;
            let done = next.is_none();
            if let Some(row) = next {
                let row = row.map_err(|e| self.query_error(sqlite_message(&e), sqlite_hint(&e)))?;
                pending.push(row);
            }
            if pending.len() < BATCH_ROWS && !done {
                continue;
            }
            if columns.is_none() {
                let decided = decide_columns(&described, &pending);
                let schema = Arc::new(Schema::new(
                    decided
                        .iter()
                        .map(|(name, kind)| Field::new(name, kind.data_type(), true))
                        .collect::<Vec<_>>(),
                ));
                if let Some(tx) = schema_tx.take()
                    && tx.send(Ok(schema)).is_err()
                {
                    return Ok(()); // the run gave up
                }
                columns = Some(decided);
            }
            if let Some(columns) = &columns
                && !pending.is_empty()
            {
                let batch = self.to_batch(columns, &pending)?;
                pending.clear();
                if batch_tx.send(Ok(batch)).await.is_err() {
                    return Ok(());
                }
            }
            if done {
                return Ok(());
            }
        }
    }

    fn to_batch(&self, columns: &[(String, Kind)], rows: &[SqliteRow]) -> Result<RecordBatch, SourceError> {
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(columns.len());
        for (i, (name, kind)) in columns.iter().enumerate() {
            let mismatch = |found: &str| SourceError::UnsupportedType {
                model: self.model.clone(),
                column: name.clone(),
                database_type: format!("{found} (in a column sluice carries as {})", kind.data_type()),
                hint: format!(
                    "SQLite stores values of any type in any column; CAST(\"{name}\" AS TEXT) or another type in the model's SQL makes them uniform"
                ),
            };
            let values = rows.iter().map(|row| {
                let value = row.try_get_raw(i).map_err(|e| mismatch(&e.to_string()))?;
                Ok((!value.is_null()).then_some(value))
            });
            let array: ArrayRef = match kind {
                Kind::Integer => Arc::new(
                    values
                        .map(|v| v?.map(|v| as_i64(v).map_err(|t| mismatch(&t))).transpose())
                        .collect::<Result<Int64Array, _>>()?,
                ),
                Kind::Real => Arc::new(
                    values
                        .map(|v| v?.map(|v| as_f64(v).map_err(|t| mismatch(&t))).transpose())
                        .collect::<Result<Float64Array, _>>()?,
                ),
                Kind::Boolean => Arc::new(
                    values
                        .map(|v| v?.map(|v| as_bool(v).map_err(|t| mismatch(&t))).transpose())
                        .collect::<Result<BooleanArray, _>>()?,
                ),
                Kind::Text => Arc::new(
                    values
                        .map(|v| v?.map(|v| as_text(v).map_err(|t| mismatch(&t))).transpose())
                        .collect::<Result<StringArray, _>>()?,
                ),
                Kind::Blob => Arc::new(
                    values
                        .map(|v| v?.map(|v| as_bytes(v).map_err(|t| mismatch(&t))).transpose())
                        .collect::<Result<BinaryArray, _>>()?,
                ),
            };
            arrays.push(array);
        }
        let schema = Arc::new(Schema::new(
            columns
                .iter()
                .map(|(name, kind)| Field::new(name, kind.data_type(), true))
                .collect::<Vec<_>>(),
        ));
        RecordBatch::try_new(schema, arrays).map_err(|e| self.query_error(e.to_string(), None))
    }
}

type Value<'r> = sqlx::sqlite::SqliteValueRef<'r>;

/// The SQLite storage class of a value, for messages.
fn storage_class(value: &Value<'_>) -> String {
    value.type_info().name().to_string()
}

fn as_i64(value: Value<'_>) -> Result<i64, String> {
    let class = storage_class(&value);
    match class.as_str() {
        "INTEGER" | "BOOLEAN" => decode::<i64>(value),
        // A REAL that holds a whole number, or text that spells one.
        "REAL" => decode::<f64>(value)
            .ok()
            .filter(|v| v.fract() == 0.0 && v.is_finite())
            .map(|v| v as i64)
            .ok_or(class),
        "TEXT" => decode::<&str>(value)?.trim().parse().map_err(|_| class),
        _ => Err(class),
    }
}

fn as_f64(value: Value<'_>) -> Result<f64, String> {
    let class = storage_class(&value);
    match class.as_str() {
        "INTEGER" | "BOOLEAN" => decode::<i64>(value).map(|v| v as f64),
        "REAL" => decode::<f64>(value),
        "TEXT" => decode::<&str>(value)?.trim().parse().map_err(|_| class),
        _ => Err(class),
    }
}

fn as_bool(value: Value<'_>) -> Result<bool, String> {
    let class = storage_class(&value);
    match class.as_str() {
        "INTEGER" | "BOOLEAN" => decode::<i64>(value).map(|v| v != 0),
        "TEXT" => match decode::<&str>(value)?.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "t" | "yes" => Ok(true),
            "0" | "false" | "f" | "no" => Ok(false),
            _ => Err(class),
        },
        _ => Err(class),
    }
}

fn as_text(value: Value<'_>) -> Result<String, String> {
    let class = storage_class(&value);
    match class.as_str() {
        "INTEGER" | "BOOLEAN" => decode::<i64>(value).map(|v| v.to_string()),
        "REAL" => decode::<f64>(value).map(|v| v.to_string()),
        "BLOB" => String::from_utf8(decode::<Vec<u8>>(value)?).map_err(|_| class),
        _ => decode::<String>(value),
    }
}

fn as_bytes(value: Value<'_>) -> Result<Vec<u8>, String> {
    let class = storage_class(&value);
    match class.as_str() {
        "BLOB" => decode::<Vec<u8>>(value),
        "TEXT" => decode::<String>(value).map(String::into_bytes),
        _ => Err(class),
    }
}

/// Column names and kinds: declared types first, else what the first rows hold.
fn decide_columns(described: &[(String, Option<Kind>)], rows: &[SqliteRow]) -> Vec<(String, Kind)> {
    described
        .iter()
        .enumerate()
        .map(|(i, (name, declared))| {
            let declared = declared.or_else(|| {
                let first = rows.first()?;
                Kind::from_declared(first.columns().get(i)?.type_info().name())
            });
            let kind = declared.unwrap_or_else(|| {
                let (mut integer, mut real, mut text, mut blob) = (false, false, false, false);
                for row in rows {
                    let Ok(value) = row.try_get_raw(i) else { continue };
                    if value.is_null() {
                        continue;
                    }
                    match value.type_info().name() {
                        "INTEGER" => integer = true,
                        "REAL" => real = true,
                        "BLOB" => blob = true,
                        _ => text = true,
                    }
                }
                if text {
                    Kind::Text
                } else if blob {
                    Kind::Blob
                } else if real {
                    Kind::Real
                } else if integer {
                    Kind::Integer
                } else {
                    Kind::Text
                }
            });
            (name.clone(), kind)
        })
        .collect()
}

fn decode<'r, T: sqlx::Decode<'r, sqlx::Sqlite>>(
    value: sqlx::sqlite::SqliteValueRef<'r>,
) -> Result<T, String> {
    T::decode(value).map_err(|e| e.to_string())
}

fn sqlite_message(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => db.message().to_string(),
        other => other.to_string(),
    }
}

fn sqlite_hint(e: &sqlx::Error) -> Option<String> {
    let message = sqlite_message(e);
    if message.contains("no such table") {
        Some("the model's SQL runs in the SQLite file; check the table name".into())
    } else if message.contains("no such column") {
        Some("check the column names in the model's SQL".into())
    } else if message.contains("syntax error") {
        Some("the model's SQL runs in SQLite, so it must be SQLite's dialect".into())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use arrow::array::{AsArray, RecordBatch};
    use arrow::datatypes::{Float64Type, Int64Type};
    use futures::TryStreamExt;
    use sqlx::sqlite::SqliteConnectOptions;
    use sqlx::{ConnectOptions, Connection};

    use super::*;

    async fn database(statements: &[&str]) -> (tempfile::TempDir, SqliteSource) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let mut conn = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .unwrap()
            .create_if_missing(true)
            .connect()
            .await
            .unwrap();
        for statement in statements {
            sqlx::query(AssertSqlSafe(statement.to_string()))
                .execute(&mut conn)
                .await
                .unwrap();
        }
        conn.close().await.unwrap();
        let env = ConnectorEnv::rooted_at(dir.path());
        let config = SqliteConfig {
            path: ConfigString::literal("w.db"),
        };
        (dir, SqliteSource::new("app", config, &env))
    }

    async fn extract(source: &SqliteSource, sql: &str) -> Result<Vec<RecordBatch>, String> {
        let query = ModelQuery::new("m", sql);
        let stream = source.extract(&query).await.map_err(|e| e.to_string())?;
        stream.try_collect().await.map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn declared_types_and_expressions_become_arrow_types() {
        let (_dir, source) = database(&[
            "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, score REAL, active BOOLEAN, born DATE, photo BLOB)",
            "INSERT INTO t VALUES (1, 'Ada', 1.5, 1, '1815-12-10', x'00ff'), (2, NULL, NULL, 0, NULL, NULL)",
        ])
        .await;
        let batches = extract(&source, "SELECT id, name, score, active, born, photo, id * 2 AS twice, score + 1 AS plus FROM t ORDER BY id").await.unwrap();
        let schema = batches[0].schema();
        let types: Vec<String> = schema
            .fields()
            .iter()
            .map(|f| format!("{}:{}", f.name(), f.data_type()))
            .collect();
        assert_eq!(
            types,
            [
                "id:Int64",
                "name:Utf8",
                "score:Float64",
                "active:Boolean",
                "born:Utf8",
                "photo:Binary",
                "twice:Int64",
                "plus:Float64"
            ]
        );
        let batch = &batches[0];
        assert_eq!(batch.num_rows(), 2);
        assert_eq!(batch.column(0).as_primitive::<Int64Type>().values(), &[1, 2]);
        assert_eq!(batch.column(1).as_string::<i32>().value(0), "Ada");
        assert!(batch.column(1).is_null(1));
        assert_eq!(batch.column(2).as_primitive::<Float64Type>().value(0), 1.5);
        assert!(batch.column(3).as_boolean().value(0));
        assert_eq!(batch.column(5).as_binary::<i32>().value(0), &[0, 255]);
        assert_eq!(batch.column(6).as_primitive::<Int64Type>().values(), &[2, 4]);
    }

    #[tokio::test]
    async fn an_empty_result_still_has_its_columns() {
        let (_dir, source) = database(&["CREATE TABLE t (id INTEGER, name TEXT)"]).await;
        let query = ModelQuery::new("m", "SELECT id, name FROM t");
        let stream = source.extract(&query).await.unwrap();
        assert_eq!(stream.schema().fields().len(), 2);
        assert_eq!(stream.schema().field(0).data_type(), &DataType::Int64);
    }

    #[tokio::test]
    async fn values_that_do_not_fit_their_column_fail_with_the_column_name() {
        let (_dir, source) =
            database(&["CREATE TABLE t (id INTEGER, v)", "INSERT INTO t VALUES (1, 5)"]).await;
        // 8,192 integers decide the column's type; then a text value arrives.
        let sql = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 9000) \
                   SELECT i AS id, CASE WHEN i = 9000 THEN 'nine thousand' ELSE i END AS v FROM n";
        let err = extract(&source, sql).await.unwrap_err();
        assert!(
            err.contains("column `v`") && err.contains("CAST(\"v\" AS TEXT)"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn sqlite_errors_come_with_hints() {
        let (_dir, source) = database(&["CREATE TABLE t (id INTEGER)"]).await;
        let err = extract(&source, "SELECT * FROM users").await.unwrap_err();
        assert!(
            err.contains("no such table: users") && err.contains("hint"),
            "{err}"
        );
        let missing = SqliteSource::new(
            "app",
            SqliteConfig {
                path: ConfigString::literal("nope.db"),
            },
            &ConnectorEnv::rooted_at(std::env::temp_dir()),
        );
        let err = missing.check().await.unwrap_err().to_string();
        assert!(err.contains("does not exist"), "{err}");
    }
}
