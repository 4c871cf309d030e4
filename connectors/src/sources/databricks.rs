//! `type: databricks`: a Databricks SQL warehouse, through the SQL Statement Execution API.
//!
//! ```yaml
//! sources:
//!   lakehouse:
//!     type: databricks
//!     host: https://dbc-a1b2c3d4-e5f6.cloud.databricks.com
//!     warehouse_id: 1234567890abcdef
//!     token: ${DATABRICKS_TOKEN}          # or client_id + client_secret (OAuth M2M)
//!     catalog: main
//!     schema: marts
//! ```
//!
//! A model is first checked with `DESCRIBE QUERY`, which only a query passes: a statement that
//! would write is refused before it runs. It then runs with `disposition: EXTERNAL_LINKS` and
//! `format: ARROW_STREAM`: the statement is polled while it runs, its manifest gives the column
//! types (the Arrow schema), and its result is a list of Arrow chunks on cloud storage, each
//! link asked for just before its download (links expire), several downloaded and decoded at
//! once, in order. The row count of the manifest is checked at the end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, RecordBatch};
use arrow::compute::{CastOptions, cast_with_options};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::util::display::FormatOptions;
use async_trait::async_trait;
use futures::StreamExt;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};
use sluice_engine::datafusion::error::DataFusionError;
use sluice_engine::source::{
    ConnectorEnv, ModelQuery, SendableRecordBatchStream, Source, strip_statement_end,
};
use sluice_engine::{ConfigString, Secret, SourceError};
use tokio::sync::{Mutex, mpsc};
use url::Url;

use crate::HumanDuration;
use crate::destinations::http::{describe_reqwest_error, parse_retry_after, snippet};

const DEFAULT_DOWNLOADS: usize = 4;
/// Attempts of one API call that failed on the network, with 429 or 5xx.
const ATTEMPTS: u32 = 5;
/// How long a statement call waits before answering with a running statement.
const WAIT_TIMEOUT: &str = "30s";

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DatabricksConfig {
    /// Workspace URL, e.g. `https://dbc-a1b2c3d4-e5f6.cloud.databricks.com`.
    pub host: ConfigString,
    /// The SQL warehouse that runs the models (its HTTP path ends in `/warehouses/<id>`).
    pub warehouse_id: ConfigString,
    /// A personal access token.
    #[serde(default)]
    pub token: Option<Secret>,
    /// OAuth machine-to-machine: a service principal's client id (with `client_secret`).
    #[serde(default)]
    pub client_id: Option<ConfigString>,
    /// The service principal's OAuth secret.
    #[serde(default)]
    pub client_secret: Option<Secret>,
    /// Default catalog of the statements.
    #[serde(default)]
    pub catalog: Option<ConfigString>,
    /// Default schema of the statements.
    #[serde(default)]
    pub schema: Option<ConfigString>,
    /// Longest a model's query may run before it is cancelled, e.g. `30m` (default 2h).
    #[serde(default)]
    pub query_timeout: Option<HumanDuration>,
    /// How long to wait for a connection, e.g. `30s` (default 10s).
    #[serde(default)]
    pub connect_timeout: Option<HumanDuration>,
    /// Result chunks downloaded at once (default 4).
    #[serde(default)]
    pub download_concurrency: Option<usize>,
}

enum Auth {
    Token(String),
    ServicePrincipal {
        client_id: String,
        client_secret: String,
        /// The current access token and when to stop using it.
        cached: Mutex<Option<(String, Instant)>>,
    },
}

/// An API failure: Databricks' own error code and message, or a transport failure.
#[derive(Debug)]
struct ApiError {
    /// No answer from the workspace (or one that was not the API's).
    network: bool,
    status: Option<u16>,
    code: Option<String>,
    message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)?;
        match (&self.code, self.status) {
            (Some(code), Some(status)) => write!(f, " ({code}, HTTP {status})"),
            (Some(code), None) => write!(f, " ({code})"),
            (None, Some(status)) => write!(f, " (HTTP {status})"),
            (None, None) => Ok(()),
        }
    }
}

#[derive(Clone)]
pub struct DatabricksSource {
    name: String,
    base: Url,
    warehouse_id: String,
    catalog: Option<String>,
    schema: Option<String>,
    auth: Arc<Auth>,
    http: reqwest::Client,
    query_timeout: Duration,
    downloads: usize,
}

/// One column of a statement's manifest.
#[derive(Debug, Clone, Deserialize)]
struct ColumnInfo {
    name: String,
    #[serde(default)]
    type_name: Option<String>,
    #[serde(default)]
    type_text: Option<String>,
    #[serde(default)]
    type_precision: Option<i64>,
    #[serde(default)]
    type_scale: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
struct ExternalLink {
    chunk_index: u64,
    external_link: String,
    #[serde(default)]
    http_headers: Option<std::collections::HashMap<String, String>>,
}

impl DatabricksSource {
    pub fn new(name: &str, config: DatabricksConfig, _env: &ConnectorEnv) -> Result<Self, String> {
        let host = config.host.expose().trim();
        let host = if host.contains("://") {
            host.to_string()
        } else {
            format!("https://{host}")
        };
        let mut base = Url::parse(&host).map_err(|e| format!("`host` is not a URL: {e}"))?;
        base.set_path("/");
        let auth = match (&config.token, &config.client_id, &config.client_secret) {
            (Some(token), None, None) => Auth::Token(token.expose().to_string()),
            (None, Some(id), Some(secret)) => Auth::ServicePrincipal {
                client_id: id.expose().to_string(),
                client_secret: secret.expose().to_string(),
                cached: Mutex::new(None),
            },
            _ => return Err("set either `token`, or `client_id` with `client_secret`".into()),
        };
        let warehouse_id = config.warehouse_id.expose().trim().to_string();
        if warehouse_id.is_empty() || warehouse_id.contains('/') {
            return Err(format!(
                "`warehouse_id` is the id at the end of the warehouse's HTTP path (…/warehouses/<id>), not `{warehouse_id}`"
            ));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout.map_or(Duration::from_secs(10), |d| d.0))
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
        let text = |v: &Option<ConfigString>| v.as_ref().map(|s| s.expose().to_string());
        Ok(Self {
            name: name.to_string(),
            base,
            warehouse_id,
            catalog: text(&config.catalog),
            schema: text(&config.schema),
            auth: Arc::new(auth),
            http,
            query_timeout: config
                .query_timeout
                .map_or(Duration::from_secs(2 * 3600), |d| d.0),
            downloads: config.download_concurrency.unwrap_or(DEFAULT_DOWNLOADS).max(1),
        })
    }

    /// The bearer token: the personal access token, or a service principal's OAuth token
    /// (fetched with client credentials, renewed a minute before it expires or when refused).
    async fn bearer(&self, refresh: bool) -> Result<String, ApiError> {
        let (client_id, client_secret, cached) = match self.auth.as_ref() {
            Auth::Token(token) => return Ok(token.clone()),
            Auth::ServicePrincipal {
                client_id,
                client_secret,
                cached,
            } => (client_id, client_secret, cached),
        };
        let mut cached = cached.lock().await;
        if let Some((token, until)) = cached.as_ref()
            && !refresh
            && Instant::now() < *until
        {
            return Ok(token.clone());
        }
        let url = self.url("oidc/v1/token")?;
        let response = self
            .http
            .post(url)
            .basic_auth(client_id, Some(client_secret))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("grant_type=client_credentials&scope=all-apis")
            .send()
            .await
            .map_err(|e| transport(format!("OAuth token request: {}", describe_reqwest_error(&e))))?;
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(ApiError {
                network: false,
                status: Some(status.as_u16()),
                code: serde_json::from_str::<Value>(&body)
                    .ok()
                    .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string)),
                message: format!("the OAuth token request was refused{}", snippet(&body)),
            });
        }
        #[derive(Deserialize)]
        struct Token {
            access_token: String,
            #[serde(default)]
            expires_in: Option<u64>,
        }
        let token: Token = serde_json::from_str(&body)
            .map_err(|e| transport(format!("unexpected OAuth token answer ({e})")))?;
        let lifetime = Duration::from_secs(token.expires_in.unwrap_or(3600).saturating_sub(60).max(1));
        *cached = Some((token.access_token.clone(), Instant::now() + lifetime));
        Ok(token.access_token)
    }

    fn url(&self, path: &str) -> Result<Url, ApiError> {
        self.base
            .join(path.trim_start_matches('/'))
            .map_err(|e| transport(format!("bad API path `{path}`: {e}")))
    }

    /// Calls the API, retrying network failures, 429 (after `Retry-After`) and 5xx, and
    /// renewing an OAuth token the API refused once.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ApiError> {
        let url = self.url(path)?;
        let mut attempt = 0;
        let mut refreshed = false;
        loop {
            attempt += 1;
            let token = self.bearer(false).await?;
            let mut request = self.http.request(method.clone(), url.clone()).bearer_auth(token);
            if let Some(body) = body {
                request = request
                    .header("content-type", "application/json")
                    .body(body.to_string());
            }
            let (failure, wait) = match request.send().await {
                Ok(response) => {
                    let status = response.status();
                    let wait = response
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(parse_retry_after);
                    let text = response.text().await.unwrap_or_default();
                    if status.is_success() {
                        return serde_json::from_str(&text).map_err(|e| {
                            transport(format!("an answer that is not JSON ({e}){}", snippet(&text)))
                        });
                    }
                    let parsed: Value = serde_json::from_str(&text).unwrap_or_default();
                    let error = ApiError {
                        network: false,
                        status: Some(status.as_u16()),
                        code: parsed
                            .get("error_code")
                            .and_then(Value::as_str)
                            .map(str::to_string),
                        message: parsed
                            .get("message")
                            .and_then(Value::as_str)
                            .map_or_else(|| format!("HTTP {status}{}", snippet(&text)), str::to_string),
                    };
                    if status.as_u16() == 401
                        && matches!(*self.auth, Auth::ServicePrincipal { .. })
                        && !refreshed
                    {
                        refreshed = true;
                        self.bearer(true).await?;
                        continue;
                    }
                    if status.as_u16() != 429 && !status.is_server_error() {
                        return Err(error);
                    }
                    (error, wait)
                }
                Err(e) => (transport(describe_reqwest_error(&e)), None),
            };
            if attempt >= ATTEMPTS {
                return Err(ApiError {
                    message: format!("{} (after {attempt} attempts)", failure.message),
                    ..failure
                });
            }
            let backoff = Duration::from_millis(200 * 2u64.pow(attempt));
            tokio::time::sleep(wait.unwrap_or(backoff).min(Duration::from_secs(60))).await;
        }
    }

    /// Runs a statement and waits until it ends; the final statement response.
    async fn run_statement(&self, sql: &str) -> Result<Value, ApiError> {
        let mut body = json!({
            "statement": sql,
            "warehouse_id": self.warehouse_id,
            "disposition": "EXTERNAL_LINKS",
            "format": "ARROW_STREAM",
            "wait_timeout": WAIT_TIMEOUT,
            "on_wait_timeout": "CONTINUE",
        });
        if let Some(catalog) = &self.catalog {
            body["catalog"] = json!(catalog);
        }
        if let Some(schema) = &self.schema {
            body["schema"] = json!(schema);
        }
        let mut response = self
            .call(reqwest::Method::POST, "api/2.0/sql/statements", Some(&body))
            .await?;
        let started = Instant::now();
        let mut wait = Duration::from_millis(250);
        loop {
            let state = response["status"]["state"].as_str().unwrap_or("");
            match state {
                "SUCCEEDED" => return Ok(response),
                "PENDING" | "RUNNING" => {}
                _ => {
                    let error = &response["status"]["error"];
                    return Err(ApiError {
                        network: false,
                        status: None,
                        code: error["error_code"].as_str().map(str::to_string),
                        message: error["message"]
                            .as_str()
                            .map_or_else(|| format!("the statement ended {state}"), str::to_string),
                    });
                }
            }
            let id = response["statement_id"]
                .as_str()
                .ok_or_else(|| transport("a running statement without `statement_id`".into()))?
                .to_string();
            if started.elapsed() > self.query_timeout {
                let _ = self
                    .call(
                        reqwest::Method::POST,
                        &format!("api/2.0/sql/statements/{id}/cancel"),
                        None,
                    )
                    .await;
                return Err(ApiError {
                    network: false,
                    status: None,
                    code: None,
                    message: format!(
                        "the query ran longer than `query_timeout` ({}) and was cancelled",
                        humantime::format_duration(self.query_timeout)
                    ),
                });
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(5));
            response = self
                .call(
                    reqwest::Method::GET,
                    &format!("api/2.0/sql/statements/{id}"),
                    None,
                )
                .await?;
        }
    }

    fn hint(&self, e: &ApiError) -> Option<String> {
        let code = e.code.as_deref().unwrap_or("");
        let text = format!("{code} {}", e.message);
        Some(if e.status == Some(401) || code == "UNAUTHENTICATED" {
            match *self.auth {
                Auth::Token(_) => "check `token` (a personal access token that has not expired)".into(),
                Auth::ServicePrincipal { .. } => {
                    "check `client_id` and `client_secret` (an OAuth secret of the service principal)".into()
                }
            }
        } else if e.status == Some(403) || code == "PERMISSION_DENIED" {
            "the principal needs CAN USE on the warehouse and SELECT on what the model reads".into()
        } else if e.status == Some(404) || code == "RESOURCE_DOES_NOT_EXIST" {
            "check `warehouse_id` (the id at the end of the warehouse's HTTP path)".into()
        } else if text.contains("TABLE_OR_VIEW_NOT_FOUND") {
            "check the name: write catalog.schema.table, or set `catalog` and `schema`".into()
        } else if text.contains("PARSE_SYNTAX_ERROR") {
            "a syntax error: models run in Databricks SQL".into()
        } else if e.network {
            "check `host` and that this machine can reach the workspace".into()
        } else {
            return None;
        })
    }

    fn query_error(&self, model: &str, e: &ApiError) -> SourceError {
        SourceError::Query {
            model: model.to_string(),
            source_name: self.name.clone(),
            message: e.to_string(),
            hint: self.hint(e),
        }
    }

    /// `DESCRIBE QUERY` accepts only a query: anything that would write fails here, unrun.
    async fn check_is_query(&self, query: &ModelQuery, sql: &str) -> Result<(), SourceError> {
        let Err(e) = self.run_statement(&format!("DESCRIBE QUERY\n{sql}")).await else {
            return Ok(());
        };
        let mut error = self.query_error(&query.model, &e);
        if e.message.contains("PARSE_SYNTAX_ERROR")
            && let SourceError::Query { hint, .. } = &mut error
        {
            *hint = Some(
                "a model is one query in Databricks SQL (SELECT, WITH ... SELECT); DESCRIBE QUERY refused this one, so it was not run"
                    .into(),
            );
        }
        Err(error)
    }
}

fn transport(message: String) -> ApiError {
    ApiError {
        network: true,
        status: None,
        code: None,
        message,
    }
}

/// The Arrow type a Databricks column is carried as, or a hint saying how to cast it.
fn data_type_of(column: &ColumnInfo) -> Result<DataType, String> {
    let name = column.type_name.as_deref().unwrap_or("").to_ascii_uppercase();
    Ok(match name.as_str() {
        "BOOLEAN" => DataType::Boolean,
        "BYTE" => DataType::Int8,
        "SHORT" => DataType::Int16,
        "INT" => DataType::Int32,
        "LONG" => DataType::Int64,
        "FLOAT" => DataType::Float32,
        "DOUBLE" => DataType::Float64,
        "DECIMAL" => {
            let precision = column.type_precision.unwrap_or(10);
            let scale = column.type_scale.unwrap_or(0);
            match (u8::try_from(precision), i8::try_from(scale)) {
                (Ok(p), Ok(s)) if (1..=38).contains(&p) && (0..=p as i8).contains(&s) => {
                    DataType::Decimal128(p, s)
                }
                _ => return Err("cast it to DECIMAL(38, s) or DOUBLE".into()),
            }
        }
        "STRING" | "CHAR" | "VARCHAR" => DataType::Utf8,
        // Complex types come as their JSON text in ARROW_STREAM results.
        "ARRAY" | "STRUCT" | "MAP" | "VARIANT" => DataType::Utf8,
        "BINARY" => DataType::Binary,
        "DATE" => DataType::Date32,
        "TIMESTAMP" => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        "TIMESTAMP_NTZ" => DataType::Timestamp(TimeUnit::Microsecond, None),
        "INTERVAL" => return Err("convert it to a number in the model's SQL, e.g. seconds".into()),
        "NULL" => return Err("give it a type, e.g. CAST(NULL AS STRING)".into()),
        _ => return Err("cast it to STRING, a number or TIMESTAMP in the model's SQL".into()),
    })
}

fn convert_column(array: &ArrayRef, to: &DataType) -> Result<ArrayRef, String> {
    if array.data_type() == to {
        return Ok(array.clone());
    }
    // Arrow would print a nested value in its own notation, which is not JSON.
    if array.data_type().is_nested() {
        return Err(format!(
            "a nested value ({}) where JSON text was expected; write `to_json(col)` in the model",
            array.data_type()
        ));
    }
    let strict = CastOptions {
        safe: false,
        format_options: FormatOptions::default(),
    };
    cast_with_options(array, to, &strict).map_err(|e| {
        if array.data_type().is_nested() {
            format!(
                "a nested value ({}) where text was expected; write `to_json(col)` in the model",
                array.data_type()
            )
        } else {
            e.to_string()
        }
    })
}

#[async_trait]
impl Source for DatabricksSource {
    fn kind(&self) -> &'static str {
        "databricks"
    }

    async fn check(&self) -> Result<(), SourceError> {
        self.run_statement("SELECT 1")
            .await
            .map(|_| ())
            .map_err(|e| SourceError::Connect {
                source_name: self.name.clone(),
                hint: self.hint(&e),
                message: e.to_string(),
            })
    }

    async fn check_query(&self, query: &ModelQuery) -> Result<(), SourceError> {
        let sql = strip_statement_end(&query.sql);
        self.check_is_query(query, sql).await
    }

    async fn extract(&self, query: &ModelQuery) -> Result<SendableRecordBatchStream, SourceError> {
        let sql = strip_statement_end(&query.sql).to_string();
        self.check_is_query(query, &sql).await?;
        let response = self
            .run_statement(&sql)
            .await
            .map_err(|e| self.query_error(&query.model, &e))?;
        let error = |message: String| SourceError::Query {
            model: query.model.clone(),
            source_name: self.name.clone(),
            message,
            hint: None,
        };
        let manifest = &response["manifest"];
        if manifest["format"].as_str().is_some_and(|f| f != "ARROW_STREAM") {
            return Err(error(format!(
                "the result came as {} where ARROW_STREAM was asked for",
                manifest["format"]
            )));
        }
        if manifest["truncated"] == true {
            return Err(error(
                "Databricks truncated the result (a row or byte limit of the workspace)".into(),
            ));
        }
        let columns: Vec<ColumnInfo> = serde_json::from_value(manifest["schema"]["columns"].clone())
            .map_err(|e| error(format!("unexpected result manifest ({e})")))?;
        let mut fields = Vec::with_capacity(columns.len());
        for column in &columns {
            let data_type = data_type_of(column).map_err(|hint| SourceError::UnsupportedType {
                model: query.model.clone(),
                column: column.name.clone(),
                database_type: column
                    .type_text
                    .clone()
                    .or_else(|| column.type_name.clone())
                    .unwrap_or_else(|| "unknown".into()),
                hint,
            })?;
            fields.push(Field::new(&column.name, data_type, true));
        }
        let schema: SchemaRef = Arc::new(Schema::new(fields));
        let statement_id = response["statement_id"].as_str().unwrap_or_default().to_string();
        let chunk_count = manifest["total_chunk_count"].as_u64().unwrap_or(0);
        let total_rows = manifest["total_row_count"].as_u64();
        let first_links: Vec<ExternalLink> =
            serde_json::from_value(response["result"]["external_links"].clone()).unwrap_or_default();
        let reader = ChunkReader {
            source: Arc::new(self.clone()),
            model: query.model.clone(),
            statement_id,
            schema: schema.clone(),
            first_links,
            chunk_count,
            total_rows,
        };
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            if let Err(e) = reader.read(&tx).await {
                let _ = tx.send(Err(DataFusionError::External(Box::new(e)))).await;
            }
        });
        Ok(super::receiver_stream(schema, rx))
    }
}

type BatchSender = mpsc::Sender<Result<RecordBatch, DataFusionError>>;

/// Reads a finished statement's chunks in order.
struct ChunkReader {
    source: Arc<DatabricksSource>,
    model: String,
    statement_id: String,
    schema: SchemaRef,
    first_links: Vec<ExternalLink>,
    chunk_count: u64,
    total_rows: Option<u64>,
}

impl ChunkReader {
    async fn read(&self, tx: &BatchSender) -> Result<(), SourceError> {
        let mut rows = 0u64;
        let mut chunks = futures::stream::iter(0..self.chunk_count)
            .map(|index| async move {
                let bytes = self
                    .download(index)
                    .await
                    .map_err(|e| self.error(format!("chunk {} of {}: {e}", index + 1, self.chunk_count)))?;
                let schema = self.schema.clone();
                tokio::task::spawn_blocking(move || {
                    crate::sources::chunks::decode_arrow_stream(&bytes, &schema, |i, array| {
                        convert_column(array, schema.field(i).data_type())
                    })
                })
                .await
                .map_err(|e| self.error(format!("decoding chunk {}: {e}", index + 1)))?
                .map_err(|e| self.error(format!("chunk {}: {e}", index + 1)))
            })
            .buffered(self.source.downloads);
        while let Some(batches) = chunks.next().await {
            for batch in batches? {
                rows += batch.num_rows() as u64;
                if tx.send(Ok(batch)).await.is_err() {
                    return Ok(());
                }
            }
        }
        if let Some(total) = self.total_rows
            && total != rows
        {
            return Err(self.error(format!(
                "Databricks announced {total} rows but the result held {rows}"
            )));
        }
        Ok(())
    }

    /// A chunk's bytes: its link (from the first answer, or asked for now, as links expire),
    /// then the download, with the headers Databricks gave and never the bearer token.
    async fn download(&self, index: u64) -> Result<bytes::Bytes, String> {
        let link = match self.first_links.iter().find(|l| l.chunk_index == index) {
            Some(link) => link.clone(),
            None => {
                let answer = self
                    .source
                    .call(
                        reqwest::Method::GET,
                        &format!(
                            "api/2.0/sql/statements/{}/result/chunks/{index}",
                            self.statement_id
                        ),
                        None,
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                let links: Vec<ExternalLink> = serde_json::from_value(answer["external_links"].clone())
                    .map_err(|e| format!("unexpected chunk answer ({e})"))?;
                links
                    .into_iter()
                    .find(|l| l.chunk_index == index)
                    .ok_or_else(|| "the chunk answer holds no link for it".to_string())?
            }
        };
        let headers: Vec<(String, String)> = link.http_headers.unwrap_or_default().into_iter().collect();
        crate::sources::chunks::download(&self.source.http, &link.external_link, &headers).await
    }

    fn error(&self, message: String) -> SourceError {
        SourceError::Query {
            model: self.model.clone(),
            source_name: self.source.name.clone(),
            message,
            hint: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(type_name: &str) -> ColumnInfo {
        ColumnInfo {
            name: "c".into(),
            type_name: Some(type_name.into()),
            type_text: None,
            type_precision: Some(12),
            type_scale: Some(2),
        }
    }

    #[test]
    fn databricks_types_map_to_sluice_types() {
        assert_eq!(data_type_of(&column("LONG")).unwrap(), DataType::Int64);
        assert_eq!(
            data_type_of(&column("DECIMAL")).unwrap(),
            DataType::Decimal128(12, 2)
        );
        assert_eq!(
            data_type_of(&column("TIMESTAMP")).unwrap(),
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
        );
        assert_eq!(data_type_of(&column("ARRAY")).unwrap(), DataType::Utf8);
        assert!(data_type_of(&column("INTERVAL")).unwrap_err().contains("number"));
    }

    #[test]
    fn timestamps_in_another_zone_name_become_utc_and_nested_values_get_a_hint() {
        let utc = arrow::array::TimestampMicrosecondArray::from(vec![1_000_000]).with_timezone("Etc/UTC");
        let out = convert_column(
            &(Arc::new(utc) as ArrayRef),
            &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        )
        .unwrap();
        assert_eq!(
            out.data_type(),
            &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
        );
        let list =
            arrow::array::ListArray::from_iter_primitive::<arrow::datatypes::Int32Type, _, _>(vec![Some(
                vec![Some(1)],
            )]);
        let err = convert_column(&(Arc::new(list) as ArrayRef), &DataType::Utf8).unwrap_err();
        assert!(err.contains("to_json"), "{err}");
    }
}
