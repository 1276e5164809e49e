//! ferry storage, on RocksDB.
//!
//! - [`keys`]: the key layout of every column family (with a diagram).
//! - [`model`]: the stored values.
//! - [`db`]: opening (schema check) and every read: inbox pages, history,
//!   cursors, dedup records.
//! - [`backup`]: backups while serving, and restore (with the seq floor
//!   and id jump that keep a restored node from handing anything out twice).
//! - [`commit`]: the group committer, the one writer: one `WriteBatch` and
//!   one WAL sync per batch, outcomes reported after durability.
//! - [`groups`]: group membership snapshots and their cache.
//! - [`link`]: cluster links: the outbox of batches for peer nodes, the
//!   link positions, and [`Homes`] (where users and groups live).
//! - [`retention`]: background removal of expired entries.
//! - [`revocation`]: token revocations (read at start; written by the committer).
//! - [`now_ms`] and [`retention_cutoff_ms`]: the one clock and the one
//!   retention cut-off every part of ferry uses.
//!
//! Bodies are stored once per conversation message (`msgs`); inboxes hold
//! small pointers to them (write diffusion for groups, and the same shape
//! for 1:1). A 1:1 message writes four small entries: the message, two inbox
//! pointers (recipient, sender's copy) and the dedup record.
#![warn(missing_docs)]

pub mod backup;
pub mod commit;
pub mod db;
pub mod groups;
pub mod keys;
pub mod link;
pub mod model;
pub mod retention;
pub mod revocation;

pub use backup::{BackupInfo, Restored};
pub use commit::{
    CommitOptions, Committer, Durability, ENTRY_FRAME_ROOM, Fanout, GroupChange, LinkOutcome, Op,
    Outcome, Target, link_position, max_entry_bytes_for,
};
pub use db::{
    CACHE_ROLES, DEFAULT_MEMORY_BUDGET_BYTES, InboxPage, MIN_MEMORY_BUDGET_BYTES, Storage,
    StorageOptions, StorageUsage,
};
pub use groups::{Group, Refusal};
pub use link::{Homes, LinkOut, NodeId};
pub use revocation::Revocation;

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The retention cut-off at `now_ms`: anything older than this (ms since
/// the epoch) is past a retention of `retention_days`.
pub fn retention_cutoff_ms(now_ms: u64, retention_days: u32) -> u64 {
    now_ms.saturating_sub(retention_days as u64 * 86_400_000)
}

/// Storage errors.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// RocksDB failed.
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    /// A stored value does not decode.
    #[error("corrupt value: {0}")]
    Corrupt(#[from] prost::DecodeError),
    /// The data dir was written by an incompatible schema.
    #[error("incompatible data dir: {0}")]
    Schema(String),
    /// File-system trouble outside RocksDB.
    #[error("io: {0}")]
    Io(String),
}
