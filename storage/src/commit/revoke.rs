//! `Op::Revoke`: token revocations (see `crate::revocation` for the
//! records and docs/ADMIN_API.md for the call).
//!
//! A revocation is one `meta` put, synced with its batch like every write
//! that is not a device ack, so an admin call that was answered survives a
//! crash. The record keeps the later of the stored time and the asked one:
//! revoking "before yesterday" after "before now" takes nothing back.

use super::*;
use crate::revocation::issued_before_value;

impl Worker {
    /// Stores that `user`'s tokens (on `device`, or on every device) issued
    /// before `issued_before` (Unix seconds) are refused.
    pub(super) fn revoke(
        &mut self,
        user: Arc<str>,
        device: Option<Arc<str>>,
        issued_before: u64,
        state: &mut BatchState,
    ) -> Result<Outcome, StorageError> {
        let key = keys::revoked_key(&user, device.as_deref());
        // An earlier op of this batch may have revoked the same tokens: its
        // put is the newest value (puts of one key apply in order).
        let staged = state
            .writes
            .puts
            .iter()
            .rev()
            .find(|(name, k, _)| *name == cf::META && *k == key)
            .and_then(|(_, _, value)| value.as_deref().map(issued_before_value));
        let current = match staged {
            Some(value) => Some(value?),
            None => self.storage.revocation(&user, device.as_deref())?,
        };
        let issued_before = current.map_or(issued_before, |c| c.max(issued_before));
        state.put(cf::META, key, issued_before.to_be_bytes());
        Ok(Outcome::Applied {
            fanouts: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commit::tests::batch;

    fn worker() -> (tempfile::TempDir, Arc<Storage>, Worker) {
        crate::commit::tests::worker(CommitOptions::default())
    }

    fn revoke(user: &str, device: Option<&str>, issued_before: u64) -> Op {
        Op::Revoke {
            user: user.into(),
            device: device.map(Into::into),
            issued_before,
        }
    }

    #[test]
    fn revocations_are_stored_per_user_and_device_and_never_move_back() {
        let (_dir, storage, mut w) = worker();
        let outcomes = batch(
            &mut w,
            vec![
                revoke("alice", None, 5_000),
                // Earlier than the one just staged in the same batch: kept later.
                revoke("alice", None, 4_000),
                revoke("alice", Some("phone"), 7_000),
            ],
        );
        assert!(
            outcomes
                .iter()
                .all(|o| matches!(o, Outcome::Applied { .. })),
            "{outcomes:?}"
        );
        assert_eq!(storage.revocation("alice", None).unwrap(), Some(5_000));
        assert_eq!(
            storage.revocation("alice", Some("phone")).unwrap(),
            Some(7_000)
        );
        assert_eq!(storage.revocation("alice", Some("tablet")).unwrap(), None);
        assert_eq!(storage.revocation("bob", None).unwrap(), None);

        // Across batches: an earlier time takes nothing back, a later one moves it.
        batch(&mut w, vec![revoke("alice", None, 1_000)]);
        assert_eq!(storage.revocation("alice", None).unwrap(), Some(5_000));
        batch(&mut w, vec![revoke("alice", None, 9_000)]);
        assert_eq!(storage.revocation("alice", None).unwrap(), Some(9_000));

        let all = storage.revocations().unwrap();
        let found: Vec<(&str, Option<&str>, u64)> = all
            .iter()
            .map(|r| (r.user.as_str(), r.device.as_deref(), r.issued_before))
            .collect();
        assert_eq!(
            found,
            vec![("alice", None, 9_000), ("alice", Some("phone"), 7_000)]
        );
    }

    #[test]
    fn a_revocation_is_synced_like_any_write_but_an_ack() {
        let (_dir, _storage, mut w) = worker();
        let mut state = BatchState::default();
        w.apply(revoke("alice", None, 1), &mut state);
        assert!(w.sync_batch(&state), "a revocation's batch waits for fsync");
    }

    #[test]
    fn a_revocation_with_an_id_over_its_limit_is_refused() {
        let (_dir, storage, mut w) = worker();
        let long = "x".repeat(limits::MAX_ID_BYTES + 1);
        let outcomes = batch(
            &mut w,
            vec![revoke(&long, None, 1), revoke("alice", Some(&long), 1)],
        );
        for outcome in &outcomes {
            assert!(
                matches!(outcome, Outcome::Refused(r) if r.code == ErrorCode::InvalidRequest),
                "{outcome:?}"
            );
        }
        assert!(storage.revocations().unwrap().is_empty());
    }
}
