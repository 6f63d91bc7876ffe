//! Shards: the units replicas on one PostgreSQL store own. A topic belongs
//! to one shard by the hash of its name, with everything that is about it:
//! its partitions, the transactions whose messages go to it (their half
//! messages and state), its consumer groups and their offsets. Sagas live
//! in the shard of their topic `__sagas`. Each shard has its own lease and
//! its own pair of logs, so a replica can own some shards while others own
//! the rest.
//!
//! With one shard the names are those of a single coordinator: lease
//! `coordinator`, logs `topics` and `internal`.

/// Most shards a store may be divided into.
pub const MAX_SHARDS: u32 = 256;

/// The shard of topic `name` among `count` (FNV-1a of the name: stable
/// across versions and machines, which the stored data depends on).
pub fn shard_of(name: &str, count: u32) -> u32 {
    if count <= 1 {
        return 0;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % u64::from(count)) as u32
}

/// The lease row of shard `k` among `count`.
pub fn lease_name(k: u32, count: u32) -> String {
    if count <= 1 {
        crate::server::LEASE_NAME.to_owned()
    } else {
        format!("{}/{k}", crate::server::LEASE_NAME)
    }
}

/// The namespaces of shard `k`'s topic and internal logs.
pub fn namespaces(k: u32, count: u32) -> (String, String) {
    if count <= 1 {
        ("topics".into(), "internal".into())
    } else {
        (format!("{k}/topics"), format!("{k}/internal"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_spread_over_shards_and_stay_put() {
        assert_eq!(shard_of("orders", 1), 0);
        let mut seen = [0u32; 8];
        for i in 0..800 {
            seen[shard_of(&format!("topic-{i}"), 8) as usize] += 1;
        }
        assert!(seen.iter().all(|n| (60..=140).contains(n)), "{seen:?}");
        // The stored data depends on this never changing.
        assert_eq!(shard_of("orders", 8), shard_of("orders", 8));
        assert_eq!(shard_of("", 8), (0xcbf2_9ce4_8422_2325u64 % 8) as u32);
    }
}
