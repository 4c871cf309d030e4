//! Column-at-a-time JSON encoding of Arrow arrays.
//!
//! Payloads are built without a per-row JSON value: each column a mapping uses is encoded once
//! into one contiguous buffer of JSON fragments (one per row), with a single downcast per column
//! and a tight loop per type; records are then assembled by copying fragments between the
//! pre-rendered literal parts of the mapping's template (see [`crate::mapping`]).
//!
//! Value rendering: integers and decimals as JSON numbers (decimals keep their scale: `12.50`);
//! floats in shortest round-trip form, with NaN and infinities as `null`; strings escaped as JSON
//! requires; booleans; dates `YYYY-MM-DD`; timestamps ISO 8601 (`2024-05-01T12:30:00.250Z` when
//! the column has a time zone, converted to UTC; without the `Z` when it has none); times
//! `HH:MM:SS[.ffffff]`; binary as base64; lists as arrays, structs and maps as objects.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, PrimitiveArray};
use arrow::datatypes::{
    ArrowPrimitiveType, DataType, Date32Type, Date64Type, Decimal128Type, Field, Float16Type, Float32Type,
    Float64Type, Int8Type, Int16Type, Int32Type, Int64Type, Time32MillisecondType, Time32SecondType,
    Time64MicrosecondType, Time64NanosecondType, TimeUnit, TimestampMicrosecondType,
    TimestampMillisecondType, TimestampNanosecondType, TimestampSecondType, UInt8Type, UInt16Type,
    UInt32Type, UInt64Type,
};
use arrow::error::ArrowError;
use base64::Engine as _;

/// One JSON fragment per row, back to back in one buffer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JsonColumn {
    data: Vec<u8>,
    /// `offsets[i]..offsets[i + 1]` is row `i`; `offsets.len() == rows + 1`.
    offsets: Vec<usize>,
}

impl JsonColumn {
    pub fn with_capacity(rows: usize, bytes: usize) -> Self {
        let mut offsets = Vec::with_capacity(rows + 1);
        offsets.push(0);
        Self {
            data: Vec::with_capacity(bytes),
            offsets,
        }
    }

    pub fn len(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The JSON text of row `i`.
    pub fn get(&self, i: usize) -> &[u8] {
        &self.data[self.offsets[i]..self.offsets[i + 1]]
    }

    /// The buffer rows are written into; call [`Self::end_row`] after each row.
    pub fn buffer(&mut self) -> &mut Vec<u8> {
        &mut self.data
    }

    pub fn end_row(&mut self) {
        self.offsets.push(self.data.len());
    }

    pub fn push(&mut self, fragment: &[u8]) {
        self.data.extend_from_slice(fragment);
        self.end_row();
    }

    pub fn total_bytes(&self) -> usize {
        self.data.len()
    }

    /// Bytes of rows `range`.
    pub fn bytes_of(&self, range: std::ops::Range<usize>) -> usize {
        if range.is_empty() {
            return 0;
        }
        self.offsets[range.end] - self.offsets[range.start]
    }

    /// `rows` rows of no text: what was not rendered because nothing reads it.
    pub fn empty_rows(rows: usize) -> Self {
        Self {
            data: Vec::new(),
            offsets: vec![0; rows + 1],
        }
    }

    fn all_null(rows: usize) -> Self {
        let mut column = Self::with_capacity(rows, rows * 4);
        for _ in 0..rows {
            column.push(b"null");
        }
        column
    }
}

/// Encodes every value of `array` as a JSON fragment.
pub fn encode_column(array: &ArrayRef) -> Result<JsonColumn, ArrowError> {
    let rows = array.len();
    let nulls = array.logical_nulls();
    let is_null = |i: usize| nulls.as_ref().is_some_and(|n| n.is_null(i));
    let mut out = JsonColumn::with_capacity(rows, rows * 8);

    macro_rules! integers {
        ($t:ty) => {{
            let values = array.as_primitive::<$t>();
            let mut buf = itoa::Buffer::new();
            for i in 0..rows {
                if is_null(i) {
                    out.push(b"null");
                } else {
                    out.push(buf.format(values.value(i)).as_bytes());
                }
            }
        }};
    }

    match array.data_type() {
        DataType::Null => return Ok(JsonColumn::all_null(rows)),
        DataType::Boolean => {
            let values = array.as_boolean();
            for i in 0..rows {
                out.push(match (is_null(i), values.value(i)) {
                    (true, _) => b"null",
                    (false, true) => b"true",
                    (false, false) => b"false",
                });
            }
        }
        DataType::Int8 => integers!(Int8Type),
        DataType::Int16 => integers!(Int16Type),
        DataType::Int32 => integers!(Int32Type),
        DataType::Int64 => integers!(Int64Type),
        DataType::UInt8 => integers!(UInt8Type),
        DataType::UInt16 => integers!(UInt16Type),
        DataType::UInt32 => integers!(UInt32Type),
        DataType::UInt64 => integers!(UInt64Type),
        DataType::Float16 => encode_floats::<Float16Type>(array, &is_null, &mut out, |v| v.to_f64()),
        DataType::Float32 => {
            let values = array.as_primitive::<Float32Type>();
            let mut buf = ryu::Buffer::new();
            for i in 0..rows {
                let v = values.value(i);
                if is_null(i) || !v.is_finite() {
                    out.push(b"null");
                } else {
                    out.push(buf.format_finite(v).as_bytes());
                }
            }
        }
        DataType::Float64 => encode_floats::<Float64Type>(array, &is_null, &mut out, |v| v),
        DataType::Decimal128(_, scale) => {
            let values = array.as_primitive::<Decimal128Type>();
            for i in 0..rows {
                if is_null(i) {
                    out.push(b"null");
                } else {
                    write_decimal(out.buffer(), values.value(i), *scale);
                    out.end_row();
                }
            }
        }
        DataType::Utf8 => {
            let values = array.as_string::<i32>();
            encode_strings(rows, &is_null, |i| values.value(i), &mut out);
        }
        DataType::LargeUtf8 => {
            let values = array.as_string::<i64>();
            encode_strings(rows, &is_null, |i| values.value(i), &mut out);
        }
        DataType::Utf8View => {
            let values = array.as_string_view();
            encode_strings(rows, &is_null, |i| values.value(i), &mut out);
        }
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView | DataType::FixedSizeBinary(_) => {
            let engine = base64::engine::general_purpose::STANDARD;
            for i in 0..rows {
                if is_null(i) {
                    out.push(b"null");
                    continue;
                }
                let bytes: &[u8] = match array.data_type() {
                    DataType::Binary => array.as_binary::<i32>().value(i),
                    DataType::LargeBinary => array.as_binary::<i64>().value(i),
                    DataType::BinaryView => array.as_binary_view().value(i),
                    _ => array.as_fixed_size_binary().value(i),
                };
                let buf = out.buffer();
                buf.push(b'"');
                let start = buf.len();
                buf.resize(start + bytes.len().div_ceil(3) * 4, 0);
                let written = engine
                    .encode_slice(bytes, &mut buf[start..])
                    .map_err(|e| ArrowError::ComputeError(e.to_string()))?;
                buf.truncate(start + written);
                buf.push(b'"');
                out.end_row();
            }
        }
        DataType::Date32 => {
            let values = array.as_primitive::<Date32Type>();
            for i in 0..rows {
                if is_null(i) {
                    out.push(b"null");
                } else {
                    let buf = out.buffer();
                    buf.push(b'"');
                    write_date(buf, values.value(i) as i64);
                    buf.push(b'"');
                    out.end_row();
                }
            }
        }
        DataType::Date64 => {
            let values = array.as_primitive::<Date64Type>();
            for i in 0..rows {
                if is_null(i) {
                    out.push(b"null");
                } else {
                    let buf = out.buffer();
                    buf.push(b'"');
                    write_date(buf, values.value(i).div_euclid(86_400_000));
                    buf.push(b'"');
                    out.end_row();
                }
            }
        }
        DataType::Timestamp(unit, tz) => {
            let zulu = tz.is_some();
            match unit {
                TimeUnit::Second => {
                    encode_timestamps::<TimestampSecondType>(array, &is_null, &mut out, 1_000_000_000, zulu)
                }
                TimeUnit::Millisecond => {
                    encode_timestamps::<TimestampMillisecondType>(array, &is_null, &mut out, 1_000_000, zulu)
                }
                TimeUnit::Microsecond => {
                    encode_timestamps::<TimestampMicrosecondType>(array, &is_null, &mut out, 1_000, zulu)
                }
                TimeUnit::Nanosecond => {
                    encode_timestamps::<TimestampNanosecondType>(array, &is_null, &mut out, 1, zulu)
                }
            }
        }
        DataType::Time32(TimeUnit::Second) => {
            encode_times::<Time32SecondType>(array, &is_null, &mut out, |v| v as i64 * 1_000_000_000)
        }
        DataType::Time32(_) => {
            encode_times::<Time32MillisecondType>(array, &is_null, &mut out, |v| v as i64 * 1_000_000)
        }
        DataType::Time64(TimeUnit::Microsecond) => {
            encode_times::<Time64MicrosecondType>(array, &is_null, &mut out, |v| v * 1_000)
        }
        DataType::Time64(_) => encode_times::<Time64NanosecondType>(array, &is_null, &mut out, |v| v),
        DataType::Dictionary(_, value_type) => {
            let unpacked = arrow::compute::cast(array, value_type)?;
            return encode_column(&unpacked);
        }
        // Nested and rare types: arrow-json's encoders (one virtual call per value; these
        // columns are uncommon in models and dominated by their children's work anyway).
        _ => {
            let field = Arc::new(Field::new("value", array.data_type().clone(), true));
            let options = arrow::json::writer::EncoderOptions::default().with_explicit_nulls(true);
            let mut encoder = arrow::json::writer::make_encoder(&field, array.as_ref(), &options)?;
            for i in 0..rows {
                if is_null(i) {
                    out.push(b"null");
                } else {
                    encoder.encode(i, out.buffer());
                    out.end_row();
                }
            }
        }
    }
    Ok(out)
}

/// Encodes `array` as a mapped field's `as:` asks. Values that cannot be written that way are
/// returned as `(row, reason)` and written as `null`; their records are not sent.
pub fn encode_formatted(
    array: &ArrayRef,
    format: Option<crate::destination::ValueFormat>,
) -> Result<(JsonColumn, Vec<(usize, String)>), ArrowError> {
    use crate::destination::ValueFormat;
    let mut problems = Vec::new();
    let column = match format {
        None => encode_column(array)?,
        Some(ValueFormat::Json) => match array.data_type() {
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
                let text = arrow::compute::cast(array, &DataType::Utf8)?;
                let text = text.as_string::<i32>();
                let mut out = JsonColumn::with_capacity(text.len(), text.value_data().len() + 8);
                for i in 0..text.len() {
                    if text.is_null(i) {
                        out.push(b"null");
                        continue;
                    }
                    let value = text.value(i).trim();
                    match serde_json::from_str::<serde::de::IgnoredAny>(value) {
                        Ok(_) => out.push(value.as_bytes()),
                        Err(e) => {
                            problems.push((i, format!("is not valid JSON ({e})")));
                            out.push(b"null");
                        }
                    }
                }
                out
            }
            // Lists, structs and maps already are JSON values; other types are sent as is.
            _ => encode_column(array)?,
        },
        Some(ValueFormat::String) => {
            let encoded = encode_column(array)?;
            let mut out = JsonColumn::with_capacity(encoded.len(), encoded.total_bytes() + encoded.len() * 2);
            for i in 0..encoded.len() {
                let fragment = encoded.get(i);
                if fragment.first() == Some(&b'"') || fragment == b"null" {
                    out.push(fragment);
                } else {
                    write_json_string(out.buffer(), &String::from_utf8_lossy(fragment));
                    out.end_row();
                }
            }
            out
        }
        Some(format @ (ValueFormat::UnixMs | ValueFormat::UnixSeconds)) => {
            let divisor = if format == ValueFormat::UnixMs { 1 } else { 1000 };
            match array.data_type() {
                dt if dt.is_integer() => encode_column(array)?,
                DataType::Timestamp(..)
                | DataType::Date32
                | DataType::Date64
                | DataType::Utf8
                | DataType::LargeUtf8
                | DataType::Utf8View => {
                    let target = DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
                    let millis = arrow::compute::cast(array, &target)?;
                    let millis = millis.as_primitive::<TimestampMillisecondType>();
                    let mut out = JsonColumn::with_capacity(millis.len(), millis.len() * 14);
                    let mut buf = itoa::Buffer::new();
                    for i in 0..millis.len() {
                        if millis.is_null(i) {
                            if array.is_valid(i) {
                                problems.push((i, "is not a date or timestamp".to_string()));
                            }
                            out.push(b"null");
                        } else {
                            out.push(buf.format(millis.value(i).div_euclid(divisor)).as_bytes());
                        }
                    }
                    out
                }
                other => {
                    return Err(ArrowError::CastError(format!(
                        "a {other} column cannot be written as a Unix time"
                    )));
                }
            }
        }
        Some(ValueFormat::Rfc3339) => {
            let millis = match array.data_type() {
                // Integers are Unix seconds.
                dt if dt.is_integer() => arrow::compute::cast(
                    &arrow::compute::kernels::numeric::mul(
                        &arrow::compute::cast(array, &DataType::Int64)?,
                        &arrow::array::Int64Array::new_scalar(1000),
                    )?,
                    &DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
                )?,
                DataType::Timestamp(..)
                | DataType::Date32
                | DataType::Date64
                | DataType::Utf8
                | DataType::LargeUtf8
                | DataType::Utf8View => arrow::compute::cast(
                    array,
                    &DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
                )?,
                other => {
                    return Err(ArrowError::CastError(format!(
                        "a {other} column cannot be written as an RFC 3339 timestamp"
                    )));
                }
            };
            let millis = millis.as_primitive::<TimestampMillisecondType>();
            let mut out = JsonColumn::with_capacity(millis.len(), millis.len() * 27);
            for i in 0..millis.len() {
                match (
                    millis.is_null(i),
                    chrono::DateTime::from_timestamp_millis(millis.value(i)),
                ) {
                    (false, Some(at)) => {
                        let text = at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
                        write_json_string(out.buffer(), &text);
                        out.end_row();
                    }
                    (null, _) => {
                        if !null || array.is_valid(i) {
                            problems.push((i, "is not a date or timestamp".to_string()));
                        }
                        out.push(b"null");
                    }
                }
            }
            out
        }
        // The hashed formats of personal data.
        Some(hashed) => match crate::pii::Pii::of(hashed) {
            Some(pii) => return encode_hashed(array, pii),
            None => encode_column(array)?,
        },
    };
    Ok((column, problems))
}

/// `array`'s values hashed as `pii` asks (see [`crate::pii`]): dates as `YYYY-MM-DD` text,
/// anything else as its text. A value that cannot be normalised is a problem of its row.
fn encode_hashed(
    array: &ArrayRef,
    pii: crate::pii::Pii,
) -> Result<(JsonColumn, Vec<(usize, String)>), ArrowError> {
    let text = match array.data_type() {
        DataType::Timestamp(..) | DataType::Date64 => {
            arrow::compute::cast(&arrow::compute::cast(array, &DataType::Date32)?, &DataType::Utf8)?
        }
        _ => arrow::compute::cast(array, &DataType::Utf8)?,
    };
    let text = text.as_string::<i32>();
    let mut problems = Vec::new();
    let mut out = JsonColumn::with_capacity(text.len(), text.len() * 67);
    for i in 0..text.len() {
        if text.is_null(i) {
            out.push(b"null");
            continue;
        }
        match pii.hash(text.value(i)) {
            Ok(hash) => {
                let buf = out.buffer();
                buf.push(b'"');
                buf.extend_from_slice(hash.as_bytes());
                buf.push(b'"');
                out.end_row();
            }
            Err(reason) => {
                problems.push((i, reason));
                out.push(b"null");
            }
        }
    }
    Ok((out, problems))
}

/// Each row of `batch` as a flat JSON object keyed by column name (`{"id":1,"traits.plan":"pro"}`),
/// column at a time like every other payload.
pub fn encode_rows(batch: &arrow::array::RecordBatch) -> Result<JsonColumn, ArrowError> {
    let rows = batch.num_rows();
    let columns = batch
        .columns()
        .iter()
        .map(encode_column)
        .collect::<Result<Vec<_>, _>>()?;
    let keys: Vec<Vec<u8>> = batch
        .schema()
        .fields()
        .iter()
        .enumerate()
        .map(|(i, field)| {
            let mut key = Vec::with_capacity(field.name().len() + 4);
            key.push(if i == 0 { b'{' } else { b',' });
            write_json_string(&mut key, field.name());
            key.push(b':');
            key
        })
        .collect();
    let bytes: usize = columns.iter().map(JsonColumn::total_bytes).sum::<usize>()
        + keys.iter().map(Vec::len).sum::<usize>() * rows
        + rows * 2;
    let mut out = JsonColumn::with_capacity(rows, bytes);
    for row in 0..rows {
        let buf = out.buffer();
        if keys.is_empty() {
            buf.push(b'{');
        }
        for (key, column) in keys.iter().zip(&columns) {
            buf.extend_from_slice(key);
            buf.extend_from_slice(column.get(row));
        }
        buf.push(b'}');
        out.end_row();
    }
    Ok(out)
}

/// A column of `rows` nulls (a mapped column missing from an older snapshot's rows).
pub fn null_column(rows: usize) -> JsonColumn {
    JsonColumn::all_null(rows)
}

fn encode_strings<'a>(
    rows: usize,
    is_null: &impl Fn(usize) -> bool,
    value: impl Fn(usize) -> &'a str,
    out: &mut JsonColumn,
) {
    for i in 0..rows {
        if is_null(i) {
            out.push(b"null");
        } else {
            write_json_string(out.buffer(), value(i));
            out.end_row();
        }
    }
}

fn encode_floats<T: ArrowPrimitiveType>(
    array: &ArrayRef,
    is_null: &impl Fn(usize) -> bool,
    out: &mut JsonColumn,
    widen: impl Fn(T::Native) -> f64,
) {
    let values: &PrimitiveArray<T> = array.as_primitive::<T>();
    let mut buf = ryu::Buffer::new();
    for i in 0..array.len() {
        let v = widen(values.value(i));
        if is_null(i) || !v.is_finite() {
            out.push(b"null");
        } else {
            out.push(buf.format_finite(v).as_bytes());
        }
    }
}

fn encode_timestamps<T>(
    array: &ArrayRef,
    is_null: &impl Fn(usize) -> bool,
    out: &mut JsonColumn,
    nanos_per_unit: i64,
    zulu: bool,
) where
    T: ArrowPrimitiveType<Native = i64>,
{
    let values = array.as_primitive::<T>();
    for i in 0..array.len() {
        if is_null(i) {
            out.push(b"null");
            continue;
        }
        let v = values.value(i) as i128 * nanos_per_unit as i128;
        let days = v.div_euclid(86_400_000_000_000) as i64;
        let nanos_of_day = v.rem_euclid(86_400_000_000_000) as i64;
        let buf = out.buffer();
        buf.push(b'"');
        write_date(buf, days);
        buf.push(b'T');
        write_time(buf, nanos_of_day);
        if zulu {
            buf.push(b'Z');
        }
        buf.push(b'"');
        out.end_row();
    }
}

fn encode_times<T: ArrowPrimitiveType>(
    array: &ArrayRef,
    is_null: &impl Fn(usize) -> bool,
    out: &mut JsonColumn,
    to_nanos: impl Fn(T::Native) -> i64,
) {
    let values = array.as_primitive::<T>();
    for i in 0..array.len() {
        if is_null(i) {
            out.push(b"null");
            continue;
        }
        let buf = out.buffer();
        buf.push(b'"');
        write_time(buf, to_nanos(values.value(i)).rem_euclid(86_400_000_000_000));
        buf.push(b'"');
        out.end_row();
    }
}

/// Writes `s` as a JSON string literal.
pub fn write_json_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => {
                out.extend_from_slice(&bytes[start..i]);
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(&[
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[(b >> 4) as usize],
                    HEX[(b & 0xf) as usize],
                ]);
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(escape);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

fn write_decimal(out: &mut Vec<u8>, value: i128, scale: i8) {
    let mut buf = itoa::Buffer::new();
    if scale <= 0 {
        out.extend_from_slice(buf.format(value).as_bytes());
        for _ in 0..(-scale) {
            out.push(b'0');
        }
        return;
    }
    let scale = scale as usize;
    if value < 0 {
        out.push(b'-');
    }
    let digits = buf.format(value.unsigned_abs()).as_bytes();
    if digits.len() <= scale {
        out.extend_from_slice(b"0.");
        out.extend(std::iter::repeat_n(b'0', scale - digits.len()));
        out.extend_from_slice(digits);
    } else {
        let point = digits.len() - scale;
        out.extend_from_slice(&digits[..point]);
        out.push(b'.');
        out.extend_from_slice(&digits[point..]);
    }
}

/// `YYYY-MM-DD` for days since 1970-01-01 (proleptic Gregorian; Howard Hinnant's algorithm).
fn write_date(out: &mut Vec<u8>, days: i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    if (0..=9999).contains(&year) {
        push_digits(out, year as u64, 4);
    } else {
        let mut buf = itoa::Buffer::new();
        out.extend_from_slice(buf.format(year).as_bytes());
    }
    out.push(b'-');
    push_digits(out, month as u64, 2);
    out.push(b'-');
    push_digits(out, day as u64, 2);
}

/// `HH:MM:SS` plus `.fff`, `.ffffff` or `.fffffffff` when the fraction is not zero.
fn write_time(out: &mut Vec<u8>, nanos_of_day: i64) {
    let secs = nanos_of_day / 1_000_000_000;
    let nanos = (nanos_of_day % 1_000_000_000) as u64;
    push_digits(out, (secs / 3600) as u64, 2);
    out.push(b':');
    push_digits(out, ((secs / 60) % 60) as u64, 2);
    out.push(b':');
    push_digits(out, (secs % 60) as u64, 2);
    if nanos != 0 {
        out.push(b'.');
        if nanos.is_multiple_of(1_000_000) {
            push_digits(out, nanos / 1_000_000, 3);
        } else if nanos.is_multiple_of(1_000) {
            push_digits(out, nanos / 1_000, 6);
        } else {
            push_digits(out, nanos, 9);
        }
    }
}

fn push_digits(out: &mut Vec<u8>, mut value: u64, width: usize) {
    let start = out.len();
    out.resize(start + width, b'0');
    for i in (0..width).rev() {
        out[start + i] = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::*;
    use arrow::datatypes::Int64Type;

    fn rendered(array: ArrayRef) -> Vec<String> {
        let column = encode_column(&array).unwrap();
        (0..column.len())
            .map(|i| String::from_utf8(column.get(i).to_vec()).unwrap())
            .collect()
    }

    #[test]
    fn scalars_render_as_json() {
        assert_eq!(
            rendered(Arc::new(Int32Array::from(vec![Some(-5), None]))),
            ["-5", "null"]
        );
        assert_eq!(
            rendered(Arc::new(UInt64Array::from(vec![u64::MAX]))),
            ["18446744073709551615"]
        );
        assert_eq!(
            rendered(Arc::new(Float64Array::from(vec![1.5, 0.1, f64::NAN, 1e21]))),
            ["1.5", "0.1", "null", "1e21"]
        );
        assert_eq!(rendered(Arc::new(Float32Array::from(vec![0.1f32]))), ["0.1"]);
        assert_eq!(
            rendered(Arc::new(BooleanArray::from(vec![Some(true), None]))),
            ["true", "null"]
        );
        assert_eq!(
            rendered(Arc::new(StringArray::from(vec!["a\"b\\c\nd\u{1}é"]))),
            ["\"a\\\"b\\\\c\\nd\\u0001é\""]
        );
        assert_eq!(
            rendered(Arc::new(StringViewArray::from(vec![Some("x"), None]))),
            ["\"x\"", "null"]
        );
        assert_eq!(
            rendered(Arc::new(BinaryArray::from(vec![b"hi!".as_ref()]))),
            ["\"aGkh\""]
        );
    }

    #[test]
    fn every_rendered_string_is_valid_json() {
        let tricky = vec!["", "\u{7f}", "\u{2028}", "tab\tnull\0end", "🦀 \"quoted\""];
        for (s, json) in tricky
            .iter()
            .zip(rendered(Arc::new(StringArray::from(tricky.clone()))))
        {
            let back: String = serde_json::from_str(&json).unwrap();
            assert_eq!(&back, s);
        }
    }

    #[test]
    fn decimals_keep_their_scale() {
        let array = Decimal128Array::from(vec![Some(1250), Some(-5), Some(0), None])
            .with_precision_and_scale(10, 2)
            .unwrap();
        assert_eq!(rendered(Arc::new(array)), ["12.50", "-0.05", "0.00", "null"]);
        let array = Decimal128Array::from(vec![12])
            .with_precision_and_scale(10, -2)
            .unwrap();
        assert_eq!(rendered(Arc::new(array)), ["1200"]);
    }

    #[test]
    fn dates_and_times_are_iso_8601() {
        assert_eq!(
            rendered(Arc::new(Date32Array::from(vec![0, 19_844, -1]))),
            ["\"1970-01-01\"", "\"2024-05-01\"", "\"1969-12-31\""]
        );
        let ts = TimestampMicrosecondArray::from(vec![1_714_566_600_250_000, -1]).with_timezone("UTC");
        assert_eq!(
            rendered(Arc::new(ts)),
            ["\"2024-05-01T12:30:00.250Z\"", "\"1969-12-31T23:59:59.999999Z\""]
        );
        let naive = TimestampSecondArray::from(vec![86_400]);
        assert_eq!(rendered(Arc::new(naive)), ["\"1970-01-02T00:00:00\""]);
        let time = Time64MicrosecondArray::from(vec![3_723_000_001]);
        assert_eq!(rendered(Arc::new(time)), ["\"01:02:03.000001\""]);
    }

    #[test]
    fn nested_values_render_as_arrays_and_objects() {
        let list = ListArray::from_iter_primitive::<Int64Type, _, _>(vec![Some(vec![Some(1), None]), None]);
        assert_eq!(rendered(Arc::new(list)), ["[1,null]", "null"]);
        let strukt = StructArray::from(vec![(
            Arc::new(Field::new("a", DataType::Int64, true)),
            Arc::new(Int64Array::from(vec![7])) as ArrayRef,
        )]);
        assert_eq!(rendered(Arc::new(strukt)), ["{\"a\":7}"]);
        let dict: DictionaryArray<Int32Type> = vec!["x", "y", "x"].into_iter().collect();
        assert_eq!(rendered(Arc::new(dict)), ["\"x\"", "\"y\"", "\"x\""]);
    }
}
