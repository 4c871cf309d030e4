//! Payload rendering: 10M `users` rows (the spine benchmark's 11 columns) encoded into Segment
//! `identify` messages by the real mapping plan, on one thread, column at a time. Prints records
//! per second per core and bytes per second; the rows are generated in memory first so only
//! rendering is timed.
//!
//! `cargo bench --bench render -- [rows]` (default 10,000,000).

use std::sync::Arc;
use std::time::Instant;

use arrow::array::{
    ArrayRef, BooleanArray, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use sluice_engine::Op;
use sluice_engine::config::MappingConfig;
use sluice_engine::mapping::MappingPlan;

const BATCH_ROWS: usize = 65_536;

fn batch(start: usize, rows: usize) -> RecordBatch {
    let ids = start as i64..(start + rows) as i64;
    let plans = ["free", "starter", "pro", "enterprise"];
    let countries = ["US", "DE", "FR", "GB", "IN", "BR"];
    let text = |f: &dyn Fn(i64) -> String| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(ids.clone().map(f)))
    };
    RecordBatch::try_from_iter(vec![
        (
            "id",
            Arc::new(Int64Array::from_iter_values(ids.clone())) as ArrayRef,
        ),
        ("email", text(&|i| format!("user{i}@example.com"))),
        ("first_name", text(&|i| format!("First{}", i % 1000))),
        ("last_name", text(&|i| format!("Last{}", i % 5000))),
        ("plan", text(&|i| plans[(i % 4) as usize].to_string())),
        ("country", text(&|i| countries[(i % 6) as usize].to_string())),
        (
            "lead_score",
            Arc::new(Int32Array::from_iter_values(
                ids.clone().map(|i| (i % 100) as i32),
            )) as ArrayRef,
        ),
        (
            "lifetime_value",
            Arc::new(Float64Array::from_iter_values(
                ids.clone().map(|i| (i % 10_000) as f64 * 1.25),
            )) as ArrayRef,
        ),
        (
            "is_active",
            Arc::new(BooleanArray::from_iter(ids.clone().map(|i| Some(i % 3 != 0)))) as ArrayRef,
        ),
        (
            "created_at",
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(
                    ids.clone().map(|i| 1_600_000_000_000_000 + i * 1_000_000),
                )
                .with_timezone("UTC"),
            ) as ArrayRef,
        ),
        (
            "updated_at",
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(
                    ids.clone().map(|i| 1_700_000_000_000_000 + i * 1_000_000),
                )
                .with_timezone("UTC"),
            ) as ArrayRef,
        ),
    ])
    .expect("batch")
}

fn main() {
    let rows: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000_000);
    let batches: Vec<RecordBatch> = (0..rows)
        .step_by(BATCH_ROWS)
        .map(|start| batch(start, BATCH_ROWS.min(rows - start)))
        .collect();
    let mut config: MappingConfig = serde_norway::from_str(
        "{model: users, destination: segment, action: identify, fields: {userId: {column: id, as: string}, \"context.country\": country}, columns: all}",
    )
    .expect("mapping");
    config.resolve_send(false);
    let action = sluice_connectors::destinations::segment::segment_action("identify").expect("identify");
    let schema = batches[0].schema();
    let plan = MappingPlan::compile("bench", &config, "users", &schema, &["id".into()], Some(&action))
        .expect("plan compiles");
    let hashes: Vec<u64> = (0..BATCH_ROWS as u64).collect();

    let started = Instant::now();
    let mut bytes = 0usize;
    let mut records = 0usize;
    for batch in &batches {
        let n = batch.num_rows();
        let encoded = plan
            .encode(batch, vec![Op::Added; n], &hashes[..n])
            .expect("encode");
        records += encoded.records.len();
        bytes += encoded.records.bodies.total_bytes();
        std::hint::black_box(&encoded);
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "sluice: rendered {records} Segment identify messages in {seconds:.2} s on one thread: {:.2} M records/s/core, {:.0} MB/s of JSON, {:.0} bytes a message",
        records as f64 / seconds / 1e6,
        bytes as f64 / seconds / 1e6,
        bytes as f64 / records as f64
    );

    // Side by side: arrow-json's own writer on the same rows (flat objects, no message ids,
    // no nesting), a vectorised baseline.
    let started = Instant::now();
    let mut baseline_bytes = 0usize;
    let mut out = Vec::with_capacity(64 << 20);
    for batch in &batches {
        out.clear();
        let mut writer = arrow::json::LineDelimitedWriter::new(&mut out);
        writer.write(batch).expect("arrow-json");
        writer.finish().expect("arrow-json");
        baseline_bytes += out.len();
        std::hint::black_box(&out);
    }
    let baseline = started.elapsed().as_secs_f64();
    println!(
        "arrow-json LineDelimitedWriter: {records} flat rows in {baseline:.2} s: {:.2} M records/s/core, {:.0} MB/s; sluice/arrow-json time ratio {:.2}",
        records as f64 / baseline / 1e6,
        baseline_bytes as f64 / baseline / 1e6,
        seconds / baseline
    );
}
