//! `type: mysql`: MySQL and MariaDB.
//!
//! ```yaml
//! sources:
//!   shop:
//!     type: mysql
//!     url: mysql://sluice:${MYSQL_PASSWORD}@db.internal:3306/shop   # or host/port/user/password/database
//!     ssl_mode: preferred      # disabled | preferred (default) | required | verify-ca | verify-identity
//!     # ssl_ca: /etc/ssl/mysql-ca.pem
//!     # ssh_tunnel: { host: bastion.example.com, user: sluice }
//! ```
//!
//! The session runs in UTC (`time_zone = '+00:00'`, so `TIMESTAMP` values are UTC instants) and
//! the model inside `START TRANSACTION READ ONLY, WITH CONSISTENT SNAPSHOT` at `REPEATABLE
//! READ`: one consistent state, nothing changed. The query runs as a prepared statement, so
//! values arrive in MySQL's binary protocol (integers and floats as numbers, not text), row by
//! row from the socket, and are appended straight to Arrow builders a batch at a time.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{
    ArrayBuilder, ArrayRef, BinaryBuilder, BooleanBuilder, Date32Builder, Decimal128Builder, Float32Builder,
    Float64Builder, Int8Builder, Int16Builder, Int32Builder, Int64Builder, RecordBatch, StringBuilder,
    Time64MicrosecondBuilder, TimestampMicrosecondBuilder, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use async_trait::async_trait;
use chrono::Datelike;
use mysql_async::consts::{ColumnFlags, ColumnType};
use mysql_async::prelude::Queryable;
use mysql_async::{Column, Conn, Opts, OptsBuilder, SslOpts, Value};
use schemars::JsonSchema;
use serde::Deserialize;
use sluice_engine::datafusion::error::DataFusionError;
use sluice_engine::source::{
    ConnectorEnv, ModelQuery, SendableRecordBatchStream, Source, strip_statement_end,
};
use sluice_engine::{ConfigString, Secret, SourceError};
use tokio::sync::{mpsc, oneshot};

use crate::HumanDuration;
use crate::tunnel::{SshTunnel, SshTunnelConfig};

const DEFAULT_BATCH_ROWS: usize = 65_536;
/// MySQL's `binary` character set: the column holds bytes, not text.
const BINARY_CHARSET: u16 = 63;

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MysqlConfig {
    /// `mysql://user:password@host:port/database`; fields below override its parts.
    #[serde(default)]
    pub url: Option<ConfigString>,
    /// Database server host name or IP; overrides the URL's host.
    #[serde(default)]
    pub host: Option<ConfigString>,
    /// Database server port; overrides the URL's port (default 3306).
    #[serde(default)]
    pub port: Option<u16>,
    /// User to log in as; overrides the URL's user. Required, here or in the URL.
    #[serde(default)]
    pub user: Option<ConfigString>,
    /// Password of the user; overrides the URL's password.
    #[serde(default)]
    pub password: Option<Secret>,
    /// Database (schema) to connect to; overrides the URL's database.
    #[serde(default)]
    pub database: Option<ConfigString>,
    #[serde(default)]
    pub ssl_mode: Option<MysqlSslMode>,
    /// PEM file of the certificate authorities to trust.
    #[serde(default)]
    pub ssl_ca: Option<ConfigString>,
    /// How long to wait for a connection, e.g. `30s` (default 10s).
    #[serde(default)]
    pub connect_timeout: Option<HumanDuration>,
    /// Rows per Arrow batch (default 65,536).
    #[serde(default)]
    pub batch_rows: Option<usize>,
    /// Connect through an SSH bastion; `host` and `port` are then as the bastion sees them.
    #[serde(default)]
    pub ssh_tunnel: Option<SshTunnelConfig>,
}

/// The MySQL client's `--ssl-mode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum MysqlSslMode {
    Disabled,
    Preferred,
    Required,
    VerifyCa,
    VerifyIdentity,
}

pub struct MysqlSource {
    name: String,
    opts: OptsBuilder,
    host: String,
    port: u16,
    ssl_mode: MysqlSslMode,
    ssl_ca: Option<PathBuf>,
    connect_timeout: Duration,
    batch_rows: usize,
    tunnel: Option<SshTunnel>,
}

impl MysqlSource {
    pub fn new(name: &str, config: MysqlConfig, env: &ConnectorEnv) -> Result<Self, String> {
        let mut opts = match &config.url {
            Some(url) => OptsBuilder::from_opts(
                Opts::from_url(url.expose()).map_err(|e| format!("`url` is not a valid MySQL URL: {e}"))?,
            ),
            None => OptsBuilder::default(),
        };
        if let Some(host) = &config.host {
            opts = opts.ip_or_hostname(host.expose());
        } else if config.url.is_none() {
            return Err("set `url` or `host`".into());
        }
        if let Some(port) = config.port {
            opts = opts.tcp_port(port);
        }
        if let Some(user) = &config.user {
            opts = opts.user(Some(user.expose()));
        }
        if let Some(password) = &config.password {
            opts = opts.pass(Some(password.expose()));
        }
        if let Some(database) = &config.database {
            opts = opts.db_name(Some(database.expose()));
        }
        let built = Opts::from(opts.clone());
        if built.user().is_none() {
            return Err("set the user, in `url` or `user`".into());
        }
        let host = built.ip_or_hostname().to_string();
        let port = built.tcp_port();
        let opts = opts.prefer_socket(false).stmt_cache_size(0).setup(vec![
            "SET time_zone = '+00:00'",
            "SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ",
        ]);
        let tunnel = match config.ssh_tunnel {
            Some(tunnel) => Some(SshTunnel::new(name, tunnel, host.clone(), port, env)?),
            None => None,
        };
        let batch_rows = config.batch_rows.unwrap_or(DEFAULT_BATCH_ROWS);
        if batch_rows == 0 {
            return Err("`batch_rows` must be at least 1".into());
        }
        Ok(Self {
            name: name.to_string(),
            opts,
            host,
            port,
            ssl_mode: config.ssl_mode.unwrap_or(MysqlSslMode::Preferred),
            ssl_ca: config.ssl_ca.map(|p| env.resolve_path(p.expose())),
            connect_timeout: config.connect_timeout.map_or(Duration::from_secs(10), |d| d.0),
            batch_rows,
            tunnel,
        })
    }

    fn ssl_opts(&self) -> Option<SslOpts> {
        let mut ssl = SslOpts::default();
        if let Some(ca) = &self.ssl_ca {
            ssl = ssl.with_root_certs(vec![ca.clone().into()]);
        }
        match self.ssl_mode {
            MysqlSslMode::Disabled => return None,
            MysqlSslMode::Preferred | MysqlSslMode::Required => {
                ssl = ssl
                    .with_danger_accept_invalid_certs(true)
                    .with_danger_skip_domain_validation(true);
            }
            MysqlSslMode::VerifyCa => ssl = ssl.with_danger_skip_domain_validation(true),
            MysqlSslMode::VerifyIdentity => {}
        }
        if self.tunnel.is_some() {
            // The tunnel's local end is 127.0.0.1; the certificate names the database host.
            ssl = ssl.with_danger_tls_hostname_override(Some(self.host.clone()));
        }
        Some(ssl)
    }

    async fn connect(&self) -> Result<Conn, SourceError> {
        crate::install_crypto_provider();
        let mut opts = self.opts.clone();
        if let Some(tunnel) = &self.tunnel {
            let local = tunnel.open().await.map_err(|message| SourceError::Connect {
                source_name: self.name.clone(),
                message,
                hint: Some(crate::tunnel::HINT.into()),
            })?;
            opts = opts.ip_or_hostname(local.ip().to_string()).tcp_port(local.port());
        }
        let attempt = |ssl: Option<SslOpts>| {
            let opts = opts.clone().ssl_opts(ssl);
            async move {
                match tokio::time::timeout(self.connect_timeout, Conn::new(opts)).await {
                    Ok(result) => result.map_err(ConnectFailure::Mysql),
                    Err(_) => Err(ConnectFailure::Timeout),
                }
            }
        };
        let result = match attempt(self.ssl_opts()).await {
            // `preferred`: fall back to plain text when the server offers no TLS.
            Err(ConnectFailure::Mysql(mysql_async::Error::Driver(
                mysql_async::DriverError::NoClientSslFlagFromServer,
            ))) if self.ssl_mode == MysqlSslMode::Preferred => attempt(None).await,
            other => other,
        };
        result.map_err(|failure| {
            let (message, hint) = self.describe(&failure, None);
            SourceError::Connect {
                source_name: self.name.clone(),
                message,
                hint,
            }
        })
    }

    fn describe(&self, failure: &ConnectFailure, sql: Option<&str>) -> (String, Option<String>) {
        let target = format!("{}:{}", self.host, self.port);
        let user = Opts::from(self.opts.clone()).user().unwrap_or("?").to_string();
        let database = Opts::from(self.opts.clone()).db_name().unwrap_or("?").to_string();
        let error = match failure {
            ConnectFailure::Timeout => {
                return (
                    format!("connecting to {target} timed out"),
                    Some(format!(
                        "{target} did not answer in time: the host may be unreachable or firewalled"
                    )),
                );
            }
            ConnectFailure::Mysql(e) => e,
        };
        if let mysql_async::Error::Server(server) = error {
            let message = format!("ERROR {} ({}): {}", server.code, server.state, server.message);
            let hint = match server.code {
                1045 | 1698 => Some(format!(
                    "authentication failed for user `{user}`: check the user and password, and that the user may connect from this host"
                )),
                1049 => Some(format!(
                    "database `{database}` does not exist on {target}: check `database` or the URL's path"
                )),
                1142 | 1143 | 1044 => Some(format!(
                    "permission denied: grant read access, e.g. GRANT SELECT ON {database}.<table> TO '{user}'@'%'"
                )),
                1146 => {
                    Some("the table does not exist: check the name, or qualify it as database.table".into())
                }
                1054 => Some(
                    "a column in the model's SQL does not exist; `sluice preview` shows a query's columns"
                        .into(),
                ),
                1064 => Some(match sql {
                    Some(_) => "the model's SQL is not valid for this server".into(),
                    None => "syntax error".into(),
                }),
                1040 => Some("the server has no free connections; try again later".into()),
                _ => None,
            };
            return (message, hint);
        }
        let message = error.to_string();
        let lower = message.to_lowercase();
        let hint = if lower.contains("connection refused") {
            Some(format!(
                "nothing is listening on {target}: check the host and port, and that the server is running"
            ))
        } else if lower.contains("failed to lookup") || lower.contains("name or service not known") {
            Some(format!("the host name of {target} could not be resolved"))
        } else if lower.contains("ssl") || lower.contains("tls") || lower.contains("certificate") {
            Some("the TLS handshake failed: check `ssl_mode` and `ssl_ca`".into())
        } else {
            None
        };
        (message, hint)
    }

    fn query_error(&self, model: &str, e: mysql_async::Error, sql: &str) -> SourceError {
        let (message, hint) = self.describe(&ConnectFailure::Mysql(e), Some(sql));
        SourceError::Query {
            model: model.to_string(),
            source_name: self.name.clone(),
            message,
            hint,
        }
    }
}

enum ConnectFailure {
    Mysql(mysql_async::Error),
    Timeout,
}

#[async_trait]
impl Source for MysqlSource {
    fn kind(&self) -> &'static str {
        "mysql"
    }

    async fn check(&self) -> Result<(), SourceError> {
        let mut conn = self.connect().await?;
        conn.query_drop("SELECT 1")
            .await
            .map_err(|e| SourceError::Connect {
                source_name: self.name.clone(),
                message: e.to_string(),
                hint: None,
            })?;
        conn.disconnect().await.ok();
        Ok(())
    }

    async fn extract(&self, query: &ModelQuery) -> Result<SendableRecordBatchStream, SourceError> {
        let mut conn = self.connect().await?;
        let sql = strip_statement_end(&query.sql).to_string();
        conn.query_drop("START TRANSACTION READ ONLY, WITH CONSISTENT SNAPSHOT")
            .await
            .map_err(|e| self.query_error(&query.model, e, &sql))?;
        let statement = conn
            .prep(sql.as_str())
            .await
            .map_err(|e| self.query_error(&query.model, e, &sql))?;
        let mut kinds = Vec::new();
        let mut fields = Vec::new();
        for column in statement.columns().iter() {
            let name = column.name_str().to_string();
            let kind = MyKind::for_column(column).map_err(|database_type| SourceError::UnsupportedType {
                model: query.model.clone(),
                column: name.clone(),
                hint: cast_hint(&database_type, &name),
                database_type,
            })?;
            fields.push(Field::new(name, kind.data_type(), true));
            kinds.push(kind);
        }
        let schema: SchemaRef = Arc::new(Schema::new(fields));
        let (tx, rx) = mpsc::channel(2);
        let (started_tx, started_rx) = oneshot::channel();
        let reader = RowReader {
            model: query.model.clone(),
            source: self.name.clone(),
            schema: schema.clone(),
            kinds,
            batch_rows: self.batch_rows,
        };
        tokio::spawn(async move {
            let result = reader.read(&mut conn, statement, &tx, started_tx).await;
            match result {
                Ok(()) => {
                    conn.query_drop("COMMIT").await.ok();
                    conn.disconnect().await.ok();
                }
                Err(e) => {
                    let _ = tx.send(Err(DataFusionError::External(Box::new(e)))).await;
                }
            }
        });
        // Errors the server reports when the query starts (e.g. permissions) surface here.
        match started_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(message)) => {
                return Err(SourceError::Query {
                    model: query.model.clone(),
                    source_name: self.name.clone(),
                    message: message.0,
                    hint: message.1,
                });
            }
            Err(_) => {}
        }
        Ok(super::receiver_stream(schema, rx))
    }
}

/// How a MySQL column is carried.
#[derive(Debug, Clone, Copy, PartialEq)]
enum MyKind {
    /// `TINYINT(1)` / `BOOLEAN` / `BIT(1)`.
    Bool,
    Int8,
    Int16,
    Int32,
    Int64,
    UInt64,
    Float32,
    Float64,
    Decimal {
        precision: u8,
        scale: i8,
    },
    Text,
    Binary,
    Date,
    DateTime,
    /// `TIMESTAMP`: an instant, read in the UTC session time zone.
    Timestamp,
    Time,
    /// `BIT(n)` for n > 1, as an unsigned integer.
    Bits,
}

impl MyKind {
    /// The kind for a result column, or the database type's name when it cannot be carried.
    fn for_column(column: &Column) -> Result<MyKind, String> {
        let flags = column.flags();
        let unsigned = flags.contains(ColumnFlags::UNSIGNED_FLAG);
        let binary = column.character_set() == BINARY_CHARSET;
        let length = column.column_length();
        Ok(match column.column_type() {
            ColumnType::MYSQL_TYPE_TINY if length == 1 => MyKind::Bool,
            ColumnType::MYSQL_TYPE_TINY => {
                if unsigned {
                    MyKind::Int16
                } else {
                    MyKind::Int8
                }
            }
            ColumnType::MYSQL_TYPE_SHORT => {
                if unsigned {
                    MyKind::Int32
                } else {
                    MyKind::Int16
                }
            }
            ColumnType::MYSQL_TYPE_INT24 => MyKind::Int32,
            ColumnType::MYSQL_TYPE_LONG => {
                if unsigned {
                    MyKind::Int64
                } else {
                    MyKind::Int32
                }
            }
            ColumnType::MYSQL_TYPE_LONGLONG => {
                if unsigned {
                    MyKind::UInt64
                } else {
                    MyKind::Int64
                }
            }
            ColumnType::MYSQL_TYPE_YEAR => MyKind::Int16,
            ColumnType::MYSQL_TYPE_FLOAT => MyKind::Float32,
            ColumnType::MYSQL_TYPE_DOUBLE => MyKind::Float64,
            ColumnType::MYSQL_TYPE_DECIMAL | ColumnType::MYSQL_TYPE_NEWDECIMAL => {
                let scale = column.decimals() as u32;
                // The display length counts the sign and the decimal point.
                let precision = length
                    .saturating_sub(u32::from(!unsigned))
                    .saturating_sub(u32::from(scale > 0));
                if precision == 0 || precision > 38 || scale > precision {
                    return Err(format!("decimal({precision}, {scale})"));
                }
                MyKind::Decimal {
                    precision: precision as u8,
                    scale: scale as i8,
                }
            }
            ColumnType::MYSQL_TYPE_DATE | ColumnType::MYSQL_TYPE_NEWDATE => MyKind::Date,
            ColumnType::MYSQL_TYPE_DATETIME | ColumnType::MYSQL_TYPE_DATETIME2 => MyKind::DateTime,
            ColumnType::MYSQL_TYPE_TIMESTAMP | ColumnType::MYSQL_TYPE_TIMESTAMP2 => MyKind::Timestamp,
            ColumnType::MYSQL_TYPE_TIME | ColumnType::MYSQL_TYPE_TIME2 => MyKind::Time,
            ColumnType::MYSQL_TYPE_BIT if length == 1 => MyKind::Bool,
            ColumnType::MYSQL_TYPE_BIT => MyKind::Bits,
            ColumnType::MYSQL_TYPE_NULL => MyKind::Text,
            ColumnType::MYSQL_TYPE_JSON | ColumnType::MYSQL_TYPE_ENUM | ColumnType::MYSQL_TYPE_SET => {
                MyKind::Text
            }
            ColumnType::MYSQL_TYPE_VARCHAR
            | ColumnType::MYSQL_TYPE_VAR_STRING
            | ColumnType::MYSQL_TYPE_STRING
            | ColumnType::MYSQL_TYPE_TINY_BLOB
            | ColumnType::MYSQL_TYPE_MEDIUM_BLOB
            | ColumnType::MYSQL_TYPE_LONG_BLOB
            | ColumnType::MYSQL_TYPE_BLOB => {
                if binary && !flags.contains(ColumnFlags::ENUM_FLAG) && !flags.contains(ColumnFlags::SET_FLAG)
                {
                    MyKind::Binary
                } else {
                    MyKind::Text
                }
            }
            ColumnType::MYSQL_TYPE_GEOMETRY => return Err("geometry".into()),
            ColumnType::MYSQL_TYPE_VECTOR => return Err("vector".into()),
            other => {
                return Err(format!("{other:?}")
                    .trim_start_matches("MYSQL_TYPE_")
                    .to_lowercase());
            }
        })
    }

    fn data_type(self) -> DataType {
        match self {
            MyKind::Bool => DataType::Boolean,
            MyKind::Int8 => DataType::Int8,
            MyKind::Int16 => DataType::Int16,
            MyKind::Int32 => DataType::Int32,
            MyKind::Int64 => DataType::Int64,
            MyKind::UInt64 | MyKind::Bits => DataType::UInt64,
            MyKind::Float32 => DataType::Float32,
            MyKind::Float64 => DataType::Float64,
            MyKind::Decimal { precision, scale } => DataType::Decimal128(precision, scale),
            MyKind::Text => DataType::Utf8,
            MyKind::Binary => DataType::Binary,
            MyKind::Date => DataType::Date32,
            MyKind::DateTime => DataType::Timestamp(TimeUnit::Microsecond, None),
            MyKind::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            MyKind::Time => DataType::Time64(TimeUnit::Microsecond),
        }
    }
}

fn cast_hint(database_type: &str, column: &str) -> String {
    let suggestion = match database_type {
        "geometry" => format!("ST_AsText({column}) or ST_AsGeoJSON({column})"),
        t if t.starts_with("decimal") => {
            format!("CAST({column} AS DECIMAL(38, 10)), or CAST({column} AS CHAR)")
        }
        _ => format!("CAST({column} AS CHAR)"),
    };
    format!("cast it in the model's SQL, e.g. {suggestion}")
}

/// Appends one column's values.
enum MyBuilder {
    Bool(BooleanBuilder),
    Int8(Int8Builder),
    Int16(Int16Builder),
    Int32(Int32Builder),
    Int64(Int64Builder),
    UInt64(UInt64Builder),
    Float32(Float32Builder),
    Float64(Float64Builder),
    Decimal(Decimal128Builder, i8),
    Text(StringBuilder),
    Binary(BinaryBuilder),
    Date(Date32Builder),
    Timestamp(TimestampMicrosecondBuilder),
    Time(Time64MicrosecondBuilder),
}

impl MyBuilder {
    fn new(kind: MyKind, capacity: usize) -> Self {
        match kind {
            MyKind::Bool => Self::Bool(BooleanBuilder::with_capacity(capacity)),
            MyKind::Int8 => Self::Int8(Int8Builder::with_capacity(capacity)),
            MyKind::Int16 => Self::Int16(Int16Builder::with_capacity(capacity)),
            MyKind::Int32 => Self::Int32(Int32Builder::with_capacity(capacity)),
            MyKind::Int64 => Self::Int64(Int64Builder::with_capacity(capacity)),
            MyKind::UInt64 | MyKind::Bits => Self::UInt64(UInt64Builder::with_capacity(capacity)),
            MyKind::Float32 => Self::Float32(Float32Builder::with_capacity(capacity)),
            MyKind::Float64 => Self::Float64(Float64Builder::with_capacity(capacity)),
            MyKind::Decimal { precision, scale } => Self::Decimal(
                Decimal128Builder::with_capacity(capacity)
                    .with_precision_and_scale(precision, scale)
                    .unwrap_or_else(|_| Decimal128Builder::with_capacity(capacity)),
                scale,
            ),
            MyKind::Text => Self::Text(StringBuilder::with_capacity(capacity, capacity * 16)),
            MyKind::Binary => Self::Binary(BinaryBuilder::with_capacity(capacity, capacity * 16)),
            MyKind::Date => Self::Date(Date32Builder::with_capacity(capacity)),
            MyKind::DateTime => Self::Timestamp(TimestampMicrosecondBuilder::with_capacity(capacity)),
            MyKind::Timestamp => {
                Self::Timestamp(TimestampMicrosecondBuilder::with_capacity(capacity).with_timezone("UTC"))
            }
            MyKind::Time => Self::Time(Time64MicrosecondBuilder::with_capacity(capacity)),
        }
    }

    fn push(&mut self, value: Option<Value>) -> Result<(), String> {
        let value = match value {
            None | Some(Value::NULL) => {
                self.push_null();
                return Ok(());
            }
            Some(value) => value,
        };
        match (self, value) {
            (Self::Bool(b), Value::Int(v)) => b.append_value(v != 0),
            (Self::Bool(b), Value::UInt(v)) => b.append_value(v != 0),
            (Self::Bool(b), Value::Bytes(bytes)) => b.append_value(bytes.iter().any(|&byte| byte != 0)),
            (Self::Int8(b), Value::Int(v)) => b.append_value(narrow(v)?),
            (Self::Int16(b), Value::Int(v)) => b.append_value(narrow(v)?),
            (Self::Int16(b), Value::UInt(v)) => b.append_value(narrow(v)?),
            (Self::Int32(b), Value::Int(v)) => b.append_value(narrow(v)?),
            (Self::Int32(b), Value::UInt(v)) => b.append_value(narrow(v)?),
            (Self::Int64(b), Value::Int(v)) => b.append_value(v),
            (Self::Int64(b), Value::UInt(v)) => b.append_value(narrow(v)?),
            (Self::UInt64(b), Value::UInt(v)) => b.append_value(v),
            (Self::UInt64(b), Value::Int(v)) => b.append_value(narrow(v)?),
            // BIT(n): big-endian bytes.
            (Self::UInt64(b), Value::Bytes(bytes)) if bytes.len() <= 8 => {
                b.append_value(bytes.iter().fold(0u64, |acc, &byte| (acc << 8) | u64::from(byte)))
            }
            (Self::Float32(b), Value::Float(v)) => b.append_value(v),
            (Self::Float64(b), Value::Double(v)) => b.append_value(v),
            (Self::Float64(b), Value::Float(v)) => b.append_value(f64::from(v)),
            (Self::Decimal(b, scale), Value::Bytes(bytes)) => b.append_value(parse_decimal(&bytes, *scale)?),
            (Self::Text(b), Value::Bytes(bytes)) => {
                b.append_value(std::str::from_utf8(&bytes).map_err(|e| format!("invalid UTF-8 text: {e}"))?)
            }
            (Self::Binary(b), Value::Bytes(bytes)) => b.append_value(bytes),
            (Self::Date(b), Value::Date(year, month, day, ..)) => {
                b.append_value(days_since_epoch(year, month, day)?)
            }
            (Self::Timestamp(b), Value::Date(year, month, day, hour, minute, second, micros)) => {
                let days = i64::from(days_since_epoch(year, month, day)?);
                let seconds =
                    days * 86_400 + i64::from(hour) * 3600 + i64::from(minute) * 60 + i64::from(second);
                b.append_value(seconds * 1_000_000 + i64::from(micros))
            }
            (Self::Time(b), Value::Time(negative, days, hours, minutes, seconds, micros)) => {
                if negative || days > 0 {
                    return Err(format!(
                        "TIME value {}{days}d {hours:02}:{minutes:02}:{seconds:02} is not a time of day; cast it, e.g. TIME_TO_SEC(column)",
                        if negative { "-" } else { "" }
                    ));
                }
                let seconds = i64::from(hours) * 3600 + i64::from(minutes) * 60 + i64::from(seconds);
                b.append_value(seconds * 1_000_000 + i64::from(micros))
            }
            (builder, value) => {
                return Err(format!(
                    "unexpected value {value:?} for a {} column",
                    builder.data_type_name()
                ));
            }
        }
        Ok(())
    }

    fn push_null(&mut self) {
        match self {
            Self::Bool(b) => b.append_null(),
            Self::Int8(b) => b.append_null(),
            Self::Int16(b) => b.append_null(),
            Self::Int32(b) => b.append_null(),
            Self::Int64(b) => b.append_null(),
            Self::UInt64(b) => b.append_null(),
            Self::Float32(b) => b.append_null(),
            Self::Float64(b) => b.append_null(),
            Self::Decimal(b, _) => b.append_null(),
            Self::Text(b) => b.append_null(),
            Self::Binary(b) => b.append_null(),
            Self::Date(b) => b.append_null(),
            Self::Timestamp(b) => b.append_null(),
            Self::Time(b) => b.append_null(),
        }
    }

    fn builder(&mut self) -> &mut dyn ArrayBuilder {
        match self {
            Self::Bool(b) => b,
            Self::Int8(b) => b,
            Self::Int16(b) => b,
            Self::Int32(b) => b,
            Self::Int64(b) => b,
            Self::UInt64(b) => b,
            Self::Float32(b) => b,
            Self::Float64(b) => b,
            Self::Decimal(b, _) => b,
            Self::Text(b) => b,
            Self::Binary(b) => b,
            Self::Date(b) => b,
            Self::Timestamp(b) => b,
            Self::Time(b) => b,
        }
    }

    fn data_type_name(&mut self) -> String {
        self.builder().finish_cloned().data_type().to_string()
    }

    /// Once per batch: the values so far as an array.
    fn finish(&mut self) -> ArrayRef {
        self.builder().finish()
    }
}

fn narrow<T: TryFrom<V>, V: Copy + std::fmt::Display>(value: V) -> Result<T, String> {
    T::try_from(value).map_err(|_| format!("value {value} is out of range for the column's type"))
}

fn days_since_epoch(year: u16, month: u8, day: u8) -> Result<i32, String> {
    if year == 0 && month == 0 && day == 0 {
        return Err("zero date '0000-00-00' cannot be carried; use NULLIF(column, '0000-00-00')".into());
    }
    let date = chrono::NaiveDate::from_ymd_opt(i32::from(year), u32::from(month), u32::from(day))
        .ok_or_else(|| format!("invalid date {year:04}-{month:02}-{day:02}"))?;
    Ok(date.num_days_from_ce() - 719_163)
}

/// Parses MySQL's decimal text (`-123.4500`) into an unscaled i128 at `scale`.
fn parse_decimal(text: &[u8], scale: i8) -> Result<i128, String> {
    let invalid = || format!("`{}` is not a decimal", String::from_utf8_lossy(text));
    let (negative, digits) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        Some((b'+', rest)) => (false, rest),
        _ => (false, text),
    };
    let (integer, fraction) = match digits.iter().position(|&b| b == b'.') {
        Some(dot) => (&digits[..dot], &digits[dot + 1..]),
        None => (digits, &digits[..0]),
    };
    if integer.is_empty() && fraction.is_empty() {
        return Err(invalid());
    }
    let overflow = || format!("`{}` does not fit Decimal128(38)", String::from_utf8_lossy(text));
    let mut value: i128 = 0;
    for &b in integer {
        if !b.is_ascii_digit() {
            return Err(invalid());
        }
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(i128::from(b - b'0')))
            .ok_or_else(overflow)?;
    }
    let scale = scale.max(0) as usize;
    for i in 0..scale {
        let digit = match fraction.get(i) {
            Some(b) if b.is_ascii_digit() => b - b'0',
            Some(_) => return Err(invalid()),
            None => 0,
        };
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(i128::from(digit)))
            .ok_or_else(overflow)?;
    }
    if fraction.get(scale).is_some_and(|&b| b >= b'5') {
        value = value.checked_add(1).ok_or_else(overflow)?;
    }
    Ok(if negative { -value } else { value })
}

type ReadStarted = oneshot::Sender<Result<(), (String, Option<String>)>>;

struct RowReader {
    model: String,
    source: String,
    schema: SchemaRef,
    kinds: Vec<MyKind>,
    batch_rows: usize,
}

impl RowReader {
    async fn read(
        &self,
        conn: &mut Conn,
        statement: mysql_async::Statement,
        tx: &mpsc::Sender<Result<RecordBatch, DataFusionError>>,
        started: ReadStarted,
    ) -> Result<(), SourceError> {
        let mut result = match conn.exec_iter(statement, ()).await {
            Ok(result) => {
                let _ = started.send(Ok(()));
                result
            }
            Err(e) => {
                let _ = started.send(Err((e.to_string(), None)));
                return Ok(());
            }
        };
        let mut builders: Vec<MyBuilder> = self
            .kinds
            .iter()
            .map(|&k| MyBuilder::new(k, self.batch_rows))
            .collect();
        let mut rows = 0usize;
        let mut total = 0u64;
        loop {
            let row = result
                .next()
                .await
                .map_err(|e| self.error(format!("reading rows: {e}"), None))?;
            let Some(row) = row else { break };
            total += 1;
            for (column, (builder, value)) in builders.iter_mut().zip(row.unwrap_raw()).enumerate() {
                builder.push(value).map_err(|message| {
                    let name = self.schema.field(column).name();
                    self.error(
                        format!("column `{name}`, row {total}: {message}"),
                        Some(format!(
                            "cast `{name}` in the model's SQL to a type sluice can carry"
                        )),
                    )
                })?;
            }
            rows += 1;
            if rows == self.batch_rows {
                if !self.send(&mut builders, tx).await? {
                    return Ok(());
                }
                rows = 0;
            }
        }
        if rows > 0 {
            self.send(&mut builders, tx).await?;
        }
        Ok(())
    }

    async fn send(
        &self,
        builders: &mut [MyBuilder],
        tx: &mpsc::Sender<Result<RecordBatch, DataFusionError>>,
    ) -> Result<bool, SourceError> {
        let columns = builders.iter_mut().map(MyBuilder::finish).collect();
        let batch = RecordBatch::try_new(self.schema.clone(), columns)
            .map_err(|e| self.error(format!("assembling a batch: {e}"), None))?;
        Ok(tx.send(Ok(batch)).await.is_ok())
    }

    fn error(&self, message: String, hint: Option<String>) -> SourceError {
        SourceError::Query {
            model: self.model.clone(),
            source_name: self.source.clone(),
            message,
            hint,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_parse_at_their_scale() {
        assert_eq!(parse_decimal(b"-123.4500", 4).unwrap(), -1234500);
        assert_eq!(parse_decimal(b"0.005", 2).unwrap(), 1);
        assert_eq!(parse_decimal(b"12", 2).unwrap(), 1200);
        assert_eq!(
            parse_decimal(b"9999999999999999999999999999.9999999999", 10).unwrap(),
            99999999999999999999999999999999999999
        );
        assert!(parse_decimal(b"1e5", 0).is_err());
        assert!(parse_decimal(b"", 0).is_err());
    }

    #[test]
    fn dates_count_days_from_the_unix_epoch() {
        assert_eq!(days_since_epoch(1970, 1, 1).unwrap(), 0);
        assert_eq!(days_since_epoch(1969, 12, 31).unwrap(), -1);
        assert!(days_since_epoch(0, 0, 0).unwrap_err().contains("NULLIF"));
    }
}
