//! A model's rows read from its source's partitions at once, hashed where they are read.
//!
//! A source that reads in parallel (the `files` source's DataFusion scan) used to merge its
//! partitions into one stream, and every row was then hashed on the one task consuming it,
//! beside the probe and the spill: a profile of a 10M-row sync had that task 94% busy while the
//! two decoding threads idled two thirds of the time. Here each partition is read by a task of
//! its own, which hashes every batch it decodes, and probes it against the parent snapshot's
//! rows when the snapshot is to be a delta, before handing it over. A source with one stream is
//! read as before, hashed and probed by the snapshot writer.
//!
//! Rows come in no particular order across partitions, as from the merged stream. A task that
//! stops before its partition's end (a panic, an abort) ends the rows with an error, never
//! early: the channel's closing is not taken for the end of the rows.

use arrow::array::RecordBatch;
use datafusion::error::DataFusionError;
use datafusion::execution::SendableRecordBatchStream;
use futures::StreamExt;
use sluice_snapshots::{BatchHashes, Probe, SnapshotError};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::Instrument;

/// Hashed batches each partition's task may hand over before it waits.
const BATCHES_AHEAD_PER_PARTITION: usize = 2;

/// What the partitions hand over.
pub(super) enum Extracted {
    /// Rows, with their hashes (and probe) when the partition's task computed them.
    Rows(RecordBatch, Option<BatchHashes>),
    /// The source failed.
    SourceFailed(DataFusionError),
    /// A batch could not be hashed (a column type the snapshot cannot hash).
    HashFailed(SnapshotError),
}

enum Message {
    Extracted(Extracted),
    /// A partition's task reached its end.
    Done,
}

/// The rows of a model's partitions, as one sequence.
pub(super) struct PartitionedRows {
    reading: Reading,
}

enum Reading {
    /// One partition, read by the consumer.
    Single(SendableRecordBatchStream),
    /// Several, each read, hashed and probed by its own task.
    Tasks {
        rows: mpsc::Receiver<Message>,
        tasks: Vec<JoinHandle<()>>,
        running: usize,
    },
}

impl PartitionedRows {
    /// Reads `partitions` (at least one) of a model keyed by `key_columns`, probing the rows
    /// with `probe` (the snapshot writer's, [`sluice_snapshots::SnapshotWriter::probe`]).
    pub(super) fn new(
        mut partitions: Vec<SendableRecordBatchStream>,
        key_columns: &[String],
        probe: Option<Probe>,
    ) -> Result<Self, String> {
        if partitions.is_empty() {
            return Err("the source returned no stream at all".to_string());
        }
        if partitions.len() == 1
            && let Some(single) = partitions.pop()
        {
            return Ok(Self {
                reading: Reading::Single(single),
            });
        }
        let (tx, rows) = mpsc::channel(BATCHES_AHEAD_PER_PARTITION * partitions.len());
        let running = partitions.len();
        let tasks = partitions
            .into_iter()
            .map(|partition| {
                let tx = tx.clone();
                let key_columns = key_columns.to_vec();
                tokio::spawn(read_partition(partition, key_columns, probe.clone(), tx).in_current_span())
            })
            .collect();
        Ok(Self {
            reading: Reading::Tasks { rows, tasks, running },
        })
    }

    /// The next batch, or `None` once every partition has ended.
    pub(super) async fn next(&mut self) -> Option<Extracted> {
        match &mut self.reading {
            Reading::Single(stream) => Some(match stream.next().await? {
                Ok(batch) => Extracted::Rows(batch, None),
                Err(e) => Extracted::SourceFailed(e),
            }),
            Reading::Tasks { rows, running, .. } => loop {
                if *running == 0 {
                    return None;
                }
                match rows.recv().await {
                    Some(Message::Extracted(extracted)) => {
                        // A failure ends the rows: the other partitions are not read on.
                        if !matches!(extracted, Extracted::Rows(..)) {
                            *running = 0;
                        }
                        return Some(extracted);
                    }
                    Some(Message::Done) => *running -= 1,
                    None => {
                        *running = 0;
                        return Some(Extracted::SourceFailed(DataFusionError::Execution(
                            "reading a partition of the source stopped before its end".into(),
                        )));
                    }
                }
            },
        }
    }
}

impl Drop for PartitionedRows {
    fn drop(&mut self) {
        // Stop reading partitions nobody will consume (a failed or cancelled extraction).
        if let Reading::Tasks { tasks, .. } = &self.reading {
            for task in tasks {
                task.abort();
            }
        }
    }
}

/// Reads one partition to its end, hashing (and probing) each batch, and hands everything over;
/// stops at the first error, or when the consumer is gone.
async fn read_partition(
    mut partition: SendableRecordBatchStream,
    key_columns: Vec<String>,
    probe: Option<Probe>,
    tx: mpsc::Sender<Message>,
) {
    while let Some(batch) = partition.next().await {
        let (message, failed) = match batch {
            Ok(batch) => match BatchHashes::of(&batch, &key_columns) {
                Ok(mut hashes) => match probe.as_ref().map(|probe| hashes.probe(&batch, probe)) {
                    Some(Err(e)) => (Extracted::HashFailed(e), true),
                    _ => (Extracted::Rows(batch, Some(hashes)), false),
                },
                Err(e) => (Extracted::HashFailed(e), true),
            },
            Err(e) => (Extracted::SourceFailed(e), true),
        };
        if tx.send(Message::Extracted(message)).await.is_err() || failed {
            return;
        }
    }
    let _ = tx.send(Message::Done).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{ArrayRef, AsArray, Int64Array};
    use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};
    use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
    use std::sync::Arc;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("v", DataType::Int64, false),
        ]))
    }

    fn batch(ids: std::ops::Range<i64>) -> RecordBatch {
        let ids: Vec<i64> = ids.collect();
        let values: Vec<i64> = ids.iter().map(|i| i * 10).collect();
        RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(Int64Array::from(ids)) as ArrayRef,
                Arc::new(Int64Array::from(values)) as ArrayRef,
            ],
        )
        .unwrap()
    }

    fn partition(batches: Vec<Result<RecordBatch, DataFusionError>>) -> SendableRecordBatchStream {
        Box::pin(RecordBatchStreamAdapter::new(
            schema(),
            futures::stream::iter(batches),
        ))
    }

    fn keys() -> Vec<String> {
        vec!["id".to_string()]
    }

    #[tokio::test]
    async fn every_partitions_rows_arrive_hashed_as_the_writer_would_hash_them() {
        let partitions = vec![
            partition(vec![Ok(batch(0..100)), Ok(batch(100..150))]),
            partition(vec![Ok(batch(150..160))]),
            partition(vec![]),
        ];
        let mut rows = PartitionedRows::new(partitions, &keys(), None).unwrap();
        let mut ids = Vec::new();
        while let Some(extracted) = rows.next().await {
            let Extracted::Rows(batch, Some(hashes)) = extracted else {
                panic!("a partition failed or came unhashed");
            };
            let expected = BatchHashes::of(&batch, &keys()).unwrap();
            assert_eq!(format!("{hashes:?}"), format!("{expected:?}"));
            ids.extend(
                batch
                    .column(0)
                    .as_primitive::<Int64Type>()
                    .values()
                    .iter()
                    .copied(),
            );
        }
        ids.sort_unstable();
        assert_eq!(ids, (0..160).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn rows_are_probed_where_they_are_read_with_the_writers_probe() {
        use sluice_snapshots::SnapshotWriter;
        let dir = tempfile::tempdir().unwrap();
        let store = crate::test_support::snapshot_store(&dir);
        let spec = crate::test_support::users_spec(keys());
        let mut parent = SnapshotWriter::new(store.clone(), spec.clone());
        parent.write(batch(0..120)).await.unwrap();
        let parent = parent.commit().await.unwrap();
        let mut writer = SnapshotWriter::new(store, spec).with_parent(parent);
        writer.write(RecordBatch::new_empty(schema())).await.unwrap();
        let probe = writer.probe().expect("a delta-to-be probes its parent");

        let partitions = vec![
            partition(vec![Ok(batch(0..100))]),
            partition(vec![Ok(batch(100..150))]),
        ];
        let mut rows = PartitionedRows::new(partitions, &keys(), Some(probe.clone())).unwrap();
        let mut batches = 0;
        while let Some(extracted) = rows.next().await {
            let Extracted::Rows(batch, Some(hashes)) = extracted else {
                panic!("a partition failed or came unhashed");
            };
            // Rows 0..120 are the parent's, unchanged (each claimed once); the others are new.
            let ids = batch.column(0).as_primitive::<Int64Type>();
            let expected: Vec<bool> = ids.values().iter().map(|id| *id >= 120).collect();
            assert_eq!(hashes.kept(), Some(expected.as_slice()));
            batches += 1;
        }
        assert_eq!(batches, 2);
        writer.abort().await;
    }

    #[tokio::test]
    async fn a_single_stream_is_read_by_the_consumer_and_left_to_the_writer_to_hash() {
        let mut rows = PartitionedRows::new(vec![partition(vec![Ok(batch(0..10))])], &keys(), None).unwrap();
        assert!(matches!(rows.next().await, Some(Extracted::Rows(_, None))));
        assert!(rows.next().await.is_none());
    }

    #[tokio::test]
    async fn a_failing_partition_reports_its_error() {
        let partitions = vec![
            partition(vec![Ok(batch(0..10))]),
            partition(vec![Err(DataFusionError::Execution("disk on fire".into()))]),
        ];
        let mut rows = PartitionedRows::new(partitions, &keys(), None).unwrap();
        let mut errors = Vec::new();
        while let Some(extracted) = rows.next().await {
            if let Extracted::SourceFailed(e) = extracted {
                errors.push(e.to_string());
            }
        }
        assert_eq!(errors.len(), 1, "one error, then the end: {errors:?}");
        assert!(errors[0].contains("disk on fire"), "{errors:?}");
    }

    #[tokio::test]
    async fn a_partition_that_dies_ends_the_rows_with_an_error_not_early() {
        let dying = Box::pin(RecordBatchStreamAdapter::new(
            schema(),
            futures::stream::iter(vec![Ok(batch(0..10))]).chain(futures::stream::once(async {
                panic!("the reader died");
                #[allow(unreachable_code)]
                Ok(batch(0..1))
            })),
        ));
        let partitions: Vec<SendableRecordBatchStream> = vec![dying, partition(vec![Ok(batch(10..20))])];
        let mut rows = PartitionedRows::new(partitions, &keys(), None).unwrap();
        let mut outcome = Vec::new();
        while let Some(extracted) = rows.next().await {
            outcome.push(matches!(extracted, Extracted::SourceFailed(_)));
        }
        assert_eq!(outcome.last(), Some(&true), "the rows end with an error");
    }

    #[tokio::test]
    async fn no_stream_at_all_is_refused() {
        assert!(PartitionedRows::new(Vec::new(), &keys(), None).is_err());
    }
}
