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

use arrow::array::{
    ArrayBuilder, ArrayRef, BinaryBuilder, BooleanBuilder, Float64Builder, Int64Builder, RecordBatch,
    StringBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use futures::StreamExt;
use serde::Deserialize;
use sluice_engine::datafusion::error::DataFusionError;
use sluice_engine::datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use sluice_engine::source::{ConnectorEnv, ModelQuery, SendableRecordBatchStream, Source};
use sluice_engine::{ConfigString, SourceError};
use sqlx::sqlite::{SqliteConnectOptions, SqliteRow};
use sqlx::{
    AssertSqlSafe, Column, ConnectOptions, Connection, Row, SqlSafeStr, Statement, TypeInfo, ValueRef,
};
use tokio::sync::{mpsc, oneshot};

const BATCH_ROWS: usize = 8192;

#[derive(Debug, Clone, Deserialize)]
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
        let stream = tokio_stream_from(batch_rx);
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, stream)))
    }
}

fn tokio_stream_from(
    mut rx: mpsc::Receiver<Result<RecordBatch, DataFusionError>>,
) -> impl futures::Stream<Item = Result<RecordBatch, DataFusionError>> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
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

    fn builder(self) -> Box<dyn ArrayBuilder> {
        match self {
            Kind::Integer => Box::new(Int64Builder::with_capacity(BATCH_ROWS)),
            Kind::Real => Box::new(Float64Builder::with_capacity(BATCH_ROWS)),
            Kind::Text => Box::new(StringBuilder::with_capacity(BATCH_ROWS, BATCH_ROWS * 16)),
            Kind::Blob => Box::new(BinaryBuilder::with_capacity(BATCH_ROWS, BATCH_ROWS * 16)),
            Kind::Boolean => Box::new(BooleanBuilder::with_capacity(BATCH_ROWS)),
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
                if let Some(tx) = schema_tx.take() {
                    if tx.send(Ok(schema)).is_err() {
                        return Ok(()); // the run gave up
                    }
                }
                columns = Some(decided);
            }
            if let Some(columns) = &columns {
                if !pending.is_empty() {
                    let batch = self.to_batch(columns, &pending)?;
                    pending.clear();
                    if batch_tx.send(Ok(batch)).await.is_err() {
                        return Ok(());
                    }
                }
            }
            if done {
                return Ok(());
            }
        }
    }

    fn to_batch(&self, columns: &[(String, Kind)], rows: &[SqliteRow]) -> Result<RecordBatch, SourceError> {
        let mut builders: Vec<Box<dyn ArrayBuilder>> = columns.iter().map(|(_, k)| k.builder()).collect();
        for (i, ((name, kind), builder)) in columns.iter().zip(builders.iter_mut()).enumerate() {
            let mismatch = |found: &str| SourceError::UnsupportedType {
                model: self.model.clone(),
                column: name.clone(),
                database_type: format!("{found} (in a column sluice carries as {})", kind.data_type()),
                hint: format!(
                    "SQLite stores values of any type in any column; CAST(\"{name}\" AS TEXT) or another type in the model's SQL makes them uniform"
                ),
            };
            match kind {
                Kind::Integer => {
                    let b = downcast::<Int64Builder>(builder);
                    for row in rows {
                        let value = row.try_get_raw(i).map_err(|e| mismatch(&e.to_string()))?;
                        if value.is_null() {
                            b.append_null();
                            continue;
                        }
                        match value.type_info().name() {
                            "INTEGER" | "BOOLEAN" => {
                                b.append_value(decode::<i64>(value).map_err(|e| mismatch(&e))?)
                            }
                            "REAL" => {
                                let v: f64 = decode(value).map_err(|e| mismatch(&e))?;
                                if v.fract() != 0.0 || !v.is_finite() {
                                    return Err(mismatch("REAL"));
                                }
                                b.append_value(v as i64);
                            }
                            "TEXT" => {
                                let text: String = decode(value).map_err(|e| mismatch(&e))?;
                                b.append_value(text.trim().parse::<i64>().map_err(|_| mismatch("TEXT"))?);
                            }
                            other => return Err(mismatch(other)),
                        }
                    }
                }
                Kind::Real => {
                    let b = downcast::<Float64Builder>(builder);
                    for row in rows {
                        let value = row.try_get_raw(i).map_err(|e| mismatch(&e.to_string()))?;
                        if value.is_null() {
                            b.append_null();
                            continue;
                        }
                        match value.type_info().name() {
                            "INTEGER" | "BOOLEAN" => {
                                b.append_value(decode::<i64>(value).map_err(|e| mismatch(&e))? as f64)
                            }
                            "REAL" => b.append_value(decode::<f64>(value).map_err(|e| mismatch(&e))?),
                            "TEXT" => {
                                let text: String = decode(value).map_err(|e| mismatch(&e))?;
                                b.append_value(text.trim().parse::<f64>().map_err(|_| mismatch("TEXT"))?);
                            }
                            other => return Err(mismatch(other)),
                        }
                    }
                }
                Kind::Boolean => {
                    let b = downcast::<BooleanBuilder>(builder);
                    for row in rows {
                        let value = row.try_get_raw(i).map_err(|e| mismatch(&e.to_string()))?;
                        if value.is_null() {
                            b.append_null();
                            continue;
                        }
                        match value.type_info().name() {
                            "INTEGER" | "BOOLEAN" => {
                                b.append_value(decode::<i64>(value).map_err(|e| mismatch(&e))? != 0)
                            }
                            "TEXT" => {
                                let text: String = decode(value).map_err(|e| mismatch(&e))?;
                                b.append_value(match text.trim().to_ascii_lowercase().as_str() {
                                    "1" | "true" | "t" | "yes" => true,
                                    "0" | "false" | "f" | "no" => false,
                                    _ => return Err(mismatch("TEXT")),
                                });
                            }
                            other => return Err(mismatch(other)),
                        }
                    }
                }
                Kind::Text => {
                    let b = downcast::<StringBuilder>(builder);
                    for row in rows {
                        let value = row.try_get_raw(i).map_err(|e| mismatch(&e.to_string()))?;
                        if value.is_null() {
                            b.append_null();
                            continue;
                        }
                        match value.type_info().name() {
                            "INTEGER" | "BOOLEAN" => {
                                b.append_value(decode::<i64>(value).map_err(|e| mismatch(&e))?.to_string())
                            }
                            "REAL" => {
                                b.append_value(decode::<f64>(value).map_err(|e| mismatch(&e))?.to_string())
                            }
                            "BLOB" => {
                                let bytes: Vec<u8> = decode(value).map_err(|e| mismatch(&e))?;
                                b.append_value(String::from_utf8(bytes).map_err(|_| mismatch("BLOB"))?);
                            }
                            _ => b.append_value(decode::<&str>(value).map_err(|e| mismatch(&e))?),
                        }
                    }
                }
                Kind::Blob => {
                    let b = downcast::<BinaryBuilder>(builder);
                    for row in rows {
                        let value = row.try_get_raw(i).map_err(|e| mismatch(&e.to_string()))?;
                        if value.is_null() {
                            b.append_null();
                            continue;
                        }
                        match value.type_info().name() {
                            "BLOB" => b.append_value(decode::<&[u8]>(value).map_err(|e| mismatch(&e))?),
                            "TEXT" => {
                                b.append_value(decode::<&str>(value).map_err(|e| mismatch(&e))?.as_bytes())
                            }
                            other => return Err(mismatch(other)),
                        }
                    }
                }
            }
        }
        let arrays: Vec<ArrayRef> = builders.iter_mut().map(|b| b.finish()).collect();
        let schema = Arc::new(Schema::new(
            columns
                .iter()
                .map(|(name, kind)| Field::new(name, kind.data_type(), true))
                .collect::<Vec<_>>(),
        ));
        RecordBatch::try_new(schema, arrays).map_err(|e| self.query_error(e.to_string(), None))
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

fn downcast<T: 'static>(builder: &mut Box<dyn ArrayBuilder>) -> &mut T {
    builder
        .as_any_mut()
        .downcast_mut::<T>()
        .unwrap_or_else(|| unreachable!("builders are made from the same kind"))
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
