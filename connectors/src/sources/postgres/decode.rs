//! Decoding `COPY ... TO STDOUT (FORMAT binary)` straight into Arrow builders.
//!
//! The binary format is a header, then one tuple per row: a 16-bit field count and, per field,
//! a 32-bit length (-1 for NULL) and the type's binary send representation. Each column has a
//! [`ColumnDecoder`] chosen once from the statement's column types; a tuple is checked for
//! completeness first, so rows split across network chunks are simply decoded when the rest
//! arrives, and then every field is appended to its column's builder without any per-row
//! allocation.

use std::sync::Arc;

use arrow::array::builder::NullBufferBuilder;
use arrow::array::{
    ArrayBuilder, ArrayRef, BinaryBuilder, BooleanBuilder, Date32Builder, Decimal128Builder, Float32Builder,
    Float64Builder, Int16Builder, Int32Builder, Int64Builder, ListArray, StringBuilder,
    Time64MicrosecondBuilder, TimestampMicrosecondBuilder,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, FieldRef, TimeUnit};
use sluice_engine::destination::uuid_text;
use tokio_postgres::types::{Kind, Type};

/// Seconds between 1970-01-01 and PostgreSQL's epoch, 2000-01-01.
const PG_EPOCH_OFFSET_SECS: i64 = 946_684_800;
const PG_EPOCH_OFFSET_DAYS: i32 = 10_957;
const MICROS_PER_DAY: i64 = 86_400_000_000;
/// Scale used for `numeric` columns declared without precision and scale.
pub const UNCONSTRAINED_NUMERIC_SCALE: i8 = 10;
const COPY_SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// How one column is carried: its Arrow type and how its binary values are read.
#[derive(Debug, Clone, PartialEq)]
pub enum ColumnKind {
    Bool,
    Int16,
    Int32,
    Int64,
    /// `oid`: unsigned 32-bit, widened.
    Oid,
    Float32,
    Float64,
    Decimal {
        precision: u8,
        scale: i8,
    },
    /// text, varchar, char(n), name, enum labels, citext, json, xml: UTF-8 bytes as sent.
    Text,
    /// `"char"`: one raw byte.
    Char,
    /// jsonb: a version byte, then JSON text.
    Jsonb,
    Uuid,
    Bytea,
    Date,
    Time,
    /// timetz, converted to UTC.
    TimeTz,
    Timestamp,
    /// timestamptz: UTC microseconds, with the `UTC` time zone on the Arrow type.
    TimestampTz,
    List(Box<ColumnKind>),
}

impl ColumnKind {
    /// The column kind for a PostgreSQL type, or `None` when sluice cannot carry it.
    pub fn for_type(ty: &Type, type_modifier: i32) -> Option<ColumnKind> {
        let kind = match *ty {
            Type::BOOL => ColumnKind::Bool,
            Type::INT2 => ColumnKind::Int16,
            Type::INT4 => ColumnKind::Int32,
            Type::INT8 => ColumnKind::Int64,
            Type::OID => ColumnKind::Oid,
            Type::FLOAT4 => ColumnKind::Float32,
            Type::FLOAT8 => ColumnKind::Float64,
            Type::NUMERIC => numeric_kind(type_modifier)?,
            Type::TEXT
            | Type::VARCHAR
            | Type::BPCHAR
            | Type::NAME
            | Type::JSON
            | Type::XML
            | Type::UNKNOWN => ColumnKind::Text,
            Type::CHAR => ColumnKind::Char,
            Type::JSONB => ColumnKind::Jsonb,
            Type::UUID => ColumnKind::Uuid,
            Type::BYTEA => ColumnKind::Bytea,
            Type::DATE => ColumnKind::Date,
            Type::TIME => ColumnKind::Time,
            Type::TIMETZ => ColumnKind::TimeTz,
            Type::TIMESTAMP => ColumnKind::Timestamp,
            Type::TIMESTAMPTZ => ColumnKind::TimestampTz,
            _ => match ty.kind() {
                Kind::Enum(_) => ColumnKind::Text,
                // A domain's values are its base type's; its own modifier is not sent.
                Kind::Domain(base) => ColumnKind::for_type(base, -1)?,
                Kind::Array(element) => match ColumnKind::for_type(element, type_modifier)? {
                    ColumnKind::List(_) => return None,
                    element => ColumnKind::List(Box::new(element)),
                },
                Kind::Simple if ty.name() == "citext" => ColumnKind::Text,
                _ => return None,
            },
        };
        Some(kind)
    }

    pub fn data_type(&self) -> DataType {
        match self {
            ColumnKind::Bool => DataType::Boolean,
            ColumnKind::Int16 => DataType::Int16,
            ColumnKind::Int32 => DataType::Int32,
            ColumnKind::Int64 | ColumnKind::Oid => DataType::Int64,
            ColumnKind::Float32 => DataType::Float32,
            ColumnKind::Float64 => DataType::Float64,
            ColumnKind::Decimal { precision, scale } => DataType::Decimal128(*precision, *scale),
            ColumnKind::Text | ColumnKind::Char | ColumnKind::Jsonb | ColumnKind::Uuid => DataType::Utf8,
            ColumnKind::Bytea => DataType::Binary,
            ColumnKind::Date => DataType::Date32,
            ColumnKind::Time | ColumnKind::TimeTz => DataType::Time64(TimeUnit::Microsecond),
            ColumnKind::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
            ColumnKind::TimestampTz => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            ColumnKind::List(element) => {
                DataType::List(Arc::new(Field::new("item", element.data_type(), true)))
            }
        }
    }
}

/// `numeric(p, s)` keeps its precision and scale; an unconstrained `numeric` becomes
/// `Decimal128(38, 10)`. Precision above 38 does not fit Decimal128.
fn numeric_kind(type_modifier: i32) -> Option<ColumnKind> {
    const VARHDRSZ: i32 = 4;
    if type_modifier < VARHDRSZ {
        return Some(ColumnKind::Decimal {
            precision: 38,
            scale: UNCONSTRAINED_NUMERIC_SCALE,
        });
    }
    let modifier = type_modifier - VARHDRSZ;
    let precision = (modifier >> 16) & 0xffff;
    // PostgreSQL 15+ stores the scale as an 11-bit signed number.
    let scale = ((modifier & 0x7ff) ^ 1024) - 1024;
    if !(1..=38).contains(&precision) || scale > precision || scale < -38 {
        return None;
    }
    Some(ColumnKind::Decimal {
        precision: precision as u8,
        scale: scale as i8,
    })
}

/// Appends one column's values.
pub enum ColumnDecoder {
    Bool(BooleanBuilder),
    Int16(Int16Builder),
    Int32(Int32Builder),
    Int64(Int64Builder),
    Oid(Int64Builder),
    Float32(Float32Builder),
    Float64(Float64Builder),
    Decimal {
        builder: Decimal128Builder,
        scale: i8,
    },
    Text(StringBuilder),
    Char(StringBuilder),
    Jsonb(StringBuilder),
    Uuid(StringBuilder),
    Bytea(BinaryBuilder),
    Date(Date32Builder),
    Time(Time64MicrosecondBuilder),
    TimeTz(Time64MicrosecondBuilder),
    Timestamp(TimestampMicrosecondBuilder),
    TimestampTz(TimestampMicrosecondBuilder),
    List {
        field: FieldRef,
        offsets: Vec<i32>,
        nulls: NullBufferBuilder,
        element: Box<ColumnDecoder>,
    },
}

impl ColumnDecoder {
    pub fn new(kind: &ColumnKind, capacity: usize) -> Self {
        match kind {
            ColumnKind::Bool => Self::Bool(BooleanBuilder::with_capacity(capacity)),
            ColumnKind::Int16 => Self::Int16(Int16Builder::with_capacity(capacity)),
            ColumnKind::Int32 => Self::Int32(Int32Builder::with_capacity(capacity)),
            ColumnKind::Int64 => Self::Int64(Int64Builder::with_capacity(capacity)),
            ColumnKind::Oid => Self::Oid(Int64Builder::with_capacity(capacity)),
            ColumnKind::Float32 => Self::Float32(Float32Builder::with_capacity(capacity)),
            ColumnKind::Float64 => Self::Float64(Float64Builder::with_capacity(capacity)),
            ColumnKind::Decimal { precision, scale } => Self::Decimal {
                builder: Decimal128Builder::with_capacity(capacity)
                    .with_precision_and_scale(*precision, *scale)
                    .unwrap_or_else(|_| Decimal128Builder::with_capacity(capacity)),
                scale: *scale,
            },
            ColumnKind::Text => Self::Text(StringBuilder::with_capacity(capacity, capacity * 16)),
            ColumnKind::Char => Self::Char(StringBuilder::with_capacity(capacity, capacity)),
            ColumnKind::Jsonb => Self::Jsonb(StringBuilder::with_capacity(capacity, capacity * 32)),
            ColumnKind::Uuid => Self::Uuid(StringBuilder::with_capacity(capacity, capacity * 36)),
            ColumnKind::Bytea => Self::Bytea(BinaryBuilder::with_capacity(capacity, capacity * 16)),
            ColumnKind::Date => Self::Date(Date32Builder::with_capacity(capacity)),
            ColumnKind::Time => Self::Time(Time64MicrosecondBuilder::with_capacity(capacity)),
            ColumnKind::TimeTz => Self::TimeTz(Time64MicrosecondBuilder::with_capacity(capacity)),
            ColumnKind::Timestamp => Self::Timestamp(TimestampMicrosecondBuilder::with_capacity(capacity)),
            ColumnKind::TimestampTz => {
                Self::TimestampTz(TimestampMicrosecondBuilder::with_capacity(capacity).with_timezone("UTC"))
            }
            ColumnKind::List(element) => Self::List {
                field: Arc::new(Field::new("item", element.data_type(), true)),
                offsets: {
                    let mut offsets = Vec::with_capacity(capacity + 1);
                    offsets.push(0);
                    offsets
                },
                nulls: NullBufferBuilder::new(capacity),
                element: Box::new(ColumnDecoder::new(element, capacity)),
            },
        }
    }

    /// Appends one value (`None` is SQL NULL).
    pub fn push(&mut self, value: Option<&[u8]>) -> Result<(), String> {
        let Some(bytes) = value else {
            self.push_null();
            return Ok(());
        };
        match self {
            Self::Bool(b) => b.append_value(fixed::<1>(bytes)?[0] != 0),
            Self::Int16(b) => b.append_value(i16::from_be_bytes(fixed(bytes)?)),
            Self::Int32(b) => b.append_value(i32::from_be_bytes(fixed(bytes)?)),
            Self::Int64(b) => b.append_value(i64::from_be_bytes(fixed(bytes)?)),
            Self::Oid(b) => b.append_value(u32::from_be_bytes(fixed(bytes)?) as i64),
            Self::Float32(b) => b.append_value(f32::from_be_bytes(fixed(bytes)?)),
            Self::Float64(b) => b.append_value(f64::from_be_bytes(fixed(bytes)?)),
            Self::Decimal { builder, scale } => builder.append_value(numeric_to_i128(bytes, *scale)?),
            Self::Text(b) => b.append_value(utf8(bytes)?),
            Self::Char(b) => {
                // `"char"` is one byte in the database encoding; ASCII is what it holds in practice.
                let byte = fixed::<1>(bytes)?[0];
                let mut buf = [0u8; 4];
                b.append_value(char::from(byte).encode_utf8(&mut buf));
            }
            Self::Jsonb(b) => match bytes.split_first() {
                Some((1, json)) => b.append_value(utf8(json)?),
                Some((version, _)) => return Err(format!("unknown jsonb binary version {version}")),
                None => return Err("empty jsonb value".into()),
            },
            Self::Uuid(b) => {
                let text = uuid_text(&fixed::<16>(bytes)?);
                // Only ASCII hex digits and dashes are written.
                b.append_value(std::str::from_utf8(&text).map_err(|e| e.to_string())?)
            }
            Self::Bytea(b) => b.append_value(bytes),
            Self::Date(b) => {
                let days = i32::from_be_bytes(fixed(bytes)?);
                if days == i32::MAX || days == i32::MIN {
                    return Err(infinity("date"));
                }
                let unix_days = days
                    .checked_add(PG_EPOCH_OFFSET_DAYS)
                    .ok_or_else(|| "date out of range".to_string())?;
                b.append_value(unix_days)
            }
            Self::Time(b) => b.append_value(i64::from_be_bytes(fixed(bytes)?)),
            Self::TimeTz(b) => {
                let raw = fixed::<12>(bytes)?;
                let micros = i64::from_be_bytes(raw[..8].try_into().map_err(|_| "bad timetz")?);
                // The zone is stored as seconds west of UTC.
                let zone_west = i32::from_be_bytes(raw[8..].try_into().map_err(|_| "bad timetz")?) as i64;
                b.append_value((micros + zone_west * 1_000_000).rem_euclid(MICROS_PER_DAY))
            }
            Self::Timestamp(b) | Self::TimestampTz(b) => {
                let micros = i64::from_be_bytes(fixed(bytes)?);
                if micros == i64::MAX || micros == i64::MIN {
                    return Err(infinity("timestamp"));
                }
                let unix = micros
                    .checked_add(PG_EPOCH_OFFSET_SECS * 1_000_000)
                    .ok_or_else(|| "timestamp out of range".to_string())?;
                b.append_value(unix)
            }
            Self::List {
                offsets,
                nulls,
                element,
                ..
            } => {
                let count = push_array_elements(element, bytes)?;
                let last = offsets.last().copied().unwrap_or(0);
                let next = i32::try_from(count)
                    .ok()
                    .and_then(|c| last.checked_add(c))
                    .ok_or_else(|| "array column holds more than 2^31 elements in one batch".to_string())?;
                offsets.push(next);
                nulls.append_non_null();
            }
        }
        Ok(())
    }

    fn push_null(&mut self) {
        match self {
            Self::Bool(b) => b.append_null(),
            Self::Int16(b) => b.append_null(),
            Self::Int32(b) => b.append_null(),
            Self::Int64(b) | Self::Oid(b) => b.append_null(),
            Self::Float32(b) => b.append_null(),
            Self::Float64(b) => b.append_null(),
            Self::Decimal { builder, .. } => builder.append_null(),
            Self::Text(b) | Self::Char(b) | Self::Jsonb(b) | Self::Uuid(b) => b.append_null(),
            Self::Bytea(b) => b.append_null(),
            Self::Date(b) => b.append_null(),
            Self::Time(b) | Self::TimeTz(b) => b.append_null(),
            Self::Timestamp(b) | Self::TimestampTz(b) => b.append_null(),
            Self::List { offsets, nulls, .. } => {
                offsets.push(offsets.last().copied().unwrap_or(0));
                nulls.append_null();
            }
        }
    }

    pub fn value_count(&self) -> usize {
        match self {
            Self::Bool(b) => b.len(),
            Self::Int16(b) => b.len(),
            Self::Int32(b) => b.len(),
            Self::Int64(b) | Self::Oid(b) => b.len(),
            Self::Float32(b) => b.len(),
            Self::Float64(b) => b.len(),
            Self::Decimal { builder, .. } => builder.len(),
            Self::Text(b) | Self::Char(b) | Self::Jsonb(b) | Self::Uuid(b) => b.len(),
            Self::Bytea(b) => b.len(),
            Self::Date(b) => b.len(),
            Self::Time(b) | Self::TimeTz(b) => b.len(),
            Self::Timestamp(b) | Self::TimestampTz(b) => b.len(),
            Self::List { offsets, .. } => offsets.len() - 1,
        }
    }

    /// Takes the values appended so far as an array; the decoder starts over empty.
    pub fn finish(&mut self) -> Result<ArrayRef, String> {
        Ok(match self {
            Self::Bool(b) => Arc::new(b.finish()),
            Self::Int16(b) => Arc::new(b.finish()),
            Self::Int32(b) => Arc::new(b.finish()),
            Self::Int64(b) | Self::Oid(b) => Arc::new(b.finish()),
            Self::Float32(b) => Arc::new(b.finish()),
            Self::Float64(b) => Arc::new(b.finish()),
            Self::Decimal { builder, .. } => Arc::new(builder.finish()),
            Self::Text(b) | Self::Char(b) | Self::Jsonb(b) | Self::Uuid(b) => Arc::new(b.finish()),
            Self::Bytea(b) => Arc::new(b.finish()),
            Self::Date(b) => Arc::new(b.finish()),
            Self::Time(b) | Self::TimeTz(b) => Arc::new(b.finish()),
            Self::Timestamp(b) | Self::TimestampTz(b) => Arc::new(b.finish()),
            Self::List {
                field,
                offsets,
                nulls,
                element,
            } => {
                let values = element.finish()?;
                let taken = std::mem::replace(offsets, vec![0]);
                let list = ListArray::try_new(
                    field.clone(),
                    OffsetBuffer::new(taken.into()),
                    values,
                    nulls.finish(),
                )
                .map_err(|e| e.to_string())?;
                Arc::new(list)
            }
        })
    }
}

/// Appends a one-dimensional array's elements; returns how many.
fn push_array_elements(element: &mut ColumnDecoder, bytes: &[u8]) -> Result<usize, String> {
    let mut reader = Reader::new(bytes);
    let dimensions = reader.i32()?;
    let _has_nulls = reader.i32()?;
    let _element_oid = reader.i32()?;
    match dimensions {
        0 => return Ok(0),
        1 => {}
        n => {
            return Err(format!(
                "a {n}-dimensional array cannot be carried; select one dimension, or array_to_json(column) to keep it as JSON"
            ));
        }
    }
    let length = reader.i32()?;
    let _lower_bound = reader.i32()?;
    let length = usize::try_from(length).map_err(|_| "negative array length".to_string())?;
    for _ in 0..length {
        let value = reader.field()?;
        element.push(value)?;
    }
    Ok(length)
}

/// Converts PostgreSQL's binary numeric (base-10000 digits) to an unscaled i128 at `scale`,
/// rounding half away from zero past the scale.
pub fn numeric_to_i128(bytes: &[u8], scale: i8) -> Result<i128, String> {
    let mut reader = Reader::new(bytes);
    let ndigits = reader.i16()? as i32;
    let weight = reader.i16()? as i32;
    let sign = reader.u16()?;
    let _display_scale = reader.i16()?;
    match sign {
        0x0000 | 0x4000 => {}
        0xC000 => return Err("NaN does not fit a decimal column; filter it out or cast to float8".into()),
        0xD000 | 0xF000 => {
            return Err("Infinity does not fit a decimal column; filter it out or cast to float8".into());
        }
        other => return Err(format!("unknown numeric sign {other:#x}")),
    }
    let scale = scale as i32;
    let overflow = || "value does not fit Decimal128(38); cast to a numeric(p, s) with p <= 38".to_string();
    let mut unscaled: i128 = 0;
    // Decimal exponent of the last digit group taken so far.
    let mut exponent = 4 * (weight + 1);
    let mut round_up = false;
    for _ in 0..ndigits {
        let group = reader.u16()? as i128;
        if group >= 10_000 {
            return Err("corrupt numeric digit".into());
        }
        exponent -= 4;
        // Digits of this group below 10^-scale only matter for rounding.
        let keep = (exponent + 4 + scale).clamp(0, 4);
        if keep == 4 {
            unscaled = unscaled
                .checked_mul(10_000)
                .and_then(|v| v.checked_add(group))
                .ok_or_else(overflow)?;
        } else {
            let drop = 4 - keep;
            let divisor = 10i128.pow(drop as u32);
            if keep > 0 {
                unscaled = unscaled
                    .checked_mul(10i128.pow(keep as u32))
                    .and_then(|v| v.checked_add(group / divisor))
                    .ok_or_else(overflow)?;
            }
            round_up = (group % divisor) * 10 / divisor >= 5;
            exponent += drop;
            break;
        }
    }
    // Scale what was read (whose last digit sits at 10^exponent) to 10^-scale.
    let shift = exponent + scale;
    if shift > 0 {
        let factor = 10i128.checked_pow(shift as u32).ok_or_else(overflow)?;
        unscaled = unscaled.checked_mul(factor).ok_or_else(overflow)?;
    } else if shift < 0 {
        // The first digit group already lay wholly below 10^-scale, with implicit zeros
        // between: the value rounds to zero.
        unscaled = 0;
        round_up = false;
    }
    if round_up {
        unscaled = unscaled.checked_add(1).ok_or_else(overflow)?;
    }
    if unscaled.unsigned_abs() >= 10u128.pow(38) {
        return Err(overflow());
    }
    Ok(if sign == 0x4000 { -unscaled } else { unscaled })
}

fn fixed<const N: usize>(bytes: &[u8]) -> Result<[u8; N], String> {
    bytes
        .try_into()
        .map_err(|_| format!("expected {N} bytes, got {}", bytes.len()))
}

fn utf8(bytes: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(bytes).map_err(|e| format!("invalid UTF-8 text: {e}"))
}

fn infinity(what: &str) -> String {
    format!(
        "{what} 'infinity' cannot be carried; filter it out or replace it, e.g. NULLIF(column, 'infinity')"
    )
}

/// A cursor over big-endian binary data.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&end| end <= self.bytes.len());
        match end {
            Some(end) => {
                let slice = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(slice)
            }
            None => Err("truncated binary value".into()),
        }
    }

    fn i16(&mut self) -> Result<i16, String> {
        Ok(i16::from_be_bytes(fixed(self.take(2)?)?))
    }

    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_be_bytes(fixed(self.take(2)?)?))
    }

    fn i32(&mut self) -> Result<i32, String> {
        Ok(i32::from_be_bytes(fixed(self.take(4)?)?))
    }

    /// A length-prefixed field; `None` for NULL.
    fn field(&mut self) -> Result<Option<&'a [u8]>, String> {
        let len = self.i32()?;
        if len < 0 {
            Ok(None)
        } else {
            self.take(len as usize).map(Some)
        }
    }
}

/// What a stretch of COPY data held.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// This many bytes were consumed; the rest is an incomplete tuple awaiting more data.
    Consumed(usize),
    /// The end-of-data trailer was read.
    Finished,
}

/// An error in one field of one row.
#[derive(Debug)]
pub struct FieldError {
    pub column: usize,
    pub message: String,
}

/// Parses the COPY binary stream into column decoders.
pub struct CopyDecoder {
    pub columns: Vec<ColumnDecoder>,
    header_read: bool,
}

impl CopyDecoder {
    pub fn new(kinds: &[ColumnKind], capacity: usize) -> Self {
        Self {
            columns: kinds.iter().map(|k| ColumnDecoder::new(k, capacity)).collect(),
            header_read: false,
        }
    }

    pub fn rows(&self) -> usize {
        self.columns.first().map_or(0, ColumnDecoder::value_count)
    }

    /// Decodes every complete tuple in `data`, stopping early once `max_rows` are buffered.
    pub fn decode(&mut self, data: &[u8], max_rows: usize) -> Result<Progress, FieldError> {
        let whole = |message: String| FieldError {
            column: usize::MAX,
            message,
        };
        let mut pos = 0;
        if !self.header_read {
            if data.len() < 19 {
                return Ok(Progress::Consumed(0));
            }
            if &data[..11] != COPY_SIGNATURE {
                return Err(whole("the server did not send binary COPY data".into()));
            }
            let extension = i32::from_be_bytes([data[15], data[16], data[17], data[18]]);
            let header_len = 19 + usize::try_from(extension).map_err(|_| whole("bad COPY header".into()))?;
            if data.len() < header_len {
                return Ok(Progress::Consumed(0));
            }
            pos = header_len;
            self.header_read = true;
        }
        while self.rows() < max_rows {
            let rest = &data[pos..];
            if rest.len() < 2 {
                break;
            }
            let fields = i16::from_be_bytes([rest[0], rest[1]]);
            if fields == -1 {
                return Ok(Progress::Finished);
            }
            if fields as usize != self.columns.len() {
                return Err(whole(format!(
                    "a row has {fields} fields, the query described {}",
                    self.columns.len()
                )));
            }
            // Check the tuple is complete before appending anything from it.
            let Some(len) = tuple_len(rest, self.columns.len()) else {
                break;
            };
            let mut reader = Reader::new(&rest[2..len]);
            for (column, decoder) in self.columns.iter_mut().enumerate() {
                let value = reader.field().map_err(|message| FieldError { column, message })?;
                decoder
                    .push(value)
                    .map_err(|message| FieldError { column, message })?;
            }
            pos += len;
        }
        Ok(Progress::Consumed(pos))
    }

    /// Takes the buffered rows as arrays.
    pub fn finish(&mut self) -> Result<Vec<ArrayRef>, FieldError> {
        self.columns
            .iter_mut()
            .enumerate()
            .map(|(column, d)| d.finish().map_err(|message| FieldError { column, message }))
            .collect()
    }
}

/// The byte length of the tuple at the start of `data`, if all of it is there.
fn tuple_len(data: &[u8], fields: usize) -> Option<usize> {
    let mut pos = 2usize;
    for _ in 0..fields {
        let len_bytes = data.get(pos..pos + 4)?;
        let len = i32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
        pos += 4;
        if len > 0 {
            pos = pos.checked_add(len as usize)?;
        }
    }
    (pos <= data.len()).then_some(pos)
}

#[cfg(test)]
mod tests {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Decimal128Type, Int32Type};

    use super::*;

    /// PostgreSQL's binary numeric for a decimal string, built digit group by digit group.
    fn numeric(text: &str) -> Vec<u8> {
        let negative = text.starts_with('-');
        let text = text.trim_start_matches('-');
        let (int, frac) = text.split_once('.').unwrap_or((text, ""));
        let int_pad = (4 - int.len() % 4) % 4;
        let int = format!("{}{}", "0".repeat(int_pad), int);
        let frac_pad = (4 - frac.len() % 4) % 4;
        let frac_full = format!("{}{}", frac, "0".repeat(frac_pad));
        let mut groups: Vec<u16> = Vec::new();
        for chunk in int.as_bytes().chunks(4) {
            groups.push(std::str::from_utf8(chunk).unwrap().parse().unwrap());
        }
        let weight = groups.len() as i16 - 1;
        for chunk in frac_full.as_bytes().chunks(4) {
            groups.push(std::str::from_utf8(chunk).unwrap().parse().unwrap());
        }
        let mut out = Vec::new();
        out.extend((groups.len() as i16).to_be_bytes());
        out.extend(weight.to_be_bytes());
        out.extend(if negative { 0x4000u16 } else { 0 }.to_be_bytes());
        out.extend((frac.len() as i16).to_be_bytes());
        for g in groups {
            out.extend(g.to_be_bytes());
        }
        out
    }

    #[test]
    fn numerics_convert_exactly_at_their_scale() {
        assert_eq!(numeric_to_i128(&numeric("123.45"), 2).unwrap(), 12345);
        assert_eq!(numeric_to_i128(&numeric("-123.45"), 4).unwrap(), -1234500);
        assert_eq!(numeric_to_i128(&numeric("0.0001"), 4).unwrap(), 1);
        assert_eq!(numeric_to_i128(&numeric("10000"), 0).unwrap(), 10000);
        assert_eq!(numeric_to_i128(&numeric("10000"), -2).unwrap(), 100);
        let big = "1234567890123456789012345678.0123456789";
        assert_eq!(
            numeric_to_i128(&numeric(big), 10).unwrap(),
            12345678901234567890123456780123456789
        );
        assert!(numeric_to_i128(&numeric("123456789012345678901234567890"), 10).is_err());
    }

    #[test]
    fn numerics_round_half_away_from_zero_past_the_scale() {
        assert_eq!(
            numeric_to_i128(&numeric("0.333333333333333333"), 10).unwrap(),
            3333333333
        );
        assert_eq!(
            numeric_to_i128(&numeric("0.66666666666"), 10).unwrap(),
            6666666667
        );
        assert_eq!(numeric_to_i128(&numeric("-2.5"), 0).unwrap(), -3);
        assert_eq!(numeric_to_i128(&numeric("2.49"), 0).unwrap(), 2);
        assert_eq!(numeric_to_i128(&numeric("0.00005"), 4).unwrap(), 1);
    }

    #[test]
    fn numeric_specials_are_refused_with_a_hint() {
        let nan = [0u8, 0, 0, 0, 0xC0, 0, 0, 0];
        assert!(numeric_to_i128(&nan, 2).unwrap_err().contains("NaN"));
    }

    #[test]
    fn numeric_modifiers_give_precision_and_scale() {
        let typmod = |p: i32, s: i32| ((p << 16) | (s & 0x7ff)) + 4;
        assert_eq!(
            numeric_kind(typmod(38, 10)),
            Some(ColumnKind::Decimal {
                precision: 38,
                scale: 10
            })
        );
        assert_eq!(
            numeric_kind(typmod(5, -2)),
            Some(ColumnKind::Decimal {
                precision: 5,
                scale: -2
            })
        );
        assert_eq!(numeric_kind(typmod(50, 2)), None);
        assert_eq!(
            numeric_kind(-1),
            Some(ColumnKind::Decimal {
                precision: 38,
                scale: UNCONSTRAINED_NUMERIC_SCALE
            })
        );
    }

    fn copy_stream(rows: &[Vec<Option<Vec<u8>>>]) -> Vec<u8> {
        let mut out = COPY_SIGNATURE.to_vec();
        out.extend(0i32.to_be_bytes());
        out.extend(0i32.to_be_bytes());
        for row in rows {
            out.extend((row.len() as i16).to_be_bytes());
            for field in row {
                match field {
                    None => out.extend((-1i32).to_be_bytes()),
                    Some(bytes) => {
                        out.extend((bytes.len() as i32).to_be_bytes());
                        out.extend(bytes);
                    }
                }
            }
        }
        out.extend((-1i16).to_be_bytes());
        out
    }

    fn int_array(values: &[Option<i32>]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(1i32.to_be_bytes());
        out.extend(0i32.to_be_bytes());
        out.extend(23i32.to_be_bytes());
        out.extend((values.len() as i32).to_be_bytes());
        out.extend(1i32.to_be_bytes());
        for v in values {
            match v {
                None => out.extend((-1i32).to_be_bytes()),
                Some(v) => {
                    out.extend(4i32.to_be_bytes());
                    out.extend(v.to_be_bytes());
                }
            }
        }
        out
    }

    #[test]
    fn tuples_split_anywhere_decode_the_same() {
        let rows = vec![
            vec![
                Some(7i32.to_be_bytes().to_vec()),
                Some(b"hello".to_vec()),
                Some(int_array(&[Some(1), None])),
            ],
            vec![None, Some("ü😀".as_bytes().to_vec()), Some(int_array(&[]))],
            vec![Some((-1i32).to_be_bytes().to_vec()), None, None],
        ];
        let stream = copy_stream(&rows);
        let kinds = [
            ColumnKind::Int32,
            ColumnKind::Text,
            ColumnKind::List(Box::new(ColumnKind::Int32)),
        ];
        for split in 0..stream.len() {
            let mut decoder = CopyDecoder::new(&kinds, 4);
            let mut pending: Vec<u8> = Vec::new();
            let mut finished = false;
            for chunk in [&stream[..split], &stream[split..]] {
                pending.extend_from_slice(chunk);
                match decoder.decode(&pending, usize::MAX).unwrap() {
                    Progress::Finished => finished = true,
                    Progress::Consumed(n) => {
                        pending.drain(..n);
                    }
                }
            }
            assert!(finished, "split at {split}");
            let arrays = decoder.finish().unwrap();
            let ints = arrays[0].as_primitive::<Int32Type>();
            assert_eq!(ints.iter().collect::<Vec<_>>(), vec![Some(7), None, Some(-1)]);
            let texts = arrays[1].as_string::<i32>();
            assert_eq!(
                texts.iter().collect::<Vec<_>>(),
                vec![Some("hello"), Some("ü😀"), None]
            );
            let lists = arrays[2].as_list::<i32>();
            assert_eq!(lists.value_length(0), 2);
            assert!(lists.value(0).is_null(1));
            assert_eq!(lists.value_length(1), 0);
            assert!(lists.is_valid(1));
            assert!(lists.is_null(2));
        }
    }

    #[test]
    fn decimals_finish_with_their_precision() {
        let mut d = ColumnDecoder::new(
            &ColumnKind::Decimal {
                precision: 12,
                scale: 2,
            },
            2,
        );
        d.push(Some(&numeric("-0.05"))).unwrap();
        d.push(None).unwrap();
        let array = d.finish().unwrap();
        let decimals = array.as_primitive::<Decimal128Type>();
        assert_eq!(decimals.precision(), 12);
        assert_eq!(decimals.value(0), -5);
        assert!(decimals.is_null(1));
    }

    #[test]
    fn uuids_and_times_are_rendered_for_arrow() {
        let mut d = ColumnDecoder::new(&ColumnKind::Uuid, 1);
        let raw: [u8; 16] = [
            0x12, 0x3e, 0x45, 0x67, 0xe8, 0x9b, 0x12, 0xd3, 0xa4, 0x56, 0x42, 0x66, 0x14, 0x17, 0x40, 0x00,
        ];
        d.push(Some(&raw)).unwrap();
        let array = d.finish().unwrap();
        assert_eq!(
            array.as_string::<i32>().value(0),
            "123e4567-e89b-12d3-a456-426614174000"
        );

        let mut ts = ColumnDecoder::new(&ColumnKind::TimestampTz, 1);
        // 1969-12-31 23:59:59 UTC is one second before the Unix epoch.
        let pg = (-PG_EPOCH_OFFSET_SECS - 1) * 1_000_000;
        ts.push(Some(&pg.to_be_bytes())).unwrap();
        assert!(
            ts.push(Some(&i64::MAX.to_be_bytes()))
                .unwrap_err()
                .contains("infinity")
        );
        let array = ts.finish().unwrap();
        assert_eq!(
            array
                .as_primitive::<arrow::datatypes::TimestampMicrosecondType>()
                .value(0),
            -1_000_000
        );
        assert_eq!(array.data_type(), &ColumnKind::TimestampTz.data_type());
    }
}
