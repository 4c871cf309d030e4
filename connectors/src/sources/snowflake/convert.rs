//! Snowflake's result columns into sluice's Arrow types.
//!
//! Snowflake describes each column in `rowtype` (its SQL type, precision and scale) and sends the
//! values either as Arrow, in its own encodings (a `NUMBER` as the unscaled integer, narrowed to
//! the smallest width that holds a batch; a timestamp as seconds and nanoseconds in a struct, or
//! as one integer scaled by 10^scale), or as JSON rowsets of strings. Both are converted here to
//! the types every other source uses, decided by `rowtype` alone, so every batch of a result has
//! the same schema whatever widths Snowflake picked for it.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryBuilder, BooleanBuilder, Date32Builder, Decimal128Builder,
    Float64Builder, Int64Array, Int64Builder, StringBuilder, StructArray, Time64MicrosecondBuilder,
    TimestampMicrosecondArray, TimestampMicrosecondBuilder,
};
use arrow::compute::{CastOptions, cast_with_options};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef, TimeUnit};
use arrow::util::display::FormatOptions;
use base64::Engine as _;
use serde::Deserialize;

/// One column as Snowflake describes it (`data.rowtype[]`).
#[derive(Debug, Clone, Deserialize)]
pub struct RowType {
    pub name: String,
    #[serde(rename = "type")]
    pub type_name: String,
    #[serde(default)]
    pub precision: Option<i64>,
    #[serde(default)]
    pub scale: Option<i64>,
}

impl RowType {
    /// The type as Snowflake's SQL writes it, for messages.
    pub fn describe(&self) -> String {
        let name = self.type_name.to_ascii_uppercase();
        match (self.type_name.as_str(), self.precision, self.scale) {
            ("fixed", Some(p), Some(s)) => format!("NUMBER({p},{s})"),
            _ => name,
        }
    }
}

/// How a column is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    /// `NUMBER(p, 0)`: Int64; a value past 64 bits fails naming the column.
    Integer,
    /// `NUMBER(p, s)`, s > 0: Decimal128(p, s).
    Decimal {
        precision: u8,
        scale: i8,
    },
    /// `FLOAT` / `REAL` / `DOUBLE`.
    Float,
    /// `VARCHAR` and friends; also `VARIANT`, `OBJECT`, `ARRAY` (their JSON text) and
    /// `GEOGRAPHY`/`GEOMETRY` (as Snowflake renders them, GeoJSON by default).
    Text,
    Binary,
    Boolean,
    Date,
    /// `TIME(scale)`: Time64(µs).
    Time {
        scale: u32,
    },
    /// `TIMESTAMP_NTZ`: Timestamp(µs) without zone; `_LTZ` and `_TZ`: the UTC instant.
    Timestamp {
        scale: u32,
        utc: bool,
    },
}

impl ColumnKind {
    /// The kind for a described column, or a hint saying how to cast it.
    pub fn for_row_type(row_type: &RowType) -> Result<Self, String> {
        let scale = row_type.scale.unwrap_or(0);
        let time_scale = || u32::try_from(row_type.scale.unwrap_or(9)).unwrap_or(9).min(9);
        Ok(match row_type.type_name.to_ascii_lowercase().as_str() {
            "fixed" if scale == 0 => Self::Integer,
            "fixed" => {
                let precision = row_type.precision.unwrap_or(38);
                match (u8::try_from(precision), i8::try_from(scale)) {
                    (Ok(p), Ok(s)) if (1..=38).contains(&p) && (0..=p as i8).contains(&s) => Self::Decimal {
                        precision: p,
                        scale: s,
                    },
                    _ => {
                        return Err(format!(
                            "cast it to NUMBER(38, s) or FLOAT (it is NUMBER({precision},{scale}))"
                        ));
                    }
                }
            }
            "real" | "float" | "double" => Self::Float,
            "text" | "variant" | "object" | "array" | "geography" | "geometry" => Self::Text,
            "binary" => Self::Binary,
            "boolean" => Self::Boolean,
            "date" => Self::Date,
            "time" => Self::Time { scale: time_scale() },
            "timestamp_ntz" => Self::Timestamp {
                scale: time_scale(),
                utc: false,
            },
            "timestamp_ltz" | "timestamp_tz" => Self::Timestamp {
                scale: time_scale(),
                utc: true,
            },
            "vector" | "map" => {
                return Err("convert it to text in the model's SQL, e.g. `TO_JSON(col)`".into());
            }
            _ => return Err("cast it to VARCHAR, NUMBER or TIMESTAMP in the model's SQL".into()),
        })
    }

    pub fn data_type(&self) -> DataType {
        match self {
            Self::Integer => DataType::Int64,
            Self::Decimal { precision, scale } => DataType::Decimal128(*precision, *scale),
            Self::Float => DataType::Float64,
            Self::Text => DataType::Utf8,
            Self::Binary => DataType::Binary,
            Self::Boolean => DataType::Boolean,
            Self::Date => DataType::Date32,
            Self::Time { .. } => DataType::Time64(TimeUnit::Microsecond),
            Self::Timestamp { utc: false, .. } => DataType::Timestamp(TimeUnit::Microsecond, None),
            Self::Timestamp { utc: true, .. } => {
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
            }
        }
    }

    /// Converts one column of a Snowflake Arrow batch.
    pub fn from_arrow(&self, array: &ArrayRef) -> Result<ArrayRef, String> {
        let strict = CastOptions {
            safe: false,
            format_options: FormatOptions::default(),
        };
        let cast = |to: &DataType| cast_with_options(array, to, &strict).map_err(|e| e.to_string());
        match (self, array.data_type()) {
            (Self::Integer, DataType::Decimal128(_, _)) => cast(&DataType::Int64).map_err(|_| {
                "a value does not fit in a 64-bit integer; cast the column to VARCHAR or to NUMBER(38, s) with s > 0"
                    .to_string()
            }),
            (Self::Integer, t) if t.is_integer() => cast(&DataType::Int64),
            (Self::Decimal { precision, scale }, t) if t.is_integer() => {
                // The unscaled value: 12.34 at scale 2 arrives as 1234.
                let unscaled = cast(&DataType::Int64)?;
                let decimals = unscaled
                    .as_primitive::<Int64Type>()
                    .unary::<_, arrow::datatypes::Decimal128Type>(i128::from)
                    .with_precision_and_scale(*precision, *scale)
                    .map_err(|e| e.to_string())?;
                Ok(Arc::new(decimals))
            }
            (Self::Decimal { precision, scale }, DataType::Decimal128(_, s)) if s == scale => {
                let decimals = array
                    .as_primitive::<arrow::datatypes::Decimal128Type>()
                    .clone()
                    .with_precision_and_scale(*precision, *scale)
                    .map_err(|e| e.to_string())?;
                Ok(Arc::new(decimals))
            }
            (Self::Time { scale }, t) if t.is_integer() => {
                let micros = rescale_to_micros(&cast(&DataType::Int64)?, *scale);
                Ok(Arc::new(arrow::array::Time64MicrosecondArray::new(
                    micros.values().clone(),
                    micros.nulls().cloned(),
                )))
            }
            (Self::Timestamp { scale, .. }, t) if t.is_integer() => {
                let micros = rescale_to_micros(&cast(&DataType::Int64)?, *scale);
                Ok(self.timestamps(micros))
            }
            (Self::Timestamp { scale, .. }, DataType::Struct(_)) => {
                let micros = struct_timestamps_to_micros(array.as_struct(), *scale)?;
                Ok(self.timestamps(micros))
            }
            (Self::Timestamp { .. }, DataType::Timestamp(_, _)) => cast(&self.data_type()),
            (Self::Date, DataType::Int32) => cast(&DataType::Date32),
            (_, t) if t == &self.data_type() => Ok(array.clone()),
            (Self::Text | Self::Binary | Self::Float | Self::Boolean | Self::Date | Self::Decimal { .. }, _) => {
                cast(&self.data_type())
            }
            (_, other) => Err(format!("unexpected Arrow type {other} for this column")),
        }
    }

    fn timestamps(&self, micros: Int64Array) -> ArrayRef {
        let array = TimestampMicrosecondArray::new(micros.values().clone(), micros.nulls().cloned());
        match self {
            Self::Timestamp { utc: true, .. } => Arc::new(array.with_timezone("UTC")),
            _ => Arc::new(array),
        }
    }

    /// Converts one column of a JSON rowset (every value a string or null).
    pub fn from_json(&self, values: &[Option<&str>]) -> Result<ArrayRef, (usize, String)> {
        fn build<B, T>(
            values: &[Option<&str>],
            mut builder: B,
            parse: impl Fn(&str) -> Result<T, String>,
            append: impl Fn(&mut B, Option<T>),
            finish: impl FnOnce(B) -> ArrayRef,
        ) -> Result<ArrayRef, (usize, String)> {
            for (row, value) in values.iter().enumerate() {
                match value {
                    Some(text) => append(&mut builder, Some(parse(text).map_err(|e| (row, e))?)),
                    None => append(&mut builder, None),
                }
            }
            Ok(finish(builder))
        }
        let n = values.len();
        match *self {
            Self::Integer => build(
                values,
                Int64Builder::with_capacity(n),
                |t| {
                    t.parse::<i64>().map_err(|_| {
                        format!("`{t}` does not fit in a 64-bit integer; cast the column to VARCHAR")
                    })
                },
                |b, v| b.append_option(v),
                |mut b| Arc::new(b.finish()),
            ),
            Self::Decimal { precision, scale } => build(
                values,
                Decimal128Builder::with_capacity(n),
                |t| parse_decimal(t, scale),
                |b, v| b.append_option(v),
                |mut b| {
                    Arc::new(
                        b.finish()
                            .with_precision_and_scale(precision, scale)
                            .expect("precision and scale were checked when the column was described"),
                    )
                },
            ),
            Self::Float => build(
                values,
                Float64Builder::with_capacity(n),
                |t| match t {
                    "inf" | "Infinity" => Ok(f64::INFINITY),
                    "-inf" | "-Infinity" => Ok(f64::NEG_INFINITY),
                    _ => t.parse::<f64>().map_err(|_| format!("`{t}` is not a number")),
                },
                |b, v| b.append_option(v),
                |mut b| Arc::new(b.finish()),
            ),
            Self::Text => build(
                values,
                StringBuilder::with_capacity(n, n * 16),
                |t| Ok(t.to_string()),
                |b, v| b.append_option(v),
                |mut b| Arc::new(b.finish()),
            ),
            Self::Binary => build(
                values,
                BinaryBuilder::with_capacity(n, n * 16),
                // Snowflake's default BINARY_OUTPUT_FORMAT is hex.
                |t| decode_hex(t).ok_or_else(|| format!("`{t}` is not hexadecimal binary")),
                |b, v| b.append_option(v),
                |mut b| Arc::new(b.finish()),
            ),
            Self::Boolean => build(
                values,
                BooleanBuilder::with_capacity(n),
                |t| match t {
                    "1" | "true" | "TRUE" => Ok(true),
                    "0" | "false" | "FALSE" => Ok(false),
                    _ => Err(format!("`{t}` is not a boolean")),
                },
                |b, v| b.append_option(v),
                |mut b| Arc::new(b.finish()),
            ),
            // Days since the epoch.
            Self::Date => build(
                values,
                Date32Builder::with_capacity(n),
                |t| t.parse::<i32>().map_err(|_| format!("`{t}` is not a day number")),
                |b, v| b.append_option(v),
                |mut b| Arc::new(b.finish()),
            ),
            // Seconds since midnight with a fraction.
            Self::Time { .. } => build(
                values,
                Time64MicrosecondBuilder::with_capacity(n),
                seconds_to_micros,
                |b, v| b.append_option(v),
                |mut b| Arc::new(b.finish()),
            ),
            // Seconds since the epoch with a fraction; `_TZ` adds ` <offset minutes + 1440>`,
            // while the seconds are already the UTC instant.
            Self::Timestamp { utc, .. } => build(
                values,
                TimestampMicrosecondBuilder::with_capacity(n),
                |t| seconds_to_micros(t.split(' ').next().unwrap_or(t)),
                |b, v| b.append_option(v),
                |mut b| {
                    let array = b.finish();
                    if utc {
                        Arc::new(array.with_timezone("UTC"))
                    } else {
                        Arc::new(array)
                    }
                },
            ),
        }
    }
}

/// The Arrow schema of a result. Every column is nullable: a compiled statement's `nullable` in
/// `rowtype` is not a promise about the rows (an outer join's columns, say), so it is not read.
pub fn schema_of(row_types: &[RowType], kinds: &[ColumnKind]) -> SchemaRef {
    let fields: Vec<Field> = row_types
        .iter()
        .zip(kinds)
        .map(|(row_type, kind)| Field::new(&row_type.name, kind.data_type(), true))
        .collect();
    Arc::new(Schema::new(fields))
}

/// A value `v × 10^-scale` seconds, in microseconds (finer digits are dropped).
fn rescale_to_micros(values: &ArrayRef, scale: u32) -> Int64Array {
    let values = values.as_primitive::<Int64Type>();
    if scale >= 6 {
        let divisor = 10i64.pow(scale - 6);
        values.unary(|v| v.div_euclid(divisor))
    } else {
        let factor = 10i64.pow(6 - scale);
        values.unary(|v| v.saturating_mul(factor))
    }
}

/// Snowflake's structured timestamps: `{epoch: seconds, fraction: nanoseconds[, timezone]}`, or
/// `{epoch: value × 10^scale, timezone}` (eight-byte `_TZ`).
fn struct_timestamps_to_micros(array: &StructArray, scale: u32) -> Result<Int64Array, String> {
    let epoch = array
        .column_by_name("epoch")
        .ok_or("a structured timestamp without `epoch`")?;
    let epoch =
        cast_with_options(epoch, &DataType::Int64, &CastOptions::default()).map_err(|e| e.to_string())?;
    let epoch = epoch.as_primitive::<Int64Type>();
    let nulls = arrow::buffer::NullBuffer::union(array.nulls(), epoch.nulls());
    let micros: Int64Array = match array.column_by_name("fraction") {
        Some(fraction) => {
            let fraction = cast_with_options(fraction, &DataType::Int64, &CastOptions::default())
                .map_err(|e| e.to_string())?;
            let fraction = fraction.as_primitive::<Int64Type>();
            epoch
                .values()
                .iter()
                .zip(fraction.values().iter())
                .map(|(seconds, nanos)| seconds.saturating_mul(1_000_000).saturating_add(nanos / 1000))
                .collect::<Vec<i64>>()
                .into()
        }
        None => rescale_to_micros(&(Arc::new(epoch.clone()) as ArrayRef), scale),
    };
    Ok(Int64Array::new(micros.values().clone(), nulls))
}

/// `"1700000000.123456789"` (or `"-1.5"`, `"12"`) seconds into microseconds.
fn seconds_to_micros(text: &str) -> Result<i64, String> {
    let bad = || format!("`{text}` is not a number of seconds");
    let (sign, digits) = match text.strip_prefix('-') {
        Some(rest) => (-1i64, rest),
        None => (1, text),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let whole: i64 = whole.parse().map_err(|_| bad())?;
    if !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let mut micros = 0i64;
    for i in 0..6 {
        micros = micros * 10 + fraction.as_bytes().get(i).map_or(0, |b| i64::from(b - b'0'));
    }
    Ok(sign * (whole * 1_000_000 + micros))
}

/// A decimal string at exactly `scale` digits (Snowflake writes them so).
fn parse_decimal(text: &str, scale: i8) -> Result<i128, String> {
    let bad = || format!("`{text}` is not a decimal number");
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    if whole.is_empty() && fraction.is_empty() {
        return Err(bad());
    }
    let mut value: i128 = 0;
    for b in whole.bytes() {
        if !b.is_ascii_digit() {
            return Err(bad());
        }
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(i128::from(b - b'0')))
            .ok_or_else(bad)?;
    }
    let scale = scale.max(0) as usize;
    if fraction.len() > scale || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    for i in 0..scale {
        let digit = fraction.as_bytes().get(i).map_or(0, |b| i128::from(b - b'0'));
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(digit))
            .ok_or_else(bad)?;
    }
    Ok(if negative { -value } else { value })
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The inline part of a result (`rowsetBase64`) as Arrow IPC bytes.
pub fn decode_base64(text: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| format!("the inline result is not base64: {e}"))
}

#[cfg(test)]
mod tests {
    use arrow::array::{Decimal128Array, Int8Array, Int32Array, StringArray};
    use arrow::datatypes::Fields;

    use super::*;

    fn row_type(type_name: &str, precision: i64, scale: i64) -> RowType {
        RowType {
            name: "C".into(),
            type_name: type_name.into(),
            precision: Some(precision),
            scale: Some(scale),
        }
    }

    #[test]
    fn numbers_arrive_unscaled_in_any_width_and_become_one_type() {
        let kind = ColumnKind::for_row_type(&row_type("fixed", 10, 2)).unwrap();
        assert_eq!(kind.data_type(), DataType::Decimal128(10, 2));
        let narrow: ArrayRef = Arc::new(Int8Array::from(vec![Some(-5), None, Some(127)]));
        let wide: ArrayRef = Arc::new(Int32Array::from(vec![123_456]));
        let a = kind.from_arrow(&narrow).unwrap();
        let b = kind.from_arrow(&wide).unwrap();
        let a = a.as_any().downcast_ref::<Decimal128Array>().unwrap();
        assert_eq!(a.value_as_string(0), "-0.05");
        assert!(a.is_null(1));
        assert_eq!(a.value_as_string(2), "1.27");
        assert_eq!(
            b.as_primitive::<arrow::datatypes::Decimal128Type>()
                .value_as_string(0),
            "1234.56"
        );

        let integer = ColumnKind::for_row_type(&row_type("fixed", 38, 0)).unwrap();
        let big: ArrayRef = Arc::new(
            Decimal128Array::from(vec![i128::from(i64::MAX) + 1])
                .with_precision_and_scale(38, 0)
                .unwrap(),
        );
        let err = integer.from_arrow(&big).unwrap_err();
        assert!(err.contains("64-bit"), "{err}");
    }

    #[test]
    fn structured_and_scaled_timestamps_become_microseconds() {
        let kind = ColumnKind::for_row_type(&row_type("timestamp_ntz", 0, 9)).unwrap();
        let fields = Fields::from(vec![
            Field::new("epoch", DataType::Int64, false),
            Field::new("fraction", DataType::Int32, false),
        ]);
        let structs: ArrayRef = Arc::new(StructArray::new(
            fields,
            vec![
                Arc::new(Int64Array::from(vec![1_700_000_000, -1, 0])),
                Arc::new(Int32Array::from(vec![123_456_789, 500_000_000, 0])),
            ],
            Some(vec![true, true, false].into()),
        ));
        let out = kind.from_arrow(&structs).unwrap();
        let out = out.as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
        assert_eq!(out.value(0), 1_700_000_000_123_456);
        assert_eq!(out.value(1), -500_000);
        assert!(out.is_null(2));

        let ltz = ColumnKind::for_row_type(&row_type("timestamp_ltz", 0, 3)).unwrap();
        let scaled: ArrayRef = Arc::new(Int64Array::from(vec![1_700_000_000_123]));
        let out = ltz.from_arrow(&scaled).unwrap();
        assert_eq!(
            out.data_type(),
            &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
        );
        assert_eq!(
            out.as_primitive::<arrow::datatypes::TimestampMicrosecondType>()
                .value(0),
            1_700_000_000_123_000
        );
    }

    #[test]
    fn json_rowsets_parse_into_the_same_types() {
        let decimal = ColumnKind::Decimal {
            precision: 12,
            scale: 3,
        };
        let out = decimal.from_json(&[Some("-12.5"), Some("7"), None]).unwrap();
        let out = out.as_primitive::<arrow::datatypes::Decimal128Type>();
        assert_eq!(out.value_as_string(0), "-12.500");
        assert_eq!(out.value_as_string(1), "7.000");
        assert!(out.is_null(2));

        let ts = ColumnKind::Timestamp { scale: 9, utc: true };
        let out = ts
            .from_json(&[Some("1700000000.123456789 1560"), Some("-0.5")])
            .unwrap();
        let out = out.as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
        assert_eq!(out.value(0), 1_700_000_000_123_456);
        assert_eq!(out.value(1), -500_000);

        let (row, message) = ColumnKind::Integer
            .from_json(&[Some("1"), Some("99999999999999999999")])
            .unwrap_err();
        assert_eq!(row, 1);
        assert!(message.contains("64-bit"), "{message}");

        let text = ColumnKind::Text.from_json(&[Some("a"), None]).unwrap();
        assert_eq!(text.as_any().downcast_ref::<StringArray>().unwrap().value(0), "a");
        let bytes = ColumnKind::Binary.from_json(&[Some("00ff")]).unwrap();
        assert_eq!(bytes.as_binary::<i32>().value(0), &[0, 255]);
    }

    #[test]
    fn unsupported_types_say_how_to_cast() {
        let err = ColumnKind::for_row_type(&row_type("vector", 0, 0)).unwrap_err();
        assert!(err.contains("TO_JSON"), "{err}");
    }
}
