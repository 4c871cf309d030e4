//! `type: postgres`: writes a mapping's records into a PostgreSQL table.
//!
//! ```yaml
//! destinations:
//!   app_db:
//!     type: postgres
//!     url: postgres://sluice:${PGPASSWORD}@db.internal:5432/app   # the source's connection settings
//! mappings:
//!   users_to_app:
//!     model: users
//!     destination: app_db
//!     mode: mirror                     # upsert (default), update, insert or mirror
//!     options:
//!       table: crm_users               # default: the mapping's name
//!       schema: public                 # default: public
//!       key: [id]                      # default: the model's primary key
//!       create_table: true             # default: true
//! ```
//!
//! Columns are the mapping's destination fields (dotted names kept as column names). A missing
//! table is created with the fields' types and the key as its primary key. Upserts are
//! `INSERT ... ON CONFLICT (key) DO UPDATE`, updates `UPDATE ... FROM`, inserts plain `INSERT`,
//! deleted records `DELETE ... USING`; each request is one transaction. Requests of up to 2,000
//! records pass their rows as one JSON parameter (`json_populate_recordset`); larger ones
//! `COPY` the rows into a temporary table first and merge from it. A request the database
//! refuses for its data (a constraint, a value out of range) is split to find the records at
//! fault, which fail with the database's message.

use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::SinkExt;
use schemars::JsonSchema;
use serde::Deserialize;
use sluice_engine::DestinationError;
use sluice_engine::arrow::datatypes::{DataType, Schema};
use sluice_engine::destination::{
    ActionSpec, DeliveryPolicy, Destination, DestinationWriter, OutgoingBatch, PayloadShape, PreparedRequest,
    RecordAction, RetryPolicy, RunInfo, SendOutcome, SyncMode,
};
use sluice_engine::json::encode_rows;
use sluice_engine::source::ConnectorEnv;
use tokio::sync::Mutex;
use tokio_postgres::Client;

use crate::sources::postgres::{PostgresConfig, PostgresSource};

/// Requests with more records than this are COPied through a temporary table.
const COPY_THRESHOLD: usize = 2000;
const DEFAULT_BATCH_ROWS: usize = 10_000;

pub struct PostgresDestination {
    name: String,
    connection: Arc<PostgresSource>,
    batch_rows: usize,
}

impl PostgresDestination {
    pub fn new(name: &str, config: PostgresConfig, env: &ConnectorEnv) -> Result<Self, String> {
        let batch_rows = config.batch_rows.unwrap_or(DEFAULT_BATCH_ROWS);
        Ok(Self {
            name: name.to_string(),
            connection: Arc::new(PostgresSource::new(name, config, env)?),
            batch_rows,
        })
    }
}

/// A mapping's `options:` for a Postgres destination.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct TableOptions {
    table: Option<String>,
    schema: Option<String>,
    key: Option<Vec<String>>,
    #[serde(default = "yes")]
    create_table: bool,
}

fn yes() -> bool {
    true
}

impl TableOptions {
    fn parse(options: &serde_json::Map<String, serde_json::Value>) -> Result<Self, String> {
        serde_json::from_value(serde_json::Value::Object(options.clone())).map_err(|e| {
            format!("Postgres mapping `options`: {e} (it takes `table`, `schema`, `key` and `create_table`)")
        })
    }
}

#[async_trait]
impl Destination for PostgresDestination {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn action(
        &self,
        action: Option<&str>,
        options: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Option<ActionSpec>, String> {
        if let Some(action) = action
            && action != "table"
        {
            return Err(format!(
                "unknown action `{action}`; the postgres destination writes rows into a table (`table`, the default)"
            ));
        }
        let options = TableOptions::parse(options)?;
        if options.key.as_ref().is_some_and(|k| k.is_empty()) {
            return Err("`options.key` must name at least one column".into());
        }
        Ok(Some(
            ActionSpec::new("table", PayloadShape::default())
                .modes(&[
                    SyncMode::Upsert,
                    SyncMode::Update,
                    SyncMode::Insert,
                    SyncMode::Mirror,
                ])
                .deletes(),
        ))
    }

    async fn check(&self) -> Result<(), DestinationError> {
        use sluice_engine::source::Source;
        self.connection
            .check()
            .await
            .map_err(|e| DestinationError::Unreachable {
                destination: self.name.clone(),
                message: e.to_string(),
            })
    }

    async fn open(&self, run: &RunInfo) -> Result<Box<dyn DestinationWriter>, DestinationError> {
        let options = TableOptions::parse(&run.options).map_err(|message| DestinationError::Config {
            destination: self.name.clone(),
            message,
        })?;
        let key = options.key.clone().unwrap_or_else(|| run.primary_key.clone());
        Ok(Box::new(PostgresWriter {
            destination: self.name.clone(),
            connection: self.connection.clone(),
            schema: options.schema.clone().unwrap_or_else(|| "public".into()),
            table: options.table.clone().unwrap_or_else(|| run.mapping.clone()),
            key,
            create_table: options.create_table,
            batch_rows: self.batch_rows,
            state: Mutex::new(WriterState::default()),
        }))
    }
}

#[derive(Default)]
struct WriterState {
    client: Option<Client>,
    /// The table exists with these columns (checked, or created, once per run).
    columns: Option<Vec<String>>,
}

struct PostgresWriter {
    destination: String,
    connection: Arc<PostgresSource>,
    schema: String,
    table: String,
    key: Vec<String>,
    create_table: bool,
    batch_rows: usize,
    state: Mutex<WriterState>,
}

/// `"name"`, with quotes doubled.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A column type for an Arrow type, for tables sluice creates.
fn pg_type(data_type: &DataType) -> String {
    match data_type {
        DataType::Boolean => "boolean".into(),
        DataType::Int8 | DataType::Int16 | DataType::UInt8 => "smallint".into(),
        DataType::Int32 | DataType::UInt16 => "integer".into(),
        DataType::Int64 | DataType::UInt32 => "bigint".into(),
        DataType::UInt64 => "numeric(20)".into(),
        DataType::Float16 | DataType::Float32 => "real".into(),
        DataType::Float64 => "double precision".into(),
        DataType::Decimal128(p, s) | DataType::Decimal256(p, s) => format!("numeric({p},{s})"),
        DataType::Date32 | DataType::Date64 => "date".into(),
        DataType::Timestamp(_, None) => "timestamp".into(),
        DataType::Timestamp(_, Some(_)) => "timestamptz".into(),
        DataType::Time32(_) | DataType::Time64(_) => "time".into(),
        DataType::List(_)
        | DataType::LargeList(_)
        | DataType::FixedSizeList(..)
        | DataType::Struct(_)
        | DataType::Map(..) => "jsonb".into(),
        // Binary values travel as base64 text.
        _ => "text".into(),
    }
}

impl PostgresWriter {
    fn target(&self) -> String {
        format!("{}.{}", ident(&self.schema), ident(&self.table))
    }

    /// The statement that applies rows read from `source` (a relation with the table's row
    /// type, aliased `s`) for `action`.
    fn statement(&self, action: RecordAction, columns: &[String], source: &str) -> String {
        let target = self.target();
        let list = columns.iter().map(|c| ident(c)).collect::<Vec<_>>().join(", ");
        let selected = columns
            .iter()
            .map(|c| format!("s.{}", ident(c)))
            .collect::<Vec<_>>()
            .join(", ");
        let matches = self
            .key
            .iter()
            .map(|k| format!("t.{0} = s.{0}", ident(k)))
            .collect::<Vec<_>>()
            .join(" AND ");
        let non_key: Vec<&String> = columns.iter().filter(|c| !self.key.contains(c)).collect();
        match action {
            RecordAction::Upsert => {
                let keys = self.key.iter().map(|k| ident(k)).collect::<Vec<_>>().join(", ");
                let update = if non_key.is_empty() {
                    "DO NOTHING".to_string()
                } else {
                    format!(
                        "DO UPDATE SET {}",
                        non_key
                            .iter()
                            .map(|c| format!("{0} = EXCLUDED.{0}", ident(c)))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                };
                format!(
                    "INSERT INTO {target} ({list}) SELECT {selected} FROM {source} s ON CONFLICT ({keys}) {update}"
                )
            }
            RecordAction::Insert => {
                format!("INSERT INTO {target} ({list}) SELECT {selected} FROM {source} s")
            }
            RecordAction::Update => {
                let set = non_key
                    .iter()
                    .map(|c| format!("{0} = s.{0}", ident(c)))
                    .collect::<Vec<_>>()
                    .join(", ");
                if set.is_empty() {
                    // Nothing to change but the key: an update is a no-op.
                    format!("SELECT 1 FROM {source} s LIMIT 0")
                } else {
                    format!("UPDATE {target} t SET {set} FROM {source} s WHERE {matches}")
                }
            }
            RecordAction::Delete => format!("DELETE FROM {target} t USING {source} s WHERE {matches}"),
        }
    }

    /// Rows as JSON objects for records `range`: the mapped fields, or for deleted records
    /// the key (their other fields are what the table had).
    fn rows(&self, batch: &OutgoingBatch, range: Range<usize>) -> Result<Vec<Vec<u8>>, String> {
        let fields = batch.fields.slice(range.start, range.len());
        let rows = encode_rows(&fields).map_err(|e| e.to_string())?;
        Ok((0..rows.len()).map(|i| rows.get(i).to_vec()).collect())
    }

    fn columns_of(schema: &Schema) -> Vec<String> {
        schema.fields().iter().map(|f| f.name().clone()).collect()
    }

    /// Connects if needed, and makes sure the table exists with the batch's columns.
    async fn ready(&self, state: &mut WriterState, schema: &Schema) -> Result<(), SendOutcome> {
        if state.client.as_ref().is_none_or(|c| c.is_closed()) {
            let client = self
                .connection
                .connect_client()
                .await
                .map_err(|e| SendOutcome::Retry {
                    reason: e.to_string(),
                    after: None,
                })?;
            state.client = Some(client);
        }
        if state.columns.is_some() {
            return Ok(());
        }
        let client = state.client.as_ref().ok_or_else(|| SendOutcome::Retry {
            reason: "not connected".into(),
            after: None,
        })?;
        let existing: Vec<String> = client
            .query(
                "SELECT column_name::text FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2 ORDER BY ordinal_position",
                &[&self.schema, &self.table],
            )
            .await
            .map_err(|e| self.outcome(&e))?
            .iter()
            .map(|row| row.get::<_, String>(0))
            .collect();
        let wanted = Self::columns_of(schema);
        if existing.is_empty() {
            if !self.create_table {
                return Err(SendOutcome::Fatal {
                    reason: format!(
                        "table {}.{} does not exist; create it, or set `options.create_table: true`",
                        self.schema, self.table
                    ),
                });
            }
            for key in &self.key {
                if !wanted.contains(key) {
                    return Err(SendOutcome::Fatal {
                        reason: format!(
                            "key column `{key}` is not among the mapping's fields ({}); map it, or set `options.key`",
                            wanted.join(", ")
                        ),
                    });
                }
            }
            let columns = schema
                .fields()
                .iter()
                .map(|f| format!("{} {}", ident(f.name()), pg_type(f.data_type())))
                .collect::<Vec<_>>()
                .join(", ");
            let keys = self.key.iter().map(|k| ident(k)).collect::<Vec<_>>().join(", ");
            let create = format!(
                "CREATE TABLE IF NOT EXISTS {} ({columns}, PRIMARY KEY ({keys}))",
                self.target()
            );
            client
                .batch_execute(&create)
                .await
                .map_err(|e| self.outcome(&e))?;
            tracing::info!(table = %self.target(), "created the destination table");
            state.columns = Some(wanted);
            return Ok(());
        }
        let missing: Vec<&String> = wanted.iter().filter(|c| !existing.contains(c)).collect();
        if !missing.is_empty() {
            return Err(SendOutcome::Fatal {
                reason: format!(
                    "table {}.{} has no column {}; add it, or change the mapping's fields",
                    self.schema,
                    self.table,
                    missing
                        .iter()
                        .map(|c| format!("`{c}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        state.columns = Some(wanted);
        Ok(())
    }

    /// What a database error means for the request.
    fn outcome(&self, e: &tokio_postgres::Error) -> SendOutcome {
        let reason = match e.as_db_error() {
            Some(db) => format!(
                "PostgreSQL {}: {}{}",
                db.code().code(),
                db.message(),
                db.detail().map(|d| format!(" ({d})")).unwrap_or_default()
            ),
            None => format!("PostgreSQL: {e}"),
        };
        let Some(code) = e.code() else {
            return SendOutcome::Retry { reason, after: None };
        };
        match &code.code()[..2] {
            // Data exceptions and constraint violations: some record is at fault.
            "22" | "23" => SendOutcome::Invalid { reason },
            // Connection, transaction rollback (deadlock, serialization), resources, shutdown.
            "08" | "40" | "53" | "57" | "58" => SendOutcome::Retry { reason, after: None },
            // Authentication, privileges, undefined objects: nothing will go through.
            "28" | "42" | "3D" | "3F" => SendOutcome::Fatal {
                reason: format!("{reason}; check the destination's table, columns and the user's privileges"),
            },
            _ => SendOutcome::Rejected { reason },
        }
    }

    async fn write(&self, batch: &OutgoingBatch, range: Range<usize>) -> Result<(), SendOutcome> {
        let action = batch.actions[range.start];
        let schema = batch.fields.schema();
        let mut state = self.state.lock().await;
        self.ready(&mut state, &schema).await?;
        let columns = Self::columns_of(&schema);
        let rows = self
            .rows(batch, range.clone())
            .map_err(|reason| SendOutcome::Rejected { reason })?;
        let client = state.client.as_mut().ok_or_else(|| SendOutcome::Retry {
            reason: "not connected".into(),
            after: None,
        })?;
        let target = self.target();
        let transaction = client.transaction().await.map_err(|e| self.outcome(&e))?;
        if rows.len() <= COPY_THRESHOLD {
            let mut json = Vec::with_capacity(rows.iter().map(Vec::len).sum::<usize>() + rows.len() + 2);
            crate::destinations::http::write_array(&mut json, rows.iter().map(Vec::as_slice));
            let json = String::from_utf8(json).map_err(|e| SendOutcome::Rejected {
                reason: e.to_string(),
            })?;
            let source = format!("json_populate_recordset(NULL::{target}, $1::text::json)");
            let sql = self.statement(action, &columns, &source);
            transaction
                .execute(&sql, &[&json])
                .await
                .map_err(|e| self.outcome(&e))?;
        } else {
            transaction
                .batch_execute(
                    "CREATE TEMP TABLE IF NOT EXISTS sluice_stage (doc jsonb) ON COMMIT DELETE ROWS",
                )
                .await
                .map_err(|e| self.outcome(&e))?;
            let sink = transaction
                .copy_in::<_, Bytes>("COPY sluice_stage (doc) FROM STDIN")
                .await
                .map_err(|e| self.outcome(&e))?;
            futures::pin_mut!(sink);
            let mut chunk = Vec::with_capacity(1 << 20);
            for row in &rows {
                // COPY's text format: backslashes doubled; JSON text has no raw tabs or newlines.
                for &byte in row {
                    if byte == b'\\' {
                        chunk.push(b'\\');
                    }
                    chunk.push(byte);
                }
                chunk.push(b'\n');
                if chunk.len() >= 1 << 20 {
                    sink.send(Bytes::from(std::mem::take(&mut chunk)))
                        .await
                        .map_err(|e| self.outcome(&e))?;
                }
            }
            if !chunk.is_empty() {
                sink.send(Bytes::from(chunk))
                    .await
                    .map_err(|e| self.outcome(&e))?;
            }
            sink.finish().await.map_err(|e| self.outcome(&e))?;
            let source = format!("(SELECT (jsonb_populate_record(NULL::{target}, doc)).* FROM sluice_stage)");
            let sql = self.statement(action, &columns, &source);
            transaction
                .batch_execute(&sql)
                .await
                .map_err(|e| self.outcome(&e))?;
        }
        transaction.commit().await.map_err(|e| self.outcome(&e))?;
        Ok(())
    }
}

#[async_trait]
impl DestinationWriter for PostgresWriter {
    fn policy(&self) -> DeliveryPolicy {
        DeliveryPolicy {
            max_records: self.batch_rows,
            max_bytes: 256 * 1024 * 1024,
            // One connection, requests in order.
            concurrency: 1,
            retry: RetryPolicy::default(),
            ..DeliveryPolicy::default()
        }
    }

    async fn prepare(&self, batch: &OutgoingBatch, range: Range<usize>) -> Vec<PreparedRequest> {
        let action = batch.actions[range.start];
        let columns = Self::columns_of(&batch.fields.schema());
        let source = if range.len() <= COPY_THRESHOLD {
            format!("json_populate_recordset(NULL::{}, $1::text::json)", self.target())
        } else {
            format!(
                "(SELECT (jsonb_populate_record(NULL::{}, doc)).* FROM sluice_stage)",
                self.target()
            )
        };
        let rows: Vec<serde_json::Value> = self
            .rows(batch, range.clone())
            .unwrap_or_default()
            .iter()
            .map(|row| serde_json::from_slice(row).unwrap_or(serde_json::Value::Null))
            .collect();
        vec![PreparedRequest {
            method: action.as_str().to_uppercase(),
            target: format!("{}.{}", self.schema, self.table),
            records: range.len(),
            body: serde_json::json!({
                "sql": self.statement(action, &columns, &source),
                "rows": rows,
            }),
        }]
    }

    async fn send(&self, batch: &OutgoingBatch, range: Range<usize>) -> SendOutcome {
        match self.write(batch, range).await {
            Ok(()) => SendOutcome::Accepted,
            Err(outcome) => {
                if matches!(outcome, SendOutcome::Retry { .. }) {
                    // The connection may be gone; the next attempt reconnects.
                    let mut state = self.state.lock().await;
                    if state.client.as_ref().is_some_and(|c| c.is_closed()) {
                        state.client = None;
                    }
                }
                outcome
            }
        }
    }

    async fn finish(self: Box<Self>) -> Result<(), DestinationError> {
        let _ = &self.destination;
        Ok(())
    }
}
