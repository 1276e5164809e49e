//! Groups: membership, roles, and who may change what.
//!
//! The committer owns every change, so checks and writes happen in one
//! thread in commit order; readers see immutable snapshots (`Arc<Group>`)
//! swapped in after each commit.

use std::collections::HashMap;
use std::sync::Arc;

use ferry_protocol::ErrorCode;
use ferry_protocol::proto::GroupRole;
use prost::Message;
use rocksdb::{Direction, IteratorMode};

use crate::StorageError;
use crate::db::{Storage, cf};
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

impl Storage {
    /// The group `id`, from the cache or the database.
    pub fn group(&self, id: &str) -> Result<Option<Arc<Group>>, StorageError> {
        if let Some(g) = self
            .groups
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
        {
            return Ok(Some(g.clone()));
        }
        let Some(group) = self.load_group(id)? else {
            return Ok(None);
        };
        let group = Arc::new(group);
        self.groups
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.to_owned())
            .or_insert_with(|| group.clone());
        Ok(Some(group))
    }

    fn load_group(&self, id: &str) -> Result<Option<Group>, StorageError> {
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

    pub(crate) fn cache_group(&self, id: &str, group: Option<Arc<Group>>) {
        let mut cache = self.groups.write().unwrap_or_else(|e| e.into_inner());
        match group {
            Some(g) => {
                cache.insert(id.to_owned(), g);
            }
            None => {
                cache.remove(id);
            }
        }
    }
}
