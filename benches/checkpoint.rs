//! The cost of a run's commit points: for each delivered batch, the intent file (the records it
//! adds), the checkpoint file (every record's new state at the destination) and the metadata
//! transaction that records it, on a local snapshot store and the SQLite metadata store, as a
//! first run (every record added, the worst case: intents for all) makes them. Prints the time
//! per checkpoint and records per second of checkpointing alone, and the share of a run's
//! delivery time it takes at the delivery rate measured by `benches/deliver.rs`.
//!
//! `cargo bench --bench checkpoint -- [records] [records per checkpoint] [delivery records/s]`
//! (defaults 1,000,000, 8,192 and 800,000).

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{
    ArrayRef, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray, UInt8Array, UInt64Array,
};
use arrow::datatypes::{DataType, Field};
use sluice_engine::checkpoint::CheckpointWriter;
use sluice_engine::exceptions::StateRows;
use sluice_engine::metadata::{MetadataStore, RunRecord};
use sluice_snapshots::SnapshotStore;

/// A materialised batch as delivery sees it: model columns, then the change columns.
fn batch(start: usize, rows: usize) -> RecordBatch {
    let ids = start as i64..(start + rows) as i64;
    RecordBatch::try_from_iter(vec![
        (
            "id",
            Arc::new(Int64Array::from_iter_values(ids.clone())) as ArrayRef,
        ),
        (
            "email",
            Arc::new(StringArray::from_iter_values(
                ids.clone().map(|i| format!("user{i}@example.com")),
            )) as ArrayRef,
        ),
        ("__op", Arc::new(UInt8Array::from(vec![1u8; rows])) as ArrayRef),
        (
            "__new_hash",
            Arc::new(UInt64Array::from_iter_values(
                ids.clone().map(|i| i as u64 * 2654435761),
            )) as ArrayRef,
        ),
        (
            "__base_hash",
            Arc::new(UInt64Array::from(vec![None::<u64>; rows])) as ArrayRef,
        ),
        (
            "__base_snapshot",
            Arc::new(StringArray::from(vec![None::<&str>; rows])) as ArrayRef,
        ),
        (
            "__attempts",
            Arc::new(Int64Array::from(vec![0i64; rows])) as ArrayRef,
        ),
        (
            "__first_failed_at",
            Arc::new(TimestampMicrosecondArray::from(vec![None::<i64>; rows]).with_timezone("UTC"))
                as ArrayRef,
        ),
    ])
    .expect("batch")
}

#[tokio::main]
async fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.replace('_', "").parse().ok())
        .collect();
    let records = args.first().copied().unwrap_or(1_000_000) as usize;
    let per_checkpoint = args.get(1).copied().unwrap_or(8192) as usize;
    let delivery_rate = args.get(2).copied().unwrap_or(800_000) as f64;

    let dir = tempfile::tempdir().expect("tempdir");
    let store = SnapshotStore::open(
        dir.path().join("snapshots").to_str().expect("path"),
        dir.path(),
        [],
    )
    .expect("snapshot store");
    let metadata = MetadataStore::open_sqlite(&dir.path().join("sluice.db"))
        .await
        .expect("metadata store")
        .with_lease_ttl(Duration::from_secs(600));
    let mut run = RunRecord::starting("users_to_crm", "users", "crm", false);
    metadata.start_run(&run).await.expect("start");
    metadata
        .acquire_lease("users_to_crm", &run.id)
        .await
        .expect("lease");
    let rows = StateRows::new(vec![Field::new("id", DataType::Int64, false)]);
    let writer = CheckpointWriter::new(store, "users_to_crm", &run.id, "snapshot-1", rows);

    let batches: Vec<RecordBatch> = (0..records)
        .step_by(per_checkpoint)
        .map(|start| batch(start, per_checkpoint.min(records - start)))
        .collect();
    let mut spent = Duration::ZERO;
    let mut worst = Duration::ZERO;
    let mut stages = [Duration::ZERO; 3];
    for (seq, batch) in batches.iter().enumerate() {
        let seq = seq as i64;
        let all: Vec<usize> = (0..batch.num_rows()).collect();
        let started = Instant::now();
        writer.write_intent(seq, batch, &all).await.expect("intent");
        let intent = started.elapsed();
        let checkpoint = writer.write(seq, batch, &all, None).await.expect("checkpoint");
        let file = started.elapsed();
        run.counts.delivered += batch.num_rows() as u64;
        metadata
            .checkpoint(&run, &checkpoint, &[])
            .await
            .expect("metadata");
        let elapsed = started.elapsed();
        stages[0] += intent;
        stages[1] += file - intent;
        stages[2] += elapsed - file;
        spent += elapsed;
        worst = worst.max(elapsed);
    }
    let n = batches.len() as u32;
    println!(
        "per checkpoint: intent file {:.2} ms, checkpoint file {:.2} ms, metadata transaction {:.2} ms",
        (stages[0] / n).as_secs_f64() * 1e3,
        (stages[1] / n).as_secs_f64() * 1e3,
        (stages[2] / n).as_secs_f64() * 1e3
    );
    let per = spent / batches.len() as u32;
    let delivery = records as f64 / delivery_rate;
    println!(
        "{records} records, {} checkpoints of {per_checkpoint}: {:.3} s in commit points ({:.2} ms each, worst {:.2} ms), {:.0} records/s",
        batches.len(),
        spent.as_secs_f64(),
        per.as_secs_f64() * 1e3,
        worst.as_secs_f64() * 1e3,
        records as f64 / spent.as_secs_f64()
    );
    println!(
        "at {delivery_rate:.0} delivered records/s ({delivery:.3} s of delivery), commit points add {:.1}% to the run",
        spent.as_secs_f64() / delivery * 100.0
    );
}
