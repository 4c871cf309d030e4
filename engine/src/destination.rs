//! The `Destination` trait that connectors implement, and the batches they are given.
//!
//! A destination only turns records into requests and requests' answers into per-record results.
//! Batching, concurrency, retries with backoff and the bookkeeping of what failed live once, in
//! [`crate::delivery`], for every destination.

use std::num::NonZeroU32;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use async_trait::async_trait;
use chrono::{DateTime, Utc};

use serde::{Deserialize, Serialize};

use crate::config::Op;
use crate::error::DestinationError;
use crate::json::JsonColumn;

/// What a run tells a destination when it opens a session.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub run_id: String,
    pub mapping: String,
    pub model: String,
    pub started_at: DateTime<Utc>,
    /// The model's primary key columns.
    pub primary_key: Vec<String>,
    /// The mapping's action (`identify`, `track`, ...), for destinations that offer several.
    pub action: Option<String>,
    pub mode: SyncMode,
    /// The mapping's destination-specific `options`, as written.
    pub options: serde_json::Map<String, serde_json::Value>,
    /// Compute requests without sending them (`sluice run --dry-run`, `preview-payload`):
    /// the writer must not connect anywhere or leave anything behind.
    pub dry_run: bool,
}

/// How a mapping writes records its destination already has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// Create records that are missing, update those that exist.
    #[default]
    Upsert,
    /// Only update records that exist; never create one.
    Update,
    /// Only create records (added rows).
    Insert,
    /// Upsert, and delete records that left the model.
    Mirror,
}

impl SyncMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncMode::Upsert => "upsert",
            SyncMode::Update => "update",
            SyncMode::Insert => "insert",
            SyncMode::Mirror => "mirror",
        }
    }

    /// The changes a mapping in this mode sends when its `send` is not given.
    pub fn default_send(self) -> Vec<Op> {
        match self {
            SyncMode::Upsert | SyncMode::Update => vec![Op::Added, Op::Updated],
            SyncMode::Insert => vec![Op::Added],
            SyncMode::Mirror => vec![Op::Added, Op::Updated, Op::Deleted],
        }
    }

    /// What a change becomes in this mode.
    pub fn action_for(self, op: Op) -> RecordAction {
        match (self, op) {
            (_, Op::Deleted) => RecordAction::Delete,
            (SyncMode::Update, _) => RecordAction::Update,
            (SyncMode::Insert, _) => RecordAction::Insert,
            (SyncMode::Upsert | SyncMode::Mirror, _) => RecordAction::Upsert,
        }
    }
}

impl std::fmt::Display for SyncMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a destination is asked to do with one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordAction {
    /// Create or update.
    Upsert,
    /// Update only if it exists (mode `update`, or a row whose `_update` column is true).
    Update,
    /// Create.
    Insert,
    /// Remove.
    Delete,
}

impl RecordAction {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordAction::Upsert => "upsert",
            RecordAction::Update => "update",
            RecordAction::Insert => "insert",
            RecordAction::Delete => "delete",
        }
    }
}

/// A model column that, when it is true for a row, makes that row an update only.
pub const UPDATE_FLAG_COLUMN: &str = "_update";

/// How a value is written into a payload (`as:` of a mapped field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ValueFormat {
    /// Text holding JSON, sent as the JSON value it holds (an object, not a string).
    Json,
    /// Any value as a JSON string.
    String,
    /// A timestamp, date or ISO 8601 text as integer milliseconds since the Unix epoch.
    UnixMs,
    /// The same, in whole seconds.
    UnixSeconds,
    /// A timestamp, date or ISO 8601 text as RFC 3339 in UTC (`2026-12-01T14:35:00Z`); a
    /// timestamp without a time zone is taken as UTC, an integer as Unix seconds.
    Rfc3339,
    /// Personal data as the ad platforms take it: normalised, then the lowercase hex SHA-256;
    /// the raw value is never sent (see [`crate::pii`]). Trimmed and lower case.
    Sha256,
    /// An email address, trimmed and lower case.
    Sha256Email,
    /// The same, and for `gmail.com` and `googlemail.com` addresses without dots or a `+tag`
    /// in the local part, as Google's formatting guide asks.
    Sha256EmailGoogle,
    /// A phone number in E.164 (`+16505551212`), as Google and TikTok hash it.
    Sha256Phone,
    /// The same digits without `+` (`16505551212`), as Meta and Snapchat hash it.
    Sha256PhoneDigits,
    /// A first or last name: lower case, no punctuation.
    Sha256Name,
    /// A city: lower case letters only.
    Sha256City,
    /// A state or region: lower case letters only.
    Sha256State,
    /// A postal code: lower case, no spaces; a US ZIP+4 keeps its first five digits.
    Sha256Zip,
    /// A two-letter ISO 3166-1 country code, lower case.
    Sha256Country,
    /// `f` or `m`.
    Sha256Gender,
    /// A date of birth as `YYYYMMDD` (from a date column or text).
    Sha256DateOfBirth,
}

/// What one action of a destination writes, so the engine can compile mappings for it.
#[derive(Debug, Clone)]
pub struct ActionSpec {
    pub name: String,
    /// Modes the action supports; the first is the default.
    pub modes: Vec<SyncMode>,
    /// Whether deleted records can be sent.
    pub deletes: bool,
    /// Each record is an event that cannot be updated: changed rows are sent again as new
    /// events only when `send` lists `updated`, and the default `send` is `[added]`.
    pub events: bool,
    pub shape: PayloadShape,
}

impl ActionSpec {
    pub fn new(name: &str, shape: PayloadShape) -> Self {
        Self {
            name: name.to_string(),
            modes: vec![SyncMode::Upsert],
            deletes: false,
            events: false,
            shape,
        }
    }

    pub fn modes(mut self, modes: &[SyncMode]) -> Self {
        self.modes = modes.to_vec();
        self
    }

    pub fn deletes(mut self) -> Self {
        self.deletes = true;
        self
    }

    pub fn events(mut self) -> Self {
        self.events = true;
        self
    }
}

/// The layout of a destination's record: which fields sit at the top level, where every other
/// field goes, and what each record must carry.
#[derive(Debug, Clone, Default)]
pub struct PayloadShape {
    /// Top-level fields the destination defines (`userId`, `context`, ...). A mapped field whose
    /// first name part is one of these (or is the container) stays where it was written.
    pub top_level: Vec<String>,
    /// Where every other field goes (`traits`, `properties`); `None` keeps them at the top.
    pub container: Option<String>,
    /// Model column names taken as a top-level field when that field is not mapped explicitly
    /// (`user_id` -> `userId`).
    pub aliases: Vec<(String, String)>,
    /// Fields every record carries (`type: identify`), first in the record.
    pub fixed: Vec<(String, serde_json::Value)>,
    /// The field that carries the deterministic message id unless the mapping fills it.
    pub message_id: Option<String>,
    /// Fields of which a record needs at least one with a value (`userId` or `anonymousId`); a
    /// record without is a failed record. Also what [`OutgoingBatch::ids`] holds.
    pub identity: Vec<String>,
    /// Fields the mapping must fill, by a column or a constant (`event` for `track`).
    pub required: Vec<String>,
    /// Formats applied to fields mapped without an explicit `as:` (Mixpanel's `time` in ms).
    pub formats: Vec<(String, ValueFormat)>,
}

impl PayloadShape {
    pub fn top_level(mut self, names: &[&str]) -> Self {
        self.top_level = names.iter().map(|s| s.to_string()).collect();
        self
    }
    pub fn container(mut self, name: &str) -> Self {
        self.container = Some(name.to_string());
        self
    }
    pub fn alias(mut self, column: &str, field: &str) -> Self {
        self.aliases.push((column.to_string(), field.to_string()));
        self
    }
    pub fn fixed(mut self, field: &str, value: serde_json::Value) -> Self {
        self.fixed.push((field.to_string(), value));
        self
    }
    pub fn message_id(mut self, field: &str) -> Self {
        self.message_id = Some(field.to_string());
        self
    }
    pub fn identity(mut self, fields: &[&str]) -> Self {
        self.identity = fields.iter().map(|s| s.to_string()).collect();
        self
    }
    pub fn required(mut self, fields: &[&str]) -> Self {
        self.required = fields.iter().map(|s| s.to_string()).collect();
        self
    }
    pub fn format(mut self, field: &str, format: ValueFormat) -> Self {
        self.formats.push((field.to_string(), format));
        self
    }
    /// Formats of several fields (the customer information a platform takes hashed); a field
    /// without one is sent as it is.
    pub fn formats(mut self, formats: &[(&str, Option<ValueFormat>)]) -> Self {
        for (field, format) in formats {
            if let Some(format) = format {
                self.formats.push((field.to_string(), *format));
            }
        }
        self
    }
}

/// How the delivery layer should batch and pace requests to a destination.
#[derive(Debug, Clone)]
pub struct DeliveryPolicy {
    /// Records per request at most.
    pub max_records: usize,
    /// Lower limits for some actions (a vendor whose delete endpoint takes 50 ids, or one).
    pub max_records_by_action: Vec<(RecordAction, usize)>,
    /// Approximate payload bytes per request at most.
    pub max_bytes: usize,
    /// The destination's own limit on one record's size in bytes (Segment's 32 KB); a record
    /// over it fails alone, unsent.
    pub max_record_bytes: Option<usize>,
    /// Requests in flight at once.
    pub concurrency: usize,
    pub retry: RetryPolicy,
    /// Requests per period, shared by every run that uses the destination in this process.
    pub rate_limit: Option<RateLimit>,
}

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts per request, the first included. Rate-limited attempts do not count.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// How long one request may wait in total on a destination that keeps rate limiting it.
    pub max_rate_limited_wait: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            max_rate_limited_wait: Duration::from_secs(15 * 60),
        }
    }
}

impl Default for DeliveryPolicy {
    fn default() -> Self {
        Self {
            max_records: 500,
            max_records_by_action: Vec::new(),
            max_bytes: 4 * 1024 * 1024,
            max_record_bytes: None,
            concurrency: 4,
            retry: RetryPolicy::default(),
            rate_limit: None,
        }
    }
}

impl DeliveryPolicy {
    /// Records per request for records of `action`.
    pub fn max_records_for(&self, action: RecordAction) -> usize {
        self.max_records_by_action
            .iter()
            .find(|(a, _)| *a == action)
            .map_or(self.max_records, |(_, n)| (*n).min(self.max_records))
            .max(1)
    }
}

type Limiter = governor::DefaultDirectRateLimiter;

/// A request rate limit (a token bucket), shared by clones.
#[derive(Clone)]
pub struct RateLimit {
    pub requests: u32,
    pub per: Duration,
    limiter: Arc<Limiter>,
}

impl RateLimit {
    /// `requests` per `per`, in bursts of up to `requests`. `None` when either is zero.
    pub fn new(requests: u32, per: Duration) -> Option<Self> {
        let burst = NonZeroU32::new(requests)?;
        if per.is_zero() {
            return None;
        }
        let quota = governor::Quota::with_period(per / requests)?.allow_burst(burst);
        Some(Self {
            requests,
            per,
            limiter: Arc::new(governor::RateLimiter::direct(quota)),
        })
    }

    /// Waits until one more request is allowed.
    pub async fn acquire(&self) {
        self.limiter.until_ready().await;
    }
}

impl std::fmt::Debug for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} requests per {:?}", self.requests, self.per)
    }
}

/// The canonical text of a UUID (`8-4-4-4-12` lower-case hex digits).
pub fn uuid_text(bytes: &[u8; 16]) -> [u8; 36] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = [0u8; 36];
    let mut pos = 0;
    for (i, byte) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            text[pos] = b'-';
            pos += 1;
        }
        text[pos] = HEX[(byte >> 4) as usize];
        text[pos + 1] = HEX[(byte & 0xf) as usize];
        pos += 2;
    }
    text
}

/// A message id: a UUID-formatted digest of the mapping, the record's key, its row hash and its
/// operation, so a record sent twice is the same message to a destination that de-duplicates.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MessageId([u8; 36]);

impl MessageId {
    pub fn new(mapping: &str, key_json: &[u8], row_hash: u64, op: Op) -> Self {
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        hasher.update(b"sluice-message-v1\0");
        hasher.update(mapping.as_bytes());
        hasher.update(&[0]);
        hasher.update(key_json);
        hasher.update(&[0]);
        hasher.update(&row_hash.to_le_bytes());
        hasher.update(&[op as u8]);
        let mut digest = hasher.digest128().to_be_bytes();
        // Shape it as an RFC 9562 version 8 (custom) UUID.
        digest[6] = (digest[6] & 0x0f) | 0x80;
        digest[8] = (digest[8] & 0x3f) | 0x80;
        Self(uuid_text(&digest))
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits and dashes are ever written.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Debug for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Records ready to send, column-oriented: row `i` of every member is record `i`.
#[derive(Debug, Clone)]
pub struct OutgoingBatch {
    pub ops: Vec<Op>,
    /// What the destination should do with each record (from the op, the mapping's mode and
    /// the row's `_update` column).
    pub actions: Vec<RecordAction>,
    pub message_ids: Vec<MessageId>,
    /// The record's primary key as a JSON object (`{"id":42}`).
    pub keys: JsonColumn,
    /// The mapped record as a JSON object, nested by dotted field names, laid out as the
    /// destination's action wants it (see [`PayloadShape`]); empty for every record when the
    /// session reads [`Payload::Columns`].
    pub bodies: JsonColumn,
    /// The record's identifying fields (the action's [`PayloadShape::identity`]) as a JSON
    /// object in the same layout (`{"userId":"u1"}`); `{}` when the action has none; empty
    /// when the session reads [`Payload::Columns`].
    pub ids: JsonColumn,
    /// The mapped fields as Arrow columns named by destination field (dotted names kept flat),
    /// constants included, for destinations that write columns (CSV, Parquet, databases).
    pub fields: RecordBatch,
}

/// One record of an [`OutgoingBatch`].
#[derive(Debug, Clone, Copy)]
pub struct RecordRef<'a> {
    pub op: Op,
    pub action: RecordAction,
    pub message_id: &'a MessageId,
    pub key: &'a [u8],
    pub body: &'a [u8],
    pub ids: &'a [u8],
}

impl RecordRef<'_> {
    /// Appends the record as sluice's JSON envelope, the shape the `webhook` and `file`
    /// destinations send: `{"op":"added","message_id":"…","key":{…},"data":{…}}`.
    pub fn write_envelope(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"op\":\"");
        out.extend_from_slice(self.op.as_str().as_bytes());
        out.extend_from_slice(b"\",\"message_id\":\"");
        out.extend_from_slice(self.message_id.as_str().as_bytes());
        out.extend_from_slice(b"\",\"key\":");
        out.extend_from_slice(self.key);
        out.extend_from_slice(b",\"data\":");
        out.extend_from_slice(self.body);
        out.push(b'}');
    }
}

impl OutgoingBatch {
    /// A batch of no records (for requests that carry none, and tests).
    pub fn empty() -> Self {
        Self {
            ops: Vec::new(),
            actions: Vec::new(),
            message_ids: Vec::new(),
            keys: Default::default(),
            bodies: Default::default(),
            ids: Default::default(),
            fields: RecordBatch::new_empty(std::sync::Arc::new(arrow::datatypes::Schema::empty())),
        }
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn record(&self, i: usize) -> RecordRef<'_> {
        RecordRef {
            op: self.ops[i],
            action: self.actions[i],
            message_id: &self.message_ids[i],
            key: self.keys.get(i),
            body: self.bodies.get(i),
            ids: self.ids.get(i),
        }
    }

    pub fn records(&self, range: Range<usize>) -> impl Iterator<Item = RecordRef<'_>> {
        range.map(|i| self.record(i))
    }

    /// Record `i` as JSON for people to read (a failed record's payload): its body, or, when
    /// bodies were not rendered ([`Payload::Columns`]), its mapped fields.
    pub fn readable_record(&self, i: usize) -> std::borrow::Cow<'_, [u8]> {
        let body = self.bodies.get(i);
        if !body.is_empty() {
            return std::borrow::Cow::Borrowed(body);
        }
        match crate::json::encode_rows(&self.fields.slice(i, 1)) {
            Ok(row) if row.len() == 1 => std::borrow::Cow::Owned(row.get(0).to_vec()),
            _ => std::borrow::Cow::Borrowed(b"null"),
        }
    }

    /// The records at `indices`, in that order, as a batch of their own.
    pub fn select(&self, indices: &[usize]) -> Result<OutgoingBatch, arrow::error::ArrowError> {
        let mut keys = JsonColumn::with_capacity(indices.len(), 0);
        let mut bodies = JsonColumn::with_capacity(indices.len(), 0);
        let mut ids = JsonColumn::with_capacity(indices.len(), 0);
        for &i in indices {
            keys.push(self.keys.get(i));
            bodies.push(self.bodies.get(i));
            ids.push(self.ids.get(i));
        }
        let take = arrow::array::UInt32Array::from_iter_values(indices.iter().map(|&i| i as u32));
        Ok(OutgoingBatch {
            ops: indices.iter().map(|&i| self.ops[i]).collect(),
            actions: indices.iter().map(|&i| self.actions[i]).collect(),
            message_ids: indices.iter().map(|&i| self.message_ids[i]).collect(),
            keys,
            bodies,
            ids,
            fields: arrow::compute::take_record_batch(&self.fields, &take)?,
        })
    }

    /// Record indices grouped by action, in order of first appearance: a request carries one
    /// action (upserts and deletes go to different endpoints).
    pub fn action_groups(&self) -> Vec<(RecordAction, Vec<usize>)> {
        let mut groups: Vec<(RecordAction, Vec<usize>)> = Vec::new();
        for (i, action) in self.actions.iter().enumerate() {
            match groups.iter_mut().find(|(a, _)| a == action) {
                Some((_, indices)) => indices.push(i),
                None => groups.push((*action, vec![i])),
            }
        }
        groups
    }

    /// Record `i`'s identity field at dotted `path` as text (strings as they are, other values
    /// as JSON); `None` when it is null or absent.
    pub fn identity_text(&self, i: usize, path: &str) -> Result<Option<String>, String> {
        let ids: serde_json::Value = serde_json::from_slice(self.ids.get(i))
            .map_err(|e| format!("internal: identity of record {i} is not JSON: {e}"))?;
        let mut value = &ids;
        for part in path.split('.') {
            match value.get(part) {
                Some(inner) => value = inner,
                None => return Ok(None),
            }
        }
        Ok(match value {
            serde_json::Value::Null => None,
            serde_json::Value::String(s) => Some(s.clone()),
            other => Some(other.to_string()),
        })
    }

    /// Approximate JSON size of records `range`, to keep requests under a byte limit.
    pub fn approximate_bytes(&self, range: Range<usize>) -> usize {
        self.bodies.bytes_of(range.clone()) + self.keys.bytes_of(range.clone()) + range.len() * 80
    }
}

/// One record a destination refused, by its index within the request's range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordFailure {
    pub index: usize,
    pub error: String,
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq)]
pub enum SendOutcome {
    /// Every record was accepted.
    Accepted,
    /// The request went through but these records were refused; the rest were accepted.
    Partial(Vec<RecordFailure>),
    /// Nothing was accepted, and trying the same request again may work (unavailable, timed
    /// out, connection lost). `after` is the destination's own hint (`Retry-After`).
    Retry { reason: String, after: Option<Duration> },
    /// Nothing was accepted because the destination is rate limiting: wait and send again.
    /// Does not count as a failed attempt.
    RateLimited { reason: String, after: Option<Duration> },
    /// The destination refused the request for its content as a whole (HTTP 400, 413, 422):
    /// one record may be the cause, so the delivery layer splits the request to find it.
    Invalid { reason: String },
    /// Nothing was accepted because of these records (the vendor named them: Google's field
    /// violations, TikTok's `Batch.N`): they fail, and the request's other records are sent
    /// again without them. Naming no record in the request, it is [`SendOutcome::Invalid`].
    RefusedBecauseOf(Vec<RecordFailure>),
    /// Nothing was accepted and the same records will fail again however they are sent.
    Rejected { reason: String },
    /// Nothing can be delivered in this run (credentials refused, the object does not exist):
    /// the run stops, and every record it did not deliver is sent by the next run.
    Fatal { reason: String },
}

/// One request as a destination would send it, for dry runs and test records.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PreparedRequest {
    /// `POST`, `PATCH`, ... or what the destination does instead (`COPY`, `WRITE`).
    pub method: String,
    /// URL (without credentials), table or file.
    pub target: String,
    /// Records the request carries.
    pub records: usize,
    /// The body, as sent.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub body: serde_json::Value,
}

/// A destination type's connection, built from its config by a connector.
#[async_trait]
pub trait Destination: Send + Sync + 'static {
    /// The `type` in `sluice.yaml`.
    fn kind(&self) -> &'static str;

    /// The action a mapping asks for (`action:` and `options:` in the mapping), checked. `None`
    /// for destinations that write sluice's envelope (every change with its op), which take no
    /// `action`, `mode` or `options`.
    fn action(
        &self,
        action: Option<&str>,
        options: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Option<ActionSpec>, String> {
        if let Some(action) = action {
            return Err(format!(
                "destination type `{}` has no actions (got `action: {action}`); it sends every change with its operation",
                self.kind()
            ));
        }
        if let Some(key) = options.keys().next() {
            return Err(format!(
                "destination type `{}` takes no mapping `options` (got `{key}`)",
                self.kind()
            ));
        }
        Ok(None)
    }

    /// Checks the destination can be reached with its credentials.
    async fn check(&self) -> Result<(), DestinationError>;

    /// Starts delivering one run's records.
    async fn open(&self, run: &RunInfo) -> Result<Box<dyn DestinationWriter>, DestinationError>;

    /// Whether every session of this destination acknowledges its records only when it
    /// finishes ([`DestinationWriter::acknowledges_at_finish`]). A run that sends every row as
    /// added (a first run, a full resync) then delivers while the model is extracted, and
    /// finishes the session only once the snapshot has committed.
    fn acknowledges_at_finish(&self) -> bool {
        false
    }
}

/// What a destination session reads of each record, besides its op, action, key and
/// message id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Payload {
    /// The record as JSON ([`OutgoingBatch::bodies`] and [`OutgoingBatch::ids`]) and its
    /// mapped fields.
    #[default]
    Json,
    /// Only the mapped fields as Arrow columns ([`OutgoingBatch::fields`]): files and tables.
    /// The JSON bodies and identities are then never rendered (each record's is empty), which
    /// is most of the CPU a batch costs before it is sent.
    Columns,
}

/// One run's session with a destination.
#[async_trait]
pub trait DestinationWriter: Send + Sync {
    /// Batching, pacing and retries for this session's requests.
    fn policy(&self) -> DeliveryPolicy {
        DeliveryPolicy::default()
    }

    /// What this session's requests are made of.
    fn payload(&self) -> Payload {
        Payload::Json
    }

    /// The requests [`Self::send`] would make for records `range`, without making them.
    async fn prepare(&self, batch: &OutgoingBatch, range: Range<usize>) -> Vec<PreparedRequest> {
        let records: Vec<serde_json::Value> = batch
            .records(range.clone())
            .map(|record| {
                let mut text = Vec::new();
                record.write_envelope(&mut text);
                serde_json::from_slice(&text).unwrap_or(serde_json::Value::Null)
            })
            .collect();
        vec![PreparedRequest {
            method: "SEND".into(),
            target: String::new(),
            records: range.len(),
            body: serde_json::Value::Array(records),
        }]
    }

    /// Sends records `range` of `batch` in one request (one attempt; the delivery layer
    /// retries). Indexes in a [`SendOutcome::Partial`] are relative to `range.start`.
    async fn send(&self, batch: &OutgoingBatch, range: Range<usize>) -> SendOutcome;

    /// Whether records reach the destination only when the session finishes (a file that
    /// becomes visible once complete), not when [`DestinationWriter::send`] accepts them. The
    /// run then has no commit points before its end: one cut short delivered nothing, and the
    /// next run sends every record again.
    fn acknowledges_at_finish(&self) -> bool {
        false
    }

    /// Completes the session. Records count as delivered only once this succeeds; a
    /// destination that buffers (files) makes its output visible here.
    async fn finish(self: Box<Self>) -> Result<(), DestinationError>;

    /// Abandons the session after a failed run: nothing it buffered should become visible.
    async fn abort(self: Box<Self>) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_are_deterministic_uuids() {
        let a = MessageId::new("m", br#"{"id":1}"#, 42, Op::Added);
        assert_eq!(a, MessageId::new("m", br#"{"id":1}"#, 42, Op::Added));
        assert_ne!(a, MessageId::new("m", br#"{"id":1}"#, 43, Op::Added));
        assert_ne!(a, MessageId::new("m", br#"{"id":1}"#, 42, Op::Updated));
        assert_ne!(a, MessageId::new("n", br#"{"id":1}"#, 42, Op::Added));
        let text = a.to_string();
        assert_eq!(text.len(), 36);
        assert_eq!(&text[14..15], "8", "{text}");
        assert_eq!(text.matches('-').count(), 4);
        // Pinned: changing it would make destinations see re-sent records as new messages.
        assert_eq!(text, "056301ff-1c1d-845e-8669-6a96d1cd6a10");
    }
}
