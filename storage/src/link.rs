//! Cluster links, the storage side (docs/CLUSTER.md §2.1): where users and
//! groups live as the committer needs to know it ([`Homes`]), the outbox of
//! link batches waiting for a peer's confirmation, and each link's position.
//!
//! ```text
//! outbox  [peer u16][seq u64]  → encoded bus Envelope (LinkBatch), until the peer confirms it
//! meta    b"link_out"[peer]    → last link seq assigned for the peer (survives an empty outbox)
//!         b"link_in"[origin]   → origin's epoch u64, last link seq applied from it u64
//!         b"link_epoch"        → this data dir's link epoch (random, made once)
//!         b"link_prev"[peer]   → after a restore: the backup's epoch u64, and the
//!                                last seq of the link carried over from it u64
//! ```
//!
//! A restore renews the epoch but keeps the link seqs going: the backup's
//! outbox rows are re-stamped with the new epoch and keep their seqs, and
//! `link_prev` tells the peer that this epoch's batches up to that seq are
//! the old epoch's (so a peer that applied them does not apply them again).
//!
//! The epoch names a data dir's history: a receiver that sees a new epoch
//! from a sender (its data dir was replaced, or restored from a backup)
//! starts that link over at seq 1 instead of dropping its batches as
//! replays of seqs it has applied before.
//!
//! The committer writes outbox rows and both positions in the same
//! `WriteBatch` as the change they carry; this module reads them back (at
//! start-up, and for a resend of batches no longer held in memory) and
//! trims confirmed rows.

use std::fmt::Debug;

use bytes::Bytes;
use rocksdb::{Direction, IteratorMode, ReadOptions};

use crate::db::{Storage, cf};
use crate::{StorageError, keys};

/// A node id in a cluster (1..=1023; 0 on a single node).
pub type NodeId = u16;

/// Where users and groups live, as the committer needs to know it: the
/// router hands it the cluster's placement. A single node has none, and the
/// committer then takes every user and group as local without asking.
pub trait Homes: Send + Sync + Debug {
    /// This node.
    fn this_node(&self) -> NodeId;
    /// The home node of `user` (its inbox and its connections).
    fn home_of_user(&self, user: &str) -> NodeId;
    /// The owner node of `group` (its members and its order).
    fn owner_of_group(&self, group: &str) -> NodeId;
}

/// A link batch the committer made durable for a peer, to be published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkOut {
    /// The peer node.
    pub peer: NodeId,
    /// Its seq on the link to that peer.
    pub seq: u64,
    /// The encoded bus `Envelope`, exactly as stored in the outbox.
    pub envelope: Bytes,
}

/// A random, non-zero epoch: the standard library's per-process random
/// hash keys over the clock (no extra dependency for 64 random bits).
fn new_epoch() -> u64 {
    use std::hash::BuildHasher;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    std::collections::hash_map::RandomState::new()
        .hash_one(nanos)
        .max(1)
}

fn u64_value(value: &[u8]) -> Result<u64, StorageError> {
    <[u8; 8]>::try_from(value)
        .map(u64::from_be_bytes)
        .map_err(|_| StorageError::Schema("unreadable link position".into()))
}

impl Storage {
    /// The last link seq assigned for `peer` (0: none yet).
    pub fn link_out_last(&self, peer: NodeId) -> Result<u64, StorageError> {
        match self
            .db
            .get_cf(self.cf(cf::META), keys::link_out_key(peer))?
        {
            Some(v) => u64_value(&v),
            None => Ok(0),
        }
    }

    /// The epoch of `origin`'s link and the last seq applied from it
    /// (`(0, 0)`: nothing applied yet).
    pub fn link_in_applied(&self, origin: NodeId) -> Result<(u64, u64), StorageError> {
        match self
            .db
            .get_cf(self.cf(cf::META), keys::link_in_key(origin))?
        {
            Some(v) if v.len() == 16 => Ok((u64_value(&v[..8])?, u64_value(&v[8..])?)),
            Some(_) => Err(StorageError::Schema("unreadable link position".into())),
            None => Ok((0, 0)),
        }
    }

    /// The epoch the link to `peer` continues and the last seq carried over
    /// from it (`(0, 0)`: never restored).
    pub fn link_prev(&self, peer: NodeId) -> Result<(u64, u64), StorageError> {
        match self
            .db
            .get_cf(self.cf(cf::META), keys::link_prev_key(peer))?
        {
            Some(v) if v.len() == 16 => Ok((u64_value(&v[..8])?, u64_value(&v[8..])?)),
            Some(_) => Err(StorageError::Schema("unreadable link position".into())),
            None => Ok((0, 0)),
        }
    }

    /// After a restore: gives the data dir a new link epoch that continues
    /// the backup's (see the module doc). Every outbox row is re-stamped
    /// with the new epoch (same seq), and each link with a seq records the
    /// old epoch and its last seq in `link_prev`. One synced write.
    pub(crate) fn continue_links_in_new_epoch(&self) -> Result<u64, StorageError> {
        use ferry_protocol::bus;
        use prost::Message;
        let meta = self.cf(cf::META);
        let old = match self.db.get_cf(meta, keys::META_LINK_EPOCH)? {
            Some(v) => u64_value(&v)?,
            None => 0,
        };
        let epoch = new_epoch();
        let mut batch = rocksdb::WriteBatch::default();
        batch.put_cf(meta, keys::META_LINK_EPOCH, epoch.to_be_bytes());
        if old != 0 {
            for item in self.db.prefix_iterator_cf(meta, b"link_out") {
                let (key, value) = item?;
                let Some(peer) = key.strip_prefix(b"link_out".as_slice()) else {
                    break;
                };
                let Ok(peer) = <[u8; 2]>::try_from(peer) else {
                    break;
                };
                let mut prev = Vec::with_capacity(16);
                prev.extend_from_slice(&old.to_be_bytes());
                prev.extend_from_slice(&u64_value(&value)?.to_be_bytes());
                batch.put_cf(meta, keys::link_prev_key(u16::from_be_bytes(peer)), prev);
            }
        }
        for item in self
            .db
            .iterator_cf(self.cf(cf::OUTBOX), IteratorMode::Start)
        {
            let (key, value) = item?;
            let mut envelope = bus::Envelope::decode(value.as_ref())
                .map_err(|e| StorageError::Schema(format!("unreadable outbox row: {e}")))?;
            if let Some(bus::envelope::Body::LinkBatch(b)) = envelope.body.as_mut() {
                b.epoch = epoch;
            }
            batch.put_cf(self.cf(cf::OUTBOX), key, envelope.encode_to_vec());
        }
        let mut wo = rocksdb::WriteOptions::default();
        // Before the node starts: its first batch must carry the new epoch.
        wo.set_sync(true);
        self.db.write_opt(batch, &wo)?;
        Ok(epoch)
    }

    /// This data dir's link epoch, made (randomly, and written with a WAL
    /// sync) the first time it is asked for. Never 0.
    pub fn link_epoch(&self) -> Result<u64, StorageError> {
        let meta = self.cf(cf::META);
        if let Some(v) = self.db.get_cf(meta, keys::META_LINK_EPOCH)? {
            return u64_value(&v);
        }
        self.write_link_epoch(new_epoch())
    }

    /// Gives this data dir a new link epoch (after a restore from a backup:
    /// its peers must not take its new batches for replays of old ones).
    pub fn renew_link_epoch(&self) -> Result<u64, StorageError> {
        self.write_link_epoch(new_epoch())
    }

    fn write_link_epoch(&self, epoch: u64) -> Result<u64, StorageError> {
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        let mut batch = rocksdb::WriteBatch::default();
        batch.put_cf(
            self.cf(cf::META),
            keys::META_LINK_EPOCH,
            epoch.to_be_bytes(),
        );
        self.db.write_opt(batch, &wo)?;
        Ok(epoch)
    }

    /// Up to `limit` outbox rows for `peer` with seq `>= from_seq`, in seq
    /// order: batches the peer has not confirmed yet.
    pub fn outbox_page(
        &self,
        peer: NodeId,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Bytes)>, StorageError> {
        let start = keys::outbox_key(peer, from_seq);
        let mut read = ReadOptions::default();
        read.set_iterate_upper_bound(keys::outbox_key(peer, u64::MAX));
        let iter = self.db.iterator_cf_opt(
            self.cf(cf::OUTBOX),
            read,
            IteratorMode::From(&start, Direction::Forward),
        );
        let mut rows = Vec::new();
        for item in iter.take(limit) {
            let (key, value) = item?;
            let seq = keys::trailing_u64(&key)
                .ok_or_else(|| StorageError::Schema("unreadable outbox key".into()))?;
            rows.push((seq, Bytes::from(value.into_vec())));
        }
        Ok(rows)
    }

    /// Removes the outbox rows of `peer` up to and including `through`: the
    /// peer confirmed them. Not synced: a trim lost to a crash only means
    /// those batches are published once more and dropped by the peer as
    /// duplicates.
    pub fn trim_outbox(&self, peer: NodeId, through: u64) -> Result<(), StorageError> {
        let mut batch = rocksdb::WriteBatch::default();
        batch.delete_range_cf(
            self.cf(cf::OUTBOX),
            keys::outbox_key(peer, 0),
            keys::outbox_key(peer, through.saturating_add(1)),
        );
        self.db.write(batch)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StorageOptions;

    #[test]
    fn outbox_pages_are_per_peer_in_seq_order_and_trims_remove_only_confirmed_rows() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), StorageOptions::default()).unwrap();
        let mut batch = rocksdb::WriteBatch::default();
        for (peer, seq) in [(2u16, 3u64), (2, 1), (3, 1), (2, 2), (2, 300)] {
            batch.put_cf(
                storage.cf(cf::OUTBOX),
                keys::outbox_key(peer, seq),
                format!("{peer}/{seq}"),
            );
        }
        batch.put_cf(
            storage.cf(cf::META),
            keys::link_out_key(2),
            300u64.to_be_bytes(),
        );
        storage.db.write(batch).unwrap();

        let seqs = |peer, from| -> Vec<u64> {
            storage
                .outbox_page(peer, from, 10)
                .unwrap()
                .into_iter()
                .map(|(s, _)| s)
                .collect()
        };
        assert_eq!(seqs(2, 0), vec![1, 2, 3, 300]);
        assert_eq!(seqs(2, 3), vec![3, 300]);
        assert_eq!(seqs(3, 0), vec![1]);
        assert_eq!(
            storage.outbox_page(2, 2, 1).unwrap(),
            vec![(2, Bytes::from_static(b"2/2"))]
        );
        assert_eq!(storage.link_out_last(2).unwrap(), 300);
        assert_eq!(storage.link_out_last(3).unwrap(), 0);
        assert_eq!(storage.link_in_applied(2).unwrap(), (0, 0));
        let epoch = storage.link_epoch().unwrap();
        assert_ne!(epoch, 0);
        assert_eq!(storage.link_epoch().unwrap(), epoch, "made once, then read");
        let renewed = storage.renew_link_epoch().unwrap();
        assert_ne!(renewed, epoch);
        assert_eq!(storage.link_epoch().unwrap(), renewed);

        storage.trim_outbox(2, 2).unwrap();
        assert_eq!(seqs(2, 0), vec![3, 300]);
        assert_eq!(seqs(3, 0), vec![1], "another peer's rows stay");
        storage.trim_outbox(2, 300).unwrap();
        assert!(seqs(2, 0).is_empty());
    }
}
