//! A Parquet file encoded on several threads, a column per task.
//!
//! Parquet's `ArrowWriter` encodes a batch's columns one after another on the calling thread.
//! For a destination that writes a whole model as Parquet that is the run's slowest step (the
//! `file` destination's `write` stage was 6.3 s of a 10M-row first sync on two cores), while
//! each column of a row group is encoded independently of the others. This writer hands the
//! columns of each batch to worker threads, largest first, and appends the encoded chunks to the
//! row group in column order, so the file is the one `ArrowWriter` would write.

use std::io::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_writer::{
    ArrowColumnChunk, ArrowColumnWriter, ArrowLeafColumn, ArrowRowGroupWriterFactory, compute_leaves,
};
use parquet::errors::{ParquetError, Result};
use parquet::file::metadata::ParquetMetaData;
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;

pub struct ParallelParquetWriter<W: Write + Send> {
    file: SerializedFileWriter<W>,
    factory: ArrowRowGroupWriterFactory,
    schema: SchemaRef,
    /// The open row group's column writers, one per leaf column.
    columns: Vec<ArrowColumnWriter>,
    rows_in_group: usize,
    row_groups: usize,
    max_row_group_rows: usize,
    threads: usize,
}

impl<W: Write + Send> ParallelParquetWriter<W> {
    /// `threads` encoding threads (the calling one among them); row groups of the properties'
    /// maximum row count.
    pub fn try_new(out: W, schema: SchemaRef, properties: WriterProperties, threads: usize) -> Result<Self> {
        let max_row_group_rows = properties.max_row_group_row_count().unwrap_or(1024 * 1024).max(1);
        // `ArrowWriter` lays out the file (schema conversion, the embedded Arrow schema); its
        // lower half then takes column chunks encoded elsewhere.
        let (file, factory) =
            ArrowWriter::try_new(out, schema.clone(), Some(properties))?.into_serialized_writer()?;
        let columns = factory.create_column_writers(0)?;
        Ok(Self {
            file,
            factory,
            schema,
            columns,
            rows_in_group: 0,
            row_groups: 0,
            max_row_group_rows,
            threads: threads.max(1),
        })
    }

    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        if batch.schema().fields() != self.schema.fields() {
            return Err(ParquetError::General(format!(
                "a batch of columns {:?} in a file of columns {:?}",
                batch.schema().fields(),
                self.schema.fields()
            )));
        }
        let mut offset = 0;
        while offset < batch.num_rows() {
            let rows = (self.max_row_group_rows - self.rows_in_group).min(batch.num_rows() - offset);
            self.encode(&batch.slice(offset, rows))?;
            self.rows_in_group += rows;
            offset += rows;
            if self.rows_in_group == self.max_row_group_rows {
                self.flush_row_group()?;
            }
        }
        Ok(())
    }

    fn encode(&mut self, batch: &RecordBatch) -> Result<()> {
        let mut leaves: Vec<ArrowLeafColumn> = Vec::with_capacity(self.columns.len());
        // Each leaf's share of its column's memory: the size that orders the tasks.
        let mut sizes: Vec<usize> = Vec::with_capacity(self.columns.len());
        for (field, column) in self.schema.fields().iter().zip(batch.columns()) {
            let column_leaves = compute_leaves(field, column)?;
            let share = column.get_array_memory_size() / column_leaves.len().max(1);
            sizes.extend(std::iter::repeat_n(share, column_leaves.len()));
            leaves.extend(column_leaves);
        }
        // Largest columns first, so the last one taken is a small one and the threads finish
        // together.
        let mut order: Vec<usize> = (0..leaves.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(sizes.get(i).copied().unwrap_or(0)));
        let jobs: Vec<Mutex<(&mut ArrowColumnWriter, &ArrowLeafColumn)>> =
            self.columns.iter_mut().zip(&leaves).map(Mutex::new).collect();
        run_in_parallel(self.threads, order.len(), |task| {
            let job = &jobs[order[task]];
            let mut job = job
                .lock()
                .map_err(|_| ParquetError::General("a column encoder panicked".into()))?;
            let (writer, leaf) = &mut *job;
            writer.write(leaf)
        })
    }

    fn flush_row_group(&mut self) -> Result<()> {
        if self.rows_in_group == 0 {
            return Ok(());
        }
        self.row_groups += 1;
        let next = self.factory.create_column_writers(self.row_groups)?;
        let writers = std::mem::replace(&mut self.columns, next);
        // Closing a column flushes its last page (and compresses it): in parallel too.
        let closing: Vec<Mutex<Option<ArrowColumnWriter>>> =
            writers.into_iter().map(|w| Mutex::new(Some(w))).collect();
        let chunks: Vec<Mutex<Option<ArrowColumnChunk>>> = closing.iter().map(|_| Mutex::new(None)).collect();
        run_in_parallel(self.threads, closing.len(), |i| {
            let poisoned = || ParquetError::General("a column encoder panicked".into());
            let writer = closing[i].lock().map_err(|_| poisoned())?.take();
            if let Some(writer) = writer {
                *chunks[i].lock().map_err(|_| poisoned())? = Some(writer.close()?);
            }
            Ok(())
        })?;
        let mut row_group = self.file.next_row_group()?;
        for chunk in chunks {
            let chunk = chunk
                .into_inner()
                .ok()
                .flatten()
                .ok_or_else(|| ParquetError::General("a column chunk was not encoded".into()))?;
            chunk.append_to_row_group(&mut row_group)?;
        }
        row_group.close()?;
        self.rows_in_group = 0;
        Ok(())
    }

    /// Writes the last row group and the footer.
    pub fn close(mut self) -> Result<ParquetMetaData> {
        self.flush_row_group()?;
        self.file.close()
    }
}

/// Runs `task(0..tasks)` on up to `threads` threads (the caller's among them), each taking the
/// next task as it finishes one; the first error wins.
fn run_in_parallel(threads: usize, tasks: usize, task: impl Fn(usize) -> Result<()> + Sync) -> Result<()> {
    let next = AtomicUsize::new(0);
    let failure: Mutex<Option<ParquetError>> = Mutex::new(None);
    let work = || {
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= tasks {
                return;
            }
            if let Err(e) = task(i) {
                // Later tasks are skipped: the file is abandoned anyway.
                next.store(tasks, Ordering::Relaxed);
                if let Ok(mut failure) = failure.lock() {
                    failure.get_or_insert(e);
                }
                return;
            }
        }
    };
    let helpers = threads.min(tasks).saturating_sub(1);
    std::thread::scope(|scope| {
        for _ in 0..helpers {
            scope.spawn(work);
        }
        work();
    });
    match failure.into_inner() {
        Ok(None) => Ok(()),
        Ok(Some(e)) => Err(e),
        Err(_) => Err(ParquetError::General("a column encoder panicked".into())),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Int64Array, ListArray, StringArray, StructArray};
    use arrow::datatypes::{DataType, Field, Fields, Int32Type, Schema};
    use bytes::Bytes;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use parquet::basic::Compression;

    use super::*;

    fn batch(start: i64, rows: i64) -> RecordBatch {
        let ids = Int64Array::from_iter_values(start..start + rows);
        let names =
            StringArray::from_iter((start..start + rows).map(|i| (i % 7 != 0).then(|| format!("name {i}"))));
        let tags = ListArray::from_iter_primitive::<Int32Type, _, _>(
            (start..start + rows).map(|i| (i % 5 != 0).then(|| vec![Some(i as i32), None, Some(1)])),
        );
        let address = StructArray::from(vec![
            (
                Arc::new(Field::new("city", DataType::Utf8, true)),
                Arc::new(StringArray::from_iter(
                    (start..start + rows).map(|i| Some(format!("city {}", i % 13))),
                )) as ArrayRef,
            ),
            (
                Arc::new(Field::new("zip", DataType::Int64, true)),
                Arc::new(Int64Array::from_iter(
                    (start..start + rows).map(|i| (i % 3 != 0).then_some(i)),
                )) as ArrayRef,
            ),
        ]);
        RecordBatch::try_from_iter(vec![
            ("id", Arc::new(ids) as ArrayRef),
            ("name", Arc::new(names) as ArrayRef),
            ("tags", Arc::new(tags) as ArrayRef),
            ("address", Arc::new(address) as ArrayRef),
        ])
        .unwrap()
    }

    fn written(threads: usize, batches: &[RecordBatch]) -> Vec<u8> {
        let properties = WriterProperties::builder()
            .set_max_row_group_row_count(Some(1000))
            .set_compression(Compression::SNAPPY)
            .build();
        let mut out = Vec::new();
        let mut writer =
            ParallelParquetWriter::try_new(&mut out, batches[0].schema(), properties, threads).unwrap();
        for batch in batches {
            writer.write(batch).unwrap();
        }
        writer.close().unwrap();
        out
    }

    #[test]
    fn the_file_is_the_one_arrow_writer_writes_and_reads_back_whole() {
        // Batches that straddle row groups of 1,000 rows, nested columns of several leaves.
        let batches: Vec<RecordBatch> = (0..7).map(|i| batch(i * 700, 700)).collect();
        let parallel = written(3, &batches);
        let serial = {
            let properties = WriterProperties::builder()
                .set_max_row_group_row_count(Some(1000))
                .set_compression(Compression::SNAPPY)
                .build();
            let mut out = Vec::new();
            let mut writer = ArrowWriter::try_new(&mut out, batches[0].schema(), Some(properties)).unwrap();
            for batch in &batches {
                writer.write(batch).unwrap();
            }
            writer.close().unwrap();
            out
        };
        assert_eq!(parallel, serial, "byte for byte what ArrowWriter writes");
        assert_eq!(parallel, written(1, &batches), "one thread or several");

        let reader = ParquetRecordBatchReaderBuilder::try_new(Bytes::from(parallel)).unwrap();
        assert_eq!(reader.metadata().num_row_groups(), 5);
        let read: Vec<RecordBatch> = reader.build().unwrap().map(Result::unwrap).collect();
        let read = arrow::compute::concat_batches(&read[0].schema(), &read).unwrap();
        let expected = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
        assert_eq!(read, expected);
    }

    #[test]
    fn a_batch_of_other_columns_is_refused() {
        let mut out = Vec::new();
        let mut writer =
            ParallelParquetWriter::try_new(&mut out, batch(0, 10).schema(), WriterProperties::default(), 2)
                .unwrap();
        let other = RecordBatch::try_new(
            Arc::new(Schema::new(Fields::from(vec![Field::new(
                "id",
                DataType::Int64,
                false,
            )]))),
            vec![Arc::new(Int64Array::from(vec![1]))],
        )
        .unwrap();
        let err = writer.write(&other).unwrap_err().to_string();
        assert!(err.contains("a batch of columns"), "{err}");
    }

    #[test]
    fn an_empty_file_has_its_schema_and_no_row_group() {
        let mut out = Vec::new();
        let writer =
            ParallelParquetWriter::try_new(&mut out, batch(0, 1).schema(), WriterProperties::default(), 2)
                .unwrap();
        let metadata = writer.close().unwrap();
        assert_eq!(metadata.num_row_groups(), 0);
        let reader = ParquetRecordBatchReaderBuilder::try_new(Bytes::from(out)).unwrap();
        assert_eq!(reader.schema().fields().len(), 4);
    }
}
