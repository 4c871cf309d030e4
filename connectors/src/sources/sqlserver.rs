//! `type: sqlserver`: Microsoft SQL Server and Azure SQL, over TDS (tiberius on rustls).
//!
//! ```yaml
//! sources:
//!   erp:
//!     type: sqlserver
//!     url: sqlserver://sluice:${MSSQL_PASSWORD}@sql.internal:1433/erp   # or host/port/user/password/database
//!     encrypt: required          # required (default) | strict (TDS 8.0) | off
//!     # trust_server_certificate: true   # or ssl_ca: /etc/ssl/sql-ca.pem
//!     # snapshot_isolation: true          # needs ALLOW_SNAPSHOT_ISOLATION ON
//!     # ssh_tunnel: { host: bastion.example.com, user: sluice }
//! ```
//!
//! A model is described first with `sp_describe_first_result_set`, which gives each column's
//! declared type (a decimal's precision and scale, an integer's width) without running it; the
//! Arrow schema comes from that, and a type sluice cannot carry fails there, naming the column.
//! The model then runs as a SQL batch inside a transaction that is rolled back at the end (SQL
//! Server has no read-only transaction; the rollback undoes anything a model might change), at
//! `READ COMMITTED`, or at `SNAPSHOT` with `snapshot_isolation: true` for one consistent state.
//! Rows stream from the socket and are appended to Arrow builders a batch at a time.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::{
    ArrayBuilder, ArrayRef, BinaryBuilder, BooleanBuilder, Date32Builder, Decimal128Builder, Float32Builder,
    Float64Builder, Int16Builder, Int32Builder, Int64Builder, RecordBatch, StringBuilder,
    Time64MicrosecondBuilder, TimestampMicrosecondBuilder, UInt8Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use async_trait::async_trait;
use futures::TryStreamExt;
use schemars::JsonSchema;
use serde::Deserialize;
use sluice_engine::datafusion::error::DataFusionError;
use sluice_engine::source::{
    ConnectorEnv, ModelQuery, SendableRecordBatchStream, Source, strip_statement_end,
};
use sluice_engine::{ConfigString, Secret, SourceError};
use tiberius::{AuthMethod, Client, ColumnData, Config, EncryptionLevel, QueryItem};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{Compat, TokioAsyncWriteCompatExt};

use crate::HumanDuration;
use crate::tunnel::{SshTunnel, SshTunnelConfig};

const DEFAULT_PORT: u16 = 1433;
const DEFAULT_BATCH_ROWS: usize = 65_536;
/// Days from 0001-01-01 (day 0 of `date` and `datetime2`) to 1970-01-01.
const DAYS_FROM_YEAR_ONE: i64 = 719_162;
/// Days from 1900-01-01 (day 0 of `datetime` and `smalldatetime`) to 1970-01-01.
const DAYS_FROM_1900: i64 = 25_567;
const MICROS_PER_DAY: i64 = 86_400_000_000;

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SqlServerConfig {
    /// `sqlserver://user:password@host:port/database`; fields below override its parts.
    #[serde(default)]
    pub url: Option<ConfigString>,
    /// Server host name or IP; overrides the URL's host.
    #[serde(default)]
    pub host: Option<ConfigString>,
    /// Server port; overrides the URL's port (default 1433). Named instances are reached by port.
    #[serde(default)]
    pub port: Option<u16>,
    /// SQL Server login (SQL authentication); overrides the URL's user. Required.
    #[serde(default)]
    pub user: Option<ConfigString>,
    /// Password of the login; overrides the URL's password.
    #[serde(default)]
    pub password: Option<Secret>,
    /// Database to connect to; overrides the URL's path (default: the login's default database).
    #[serde(default)]
    pub database: Option<ConfigString>,
    #[serde(default)]
    pub encrypt: Option<SqlServerEncrypt>,
    /// Accept any server certificate (self-signed, or a name that does not match). Off by default.
    #[serde(default)]
    pub trust_server_certificate: Option<bool>,
    /// PEM or DER file of the certificate authority that signed the server's certificate.
    #[serde(default)]
    pub ssl_ca: Option<ConfigString>,
    /// Run each model at SNAPSHOT isolation: one consistent state, without blocking writers.
    /// The database needs `ALTER DATABASE ... SET ALLOW_SNAPSHOT_ISOLATION ON`.
    #[serde(default)]
    pub snapshot_isolation: Option<bool>,
    /// Declare a read-only workload (`ApplicationIntent=ReadOnly`), which an availability group
    /// listener routes to a readable secondary.
    #[serde(default)]
    pub read_only_intent: Option<bool>,
    /// How long to wait for a connection and login, e.g. `30s` (default 15s).
    #[serde(default)]
    pub connect_timeout: Option<HumanDuration>,
    /// Rows per Arrow batch (default 65,536).
    #[serde(default)]
    pub batch_rows: Option<usize>,
    /// Connect through an SSH bastion; `host` and `port` are then as the bastion sees them.
    #[serde(default)]
    pub ssh_tunnel: Option<SshTunnelConfig>,
}

/// Whether and how the connection is encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SqlServerEncrypt {
    /// TLS negotiated in the TDS prelogin, for the whole session (`Encrypt=Mandatory`).
    Required,
    /// TDS 8.0: TLS before anything else (`Encrypt=Strict`; SQL Server 2022 and Azure SQL).
    Strict,
    /// No TLS at all: the password and the data cross the network in the clear.
    Off,
}

pub struct SqlServerSource {
    target: Arc<Target>,
    password: String,
    encrypt: SqlServerEncrypt,
    trust_server_certificate: bool,
    ssl_ca: Option<String>,
    snapshot_isolation: bool,
    read_only_intent: bool,
    connect_timeout: Duration,
    batch_rows: usize,
    tunnel: Option<SshTunnel>,
}

type SqlClient = Client<Compat<TcpStream>>;

/// Which server, login and database a source reaches: what its errors name.
struct Target {
    name: String,
    host: String,
    port: u16,
    user: String,
    database: Option<String>,
}

impl Target {
    fn describe_failure(&self, failure: &ConnectFailure, sql: Option<&str>) -> (String, Option<String>) {
        let target = format!("{}:{}", self.host, self.port);
        let database = self.database.as_deref().unwrap_or("(the login's default)");
        let error = match failure {
            ConnectFailure::Timeout => {
                return (
                    format!("connecting to {target} timed out"),
                    Some(format!(
                        "{target} did not answer in time: the host may be unreachable or firewalled, or `connect_timeout` too short"
                    )),
                );
            }
            ConnectFailure::Io(e) => {
                let hint = match e.kind() {
                    std::io::ErrorKind::ConnectionRefused => Some(format!(
                        "nothing is listening on {target}: check the host and port (SQL Server listens on 1433 unless configured otherwise; a named instance has a port of its own)"
                    )),
                    _ if e.to_string().contains("lookup") => {
                        Some(format!("the host name of {target} could not be resolved"))
                    }
                    _ => None,
                };
                return (format!("connecting to {target}: {e}"), hint);
            }
            ConnectFailure::Tds(e) => e,
        };
        if let tiberius::error::Error::Server(server) = error {
            let message = format!(
                "Msg {}, Level {}, State {}: {}",
                server.code(),
                server.class(),
                server.state(),
                server.message()
            );
            let hint = match server.code() {
                18456 => Some(format!(
                    "login failed for `{}`: check the user and password, that the server allows SQL Server authentication (mixed mode), and that the login may open database {database}",
                    self.user
                )),
                4060 => Some(format!(
                    "database {database} does not exist on {target}, or the login has no user in it: check `database` or the URL's path"
                )),
                40615 | 40914 => Some(
                    "the server's firewall refused this address: add a firewall rule for it (Azure SQL: the server's Networking page)".into(),
                ),
                40613 | 40197 | 40501 => {
                    Some("the database is busy or being moved (Azure SQL); run again in a minute".into())
                }
                208 => Some(
                    "a table or view in the model does not exist: check the name, and qualify it as schema.table (e.g. dbo.customers)".into(),
                ),
                207 => Some(
                    "a column in the model's SQL does not exist; `sluice preview` shows a query's columns".into(),
                ),
                229 | 230 | 262 | 297 | 300 => Some(format!(
                    "permission denied: grant read access, e.g. GRANT SELECT ON SCHEMA::dbo TO [{}]",
                    self.user
                )),
                102 | 156 | 170 | 4145 => Some(match sql {
                    Some(_) => "the model's SQL is not valid T-SQL (SQL Server writes LIMIT n as TOP (n) or OFFSET ... FETCH)".into(),
                    None => "syntax error".into(),
                }),
                1033 => Some(
                    "ORDER BY is not allowed in a subquery, and sluice wraps the model in one for previews: drop the ORDER BY (a sync does not need one) or add TOP/OFFSET".into(),
                ),
                3952 => Some(
                    "snapshot isolation is off in this database: run ALTER DATABASE <db> SET ALLOW_SNAPSHOT_ISOLATION ON, or remove `snapshot_isolation`".into(),
                ),
                11501..=11599 => Some(
                    "sluice describes a model with sp_describe_first_result_set before running it, and this one cannot be described (temporary tables, dynamic SQL or more than one result set): rewrite it as one SELECT, or put it in a view".into(),
                ),
                _ => None,
            };
            return (message, hint);
        }
        let message = error.to_string();
        let lower = message.to_lowercase();
        let hint = if lower.contains("encryption level") {
            Some(
                "the server does not offer the encryption `encrypt` asks for: give the server a certificate (Force Encryption), or set `encrypt: off` where the network is trusted".into(),
            )
        } else if lower.contains("tls") || lower.contains("certificate") || lower.contains("handshake") {
            Some(
                "the TLS handshake failed: check `encrypt` (a server without TLS needs `encrypt: off`; SQL Server before 2022 has no `strict`), and trust the server's certificate with `ssl_ca` or `trust_server_certificate`".into(),
            )
        } else {
            None
        };
        (message, hint)
    }

    fn query_error(&self, model: &str, e: tiberius::error::Error, sql: &str) -> SourceError {
        let (message, hint) = self.describe_failure(&ConnectFailure::Tds(e), Some(sql));
        SourceError::Query {
            model: model.to_string(),
            source_name: self.name.clone(),
            message,
            hint,
        }
    }
}

impl SqlServerSource {
    pub fn new(name: &str, config: SqlServerConfig, env: &ConnectorEnv) -> Result<Self, String> {
        let mut host = None;
        let mut port = None;
        let mut user = None;
        let mut password = None;
        let mut database = None;
        if let Some(url) = &config.url {
            let parsed = url::Url::parse(url.expose()).map_err(|e| {
                format!("`url` is not a valid URL (sqlserver://user:password@host:port/database): {e}")
            })?;
            if !matches!(parsed.scheme(), "sqlserver" | "mssql") {
                return Err(format!(
                    "`url` must start with sqlserver://, not {}://",
                    parsed.scheme()
                ));
            }
            let decode = |part: &str| {
                url::form_urlencoded::parse(format!("x={part}").as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default()
            };
            host = parsed.host_str().map(str::to_string);
            port = parsed.port();
            if !parsed.username().is_empty() {
                user = Some(decode(parsed.username()));
            }
            password = parsed.password().map(decode);
            let path = parsed.path().trim_start_matches('/');
            if !path.is_empty() {
                database = Some(decode(path));
            }
        }
        if let Some(value) = &config.host {
            host = Some(value.expose().to_string());
        }
        if let Some(value) = config.port {
            port = Some(value);
        }
        if let Some(value) = &config.user {
            user = Some(value.expose().to_string());
        }
        if let Some(value) = &config.password {
            password = Some(value.expose().to_string());
        }
        if let Some(value) = &config.database {
            database = Some(value.expose().to_string());
        }
        let host = host.ok_or("set `url` or `host`")?;
        let port = port.unwrap_or(DEFAULT_PORT);
        let user = user.ok_or("set the login, in `url` or `user`")?;
        let batch_rows = config.batch_rows.unwrap_or(DEFAULT_BATCH_ROWS);
        if batch_rows == 0 {
            return Err("`batch_rows` must be at least 1".into());
        }
        let encrypt = config.encrypt.unwrap_or(SqlServerEncrypt::Required);
        let trust_server_certificate = config.trust_server_certificate.unwrap_or(false);
        if encrypt == SqlServerEncrypt::Off && (trust_server_certificate || config.ssl_ca.is_some()) {
            return Err(
                "`trust_server_certificate` and `ssl_ca` apply to TLS, which `encrypt: off` turns off".into(),
            );
        }
        let tunnel = match config.ssh_tunnel {
            Some(tunnel) => Some(SshTunnel::new(name, tunnel, host.clone(), port, env)?),
            None => None,
        };
        Ok(Self {
            target: Arc::new(Target {
                name: name.to_string(),
                host,
                port,
                user,
                database,
            }),
            password: password.unwrap_or_default(),
            encrypt,
            trust_server_certificate,
            ssl_ca: config
                .ssl_ca
                .map(|p| env.resolve_path(p.expose()).to_string_lossy().into_owned()),
            snapshot_isolation: config.snapshot_isolation.unwrap_or(false),
            read_only_intent: config.read_only_intent.unwrap_or(false),
            connect_timeout: config.connect_timeout.map_or(Duration::from_secs(15), |d| d.0),
            batch_rows,
            tunnel,
        })
    }

    fn config_for(&self, host: &str, port: u16) -> Config {
        let mut config = Config::new();
        config.host(host);
        config.port(port);
        if let Some(database) = &self.target.database {
            config.database(database);
        }
        config.application_name("sluice");
        config.authentication(AuthMethod::sql_server(&self.target.user, &self.password));
        config.encryption(match self.encrypt {
            SqlServerEncrypt::Required => EncryptionLevel::Required,
            SqlServerEncrypt::Strict => EncryptionLevel::Strict,
            SqlServerEncrypt::Off => EncryptionLevel::NotSupported,
        });
        if self.trust_server_certificate {
            config.trust_cert();
        } else if let Some(ca) = &self.ssl_ca {
            config.trust_cert_ca(ca);
        }
        if host != self.target.host {
            // Through a tunnel the socket's end is 127.0.0.1; the certificate names the server.
            config.hostname_in_certificate(&self.target.host);
        }
        config.readonly(self.read_only_intent);
        config.handshake_timeout(Some(self.connect_timeout));
        config
    }

    async fn connect(&self) -> Result<SqlClient, SourceError> {
        crate::install_crypto_provider();
        let (host, port) = match &self.tunnel {
            Some(tunnel) => {
                let local = tunnel.open().await.map_err(|message| SourceError::Connect {
                    source_name: self.target.name.clone(),
                    message,
                    hint: Some(crate::tunnel::HINT.into()),
                })?;
                (local.ip().to_string(), local.port())
            }
            None => (self.target.host.clone(), self.target.port),
        };
        let connect_error = |failure: ConnectFailure| {
            let (message, hint) = self.target.describe_failure(&failure, None);
            SourceError::Connect {
                source_name: self.target.name.clone(),
                message,
                hint,
            }
        };
        match self.login(&host, port).await {
            Ok(client) => Ok(client),
            // Azure SQL's gateway may redirect a login to the node that serves the database.
            Err(ConnectFailure::Tds(tiberius::error::Error::Routing { host, port })) => {
                tracing::debug!(source = %self.target.name, %host, port, "login redirected");
                self.login(&host, port).await.map_err(connect_error)
            }
            Err(failure) => Err(connect_error(failure)),
        }
    }

    async fn login(&self, host: &str, port: u16) -> Result<SqlClient, ConnectFailure> {
        let config = self.config_for(host, port);
        let attempt = async {
            let tcp = TcpStream::connect((host, port))
                .await
                .map_err(ConnectFailure::Io)?;
            tcp.set_nodelay(true).map_err(ConnectFailure::Io)?;
            Client::connect(config, tcp.compat_write())
                .await
                .map_err(ConnectFailure::Tds)
        };
        match tokio::time::timeout(self.connect_timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(ConnectFailure::Timeout),
        }
    }

    /// The model's columns as SQL Server declares them, without running it.
    async fn describe(
        &self,
        client: &mut SqlClient,
        model: &str,
        sql: &str,
    ) -> Result<Vec<DescribedColumn>, SourceError> {
        let describe = format!(
            "EXEC sp_describe_first_result_set @tsql = {}",
            unicode_literal(sql)
        );
        let rows = client
            .simple_query(describe)
            .await
            .map_err(|e| self.target.query_error(model, e, sql))?
            .into_first_result()
            .await
            .map_err(|e| self.target.query_error(model, e, sql))?;
        let mut columns = Vec::with_capacity(rows.len());
        for row in rows {
            let text = |column: &str| -> Option<String> {
                row.try_get::<&str, _>(column).ok().flatten().map(str::to_string)
            };
            let number = |column: &str| -> Option<i64> {
                match row.try_get::<u8, _>(column) {
                    Ok(value) => value.map(i64::from),
                    Err(_) => match row.try_get::<i16, _>(column) {
                        Ok(value) => value.map(i64::from),
                        Err(_) => row.try_get::<i32, _>(column).ok().flatten().map(i64::from),
                    },
                }
            };
            if row.try_get::<bool, _>("is_hidden").ok().flatten() == Some(true) {
                continue;
            }
            let ordinal = number("column_ordinal").unwrap_or(columns.len() as i64 + 1);
            let name = text("name")
                .filter(|n| !n.is_empty())
                .ok_or_else(|| SourceError::Query {
                    model: model.to_string(),
                    source_name: self.target.name.clone(),
                    message: format!("column {ordinal} of the model has no name"),
                    hint: Some(
                        "give every expression a name in the model's SQL, e.g. SELECT COUNT(*) AS orders"
                            .into(),
                    ),
                })?;
            let type_name = text("system_type_name").ok_or_else(|| SourceError::Query {
                model: model.to_string(),
                source_name: self.target.name.clone(),
                message: format!("SQL Server did not describe the type of column `{name}`"),
                hint: None,
            })?;
            columns.push(DescribedColumn {
                name,
                type_name,
                precision: number("precision").unwrap_or(0) as u8,
                scale: number("scale").unwrap_or(0) as u8,
            });
        }
        if columns.is_empty() {
            return Err(SourceError::Query {
                model: model.to_string(),
                source_name: self.target.name.clone(),
                message: "the model returns no result set".into(),
                hint: Some(
                    "a model is a query: its SQL must be a SELECT (or a statement that returns rows)".into(),
                ),
            });
        }
        Ok(columns)
    }
}

enum ConnectFailure {
    Tds(tiberius::error::Error),
    Io(std::io::Error),
    Timeout,
}

struct DescribedColumn {
    name: String,
    type_name: String,
    precision: u8,
    scale: u8,
}

/// `N'...'`, with quotes doubled: the model's text as a T-SQL Unicode literal.
fn unicode_literal(text: &str) -> String {
    format!("N'{}'", text.replace('\'', "''"))
}

#[async_trait]
impl Source for SqlServerSource {
    fn kind(&self) -> &'static str {
        "sqlserver"
    }

    async fn check(&self) -> Result<(), SourceError> {
        let mut client = self.connect().await?;
        client
            .simple_query("SELECT 1")
            .await
            .map_err(|e| SourceError::Connect {
                source_name: self.target.name.clone(),
                message: e.to_string(),
                hint: None,
            })?
            .into_results()
            .await
            .map_err(|e| SourceError::Connect {
                source_name: self.target.name.clone(),
                message: e.to_string(),
                hint: None,
            })?;
        client.close().await.ok();
        Ok(())
    }

    fn limit_sql(&self, sql: &str, limit: u64) -> String {
        // T-SQL has no LIMIT. The newline keeps a trailing `-- comment` from swallowing the wrapper.
        format!(
            "SELECT TOP ({limit}) * FROM (\n{}\n) AS sluice_limited",
            strip_statement_end(sql)
        )
    }

    async fn extract(&self, query: &ModelQuery) -> Result<SendableRecordBatchStream, SourceError> {
        let mut client = self.connect().await?;
        let sql = strip_statement_end(&query.sql).to_string();
        let described = self.describe(&mut client, &query.model, &sql).await?;
        let mut kinds = Vec::with_capacity(described.len());
        let mut fields = Vec::with_capacity(described.len());
        for column in &described {
            let kind = SqlKind::for_column(column).map_err(|database_type| SourceError::UnsupportedType {
                model: query.model.clone(),
                column: column.name.clone(),
                hint: cast_hint(&database_type, &column.name),
                database_type,
            })?;
            fields.push(Field::new(&column.name, kind.data_type(), true));
            kinds.push(kind);
        }
        let schema: SchemaRef = Arc::new(Schema::new(fields));
        let isolation = if self.snapshot_isolation {
            "SNAPSHOT"
        } else {
            "READ COMMITTED"
        };
        client
            .simple_query(format!(
                "SET TRANSACTION ISOLATION LEVEL {isolation}; BEGIN TRANSACTION"
            ))
            .await
            .map_err(|e| self.target.query_error(&query.model, e, &sql))?
            .into_results()
            .await
            .map_err(|e| self.target.query_error(&query.model, e, &sql))?;
        let (tx, rx) = mpsc::channel(2);
        let (started_tx, started_rx) = oneshot::channel();
        let reader = RowReader {
            model: query.model.clone(),
            schema: schema.clone(),
            kinds,
            batch_rows: self.batch_rows,
        };
        let source = self.target.clone();
        tokio::spawn(async move {
            let result = reader.read(&mut client, &sql, &tx, started_tx, &source).await;
            // The model ran in a transaction that is never committed.
            let rollback = async {
                client
                    .simple_query("IF @@TRANCOUNT > 0 ROLLBACK")
                    .await?
                    .into_results()
                    .await
            };
            if let Err(e) = rollback.await {
                tracing::debug!(source = %source.name, "rollback after the model: {e}");
            }
            client.close().await.ok();
            if let Err(e) = result {
                let _ = tx.send(Err(DataFusionError::External(Box::new(e)))).await;
            }
        });
        // Errors the server reports when the query starts (e.g. permissions) surface here.
        if let Ok(Err(error)) = started_rx.await {
            return Err(error);
        }
        Ok(super::receiver_stream(schema, rx))
    }
}

/// How a SQL Server column is carried.
#[derive(Debug, Clone, Copy, PartialEq)]
enum SqlKind {
    Bool,
    UInt8,
    Int16,
    Int32,
    Int64,
    Float32,
    Float64,
    Decimal {
        precision: u8,
        scale: i8,
    },
    Text,
    /// `uniqueidentifier`, as SQL Server prints it (upper-case, hyphenated).
    Guid,
    Binary,
    Date,
    /// `datetime2`, `datetime`, `smalldatetime`: wall-clock time without a zone.
    DateTime,
    /// `datetimeoffset`: an instant, carried in UTC.
    DateTimeOffset,
    Time,
}

impl SqlKind {
    /// The kind for a described column, or the database type's name when it cannot be carried.
    fn for_column(column: &DescribedColumn) -> Result<SqlKind, String> {
        let full = column.type_name.to_lowercase();
        let base = full.split('(').next().unwrap_or("").trim();
        Ok(match base {
            "bit" => SqlKind::Bool,
            "tinyint" => SqlKind::UInt8,
            "smallint" => SqlKind::Int16,
            "int" => SqlKind::Int32,
            "bigint" => SqlKind::Int64,
            "real" => SqlKind::Float32,
            "float" => {
                // float(1..24) is stored as real; sp_describe reports it as `real` already,
                // but keep the rule in case a server reports float(24).
                if column.precision > 0 && column.precision <= 24 {
                    SqlKind::Float32
                } else {
                    SqlKind::Float64
                }
            }
            "decimal" | "numeric" => {
                if column.precision == 0 || column.precision > 38 || column.scale > column.precision {
                    return Err(full);
                }
                SqlKind::Decimal {
                    precision: column.precision,
                    scale: column.scale as i8,
                }
            }
            "money" => SqlKind::Decimal {
                precision: 19,
                scale: 4,
            },
            "smallmoney" => SqlKind::Decimal {
                precision: 10,
                scale: 4,
            },
            "char" | "varchar" | "nchar" | "nvarchar" | "text" | "ntext" | "sysname" | "xml" => SqlKind::Text,
            "uniqueidentifier" => SqlKind::Guid,
            "binary" | "varbinary" | "image" | "timestamp" | "rowversion" => SqlKind::Binary,
            "date" => SqlKind::Date,
            "datetime2" | "datetime" | "smalldatetime" => SqlKind::DateTime,
            "datetimeoffset" => SqlKind::DateTimeOffset,
            "time" => SqlKind::Time,
            _ => return Err(full),
        })
    }

    fn data_type(self) -> DataType {
        match self {
            SqlKind::Bool => DataType::Boolean,
            SqlKind::UInt8 => DataType::UInt8,
            SqlKind::Int16 => DataType::Int16,
            SqlKind::Int32 => DataType::Int32,
            SqlKind::Int64 => DataType::Int64,
            SqlKind::Float32 => DataType::Float32,
            SqlKind::Float64 => DataType::Float64,
            SqlKind::Decimal { precision, scale } => DataType::Decimal128(precision, scale),
            SqlKind::Text | SqlKind::Guid => DataType::Utf8,
            SqlKind::Binary => DataType::Binary,
            SqlKind::Date => DataType::Date32,
            SqlKind::DateTime => DataType::Timestamp(TimeUnit::Microsecond, None),
            SqlKind::DateTimeOffset => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            SqlKind::Time => DataType::Time64(TimeUnit::Microsecond),
        }
    }
}

fn cast_hint(database_type: &str, column: &str) -> String {
    let suggestion = if database_type.starts_with("geography") || database_type.starts_with("geometry") {
        format!("{column}.STAsText() AS {column}")
    } else if database_type.starts_with("hierarchyid") {
        format!("{column}.ToString() AS {column}")
    } else if database_type.starts_with("decimal") || database_type.starts_with("numeric") {
        format!("CAST({column} AS decimal(38, 10)) AS {column}")
    } else {
        format!("CAST({column} AS nvarchar(max)) AS {column}")
    };
    format!("cast it in the model's SQL, e.g. {suggestion}")
}

/// Appends one column's values.
enum SqlBuilder {
    Bool(BooleanBuilder),
    UInt8(UInt8Builder),
    Int16(Int16Builder),
    Int32(Int32Builder),
    Int64(Int64Builder),
    Float32(Float32Builder),
    Float64(Float64Builder),
    Decimal(Decimal128Builder, u8),
    Text(StringBuilder),
    Guid(StringBuilder),
    Binary(BinaryBuilder),
    Date(Date32Builder),
    Timestamp(TimestampMicrosecondBuilder),
    Time(Time64MicrosecondBuilder),
}

impl SqlBuilder {
    fn new(kind: SqlKind, capacity: usize) -> Self {
        match kind {
            SqlKind::Bool => Self::Bool(BooleanBuilder::with_capacity(capacity)),
            SqlKind::UInt8 => Self::UInt8(UInt8Builder::with_capacity(capacity)),
            SqlKind::Int16 => Self::Int16(Int16Builder::with_capacity(capacity)),
            SqlKind::Int32 => Self::Int32(Int32Builder::with_capacity(capacity)),
            SqlKind::Int64 => Self::Int64(Int64Builder::with_capacity(capacity)),
            SqlKind::Float32 => Self::Float32(Float32Builder::with_capacity(capacity)),
            SqlKind::Float64 => Self::Float64(Float64Builder::with_capacity(capacity)),
            SqlKind::Decimal { precision, scale } => Self::Decimal(
                Decimal128Builder::with_capacity(capacity)
                    .with_precision_and_scale(precision, scale)
                    .unwrap_or_else(|_| Decimal128Builder::with_capacity(capacity)),
                scale as u8,
            ),
            SqlKind::Text => Self::Text(StringBuilder::with_capacity(capacity, capacity * 16)),
            SqlKind::Guid => Self::Guid(StringBuilder::with_capacity(capacity, capacity * 36)),
            SqlKind::Binary => Self::Binary(BinaryBuilder::with_capacity(capacity, capacity * 16)),
            SqlKind::Date => Self::Date(Date32Builder::with_capacity(capacity)),
            SqlKind::DateTime => Self::Timestamp(TimestampMicrosecondBuilder::with_capacity(capacity)),
            SqlKind::DateTimeOffset => {
                Self::Timestamp(TimestampMicrosecondBuilder::with_capacity(capacity).with_timezone("UTC"))
            }
            SqlKind::Time => Self::Time(Time64MicrosecondBuilder::with_capacity(capacity)),
        }
    }

    fn push(&mut self, value: ColumnData<'_>) -> Result<(), String> {
        match (self, value) {
            (Self::Bool(b), ColumnData::Bit(v)) => b.append_option(v),
            (Self::UInt8(b), ColumnData::U8(v)) => b.append_option(v),
            (Self::Int16(b), ColumnData::I16(v)) => b.append_option(v),
            (Self::Int16(b), ColumnData::U8(v)) => b.append_option(v.map(i16::from)),
            (Self::Int32(b), ColumnData::I32(v)) => b.append_option(v),
            (Self::Int32(b), ColumnData::I16(v)) => b.append_option(v.map(i32::from)),
            (Self::Int32(b), ColumnData::U8(v)) => b.append_option(v.map(i32::from)),
            (Self::Int64(b), ColumnData::I64(v)) => b.append_option(v),
            (Self::Int64(b), ColumnData::I32(v)) => b.append_option(v.map(i64::from)),
            (Self::Int64(b), ColumnData::I16(v)) => b.append_option(v.map(i64::from)),
            (Self::Int64(b), ColumnData::U8(v)) => b.append_option(v.map(i64::from)),
            (Self::Float32(b), ColumnData::F32(v)) => b.append_option(v),
            (Self::Float64(b), ColumnData::F64(v)) => b.append_option(v),
            (Self::Float64(b), ColumnData::F32(v)) => b.append_option(v.map(f64::from)),
            (Self::Decimal(b, scale), ColumnData::Numeric(v)) => match v {
                Some(n) => b.append_value(rescale(n.value(), n.scale(), *scale)?),
                None => b.append_null(),
            },
            // tiberius hands money over as a float of the scaled integer divided by 10^4.
            (Self::Decimal(b, scale), ColumnData::F64(v)) => match v {
                Some(f) => b.append_value(money_to_decimal(f, *scale)?),
                None => b.append_null(),
            },
            (Self::Text(b), ColumnData::String(v)) => b.append_option(v.as_deref()),
            (Self::Text(b), ColumnData::Xml(v)) => b.append_option(v.map(|xml| xml.to_string())),
            (Self::Text(b), ColumnData::Guid(v)) | (Self::Guid(b), ColumnData::Guid(v)) => {
                b.append_option(v.map(|g| g.hyphenated().to_string().to_uppercase()))
            }
            (Self::Binary(b), ColumnData::Binary(v)) => b.append_option(v.as_deref()),
            (Self::Date(b), ColumnData::Date(v)) => {
                b.append_option(v.map(|d| (i64::from(d.days()) - DAYS_FROM_YEAR_ONE) as i32))
            }
            (Self::Timestamp(b), ColumnData::DateTime2(v)) => {
                b.append_option(v.map(|dt| datetime2_micros(dt.date().days(), dt.time())))
            }
            // The date and time of a datetimeoffset are UTC on the wire; the offset only says
            // where it was written. (tiberius's own chrono conversion subtracts the offset again.)
            (Self::Timestamp(b), ColumnData::DateTimeOffset(v)) => b.append_option(
                v.map(|dto| datetime2_micros(dto.datetime2().date().days(), dto.datetime2().time())),
            ),
            (Self::Timestamp(b), ColumnData::DateTime(v)) => b.append_option(v.map(|dt| {
                // 1/300 s ticks, rounded to the microsecond.
                let micros = (i64::from(dt.seconds_fragments()) * 10_000 + 1) / 3;
                (i64::from(dt.days()) - DAYS_FROM_1900) * MICROS_PER_DAY + micros
            })),
            (Self::Timestamp(b), ColumnData::SmallDateTime(v)) => b.append_option(v.map(|dt| {
                (i64::from(dt.days()) - DAYS_FROM_1900) * MICROS_PER_DAY
                    + i64::from(dt.seconds_fragments()) * 60_000_000
            })),
            (Self::Time(b), ColumnData::Time(v)) => b.append_option(v.map(time_micros)),
            (builder, value) => {
                return Err(format!(
                    "unexpected value {value:?} for a {} column",
                    builder.data_type_name()
                ));
            }
        }
        Ok(())
    }

    fn builder(&mut self) -> &mut dyn ArrayBuilder {
        match self {
            Self::Bool(b) => b,
            Self::UInt8(b) => b,
            Self::Int16(b) => b,
            Self::Int32(b) => b,
            Self::Int64(b) => b,
            Self::Float32(b) => b,
            Self::Float64(b) => b,
            Self::Decimal(b, _) => b,
            Self::Text(b) | Self::Guid(b) => b,
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

/// A decimal's unscaled value moved from one scale to another (exact when widening; SQL Server
/// sends a column's values at its declared scale, so narrowing does not happen in practice).
fn rescale(value: i128, from: u8, to: u8) -> Result<i128, String> {
    let overflow = || format!("decimal value {value} (scale {from}) does not fit Decimal128(38, {to})");
    if to >= from {
        10i128
            .checked_pow(u32::from(to - from))
            .and_then(|factor| value.checked_mul(factor))
            .ok_or_else(overflow)
    } else {
        let factor = 10i128.checked_pow(u32::from(from - to)).ok_or_else(overflow)?;
        let half = factor / 2;
        // Round half away from zero, as SQL Server does when it casts.
        Ok(if value >= 0 {
            (value + half) / factor
        } else {
            (value - half) / factor
        })
    }
}

fn money_to_decimal(value: f64, scale: u8) -> Result<i128, String> {
    if !value.is_finite() {
        return Err(format!("money value {value} is not a number"));
    }
    let scaled = (value * 10f64.powi(i32::from(scale))).round();
    if scaled.abs() >= 1e37 {
        return Err(format!("money value {value} does not fit Decimal128"));
    }
    Ok(scaled as i128)
}

/// A `time`'s increments (units of 10^-scale seconds) as microseconds since midnight.
fn time_micros(time: tiberius::time::Time) -> i64 {
    let increments = time.increments() as i64;
    match time.scale() {
        scale @ 0..=6 => increments * 10i64.pow(6 - u32::from(scale)),
        scale => increments / 10i64.pow(u32::from(scale) - 6),
    }
}

fn datetime2_micros(days_since_year_one: u32, time: tiberius::time::Time) -> i64 {
    (i64::from(days_since_year_one) - DAYS_FROM_YEAR_ONE) * MICROS_PER_DAY + time_micros(time)
}

struct RowReader {
    model: String,
    schema: SchemaRef,
    kinds: Vec<SqlKind>,
    batch_rows: usize,
}

impl RowReader {
    async fn read(
        &self,
        client: &mut SqlClient,
        sql: &str,
        tx: &mpsc::Sender<Result<RecordBatch, DataFusionError>>,
        started: oneshot::Sender<Result<(), SourceError>>,
        source: &Target,
    ) -> Result<(), SourceError> {
        let mut stream = match client.simple_query(sql).await {
            Ok(stream) => stream,
            Err(e) => {
                let _ = started.send(Err(source.query_error(&self.model, e, sql)));
                return Ok(());
            }
        };
        let mut started = Some(started);
        let mut builders: Vec<SqlBuilder> = self
            .kinds
            .iter()
            .map(|&k| SqlBuilder::new(k, self.batch_rows))
            .collect();
        let mut rows = 0usize;
        let mut total = 0u64;
        loop {
            let item = match stream.try_next().await {
                Ok(item) => item,
                Err(e) => {
                    let error = source.query_error(&self.model, e, sql);
                    match started.take() {
                        Some(started) => {
                            let _ = started.send(Err(error));
                            return Ok(());
                        }
                        None => return Err(error),
                    }
                }
            };
            let Some(item) = item else { break };
            let row = match item {
                QueryItem::Metadata(metadata) => {
                    if metadata.result_index() > 0 {
                        return Err(self.error(
                            "the model returned more than one result set".into(),
                            Some("a model is one query; sluice reads its first result only".into()),
                        ));
                    }
                    let names: Vec<&str> = metadata.columns().iter().map(|c| c.name()).collect();
                    let expected: Vec<&str> =
                        self.schema.fields().iter().map(|f| f.name().as_str()).collect();
                    if names != expected {
                        return Err(self.error(
                            format!(
                                "the model returned columns ({}) other than SQL Server described ({})",
                                names.join(", "),
                                expected.join(", ")
                            ),
                            Some("a model whose columns change from run to run (dynamic SQL) cannot be synced; put it in a view".into()),
                        ));
                    }
                    if let Some(started) = started.take() {
                        let _ = started.send(Ok(()));
                    }
                    continue;
                }
                QueryItem::Row(row) => row,
            };
            total += 1;
            for (column, (builder, value)) in builders.iter_mut().zip(row).enumerate() {
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
        if let Some(started) = started.take() {
            let _ = started.send(Ok(()));
        }
        if rows > 0 {
            self.send(&mut builders, tx).await?;
        }
        Ok(())
    }

    async fn send(
        &self,
        builders: &mut [SqlBuilder],
        tx: &mpsc::Sender<Result<RecordBatch, DataFusionError>>,
    ) -> Result<bool, SourceError> {
        let columns = builders.iter_mut().map(SqlBuilder::finish).collect();
        let batch = RecordBatch::try_new(self.schema.clone(), columns)
            .map_err(|e| self.error(format!("assembling a batch: {e}"), None))?;
        Ok(tx.send(Ok(batch)).await.is_ok())
    }

    fn error(&self, message: String, hint: Option<String>) -> SourceError {
        SourceError::Query {
            model: self.model.clone(),
            source_name: String::new(),
            message,
            hint,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn described(type_name: &str, precision: u8, scale: u8) -> DescribedColumn {
        DescribedColumn {
            name: "c".into(),
            type_name: type_name.into(),
            precision,
            scale,
        }
    }

    #[test]
    fn declared_types_choose_arrow_types() {
        let kind = |t: &str, p: u8, s: u8| SqlKind::for_column(&described(t, p, s)).map(SqlKind::data_type);
        assert_eq!(kind("decimal(12,2)", 12, 2), Ok(DataType::Decimal128(12, 2)));
        assert_eq!(kind("money", 19, 4), Ok(DataType::Decimal128(19, 4)));
        assert_eq!(kind("nvarchar(max)", 0, 0), Ok(DataType::Utf8));
        assert_eq!(kind("tinyint", 3, 0), Ok(DataType::UInt8));
        assert_eq!(kind("float", 53, 0), Ok(DataType::Float64));
        assert_eq!(
            kind("datetimeoffset(7)", 34, 7),
            Ok(DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())))
        );
        assert_eq!(kind("geography", 0, 0), Err("geography".into()));
        assert_eq!(kind("sql_variant", 0, 0), Err("sql_variant".into()));
    }

    #[test]
    fn times_and_dates_count_from_their_epochs() {
        use tiberius::time::Time;
        assert_eq!(time_micros(Time::new(123_456_789, 7)), 12_345_678);
        assert_eq!(time_micros(Time::new(5, 0)), 5_000_000);
        // 1970-01-01 is day 719162 of the proleptic Gregorian calendar.
        assert_eq!(datetime2_micros(719_162, Time::new(0, 7)), 0);
        let mut builder = SqlBuilder::new(SqlKind::DateTime, 2);
        // datetime: 1900-01-01 + 25567 days = 1970-01-01; 300 ticks = 1 s.
        builder
            .push(ColumnData::DateTime(Some(tiberius::time::DateTime::new(
                25_567, 301,
            ))))
            .unwrap();
        let array = builder.finish();
        let values = array
            .as_any()
            .downcast_ref::<arrow::array::TimestampMicrosecondArray>()
            .unwrap();
        assert_eq!(values.value(0), 1_003_333);
    }

    #[test]
    fn decimals_rescale_exactly() {
        assert_eq!(rescale(12345, 2, 4), Ok(1_234_500));
        assert_eq!(rescale(-12345, 2, 1), Ok(-1235));
        assert!(rescale(i128::MAX / 10, 0, 5).is_err());
        assert_eq!(money_to_decimal(1234.5678, 4), Ok(12_345_678));
    }

    #[test]
    fn previews_use_top_and_urls_fill_the_fields() {
        let config: SqlServerConfig = serde_json::from_value(serde_json::json!({
            "url": "sqlserver://sluice:p%40ss@sql.internal:1444/erp",
            "database": "erp_copy",
        }))
        .unwrap();
        let source = SqlServerSource::new("erp", config, &ConnectorEnv::rooted_at(".")).unwrap();
        assert_eq!(source.password, "p@ss");
        assert_eq!(
            (source.target.host.as_str(), source.target.port),
            ("sql.internal", 1444)
        );
        assert_eq!(source.target.database.as_deref(), Some("erp_copy"));
        assert_eq!(
            source.limit_sql("SELECT id FROM dbo.t;\n", 5),
            "SELECT TOP (5) * FROM (\nSELECT id FROM dbo.t\n) AS sluice_limited"
        );
        assert_eq!(unicode_literal("it's"), "N'it''s'");
        let refused: SqlServerConfig =
            serde_json::from_value(serde_json::json!({"url": "postgres://u@h/db"})).unwrap();
        assert!(SqlServerSource::new("erp", refused, &ConnectorEnv::rooted_at(".")).is_err());
    }
}
