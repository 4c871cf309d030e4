//! Stable, vectorised hashing of Arrow rows.
//!
//! Two hashes are computed for every extracted row:
//! - the **key hash** over the primary-key columns (in key order), which places a row in a bucket;
//! - the **row hash** over every other column, stored beside the row so the diff can tell an
//!   updated row from an unchanged one by comparing one `u64`.
//!
//! Both must be identical across processes, machines and releases, so they are defined here
//! rather than borrowed from a hash table implementation (DataFusion's and hashbrown's hashers are
//! seeded or CPU-dependent). The definition, version 1:
//!
//! - the state of each row starts at [`ROW_SEED`] (row hash) or [`KEY_SEED`] (key hash);
//! - columns are folded in order: key columns in the order the model declares them; non-key
//!   columns sorted by name, so reordering a model's `SELECT` list changes nothing; each non-key
//!   column also folds in a hash of its name, so moving a value between columns is a change;
//! - a value is folded as `state = xxh3_64_with_seed(canonical_bytes(value), state ^ tag)`, where
//!   `tag` names the value's logical kind and `canonical_bytes` normalises physical types that hold
//!   the same value: every integer width becomes a little-endian `i64` (or `u64` beyond `i64::MAX`),
//!   `f32` widens to `f64` with `-0.0` folded into `0.0` and every NaN made one NaN, timestamps
//!   become nanoseconds since the epoch whatever their unit or time zone, times nanoseconds since
//!   midnight, and `Utf8`, `LargeUtf8` and `Utf8View` the same string bytes. Retyping a column in a
//!   way that keeps its values (int32 to int64, say) therefore does not turn every row into an update;
//! - nulls fold a tag of their own; lists fold their length and then each element; structs fold
//!   each field by sorted name; dictionaries hash as their values.
//!
//! The loops below are column-at-a-time: one downcast per column, then a tight loop over the
//! values, never a per-row trip through a generic value type.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, FixedSizeBinaryArray, GenericByteArray, GenericByteViewArray,
    GenericListArray, OffsetSizeTrait, PrimitiveArray, RecordBatch, StructArray,
};
use arrow::buffer::NullBuffer;
use arrow::datatypes::{
    ArrowNativeType, ArrowPrimitiveType, ByteArrayType, ByteViewType, DataType, Date32Type, Date64Type,
    Decimal128Type, Decimal256Type, DurationMicrosecondType, DurationMillisecondType, DurationNanosecondType,
    DurationSecondType, Float16Type, Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type,
    IntervalDayTimeType, IntervalMonthDayNanoType, IntervalUnit, IntervalYearMonthType,
    Time32MillisecondType, Time32SecondType, Time64MicrosecondType, Time64NanosecondType, TimeUnit,
    TimestampMicrosecondType, TimestampMillisecondType, TimestampNanosecondType, TimestampSecondType,
    UInt8Type, UInt16Type, UInt32Type, UInt64Type,
};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::error::SnapshotError;

/// Initial state of every row hash.
pub const ROW_SEED: u64 = 0x736c_7569_6365_5231; // "sluiceR1"
/// Initial state of every key hash.
pub const KEY_SEED: u64 = 0x736c_7569_6365_4b31; // "sluiceK1"
/// Initial state of a second, independent hash of the key, which only checks a delta's probe
/// (never stored): two keys that share their key hash almost surely differ in this one.
const KEY_CHECK_SEED: u64 = 0x736c_7569_6365_4332; // "sluiceC2"

// Tags distinguish logical kinds whose canonical bytes could coincide.
const TAG_NULL: u64 = 0x01;
const TAG_BOOL: u64 = 0x02;
const TAG_INT: u64 = 0x03;
const TAG_UINT_BIG: u64 = 0x04;
const TAG_FLOAT: u64 = 0x05;
const TAG_DECIMAL: u64 = 0x06;
const TAG_STRING: u64 = 0x07;
const TAG_BINARY: u64 = 0x08;
const TAG_DATE: u64 = 0x09;
const TAG_DATE_MS: u64 = 0x0a;
const TAG_TIMESTAMP: u64 = 0x0b;
const TAG_TIME: u64 = 0x0c;
const TAG_DURATION: u64 = 0x0d;
const TAG_INTERVAL: u64 = 0x0e;
const TAG_LIST: u64 = 0x0f;
const TAG_STRUCT: u64 = 0x10;
const TAG_MAP: u64 = 0x11;
const TAG_DECIMAL256: u64 = 0x12;
const TAG_FIELD: u64 = 0x13;

// Spread the small tags over the whole word so that `state ^ tag` flips high bits too.
#[inline(always)]
fn spread(tag: u64) -> u64 {
    tag.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Hash of a column name, folded into the seed of that column's values.
pub fn name_hash(name: &str) -> u64 {
    xxh3_64_with_seed(name.as_bytes(), spread(TAG_FIELD))
}

/// Computes the row hash of every row of `batch` over the columns whose names are not in
/// `key_columns`. Returns one `u64` per row.
pub fn row_hashes(batch: &RecordBatch, key_columns: &[String]) -> Result<Vec<u64>, SnapshotError> {
    let schema = batch.schema();
    let mut columns: Vec<(&str, &ArrayRef)> = schema
        .fields()
        .iter()
        .zip(batch.columns())
        .filter(|(field, _)| !key_columns.iter().any(|k| k == field.name()))
        .map(|(field, array)| (field.name().as_str(), array))
        .collect();
    columns.sort_by(|a, b| a.0.cmp(b.0));
    let mut hashes = vec![ROW_SEED; batch.num_rows()];
    for (name, array) in columns {
        hash_array(array, name_hash(name), &mut hashes).map_err(|kind| SnapshotError::UnhashableColumn {
            column: name.to_string(),
            data_type: kind,
        })?;
    }
    Ok(hashes)
}

/// Computes the key hash of every row over `key_columns`, in that order.
pub fn key_hashes(batch: &RecordBatch, key_columns: &[String]) -> Result<Vec<u64>, SnapshotError> {
    keys_hashed_from(KEY_SEED, batch, key_columns)
}

/// A second hash of every row's key, independent of [`key_hashes`] (another initial state).
pub(crate) fn key_check_hashes(
    batch: &RecordBatch,
    key_columns: &[String],
) -> Result<Vec<u64>, SnapshotError> {
    keys_hashed_from(KEY_CHECK_SEED, batch, key_columns)
}

fn keys_hashed_from(
    seed: u64,
    batch: &RecordBatch,
    key_columns: &[String],
) -> Result<Vec<u64>, SnapshotError> {
    let mut hashes = vec![seed; batch.num_rows()];
    for name in key_columns {
        let array = batch
            .column_by_name(name)
            .ok_or_else(|| SnapshotError::MissingKeyColumn { column: name.clone() })?;
        hash_array(array, 0, &mut hashes).map_err(|kind| SnapshotError::UnhashableColumn {
            column: name.clone(),
            data_type: kind,
        })?;
    }
    Ok(hashes)
}

/// The bucket a key hash falls in when a snapshot is split into `buckets` (a power of two).
/// Buckets nest: bucket `b` of `n` buckets is the union of buckets `b`, `b + n`, `b + 2n`, ... of
/// any larger power of two, so snapshots written with different bucket counts can still be
/// diffed bucket by bucket at the smaller count.
#[inline]
pub fn bucket_of(key_hash: u64, buckets: u32) -> u32 {
    debug_assert!(buckets.is_power_of_two());
    (key_hash & (buckets as u64 - 1)) as u32
}

/// Folds every value of `array` into `hashes` (one state per row). `salt` is mixed into every
/// value's seed (the column name's hash for row hashes, 0 for key hashes). On an unsupported
/// type returns the type's display name.
pub fn hash_array(array: &ArrayRef, salt: u64, hashes: &mut [u64]) -> Result<(), String> {
    debug_assert_eq!(array.len(), hashes.len());
    let nulls = array.logical_nulls();
    let nulls = nulls.as_ref();
    match array.data_type() {
        DataType::Null => {
            for h in hashes.iter_mut() {
                *h = fold_null(*h, salt);
            }
        }
        DataType::Boolean => hash_bool(array.as_boolean(), nulls, salt, hashes),
        DataType::Int8 => hash_ints::<Int8Type>(array, nulls, salt, hashes),
        DataType::Int16 => hash_ints::<Int16Type>(array, nulls, salt, hashes),
        DataType::Int32 => hash_ints::<Int32Type>(array, nulls, salt, hashes),
        DataType::Int64 => hash_ints::<Int64Type>(array, nulls, salt, hashes),
        DataType::UInt8 => hash_ints::<UInt8Type>(array, nulls, salt, hashes),
        DataType::UInt16 => hash_ints::<UInt16Type>(array, nulls, salt, hashes),
        DataType::UInt32 => hash_ints::<UInt32Type>(array, nulls, salt, hashes),
        DataType::UInt64 => {
            let values = array.as_primitive::<UInt64Type>();
            fold_each(values, nulls, salt, hashes, |v, seed| {
                if let Ok(signed) = i64::try_from(v) {
                    xxh3_64_with_seed(&signed.to_le_bytes(), seed ^ spread(TAG_INT))
                } else {
                    xxh3_64_with_seed(&v.to_le_bytes(), seed ^ spread(TAG_UINT_BIG))
                }
            });
        }
        DataType::Float16 => hash_floats::<Float16Type>(array, nulls, salt, hashes, |v| v.to_f64()),
        DataType::Float32 => hash_floats::<Float32Type>(array, nulls, salt, hashes, |v| v as f64),
        DataType::Float64 => hash_floats::<Float64Type>(array, nulls, salt, hashes, |v| v),
        DataType::Decimal32(_, scale) | DataType::Decimal64(_, scale) => {
            // Widen to the Decimal128 representation so the narrower decimals hash alike.
            let widened = arrow::compute::cast(
                array,
                &DataType::Decimal128(arrow::datatypes::DECIMAL128_MAX_PRECISION, *scale),
            )
            .map_err(|_| array.data_type().to_string())?;
            hash_decimal128(&widened, *scale, nulls, salt, hashes);
        }
        DataType::Decimal128(_, scale) => hash_decimal128(array, *scale, nulls, salt, hashes),
        DataType::Decimal256(_, scale) => {
            let values = array.as_primitive::<Decimal256Type>();
            let tag = spread(TAG_DECIMAL256) ^ (*scale as i64 as u64);
            fold_each(values, nulls, salt, hashes, |v, seed| {
                xxh3_64_with_seed(&v.to_le_bytes(), seed ^ tag)
            });
        }
        DataType::Utf8 => hash_bytes(array.as_string::<i32>(), nulls, salt, TAG_STRING, hashes),
        DataType::LargeUtf8 => hash_bytes(array.as_string::<i64>(), nulls, salt, TAG_STRING, hashes),
        DataType::Utf8View => hash_byte_view(array.as_string_view(), nulls, salt, TAG_STRING, hashes),
        DataType::Binary => hash_bytes(array.as_binary::<i32>(), nulls, salt, TAG_BINARY, hashes),
        DataType::LargeBinary => hash_bytes(array.as_binary::<i64>(), nulls, salt, TAG_BINARY, hashes),
        DataType::BinaryView => hash_byte_view(array.as_binary_view(), nulls, salt, TAG_BINARY, hashes),
        DataType::FixedSizeBinary(_) => {
            let values: &FixedSizeBinaryArray = array.as_fixed_size_binary();
            let tag = spread(TAG_BINARY);
            for (i, h) in hashes.iter_mut().enumerate() {
                *h = if is_null(nulls, i) {
                    fold_null(*h, salt)
                } else {
                    xxh3_64_with_seed(values.value(i), *h ^ salt ^ tag)
                };
            }
        }
        DataType::Date32 => {
            let values = array.as_primitive::<Date32Type>();
            fold_each(values, nulls, salt, hashes, |v, seed| {
                xxh3_64_with_seed(&(v as i64).to_le_bytes(), seed ^ spread(TAG_DATE))
            });
        }
        DataType::Date64 => {
            let values = array.as_primitive::<Date64Type>();
            fold_each(values, nulls, salt, hashes, |v, seed| {
                xxh3_64_with_seed(&v.to_le_bytes(), seed ^ spread(TAG_DATE_MS))
            });
        }
        DataType::Timestamp(unit, _) => {
            let factor = unit_nanos(unit);
            let tag = spread(TAG_TIMESTAMP);
            let mut fold = |v: i64, seed: u64| {
                let nanos = v as i128 * factor;
                xxh3_64_with_seed(&nanos.to_le_bytes(), seed ^ tag)
            };
            match unit {
                TimeUnit::Second => fold_each(
                    array.as_primitive::<TimestampSecondType>(),
                    nulls,
                    salt,
                    hashes,
                    &mut fold,
                ),
                TimeUnit::Millisecond => fold_each(
                    array.as_primitive::<TimestampMillisecondType>(),
                    nulls,
                    salt,
                    hashes,
                    &mut fold,
                ),
                TimeUnit::Microsecond => fold_each(
                    array.as_primitive::<TimestampMicrosecondType>(),
                    nulls,
                    salt,
                    hashes,
                    &mut fold,
                ),
                TimeUnit::Nanosecond => fold_each(
                    array.as_primitive::<TimestampNanosecondType>(),
                    nulls,
                    salt,
                    hashes,
                    &mut fold,
                ),
            }
        }
        DataType::Time32(unit) => {
            let factor = unit_nanos(unit) as i64;
            let tag = spread(TAG_TIME);
            let fold = |v: i32, seed: u64| xxh3_64_with_seed(&(v as i64 * factor).to_le_bytes(), seed ^ tag);
            match unit {
                TimeUnit::Second => fold_each(
                    array.as_primitive::<Time32SecondType>(),
                    nulls,
                    salt,
                    hashes,
                    fold,
                ),
                _ => fold_each(
                    array.as_primitive::<Time32MillisecondType>(),
                    nulls,
                    salt,
                    hashes,
                    fold,
                ),
            }
        }
        DataType::Time64(unit) => {
            let factor = unit_nanos(unit) as i64;
            let tag = spread(TAG_TIME);
            let fold =
                |v: i64, seed: u64| xxh3_64_with_seed(&(v.wrapping_mul(factor)).to_le_bytes(), seed ^ tag);
            match unit {
                TimeUnit::Microsecond => fold_each(
                    array.as_primitive::<Time64MicrosecondType>(),
                    nulls,
                    salt,
                    hashes,
                    fold,
                ),
                _ => fold_each(
                    array.as_primitive::<Time64NanosecondType>(),
                    nulls,
                    salt,
                    hashes,
                    fold,
                ),
            }
        }
        DataType::Duration(unit) => {
            let factor = unit_nanos(unit);
            let tag = spread(TAG_DURATION);
            let fold = |v: i64, seed: u64| xxh3_64_with_seed(&(v as i128 * factor).to_le_bytes(), seed ^ tag);
            match unit {
                TimeUnit::Second => fold_each(
                    array.as_primitive::<DurationSecondType>(),
                    nulls,
                    salt,
                    hashes,
                    fold,
                ),
                TimeUnit::Millisecond => fold_each(
                    array.as_primitive::<DurationMillisecondType>(),
                    nulls,
                    salt,
                    hashes,
                    fold,
                ),
                TimeUnit::Microsecond => fold_each(
                    array.as_primitive::<DurationMicrosecondType>(),
                    nulls,
                    salt,
                    hashes,
                    fold,
                ),
                TimeUnit::Nanosecond => fold_each(
                    array.as_primitive::<DurationNanosecondType>(),
                    nulls,
                    salt,
                    hashes,
                    fold,
                ),
            }
        }
        DataType::Interval(unit) => {
            let tag = spread(TAG_INTERVAL) ^ (*unit as u64);
            match unit {
                IntervalUnit::YearMonth => fold_each(
                    array.as_primitive::<IntervalYearMonthType>(),
                    nulls,
                    salt,
                    hashes,
                    |v, seed| xxh3_64_with_seed(&v.to_le_bytes(), seed ^ tag),
                ),
                IntervalUnit::DayTime => fold_each(
                    array.as_primitive::<IntervalDayTimeType>(),
                    nulls,
                    salt,
                    hashes,
                    |v, seed| {
                        let mut bytes = [0u8; 8];
                        bytes[..4].copy_from_slice(&v.days.to_le_bytes());
                        bytes[4..].copy_from_slice(&v.milliseconds.to_le_bytes());
                        xxh3_64_with_seed(&bytes, seed ^ tag)
                    },
                ),
                IntervalUnit::MonthDayNano => fold_each(
                    array.as_primitive::<IntervalMonthDayNanoType>(),
                    nulls,
                    salt,
                    hashes,
                    |v, seed| {
                        let mut bytes = [0u8; 16];
                        bytes[..4].copy_from_slice(&v.months.to_le_bytes());
                        bytes[4..8].copy_from_slice(&v.days.to_le_bytes());
                        bytes[8..].copy_from_slice(&v.nanoseconds.to_le_bytes());
                        xxh3_64_with_seed(&bytes, seed ^ tag)
                    },
                ),
            }
        }
        DataType::List(_) => hash_list(array.as_list::<i32>(), nulls, salt, TAG_LIST, hashes)?,
        DataType::LargeList(_) => hash_list(array.as_list::<i64>(), nulls, salt, TAG_LIST, hashes)?,
        DataType::FixedSizeList(_, size) => {
            let list = array.as_fixed_size_list();
            let size = *size as usize;
            let element_hashes = child_hashes(list.values())?;
            let tag = spread(TAG_LIST);
            for (i, h) in hashes.iter_mut().enumerate() {
                if is_null(nulls, i) {
                    *h = fold_null(*h, salt);
                    continue;
                }
                let start = list.value_offset(i) as usize;
                *h = fold_elements(*h ^ salt ^ tag, size, &element_hashes[start..start + size]);
            }
        }
        DataType::Map(_, _) => {
            let map = array.as_map();
            let entries: ArrayRef = Arc::new(map.entries().clone());
            let element_hashes = child_hashes(&entries)?;
            let tag = spread(TAG_MAP);
            let offsets = map.value_offsets();
            for (i, h) in hashes.iter_mut().enumerate() {
                if is_null(nulls, i) {
                    *h = fold_null(*h, salt);
                    continue;
                }
                let (start, end) = (offsets[i] as usize, offsets[i + 1] as usize);
                *h = fold_elements(*h ^ salt ^ tag, end - start, &element_hashes[start..end]);
            }
        }
        DataType::Struct(_) => {
            let strukt: &StructArray = array.as_struct();
            let mut fields: Vec<(&str, &ArrayRef)> = strukt
                .fields()
                .iter()
                .zip(strukt.columns())
                .map(|(f, a)| (f.name().as_str(), a))
                .collect();
            fields.sort_by(|a, b| a.0.cmp(b.0));
            let mut inner = vec![spread(TAG_STRUCT); array.len()];
            for (name, child) in fields {
                hash_array(child, name_hash(name), &mut inner)?;
            }
            for (i, h) in hashes.iter_mut().enumerate() {
                *h = if is_null(nulls, i) {
                    fold_null(*h, salt)
                } else {
                    xxh3_64_with_seed(&inner[i].to_le_bytes(), *h ^ salt ^ spread(TAG_STRUCT))
                };
            }
        }
        DataType::Dictionary(_, _) => {
            // Hash as the values the dictionary stands for.
            let unpacked = arrow::compute::cast(array, array_value_type(array))
                .map_err(|_| array.data_type().to_string())?;
            hash_array(&unpacked, salt, hashes)?;
        }
        DataType::RunEndEncoded(_, values) => {
            let unpacked =
                arrow::compute::cast(array, values.data_type()).map_err(|_| array.data_type().to_string())?;
            hash_array(&unpacked, salt, hashes)?;
        }
        other => return Err(other.to_string()),
    }
    Ok(())
}

fn array_value_type(array: &ArrayRef) -> &DataType {
    match array.data_type() {
        DataType::Dictionary(_, value) => value.as_ref(),
        other => other,
    }
}

#[inline(always)]
fn is_null(nulls: Option<&NullBuffer>, i: usize) -> bool {
    nulls.is_some_and(|n| n.is_null(i))
}

#[inline(always)]
fn fold_null(state: u64, salt: u64) -> u64 {
    xxh3_64_with_seed(&[], state ^ salt ^ spread(TAG_NULL))
}

#[inline(always)]
fn fold_each<T, F>(
    values: &PrimitiveArray<T>,
    nulls: Option<&NullBuffer>,
    salt: u64,
    hashes: &mut [u64],
    mut fold: F,
) where
    T: ArrowPrimitiveType,
    F: FnMut(T::Native, u64) -> u64,
{
    let raw = values.values();
    match nulls {
        Some(nulls) if nulls.null_count() > 0 => {
            for (i, h) in hashes.iter_mut().enumerate() {
                *h = if nulls.is_null(i) {
                    fold_null(*h, salt)
                } else {
                    fold(raw[i], *h ^ salt)
                };
            }
        }
        _ => {
            for (h, v) in hashes.iter_mut().zip(raw.iter()) {
                *h = fold(*v, *h ^ salt);
            }
        }
    }
}

fn hash_ints<T>(array: &ArrayRef, nulls: Option<&NullBuffer>, salt: u64, hashes: &mut [u64])
where
    T: ArrowPrimitiveType,
    T::Native: Into<i64>,
{
    let tag = spread(TAG_INT);
    fold_each(array.as_primitive::<T>(), nulls, salt, hashes, |v, seed| {
        xxh3_64_with_seed(&v.into().to_le_bytes(), seed ^ tag)
    });
}

fn hash_floats<T: ArrowPrimitiveType>(
    array: &ArrayRef,
    nulls: Option<&NullBuffer>,
    salt: u64,
    hashes: &mut [u64],
    widen: impl Fn(T::Native) -> f64,
) {
    let tag = spread(TAG_FLOAT);
    fold_each(array.as_primitive::<T>(), nulls, salt, hashes, |v, seed| {
        let v = widen(v);
        let bits = if v == 0.0 {
            0u64 // folds -0.0 into 0.0
        } else if v.is_nan() {
            f64::NAN.to_bits()
        } else {
            v.to_bits()
        };
        xxh3_64_with_seed(&bits.to_le_bytes(), seed ^ tag)
    });
}

fn hash_decimal128(array: &ArrayRef, scale: i8, nulls: Option<&NullBuffer>, salt: u64, hashes: &mut [u64]) {
    let tag = spread(TAG_DECIMAL) ^ (scale as i64 as u64);
    fold_each(
        array.as_primitive::<Decimal128Type>(),
        nulls,
        salt,
        hashes,
        |v, seed| xxh3_64_with_seed(&v.to_le_bytes(), seed ^ tag),
    );
}

fn hash_bool(values: &BooleanArray, nulls: Option<&NullBuffer>, salt: u64, hashes: &mut [u64]) {
    let tag = spread(TAG_BOOL);
    for (i, h) in hashes.iter_mut().enumerate() {
        *h = if is_null(nulls, i) {
            fold_null(*h, salt)
        } else {
            xxh3_64_with_seed(&[values.value(i) as u8], *h ^ salt ^ tag)
        };
    }
}

fn hash_bytes<T: ByteArrayType>(
    values: &GenericByteArray<T>,
    nulls: Option<&NullBuffer>,
    salt: u64,
    tag: u64,
    hashes: &mut [u64],
) {
    let tag = spread(tag);
    let offsets = values.value_offsets();
    let data = values.value_data();
    for (i, h) in hashes.iter_mut().enumerate() {
        *h = if is_null(nulls, i) {
            fold_null(*h, salt)
        } else {
            let (start, end) = (offsets[i].as_usize(), offsets[i + 1].as_usize());
            xxh3_64_with_seed(&data[start..end], *h ^ salt ^ tag)
        };
    }
}

fn hash_byte_view<T: ByteViewType + ?Sized>(
    values: &GenericByteViewArray<T>,
    nulls: Option<&NullBuffer>,
    salt: u64,
    tag: u64,
    hashes: &mut [u64],
) {
    let tag = spread(tag);
    for (i, h) in hashes.iter_mut().enumerate() {
        *h = if is_null(nulls, i) {
            fold_null(*h, salt)
        } else {
            let bytes: &[u8] = values.value(i).as_ref();
            xxh3_64_with_seed(bytes, *h ^ salt ^ tag)
        };
    }
}

/// Hashes of each element of a nested array, each starting from the same seed so an element's
/// hash does not depend on its position in the child array.
fn child_hashes(values: &ArrayRef) -> Result<Vec<u64>, String> {
    let mut element_hashes = vec![spread(TAG_LIST); values.len()];
    hash_array(values, 0, &mut element_hashes)?;
    Ok(element_hashes)
}

#[inline]
fn fold_elements(seed: u64, len: usize, elements: &[u64]) -> u64 {
    let mut state = xxh3_64_with_seed(&(len as u64).to_le_bytes(), seed);
    for e in elements {
        state = xxh3_64_with_seed(&e.to_le_bytes(), state);
    }
    state
}

fn hash_list<O: OffsetSizeTrait>(
    list: &GenericListArray<O>,
    nulls: Option<&NullBuffer>,
    salt: u64,
    tag: u64,
    hashes: &mut [u64],
) -> Result<(), String> {
    let element_hashes = child_hashes(list.values())?;
    let offsets = list.value_offsets();
    let tag = spread(tag);
    for (i, h) in hashes.iter_mut().enumerate() {
        if is_null(nulls, i) {
            *h = fold_null(*h, salt);
            continue;
        }
        let (start, end) = (offsets[i].as_usize(), offsets[i + 1].as_usize());
        *h = fold_elements(*h ^ salt ^ tag, end - start, &element_hashes[start..end]);
    }
    Ok(())
}

fn unit_nanos(unit: &TimeUnit) -> i128 {
    match unit {
        TimeUnit::Second => 1_000_000_000,
        TimeUnit::Millisecond => 1_000_000,
        TimeUnit::Microsecond => 1_000,
        TimeUnit::Nanosecond => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{
        Float32Array, Float64Array, Int32Array, Int64Array, ListArray, StringArray, StringViewArray,
        TimestampMicrosecondArray, TimestampMillisecondArray,
    };
    use arrow::datatypes::{Field, Schema};

    fn batch(columns: Vec<(&str, ArrayRef)>) -> RecordBatch {
        let fields: Vec<Field> = columns
            .iter()
            .map(|(name, a)| Field::new(*name, a.data_type().clone(), true))
            .collect();
        RecordBatch::try_new(
            Arc::new(Schema::new(fields)),
            columns.into_iter().map(|(_, a)| a).collect(),
        )
        .unwrap()
    }

    #[test]
    fn row_hash_is_pinned_across_releases() {
        // These constants define the snapshot format: if this test fails, existing snapshots
        // would report every row as updated. Change them only with a format version bump.
        let b = batch(vec![
            ("id", Arc::new(Int64Array::from(vec![1, 2]))),
            ("email", Arc::new(StringArray::from(vec![Some("a@x.io"), None]))),
            ("score", Arc::new(Float64Array::from(vec![1.5, -0.0]))),
        ]);
        let hashes = row_hashes(&b, &["id".to_string()]).unwrap();
        assert_eq!(
            hashes,
            vec![0x8db9_28cc_5f54_fbe9, 0xc969_7676_e3cc_7d0a],
            "{hashes:x?}"
        );
        let keys = key_hashes(&b, &["id".to_string()]).unwrap();
        assert_eq!(
            keys,
            vec![0xc46a_1321_6a41_3373, 0x588f_8a1f_1769_d600],
            "{keys:x?}"
        );
    }

    #[test]
    fn row_hash_follows_the_documented_definition() {
        // One non-key Int32 column `v` = 5: state = xxh3(i64 LE bytes, ROW_SEED ^ name ^ tag).
        let b = batch(vec![("v", Arc::new(Int32Array::from(vec![5])))]);
        let expected = xxh3_64_with_seed(&5i64.to_le_bytes(), ROW_SEED ^ name_hash("v") ^ spread(TAG_INT));
        assert_eq!(row_hashes(&b, &[]).unwrap(), vec![expected]);
        // A key column: no name, KEY_SEED.
        let expected = xxh3_64_with_seed(&5i64.to_le_bytes(), KEY_SEED ^ spread(TAG_INT));
        assert_eq!(key_hashes(&b, &["v".to_string()]).unwrap(), vec![expected]);
    }

    #[test]
    fn column_order_does_not_matter_but_names_do() {
        let a = batch(vec![
            ("x", Arc::new(Int64Array::from(vec![1]))),
            ("y", Arc::new(Int64Array::from(vec![2]))),
        ]);
        let reordered = batch(vec![
            ("y", Arc::new(Int64Array::from(vec![2]))),
            ("x", Arc::new(Int64Array::from(vec![1]))),
        ]);
        let swapped = batch(vec![
            ("x", Arc::new(Int64Array::from(vec![2]))),
            ("y", Arc::new(Int64Array::from(vec![1]))),
        ]);
        let h = |b: &RecordBatch| row_hashes(b, &[]).unwrap();
        assert_eq!(h(&a), h(&reordered));
        assert_ne!(h(&a), h(&swapped));
    }

    #[test]
    fn equal_values_in_other_physical_types_hash_alike() {
        let h = |a: ArrayRef| row_hashes(&batch(vec![("v", a)]), &[]).unwrap();
        assert_eq!(
            h(Arc::new(Int32Array::from(vec![7, -3]))),
            h(Arc::new(Int64Array::from(vec![7, -3])))
        );
        assert_eq!(
            h(Arc::new(Float32Array::from(vec![0.5, -0.0]))),
            h(Arc::new(Float64Array::from(vec![0.5, 0.0])))
        );
        assert_eq!(
            h(Arc::new(StringArray::from(vec!["é", ""]))),
            h(Arc::new(StringViewArray::from(vec!["é", ""])))
        );
        assert_eq!(
            h(Arc::new(
                TimestampMillisecondArray::from(vec![1_000]).with_timezone("UTC")
            )),
            h(Arc::new(TimestampMicrosecondArray::from(vec![1_000_000])))
        );
    }

    #[test]
    fn nulls_empty_strings_and_list_boundaries_differ() {
        let h = |a: ArrayRef| row_hashes(&batch(vec![("v", a)]), &[]).unwrap();
        let strings = h(Arc::new(StringArray::from(vec![None, Some("")])));
        assert_ne!(strings[0], strings[1]);
        // [[1,2],[3]] vs [[1],[2,3]]: same flattened values, different lists.
        let a = ListArray::from_iter_primitive::<Int64Type, _, _>(vec![
            Some(vec![Some(1), Some(2)]),
            Some(vec![Some(3)]),
        ]);
        let b = ListArray::from_iter_primitive::<Int64Type, _, _>(vec![
            Some(vec![Some(1)]),
            Some(vec![Some(2), Some(3)]),
        ]);
        let (ha, hb) = (h(Arc::new(a)), h(Arc::new(b)));
        assert_ne!(ha[0], hb[0]);
        assert_ne!(ha[1], hb[1]);
    }

    #[test]
    fn buckets_nest_across_power_of_two_counts() {
        for key_hash in [0u64, 1, 17, 0xdead_beef, u64::MAX] {
            assert_eq!(bucket_of(key_hash, 16) % 4, bucket_of(key_hash, 4));
        }
    }
}
