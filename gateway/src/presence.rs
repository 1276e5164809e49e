//! "Last seen": when each user's most recent connection to this process
//! ended, for the admin API's presence call.
//!
//! Kept in memory only: it starts empty at every start and is not shared
//! between nodes. Who is online *now* comes from the router's session
//! registry; this table answers "when did an offline user leave".
//!
//! It is written once per closed connection (never per frame), sharded like
//! the session registry, and bounded: each shard holds at most
//! `capacity / SHARDS` users, and a full shard forgets the older half of
//! its entries, so memory stays flat however many distinct users come and go.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard};

const SHARDS: usize = 64;

type Shard = Mutex<HashMap<Arc<str>, u64>>;

/// Users remembered by default (about 100 MB at most with 64-byte ids).
pub const DEFAULT_CAPACITY: usize = 1 << 20;

/// When users were last connected, in ms since the Unix epoch.
pub struct LastSeen {
    shards: Box<[Shard]>,
    hasher: std::collections::hash_map::RandomState,
    per_shard: usize,
}

impl Default for LastSeen {
    fn default() -> Self {
        LastSeen::new(DEFAULT_CAPACITY)
    }
}

impl LastSeen {
    /// A table remembering about `capacity` users.
    pub fn new(capacity: usize) -> LastSeen {
        LastSeen {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: Default::default(),
            per_shard: (capacity / SHARDS).max(2),
        }
    }

    fn shard(&self, user: &str) -> MutexGuard<'_, HashMap<Arc<str>, u64>> {
        let i = (self.hasher.hash_one(user) as usize) % SHARDS;
        // A panic under this lock cannot leave the map half-updated.
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that a connection of `user` ended at `at_ms`.
    pub fn record(&self, user: &Arc<str>, at_ms: u64) {
        let mut shard = self.shard(user);
        if let Some(seen) = shard.get_mut(user.as_ref()) {
            *seen = (*seen).max(at_ms);
            return;
        }
        if shard.len() >= self.per_shard {
            // Forget the older half. O(n log n) once per n/2 new users.
            let mut times: Vec<u64> = shard.values().copied().collect();
            let mid = times.len() / 2;
            let (_, median, _) = times.select_nth_unstable(mid);
            let median = *median;
            shard.retain(|_, seen| *seen > median);
        }
        shard.insert(user.clone(), at_ms);
    }

    /// When a connection of `user` last ended, if remembered.
    pub fn get(&self, user: &str) -> Option<u64> {
        self.shard(user).get(user).copied()
    }

    /// Users remembered now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    /// Whether nobody is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_latest_time() {
        let seen = LastSeen::default();
        let alice: Arc<str> = "alice".into();
        seen.record(&alice, 10);
        seen.record(&alice, 30);
        seen.record(&alice, 20);
        assert_eq!(seen.get("alice"), Some(30));
        assert_eq!(seen.get("bob"), None);
    }

    #[test]
    fn stays_bounded_and_keeps_the_recent() {
        let seen = LastSeen::new(SHARDS * 8);
        for i in 0..10_000u64 {
            seen.record(&format!("user{i}").into(), i);
        }
        assert!(seen.len() <= SHARDS * 8, "len {}", seen.len());
        assert_eq!(seen.get("user9999"), Some(9999), "the newest is kept");
        assert_eq!(seen.get("user0"), None, "the oldest is forgotten");
    }
}
