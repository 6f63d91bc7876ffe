//! Headers between their wire form (protobuf) and their stored form, and
//! the content fingerprint used by identity checks.

use tandem_proto::coordinator as pb;
use tandem_storage::Header;

/// Stored headers as sent on the wire.
pub(crate) fn headers_to_wire(headers: Vec<Header>) -> Vec<pb::Header> {
    headers
        .into_iter()
        .map(|h| pb::Header {
            name: h.name,
            value: h.value,
        })
        .collect()
}

/// Wire headers as stored.
pub(crate) fn headers_from_wire(headers: Vec<pb::Header>) -> Vec<Header> {
    headers
        .into_iter()
        .map(|h| Header {
            name: h.name,
            value: h.value,
        })
        .collect()
}

/// A 64-bit fingerprint of `parts` (each with its length, so boundaries
/// count): two CRC32C chains, the second started at `seed`. Used for
/// identity checks of message content; stable across versions (transaction
/// records store it).
pub(crate) fn fingerprint(parts: &[&[u8]], seed: u32) -> u64 {
    let (mut a, mut b) = (0u32, seed);
    for p in parts {
        let len = (p.len() as u64).to_le_bytes();
        a = crc32c::crc32c_append(crc32c::crc32c_append(a, &len), p);
        b = crc32c::crc32c_append(crc32c::crc32c_append(b, p), &len);
    }
    (u64::from(a) << 32) | u64::from(b)
}
