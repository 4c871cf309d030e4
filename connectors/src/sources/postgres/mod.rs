//! `type: postgres`: PostgreSQL; `type: redshift`: Amazon Redshift, on the same wire protocol.
//!
//! ```yaml
//! sources:
//!   app_db:
//!     type: postgres
//!     url: postgres://sluice:${PGPASSWORD}@db.internal:5432/app   # or the fields below
//!     # host: db.internal
//!     # port: 5432
//!     # user: sluice
//!     # password: ${PGPASSWORD}
//!     # database: app
//!     sslmode: verify-full           # disable | prefer (default) | require | verify-ca | verify-full
//!     # sslrootcert: /etc/ssl/rds.pem  # CA bundle for verify-*; default: the Mozilla roots
//!     # ssh_tunnel: { host: bastion.example.com, port: 22, user: sluice }
//! ```
//!
//! A model runs inside `BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY`, so it sees one
//! consistent state and cannot change anything. The query is described first (its columns'
//! types decide the Arrow schema; a type sluice cannot carry fails here, naming the column),
//! then streamed with `COPY (query) TO STDOUT (FORMAT binary)` and decoded straight into
//! Arrow builders ([`decode`]), a batch at a time: memory does not grow with the result.
//!
//! Redshift has no `COPY ... TO STDOUT`. A `redshift` source opens `BEGIN READ ONLY`, declares
//! a cursor for the model and fetches `batch_rows` rows at a time with `FETCH FORWARD` over the
//! extended protocol, whose rows arrive in the same binary encoding as COPY's fields and go
//! through the same decoders.

pub mod decode;
mod tls;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::{Field, Schema};
use async_trait::async_trait;
use bytes::{Buf, BytesMut};
use futures::StreamExt;
use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::Deserialize;
use sluice_engine::datafusion::error::DataFusionError;
use sluice_engine::source::{
    ConnectorEnv, ModelQuery, SendableRecordBatchStream, Source, strip_statement_end,
};
use sluice_engine::{ConfigString, Secret, SourceError};
use tokio::sync::mpsc;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

use self::decode::{ColumnKind, CopyDecoder, Progress};
use super::unload::{UnloadLocation, UnloadRead, UnloadedFile, quote_literal};
use crate::HumanDuration;
use crate::tunnel::{SshTunnel, SshTunnelConfig};

const DEFAULT_BATCH_ROWS: usize = 65_536;

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://user:password@host:port/database?options`; fields below override its parts.
    #[serde(default)]
    pub url: Option<ConfigString>,
    /// Database server host name or IP; overrides the URL's host.
    #[serde(default)]
    pub host: Option<ConfigString>,
    /// Database server port; overrides the URL's port (default 5432).
    #[serde(default)]
    pub port: Option<u16>,
    /// User to log in as; overrides the URL's user. Required, here or in the URL.
    #[serde(default)]
    pub user: Option<ConfigString>,
    /// Password of the user; overrides the URL's password.
    #[serde(default)]
    pub password: Option<Secret>,
    /// Database to connect to; overrides the URL's database.
    #[serde(default)]
    pub database: Option<ConfigString>,
    #[serde(default)]
    pub sslmode: Option<SslMode>,
    /// PEM file of the certificate authorities to trust for `verify-ca` / `verify-full`.
    #[serde(default)]
    pub sslrootcert: Option<ConfigString>,
    /// How long to wait for a connection, e.g. `30s` (default 10s).
    #[serde(default)]
    pub connect_timeout: Option<HumanDuration>,
    /// Rows per Arrow batch (default 65,536).
    #[serde(default)]
    pub batch_rows: Option<usize>,
    /// Connect through an SSH bastion; `host` and `port` are then as the bastion sees them.
    #[serde(default)]
    pub ssh_tunnel: Option<SshTunnelConfig>,
    /// Redshift only: unload each sync's whole result to S3 as Parquet and read it back, rather
    /// than fetch it through a cursor (previews and checks still use the cursor).
    #[serde(default)]
    pub unload: Option<RedshiftUnload>,
}

/// Where a `redshift` source unloads a sync's result: `UNLOAD ('query') TO 's3://...'
/// IAM_ROLE '...' FORMAT AS PARQUET MANIFEST VERBOSE`, read back through object_store.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedshiftUnload {
    /// `s3://bucket/prefix/` Redshift may write to and sluice may list, read and delete in; each
    /// sync writes under `<url>/<model>/<time>-<id>/` and deletes its files once read.
    pub url: ConfigString,
    /// The IAM role Redshift assumes to write there: `arn:aws:iam::123456789012:role/unload`.
    pub iam_role: ConfigString,
    /// The bucket's region when it is not the cluster's (Redshift's `REGION` option).
    #[serde(default)]
    pub region: Option<ConfigString>,
    /// object_store options for sluice to read the files (`aws_region`, credentials, endpoint).
    #[serde(default)]
    pub options: IndexMap<String, ConfigString>,
    /// Keep the files after reading them (default false: they are deleted).
    #[serde(default)]
    pub keep_files: bool,
}

/// libpq's `sslmode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "disable" => Ok(Self::Disable),
            "allow" | "prefer" => Ok(Self::Prefer),
            "require" => Ok(Self::Require),
            "verify-ca" => Ok(Self::VerifyCa),
            "verify-full" => Ok(Self::VerifyFull),
            other => Err(format!(
                "unknown sslmode `{other}` (use disable, prefer, require, verify-ca or verify-full)"
            )),
        }
    }
}

/// Which server the source speaks to: how it opens its transaction and reads rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `COPY (query) TO STDOUT (FORMAT binary)` in a repeatable-read, read-only transaction.
    Postgres,
    /// A cursor fetched over the extended protocol in a read-only transaction.
    Redshift,
}

/// What `UNLOAD ... MANIFEST VERBOSE` writes beside the files (the fields sluice reads).
#[derive(Debug, Deserialize)]
struct UnloadManifest {
    entries: Vec<ManifestEntry>,
    #[serde(default)]
    meta: Option<ManifestMeta>,
}

#[derive(Debug, Deserialize)]
struct ManifestEntry {
    url: String,
    #[serde(default)]
    meta: Option<ManifestMeta>,
}

#[derive(Debug, Deserialize)]
struct ManifestMeta {
    #[serde(default)]
    content_length: Option<u64>,
    #[serde(default)]
    record_count: Option<u64>,
}

/// The cursor a `redshift` source reads a model through.
const CURSOR: &str = "sluice_cursor";

pub struct PostgresSource {
    name: String,
    dialect: Dialect,
    config: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    batch_rows: usize,
    tunnel: Option<SshTunnel>,
    unload: Option<Unload>,
}

/// A `redshift` source's unload location, opened.
struct Unload {
    location: UnloadLocation,
    iam_role: String,
    region: Option<String>,
}

impl PostgresSource {
    pub fn new(name: &str, options: PostgresConfig, env: &ConnectorEnv) -> Result<Self, String> {
        Self::with_dialect(name, options, env, Dialect::Postgres)
    }

    /// A `redshift` source: the same options, port 5439 by default, read through a cursor.
    pub fn redshift(name: &str, options: PostgresConfig, env: &ConnectorEnv) -> Result<Self, String> {
        Self::with_dialect(name, options, env, Dialect::Redshift)
    }

    fn with_dialect(
        name: &str,
        options: PostgresConfig,
        env: &ConnectorEnv,
        dialect: Dialect,
    ) -> Result<Self, String> {
        let mut sslmode = options.sslmode;
        let mut config = match &options.url {
            Some(url) => {
                let (url, url_sslmode) = split_sslmode(url.expose())?;
                sslmode = sslmode.or(url_sslmode);
                tokio_postgres::Config::from_str(&url)
                    .map_err(|e| format!("`url` is not a valid Postgres URL: {e}"))?
            }
            None => tokio_postgres::Config::new(),
        };
        if let Some(host) = &options.host {
            config.host(host.expose());
        }
        if let Some(port) = options.port {
            config.port(port);
        }
        if let Some(user) = &options.user {
            config.user(user.expose());
        }
        if let Some(password) = &options.password {
            config.password(password.expose());
        }
        if let Some(database) = &options.database {
            config.dbname(database.expose());
        }
        if config.get_hosts().is_empty() {
            return Err("set `url` or `host`".into());
        }
        if config.get_user().is_none() {
            return Err("set the user, in `url` or `user`".into());
        }
        if config.get_ports().is_empty() {
            config.port(match dialect {
                Dialect::Postgres => 5432,
                Dialect::Redshift => 5439,
            });
        }
        config.connect_timeout(options.connect_timeout.map_or(Duration::from_secs(10), |d| d.0));
        if config.get_application_name().is_none() {
            config.application_name("sluice");
        }
        let sslmode = sslmode.unwrap_or(SslMode::Prefer);
        config.ssl_mode(match sslmode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        });
        let root_cert = options
            .sslrootcert
            .as_ref()
            .map(|path| env.resolve_path(path.expose()));
        let tls = match sslmode {
            SslMode::Disable => None,
            mode => Some(tls::connector(mode, root_cert.as_deref())?),
        };
        let tunnel = match options.ssh_tunnel {
            Some(tunnel) => {
                let (host, port) = single_host(&config)?;
                Some(SshTunnel::new(name, tunnel, host, port, env)?)
            }
            None => None,
        };
        let batch_rows = options.batch_rows.unwrap_or(DEFAULT_BATCH_ROWS);
        if batch_rows == 0 {
            return Err("`batch_rows` must be at least 1".into());
        }
        let unload = match (options.unload, dialect) {
            (None, _) => None,
            (Some(_), Dialect::Postgres) => {
                return Err("`unload` is for `type: redshift` sources; PostgreSQL is read with COPY".into());
            }
            (Some(unload), Dialect::Redshift) => {
                if !unload.url.expose().starts_with("s3://") {
                    return Err(format!(
                        "unload `url` must be an s3:// URL (Redshift unloads to S3), not `{}`",
                        unload.url.expose()
                    ));
                }
                Some(Unload {
                    location: UnloadLocation::open(
                        name,
                        unload.url.expose(),
                        &unload.options,
                        unload.keep_files,
                    )?,
                    iam_role: unload.iam_role.expose().to_string(),
                    region: unload.region.map(|r| r.expose().to_string()),
                })
            }
        };
        Ok(Self {
            name: name.to_string(),
            dialect,
            config,
            tls,
            batch_rows,
            tunnel,
            unload,
        })
    }

    /// The SSH tunnel this source is reached through, if any.
    pub fn tunnel(&self) -> Option<&SshTunnel> {
        self.tunnel.as_ref()
    }

    /// A new connection, through the tunnel when there is one (the `postgres` destination
    /// connects the same way).
    pub(crate) async fn connect_client(&self) -> Result<Client, SourceError> {
        self.connect().await
    }

    async fn connect(&self) -> Result<Client, SourceError> {
        let mut config = self.config.clone();
        // Through a tunnel, connect to its local end; TLS still names the database host.
        if let Some(tunnel) = &self.tunnel {
            let local = tunnel.open().await.map_err(|message| SourceError::Connect {
                source_name: self.name.clone(),
                message,
                hint: Some(crate::tunnel::HINT.into()),
            })?;
            let mut tunnelled = tokio_postgres::Config::new();
            clone_settings(&self.config, &mut tunnelled);
            if let Ok((host, _)) = single_host(&self.config) {
                tunnelled.host(&host);
            }
            tunnelled.hostaddr(local.ip());
            tunnelled.port(local.port());
            config = tunnelled;
        }
        let connect_error = |e: tokio_postgres::Error| {
            let (message, hint) = describe_error(&e, &self.config, None);
            SourceError::Connect {
                source_name: self.name.clone(),
                message,
                hint,
            }
        };
        let client = match &self.tls {
            None => open_connection(&config, NoTls).await,
            Some(tls) => open_connection(&config, tls.clone()).await,
        }
        .map_err(connect_error)?;
        Ok(client)
    }

    fn query_error(&self, model: &str, e: &tokio_postgres::Error, sql: &str) -> SourceError {
        let (message, hint) = describe_error(e, &self.config, Some(sql));
        SourceError::Query {
            model: model.to_string(),
            source_name: self.name.clone(),
            message,
            hint,
        }
    }

    /// Reads the model through a cursor, `batch_rows` rows per `FETCH`, each an extended-protocol
    /// query whose rows come in binary.
    async fn extract_with_cursor(
        &self,
        client: Client,
        query: &ModelQuery,
        sql: String,
        kinds: Vec<ColumnKind>,
        schema: Arc<Schema>,
    ) -> Result<SendableRecordBatchStream, SourceError> {
        // A newline before the end keeps a trailing `-- comment` harmless.
        client
            .batch_execute(&format!("DECLARE {CURSOR} CURSOR FOR\n{sql}\n"))
            .await
            .map_err(|e| self.query_error(&query.model, &e, &sql))?;
        let fetch = client
            .prepare(&format!("FETCH FORWARD {} FROM {CURSOR}", self.batch_rows))
            .await
            .map_err(|e| self.query_error(&query.model, &e, &sql))?;
        let (tx, rx) = mpsc::channel(2);
        let reader = CopyReader {
            model: query.model.clone(),
            source: self.name.clone(),
            schema: schema.clone(),
            kinds,
            batch_rows: self.batch_rows,
        };
        tokio::spawn(async move {
            match reader.read_cursor(&client, &fetch, &tx).await {
                Ok(()) => {
                    client
                        .batch_execute(&format!("CLOSE {CURSOR}; COMMIT"))
                        .await
                        .ok();
                }
                Err(e) => {
                    let _ = tx.send(Err(DataFusionError::External(Box::new(e)))).await;
                }
            }
        });
        Ok(super::receiver_stream(schema, rx))
    }

    /// Unloads the model to S3 as Parquet and reads the files back. The description's
    /// transaction is closed first: `UNLOAD` takes only a query (the model is wrapped in
    /// `SELECT * FROM (...)`, which also lets a model end in `LIMIT`, as `UNLOAD` otherwise
    /// refuses), so it cannot write, and it reads one consistent state on its own.
    async fn extract_with_unload(
        &self,
        unload: &Unload,
        client: Client,
        query: &ModelQuery,
        sql: String,
        schema: Arc<Schema>,
    ) -> Result<SendableRecordBatchStream, SourceError> {
        client.batch_execute("ROLLBACK").await.ok();
        let prefix = unload.location.fresh_prefix(&query.model);
        let inner = format!("SELECT * FROM (\n{sql}\n) AS sluice_unload");
        let mut statement = format!(
            "UNLOAD ({}) TO {} IAM_ROLE {} FORMAT AS PARQUET MANIFEST VERBOSE MAXFILESIZE 256 MB",
            quote_literal(&inner, true),
            quote_literal(&prefix.url, true),
            quote_literal(&unload.iam_role, true),
        );
        if let Some(region) = &unload.region {
            statement.push_str(&format!(" REGION {}", quote_literal(region, true)));
        }
        tracing::info!(model = %query.model, to = %prefix.url, "unloading the model to S3");
        if let Err(e) = client.batch_execute(&statement).await {
            unload.location.discard(&query.model, &prefix).await;
            return Err(self.query_error(&query.model, &e, &sql));
        }
        let manifest_path = prefix.path.clone().join("manifest");
        let manifest = match unload.location.get(&manifest_path).await {
            Ok(bytes) => bytes,
            Err(e) => {
                unload.location.discard(&query.model, &prefix).await;
                return Err(self.unload_error(
                    &query.model,
                    format!("reading the UNLOAD manifest {}manifest: {e}", prefix.url),
                ));
            }
        };
        let manifest: UnloadManifest = match serde_json::from_slice(&manifest) {
            Ok(manifest) => manifest,
            Err(e) => {
                unload.location.discard(&query.model, &prefix).await;
                return Err(self.unload_error(
                    &query.model,
                    format!("the UNLOAD manifest {}manifest is not one: {e}", prefix.url),
                ));
            }
        };
        let mut files = Vec::with_capacity(manifest.entries.len());
        for entry in &manifest.entries {
            match unload.location.path_of(&entry.url) {
                Ok(path) => files.push(UnloadedFile {
                    path,
                    size: entry.meta.as_ref().and_then(|m| m.content_length),
                }),
                Err(e) => {
                    unload.location.discard(&query.model, &prefix).await;
                    return Err(self.unload_error(&query.model, format!("the UNLOAD manifest names {e}")));
                }
            }
        }
        Ok(unload.location.read(UnloadRead {
            model: query.model.clone(),
            schema,
            files,
            expected_rows: manifest.meta.and_then(|m| m.record_count),
            also_delete: vec![manifest_path],
        }))
    }

    fn unload_error(&self, model: &str, message: String) -> SourceError {
        SourceError::Query {
            model: model.to_string(),
            source_name: self.name.clone(),
            message,
            hint: Some("the unload `options` must let sluice read and delete under the unload `url`".into()),
        }
    }

    /// Opens the read-only, repeatable-read transaction and describes the query's columns.
    async fn begin_and_describe(
        &self,
        query: &ModelQuery,
    ) -> Result<(Client, String, Vec<ColumnKind>, Arc<Schema>), SourceError> {
        let client = self.connect().await?;
        let sql = strip_statement_end(&query.sql).to_string();
        // Redshift runs every transaction serializable; it takes no isolation level here.
        let begin = match self.dialect {
            Dialect::Postgres => "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
            Dialect::Redshift => "BEGIN READ ONLY",
        };
        client
            .batch_execute(begin)
            .await
            .map_err(|e| self.query_error(&query.model, &e, &sql))?;
        let statement = client
            .prepare(&sql)
            .await
            .map_err(|e| self.query_error(&query.model, &e, &sql))?;
        let mut kinds = Vec::with_capacity(statement.columns().len());
        let mut fields = Vec::with_capacity(statement.columns().len());
        for column in statement.columns() {
            let Some(kind) = ColumnKind::for_type(column.type_(), column.type_modifier()) else {
                return Err(SourceError::UnsupportedType {
                    model: query.model.clone(),
                    column: column.name().to_string(),
                    database_type: type_description(column.type_(), column.type_modifier()),
                    hint: cast_hint(column.type_(), column.name()),
                });
            };
            fields.push(Field::new(column.name(), kind.data_type(), true));
            kinds.push(kind);
        }
        Ok((client, sql, kinds, Arc::new(Schema::new(fields))))
    }
}

#[async_trait]
impl Source for PostgresSource {
    fn kind(&self) -> &'static str {
        match self.dialect {
            Dialect::Postgres => "postgres",
            Dialect::Redshift => "redshift",
        }
    }

    async fn check(&self) -> Result<(), SourceError> {
        let client = self.connect().await?;
        client.simple_query("SELECT 1").await.map_err(|e| {
            let (message, hint) = describe_error(&e, &self.config, None);
            SourceError::Connect {
                source_name: self.name.clone(),
                message,
                hint,
            }
        })?;
        Ok(())
    }

    async fn check_query(&self, query: &ModelQuery) -> Result<(), SourceError> {
        let (client, sql, _, _) = self.begin_and_describe(query).await?;
        // EXPLAIN starts the executor, which checks privileges on every table the query reads.
        client
            .batch_execute(&format!("EXPLAIN {sql}"))
            .await
            .map_err(|e| self.query_error(&query.model, &e, &sql))?;
        client.batch_execute("ROLLBACK").await.ok();
        Ok(())
    }

    async fn extract(&self, query: &ModelQuery) -> Result<SendableRecordBatchStream, SourceError> {
        let (client, sql, kinds, schema) = self.begin_and_describe(query).await?;
        if let Some(unload) = &self.unload
            && query.bulk
        {
            return self.extract_with_unload(unload, client, query, sql, schema).await;
        }
        if self.dialect == Dialect::Redshift {
            return self.extract_with_cursor(client, query, sql, kinds, schema).await;
        }
        // A newline before the closing parenthesis keeps a trailing `-- comment` harmless.
        let copy = format!("COPY (\n{sql}\n) TO STDOUT (FORMAT binary)");
        let copy_stream = client
            .copy_out(copy.as_str())
            .await
            .map_err(|e| self.query_error(&query.model, &e, &sql))?;
        let (tx, rx) = mpsc::channel(2);
        let reader = CopyReader {
            model: query.model.clone(),
            source: self.name.clone(),
            schema: schema.clone(),
            kinds,
            batch_rows: self.batch_rows,
        };
        tokio::spawn(async move {
            let result = reader.read(copy_stream, &tx).await;
            match result {
                Ok(()) => {
                    client.batch_execute("COMMIT").await.ok();
                }
                Err(e) => {
                    let _ = tx.send(Err(DataFusionError::External(Box::new(e)))).await;
                }
            }
        });
        Ok(super::receiver_stream(schema, rx))
    }
}

/// Connects, and drives the connection on its own task for as long as the client lives.
async fn open_connection<T>(config: &tokio_postgres::Config, tls: T) -> Result<Client, tokio_postgres::Error>
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
    T::Stream: Send + 'static,
{
    let (client, connection) = config.connect(tls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "postgres connection closed with an error");
        }
    });
    Ok(client)
}

/// Reads the COPY stream into batches.
struct CopyReader {
    model: String,
    source: String,
    schema: Arc<Schema>,
    kinds: Vec<ColumnKind>,
    batch_rows: usize,
}

type BatchSender = mpsc::Sender<Result<RecordBatch, DataFusionError>>;

/// A field's bytes as the server sent them (binary format), for the column decoders.
struct RawField<'a>(&'a [u8]);

impl<'a> tokio_postgres::types::FromSql<'a> for RawField<'a> {
    fn from_sql(
        _: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Self(raw))
    }

    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }
}

impl CopyReader {
    async fn read(&self, copy: tokio_postgres::CopyOutStream, tx: &BatchSender) -> Result<(), SourceError> {
        let mut copy = std::pin::pin!(copy);
        let mut decoder = CopyDecoder::new(&self.kinds, self.batch_rows);
        let mut pending = BytesMut::new();
        let mut rows_before = 0u64;
        let mut finished = false;
        while !finished {
            let Some(chunk) = copy.next().await else {
                break;
            };
            let chunk =
                chunk.map_err(|e| self.error(format!("reading COPY data: {}", error_text(&e)), None))?;
            let buffered = !pending.is_empty();
            if buffered {
                pending.extend_from_slice(&chunk);
            }
            let data: &[u8] = if buffered { &pending } else { &chunk };
            let mut offset = 0;
            loop {
                let progress = decoder
                    .decode(&data[offset..], self.batch_rows)
                    .map_err(|e| self.field_error(e, rows_before + decoder.rows() as u64 + 1))?;
                match progress {
                    Progress::Finished => {
                        finished = true;
                        break;
                    }
                    Progress::Consumed(n) => offset += n,
                }
                if decoder.rows() < self.batch_rows {
                    break;
                }
                rows_before += decoder.rows() as u64;
                if !self.send(&mut decoder, tx).await? {
                    return Ok(());
                }
            }
            if buffered {
                pending.advance(offset);
            } else {
                pending.extend_from_slice(&chunk[offset..]);
            }
        }
        if !finished {
            return Err(self.error("the COPY stream ended before its trailer".into(), None));
        }
        if decoder.rows() > 0 {
            self.send(&mut decoder, tx).await?;
        }
        Ok(())
    }

    /// Fetches from the declared cursor until a fetch comes back short.
    async fn read_cursor(
        &self,
        client: &Client,
        fetch: &tokio_postgres::Statement,
        tx: &BatchSender,
    ) -> Result<(), SourceError> {
        let mut decoder = CopyDecoder::new(&self.kinds, self.batch_rows);
        let mut rows_before = 0u64;
        loop {
            let rows = client
                .query(fetch, &[])
                .await
                .map_err(|e| self.error(format!("fetching rows: {}", error_text(&e)), None))?;
            let fetched = rows.len();
            for (n, row) in rows.iter().enumerate() {
                let at = rows_before + n as u64 + 1;
                for (column, decoder) in decoder.columns.iter_mut().enumerate() {
                    let value = row
                        .try_get::<_, Option<RawField>>(column)
                        .map_err(|e| self.error(format!("row {at}: {e}"), None))?;
                    decoder
                        .push(value.map(|v| v.0))
                        .map_err(|message| self.field_error(decode::FieldError { column, message }, at))?;
                }
            }
            rows_before += fetched as u64;
            if fetched > 0 && !self.send(&mut decoder, tx).await? {
                return Ok(());
            }
            if fetched < self.batch_rows {
                return Ok(());
            }
        }
    }

    /// Sends the buffered rows; `false` when nobody is listening any more.
    async fn send(&self, decoder: &mut CopyDecoder, tx: &BatchSender) -> Result<bool, SourceError> {
        let columns = decoder.finish().map_err(|e| self.field_error(e, 0))?;
        let batch = RecordBatch::try_new(self.schema.clone(), columns)
            .map_err(|e| self.error(format!("assembling a batch: {e}"), None))?;
        Ok(tx.send(Ok(batch)).await.is_ok())
    }

    fn field_error(&self, e: decode::FieldError, row: u64) -> SourceError {
        let column = self.schema.fields().get(e.column).map(|f| f.name().as_str());
        match column {
            Some(column) => self.error(
                format!("column `{column}`, row {row}: {}", e.message),
                Some(format!(
                    "cast `{column}` in the model's SQL to a type sluice can carry"
                )),
            ),
            None => self.error(e.message, None),
        }
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

/// tokio-postgres does not know `verify-ca`/`verify-full`; take `sslmode` out of the URL.
fn split_sslmode(url: &str) -> Result<(String, Option<SslMode>), String> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), None));
    };
    let mut sslmode = None;
    let mut kept = Vec::new();
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("sslmode", value)) => sslmode = Some(value.parse()?),
            _ => kept.push(pair),
        }
    }
    let url = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((url, sslmode))
}

fn single_host(config: &tokio_postgres::Config) -> Result<(String, u16), String> {
    let host = match config.get_hosts() {
        [tokio_postgres::config::Host::Tcp(host)] => host.clone(),
        [] => return Err("set `host` or `url`".into()),
        _ => return Err("an SSH tunnel needs exactly one TCP host".into()),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    Ok((host, port))
}

fn clone_settings(from: &tokio_postgres::Config, to: &mut tokio_postgres::Config) {
    if let Some(user) = from.get_user() {
        to.user(user);
    }
    if let Some(password) = from.get_password() {
        to.password(password);
    }
    if let Some(db) = from.get_dbname() {
        to.dbname(db);
    }
    if let Some(name) = from.get_application_name() {
        to.application_name(name);
    }
    if let Some(timeout) = from.get_connect_timeout() {
        to.connect_timeout(*timeout);
    }
    to.ssl_mode(from.get_ssl_mode());
}

/// The database's own message, and a hint for the failures people hit first.
fn describe_error(
    e: &tokio_postgres::Error,
    config: &tokio_postgres::Config,
    sql: Option<&str>,
) -> (String, Option<String>) {
    let target = target(config);
    if let Some(db) = e.as_db_error() {
        let mut message = format!("{}: {}", db.severity(), db.message());
        if let Some(detail) = db.detail() {
            message.push_str(&format!(" ({detail})"));
        }
        if let (Some(position), Some(sql)) = (db.position(), sql)
            && let tokio_postgres::error::ErrorPosition::Original(pos) = position
        {
            message.push_str(&format!(" at: {}", excerpt(sql, *pos as usize)));
        }
        let code = db.code();
        let hint = if *code == SqlState::INVALID_PASSWORD
            || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
        {
            Some(format!(
                "authentication failed for user `{}`: check the user and password, and that pg_hba.conf admits this host",
                config.get_user().unwrap_or("?")
            ))
        } else if *code == SqlState::INVALID_CATALOG_NAME {
            Some(format!(
                "database `{}` does not exist on {target}: check `database` or the URL's path",
                config.get_dbname().unwrap_or("?")
            ))
        } else if *code == SqlState::INSUFFICIENT_PRIVILEGE {
            Some(format!(
                "permission denied: grant the user read access, e.g. GRANT SELECT ON <table> TO {}; GRANT USAGE ON SCHEMA <schema> TO {}",
                config.get_user().unwrap_or("<user>"),
                config.get_user().unwrap_or("<user>")
            ))
        } else if *code == SqlState::UNDEFINED_TABLE {
            Some("the table does not exist, or is in a schema not on the user's search_path: qualify it as schema.table".into())
        } else if *code == SqlState::UNDEFINED_COLUMN {
            Some("a column in the model's SQL does not exist; `sluice preview` shows the columns a query returns".into())
        } else if *code == SqlState::SYNTAX_ERROR {
            Some("the model's SQL is not valid PostgreSQL".into())
        } else if *code == SqlState::TOO_MANY_CONNECTIONS {
            Some("the server has no free connections; try again later or raise max_connections".into())
        } else {
            None
        };
        return (message, hint);
    }
    let message = error_text(e);
    let lower = message.to_lowercase();
    let hint = if lower.contains("connection refused") {
        Some(format!(
            "nothing is listening on {target}: check the host and port, and that the server is running"
        ))
    } else if lower.contains("timed out") || lower.contains("timeout") {
        Some(format!(
            "{target} did not answer in time: the host may be unreachable or firewalled"
        ))
    } else if lower.contains("failed to lookup")
        || lower.contains("name or service not known")
        || lower.contains("resolve")
    {
        Some(format!("the host name of {target} could not be resolved"))
    } else if lower.contains("certificate") || lower.contains("tls") || lower.contains("ssl") {
        Some("the TLS handshake failed: check `sslmode` and `sslrootcert` (verify-full also checks the host name)".into())
    } else if lower.contains("password missing") {
        Some("the server asks for a password: set `password` or put it in the URL (as ${ENV_VAR})".into())
    } else {
        None
    };
    (message, hint)
}

/// An error with its chain of causes, as one line.
fn error_text(e: &tokio_postgres::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn target(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "?".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}")
}

/// The SQL around a 1-based character position.
fn excerpt(sql: &str, position: usize) -> String {
    let chars: Vec<char> = sql.chars().collect();
    let at = position.saturating_sub(1).min(chars.len());
    let start = at.saturating_sub(20);
    let end = (at + 20).min(chars.len());
    let text: String = chars[start..end].iter().collect();
    format!("`{}`", text.replace('\n', " "))
}

fn type_description(ty: &tokio_postgres::types::Type, type_modifier: i32) -> String {
    if *ty == tokio_postgres::types::Type::NUMERIC && type_modifier >= 4 {
        let m = type_modifier - 4;
        return format!("numeric({}, {})", (m >> 16) & 0xffff, ((m & 0x7ff) ^ 1024) - 1024);
    }
    match ty.kind() {
        tokio_postgres::types::Kind::Array(element) => format!("{}[]", element.name()),
        _ => ty.name().to_string(),
    }
}

fn cast_hint(ty: &tokio_postgres::types::Type, column: &str) -> String {
    use tokio_postgres::types::{Kind, Type};
    let name = ty.name();
    let suggestion = match *ty {
        Type::NUMERIC | Type::NUMERIC_ARRAY => {
            format!("{column}::numeric(38, 10), or {column}::text to keep every digit")
        }
        Type::INTERVAL => format!("extract(epoch FROM {column}) for seconds, or {column}::text"),
        Type::MONEY => format!("{column}::numeric(20, 2)"),
        // Redshift's own types.
        _ if name == "super" => format!("JSON_SERIALIZE({column})"),
        _ if name == "varbyte" => format!("FROM_VARBYTE({column}, 'hex')"),
        _ if name == "geometry" || name == "geography" => format!("ST_AsText({column})"),
        _ if name == "hllsketch" => format!("HLL_CARDINALITY({column})"),
        _ => match ty.kind() {
            Kind::Array(_) => format!("array_to_json({column})::text to keep it as JSON"),
            Kind::Composite(_) | Kind::Range(_) | Kind::Multirange(_) => format!("to_json({column})::text"),
            _ => format!("{column}::text"),
        },
    };
    format!("cast it in the model's SQL, e.g. {suggestion} (type {name})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_is_taken_out_of_urls() {
        let (url, mode) = split_sslmode("postgres://u@h/db?sslmode=verify-full&application_name=x").unwrap();
        assert_eq!(url, "postgres://u@h/db?application_name=x");
        assert_eq!(mode, Some(SslMode::VerifyFull));
        let (url, mode) = split_sslmode("postgres://u@h/db").unwrap();
        assert_eq!((url.as_str(), mode), ("postgres://u@h/db", None));
        assert!(split_sslmode("postgres://u@h/db?sslmode=sometimes").is_err());
    }

    #[test]
    fn statement_ends_are_stripped_for_copy() {
        assert_eq!(strip_statement_end("SELECT 1 ;\n  "), "SELECT 1");
        assert_eq!(strip_statement_end("SELECT 1 -- note"), "SELECT 1 -- note");
    }

    #[test]
    fn unsupported_types_get_a_cast_hint() {
        use tokio_postgres::types::Type;
        assert!(cast_hint(&Type::INTERVAL, "age").contains("extract(epoch FROM age)"));
        assert!(cast_hint(&Type::INET, "ip").contains("ip::text"));
        assert_eq!(
            type_description(&Type::NUMERIC, ((50 << 16) | 2) + 4),
            "numeric(50, 2)"
        );
    }
}
