//! Two ways of reading a PostgreSQL table into Arrow, side by side on the same table:
//!
//! - `copy_binary`: what sluice does: `COPY (query) TO STDOUT (FORMAT binary)`, decoded
//!   straight into Arrow builders by `sluice_connectors::sources::postgres::decode`;
//! - `query_rows`: what row-oriented readers do (datafusion-table-providers' Postgres provider
//!   streams `query_raw` rows and converts each value with `FromSql`): the same columns from a
//!   streamed extended-protocol query, appended to the same Arrow builders;
//! - `copy_bytes`: the COPY stream received and dropped, the client-side floor.
//!
//! Needs the benchmark table of `benches/extract_vs_copy.py` (`sluice_bench.users`):
//!
//!     python3 benches/extract_vs_copy.py --only postgres --repeat 0   # creates it
//!     cargo bench --bench pg_read_paths -- [--repeat 3]

use std::time::Instant;

use arrow::array::{
    BooleanBuilder, Float64Builder, Int32Builder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder,
};
use futures::{StreamExt, TryStreamExt};
use sluice_connectors::sources::postgres::decode::{ColumnKind, CopyDecoder, Progress};

const SQL: &str = "SELECT id, email, first_name, last_name, plan, country, lifetime_value, lead_score, \
                   is_active, created_at, updated_at FROM sluice_bench.users";
const BATCH: usize = 65_536;

#[tokio::main]
async fn main() {
    let repeat: usize = std::env::args()
        .skip_while(|a| a != "--repeat")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let (client, connection) =
        tokio_postgres::connect("postgres://postgres@127.0.0.1:5432/test", tokio_postgres::NoTls)
            .await
            .expect("connect to PostgreSQL on 127.0.0.1:5432");
    tokio::spawn(connection);
    let statement = client
        .prepare(SQL)
        .await
        .expect("the benchmark table (see the header)");
    let kinds: Vec<ColumnKind> = statement
        .columns()
        .iter()
        .map(|c| ColumnKind::for_type(c.type_(), c.type_modifier()).expect("supported"))
        .collect();
    let mut results: Vec<(&str, Vec<f64>)> = vec![
        ("copy_binary", vec![]),
        ("query_rows", vec![]),
        ("copy_bytes", vec![]),
    ];
    let mut rows = 0;
    for _ in 0..repeat {
        for (name, times) in results.iter_mut() {
            let started = Instant::now();
            rows = match *name {
                "copy_binary" => copy_binary(&client, &kinds).await,
                "query_rows" => query_rows(&client).await,
                _ => copy_bytes(&client).await,
            };
            times.push(started.elapsed().as_secs_f64());
        }
    }
    println!("{rows} rows, medians of {repeat}");
    println!("| reader | wall s | rows/s |");
    println!("|---|---:|---:|");
    for (name, mut times) in results {
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        println!("| {name} | {median:.2} | {:.2} M |", rows as f64 / median / 1e6);
    }
}

async fn copy_binary(client: &tokio_postgres::Client, kinds: &[ColumnKind]) -> usize {
    let stream = client
        .copy_out(format!("COPY ({SQL}) TO STDOUT (FORMAT binary)").as_str())
        .await
        .expect("copy");
    let mut stream = std::pin::pin!(stream);
    let mut decoder = CopyDecoder::new(kinds, BATCH);
    // As the source does: decode from each message in place, buffering only a split row.
    let mut pending: Vec<u8> = Vec::new();
    let mut rows = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("copy data");
        let buffered = !pending.is_empty();
        if buffered {
            pending.extend_from_slice(&chunk);
        }
        let data: &[u8] = if buffered { &pending } else { &chunk };
        let mut offset = 0;
        loop {
            match decoder.decode(&data[offset..], BATCH).expect("decode") {
                Progress::Finished => break,
                Progress::Consumed(n) => offset += n,
            }
            if decoder.rows() < BATCH {
                break;
            }
            rows += decoder.rows();
            decoder.finish().expect("batch");
        }
        if buffered {
            pending.drain(..offset);
        } else {
            pending.extend_from_slice(&chunk[offset..]);
        }
    }
    rows + decoder.rows()
}

async fn copy_bytes(client: &tokio_postgres::Client) -> usize {
    let stream = client
        .copy_out(format!("COPY ({SQL}) TO STDOUT (FORMAT binary)").as_str())
        .await
        .expect("copy");
    // One CopyData message per row; the header and trailer make two more.
    stream
        .try_fold(0usize, |n, _| async move { Ok(n + 1) })
        .await
        .expect("copy data")
        - 1
}

async fn query_rows(client: &tokio_postgres::Client) -> usize {
    let stream = client
        .query_raw(SQL, std::iter::empty::<i32>())
        .await
        .expect("query");
    let mut stream = std::pin::pin!(stream);
    let mut id = Int64Builder::with_capacity(BATCH);
    let mut strings: Vec<StringBuilder> = (0..5)
        .map(|_| StringBuilder::with_capacity(BATCH, BATCH * 16))
        .collect();
    let mut ltv = Float64Builder::with_capacity(BATCH);
    let mut score = Int32Builder::with_capacity(BATCH);
    let mut active = BooleanBuilder::with_capacity(BATCH);
    let mut created = TimestampMicrosecondBuilder::with_capacity(BATCH);
    let mut updated = TimestampMicrosecondBuilder::with_capacity(BATCH);
    let mut rows = 0;
    let mut in_batch = 0;
    while let Some(row) = stream.next().await {
        let row = row.expect("row");
        id.append_option(row.get::<_, Option<i64>>(0));
        for (i, builder) in strings.iter_mut().enumerate() {
            builder.append_option(row.get::<_, Option<&str>>(i + 1));
        }
        ltv.append_option(row.get::<_, Option<f64>>(6));
        score.append_option(row.get::<_, Option<i32>>(7));
        active.append_option(row.get::<_, Option<bool>>(8));
        created.append_option(row.get::<_, Option<PgMicros>>(9).map(|t| t.0));
        updated.append_option(row.get::<_, Option<PgMicros>>(10).map(|t| t.0));
        rows += 1;
        in_batch += 1;
        if in_batch == BATCH {
            id.finish();
            strings.iter_mut().for_each(|b| drop(b.finish()));
            ltv.finish();
            score.finish();
            active.finish();
            created.finish();
            updated.finish();
            in_batch = 0;
        }
    }
    rows
}

/// A timestamp or timestamptz as Unix microseconds (what a row reader converts to).
struct PgMicros(i64);

impl<'a> tokio_postgres::types::FromSql<'a> for PgMicros {
    fn from_sql(
        _: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let micros = i64::from_be_bytes(raw.try_into()?);
        Ok(PgMicros(micros + 946_684_800_000_000))
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        matches!(
            *ty,
            tokio_postgres::types::Type::TIMESTAMP | tokio_postgres::types::Type::TIMESTAMPTZ
        )
    }
}
