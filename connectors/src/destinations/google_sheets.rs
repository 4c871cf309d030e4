//! `type: google_sheets`: a sheet kept equal to the model, through the Sheets API v4 with a
//! service account.
//!
//! ```yaml
//! destinations:
//!   sheets:
//!     type: google_sheets
//!     service_account: ${GOOGLE_SERVICE_ACCOUNT_JSON}   # the key file's JSON (or a path to it)
//! mappings:
//!   users_sheet:
//!     model: users
//!     destination: sheets
//!     options: { spreadsheet_id: 1AbCdEf..., sheet: Users }
//!     fields: { email: email, plan: plan }
//! ```
//!
//! Share the spreadsheet with the service account's `client_email`. Row 1 is the header: the
//! model's key column(s), then the mapped fields. Each record is one row, found by its key in
//! column A: changed records are rewritten in place, added ones appended (the grid grows as
//! needed), deleted ones removed (the default mode is `mirror`). Cells are written `RAW`;
//! nested values as JSON text. Requests are paced at one a second (the per-user quota is 60
//! writes a minute).

use std::collections::HashMap;
use std::ops::Range;
use std::time::Duration;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};
use sluice_engine::DestinationError;
use sluice_engine::destination::{
    ActionSpec, DeliveryPolicy, Destination, DestinationWriter, OutgoingBatch, PayloadShape, PreparedRequest,
    RecordAction, RunInfo, SendOutcome, SyncMode,
};
use sluice_engine::json::encode_column;
use sluice_engine::source::ConnectorEnv;
use tokio::sync::Mutex;

use crate::destinations::http::{
    DeliverySettings, HttpAnswer, HttpDelivery, VendorLimits, classify, describe_reqwest_error,
};
use crate::google_auth::GoogleAuth;

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SheetsConfig {
    /// Google credentials: a service account key (or an `external_account` or
    /// `authorized_user` credential), its JSON text or the path of its file. Without it:
    /// `GOOGLE_APPLICATION_CREDENTIALS`, else the metadata server.
    #[serde(default)]
    pub service_account: Option<sluice_engine::Secret>,
    /// The Sheets API (a test server, a proxy).
    #[serde(default)]
    pub url: Option<sluice_engine::ConfigString>,
    #[serde(default)]
    pub delivery: DeliverySettings,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SheetOptions {
    spreadsheet_id: String,
    #[serde(default = "default_sheet")]
    sheet: String,
}

fn default_sheet() -> String {
    "Sheet1".into()
}

fn parse_options(options: &serde_json::Map<String, Value>) -> Result<SheetOptions, String> {
    serde_json::from_value(Value::Object(options.clone()))
        .map_err(|e| format!("Google Sheets mapping `options`: {e} (it takes `spreadsheet_id` and `sheet`)"))
}

const AUTH_HINT: &str = "check the Google credentials, and share the spreadsheet with the service account's client_email as an editor";
const SCOPE: &str = "https://www.googleapis.com/auth/spreadsheets";

pub struct SheetsDestination {
    name: String,
    api: reqwest::Url,
    delivery: HttpDelivery,
    auth: std::sync::Arc<GoogleAuth>,
}

impl SheetsDestination {
    pub fn new(name: &str, config: SheetsConfig, env: &ConnectorEnv) -> Result<Self, String> {
        let api = config
            .url
            .as_ref()
            .map_or("https://sheets.googleapis.com".to_string(), |u| {
                u.expose().to_string()
            });
        let delivery = HttpDelivery::new(
            &config.delivery,
            VendorLimits {
                max_records: 1000,
                per_action: Vec::new(),
                max_bytes: 2 * 1024 * 1024,
                max_record_bytes: None,
                // Rows are found by position: one request at a time.
                concurrency: 1,
                rate: Some((1, Duration::from_secs(1))),
                gzip: false,
            },
        )?;
        if delivery.policy.concurrency != 1 {
            return Err(
                "`delivery.concurrency` must be 1 for Google Sheets: rows are addressed by position".into(),
            );
        }
        Ok(Self {
            name: name.to_string(),
            api: super::http::parse_url_option("url", &api)?,
            auth: std::sync::Arc::new(GoogleAuth::new(
                config.service_account.as_ref().map(|s| s.expose()),
                env,
                delivery.client.clone(),
            )?),
            delivery,
        })
    }

    async fn token(&self) -> Result<String, String> {
        self.auth.token(SCOPE, AUTH_HINT).await
    }
}

#[async_trait]
impl Destination for SheetsDestination {
    fn kind(&self) -> &'static str {
        "google_sheets"
    }

    fn action(
        &self,
        action: Option<&str>,
        options: &serde_json::Map<String, Value>,
    ) -> Result<Option<ActionSpec>, String> {
        if let Some(action) = action
            && action != "rows"
        {
            return Err(format!(
                "unknown action `{action}`; the google_sheets destination keeps rows of a sheet (`rows`, the default)"
            ));
        }
        parse_options(options)?;
        Ok(Some(
            ActionSpec::new("rows", PayloadShape::default())
                .modes(&[SyncMode::Mirror, SyncMode::Upsert])
                .deletes(),
        ))
    }

    async fn check(&self) -> Result<(), DestinationError> {
        self.token()
            .await
            .map(|_| ())
            .map_err(|message| DestinationError::Unreachable {
                destination: self.name.clone(),
                message,
            })
    }

    async fn open(&self, run: &RunInfo) -> Result<Box<dyn DestinationWriter>, DestinationError> {
        let options = parse_options(&run.options).map_err(|message| DestinationError::Config {
            destination: self.name.clone(),
            message,
        })?;
        Ok(Box::new(SheetsWriter {
            api: self.api.clone(),
            options,
            key_header: run.primary_key.join(","),
            client: self.delivery.client.clone(),
            policy: self.delivery.policy.clone(),
            auth: self.auth.clone(),
            sheet: Mutex::new(None),
        }))
    }
}

/// Where the sheet's rows are.
struct SheetIndex {
    sheet_id: i64,
    row_count: usize,
    /// Record key (column A) -> 1-based row number.
    rows: HashMap<String, usize>,
    /// The first empty row after the data.
    next_row: usize,
    header_written: bool,
}

struct SheetsWriter {
    api: reqwest::Url,
    options: SheetOptions,
    key_header: String,
    client: reqwest::Client,
    policy: DeliveryPolicy,
    auth: std::sync::Arc<GoogleAuth>,
    sheet: Mutex<Option<SheetIndex>>,
}

/// Each record's cells: its key as text, then its fields (nested values as JSON text).
fn rows_of(batch: &OutgoingBatch, range: Range<usize>) -> Result<Vec<(String, Vec<Value>)>, String> {
    let fields = batch.fields.slice(range.start, range.len());
    let columns = fields
        .columns()
        .iter()
        .map(encode_column)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let mut rows = Vec::with_capacity(range.len());
    for (n, i) in range.enumerate() {
        let key = key_text(batch.keys.get(i));
        let mut cells = vec![Value::String(key.clone())];
        for column in &columns {
            let fragment = column.get(n);
            cells.push(match fragment.first() {
                Some(b'{') | Some(b'[') => Value::String(String::from_utf8_lossy(fragment).into_owned()),
                _ => serde_json::from_slice(fragment).unwrap_or(Value::Null),
            });
        }
        rows.push((key, cells));
    }
    Ok(rows)
}

/// The key as the text in column A: a single key's value, or the key object's JSON.
fn key_text(key: &[u8]) -> String {
    let parsed: Value = serde_json::from_slice(key).unwrap_or(Value::Null);
    match parsed.as_object() {
        Some(map) if map.len() == 1 => match map.values().next() {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        },
        _ => String::from_utf8_lossy(key).into_owned(),
    }
}

impl SheetsWriter {
    fn quoted_sheet(&self) -> String {
        format!("'{}'", self.options.sheet.replace('\'', "''"))
    }

    /// `<api>/v4/spreadsheets/<id><suffix>`; a sheet name in the suffix is percent-encoded by
    /// the URL parser where it must be.
    fn url(&self, suffix: &str) -> Result<reqwest::Url, SendOutcome> {
        let text = format!(
            "{}/v4/spreadsheets/{}{suffix}",
            self.api.as_str().trim_end_matches('/'),
            self.options.spreadsheet_id
        );
        reqwest::Url::parse(&text).map_err(|e| SendOutcome::Fatal {
            reason: format!("{text} is not a valid URL: {e}"),
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        url: reqwest::Url,
        body: Option<&Value>,
    ) -> Result<Value, SendOutcome> {
        let token = self
            .auth
            .token(SCOPE, AUTH_HINT)
            .await
            .map_err(|reason| SendOutcome::Fatal { reason })?;
        let mut request = self.client.request(method, url).bearer_auth(token);
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let response = request.send().await.map_err(|e| SendOutcome::Retry {
            reason: format!("Google Sheets: {}", describe_reqwest_error(&e)),
            after: None,
        })?;
        let answer = HttpAnswer {
            status: response.status(),
            headers: response.headers().clone(),
            body: response.text().await.unwrap_or_default(),
        };
        if answer.status.is_success() {
            return Ok(serde_json::from_str(&answer.body).unwrap_or(Value::Null));
        }
        if answer.status.as_u16() == 401 {
            self.auth.forget().await;
        }
        Err(classify("Google Sheets", &answer, AUTH_HINT))
    }

    /// Reads the sheet's id, size and column A.
    async fn load(&self) -> Result<SheetIndex, SendOutcome> {
        let mut url = self.url("")?;
        url.query_pairs_mut().append_pair("fields", "sheets.properties");
        let meta = self.call(reqwest::Method::GET, url, None).await?;
        let properties = meta["sheets"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| &s["properties"])
            .find(|p| p["title"] == self.options.sheet.as_str())
            .ok_or_else(|| SendOutcome::Fatal {
                reason: format!(
                    "the spreadsheet has no sheet named `{}`; create it or set `options.sheet`",
                    self.options.sheet
                ),
            })?;
        let sheet_id = properties["sheetId"].as_i64().unwrap_or(0);
        let row_count = properties["gridProperties"]["rowCount"].as_u64().unwrap_or(1000) as usize;
        let column = self
            .call(
                reqwest::Method::GET,
                self.url(&format!("/values/{}!A:A", self.quoted_sheet()))?,
                None,
            )
            .await?;
        let keys: Vec<String> = column["values"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|row| row.get(0).and_then(Value::as_str).unwrap_or_default().to_string())
            .collect();
        let rows = keys
            .iter()
            .enumerate()
            .skip(1)
            .filter(|(_, k)| !k.is_empty())
            .map(|(i, k)| (k.clone(), i + 1))
            .collect();
        Ok(SheetIndex {
            sheet_id,
            row_count,
            rows,
            next_row: keys.len().max(1) + 1,
            header_written: !keys.is_empty(),
        })
    }

    fn header(&self, batch: &OutgoingBatch) -> Vec<Value> {
        std::iter::once(Value::String(self.key_header.clone()))
            .chain(
                batch
                    .fields
                    .schema()
                    .fields()
                    .iter()
                    .map(|f| Value::String(f.name().clone())),
            )
            .collect()
    }

    /// The values update writing `rows` (existing ones in place, new ones appended from
    /// `next_row`), with the header when the sheet is new.
    fn update_body(
        &self,
        index: &SheetIndex,
        batch: &OutgoingBatch,
        rows: &[(String, Vec<Value>)],
    ) -> (Value, Vec<String>) {
        let sheet = self.quoted_sheet();
        let mut data = Vec::new();
        if !index.header_written {
            data.push(json!({"range": format!("{sheet}!A1"), "majorDimension": "ROWS", "values": [self.header(batch)]}));
        }
        let mut appended = Vec::new();
        let mut new_rows = Vec::new();
        for (key, cells) in rows {
            match index.rows.get(key) {
                Some(row) => data.push(
                    json!({"range": format!("{sheet}!A{row}"), "majorDimension": "ROWS", "values": [cells]}),
                ),
                None => {
                    appended.push(key.clone());
                    new_rows.push(Value::Array(cells.clone()));
                }
            }
        }
        if !new_rows.is_empty() {
            data.push(json!({"range": format!("{sheet}!A{}", index.next_row), "majorDimension": "ROWS", "values": new_rows}));
        }
        (json!({"valueInputOption": "RAW", "data": data}), appended)
    }

    async fn write(&self, batch: &OutgoingBatch, range: Range<usize>) -> Result<(), SendOutcome> {
        let mut guard = self.sheet.lock().await;
        if guard.is_none() {
            *guard = Some(self.load().await?);
        }
        let Some(index) = guard.as_mut() else {
            return Err(SendOutcome::Retry {
                reason: "the sheet is not loaded".into(),
                after: None,
            });
        };
        let rows = rows_of(batch, range.clone()).map_err(|reason| SendOutcome::Rejected { reason })?;
        if batch.actions[range.start] == RecordAction::Delete {
            let mut doomed: Vec<usize> = rows
                .iter()
                .filter_map(|(key, _)| index.rows.get(key).copied())
                .collect();
            if doomed.is_empty() {
                return Ok(());
            }
            // Bottom first, so earlier deletions do not move later ones.
            doomed.sort_unstable_by(|a, b| b.cmp(a));
            let requests: Vec<Value> = doomed
                .iter()
                .map(|row| json!({"deleteDimension": {"range": {"sheetId": index.sheet_id, "dimension": "ROWS", "startIndex": row - 1, "endIndex": *row}}}))
                .collect();
            self.call(
                reqwest::Method::POST,
                self.url(":batchUpdate")?,
                Some(&json!({"requests": requests})),
            )
            .await?;
            for row in &doomed {
                index.rows.retain(|_, r| r != row);
                for r in index.rows.values_mut() {
                    if *r > *row {
                        *r -= 1;
                    }
                }
            }
            index.next_row -= doomed.len();
            index.row_count -= doomed.len();
            return Ok(());
        }
        let (body, appended) = self.update_body(index, batch, &rows);
        let needed = index.next_row - 1 + appended.len();
        if needed > index.row_count {
            let grow = json!({"requests": [{"appendDimension": {"sheetId": index.sheet_id, "dimension": "ROWS", "length": needed - index.row_count}}]});
            self.call(reqwest::Method::POST, self.url(":batchUpdate")?, Some(&grow))
                .await?;
            index.row_count = needed;
        }
        self.call(
            reqwest::Method::POST,
            self.url("/values:batchUpdate")?,
            Some(&body),
        )
        .await?;
        index.header_written = true;
        for key in appended {
            index.rows.insert(key, index.next_row);
            index.next_row += 1;
        }
        Ok(())
    }
}

#[async_trait]
impl DestinationWriter for SheetsWriter {
    fn policy(&self) -> DeliveryPolicy {
        self.policy.clone()
    }

    async fn prepare(&self, batch: &OutgoingBatch, range: Range<usize>) -> Vec<PreparedRequest> {
        // Without reading the sheet, every row shows as appended after the header.
        let index = SheetIndex {
            sheet_id: 0,
            row_count: 0,
            rows: HashMap::new(),
            next_row: 2,
            header_written: false,
        };
        let body = match rows_of(batch, range.clone()) {
            Ok(rows) if batch.actions[range.start] == RecordAction::Delete => {
                json!({"delete rows with keys": rows.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>()})
            }
            Ok(rows) => self.update_body(&index, batch, &rows).0,
            Err(e) => json!({"error": e}),
        };
        vec![PreparedRequest {
            method: "POST".into(),
            target: self
                .url("/values:batchUpdate")
                .map(|u| u.to_string())
                .unwrap_or_default(),
            records: range.len(),
            body,
        }]
    }

    async fn send(&self, batch: &OutgoingBatch, range: Range<usize>) -> SendOutcome {
        match self.write(batch, range).await {
            Ok(()) => SendOutcome::Accepted,
            Err(outcome) => {
                // After a failed write the sheet may have moved: read it again next time.
                *self.sheet.lock().await = None;
                outcome
            }
        }
    }

    async fn finish(self: Box<Self>) -> Result<(), DestinationError> {
        Ok(())
    }
}
