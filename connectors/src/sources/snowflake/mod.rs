//! `type: snowflake`: Snowflake, read over its drivers' protocol with results in Arrow.
//!
//! ```yaml
//! sources:
//!   warehouse:
//!     type: snowflake
//!     account: myorg-myaccount          # or the locator with its region: xy12345.us-east-1
//!     user: SLUICE
//!     private_key: ${SNOWFLAKE_PRIVATE_KEY}   # key-pair auth; or private_key_path, oauth_token, password
//!     warehouse: REPORTING_WH
//!     database: ANALYTICS
//!     schema: MARTS
//!     role: SLUICE_READER
//! ```
//!
//! A model is first compiled without running (`describeOnly`): its column types decide the Arrow
//! schema (a type sluice cannot carry fails here, naming the column), and a statement that is
//! not a query (DML, DDL, a procedure call) is refused before it runs. The query then runs; its
//! result arrives as Arrow (the first part inline, the rest as chunks on cloud storage that are
//! downloaded several at once and decoded on blocking threads), converted column by column into
//! sluice's types ([`convert`]), batch by batch: memory holds a few chunks, not the result.
//! The row count Snowflake announced is checked at the end.

pub mod convert;
pub mod protocol;

use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use futures::StreamExt;
use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;
use sluice_engine::datafusion::error::DataFusionError;
use sluice_engine::source::{
    ConnectorEnv, ModelQuery, SendableRecordBatchStream, Source, strip_statement_end,
};
use sluice_engine::{ConfigString, Secret, SourceError};
use tokio::sync::mpsc;
use url::Url;

use self::convert::{ColumnKind, RowType, schema_of};
use self::protocol::{ChunkAccess, Client, ClientConfig, Credentials, ProtocolError, QueryData, Session};
use super::unload::{UnloadLocation, UnloadPrefix, UnloadRead, UnloadedFile, quote_literal};
use crate::HumanDuration;

const DEFAULT_DOWNLOADS: usize = 4;
/// Statement types of queries (`SELECT`, `WITH ... SELECT`, `SHOW`-like reads are 0x1xxx).
const QUERY_STATEMENT_TYPES: std::ops::Range<i64> = 0x1000..0x2000;

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SnowflakeConfig {
    /// Account identifier: `orgname-accountname`, or the account locator with its region and
    /// cloud (`xy12345.us-east-1`, `xy12345.east-us-2.azure`), as in the account's URL.
    pub account: ConfigString,
    /// User to log in as.
    pub user: ConfigString,
    /// The user's RSA private key (PEM, unencrypted PKCS#8) for key-pair authentication.
    #[serde(default)]
    pub private_key: Option<Secret>,
    /// A file holding that key, instead of `private_key`.
    #[serde(default)]
    pub private_key_path: Option<ConfigString>,
    /// An OAuth access token issued by the account's security integration.
    #[serde(default)]
    pub oauth_token: Option<Secret>,
    /// The user's password (Snowflake is phasing passwords out for service users: prefer a key).
    #[serde(default)]
    pub password: Option<Secret>,
    /// Virtual warehouse that runs the models.
    #[serde(default)]
    pub warehouse: Option<ConfigString>,
    /// Default database of the session.
    #[serde(default)]
    pub database: Option<ConfigString>,
    /// Default schema of the session.
    #[serde(default)]
    pub schema: Option<ConfigString>,
    /// Role to use (default: the user's default role).
    #[serde(default)]
    pub role: Option<ConfigString>,
    /// Base URL instead of `https://<account>.snowflakecomputing.com` (private link, a proxy).
    #[serde(default)]
    pub url: Option<ConfigString>,
    /// Longest a model's query may run, e.g. `30m` (Snowflake's `STATEMENT_TIMEOUT_IN_SECONDS`;
    /// default: the account's).
    #[serde(default)]
    pub query_timeout: Option<HumanDuration>,
    /// How long to wait for a connection, e.g. `30s` (default 10s).
    #[serde(default)]
    pub connect_timeout: Option<HumanDuration>,
    /// Result chunks downloaded at once (default 4).
    #[serde(default)]
    pub download_concurrency: Option<usize>,
    /// Unload each sync's whole result as Parquet (`COPY INTO <location>`) and read it back,
    /// rather than download the result's chunks (previews and checks still read the result).
    #[serde(default)]
    pub unload: Option<SnowflakeUnload>,
}

/// Where a `snowflake` source unloads a sync's result, and how Snowflake may write there: a
/// named external stage on that location, or a storage integration for it.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SnowflakeUnload {
    /// Where sluice reads the files back: `s3://bucket/prefix/`, `gs://bucket/prefix/` or
    /// `az://container/prefix/`; the stage's own URL when `stage` is set. Each sync writes under
    /// `<url>/<model>/<time>-<id>/` and deletes its files once read.
    pub url: ConfigString,
    /// A named external stage whose URL is `url` (`ANALYTICS.PUBLIC.SLUICE_UNLOAD`); Snowflake
    /// writes through it (`COPY INTO @stage/...`).
    #[serde(default)]
    pub stage: Option<ConfigString>,
    /// Or a storage integration allowed to write to `url` (`COPY INTO 's3://...'
    /// STORAGE_INTEGRATION = ...`); S3 and GCS only (for Azure, use a stage).
    #[serde(default)]
    pub storage_integration: Option<ConfigString>,
    /// object_store options for sluice to read the files (credentials, region, endpoint).
    #[serde(default)]
    pub options: IndexMap<String, ConfigString>,
    /// Keep the files after reading them (default false: they are deleted).
    #[serde(default)]
    pub keep_files: bool,
}

/// How Snowflake writes to the unload location.
enum UnloadWriter {
    Stage(String),
    Integration(String),
}

struct Unload {
    location: UnloadLocation,
    writer: UnloadWriter,
}

impl Unload {
    fn new(source_name: &str, config: &SnowflakeUnload) -> Result<Self, String> {
        let location = UnloadLocation::open(
            source_name,
            config.url.expose(),
            &config.options,
            config.keep_files,
        )?;
        let writer = match (&config.stage, &config.storage_integration) {
            (Some(stage), None) => UnloadWriter::Stage(
                stage
                    .expose()
                    .trim()
                    .trim_start_matches('@')
                    .trim_end_matches('/')
                    .to_string(),
            ),
            (None, Some(integration)) => {
                if !matches!(location.url().scheme(), "s3" | "gs") {
                    return Err(format!(
                        "unload `storage_integration` writes to s3:// or gs:// URLs, not `{}`; for Azure, create a stage on the container and set `stage`",
                        location.url()
                    ));
                }
                UnloadWriter::Integration(integration.expose().trim().to_string())
            }
            _ => return Err("unload: set exactly one of `stage` or `storage_integration`".into()),
        };
        Ok(Self { location, writer })
    }

    /// `COPY INTO <location> FROM (<sql>) ...` writing one extraction's files under `prefix`.
    fn statement(&self, prefix: &UnloadPrefix, sql: &str) -> String {
        let target = match &self.writer {
            UnloadWriter::Stage(stage) => format!("@{stage}/{}", prefix.relative),
            UnloadWriter::Integration(integration) => {
                // Snowflake names Google Cloud Storage `gcs://`.
                let url = match prefix.url.strip_prefix("gs://") {
                    Some(rest) => format!("gcs://{rest}"),
                    None => prefix.url.clone(),
                };
                format!(
                    "{} STORAGE_INTEGRATION = {integration}",
                    quote_literal(&url, true)
                )
            }
        };
        // HEADER keeps the column names; DETAILED_OUTPUT answers a row per file with its count.
        format!(
            "COPY INTO {target} FROM (\n{sql}\n) FILE_FORMAT = (TYPE = PARQUET) HEADER = TRUE DETAILED_OUTPUT = TRUE MAX_FILE_SIZE = 268435456"
        )
    }
}

pub struct SnowflakeSource {
    name: String,
    client: Arc<Client>,
    fingerprint: Option<String>,
    downloads: usize,
    unload: Option<Unload>,
}

impl SnowflakeSource {
    pub fn new(name: &str, config: SnowflakeConfig, env: &ConnectorEnv) -> Result<Self, String> {
        let account = config.account.expose().trim().to_string();
        if account.is_empty() || account.contains('/') || account.contains(':') {
            return Err(format!(
                "`account` must be the account identifier (e.g. `myorg-myaccount` or `xy12345.us-east-1`), not `{account}`; put a full address in `url`"
            ));
        }
        let account = account.trim_end_matches(".snowflakecomputing.com").to_string();
        let base = match &config.url {
            Some(url) => url.expose().to_string(),
            None => format!("https://{account}.snowflakecomputing.com/"),
        };
        let mut base = Url::parse(&base).map_err(|e| format!("`url` is not a URL: {e}"))?;
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        let credentials = match (
            &config.private_key,
            &config.private_key_path,
            &config.oauth_token,
            &config.password,
        ) {
            (Some(key), None, None, None) => Credentials::key_pair(key.expose())?,
            (None, Some(path), None, None) => {
                let path = env.resolve_path(path.expose());
                let pem = std::fs::read_to_string(&path)
                    .map_err(|e| format!("cannot read `private_key_path` {}: {e}", path.display()))?;
                Credentials::key_pair(&pem)?
            }
            (None, None, Some(token), None) => Credentials::OAuth(token.expose().to_string()),
            (None, None, None, Some(password)) => Credentials::Password(password.expose().to_string()),
            _ => {
                return Err(
                    "set exactly one of `private_key`, `private_key_path`, `oauth_token` or `password`"
                        .into(),
                );
            }
        };
        let fingerprint = match &credentials {
            Credentials::KeyPair { fingerprint, .. } => Some(fingerprint.clone()),
            _ => None,
        };
        let text = |v: &Option<ConfigString>| v.as_ref().map(|s| s.expose().to_string());
        let client = Client::new(ClientConfig {
            base,
            account,
            user: config.user.expose().to_string(),
            credentials,
            warehouse: text(&config.warehouse),
            database: text(&config.database),
            schema: text(&config.schema),
            role: text(&config.role),
            statement_timeout: config.query_timeout.map(|d| d.0),
            connect_timeout: config.connect_timeout.map_or(Duration::from_secs(10), |d| d.0),
        })?;
        let unload = config.unload.as_ref().map(|u| Unload::new(name, u)).transpose()?;
        Ok(Self {
            name: name.to_string(),
            client: Arc::new(client),
            fingerprint,
            downloads: config.download_concurrency.unwrap_or(DEFAULT_DOWNLOADS).max(1),
            unload,
        })
    }

    async fn login(&self) -> Result<Session, SourceError> {
        self.client.login().await.map_err(|e| SourceError::Connect {
            source_name: self.name.clone(),
            hint: self.hint(&e),
            message: e.to_string(),
        })
    }

    fn query_error(&self, model: &str, e: &ProtocolError) -> SourceError {
        SourceError::Query {
            model: model.to_string(),
            source_name: self.name.clone(),
            message: e.to_string(),
            hint: self.hint(e),
        }
    }

    /// What to check for Snowflake's common refusals.
    fn hint(&self, e: &ProtocolError) -> Option<String> {
        let code = match e {
            ProtocolError::Transport(_) => {
                return Some("check `account` (or `url`) and that this machine can reach Snowflake".into());
            }
            ProtocolError::Unexpected(_) => return None,
            ProtocolError::Snowflake { code, .. } => code.as_str(),
        };
        Some(match code {
            "390100" => "check `user` and `password`".into(),
            "390144" | "394304" | "390186" => match &self.fingerprint {
                Some(fp) => format!(
                    "Snowflake refused the key-pair JWT: register the key's public half on the user (`ALTER USER <user> SET RSA_PUBLIC_KEY='...'`); sluice signs with the key whose fingerprint is {fp}, compare it with RSA_PUBLIC_KEY_FP in `DESC USER <user>`"
                ),
                None => "check the user's authentication settings".into(),
            },
            "390318" => "the OAuth access token expired: give a fresh one in `oauth_token`".into(),
            "390303" | "390302" => "the OAuth access token is not valid for this account or user".into(),
            "390189" | "390190" => {
                "the role is not granted to the user (`GRANT ROLE <role> TO USER <user>`)".into()
            }
            "390201" => {
                "the database, schema or warehouse named does not exist or is not visible to the role".into()
            }
            "000606" => "no warehouse is active: set `warehouse`, or a default warehouse on the user".into(),
            "002003" => {
                "the object does not exist, or the role may not read it: check the name and `GRANT SELECT`"
                    .into()
            }
            "001003" => "a syntax error: models run in Snowflake's SQL dialect".into(),
            "000630" => "the query ran past `query_timeout` (STATEMENT_TIMEOUT_IN_SECONDS)".into(),
            _ => return None,
        })
    }

    /// Opens a session and compiles the model without running it: the columns and whether the
    /// statement is a query.
    async fn describe(
        &self,
        query: &ModelQuery,
    ) -> Result<(Session, String, Vec<ColumnKind>, SchemaRef), SourceError> {
        let mut session = self.login().await?;
        let sql = strip_statement_end(&query.sql).to_string();
        let described = self
            .client
            .query(&mut session, &sql, true)
            .await
            .map_err(|e| self.query_error(&query.model, &e))?;
        if let Some(kind) = described.statement_type_id
            && !QUERY_STATEMENT_TYPES.contains(&kind)
        {
            return Err(SourceError::Query {
                model: query.model.clone(),
                source_name: self.name.clone(),
                message: format!(
                    "the model is not a query (Snowflake's statement type {kind:#x}); it was not run"
                ),
                hint: Some(
                    "a model is one SELECT (or WITH ... SELECT); sluice never changes the warehouse".into(),
                ),
            });
        }
        let kinds = kinds_of(&query.model, &described.rowtype)?;
        let schema = schema_of(&described.rowtype, &kinds);
        Ok((session, sql, kinds, schema))
    }
}

impl SnowflakeSource {
    /// Unloads the model as Parquet files under a fresh prefix and reads them back, checking the
    /// rows read against the per-file counts Snowflake answered.
    async fn extract_with_unload(
        &self,
        unload: &Unload,
        session: &mut Session,
        query: &ModelQuery,
        sql: &str,
        schema: SchemaRef,
    ) -> Result<SendableRecordBatchStream, SourceError> {
        let prefix = unload.location.fresh_prefix(&query.model);
        let statement = unload.statement(&prefix, sql);
        tracing::info!(model = %query.model, to = %prefix.url, "unloading the model as Parquet");
        let answered = match self.copy_answer(session, query, &statement).await {
            Ok(answered) => answered,
            Err(e) => {
                unload.location.discard(&query.model, &prefix).await;
                return Err(e);
            }
        };
        let expected_rows = match unloaded_rows(&answered) {
            Ok(rows) => rows,
            Err(message) => {
                unload.location.discard(&query.model, &prefix).await;
                return Err(self.query_error_text(&query.model, message));
            }
        };
        let files = unload
            .location
            .list(&query.model, &prefix)
            .await?
            .into_iter()
            .map(|meta| UnloadedFile {
                path: meta.location,
                size: Some(meta.size),
            })
            .collect();
        Ok(unload.location.read(UnloadRead {
            model: query.model.clone(),
            schema,
            files,
            expected_rows: Some(expected_rows),
            also_delete: Vec::new(),
        }))
    }

    /// Runs `COPY INTO <location>` and reads its small answer (a row per file written).
    async fn copy_answer(
        &self,
        session: &mut Session,
        query: &ModelQuery,
        statement: &str,
    ) -> Result<Vec<RecordBatch>, SourceError> {
        let result = self
            .client
            .query(session, statement, false)
            .await
            .map_err(|e| self.query_error(&query.model, &e))?;
        let kinds = kinds_of(&query.model, &result.rowtype)?;
        let schema = schema_of(&result.rowtype, &kinds);
        let reader = ResultReader {
            model: query.model.clone(),
            source: self.name.clone(),
            client: self.client.clone(),
            schema,
            kinds: Arc::new(kinds),
            downloads: self.downloads,
        };
        let (tx, mut rx) = mpsc::channel(16);
        let reading = async move { reader.read(result, &tx).await };
        let collecting = async {
            let mut batches = Vec::new();
            while let Some(batch) = rx.recv().await {
                batches.push(batch);
            }
            batches
        };
        let (read, batches) = tokio::join!(reading, collecting);
        read?;
        batches
            .into_iter()
            .map(|b| b.map_err(|e| self.query_error_text(&query.model, e.to_string())))
            .collect()
    }

    fn query_error_text(&self, model: &str, message: String) -> SourceError {
        SourceError::Query {
            model: model.to_string(),
            source_name: self.name.clone(),
            message,
            hint: None,
        }
    }
}

/// The rows `COPY INTO <location>` says it unloaded: the sum of `ROW_COUNT` (a row per file
/// with `DETAILED_OUTPUT`), or `ROWS_UNLOADED` (one summary row without it).
fn unloaded_rows(answer: &[RecordBatch]) -> Result<u64, String> {
    let mut rows: u64 = 0;
    for batch in answer {
        let schema = batch.schema();
        let column = ["ROW_COUNT", "ROWS_UNLOADED"]
            .iter()
            .find_map(|name| {
                schema
                    .fields()
                    .iter()
                    .position(|f| f.name().eq_ignore_ascii_case(name))
            })
            .ok_or_else(|| {
                let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                format!("COPY INTO answered columns {names:?}, without ROW_COUNT or ROWS_UNLOADED")
            })?;
        let counts = arrow::compute::cast(batch.column(column), &arrow::datatypes::DataType::UInt64)
            .map_err(|e| format!("COPY INTO's row counts: {e}"))?;
        let counts = counts
            .as_any()
            .downcast_ref::<arrow::array::UInt64Array>()
            .ok_or("COPY INTO's row counts are not numbers")?;
        rows += counts.iter().flatten().sum::<u64>();
    }
    Ok(rows)
}

fn kinds_of(model: &str, row_types: &[RowType]) -> Result<Vec<ColumnKind>, SourceError> {
    row_types
        .iter()
        .map(|row_type| {
            ColumnKind::for_row_type(row_type).map_err(|hint| SourceError::UnsupportedType {
                model: model.to_string(),
                column: row_type.name.clone(),
                database_type: row_type.describe(),
                hint,
            })
        })
        .collect()
}

#[async_trait]
impl Source for SnowflakeSource {
    fn kind(&self) -> &'static str {
        "snowflake"
    }

    async fn check(&self) -> Result<(), SourceError> {
        let mut session = self.login().await?;
        self.client
            .query(&mut session, "SELECT 1", false)
            .await
            .map_err(|e| SourceError::Connect {
                source_name: self.name.clone(),
                hint: self.hint(&e),
                message: e.to_string(),
            })?;
        Ok(())
    }

    async fn check_query(&self, query: &ModelQuery) -> Result<(), SourceError> {
        // Compiling checks that the objects exist and the role may read them.
        self.describe(query).await.map(|_| ())
    }

    async fn extract(&self, query: &ModelQuery) -> Result<SendableRecordBatchStream, SourceError> {
        let (mut session, sql, kinds, schema) = self.describe(query).await?;
        if let Some(unload) = &self.unload
            && query.bulk
        {
            return self
                .extract_with_unload(unload, &mut session, query, &sql, schema)
                .await;
        }
        let result = self
            .client
            .query(&mut session, &sql, false)
            .await
            .map_err(|e| self.query_error(&query.model, &e))?;
        let reader = ResultReader {
            model: query.model.clone(),
            source: self.name.clone(),
            client: self.client.clone(),
            schema: schema.clone(),
            kinds: Arc::new(kinds),
            downloads: self.downloads,
        };
        if result.rowtype.len() != reader.kinds.len() {
            return Err(reader.error(format!(
                "the query returned {} columns where compiling it gave {}",
                result.rowtype.len(),
                reader.kinds.len()
            )));
        }
        tracing::debug!(
            model = query.model,
            query_id = result.query_id.as_deref().unwrap_or(""),
            rows = result.total,
            chunks = result.chunks.len(),
            format = result.query_result_format.as_deref().unwrap_or(""),
            "Snowflake query finished; reading its result"
        );
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            if let Err(e) = reader.read(result, &tx).await {
                let _ = tx.send(Err(DataFusionError::External(Box::new(e)))).await;
            }
        });
        Ok(super::receiver_stream(schema, rx))
    }
}

type BatchSender = mpsc::Sender<Result<RecordBatch, DataFusionError>>;

/// Reads a finished query's result: the inline part, then the chunks in order.
struct ResultReader {
    model: String,
    source: String,
    client: Arc<Client>,
    schema: SchemaRef,
    kinds: Arc<Vec<ColumnKind>>,
    downloads: usize,
}

impl ResultReader {
    async fn read(&self, mut result: QueryData, tx: &BatchSender) -> Result<(), SourceError> {
        let arrow = result
            .query_result_format
            .as_deref()
            .is_none_or(|f| f.eq_ignore_ascii_case("arrow"));
        let mut rows = 0u64;
        let inline = if arrow {
            match result.rowset_base64.take().filter(|b| !b.trim().is_empty()) {
                Some(text) => {
                    let bytes = convert::decode_base64(&text).map_err(|e| self.error(e))?;
                    self.decode_blocking(bytes.into(), true, rows).await?
                }
                None => Vec::new(),
            }
        } else {
            match result.rowset.take() {
                Some(Value::Array(rows_json)) => self.json_batches(&rows_json, rows)?,
                _ => Vec::new(),
            }
        };
        for batch in inline {
            rows += batch.num_rows() as u64;
            if tx.send(Ok(batch)).await.is_err() {
                return Ok(());
            }
        }
        let access = ChunkAccess {
            qrmk: result.qrmk.take(),
            headers: result.chunk_headers.take(),
        };
        let starts: Vec<u64> = result
            .chunks
            .iter()
            .scan(rows, |at, chunk| {
                let start = *at;
                *at += chunk.row_count.unwrap_or(0);
                Some(start)
            })
            .collect();
        let chunk_count = result.chunks.len();
        let mut chunks = futures::stream::iter(result.chunks.into_iter().zip(starts).enumerate())
            .map(|(index, (chunk, first_row))| {
                let access = access.clone();
                async move {
                    let bytes = self
                        .client
                        .download(&chunk, &access)
                        .await
                        .map_err(|e| self.error(format!("chunk {} of {chunk_count}: {e}", index + 1)))?;
                    self.decode_blocking(bytes, arrow, first_row).await
                }
            })
            .buffered(self.downloads);
        while let Some(batches) = chunks.next().await {
            for batch in batches? {
                rows += batch.num_rows() as u64;
                if tx.send(Ok(batch)).await.is_err() {
                    return Ok(());
                }
            }
        }
        if let Some(total) = result.total
            && total != rows
        {
            return Err(self.error(format!(
                "Snowflake announced {total} rows but the result held {rows}"
            )));
        }
        Ok(())
    }

    /// Decodes and converts one part of the result on a blocking thread.
    async fn decode_blocking(
        &self,
        bytes: bytes::Bytes,
        arrow: bool,
        first_row: u64,
    ) -> Result<Vec<RecordBatch>, SourceError> {
        let schema = self.schema.clone();
        let kinds = self.kinds.clone();
        let decoded = tokio::task::spawn_blocking(move || {
            if arrow {
                decode_arrow(&bytes, &schema, &kinds)
            } else {
                // A JSON chunk is rows separated by commas, without the enclosing brackets.
                let mut text = Vec::with_capacity(bytes.len() + 2);
                text.push(b'[');
                text.extend_from_slice(&bytes);
                text.push(b']');
                let rows: Vec<Value> = serde_json::from_slice(&text)
                    .map_err(|e| format!("a JSON result chunk does not parse: {e}"))?;
                json_batch(&rows, &schema, &kinds).map(|b| vec![b])
            }
        })
        .await
        .map_err(|e| self.error(format!("decoding a result chunk: {e}")))?;
        decoded.map_err(|e| self.error(format!("{e} (in the rows from {})", first_row + 1)))
    }

    fn json_batches(&self, rows: &[Value], first_row: u64) -> Result<Vec<RecordBatch>, SourceError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        json_batch(rows, &self.schema, &self.kinds)
            .map(|b| vec![b])
            .map_err(|e| self.error(format!("{e} (in the rows from {})", first_row + 1)))
    }

    fn error(&self, message: String) -> SourceError {
        SourceError::Query {
            model: self.model.clone(),
            source_name: self.source.clone(),
            message,
            hint: None,
        }
    }
}

/// An Arrow IPC stream from Snowflake into batches of sluice's types.
fn decode_arrow(bytes: &[u8], schema: &SchemaRef, kinds: &[ColumnKind]) -> Result<Vec<RecordBatch>, String> {
    crate::sources::chunks::decode_arrow_stream(bytes, schema, |i, array| kinds[i].from_arrow(array))
}

/// JSON rows (arrays of strings and nulls) into one batch.
fn json_batch(rows: &[Value], schema: &SchemaRef, kinds: &[ColumnKind]) -> Result<RecordBatch, String> {
    let mut columns = Vec::with_capacity(kinds.len());
    for (c, (kind, field)) in kinds.iter().zip(schema.fields()).enumerate() {
        let texts: Vec<Option<String>> = rows
            .iter()
            .map(|row| match row.get(c) {
                Some(Value::Null) | None => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(other) => Some(other.to_string()),
            })
            .collect();
        let values: Vec<Option<&str>> = texts.iter().map(Option::as_deref).collect();
        let array = kind
            .from_json(&values)
            .map_err(|(row, e)| format!("column `{}`, row {} of the part: {e}", field.name(), row + 1))?;
        columns.push(array);
    }
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| e.to_string())
}
