//! The transaction table: transactions by id, in shards, each behind a lock
//! of its own. Upkeep walks the table a shard at a time, so that a walk
//! over a million remembered transactions never holds every lookup up
//! while it copies the whole table out.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Shards of the table: a walk holds one at a time, for a 256th of it.
pub(crate) const SHARDS: usize = 256;

/// One shard: values by id.
pub(crate) type Shard<V> = HashMap<String, Arc<V>>;

/// Values by id (here: a transaction's slot, an `Arc`).
pub(crate) struct Table<V> {
    shards: Box<[Mutex<Shard<V>>]>,
    hasher: RandomState,
}

impl<V> Default for Table<V> {
    fn default() -> Self {
        Table {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
        }
    }
}

impl<V> Table<V> {
    /// The shard `id` belongs to.
    pub(crate) fn shard_of(&self, id: &str) -> usize {
        (self.hasher.hash_one(id) % SHARDS as u64) as usize
    }

    fn shard(&self, id: &str) -> MutexGuard<'_, Shard<V>> {
        lock(&self.shards[self.shard_of(id)])
    }

    pub(crate) fn get(&self, id: &str) -> Option<Arc<V>> {
        self.shard(id).get(id).cloned()
    }

    /// Whether `value` is what the table holds for `id`.
    pub(crate) fn holds(&self, id: &str, value: &Arc<V>) -> bool {
        self.shard(id)
            .get(id)
            .is_some_and(|v| Arc::ptr_eq(v, value))
    }

    pub(crate) fn contains(&self, id: &str) -> bool {
        self.shard(id).contains_key(id)
    }

    /// The value for `id`, made by `make` if there is none.
    pub(crate) fn get_or_insert_with(&self, id: &str, make: impl FnOnce() -> V) -> Arc<V> {
        self.shard(id)
            .entry(id.to_owned())
            .or_insert_with(|| Arc::new(make()))
            .clone()
    }

    /// Removes `id` if the table still holds `value` for it.
    pub(crate) fn remove_if_holds(&self, id: &str, value: &Arc<V>) {
        let mut shard = self.shard(id);
        if shard.get(id).is_some_and(|v| Arc::ptr_eq(v, value)) {
            shard.remove(id);
        }
    }

    /// Empty shards to fill (at start-up), each entry in the shard
    /// [`Self::shard_of`] names; [`Self::fill`] puts them in place.
    pub(crate) fn empty_shards(&self, expected: usize) -> Vec<Shard<V>> {
        (0..SHARDS)
            .map(|_| HashMap::with_capacity(expected.div_ceil(SHARDS)))
            .collect()
    }

    /// Replaces the table's contents with `shards`, filled as
    /// [`Self::empty_shards`] says.
    pub(crate) fn fill(&self, shards: Vec<Shard<V>>) {
        debug_assert_eq!(shards.len(), SHARDS);
        for (place, shard) in self.shards.iter().zip(shards) {
            *lock(place) = shard;
        }
    }

    /// A copy of shard `n`'s entries (`n` < [`SHARDS`]).
    pub(crate) fn entries_of(&self, n: usize) -> Vec<(String, Arc<V>)> {
        lock(&self.shards[n])
            .iter()
            .map(|(id, v)| (id.clone(), v.clone()))
            .collect()
    }

    /// Every value (each shard copied in turn).
    pub(crate) fn values(&self) -> Vec<Arc<V>> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            out.extend(lock(shard).values().cloned());
        }
        out
    }

    /// How many entries the table holds.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_live_in_the_shard_their_id_names() {
        let table: Table<u32> = Table::default();
        let ids: Vec<String> = (0..1000).map(|i| format!("txn-{i}")).collect();
        let mut shards = table.empty_shards(ids.len());
        for (i, id) in ids.iter().enumerate() {
            shards[table.shard_of(id)].insert(id.clone(), Arc::new(i as u32));
        }
        table.fill(shards);
        assert_eq!(table.len(), 1000);
        let walked: Vec<String> = (0..SHARDS)
            .flat_map(|n| table.entries_of(n))
            .map(|(id, _)| id)
            .collect();
        let once: std::collections::HashSet<&String> = walked.iter().collect();
        assert_eq!(walked.len(), once.len(), "no entry is walked twice");
        assert_eq!(
            once,
            ids.iter().collect(),
            "a walk shard by shard sees every entry"
        );
        let seven = table.get("txn-7").expect("found in its shard");
        assert_eq!(*seven, 7);
        assert!(table.holds("txn-7", &seven));
        assert!(
            !table.holds("txn-7", &Arc::new(7)),
            "another value of the same id"
        );
        table.remove_if_holds("txn-7", &Arc::new(7));
        assert!(table.contains("txn-7"), "only the value held is removed");
        table.remove_if_holds("txn-7", &seven);
        assert!(!table.contains("txn-7"));
        let made = table.get_or_insert_with("new", || 1);
        assert!(Arc::ptr_eq(&made, &table.get_or_insert_with("new", || 2)));
        assert_eq!(table.values().len(), 1000);
    }
}
