//! `type: bigquery`: Google BigQuery, through its REST API (`jobs.query`, `jobs.getQueryResults`).
//!
//! ```yaml
//! sources:
//!   bq:
//!     type: bigquery
//!     project: my-project                  # runs (and pays for) the queries
//!     service_account: ${BIGQUERY_KEY_JSON} # the key's JSON, or a path to the key file
//!     location: EU
//!     dataset: analytics                   # for unqualified table names
//! ```
//!
//! A model is first a dry run (`dryRun: true`): BigQuery answers its statement type, and only
//! `SELECT` runs, and its schema, which decides the Arrow types (a type sluice cannot carry fails
//! here, naming the column). The query then runs as a job; sluice polls it until complete and
//! reads its result page by page (`pageToken`), `page_rows` rows a page, while the previous page
//! is decoded on a blocking thread. BigQuery's REST rows are JSON (`{"f": [{"v": ...}]}`), every
//! scalar a string; timestamps are asked for as integer microseconds
//! (`formatOptions.useInt64Timestamp`), so nothing is lost to float seconds.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, ArrayRef, BinaryBuilder, RecordBatch, StringArray};
use arrow::compute::{CastOptions, cast_with_options};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef, TimeUnit};
use arrow::util::display::FormatOptions;
use async_trait::async_trait;
use base64::Engine as _;
use futures::StreamExt;
use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};
use sluice_engine::datafusion::error::DataFusionError;
use sluice_engine::source::{
    ConnectorEnv, ModelQuery, SendableRecordBatchStream, Source, strip_statement_end,
};
use sluice_engine::{ConfigString, Secret, SourceError};
use tokio::sync::mpsc;
use url::Url;

use super::bigquery_storage::StorageClient;
use super::unload::{BatchStream, UnloadLocation, UnloadRead, UnloadedFile, stream_or_error};
use crate::HumanDuration;
use crate::destinations::http::{describe_reqwest_error, parse_retry_after, snippet};
use crate::google_auth::GoogleAuth;

const SCOPE: &str = "https://www.googleapis.com/auth/bigquery";
const AUTH_HINT: &str = "check the Google credentials in `service_account` (or, without it, GOOGLE_APPLICATION_CREDENTIALS or the metadata server)";
const DEFAULT_PAGE_ROWS: u32 = 50_000;
const DEFAULT_READ_STREAMS: u32 = 4;
const STORAGE_URL: &str = "https://bigquerystorage.googleapis.com";
/// Attempts of one API call that failed on the network, with 429 or 5xx.
const ATTEMPTS: u32 = 5;
/// How long one `jobs.query` / `getQueryResults` call waits for the job.
const CALL_WAIT_MS: u64 = 10_000;

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BigQueryConfig {
    /// The project that runs (and is billed for) the queries.
    pub project: ConfigString,
    /// Google credentials: a service account key, a workload identity federation
    /// configuration (`external_account`) or `authorized_user` credentials; their JSON, or the
    /// path of their file. Without it: `GOOGLE_APPLICATION_CREDENTIALS`, else the metadata
    /// server (a VM's, GKE workload identity's, Cloud Run's service account). The principal
    /// needs `roles/bigquery.jobUser` on `project` and read access to what the models read.
    #[serde(default)]
    pub service_account: Option<Secret>,
    /// Where the jobs run, e.g. `US`, `EU`, `europe-west1` (default: where the data is).
    #[serde(default)]
    pub location: Option<ConfigString>,
    /// Dataset for unqualified table names (in `project`, or `other-project.dataset`).
    #[serde(default)]
    pub dataset: Option<ConfigString>,
    /// Rows per result page (default 50,000; BigQuery also stops a page at about 10 MB).
    #[serde(default)]
    pub page_rows: Option<u32>,
    /// Longest a model's query may run before its job is cancelled, e.g. `30m` (default 2h).
    #[serde(default)]
    pub query_timeout: Option<HumanDuration>,
    /// How long to wait for a connection, e.g. `30s` (default 10s).
    #[serde(default)]
    pub connect_timeout: Option<HumanDuration>,
    /// API root instead of `https://bigquery.googleapis.com/` (private service connect, tests).
    #[serde(default)]
    pub url: Option<ConfigString>,
    /// Export each sync's whole result to Cloud Storage as Parquet (`EXPORT DATA`) and read it
    /// back, rather than page through it (previews and checks still read pages).
    #[serde(default)]
    pub unload: Option<BigQueryUnload>,
    /// Read a sync's result through the Storage Read API (Arrow over gRPC, several streams at
    /// once) when it holds more than one page (default true). It needs
    /// `roles/bigquery.readSessionUser` on `project`; when that is refused, the result is read
    /// through pages, with a warning.
    #[serde(default)]
    pub storage_read: Option<bool>,
    /// Storage Read API streams read at once (default 4).
    #[serde(default)]
    pub read_streams: Option<u32>,
    /// The Storage Read API's address instead of `https://bigquerystorage.googleapis.com`.
    #[serde(default)]
    pub storage_url: Option<ConfigString>,
}

/// Where a `bigquery` source exports a sync's result.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BigQueryUnload {
    /// `gs://bucket/prefix/` the service account may write, list, read and delete in
    /// (`roles/storage.objectAdmin` on the bucket); each sync writes under
    /// `<url>/<model>/<time>-<id>/` and deletes its files once read. The bucket must be in the
    /// location the query runs in (or a multi-region containing it).
    pub url: ConfigString,
    /// object_store options for sluice to read the files (default: the source's service
    /// account key, as `google_service_account_key`).
    #[serde(default)]
    pub options: IndexMap<String, ConfigString>,
    /// Keep the files after reading them (default false: they are deleted).
    #[serde(default)]
    pub keep_files: bool,
}

#[derive(Clone)]
pub struct BigQuerySource {
    name: String,
    api: Url,
    project: String,
    location: Option<String>,
    dataset: Option<(String, String)>,
    page_rows: u32,
    query_timeout: Duration,
    http: reqwest::Client,
    auth: Arc<GoogleAuth>,
    unload: Option<Arc<UnloadLocation>>,
    storage: Option<StorageClient>,
    read_streams: usize,
}

/// BigQuery's error: its reason (`notFound`, `accessDenied`, `invalidQuery`, ...) and message.
#[derive(Debug)]
struct ApiError {
    status: Option<u16>,
    reason: Option<String>,
    message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)?;
        match (&self.reason, self.status) {
            (Some(reason), Some(status)) => write!(f, " ({reason}, HTTP {status})"),
            (Some(reason), None) => write!(f, " ({reason})"),
            (None, Some(status)) => write!(f, " (HTTP {status})"),
            (None, None) => Ok(()),
        }
    }
}

fn api_error_of(status: Option<u16>, body: &Value) -> ApiError {
    // `{"error": {"code", "message", "errors": [{"reason", "message"}]}}`, or a job's
    // `errorResult` / `errors[0]`.
    let error = body.get("error").unwrap_or(body);
    let first = error.get("errors").and_then(|e| e.get(0));
    ApiError {
        status,
        reason: first
            .and_then(|e| e.get("reason"))
            .or_else(|| error.get("reason"))
            .and_then(Value::as_str)
            .map(str::to_string),
        message: error
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("no message")
            .to_string(),
    }
}

/// A column as BigQuery's schema gives it.
#[derive(Debug, Clone, Deserialize)]
struct TableField {
    name: String,
    #[serde(rename = "type")]
    type_name: String,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    fields: Vec<TableField>,
    #[serde(default)]
    precision: Option<String>,
    #[serde(default)]
    scale: Option<String>,
}

impl TableField {
    fn repeated(&self) -> bool {
        self.mode.as_deref() == Some("REPEATED")
    }

    fn describe(&self) -> String {
        if self.repeated() {
            format!("ARRAY<{}>", self.type_name)
        } else {
            self.type_name.clone()
        }
    }
}

/// How a column is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A scalar parsed from its string by Arrow's cast.
    Parsed,
    /// `TIMESTAMP` as integer microseconds.
    Timestamp,
    /// `BYTES`, base64 in JSON.
    Bytes,
    /// `RECORD` or `REPEATED`: the value as JSON text.
    Json,
}

fn kind_of(field: &TableField) -> Result<(Kind, DataType), String> {
    if field.repeated() || matches!(field.type_name.as_str(), "RECORD" | "STRUCT") {
        return Ok((Kind::Json, DataType::Utf8));
    }
    Ok(match field.type_name.as_str() {
        "INTEGER" | "INT64" => (Kind::Parsed, DataType::Int64),
        "FLOAT" | "FLOAT64" => (Kind::Parsed, DataType::Float64),
        "NUMERIC" => {
            let precision = field.precision.as_deref().and_then(|p| p.parse::<u8>().ok());
            let scale = field.scale.as_deref().and_then(|s| s.parse::<i8>().ok());
            match (precision, scale) {
                (Some(p), s) if (1..=38).contains(&p) => {
                    (Kind::Parsed, DataType::Decimal128(p, s.unwrap_or(0)))
                }
                _ => (Kind::Parsed, DataType::Decimal128(38, 9)),
            }
        }
        "BIGNUMERIC" => return Err("cast it to NUMERIC or STRING in the model's SQL".into()),
        "BOOLEAN" | "BOOL" => (Kind::Parsed, DataType::Boolean),
        "STRING" | "GEOGRAPHY" | "JSON" => (Kind::Parsed, DataType::Utf8),
        "BYTES" => (Kind::Bytes, DataType::Binary),
        "DATE" => (Kind::Parsed, DataType::Date32),
        "DATETIME" => (Kind::Parsed, DataType::Timestamp(TimeUnit::Microsecond, None)),
        "TIME" => (Kind::Parsed, DataType::Time64(TimeUnit::Microsecond)),
        "TIMESTAMP" => (
            Kind::Timestamp,
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        ),
        "INTERVAL" | "RANGE" => return Err("convert it in the model's SQL, e.g. CAST(col AS STRING)".into()),
        _ => return Err("cast it to STRING, a number or TIMESTAMP in the model's SQL".into()),
    })
}

/// A `{"f": [{"v": ...}]}` value as plain JSON, by its schema (records become objects).
fn natural_json(value: &Value, field: &TableField, element: bool) -> Value {
    match value {
        Value::Null => Value::Null,
        Value::Array(items) if field.repeated() && !element => Value::Array(
            items
                .iter()
                .map(|item| natural_json(item.get("v").unwrap_or(&Value::Null), field, true))
                .collect(),
        ),
        Value::Object(object) if !field.fields.is_empty() => {
            let cells = object.get("f").and_then(Value::as_array);
            let mut out = serde_json::Map::new();
            for (i, sub) in field.fields.iter().enumerate() {
                let cell = cells
                    .and_then(|c| c.get(i))
                    .and_then(|c| c.get("v"))
                    .unwrap_or(&Value::Null);
                out.insert(sub.name.clone(), natural_json(cell, sub, false));
            }
            Value::Object(out)
        }
        Value::String(text) => match field.type_name.as_str() {
            "INTEGER" | "INT64" => text.parse::<i64>().map_or_else(|_| value.clone(), Value::from),
            "FLOAT" | "FLOAT64" => text
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
                .map_or_else(|| value.clone(), Value::Number),
            "BOOLEAN" | "BOOL" => Value::Bool(text == "true"),
            _ => value.clone(),
        },
        other => other.clone(),
    }
}

/// A cell of a REST row: strings borrowed from the page's bytes where they need no unescaping;
/// records and arrays (rare) as JSON values.
enum Cell<'a> {
    Null,
    Text(Cow<'a, str>),
    Nested(Value),
}

impl<'de: 'a, 'a> Deserialize<'de> for Cell<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CellVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de> serde::de::Visitor<'de> for CellVisitor<'de> {
            type Value = Cell<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a BigQuery cell value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Cell::Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Cell::Text(Cow::Owned(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Cell::Text(Cow::Owned(v)))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Cell::Null)
            }
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok(Cell::Null)
            }
            fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
                Ok(Cell::Text(Cow::Owned(v.to_string())))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
                Ok(Cell::Text(Cow::Owned(v.to_string())))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Cell::Text(Cow::Owned(v.to_string())))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
                Ok(Cell::Text(Cow::Owned(v.to_string())))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                Value::deserialize(serde::de::value::SeqAccessDeserializer::new(seq)).map(Cell::Nested)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                Value::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Cell::Nested)
            }
        }
        deserializer.deserialize_any(CellVisitor(std::marker::PhantomData))
    }
}

#[derive(Deserialize)]
struct RowCell<'a> {
    #[serde(borrow, default = "null_cell")]
    v: Cell<'a>,
}

fn null_cell<'a>() -> Cell<'a> {
    Cell::Null
}

#[derive(Deserialize)]
struct Row<'a> {
    #[serde(borrow)]
    f: Vec<RowCell<'a>>,
}

#[derive(Deserialize)]
struct PageRows<'a> {
    #[serde(borrow, default)]
    rows: Vec<Row<'a>>,
}

/// What a query or result answer says besides its rows.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PageHead {
    #[serde(default)]
    job_complete: Option<bool>,
    #[serde(default)]
    page_token: Option<String>,
    #[serde(default)]
    total_rows: Option<String>,
    #[serde(default)]
    job_reference: Option<JobReference>,
    #[serde(default)]
    errors: Vec<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct JobReference {
    #[serde(default)]
    job_id: Option<String>,
    #[serde(default)]
    location: Option<String>,
}

/// One answer's rows (its JSON bytes) into a batch.
fn decode_page(body: &[u8], fields: &[TableField], schema: &SchemaRef) -> Result<RecordBatch, String> {
    let page: PageRows =
        serde_json::from_slice(body).map_err(|e| format!("a result page does not parse: {e}"))?;
    let strict = CastOptions {
        safe: false,
        format_options: FormatOptions::default(),
    };
    let null = Cell::Null;
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(fields.len());
    for (c, field) in fields.iter().enumerate() {
        let cells: Vec<&Cell> = page
            .rows
            .iter()
            .map(|row| row.f.get(c).map_or(&null, |cell| &cell.v))
            .collect();
        let target = schema.field(c).data_type();
        let (kind, _) = kind_of(field)?;
        let column_error = |e: String| format!("column `{}`: {e}", field.name);
        let text = |cell: &&Cell| -> Result<Option<String>, String> {
            Ok(match cell {
                Cell::Null => None,
                Cell::Text(t) => Some(t.to_string()),
                Cell::Nested(v) => Some(v.to_string()),
            })
        };
        let array: ArrayRef = match kind {
            Kind::Json => Arc::new(StringArray::from(
                cells
                    .iter()
                    .map(|cell| match cell {
                        Cell::Null => None,
                        Cell::Nested(v) => Some(natural_json(v, field, false).to_string()),
                        Cell::Text(t) => {
                            Some(natural_json(&Value::String(t.to_string()), field, false).to_string())
                        }
                    })
                    .collect::<Vec<_>>(),
            )),
            Kind::Bytes => {
                let mut builder = BinaryBuilder::with_capacity(cells.len(), cells.len() * 16);
                for cell in &cells {
                    match text(cell)? {
                        Some(t) => builder.append_value(
                            base64::engine::general_purpose::STANDARD
                                .decode(t)
                                .map_err(|e| column_error(format!("bytes that are not base64 ({e})")))?,
                        ),
                        None => builder.append_null(),
                    }
                }
                Arc::new(builder.finish())
            }
            Kind::Parsed | Kind::Timestamp => {
                let texts: StringArray = cells
                    .iter()
                    .map(|cell| match cell {
                        Cell::Text(t) => Ok(Some(t.as_ref())),
                        Cell::Null => Ok(None),
                        Cell::Nested(v) => Err(column_error(format!(
                            "a nested value {v} where a scalar was expected"
                        ))),
                    })
                    .collect::<Result<_, String>>()?;
                let texts: ArrayRef = Arc::new(texts);
                if kind == Kind::Timestamp {
                    let micros = cast_with_options(&texts, &DataType::Int64, &strict)
                        .map_err(|e| column_error(e.to_string()))?;
                    let micros = arrow::array::AsArray::as_primitive::<Int64Type>(&micros);
                    Arc::new(
                        arrow::array::TimestampMicrosecondArray::new(
                            micros.values().clone(),
                            micros.nulls().cloned(),
                        )
                        .with_timezone("UTC"),
                    )
                } else {
                    cast_with_options(&texts, target, &strict).map_err(|e| column_error(e.to_string()))?
                }
            }
        };
        columns.push(array);
    }
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| e.to_string())
}

impl BigQuerySource {
    pub fn new(name: &str, config: BigQueryConfig, env: &ConnectorEnv) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout.map_or(Duration::from_secs(10), |d| d.0))
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
        let auth = GoogleAuth::new(
            config.service_account.as_ref().map(|s| s.expose()),
            env,
            http.clone(),
        )?;
        let unload = match &config.unload {
            Some(unload) => {
                if !unload.url.expose().starts_with("gs://") {
                    return Err(format!(
                        "unload `url` must be a gs:// URL (BigQuery exports to Cloud Storage), not `{}`",
                        unload.url.expose()
                    ));
                }
                let mut options = unload.options.clone();
                // Cloud Storage is read with the source's key unless the options name other
                // credentials; without a key, object_store asks the metadata server itself.
                if let Some(key) = auth.key_json()
                    && !options.keys().any(|k| {
                        k.starts_with("google_service_account") || k == "google_application_credentials"
                    })
                {
                    options.insert("google_service_account_key".into(), ConfigString::literal(key));
                }
                Some(Arc::new(UnloadLocation::open(
                    name,
                    unload.url.expose(),
                    &options,
                    unload.keep_files,
                )?))
            }
            None => None,
        };
        let storage = if config.storage_read.unwrap_or(true) {
            let address = config.storage_url.as_ref().map_or(STORAGE_URL, |u| u.expose());
            let address = Url::parse(address).map_err(|e| format!("`storage_url` is not a URL: {e}"))?;
            Some(StorageClient::new(&address)?)
        } else {
            None
        };
        let project = config.project.expose().trim().to_string();
        if project.is_empty() {
            return Err("`project` is empty".into());
        }
        let dataset = config.dataset.as_ref().map(|d| {
            let d = d.expose().trim();
            match d.split_once('.') {
                Some((project, dataset)) => (project.to_string(), dataset.to_string()),
                None => (project.clone(), d.to_string()),
            }
        });
        let api = config
            .url
            .as_ref()
            .map_or("https://bigquery.googleapis.com/".to_string(), |u| {
                u.expose().to_string()
            });
        let mut api = Url::parse(&api).map_err(|e| format!("`url` is not a URL: {e}"))?;
        if !api.path().ends_with('/') {
            api.set_path(&format!("{}/", api.path()));
        }
        let page_rows = config.page_rows.unwrap_or(DEFAULT_PAGE_ROWS);
        if page_rows == 0 {
            return Err("`page_rows` must be at least 1".into());
        }
        Ok(Self {
            name: name.to_string(),
            api,
            project,
            location: config.location.as_ref().map(|l| l.expose().to_string()),
            dataset,
            page_rows,
            query_timeout: config
                .query_timeout
                .map_or(Duration::from_secs(2 * 3600), |d| d.0),
            http,
            auth: Arc::new(auth),
            unload,
            storage,
            read_streams: config.read_streams.unwrap_or(DEFAULT_READ_STREAMS).max(1) as usize,
        })
    }

    fn url(&self, path: &str, query: &[(&str, String)]) -> Result<Url, ApiError> {
        let mut url = self.api.join(path).map_err(|e| ApiError {
            status: None,
            reason: None,
            message: format!("bad API path `{path}`: {e}"),
        })?;
        if !query.is_empty() {
            let mut pairs = url.query_pairs_mut();
            for (k, v) in query {
                pairs.append_pair(k, v);
            }
        }
        Ok(url)
    }

    /// Calls the API with a fresh token, retrying network failures, 429 and 5xx.
    async fn call(&self, method: reqwest::Method, url: Url, body: Option<&Value>) -> Result<Value, ApiError> {
        let bytes = self.call_raw(method, url, body).await?;
        serde_json::from_slice(&bytes).map_err(|e| ApiError {
            status: None,
            reason: None,
            message: format!(
                "an answer that is not JSON ({e}){}",
                snippet(&String::from_utf8_lossy(&bytes[..bytes.len().min(300)]))
            ),
        })
    }

    /// Calls the API and returns the answer's bytes (result pages are parsed off the runtime).
    async fn call_raw(
        &self,
        method: reqwest::Method,
        url: Url,
        body: Option<&Value>,
    ) -> Result<bytes::Bytes, ApiError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let token = self
                .auth
                .token(SCOPE, AUTH_HINT)
                .await
                .map_err(|message| ApiError {
                    status: None,
                    reason: Some("authentication".into()),
                    message,
                })?;
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
                    if status.is_success() {
                        match response.bytes().await {
                            Ok(bytes) => return Ok(bytes),
                            Err(e) => {
                                let failure = ApiError {
                                    status: None,
                                    reason: None,
                                    message: describe_reqwest_error(&e),
                                };
                                if attempt >= ATTEMPTS {
                                    return Err(failure);
                                }
                                tokio::time::sleep(Duration::from_millis(250 * 2u64.pow(attempt))).await;
                                continue;
                            }
                        }
                    }
                    let text = response.text().await.unwrap_or_default();
                    let parsed: Value = serde_json::from_str(&text).unwrap_or_default();
                    let mut error = api_error_of(Some(status.as_u16()), &parsed);
                    if parsed.is_null() {
                        error.message = format!("HTTP {status}{}", snippet(&text));
                    }
                    if status.as_u16() == 401 {
                        // A token revoked early: the next attempt fetches a new one.
                        self.auth.forget().await;
                        if attempt < 2 {
                            continue;
                        }
                    }
                    if status.as_u16() != 429 && !status.is_server_error() {
                        return Err(error);
                    }
                    (error, wait)
                }
                Err(e) => (
                    ApiError {
                        status: None,
                        reason: None,
                        message: describe_reqwest_error(&e),
                    },
                    None,
                ),
            };
            if attempt >= ATTEMPTS {
                return Err(ApiError {
                    message: format!("{} (after {attempt} attempts)", failure.message),
                    ..failure
                });
            }
            let backoff = Duration::from_millis(250 * 2u64.pow(attempt));
            tokio::time::sleep(wait.unwrap_or(backoff).min(Duration::from_secs(60))).await;
        }
    }

    fn query_request(&self, sql: &str, dry_run: bool) -> Value {
        let mut body = json!({
            "kind": "bigquery#queryRequest",
            "query": sql,
            "useLegacySql": false,
            "dryRun": dry_run,
            "maxResults": self.page_rows,
            "timeoutMs": CALL_WAIT_MS,
            "formatOptions": {"useInt64Timestamp": true},
            "requestId": uuid::Uuid::now_v7().to_string(),
        });
        if let Some(location) = &self.location {
            body["location"] = json!(location);
        }
        if let Some((project, dataset)) = &self.dataset {
            body["defaultDataset"] = json!({"projectId": project, "datasetId": dataset});
        }
        body
    }

    fn hint(&self, e: &ApiError) -> Option<String> {
        Some(match (e.reason.as_deref(), e.status) {
            (Some("authentication"), _) | (_, Some(401)) => AUTH_HINT.to_string(),
            (Some("accessDenied"), _) | (_, Some(403)) => format!(
                "{} needs roles/bigquery.jobUser on project `{}` and read access (roles/bigquery.dataViewer) to what the model reads",
                self.auth.principal(), self.project
            ),
            (Some("notFound"), _) | (_, Some(404)) => {
                "check the names: project.dataset.table, or set `dataset`; and `location` if the data is not where the job runs".into()
            }
            (Some("invalidQuery"), _) => "models run in GoogleSQL (standard SQL)".into(),
            (None, None) => "check that this machine can reach bigquery.googleapis.com".into(),
            _ => return None,
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

    /// A dry run: only a `SELECT` passes; its schema.
    async fn describe(
        &self,
        query: &ModelQuery,
    ) -> Result<(String, Vec<TableField>, SchemaRef), SourceError> {
        let sql = strip_statement_end(&query.sql).to_string();
        let url = self
            .url(&format!("bigquery/v2/projects/{}/queries", self.project), &[])
            .map_err(|e| self.query_error(&query.model, &e))?;
        let answer = self
            .call(reqwest::Method::POST, url, Some(&self.query_request(&sql, true)))
            .await
            .map_err(|e| self.query_error(&query.model, &e))?;
        let statement = answer["statementType"].as_str().unwrap_or("SELECT");
        if statement != "SELECT" {
            return Err(SourceError::Query {
                model: query.model.clone(),
                source_name: self.name.clone(),
                message: format!("the model is a {statement} statement, not a query; it was not run"),
                hint: Some(
                    "a model is one SELECT (or WITH ... SELECT); sluice never changes the warehouse".into(),
                ),
            });
        }
        let fields: Vec<TableField> =
            serde_json::from_value(answer["schema"]["fields"].clone()).map_err(|e| {
                self.query_error(
                    &query.model,
                    &ApiError {
                        status: None,
                        reason: Some("unexpected".into()),
                        message: format!("the dry run gave no schema ({e})"),
                    },
                )
            })?;
        let mut arrow_fields = Vec::with_capacity(fields.len());
        for field in &fields {
            let (_, data_type) = kind_of(field).map_err(|hint| SourceError::UnsupportedType {
                model: query.model.clone(),
                column: field.name.clone(),
                database_type: field.describe(),
                hint,
            })?;
            arrow_fields.push(Field::new(&field.name, data_type, true));
        }
        Ok((sql, fields, Arc::new(Schema::new(arrow_fields))))
    }

    /// `getQueryResults` of a job: a page (or, while `jobComplete` is false, nothing yet).
    async fn results(
        &self,
        job_id: &str,
        location: Option<&str>,
        page_token: Option<&str>,
    ) -> Result<bytes::Bytes, ApiError> {
        let mut query = vec![
            ("maxResults", self.page_rows.to_string()),
            ("timeoutMs", CALL_WAIT_MS.to_string()),
            ("formatOptions.useInt64Timestamp", "true".to_string()),
        ];
        if let Some(location) = location {
            query.push(("location", location.to_string()));
        }
        if let Some(token) = page_token {
            query.push(("pageToken", token.to_string()));
        }
        let url = self.url(
            &format!("bigquery/v2/projects/{}/queries/{job_id}", self.project),
            &query,
        )?;
        self.call_raw(reqwest::Method::GET, url, None).await
    }

    /// `EXPORT DATA` of the model to Parquet under a fresh prefix, then the files read back;
    /// the job's export statistics (files, rows) are checked against what is read.
    async fn extract_with_export(
        &self,
        unload: &UnloadLocation,
        query: &ModelQuery,
        sql: &str,
        fields: Vec<TableField>,
        schema: SchemaRef,
    ) -> Result<SendableRecordBatchStream, SourceError> {
        let prefix = unload.fresh_prefix(&query.model);
        // GoogleSQL escapes quotes in literals with a backslash; the URI holds neither anyway.
        let uri = format!("{}*.parquet", prefix.url)
            .replace('\\', "\\\\")
            .replace('\'', "\\'");
        let statement =
            format!("EXPORT DATA OPTIONS (uri = '{uri}', format = 'PARQUET', overwrite = false) AS\n{sql}\n");
        tracing::info!(model = %query.model, to = %prefix.url, "exporting the model to Cloud Storage");
        let reader = PageReader {
            source: self.clone(),
            model: query.model.clone(),
            fields: Arc::new(fields),
            schema: schema.clone(),
            bulk: false,
        };
        let exported = async {
            let url = self
                .url(&format!("bigquery/v2/projects/{}/queries", self.project), &[])
                .map_err(|e| self.query_error(&query.model, &e))?;
            let first = self
                .call_raw(
                    reqwest::Method::POST,
                    url,
                    Some(&self.query_request(&statement, false)),
                )
                .await
                .map_err(|e| self.query_error(&query.model, &e))?;
            let (job_id, location, _, _) = reader.wait(first).await?;
            let url = self
                .url(
                    &format!("bigquery/v2/projects/{}/jobs/{job_id}", self.project),
                    &location
                        .iter()
                        .map(|l| ("location", l.clone()))
                        .collect::<Vec<_>>(),
                )
                .map_err(|e| self.query_error(&query.model, &e))?;
            let job = self
                .call(reqwest::Method::GET, url, None)
                .await
                .map_err(|e| self.query_error(&query.model, &e))?;
            let statistics = &job["statistics"]["query"]["exportDataStatistics"];
            let count = |name: &str| statistics[name].as_str().and_then(|n| n.parse::<u64>().ok());
            Ok::<_, SourceError>((count("fileCount"), count("rowCount")))
        };
        let (file_count, row_count) = match exported.await {
            Ok(counts) => counts,
            Err(e) => {
                unload.discard(&query.model, &prefix).await;
                return Err(e);
            }
        };
        let files: Vec<UnloadedFile> = unload
            .list(&query.model, &prefix)
            .await?
            .into_iter()
            .map(|meta| UnloadedFile {
                path: meta.location,
                size: Some(meta.size),
            })
            .collect();
        if let Some(expected) = file_count
            && expected != files.len() as u64
        {
            unload.discard(&query.model, &prefix).await;
            return Err(reader.error(
                format!(
                    "BigQuery reported {expected} files exported, but {} are under {}",
                    files.len(),
                    prefix.url
                ),
                None,
            ));
        }
        Ok(unload.read(UnloadRead {
            model: query.model.clone(),
            schema,
            files,
            expected_rows: row_count,
            also_delete: Vec::new(),
        }))
    }

    async fn cancel(&self, job_id: &str, location: Option<&str>) {
        let query: Vec<(&str, String)> = location
            .map(|l| ("location", l.to_string()))
            .into_iter()
            .collect();
        if let Ok(url) = self.url(
            &format!("bigquery/v2/projects/{}/jobs/{job_id}/cancel", self.project),
            &query,
        ) {
            let _ = self.call(reqwest::Method::POST, url, None).await;
        }
    }
}

#[async_trait]
impl Source for BigQuerySource {
    fn kind(&self) -> &'static str {
        "bigquery"
    }

    async fn check(&self) -> Result<(), SourceError> {
        let url = self
            .url(&format!("bigquery/v2/projects/{}/queries", self.project), &[])
            .map_err(|e| SourceError::Connect {
                source_name: self.name.clone(),
                hint: None,
                message: e.to_string(),
            })?;
        self.call(
            reqwest::Method::POST,
            url,
            Some(&self.query_request("SELECT 1", true)),
        )
        .await
        .map(|_| ())
        .map_err(|e| SourceError::Connect {
            source_name: self.name.clone(),
            hint: self.hint(&e),
            message: e.to_string(),
        })
    }

    async fn check_query(&self, query: &ModelQuery) -> Result<(), SourceError> {
        self.describe(query).await.map(|_| ())
    }

    async fn extract(&self, query: &ModelQuery) -> Result<SendableRecordBatchStream, SourceError> {
        let (sql, fields, schema) = self.describe(query).await?;
        if let Some(unload) = &self.unload
            && query.bulk
        {
            return self
                .extract_with_export(unload, query, &sql, fields, schema)
                .await;
        }
        let url = self
            .url(&format!("bigquery/v2/projects/{}/queries", self.project), &[])
            .map_err(|e| self.query_error(&query.model, &e))?;
        let first = self
            .call_raw(reqwest::Method::POST, url, Some(&self.query_request(&sql, false)))
            .await
            .map_err(|e| self.query_error(&query.model, &e))?;
        let reader = PageReader {
            source: self.clone(),
            model: query.model.clone(),
            fields: Arc::new(fields),
            schema: schema.clone(),
            bulk: query.bulk,
        };
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            if let Err(e) = reader.read(first, &tx).await {
                let _ = tx.send(Err(DataFusionError::External(Box::new(e)))).await;
            }
        });
        Ok(super::receiver_stream(schema, rx))
    }
}

type BatchSender = mpsc::Sender<Result<RecordBatch, DataFusionError>>;

struct PageReader {
    source: BigQuerySource,
    model: String,
    fields: Arc<Vec<TableField>>,
    schema: SchemaRef,
    /// A sync's whole result: read through the Storage Read API when it is more than a page.
    bulk: bool,
}

impl PageReader {
    /// Polls the job the first answer names until it is complete (cancelling it past
    /// `query_timeout`): its id, location, and the answer that says it is complete.
    async fn wait(
        &self,
        mut body: bytes::Bytes,
    ) -> Result<(String, Option<String>, PageHead, bytes::Bytes), SourceError> {
        let mut head = self.head(&body)?;
        let reference = head.job_reference.take().unwrap_or_default();
        let job_id = reference
            .job_id
            .ok_or_else(|| self.error("the query answer has no job id".into(), None))?;
        let location = reference.location;
        let started = Instant::now();
        while head.job_complete != Some(true) {
            if let Some(first) = head.errors.first() {
                let e = api_error_of(None, &json!({"errors": head.errors, "message": first["message"]}));
                return Err(self.error(e.to_string(), self.source.hint(&e)));
            }
            if started.elapsed() > self.source.query_timeout {
                self.source.cancel(&job_id, location.as_deref()).await;
                return Err(self.error(
                    format!(
                        "the query ran longer than `query_timeout` ({}); its job {job_id} was cancelled",
                        humantime::format_duration(self.source.query_timeout)
                    ),
                    None,
                ));
            }
            body = self.page(&job_id, location.as_deref(), None).await?;
            head = self.head(&body)?;
        }
        if let Some(first) = head.errors.first() {
            let e = api_error_of(None, &json!({"errors": head.errors, "message": first["message"]}));
            return Err(self.error(e.to_string(), self.source.hint(&e)));
        }
        Ok((job_id, location, head, body))
    }

    fn head(&self, body: &[u8]) -> Result<PageHead, SourceError> {
        // Only the fields named: the rows are skipped here and parsed on a blocking thread.
        serde_json::from_slice(body)
            .map_err(|e| self.error(format!("an answer that does not parse: {e}"), None))
    }

    /// Waits for the job, then reads its pages in order, decoding one while fetching the next.
    async fn read(&self, body: bytes::Bytes, tx: &BatchSender) -> Result<(), SourceError> {
        let (job_id, location, mut head, mut body) = self.wait(body).await?;
        let total: Option<u64> = head.total_rows.as_deref().and_then(|t| t.parse().ok());
        if self.bulk
            && let Some(storage) = &self.source.storage
            && total.is_some_and(|t| t > u64::from(self.source.page_rows))
            && self
                .read_storage(storage, &job_id, location.as_deref(), total, tx)
                .await?
        {
            return Ok(());
        }
        let mut rows_read = 0u64;
        loop {
            let next_token = head.page_token.take();
            let fields = self.fields.clone();
            let schema = self.schema.clone();
            let page = body.clone();
            let decode = tokio::task::spawn_blocking(move || decode_page(&page, &fields, &schema));
            let next = async {
                match &next_token {
                    Some(token) => self
                        .page(&job_id, location.as_deref(), Some(token))
                        .await
                        .map(Some),
                    None => Ok(None),
                }
            };
            let (decoded, next) = tokio::join!(decode, next);
            let batch = decoded
                .map_err(|e| self.error(format!("decoding a page: {e}"), None))?
                .map_err(|e| self.error(format!("{e} (in the rows from {})", rows_read + 1), None))?;
            rows_read += batch.num_rows() as u64;
            if batch.num_rows() > 0 && tx.send(Ok(batch)).await.is_err() {
                return Ok(());
            }
            match next? {
                Some(page) => {
                    head = self.head(&page)?;
                    body = page;
                }
                None => break,
            }
        }
        if let Some(total) = total
            && total != rows_read
        {
            return Err(self.error(
                format!("BigQuery announced {total} rows but the pages held {rows_read}"),
                None,
            ));
        }
        Ok(())
    }

    /// Reads the job's result table through the Storage Read API, `read_streams` streams at
    /// once. `false` when the API refused the session (a permission not granted): nothing was
    /// sent, and the pages are read instead.
    async fn read_storage(
        &self,
        storage: &StorageClient,
        job_id: &str,
        location: Option<&str>,
        total: Option<u64>,
        tx: &BatchSender,
    ) -> Result<bool, SourceError> {
        let source = &self.source;
        let api_error = |e: ApiError| self.error(e.to_string(), source.hint(&e));
        let query: Vec<(&str, String)> = location
            .map(|l| ("location", l.to_string()))
            .into_iter()
            .collect();
        let url = source
            .url(
                &format!("bigquery/v2/projects/{}/jobs/{job_id}", source.project),
                &query,
            )
            .map_err(api_error)?;
        // A query's result lives in an anonymous table the job names; the session reads it.
        let job = source
            .call(reqwest::Method::GET, url, None)
            .await
            .map_err(api_error)?;
        let destination = &job["configuration"]["query"]["destinationTable"];
        let (Some(project), Some(dataset), Some(table)) = (
            destination["projectId"].as_str(),
            destination["datasetId"].as_str(),
            destination["tableId"].as_str(),
        ) else {
            return Err(self.error(
                format!("the job {job_id} names no destination table to read"),
                None,
            ));
        };
        let table = format!("projects/{project}/datasets/{dataset}/tables/{table}");
        let token = source
            .auth
            .token(SCOPE, AUTH_HINT)
            .await
            .map_err(|message| self.error(message, Some(AUTH_HINT.into())))?;
        let session = match storage
            .create_session(&token, &source.project, &table, source.read_streams as i32)
            .await
        {
            Ok(session) => session,
            Err(e) if matches!(e.code, tonic::Code::PermissionDenied | tonic::Code::Unimplemented) => {
                tracing::warn!(
                    model = %self.model,
                    error = %e,
                    "the Storage Read API refused a read session; reading the result through pages (grant roles/bigquery.readSessionUser on the project for the faster read)"
                );
                return Ok(false);
            }
            Err(e) => return Err(self.error(e.to_string(), None)),
        };
        let schema_message = session
            .arrow_schema
            .map(|s| s.serialized_schema)
            .ok_or_else(|| self.error("the read session has no Arrow schema".into(), None))?;
        tracing::debug!(model = %self.model, streams = session.streams.len(), %table, "reading the result through the Storage Read API");
        // Owned pieces only: the pipeline is boxed as a 'static stream.
        let auth = source.auth.clone();
        let client = storage.clone();
        let schema = self.schema.clone();
        let opens = session.streams.into_iter().map(move |stream| {
            let (auth, client, schema, schema_message) = (
                auth.clone(),
                client.clone(),
                schema.clone(),
                schema_message.clone(),
            );
            async move {
                let token = auth.token(SCOPE, AUTH_HINT).await?;
                client
                    .read_stream(&token, &stream.name, schema_message, schema)
                    .await
                    .map_err(|e| e.to_string())
            }
        });
        let streams: BatchStream = futures::stream::iter(opens)
            .buffer_unordered(source.read_streams)
            .map(stream_or_error)
            .flatten_unordered(source.read_streams)
            .boxed();
        futures::pin_mut!(streams);
        let mut rows = 0u64;
        while let Some(batch) = streams.next().await {
            let batch = batch.map_err(|message| self.error(message, None))?;
            rows += batch.num_rows() as u64;
            if tx.send(Ok(batch)).await.is_err() {
                return Ok(true);
            }
        }
        if let Some(total) = total
            && total != rows
        {
            return Err(self.error(
                format!("BigQuery announced {total} rows but the read session's streams held {rows}"),
                None,
            ));
        }
        Ok(true)
    }

    async fn page(
        &self,
        job_id: &str,
        location: Option<&str>,
        token: Option<&str>,
    ) -> Result<bytes::Bytes, SourceError> {
        self.source
            .results(job_id, location, token)
            .await
            .map_err(|e| self.error(e.to_string(), self.source.hint(&e)))
    }

    fn error(&self, message: String, hint: Option<String>) -> SourceError {
        SourceError::Query {
            model: self.model.clone(),
            source_name: self.source.name.clone(),
            message,
            hint,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(name: &str, type_name: &str) -> TableField {
        TableField {
            name: name.into(),
            type_name: type_name.into(),
            mode: Some("NULLABLE".into()),
            fields: Vec::new(),
            precision: None,
            scale: None,
        }
    }

    #[test]
    fn rows_of_strings_become_typed_columns() {
        let mut tags = field("tags", "STRING");
        tags.mode = Some("REPEATED".into());
        let mut address = field("address", "RECORD");
        address.fields = vec![field("city", "STRING"), field("zip", "INTEGER")];
        let fields = vec![
            field("id", "INTEGER"),
            field("amount", "NUMERIC"),
            field("seen", "TIMESTAMP"),
            field("day", "DATE"),
            field("at", "DATETIME"),
            field("ok", "BOOLEAN"),
            field("raw", "BYTES"),
            tags,
            address,
        ];
        let arrow_fields: Vec<Field> = fields
            .iter()
            .map(|f| Field::new(&f.name, kind_of(f).unwrap().1, true))
            .collect();
        let schema = Arc::new(Schema::new(arrow_fields));
        let rows = vec![
            json!({"f": [
                {"v": "42"}, {"v": "12.5"}, {"v": "1700000000123456"}, {"v": "2024-02-29"},
                {"v": "2024-02-29T12:00:00.5"}, {"v": "true"}, {"v": "AP8="},
                {"v": [{"v": "a"}, {"v": "b"}]}, {"v": {"f": [{"v": "Paris"}, {"v": "75001"}]}}
            ]}),
            json!({"f": [
                {"v": "-1"}, {"v": null}, {"v": null}, {"v": null}, {"v": null}, {"v": null}, {"v": null},
                {"v": []}, {"v": null}
            ]}),
        ];
        let body = json!({"rows": rows}).to_string();
        let batch = decode_page(body.as_bytes(), &fields, &schema).unwrap();
        let formatted = arrow::util::pretty::pretty_format_batches(&[batch])
            .unwrap()
            .to_string();
        for expected in [
            "42",
            "12.500000000",
            "2023-11-14T22:13:20.123456Z",
            "2024-02-29T12:00:00.500",
            "[\"a\",\"b\"]",
            "{\"city\":\"Paris\",\"zip\":75001}",
            "00ff",
        ] {
            assert!(formatted.contains(expected), "{expected} not in\n{formatted}");
        }
    }

    #[test]
    fn values_that_do_not_parse_name_their_column() {
        let fields = vec![field("id", "INTEGER")];
        let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, true)]));
        let body = json!({"rows": [{"f": [{"v": "x"}]}]}).to_string();
        let err = decode_page(body.as_bytes(), &fields, &schema).unwrap_err();
        assert!(err.contains("column `id`"), "{err}");
        assert!(
            kind_of(&field("b", "BIGNUMERIC"))
                .unwrap_err()
                .contains("NUMERIC")
        );
    }
}
