//! The one delivery layer every destination shares: it cuts outgoing records into requests
//! within the destination's limits, keeps a bounded number in flight, paces them by the
//! destination's rate limit, retries what the destination says may be retried (exponential
//! backoff with jitter, honouring `Retry-After`; waiting out a rate limit is not a failed
//! attempt), splits a request refused as a whole to find the records at fault, and turns every
//! answer into a per-record result.

use std::ops::Range;
use std::time::Duration;

use backon::BackoffBuilder;
use futures::StreamExt;

use crate::destination::{
    DeliveryPolicy, DestinationWriter, OutgoingBatch, RecordFailure, RetryPolicy, SendOutcome,
};

/// The longest a destination's `Retry-After` is honoured; beyond it the request gives up.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// Per-record results of delivering one [`OutgoingBatch`].
#[derive(Debug, Default, Clone, PartialEq)]
pub struct BatchResult {
    /// Records that were not delivered, by index in the batch, ascending.
    pub failures: Vec<RecordFailure>,
    pub requests: usize,
    /// Attempts sent again after an error.
    pub retries: usize,
    /// Attempts sent again after the destination rate limited them.
    pub rate_limited: usize,
}

/// Delivery stopped: the destination said nothing can be delivered in this run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryStopped {
    pub reason: String,
    /// Results of the requests answered before it stopped.
    pub delivered_before: usize,
}

/// Delivers every record of `batch`. Records are grouped by action first (upserts and deletes
/// go to different endpoints), so a request always carries one action.
pub async fn deliver(
    writer: &dyn DestinationWriter,
    batch: &OutgoingBatch,
    policy: &DeliveryPolicy,
) -> Result<BatchResult, DeliveryStopped> {
    if !batch.actions.windows(2).any(|w| w[0] != w[1]) {
        return deliver_uniform(writer, batch, policy).await;
    }
    let mut result = BatchResult::default();
    for (_, indices) in batch.action_groups() {
        let group = batch.select(&indices).map_err(|e| DeliveryStopped {
            reason: format!("internal: cannot group records by action: {e}"),
            delivered_before: result.requests,
        })?;
        let part = deliver_uniform(writer, &group, policy).await?;
        result.requests += part.requests;
        result.retries += part.retries;
        result.rate_limited += part.rate_limited;
        result
            .failures
            .extend(part.failures.into_iter().map(|f| RecordFailure {
                index: indices[f.index],
                error: f.error,
            }));
    }
    result.failures.sort_by_key(|f| f.index);
    Ok(result)
}

async fn deliver_uniform(
    writer: &dyn DestinationWriter,
    batch: &OutgoingBatch,
    policy: &DeliveryPolicy,
) -> Result<BatchResult, DeliveryStopped> {
    let ranges = request_ranges(batch, policy);
    let mut result = BatchResult::default();
    let mut outcomes = futures::stream::iter(ranges)
        .map(|range| deliver_range(writer, batch, range, policy))
        .buffered(policy.concurrency.max(1));
    while let Some(outcome) = outcomes.next().await {
        let part = outcome.map_err(|reason| DeliveryStopped {
            reason,
            delivered_before: result.requests,
        })?;
        result.requests += part.requests;
        result.retries += part.retries;
        result.rate_limited += part.rate_limited;
        result.failures.extend(part.failures);
    }
    result.failures.sort_by_key(|f| f.index);
    result.failures.dedup_by_key(|f| f.index);
    Ok(result)
}

/// Cuts `batch` into consecutive ranges of at most `max_records` records and about `max_bytes`.
pub fn request_ranges(batch: &OutgoingBatch, policy: &DeliveryPolicy) -> Vec<Range<usize>> {
    let max_records = match batch.actions.first() {
        Some(action) => policy.max_records_for(*action),
        None => policy.max_records.max(1),
    };
    let mut ranges = Vec::new();
    let mut start = 0;
    while start < batch.len() {
        let mut end = (start + max_records).min(batch.len());
        while end - start > 1 && batch.approximate_bytes(start..end) > policy.max_bytes {
            end = start + (end - start) / 2;
        }
        ranges.push(start..end);
        start = end;
    }
    ranges
}

/// Sends one request's records, splitting the request in halves while the destination refuses
/// it as a whole, so that only the records at fault fail. `Err` is a fatal answer.
async fn deliver_range(
    writer: &dyn DestinationWriter,
    batch: &OutgoingBatch,
    range: Range<usize>,
    policy: &DeliveryPolicy,
) -> Result<BatchResult, String> {
    let mut result = BatchResult::default();
    let mut pending = vec![range];
    while let Some(range) = pending.pop() {
        result.requests += 1;
        let (counts, outcome) = send_with_retry(writer, batch, range.clone(), policy).await;
        result.retries += counts.retries;
        result.rate_limited += counts.rate_limited;
        match outcome {
            SendOutcome::Accepted => {}
            SendOutcome::Partial(failures) => {
                for failure in failures {
                    if failure.index < range.len() {
                        result.failures.push(RecordFailure {
                            index: range.start + failure.index,
                            error: failure.error,
                        });
                    } else {
                        tracing::warn!(
                            index = failure.index,
                            records = range.len(),
                            "destination reported a failure for a record index outside the request; ignored"
                        );
                    }
                }
            }
            SendOutcome::RefusedBecauseOf(failures) if failures.iter().any(|f| f.index < range.len()) => {
                let mut at_fault = vec![false; range.len()];
                for failure in failures {
                    if let Some(flag) = at_fault.get_mut(failure.index)
                        && !*flag
                    {
                        *flag = true;
                        result.failures.push(RecordFailure {
                            index: range.start + failure.index,
                            error: failure.error,
                        });
                    }
                }
                // The others, in the runs between the refused records, go again (last run
                // pushed first, so they go in order).
                let mut runs = Vec::new();
                let mut start = None;
                for (offset, refused) in at_fault.iter().chain([&true]).enumerate() {
                    match (start, refused) {
                        (None, false) => start = Some(offset),
                        (Some(from), true) => {
                            runs.push(range.start + from..range.start + offset);
                            start = None;
                        }
                        _ => {}
                    }
                }
                pending.extend(runs.into_iter().rev());
            }
            SendOutcome::RefusedBecauseOf(failures) if range.len() > 1 => {
                tracing::debug!(
                    named = failures.len(),
                    records = range.len(),
                    "request refused for records outside it; splitting it"
                );
                let middle = range.start + range.len() / 2;
                pending.push(middle..range.end);
                pending.push(range.start..middle);
            }
            SendOutcome::RefusedBecauseOf(failures) => {
                let reason = failures
                    .into_iter()
                    .next()
                    .map_or_else(|| "refused".to_string(), |f| f.error);
                result.failures.extend(range.map(|index| RecordFailure {
                    index,
                    error: reason.clone(),
                }));
            }
            SendOutcome::Invalid { reason } if range.len() > 1 => {
                tracing::debug!(%reason, records = range.len(), "request refused as a whole; splitting it");
                let middle = range.start + range.len() / 2;
                // Depth first, first half first.
                pending.push(middle..range.end);
                pending.push(range.start..middle);
            }
            SendOutcome::Fatal { reason } => return Err(reason),
            SendOutcome::Invalid { reason }
            | SendOutcome::Retry { reason, .. }
            | SendOutcome::RateLimited { reason, .. }
            | SendOutcome::Rejected { reason } => {
                result.failures.extend(range.map(|index| RecordFailure {
                    index,
                    error: reason.clone(),
                }));
            }
        }
    }
    Ok(result)
}

#[derive(Debug, Default, Clone, Copy)]
struct AttemptCounts {
    retries: usize,
    rate_limited: usize,
}

/// Sends one request, retrying while the destination says a retry may help. A request still
/// asking to be retried after the last attempt becomes `Rejected` with the reason and the
/// attempt count; one rate limited for longer than the policy allows, likewise.
async fn send_with_retry(
    writer: &dyn DestinationWriter,
    batch: &OutgoingBatch,
    range: Range<usize>,
    policy: &DeliveryPolicy,
) -> (AttemptCounts, SendOutcome) {
    let retry: &RetryPolicy = &policy.retry;
    let backoff = || {
        backon::ExponentialBuilder::default()
            .with_min_delay(retry.initial_backoff)
            .with_max_delay(retry.max_backoff)
            .with_jitter()
            .without_max_times()
            .build()
    };
    let mut error_delays = backoff();
    let mut rate_delays = backoff();
    let mut counts = AttemptCounts::default();
    let mut waited_for_rate = Duration::ZERO;
    loop {
        if let Some(limit) = &policy.rate_limit {
            limit.acquire().await;
        }
        let outcome = writer.send(batch, range.clone()).await;
        let delay = match outcome {
            SendOutcome::Retry { reason, after } => {
                if counts.retries + 1 >= retry.max_attempts as usize {
                    let attempts = counts.retries + 1;
                    return (
                        counts,
                        SendOutcome::Rejected {
                            reason: format!("{reason} (gave up after {attempts} attempts)"),
                        },
                    );
                }
                let backoff = error_delays.next().unwrap_or(retry.max_backoff);
                match hinted(after, backoff) {
                    Ok(delay) => {
                        counts.retries += 1;
                        tracing::debug!(%reason, delay_ms = delay.as_millis() as u64, "retrying request");
                        delay
                    }
                    Err(wait) => return (counts, too_long(reason, wait)),
                }
            }
            SendOutcome::RateLimited { reason, after } => {
                let backoff = rate_delays.next().unwrap_or(retry.max_backoff);
                let delay = match hinted(after, backoff) {
                    Ok(delay) => delay,
                    Err(wait) => return (counts, too_long(reason, wait)),
                };
                if waited_for_rate + delay > retry.max_rate_limited_wait {
                    return (
                        counts,
                        SendOutcome::Rejected {
                            reason: format!(
                                "{reason} (still rate limited after waiting {}s; raise the destination's rate limit or lower its concurrency)",
                                waited_for_rate.as_secs()
                            ),
                        },
                    );
                }
                waited_for_rate += delay;
                counts.rate_limited += 1;
                tracing::debug!(%reason, delay_ms = delay.as_millis() as u64, "rate limited; waiting");
                delay
            }
            other => return (counts, other),
        };
        tokio::time::sleep(delay).await;
    }
}

/// The destination's `Retry-After` hint if it gave one (never less than our own backoff);
/// `Err` when it asks for more than sluice waits.
fn hinted(after: Option<Duration>, backoff: Duration) -> Result<Duration, Duration> {
    match after {
        Some(after) if after > MAX_RETRY_AFTER => Err(after),
        Some(after) => Ok(after.max(backoff)),
        None => Ok(backoff),
    }
}

fn too_long(reason: String, wait: Duration) -> SendOutcome {
    SendOutcome::Rejected {
        reason: format!(
            "{reason} (the destination asked to wait {}s, longer than sluice waits)",
            wait.as_secs()
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use arrow::array::RecordBatch;
    use async_trait::async_trait;

    use super::*;
    use crate::config::Op;
    use crate::destination::MessageId;
    use crate::error::DestinationError;
    use crate::json::JsonColumn;

    fn batch(n: usize) -> OutgoingBatch {
        let mut keys = JsonColumn::with_capacity(n, n * 10);
        let mut bodies = JsonColumn::with_capacity(n, n * 10);
        let mut ids = JsonColumn::with_capacity(n, n * 10);
        for i in 0..n {
            keys.push(format!("{{\"id\":{i}}}").as_bytes());
            bodies.push(b"{}");
            ids.push(b"{}");
        }
        OutgoingBatch {
            ops: vec![Op::Added; n],
            actions: vec![crate::destination::RecordAction::Upsert; n],
            ids,
            message_ids: (0..n)
                .map(|i| MessageId::new("m", &[i as u8], 0, Op::Added))
                .collect(),
            keys,
            bodies,
            fields: RecordBatch::new_empty(Arc::new(arrow::datatypes::Schema::empty())),
        }
    }

    fn fast_policy(max_records: usize) -> DeliveryPolicy {
        DeliveryPolicy {
            max_records,
            max_records_by_action: Vec::new(),
            max_bytes: usize::MAX,
            max_record_bytes: None,
            concurrency: 2,
            retry: RetryPolicy {
                max_attempts: 3,
                initial_backoff: Duration::from_millis(1),
                max_backoff: Duration::from_millis(5),
                max_rate_limited_wait: Duration::from_millis(200),
            },
            rate_limit: None,
        }
    }

    /// Answers from a script keyed by the request's first record.
    struct Scripted {
        calls: AtomicUsize,
        answer: Box<dyn Fn(Range<usize>, usize) -> SendOutcome + Send + Sync>,
    }

    #[async_trait]
    impl DestinationWriter for Scripted {
        async fn send(&self, _batch: &OutgoingBatch, range: Range<usize>) -> SendOutcome {
            let call = self.calls.fetch_add(1, Ordering::SeqCst);
            (self.answer)(range, call)
        }
        async fn finish(self: Box<Self>) -> Result<(), DestinationError> {
            Ok(())
        }
    }

    #[test]
    fn requests_respect_record_and_byte_limits() {
        let b = batch(10);
        assert_eq!(request_ranges(&b, &fast_policy(4)), vec![0..4, 4..8, 8..10]);
        let mut policy = fast_policy(10);
        policy.max_bytes = b.approximate_bytes(0..3);
        let ranges = request_ranges(&b, &policy);
        assert!(ranges.iter().all(|r| r.len() <= 3), "{ranges:?}");
        assert_eq!(ranges.iter().map(|r| r.len()).sum::<usize>(), 10);
    }

    #[tokio::test]
    async fn partial_failures_map_to_batch_indexes() {
        let writer = Scripted {
            calls: AtomicUsize::new(0),
            answer: Box::new(|range, _| {
                if range.start == 4 {
                    SendOutcome::Partial(vec![RecordFailure {
                        index: 1,
                        error: "bad email".into(),
                    }])
                } else {
                    SendOutcome::Accepted
                }
            }),
        };
        let result = deliver(&writer, &batch(10), &fast_policy(4)).await.unwrap();
        assert_eq!(
            result.failures,
            vec![RecordFailure {
                index: 5,
                error: "bad email".into()
            }]
        );
        assert_eq!(result.requests, 3);
    }

    #[tokio::test]
    async fn retries_until_accepted_then_gives_up_with_the_reason() {
        let flaky = Scripted {
            calls: AtomicUsize::new(0),
            answer: Box::new(|_, call| {
                if call < 2 {
                    SendOutcome::Retry {
                        reason: "HTTP 429".into(),
                        after: Some(Duration::from_millis(2)),
                    }
                } else {
                    SendOutcome::Accepted
                }
            }),
        };
        let result = deliver(&flaky, &batch(3), &fast_policy(10)).await.unwrap();
        assert!(result.failures.is_empty());
        assert_eq!(result.retries, 2);

        let down = Scripted {
            calls: AtomicUsize::new(0),
            answer: Box::new(|_, _| SendOutcome::Retry {
                reason: "HTTP 503".into(),
                after: None,
            }),
        };
        let result = deliver(&down, &batch(2), &fast_policy(10)).await.unwrap();
        assert_eq!(result.failures.len(), 2);
        assert_eq!(result.failures[0].error, "HTTP 503 (gave up after 3 attempts)");
        assert_eq!(down.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn rejected_requests_fail_every_record_without_retrying() {
        let writer = Scripted {
            calls: AtomicUsize::new(0),
            answer: Box::new(|_, _| SendOutcome::Rejected {
                reason: "HTTP 400: bad".into(),
            }),
        };
        let result = deliver(&writer, &batch(3), &fast_policy(10)).await.unwrap();
        assert_eq!(result.failures.len(), 3);
        assert_eq!(writer.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_request_refused_as_a_whole_is_split_to_the_bad_records() {
        // Records 3 and 6 are bad: any request containing one is refused whole.
        let writer = Scripted {
            calls: AtomicUsize::new(0),
            answer: Box::new(|range, _| {
                if range.contains(&3) || range.contains(&6) {
                    SendOutcome::Invalid {
                        reason: "HTTP 400: invalid".into(),
                    }
                } else {
                    SendOutcome::Accepted
                }
            }),
        };
        let result = deliver(&writer, &batch(8), &fast_policy(8)).await.unwrap();
        let failed: Vec<usize> = result.failures.iter().map(|f| f.index).collect();
        assert_eq!(failed, [3, 6]);
        assert_eq!(result.failures[0].error, "HTTP 400: invalid");
        // 8 -> 4+4 -> (2+2)+(2+2) -> singles around the bad ones: far fewer than 8 requests each.
        assert!(result.requests < 16, "{}", result.requests);
    }

    #[tokio::test]
    async fn records_a_refusal_names_fail_and_the_others_go_again_without_them() {
        // The vendor refuses any request holding record 2 or 5, naming them by their index in
        // the request.
        let writer = Scripted {
            calls: AtomicUsize::new(0),
            answer: Box::new(|range, _| {
                let named: Vec<RecordFailure> = [2usize, 5]
                    .into_iter()
                    .filter(|i| range.contains(i))
                    .map(|i| RecordFailure {
                        index: i - range.start,
                        error: format!("events[{}]: bad", i - range.start),
                    })
                    .collect();
                if named.is_empty() {
                    SendOutcome::Accepted
                } else {
                    SendOutcome::RefusedBecauseOf(named)
                }
            }),
        };
        let result = deliver(&writer, &batch(8), &fast_policy(8)).await.unwrap();
        let failed: Vec<(usize, &str)> = result
            .failures
            .iter()
            .map(|f| (f.index, f.error.as_str()))
            .collect();
        assert_eq!(failed, [(2, "events[2]: bad"), (5, "events[5]: bad")]);
        // One refused request, then the three runs around the refused records: 0..2, 3..5, 6..8.
        assert_eq!(result.requests, 4);

        // A refusal naming no record of the request is split like any whole refusal.
        let vague = Scripted {
            calls: AtomicUsize::new(0),
            answer: Box::new(|range, _| {
                if range.contains(&1) {
                    SendOutcome::RefusedBecauseOf(vec![RecordFailure {
                        index: 99,
                        error: "bad".into(),
                    }])
                } else {
                    SendOutcome::Accepted
                }
            }),
        };
        let result = deliver(&vague, &batch(4), &fast_policy(4)).await.unwrap();
        assert_eq!(result.failures.iter().map(|f| f.index).collect::<Vec<_>>(), [1]);
    }

    #[tokio::test]
    async fn rate_limited_attempts_do_not_count_as_failures() {
        // Five 429s, more than max_attempts (3), then accepted.
        let writer = Scripted {
            calls: AtomicUsize::new(0),
            answer: Box::new(|_, call| {
                if call < 5 {
                    SendOutcome::RateLimited {
                        reason: "HTTP 429".into(),
                        after: Some(Duration::from_millis(1)),
                    }
                } else {
                    SendOutcome::Accepted
                }
            }),
        };
        let result = deliver(&writer, &batch(2), &fast_policy(10)).await.unwrap();
        assert!(result.failures.is_empty());
        assert_eq!((result.rate_limited, result.retries), (5, 0));

        let always = Scripted {
            calls: AtomicUsize::new(0),
            answer: Box::new(|_, _| SendOutcome::RateLimited {
                reason: "HTTP 429".into(),
                after: Some(Duration::from_millis(50)),
            }),
        };
        let result = deliver(&always, &batch(1), &fast_policy(10)).await.unwrap();
        assert!(
            result.failures[0].error.contains("still rate limited"),
            "{:?}",
            result.failures
        );
    }

    #[tokio::test]
    async fn a_fatal_answer_stops_delivery() {
        let writer = Scripted {
            calls: AtomicUsize::new(0),
            answer: Box::new(|_, _| SendOutcome::Fatal {
                reason: "HTTP 401: bad token".into(),
            }),
        };
        let stopped = deliver(&writer, &batch(10), &fast_policy(2)).await.unwrap_err();
        assert_eq!(stopped.reason, "HTTP 401: bad token");
    }

    #[tokio::test]
    async fn the_rate_limit_paces_requests() {
        let writer = Scripted {
            calls: AtomicUsize::new(0),
            answer: Box::new(|_, _| SendOutcome::Accepted),
        };
        let mut policy = fast_policy(1);
        // A burst of 2, then one request every 20 ms.
        policy.rate_limit = crate::destination::RateLimit::new(2, Duration::from_millis(40));
        let started = std::time::Instant::now();
        deliver(&writer, &batch(6), &policy).await.unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(70),
            "{:?}",
            started.elapsed()
        );
    }
}
