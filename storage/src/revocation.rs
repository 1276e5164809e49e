//! Token revocations, the storage side (docs/ADMIN_API.md, "Revoke tokens").
//!
//! ```text
//! meta  b"revoked"[len][user]               → issued_before u64: the user's tokens whose `iat`
//!                                             (Unix seconds) is before it are refused
//!       b"revoked"[len][user][len][device]  → issued_before u64: the same, on that device only
//! ```
//!
//! A record only ever moves forward: the committer (`Op::Revoke`) writes
//! the later of the stored and the asked time, in a batch whose WAL is
//! synced like every other write that is not a device ack, so a revocation
//! that was answered survives a crash. The router loads every record at
//! start ([`Storage::revocations`]) and checks logins against them in
//! memory. One record per revoked user or device: they are written by an
//! operator or an app backend, never by a client.

use rocksdb::{Direction, IteratorMode, ReadOptions};

use crate::db::{Storage, cf, storable};
use crate::{StorageError, keys};

/// One stored revocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// The user.
    pub user: String,
    /// Only this device of the user; `None`: every device.
    pub device: Option<String>,
    /// Tokens issued (`iat`, Unix seconds) before this are refused.
    pub issued_before: u64,
}

pub(crate) fn issued_before_value(value: &[u8]) -> Result<u64, StorageError> {
    <[u8; 8]>::try_from(value)
        .map(u64::from_be_bytes)
        .map_err(|_| StorageError::Schema("unreadable token revocation".into()))
}

impl Storage {
    /// The revocation time of `user`'s tokens on `device` (`None`: the
    /// record for every device), if one is stored. `None` for ids longer
    /// than `MAX_ID_BYTES`.
    pub fn revocation(
        &self,
        user: &str,
        device: Option<&str>,
    ) -> Result<Option<u64>, StorageError> {
        if !storable(user) || !device.is_none_or(storable) {
            return Ok(None);
        }
        match self
            .db
            .get_pinned_cf(self.cf(cf::META), keys::revoked_key(user, device))?
        {
            Some(v) => Ok(Some(issued_before_value(&v)?)),
            None => Ok(None),
        }
    }

    /// Every stored revocation, in key order (users bytewise, each user's
    /// record for every device before its per-device ones). Read once at
    /// start.
    pub fn revocations(&self) -> Result<Vec<Revocation>, StorageError> {
        let mut upper = keys::META_REVOKED_PREFIX.to_vec();
        *upper.last_mut().expect("non-empty prefix") += 1;
        let mut read = ReadOptions::default();
        read.set_iterate_upper_bound(upper);
        let iter = self.db.iterator_cf_opt(
            self.cf(cf::META),
            read,
            IteratorMode::From(keys::META_REVOKED_PREFIX, Direction::Forward),
        );
        let mut out = Vec::new();
        for item in iter {
            let (key, value) = item?;
            let Some((user, device)) = keys::decode_revoked_key(&key) else {
                return Err(StorageError::Schema(
                    "unreadable token revocation key".into(),
                ));
            };
            out.push(Revocation {
                user: user.to_owned(),
                device: device.map(str::to_owned),
                issued_before: issued_before_value(&value)?,
            });
        }
        Ok(out)
    }
}
