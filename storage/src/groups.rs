//! Groups: membership, roles, and who may change what.
//!
//! The committer owns every change, so checks and writes happen in one
//! thread in commit order; readers see immutable snapshots (`Arc<Group>`)
//! swapped in after each commit.
//!
//! # The cache
//!
//! [`Storage::group`] answers from a cache of snapshots, which also
//! remembers ids known to be absent (unknown or dissolved), so a lookup of
//! an unknown id does not reach RocksDB every time. The cache is bounded in
//! members ([`crate::StorageOptions::group_cache_members`]): a group costs
//! its member count plus one, an absent id one. It keeps two generations:
//! entries go into the current one; when the current one reaches half the
//! bound it becomes the previous one and the old previous one is dropped
//! (a hit in the previous generation moves the entry back to the current
//! one). Evicting is always safe: the database is complete, the cache only
//! saves reads.
//!
//! Only committed state is cached. The committer installs each batch's
//! changes after its write ([`Storage::cache_groups`]) and bumps the
//! cache's epoch; a reader that missed loads the group from the database
//! and fills the cache only if the epoch has not moved since before its
//! load. Otherwise a reader that loaded a group just before a dissolve
//! committed could put it back after the committer removed it, and the
//! dissolved group would live on in the cache.

use std::collections::HashMap;
use std::sync::Arc;

use ferry_protocol::ErrorCode;
use ferry_protocol::proto::GroupRole;
use foldhash::fast::RandomState;
use prost::Message;
use rocksdb::{Direction, IteratorMode};

use crate::StorageError;
use crate::db::{Storage, cf, storable};
use crate::keys;
use crate::model::GroupMeta;

/// One group's state.
#[derive(Debug, Clone)]
pub struct Group {
    /// Group id.
    pub id: Arc<str>,
    /// Metadata.
    pub meta: GroupMeta,
    /// Members in join order (fan-out iterates this).
    pub members: Vec<Arc<str>>,
    /// Role of each member.
    pub roles: HashMap<Arc<str>, GroupRole>,
}

impl Group {
    /// A member's role, if a member.
    pub fn role(&self, user: &str) -> Option<GroupRole> {
        self.roles.get(user).copied()
    }

    /// Whether `user` is a member.
    pub fn is_member(&self, user: &str) -> bool {
        self.roles.contains_key(user)
    }

    pub(crate) fn remove(&mut self, user: &str) {
        if self.roles.remove(user).is_some() {
            self.members.retain(|m| m.as_ref() != user);
        }
    }

    /// Adds `user` with `role`; an existing member keeps their role.
    pub(crate) fn add(&mut self, user: Arc<str>, role: GroupRole) {
        if let std::collections::hash_map::Entry::Vacant(slot) = self.roles.entry(user.clone()) {
            slot.insert(role);
            self.members.push(user);
        }
    }
}

/// A refused group operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The code for the client.
    pub code: ErrorCode,
    /// Detail.
    pub message: String,
}

pub(crate) fn refuse(code: ErrorCode, message: impl Into<String>) -> Refusal {
    Refusal {
        code,
        message: message.into(),
    }
}

/// A cached answer: the group, or `None` for an id known to be absent.
type Cached = Option<Arc<Group>>;

fn weight(entry: &Cached) -> usize {
    1 + entry.as_ref().map_or(0, |g| g.members.len())
}

/// The bounded, two-generation group cache (see the module docs).
pub(crate) struct GroupCache {
    current: HashMap<Box<str>, Cached, RandomState>,
    previous: HashMap<Box<str>, Cached, RandomState>,
    current_weight: usize,
    previous_weight: usize,
    /// Bound on `current_weight + previous_weight`.
    max_weight: usize,
    /// Bumped by every committed batch that changed groups.
    epoch: u64,
    entries_gauge: metrics::Gauge,
    members_gauge: metrics::Gauge,
}

impl GroupCache {
    pub(crate) fn new(max_weight: usize) -> GroupCache {
        GroupCache {
            current: HashMap::default(),
            previous: HashMap::default(),
            current_weight: 0,
            previous_weight: 0,
            max_weight,
            epoch: 0,
            entries_gauge: metrics::gauge!("ferry_group_cache_entries"),
            members_gauge: metrics::gauge!("ferry_group_cache_members"),
        }
    }

    /// The cached answer for `id`, and whether it sits in the previous
    /// generation (the caller then promotes it).
    fn get(&self, id: &str) -> Option<(Cached, bool)> {
        if let Some(hit) = self.current.get(id) {
            return Some((hit.clone(), false));
        }
        self.previous.get(id).map(|hit| (hit.clone(), true))
    }

    fn remove(&mut self, id: &str) {
        if let Some(old) = self.current.remove(id) {
            self.current_weight -= weight(&old);
        }
        if let Some(old) = self.previous.remove(id) {
            self.previous_weight -= weight(&old);
        }
    }

    /// Sets the entry of `id`. An entry heavier than half the bound is not
    /// kept (its id is then simply not cached).
    fn put(&mut self, id: &str, entry: Cached) {
        self.remove(id);
        let w = weight(&entry);
        let half = self.max_weight / 2;
        if w > half {
            self.publish();
            return;
        }
        if self.current_weight + w > half {
            self.previous = std::mem::take(&mut self.current);
            self.previous_weight = std::mem::replace(&mut self.current_weight, 0);
        }
        self.current.insert(id.into(), entry);
        self.current_weight += w;
        self.publish();
    }

    /// Moves `id` from the previous generation to the current one.
    fn promote(&mut self, id: &str) {
        if let Some(entry) = self.previous.remove(id) {
            self.previous_weight -= weight(&entry);
            self.put(id, entry);
        }
    }

    /// Entries held (both generations).
    pub(crate) fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    /// Members plus entries held: what the bound limits.
    pub(crate) fn weight(&self) -> usize {
        self.current_weight + self.previous_weight
    }

    fn publish(&self) {
        self.entries_gauge.set(self.len() as f64);
        self.members_gauge
            .set(self.weight().saturating_sub(self.len()) as f64);
    }
}

impl Storage {
    /// The group `id` (`None` if it does not exist, was dissolved, or `id`
    /// is longer than `MAX_ID_BYTES`), from the cache or the database.
    /// Blocking on a miss: async callers try [`Storage::group_if_cached`]
    /// first and call this on a blocking thread.
    pub fn group(&self, id: &str) -> Result<Option<Arc<Group>>, StorageError> {
        if !storable(id) {
            return Ok(None);
        }
        let epoch = {
            let cache = self.groups.read().unwrap_or_else(|e| e.into_inner());
            match cache.get(id) {
                Some((hit, false)) => return Ok(hit),
                Some((hit, true)) => {
                    drop(cache);
                    self.groups
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .promote(id);
                    return Ok(hit);
                }
                None => cache.epoch,
            }
        };
        let loaded = self.load_group(id)?.map(Arc::new);
        #[cfg(test)]
        {
            let hook = self.faults.after_group_load.lock().unwrap().take();
            if let Some(hook) = hook {
                hook();
            }
        }
        let mut cache = self.groups.write().unwrap_or_else(|e| e.into_inner());
        // A commit since the load may have changed or dissolved the group:
        // what was loaded is then no longer the committed state.
        if cache.epoch == epoch {
            cache.put(id, loaded.clone());
        }
        Ok(loaded)
    }

    /// The cached answer for `id`, without touching the database:
    /// `Some(Some(group))` for a cached group, `Some(None)` for an id known
    /// to be absent (also any id longer than `MAX_ID_BYTES`), `None` when
    /// the cache does not know: then call the blocking [`Storage::group`] on
    /// a blocking thread. Never blocks beyond a short lock.
    pub fn group_if_cached(&self, id: &str) -> Option<Option<Arc<Group>>> {
        if !storable(id) {
            return Some(None);
        }
        let (hit, in_previous) = self
            .groups
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)?;
        if in_previous {
            self.groups
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .promote(id);
        }
        Some(hit)
    }

    /// When the group `id` was dissolved, if it was (its tombstone).
    pub fn group_tombstone(&self, id: &str) -> Result<Option<u64>, StorageError> {
        if !storable(id) {
            return Ok(None);
        }
        self.read_fault("tombstone", id)?;
        Ok(self
            .db
            .get_pinned_cf(self.cf(cf::GROUPS), keys::group_tombstone_key(id))?
            .map(|v| <[u8; 8]>::try_from(&*v).map_or(0, u64::from_be_bytes)))
    }

    fn load_group(&self, id: &str) -> Result<Option<Group>, StorageError> {
        self.read_fault("group", id)?;
        let groups = self.cf(cf::GROUPS);
        let Some(meta) = self.db.get_pinned_cf(groups, keys::group_meta_key(id))? else {
            return Ok(None);
        };
        let meta = GroupMeta::decode(&*meta)?;
        let prefix = keys::group_members_prefix(id);
        let mut members = Vec::new();
        let mut roles = HashMap::new();
        for item in self
            .db
            .iterator_cf(groups, IteratorMode::From(&prefix, Direction::Forward))
        {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            let Some((member, _)) = keys::take_id(&k[prefix.len()..]) else {
                continue;
            };
            let member: Arc<str> = member.into();
            let role = v
                .first()
                .and_then(|r| GroupRole::try_from(*r as i32).ok())
                .unwrap_or(GroupRole::Member);
            roles.insert(member.clone(), role);
            members.push(member);
        }
        Ok(Some(Group {
            id: id.into(),
            meta,
            members,
            roles,
        }))
    }

    /// Installs one committed batch's group changes (`None`: dissolved,
    /// remembered as absent). Called by the committer only, after the write.
    pub(crate) fn cache_groups(&self, changes: impl IntoIterator<Item = (String, Cached)>) {
        let mut cache = self.groups.write().unwrap_or_else(|e| e.into_inner());
        cache.epoch += 1;
        for (id, group) in changes {
            cache.put(&id, group);
        }
    }

    /// Entries and weight (members + entries) of the group cache.
    #[doc(hidden)]
    pub fn group_cache_size(&self) -> (usize, usize) {
        let cache = self.groups.read().unwrap_or_else(|e| e.into_inner());
        (cache.len(), cache.weight())
    }
}
