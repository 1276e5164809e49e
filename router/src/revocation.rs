//! Token revocations in memory: which logins and sessions to refuse.
//!
//! A revocation refuses a user's tokens issued (JWT `iat`, Unix seconds)
//! before a time, on every device of the user or on one device. The
//! records are written through the committer (`Op::Revoke`, durable like
//! every write) and loaded from storage when the router starts; this
//! registry answers "is this token refused?" at every login without a
//! storage read. A token without `iat` counts as issued at time 0: any
//! revocation of its user (or its device) refuses it, since nothing says
//! it was issued after the revocation (docs/ADMIN_API.md §6.3).
//!
//! Logins and revocations cannot miss each other: a login checks before it
//! answers `AuthOk` and again after it has registered its connection; a
//! revocation records here first and then kicks the registered
//! connections. Whichever comes second sees the other.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use ferry_storage::Revocation;

/// One user's revocations.
#[derive(Debug, Default, Clone)]
struct UserRevocations {
    /// Tokens issued before this are refused on every device (0: none).
    all: u64,
    /// Per-device times (few: one per device an operator revoked).
    devices: Vec<(Arc<str>, u64)>,
}

impl UserRevocations {
    fn issued_before(&self, device: &str) -> u64 {
        let device = self
            .devices
            .iter()
            .find(|(d, _)| d.as_ref() == device)
            .map_or(0, |(_, t)| *t);
        self.all.max(device)
    }
}

/// The revocations of every user, in memory (one entry per revoked user).
#[derive(Debug, Default)]
pub struct Revocations {
    users: RwLock<HashMap<Arc<str>, UserRevocations, foldhash::fast::RandomState>>,
}

impl Revocations {
    /// The registry holding `stored` (read from storage at start).
    pub fn new(stored: Vec<Revocation>) -> Revocations {
        let revocations = Revocations::default();
        for r in stored {
            revocations.record(&r.user, r.device.as_deref(), r.issued_before);
        }
        revocations
    }

    /// Records that `user`'s tokens (on `device`, or on every device)
    /// issued before `issued_before` are refused; an earlier time than the
    /// one recorded changes nothing. Returns the time now in force.
    pub fn record(&self, user: &str, device: Option<&str>, issued_before: u64) -> u64 {
        let mut users = self.users.write().unwrap_or_else(|e| e.into_inner());
        let entry = match users.get_mut(user) {
            Some(entry) => entry,
            None => users.entry(user.into()).or_default(),
        };
        match device {
            None => {
                entry.all = entry.all.max(issued_before);
                entry.all
            }
            Some(device) => match entry.devices.iter_mut().find(|(d, _)| d.as_ref() == device) {
                Some((_, t)) => {
                    *t = (*t).max(issued_before);
                    *t
                }
                None => {
                    entry.devices.push((device.into(), issued_before));
                    issued_before
                }
            },
        }
    }

    /// Whether a token of `user` on `device` issued at `issued_at` (Unix
    /// seconds; 0 for a token without `iat`) is refused.
    pub fn refuses(&self, user: &str, device: &str, issued_at: u64) -> bool {
        let users = self.users.read().unwrap_or_else(|e| e.into_inner());
        users
            .get(user)
            .is_some_and(|r| issued_at < r.issued_before(device))
    }

    /// How many users have a revocation.
    pub fn users(&self) -> usize {
        self.users.read().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_and_device_revocations_combine_and_only_move_forward() {
        let r = Revocations::new(vec![Revocation {
            user: "alice".into(),
            device: Some("phone".into()),
            issued_before: 200,
        }]);
        assert!(r.refuses("alice", "phone", 199));
        assert!(
            !r.refuses("alice", "phone", 200),
            "issued at the time: kept"
        );
        assert!(!r.refuses("alice", "tablet", 0), "another device");
        assert!(!r.refuses("bob", "phone", 0), "another user");
        assert_eq!(r.record("alice", None, 100), 100);
        assert!(r.refuses("alice", "tablet", 99));
        assert!(
            r.refuses("alice", "phone", 150),
            "the device's later time wins"
        );
        assert_eq!(r.record("alice", None, 50), 100, "never moves back");
        assert_eq!(r.record("alice", Some("phone"), 300), 300);
        assert!(r.refuses("alice", "phone", 299));
        assert!(r.refuses("alice", "tablet", 0), "no iat: issued at 0");
        assert_eq!(r.users(), 1);
    }
}
