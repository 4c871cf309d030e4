//! Models: rendering a model's SQL template and holding its output to sluice's limits.
//!
//! A model's SQL may use two variables, rendered as literals (never as text a value could
//! break out of):
//! - `{{last_sync_time}}`: Unix seconds (an integer) of the start of the previous successful
//!   run, the latest one that left nothing undelivered; `0` before the first. When one
//!   extraction serves several mappings, the earliest of theirs is used, so none misses a row.
//! - `{{run_started_at}}`: the start of this run as a quoted UTC timestamp literal,
//!   `'2026-11-22 09:30:00.000000+00:00'`, which PostgreSQL, MySQL, SQLite and DataFusion all
//!   read as a timestamp (or compare as text in ISO order).

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Schema};
use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::destination::{OutgoingBatch, RecordFailure};

/// The values a model's SQL template can use.
#[derive(Debug, Clone, Copy)]
pub struct TemplateValues {
    pub last_sync_time: Option<DateTime<Utc>>,
    pub run_started_at: DateTime<Utc>,
}

/// Variables a model may use.
pub const TEMPLATE_VARIABLES: &[&str] = &["last_sync_time", "run_started_at"];

/// Renders `{{variable}}` references in `sql`. An unknown variable or an unclosed `{{` is an
/// error naming it.
pub fn render_sql(sql: &str, values: &TemplateValues) -> Result<String, String> {
    let mut out = String::with_capacity(sql.len() + 32);
    let mut rest = sql;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let close = after
            .find("}}")
            .ok_or_else(|| "an unclosed `{{` in the model's SQL".to_string())?;
        let variable = after[..close].trim();
        match variable {
            "last_sync_time" => {
                let seconds = values.last_sync_time.map_or(0, |t| t.timestamp());
                out.push_str(&seconds.to_string());
            }
            "run_started_at" => {
                out.push('\'');
                out.push_str(
                    &values
                        .run_started_at
                        .format("%Y-%m-%d %H:%M:%S%.6f+00:00")
                        .to_string(),
                );
                out.push('\'');
            }
            other => {
                return Err(format!(
                    "unknown template variable `{{{{{other}}}}}` in the model's SQL (available: {})",
                    TEMPLATE_VARIABLES
                        .iter()
                        .map(|v| format!("{{{{{v}}}}}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Whether the SQL uses any template variable.
pub fn is_templated(sql: &str) -> bool {
    sql.contains("{{")
}

/// Guards on what a model and its records may be. Defaults follow the seed products; each can
/// be raised or lowered in `sluice.yaml` under `limits:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Characters in a model's SQL.
    pub max_query_chars: usize,
    /// Columns a model returns.
    pub max_columns: usize,
    /// Characters in a column name.
    pub max_column_name_chars: usize,
    /// One record's JSON, in bytes; a larger record fails alone and the run goes on.
    pub max_record_bytes: usize,
    /// One value's size, in bytes; a record holding a larger value fails alone.
    pub max_value_bytes: usize,
    /// Rows one extraction may return; more fails the run before anything is sent.
    pub max_records_per_run: u64,
    /// Records delivered between two commit points of a run: after a crash at most this many
    /// are sent again. Lower means fewer re-sends and more metadata writes.
    pub records_per_checkpoint: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_query_chars: 131_072,
            max_columns: 512,
            max_column_name_chars: 128,
            max_record_bytes: 512 * 1024,
            max_value_bytes: 128 * 1024,
            max_records_per_run: 150_000_000,
            records_per_checkpoint: 8192,
        }
    }
}

impl Limits {
    /// Checks a model's columns; the error names the limit and the column.
    pub fn check_schema(&self, schema: &Schema) -> Result<(), String> {
        if schema.fields().len() > self.max_columns {
            return Err(format!(
                "the query returns {} columns, more than limits.max_columns ({}); select fewer columns",
                schema.fields().len(),
                self.max_columns
            ));
        }
        for field in schema.fields() {
            let chars = field.name().chars().count();
            if chars > self.max_column_name_chars {
                return Err(format!(
                    "column `{}` has a {chars}-character name, more than limits.max_column_name_chars ({}); alias it with AS",
                    field.name(),
                    self.max_column_name_chars
                ));
            }
        }
        Ok(())
    }

    pub fn check_query(&self, sql: &str) -> Result<(), String> {
        let chars = sql.chars().count();
        if chars > self.max_query_chars {
            return Err(format!(
                "the SQL has {chars} characters, more than limits.max_query_chars ({}); move logic into a view",
                self.max_query_chars
            ));
        }
        Ok(())
    }
}

impl Limits {
    /// Records too large to send: the JSON record over `max_record_bytes`, or one value over
    /// `max_value_bytes`. Each is named by its index with the reason.
    pub fn oversized_records(&self, batch: &OutgoingBatch) -> Vec<RecordFailure> {
        if !batch.is_empty() && batch.bodies.total_bytes() == 0 {
            // Written as columns, not as JSON (`Payload::Columns`): only values are limited.
            return self.oversized_values(&batch.fields);
        }
        let mut failures = Vec::new();
        for i in 0..batch.len() {
            let bytes = batch.keys.get(i).len() + batch.bodies.get(i).len();
            // A value cannot be larger than the record that holds it.
            if bytes <= self.max_value_bytes {
                continue;
            }
            if let Some((field, value_bytes)) = largest_value(&batch.fields, i)
                && value_bytes > self.max_value_bytes
            {
                failures.push(RecordFailure {
                    index: i,
                    error: self.value_too_large(&field, value_bytes),
                });
            } else if bytes > self.max_record_bytes {
                failures.push(RecordFailure {
                    index: i,
                    error: format!(
                        "the record is {bytes} bytes as JSON, more than limits.max_record_bytes ({}); the record was not sent",
                        self.max_record_bytes
                    ),
                });
            }
        }
        failures
    }
}

impl Limits {
    /// Records of `fields` holding a string or binary value over `max_value_bytes`, a column at
    /// a time (the largest such value names the record's reason).
    fn oversized_values(&self, fields: &RecordBatch) -> Vec<RecordFailure> {
        let mut largest: std::collections::BTreeMap<usize, (&str, usize)> = std::collections::BTreeMap::new();
        for (field, column) in fields.schema_ref().fields().iter().zip(fields.columns()) {
            let text_or_bytes = matches!(
                column.data_type(),
                DataType::Utf8
                    | DataType::LargeUtf8
                    | DataType::Utf8View
                    | DataType::Binary
                    | DataType::LargeBinary
                    | DataType::BinaryView
            );
            // Value lengths from the arrays' offsets or views, one kernel per column.
            let Some(lengths) = text_or_bytes
                .then(|| arrow::compute::kernels::length::length(column).ok())
                .flatten()
                .and_then(|l| arrow::compute::cast(&l, &DataType::Int64).ok())
            else {
                continue;
            };
            let lengths = lengths
                .as_primitive::<arrow::datatypes::Int64Type>()
                .iter()
                .enumerate()
                .filter_map(|(row, len)| {
                    let len = usize::try_from(len?).ok()?;
                    (len > self.max_value_bytes).then_some((row, len))
                });
            for (row, len) in lengths {
                let entry = largest.entry(row).or_insert((field.name().as_str(), len));
                if len > entry.1 {
                    *entry = (field.name().as_str(), len);
                }
            }
        }
        largest
            .into_iter()
            .map(|(index, (field, value_bytes))| RecordFailure {
                index,
                error: self.value_too_large(field, value_bytes),
            })
            .collect()
    }

    fn value_too_large(&self, field: &str, value_bytes: usize) -> String {
        format!(
            "field `{field}` holds {value_bytes} bytes, more than limits.max_value_bytes ({}); the record was not sent",
            self.max_value_bytes
        )
    }
}

/// The largest string or binary value in row `row`, by field name.
fn largest_value(fields: &RecordBatch, row: usize) -> Option<(String, usize)> {
    let mut largest: Option<(String, usize)> = None;
    for (field, column) in fields.schema().fields().iter().zip(fields.columns()) {
        if column.is_null(row) {
            continue;
        }
        let len = match column.data_type() {
            DataType::Utf8 => column.as_string::<i32>().value(row).len(),
            DataType::LargeUtf8 => column.as_string::<i64>().value(row).len(),
            DataType::Utf8View => column.as_string_view().value(row).len(),
            DataType::Binary => column.as_binary::<i32>().value(row).len(),
            DataType::LargeBinary => column.as_binary::<i64>().value(row).len(),
            DataType::BinaryView => column.as_binary_view().value(row).len(),
            _ => continue,
        };
        if largest.as_ref().is_none_or(|(_, l)| len > *l) {
            largest = Some((field.name().clone(), len));
        }
    }
    largest
}

#[cfg(test)]
mod tests {
    use arrow::datatypes::{DataType, Field};
    use chrono::TimeZone;

    use super::*;

    fn values(last: Option<i64>) -> TemplateValues {
        TemplateValues {
            last_sync_time: last.map(|s| Utc.timestamp_opt(s, 0).unwrap()),
            run_started_at: Utc.with_ymd_and_hms(2026, 11, 22, 9, 30, 0).unwrap(),
        }
    }

    #[test]
    fn variables_render_as_literals() {
        let sql = "SELECT * FROM e WHERE ts > {{ last_sync_time }} AND ts <= {{run_started_at}}";
        assert_eq!(
            render_sql(sql, &values(Some(1_700_000_000))).unwrap(),
            "SELECT * FROM e WHERE ts > 1700000000 AND ts <= '2026-11-22 09:30:00.000000+00:00'"
        );
        assert_eq!(
            render_sql("SELECT {{last_sync_time}}", &values(None)).unwrap(),
            "SELECT 0"
        );
        assert_eq!(
            render_sql("SELECT '{' || 1", &values(None)).unwrap(),
            "SELECT '{' || 1"
        );
    }

    #[test]
    fn unknown_variables_and_unclosed_braces_are_errors() {
        let err = render_sql("SELECT {{user_input}}", &values(None)).unwrap_err();
        assert!(err.contains("`{{user_input}}`"), "{err}");
        assert!(err.contains("{{last_sync_time}}"), "{err}");
        assert!(render_sql("SELECT {{last_sync_time", &values(None)).is_err());
    }

    #[test]
    fn records_written_as_columns_are_limited_by_their_values() {
        use std::sync::Arc;

        use arrow::array::{ArrayRef, BinaryArray, Int64Array, StringViewArray};

        use crate::destination::Payload;
        use crate::mapping::MappingPlan;

        let long = "x".repeat(40);
        let batch = RecordBatch::try_from_iter(vec![
            ("id", Arc::new(Int64Array::from(vec![1, 2, 3])) as ArrayRef),
            (
                "note",
                Arc::new(StringViewArray::from(vec![
                    Some("short"),
                    Some(long.as_str()),
                    None,
                ])) as ArrayRef,
            ),
            (
                "blob",
                Arc::new(BinaryArray::from(vec![
                    Some(&[0u8; 30][..]),
                    Some(&[0u8; 50][..]),
                    None,
                ])) as ArrayRef,
            ),
        ])
        .unwrap();
        let mut config: crate::config::MappingConfig =
            serde_norway::from_str("{model: m, destination: d}").unwrap();
        config.resolve_send(false);
        let plan = MappingPlan::compile("m", &config, "m", &batch.schema(), &["id".into()], None).unwrap();
        let limits = Limits {
            max_value_bytes: 20,
            max_record_bytes: 100,
            ..Limits::default()
        };
        let columns = plan
            .encode_for(
                &batch,
                vec![crate::config::Op::Added; 3],
                &[1, 2, 3],
                Payload::Columns,
            )
            .unwrap()
            .records;
        let failures = limits.oversized_records(&columns);
        assert_eq!(failures.iter().map(|f| f.index).collect::<Vec<_>>(), [0, 1]);
        assert!(
            failures[0].error.contains("field `blob` holds 30 bytes"),
            "{}",
            failures[0].error
        );
        assert!(
            failures[1].error.contains("field `blob` holds 50 bytes"),
            "{}",
            failures[1].error
        );
        // As JSON the same records are also limited as a whole.
        let json = plan
            .encode_for(
                &batch,
                vec![crate::config::Op::Added; 3],
                &[1, 2, 3],
                Payload::Json,
            )
            .unwrap()
            .records;
        assert_eq!(limits.oversized_records(&json).len(), 2);
    }

    #[test]
    fn limits_name_the_limit_and_the_column() {
        let limits = Limits::default();
        let long = "x".repeat(129);
        let schema = Schema::new(vec![Field::new(&long, DataType::Int64, true)]);
        let err = limits.check_schema(&schema).unwrap_err();
        assert!(err.contains("limits.max_column_name_chars (128)"), "{err}");
        let wide = Schema::new(
            (0..513)
                .map(|i| Field::new(format!("c{i}"), DataType::Int64, true))
                .collect::<Vec<_>>(),
        );
        assert!(
            limits
                .check_schema(&wide)
                .unwrap_err()
                .contains("limits.max_columns (512)")
        );
        assert!(limits.check_query(&"s".repeat(131_073)).is_err());
        assert!(limits.check_query(&"s".repeat(131_072)).is_ok());
    }
}
