//! Answers of the read endpoints that orchestrators and consoles poll (definitions, run lists,
//! runs), kept as their JSON bytes while nothing they were read from can have changed: the
//! engine's definitions (a generation bumped at every change) or the runs this process wrote
//! (a counter the metadata store bumps at every write), and at most [`FOR_OTHERS`] for what
//! other processes sharing the metadata store may have written. Many clients polling the same
//! page then cost one read of the store, not one each.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use crate::error::ApiResult;

/// How long an answer is kept when another process may change what it was read from.
pub const FOR_OTHERS: Duration = Duration::from_millis(250);
/// Answers kept at most (the cache is emptied when it is full).
const CAPACITY: usize = 4096;

#[derive(Clone)]
struct Answer {
    generation: u64,
    at: Instant,
    body: Bytes,
}

#[derive(Default)]
struct Slot {
    answer: tokio::sync::RwLock<Option<Answer>>,
    /// One read of the store at a time per key; the others wait for its answer.
    filling: tokio::sync::Mutex<()>,
}

/// Read answers by request (method and path with its query).
#[derive(Default)]
pub struct ReadCache {
    slots: Mutex<HashMap<String, Arc<Slot>>>,
}

impl ReadCache {
    fn slot(&self, key: &str) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = slots.get(key) {
            return slot.clone();
        }
        if slots.len() >= CAPACITY {
            slots.clear();
        }
        slots.entry(key.to_string()).or_default().clone()
    }

    /// The JSON answer for `key`: kept while `generation` has not moved and it is younger than
    /// `ttl`; else what `read` answers now (an error is not kept).
    pub async fn json<F, Fut>(
        &self,
        key: &str,
        generation: u64,
        ttl: Duration,
        read: F,
    ) -> ApiResult<Response>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = ApiResult<Bytes>>,
    {
        let fresh = |answer: &Option<Answer>| {
            answer
                .as_ref()
                .filter(|a| a.generation == generation && a.at.elapsed() < ttl)
                .map(|a| a.body.clone())
        };
        let slot = self.slot(key);
        if let Some(body) = fresh(&*slot.answer.read().await) {
            return Ok(respond(body));
        }
        let _filling = slot.filling.lock().await;
        if let Some(body) = fresh(&*slot.answer.read().await) {
            return Ok(respond(body));
        }
        let at = Instant::now();
        let body = read().await?;
        *slot.answer.write().await = Some(Answer {
            generation,
            at,
            body: body.clone(),
        });
        Ok(respond(body))
    }
}

fn respond(body: Bytes) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// A value as JSON bytes.
pub fn to_json<T: serde::Serialize>(value: &T) -> ApiResult<Bytes> {
    serde_json::to_vec(value).map(Bytes::from).map_err(|e| {
        crate::error::ApiError::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            e.to_string(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn answers_are_kept_until_their_generation_moves_or_they_age() {
        let cache = ReadCache::default();
        let reads = AtomicUsize::new(0);
        let read = || async {
            reads.fetch_add(1, Ordering::SeqCst);
            Ok(Bytes::from_static(b"{}"))
        };
        for _ in 0..3 {
            cache.json("GET /x", 1, Duration::from_secs(60), read).await.ok();
        }
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        cache.json("GET /x", 2, Duration::from_secs(60), read).await.ok();
        assert_eq!(reads.load(Ordering::SeqCst), 2);
        cache.json("GET /x", 2, Duration::ZERO, read).await.ok();
        assert_eq!(reads.load(Ordering::SeqCst), 3);
        cache.json("GET /y", 2, Duration::from_secs(60), read).await.ok();
        assert_eq!(reads.load(Ordering::SeqCst), 4);
    }
}
