//! Sources: adapters from databases and files to the engine's `Source` trait.

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use sluice_engine::datafusion::error::DataFusionError;
use sluice_engine::datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use sluice_engine::source::SendableRecordBatchStream;
use tokio::sync::mpsc;

pub mod bigquery;
pub mod bigquery_storage;
pub(crate) mod chunks;
pub mod databricks;
pub mod files;
pub mod mysql;
pub mod postgres;
pub mod snowflake;
pub mod sqlite;
pub mod sqlserver;
pub(crate) mod unload;

/// The batches a reader task sends, as the record batch stream `Source::extract` returns.
pub(crate) fn receiver_stream(
    schema: SchemaRef,
    mut rx: mpsc::Receiver<Result<RecordBatch, DataFusionError>>,
) -> SendableRecordBatchStream {
    let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    Box::pin(RecordBatchStreamAdapter::new(schema, stream))
}
