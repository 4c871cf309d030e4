//! The one delivery layer every destination shares: it cuts outgoing records into requests
//! within the destination's limits, keeps a bounded number in flight, retries what the
//! destination says may be retried (with exponential backoff and jitter, honouring
//! `Retry-After`), and turns every answer into a per-record result.

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
    pub retries: usize,
}

/// Delivers every record of `batch`.
pub async fn deliver(
    writer: &dyn DestinationWriter,
    batch: &OutgoingBatch,
    policy: &DeliveryPolicy,
) -> BatchResult {
    let ranges = request_ranges(batch, policy);
    let mut result = BatchResult {
        requests: ranges.len(),
        ..Default::default()
    };
    let outcomes: Vec<(Range<usize>, usize, SendOutcome)> = futures::stream::iter(ranges)
        .map(|range| async move {
            let (retries, outcome) = send_with_retry(writer, batch, range.clone(), &policy.retry).await;
            (range, retries, outcome)
        })
        .buffered(policy.concurrency.max(1))
        .collect()
        .await;
    for (range, retries, outcome) in outcomes {
        result.retries += retries;
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
            SendOutcome::Retry { reason, .. } | SendOutcome::Rejected { reason } => {
                result.failures.extend(range.map(|index| RecordFailure {
                    index,
                    error: reason.clone(),
                }));
            }
        }
    }
    result.failures.sort_by_key(|f| f.index);
    result.failures.dedup_by_key(|f| f.index);
    result
}

/// Cuts `batch` into consecutive ranges of at most `max_records` records and about `max_bytes`.
pub fn request_ranges(batch: &OutgoingBatch, policy: &DeliveryPolicy) -> Vec<Range<usize>> {
    let max_records = policy.max_records.max(1);
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

/// Sends one request, retrying while the destination says a retry may help. Returns the number
/// of retries and the last outcome; a request still asking to be retried after the last
/// attempt becomes `Rejected` with the reason and the attempt count.
async fn send_with_retry(
    writer: &dyn DestinationWriter,
    batch: &OutgoingBatch,
    range: Range<usize>,
    policy: &RetryPolicy,
) -> (usize, SendOutcome) {
    let mut delays = backon::ExponentialBuilder::default()
        .with_min_delay(policy.initial_backoff)
        .with_max_delay(policy.max_backoff)
        .with_jitter()
        .with_max_times(policy.max_attempts.saturating_sub(1) as usize)
        .build();
    let mut retries = 0;
    loop {
        let outcome = writer.send(batch, range.clone()).await;
        let SendOutcome::Retry { reason, after } = outcome else {
            return (retries, outcome);
        };
        let Some(backoff) = delays.next() else {
            return (
                retries,
                SendOutcome::Rejected {
                    reason: format!("{reason} (gave up after {} attempts)", retries + 1),
                },
            );
        };
        let delay = match after {
            Some(after) if after > MAX_RETRY_AFTER => {
                return (
                    retries,
                    SendOutcome::Rejected {
                        reason: format!(
                            "{reason} (the destination asked to wait {}s, longer than sluice waits)",
                            after.as_secs()
                        ),
                    },
                );
            }
            Some(after) => after.max(backoff),
            None => backoff,
        };
        tracing::debug!(%reason, delay_ms = delay.as_millis() as u64, "retrying request");
        tokio::time::sleep(delay).await;
        retries += 1;
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
        for i in 0..n {
            keys.push(format!("{{\"id\":{i}}}").as_bytes());
            bodies.push(b"{}");
        }
        OutgoingBatch {
            ops: vec![Op::Added; n],
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
            max_bytes: usize::MAX,
            concurrency: 2,
            retry: RetryPolicy {
                max_attempts: 3,
                initial_backoff: Duration::from_millis(1),
                max_backoff: Duration::from_millis(5),
            },
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
        let result = deliver(&writer, &batch(10), &fast_policy(4)).await;
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
        let result = deliver(&flaky, &batch(3), &fast_policy(10)).await;
        assert!(result.failures.is_empty());
        assert_eq!(result.retries, 2);

        let down = Scripted {
            calls: AtomicUsize::new(0),
            answer: Box::new(|_, _| SendOutcome::Retry {
                reason: "HTTP 503".into(),
                after: None,
            }),
        };
        let result = deliver(&down, &batch(2), &fast_policy(10)).await;
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
        let result = deliver(&writer, &batch(3), &fast_policy(10)).await;
        assert_eq!(result.failures.len(), 3);
        assert_eq!(writer.calls.load(Ordering::SeqCst), 1);
    }
}
