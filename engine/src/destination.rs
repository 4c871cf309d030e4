//! The `Destination` trait that connectors implement, and the batches they are given.
//!
//! A destination only turns records into requests and requests' answers into per-record results.
//! Batching, concurrency, retries with backoff and the bookkeeping of what failed live once, in
//! [`crate::delivery`], for every destination.

use std::ops::Range;
use std::time::Duration;

use arrow::array::RecordBatch;
use async_trait::async_trait;
use chrono::{DateTime, Utc};

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
}

/// How the delivery layer should batch and pace requests to a destination.
#[derive(Debug, Clone)]
pub struct DeliveryPolicy {
    /// Records per request at most.
    pub max_records: usize,
    /// Approximate payload bytes per request at most.
    pub max_bytes: usize,
    /// Requests in flight at once.
    pub concurrency: usize,
    pub retry: RetryPolicy,
}

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }
}

impl Default for DeliveryPolicy {
    fn default() -> Self {
        Self {
            max_records: 500,
            max_bytes: 4 * 1024 * 1024,
            concurrency: 4,
            retry: RetryPolicy::default(),
        }
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
    pub message_ids: Vec<MessageId>,
    /// The record's primary key as a JSON object (`{"id":42}`).
    pub keys: JsonColumn,
    /// The mapped record as a JSON object, nested by dotted field names.
    pub bodies: JsonColumn,
    /// The mapped fields as Arrow columns named by destination field (dotted names kept flat),
    /// constants included, for destinations that write columns (CSV, Parquet, databases).
    pub fields: RecordBatch,
}

/// One record of an [`OutgoingBatch`].
#[derive(Debug, Clone, Copy)]
pub struct RecordRef<'a> {
    pub op: Op,
    pub message_id: &'a MessageId,
    pub key: &'a [u8],
    pub body: &'a [u8],
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
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn record(&self, i: usize) -> RecordRef<'_> {
        RecordRef {
            op: self.ops[i],
            message_id: &self.message_ids[i],
            key: self.keys.get(i),
            body: self.bodies.get(i),
        }
    }

    pub fn records(&self, range: Range<usize>) -> impl Iterator<Item = RecordRef<'_>> {
        range.map(|i| self.record(i))
    }

    /// The records at `indices`, in that order, as a batch of their own.
    pub fn select(&self, indices: &[usize]) -> Result<OutgoingBatch, arrow::error::ArrowError> {
        let mut keys = JsonColumn::with_capacity(indices.len(), 0);
        let mut bodies = JsonColumn::with_capacity(indices.len(), 0);
        for &i in indices {
            keys.push(self.keys.get(i));
            bodies.push(self.bodies.get(i));
        }
        let take = arrow::array::UInt32Array::from_iter_values(indices.iter().map(|&i| i as u32));
        Ok(OutgoingBatch {
            ops: indices.iter().map(|&i| self.ops[i]).collect(),
            message_ids: indices.iter().map(|&i| self.message_ids[i]).collect(),
            keys,
            bodies,
            fields: arrow::compute::take_record_batch(&self.fields, &take)?,
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
    /// Nothing was accepted, and trying the same request again may work (rate limited,
    /// unavailable, timed out). `after` is the destination's own hint (`Retry-After`).
    Retry { reason: String, after: Option<Duration> },
    /// Nothing was accepted and the same request will fail again.
    Rejected { reason: String },
}

/// A destination type's connection, built from its config by a connector.
#[async_trait]
pub trait Destination: Send + Sync + 'static {
    /// The `type` in `sluice.yaml`.
    fn kind(&self) -> &'static str;

    fn policy(&self) -> DeliveryPolicy {
        DeliveryPolicy::default()
    }

    /// Checks the destination can be reached with its credentials.
    async fn check(&self) -> Result<(), DestinationError>;

    /// Starts delivering one run's records.
    async fn open(&self, run: &RunInfo) -> Result<Box<dyn DestinationWriter>, DestinationError>;
}

/// One run's session with a destination.
#[async_trait]
pub trait DestinationWriter: Send + Sync {
    /// Sends records `range` of `batch` in one request (one attempt; the delivery layer
    /// retries). Indexes in a [`SendOutcome::Partial`] are relative to `range.start`.
    async fn send(&self, batch: &OutgoingBatch, range: Range<usize>) -> SendOutcome;

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
