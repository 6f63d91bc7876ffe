//! Which partition a message goes to. A key picks its partition by Kafka's
//! hash (murmur2 of the key bytes, sign bit cleared, modulo the partition
//! count), so a key lands on the partition a Kafka producer would choose and
//! keeps its order there. Messages without a key share one partition per
//! publish request (sticky), rotating from request to request.

use std::sync::atomic::{AtomicU32, Ordering};

/// Kafka's 32-bit murmur2 (seed `0x9747b28c`).
pub(crate) fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        for (i, &b) in rest.iter().enumerate().rev() {
            h ^= u32::from(b) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// The partition of a keyed message.
pub(crate) fn for_key(key: &[u8], partitions: u32) -> u32 {
    (murmur2(key) & 0x7fff_ffff) % partitions
}

/// Hands out the partition for keyless messages, one per request in turn.
#[derive(Debug, Default)]
pub(crate) struct Sticky {
    next: AtomicU32,
}

impl Sticky {
    pub(crate) fn next(&self, partitions: u32) -> u32 {
        self.next.fetch_add(1, Ordering::Relaxed) % partitions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_kafkas_murmur2() {
        // Kafka's published test vectors for Utils.murmur2.
        let cases: &[(&str, i32)] = &[
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
        ];
        for (input, expected) in cases {
            assert_eq!(murmur2(input.as_bytes()) as i32, *expected, "{input}");
        }
    }

    #[test]
    fn keys_spread_and_stay_put() {
        let mut counts = [0u32; 8];
        for i in 0..8000 {
            let key = format!("user-{i}");
            let p = for_key(key.as_bytes(), 8);
            assert_eq!(p, for_key(key.as_bytes(), 8));
            counts[p as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
    }

    #[test]
    fn sticky_rotates() {
        let s = Sticky::default();
        let got: Vec<_> = (0..6).map(|_| s.next(3)).collect();
        assert_eq!(got, vec![0, 1, 2, 0, 1, 2]);
    }
}
