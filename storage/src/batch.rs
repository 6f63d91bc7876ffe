//! The on-disk record batch: a length prefix, a CRC32C over the rest, the
//! base offset, the record count and timestamps, then the records. A batch is
//! the unit of writing and of checking: it is whole or it is not there.
//!
//! ```text
//! batch:  len u32 | crc32c u32 | magic u8 | base_offset u64 | count u32
//!         | first_ts i64 | max_ts i64 | records...
//! record: len u32 | ts i64 | id_len u16 | id | key_len i32 (-1: none) | key
//!         | value_len u32 | value | header_count u16
//!         | (name_len u16 | name | value_len u32 | value)*
//! ```
//! All integers are little-endian; `len` counts the bytes after itself and
//! the CRC covers everything after the CRC field.

use bytes::{Buf, Bytes};

use crate::error::{Error, Result};
use crate::record::{Header, Record, StoredRecord};

/// Format version written into every batch.
const MAGIC: u8 = 1;
/// Bytes before the first record.
pub(crate) const HEADER_LEN: usize = 37;
const CRC_START: usize = 8;
/// Largest batch the format admits on disk; a length prefix above it is
/// damage, never a batch still being written.
pub(crate) const MAX_ON_DISK: usize = 1 << 30;

/// The fixed part of a batch, as read from disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BatchHeader {
    /// Total size of the batch on disk, length prefix included.
    pub(crate) total_len: usize,
    pub(crate) crc: u32,
    pub(crate) base_offset: u64,
    pub(crate) record_count: u32,
    pub(crate) max_timestamp: i64,
}

impl BatchHeader {
    /// Offset after the last record of the batch.
    pub(crate) fn next_offset(&self) -> u64 {
        self.base_offset + u64::from(self.record_count)
    }
}

/// What is found where a batch should start.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Found {
    /// A whole batch whose CRC matches.
    Batch(BatchHeader),
    /// The bytes end before the batch does (header or body cut short).
    Truncated,
    /// The bytes are there but are not a valid batch.
    Invalid(String),
}

/// Checks a record against the format's field limits and the configured
/// maximum size; returns its encoded size.
pub(crate) fn check_record(
    index: usize,
    record: &Record,
    max_record_bytes: usize,
) -> Result<usize> {
    let field = |field: &'static str, len: usize, max: usize| {
        if len > max {
            Err(Error::FieldTooLong {
                index,
                field,
                len,
                max,
            })
        } else {
            Ok(())
        }
    };
    field("id", record.id.len(), u16::MAX as usize)?;
    field("headers", record.headers.len(), u16::MAX as usize)?;
    for h in &record.headers {
        field("header name", h.name.len(), u16::MAX as usize)?;
    }
    let size = record_len(record);
    if size > max_record_bytes {
        return Err(Error::RecordTooLarge {
            index,
            size,
            max: max_record_bytes,
        });
    }
    Ok(size)
}

/// Encoded size of one record, length prefix included.
pub(crate) fn record_len(record: &Record) -> usize {
    4 + 8
        + 2
        + record.id.len()
        + 4
        + record.key.as_ref().map_or(0, Bytes::len)
        + 4
        + record.value.len()
        + 2
        + record
            .headers
            .iter()
            .map(|h| 2 + h.name.len() + 4 + h.value.len())
            .sum::<usize>()
}

/// Appends one batch holding `records` (already checked, at least one) with
/// offsets from `base_offset` to `out`; returns the header written.
pub(crate) fn encode(base_offset: u64, records: &[Record], out: &mut Vec<u8>) -> BatchHeader {
    debug_assert!(!records.is_empty());
    let start = out.len();
    let first_ts = records.first().map_or(0, |r| r.timestamp_ms);
    let max_ts = records.iter().map(|r| r.timestamp_ms).max().unwrap_or(0);
    out.extend_from_slice(&[0u8; 8]); // len and crc, filled in below
    out.push(MAGIC);
    out.extend_from_slice(&base_offset.to_le_bytes());
    out.extend_from_slice(&(records.len() as u32).to_le_bytes());
    out.extend_from_slice(&first_ts.to_le_bytes());
    out.extend_from_slice(&max_ts.to_le_bytes());
    for r in records {
        let len = record_len(r) - 4;
        out.extend_from_slice(&(len as u32).to_le_bytes());
        out.extend_from_slice(&r.timestamp_ms.to_le_bytes());
        out.extend_from_slice(&(r.id.len() as u16).to_le_bytes());
        out.extend_from_slice(&r.id);
        match &r.key {
            Some(k) => {
                out.extend_from_slice(&(k.len() as i32).to_le_bytes());
                out.extend_from_slice(k);
            }
            None => out.extend_from_slice(&(-1i32).to_le_bytes()),
        }
        out.extend_from_slice(&(r.value.len() as u32).to_le_bytes());
        out.extend_from_slice(&r.value);
        out.extend_from_slice(&(r.headers.len() as u16).to_le_bytes());
        for h in &r.headers {
            out.extend_from_slice(&(h.name.len() as u16).to_le_bytes());
            out.extend_from_slice(h.name.as_bytes());
            out.extend_from_slice(&(h.value.len() as u32).to_le_bytes());
            out.extend_from_slice(&h.value);
        }
    }
    let total_len = out.len() - start;
    let crc = crc32c::crc32c(&out[start + CRC_START..]);
    out[start..start + 4].copy_from_slice(&((total_len - 4) as u32).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    BatchHeader {
        total_len,
        crc,
        base_offset,
        record_count: records.len() as u32,
        max_timestamp: max_ts,
    }
}

/// Looks at the bytes where a batch should start.
pub(crate) fn inspect(buf: &[u8]) -> Found {
    if buf.len() < HEADER_LEN {
        return Found::Truncated;
    }
    let mut h = &buf[..HEADER_LEN];
    let total_len = h.get_u32_le() as usize + 4;
    let crc = h.get_u32_le();
    let magic = h.get_u8();
    let base_offset = h.get_u64_le();
    let record_count = h.get_u32_le();
    let _first_ts = h.get_i64_le();
    let max_timestamp = h.get_i64_le();
    if !(HEADER_LEN..=MAX_ON_DISK).contains(&total_len) {
        return Found::Invalid(format!("batch length {total_len} is implausible"));
    }
    if buf.len() < total_len {
        return Found::Truncated;
    }
    let actual = crc32c::crc32c(&buf[CRC_START..total_len]);
    if actual != crc {
        return Found::Invalid(format!(
            "CRC32C mismatch: stored {crc:#010x}, computed {actual:#010x}"
        ));
    }
    if magic != MAGIC {
        return Found::Invalid(format!("unknown batch format {magic}"));
    }
    if record_count == 0 {
        return Found::Invalid("batch holds no records".into());
    }
    Found::Batch(BatchHeader {
        total_len,
        crc,
        base_offset,
        record_count,
        max_timestamp,
    })
}

/// Decodes the records of a batch whose CRC has been checked. `batch` holds
/// exactly the batch; record fields share its memory.
pub(crate) fn decode(batch: &Bytes, header: &BatchHeader) -> Result<Vec<StoredRecord>, String> {
    let mut buf = batch.slice(HEADER_LEN..header.total_len);
    let mut out = Vec::with_capacity(header.record_count as usize);
    for i in 0..u64::from(header.record_count) {
        let len = take_u32(&mut buf)? as usize;
        if buf.len() < len {
            return Err(format!(
                "record {i} claims {len} bytes, batch has {}",
                buf.len()
            ));
        }
        let mut r = buf.split_to(len);
        let timestamp_ms = take_i64(&mut r)?;
        let id_len = take_u16(&mut r)? as usize;
        let id = take_bytes(&mut r, id_len)?;
        let key_len = take_i32(&mut r)?;
        let key = if key_len < 0 {
            None
        } else {
            Some(take_bytes(&mut r, key_len as usize)?)
        };
        let value_len = take_u32(&mut r)? as usize;
        let value = take_bytes(&mut r, value_len)?;
        let count = take_u16(&mut r)?;
        let mut headers = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let name_len = take_u16(&mut r)? as usize;
            let name = take_bytes(&mut r, name_len)?;
            let name = String::from_utf8(name.to_vec())
                .map_err(|_| format!("record {i}: header name is not UTF-8"))?;
            let value_len = take_u32(&mut r)? as usize;
            let value = take_bytes(&mut r, value_len)?;
            headers.push(Header { name, value });
        }
        if !r.is_empty() {
            return Err(format!("record {i} has {} trailing bytes", r.len()));
        }
        out.push(StoredRecord {
            offset: header.base_offset + i,
            record: Record {
                id,
                key,
                value,
                headers,
                timestamp_ms,
            },
        });
    }
    if !buf.is_empty() {
        return Err(format!("{} bytes after the last record", buf.len()));
    }
    Ok(out)
}

fn take_bytes(buf: &mut Bytes, n: usize) -> Result<Bytes, String> {
    if buf.len() < n {
        return Err(format!("field of {n} bytes runs past its record"));
    }
    Ok(buf.split_to(n))
}

macro_rules! take_int {
    ($name:ident, $ty:ty, $get:ident) => {
        fn $name(buf: &mut Bytes) -> Result<$ty, String> {
            if buf.len() < size_of::<$ty>() {
                return Err("integer field runs past its record".into());
            }
            Ok(buf.$get())
        }
    };
}
take_int!(take_u16, u16, get_u16_le);
take_int!(take_u32, u32, get_u32_le);
take_int!(take_i32, i32, get_i32_le);
take_int!(take_i64, i64, get_i64_le);

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn arb_record() -> impl Strategy<Value = Record> {
        (
            proptest::collection::vec(any::<u8>(), 0..24),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..16)),
            proptest::collection::vec(any::<u8>(), 0..300),
            proptest::collection::vec(
                ("[a-z]{0,8}", proptest::collection::vec(any::<u8>(), 0..8)),
                0..3,
            ),
            any::<i64>(),
        )
            .prop_map(|(id, key, value, headers, timestamp_ms)| Record {
                id: id.into(),
                key: key.map(Into::into),
                value: value.into(),
                headers: headers
                    .into_iter()
                    .map(|(name, value)| Header {
                        name,
                        value: value.into(),
                    })
                    .collect(),
                timestamp_ms,
            })
    }

    proptest! {
        #[test]
        fn batches_round_trip(base in 0u64..1 << 40, records in proptest::collection::vec(arb_record(), 1..8)) {
            let mut out = vec![0xAA];
            let written = encode(base, &records, &mut out);
            prop_assert_eq!(written.total_len, out.len() - 1);
            let bytes = Bytes::from(out).slice(1..);
            let found = inspect(&bytes);
            prop_assert_eq!(&found, &Found::Batch(written));
            let decoded = decode(&bytes, &written).map_err(TestCaseError::fail)?;
            prop_assert_eq!(decoded.len(), records.len());
            for (i, (d, r)) in decoded.iter().zip(&records).enumerate() {
                prop_assert_eq!(d.offset, base + i as u64);
                prop_assert_eq!(&d.record, r);
            }
        }

        #[test]
        fn any_flipped_bit_or_cut_is_detected(
            records in proptest::collection::vec(arb_record(), 1..4),
            pick in any::<prop::sample::Index>(),
            bit in 0u8..8,
            cut in any::<prop::sample::Index>(),
        ) {
            let mut out = Vec::new();
            encode(7, &records, &mut out);
            let mut flipped = out.clone();
            let i = pick.index(flipped.len());
            flipped[i] ^= 1 << bit;
            prop_assert!(!matches!(inspect(&flipped), Found::Batch(_)));
            let short = &out[..cut.index(out.len())];
            prop_assert!(!matches!(inspect(short), Found::Batch(_)));
        }
    }

    #[test]
    fn record_size_limit_counts_every_field() {
        let r = Record {
            id: Bytes::from_static(b"id"),
            key: Some(Bytes::from_static(b"k")),
            value: Bytes::from(vec![0; 100]),
            headers: vec![Header {
                name: "h".into(),
                value: Bytes::from_static(b"v"),
            }],
            timestamp_ms: 0,
        };
        let size = record_len(&r);
        assert_eq!(check_record(0, &r, size).ok(), Some(size));
        assert!(matches!(
            check_record(3, &r, size - 1),
            Err(Error::RecordTooLarge { index: 3, .. })
        ));
        let long_id = Record {
            id: Bytes::from(vec![0; 70_000]),
            ..r
        };
        assert!(matches!(
            check_record(0, &long_id, usize::MAX),
            Err(Error::FieldTooLong { field: "id", .. })
        ));
    }
}
