//! The group committer: the one writer of the database.
//!
//! ```text
//!  connections ──submit(op, tag)──▶ bounded queue ──▶ committer thread
//!                                                    │ block for one op, drain what is ready
//!                                                    │ apply each: dedup, seq, msg id, checks
//!                                                    │ one WriteBatch, one WAL write (+ fsync)
//!                                                    └─▶ bounded hand-off ─▶ delivery thread
//!                                                                            sink(outcomes): acks, fan-out
//! ```
//!
//! Every write of every connection is coalesced into one `WriteBatch` and one
//! WAL sync per batch, so the cost of an fsync is shared by everything that
//! arrived while the previous one ran. Outcomes are handed to the sink only
//! after the batch is durable: that is what makes a `SendAck` a promise.
//! The sink runs on a second thread, in commit order, so one batch's fan-out
//! overlaps the next batch's apply and fsync; the hand-off between the two
//! holds at most [`DELIVERY_QUEUE_BATCHES`] batches, so a slow fan-out slows
//! the committer (and, through its queue, the senders) instead of piling up.
//!
//! Because one thread applies everything in order, seqs are gap-free and
//! strictly increasing per user, the dedup check cannot race with itself,
//! and group checks (roles, limits) see every earlier change. The thread
//! owns the per-user "next seq" map, loaded lazily from the inbox's last
//! key (or the seq floor a restore from a backup set, when that is higher:
//! see `crate::backup`); a failed write rolls the map back, so no seq is
//! ever skipped. The
//! map is bounded ([`CommitOptions::seq_cache_entries`]): between batches,
//! after a successful write, the least recently used part of it is dropped
//! (two generations); a dropped user's next seq is read again from the
//! inbox, which by then holds everything the map knew.
//!
//! # One op is all or nothing
//!
//! Each op stages its writes into the batch after a savepoint (how many
//! writes and entries the batch held, the last message id) and journals the
//! batch state it changes (next seqs, dedup records, group snapshots,
//! cursors). An op that is refused, or fails (a read error), is rolled back
//! to its savepoint: none of its writes reach the database and none of its
//! seqs or ids are used up, while the other ops of the batch commit. The
//! journals are buffers cleared per op, not reallocated.
//!
//! # What may be stored
//!
//! The committer stores nothing the server cannot deliver: every op that
//! puts an inbox entry first checks that the entry, as the recipient with
//! the largest view of it sees it, fits [`CommitOptions::max_entry_bytes`],
//! and refuses it otherwise. Ids, group names and content types are checked
//! against `ferry_protocol::limits` here too (the router and the admin API
//! check them first; this is the last line).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use ferry_protocol::ErrorCode;
use ferry_protocol::limits::{self, MAX_CONTENT_TYPE_BYTES, MAX_GROUP_NAME_BYTES, MAX_ID_BYTES};
use ferry_protocol::proto::{self, EntryKind, GroupEventKind, GroupRole};
// Keyed by user ids: a seeded hasher, several times faster than SipHash here.
use foldhash::fast::RandomState;
use prost::Message;
use rocksdb::{WriteBatch, WriteOptions};
use tokio::sync::{mpsc, oneshot};

use crate::db::{Storage, cf, message_entry, storable_conv};
use crate::link::{Homes, LinkOut, NodeId};

mod ack;
mod check;
mod group;
mod inline;
mod link;
mod read;
mod recall;
mod revoke;
mod send;
#[cfg(test)]
mod tests;
mod worker;

use check::{check_op, entry_len_bound, inline_len_bound};
use worker::*;

use crate::groups::{Group, Refusal, refuse};
use crate::keys::{self, ConvKey};
use crate::model::{
    DedupValue, GroupMeta, InboxValue, MSG_ID_TIME_SHIFT, StoredMessage, mint_msg_id,
};
use crate::{StorageError, now_ms};
pub use link::{MAX_LINK_BATCH_BYTES, link_position};

/// When a write counts as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// After the WAL is fsynced (survives power loss).
    Fsync,
    /// After the WAL is written to the OS (survives a process crash).
    Wal,
}

/// Committer settings.
#[derive(Debug, Clone)]
pub struct CommitOptions {
    /// Durability of every batch.
    pub durability: Durability,
    /// Most members a group may have.
    pub max_group_members: usize,
    /// Ops queued before `submit` waits (back-pressure on connections).
    pub queue_ops: usize,
    /// Most inbox entries in one batch (bounds a batch's latency).
    pub max_batch_entries: usize,
    /// Most users named in one create/add/remove (keeps group events small
    /// and bounds one request's membership writes).
    pub max_users_per_change: usize,
    /// Largest inbox entry (an encoded `Deliver`, as its largest viewer
    /// sees it) the committer stores; an op whose entry would be larger is
    /// refused with `INVALID_REQUEST`. Set it with [`max_entry_bytes_for`]
    /// from the server's frame size, so that every stored entry fits in a
    /// sync page: what is stored can always be delivered.
    pub max_entry_bytes: usize,
    /// Most users whose next seq the committer keeps in memory; others are
    /// read from their inbox's last key when next needed.
    pub seq_cache_entries: usize,
    /// Cluster mode: where users and groups live. An entry for a user homed
    /// on another node goes into a link batch for that node (see `link`).
    /// `None` on a single node: everything is local and nothing is asked.
    pub homes: Option<Arc<dyn Homes>>,
    /// Written into every message id this committer mints (see
    /// [`mint_msg_id`](crate::model::mint_msg_id)): in a cluster this node's
    /// id, so two nodes never mint the same message or group id; 0 on a
    /// single node.
    pub node_id: u16,
}

impl Default for CommitOptions {
    fn default() -> Self {
        CommitOptions {
            durability: Durability::Fsync,
            max_group_members: 10_000,
            queue_ops: 16_384,
            max_batch_entries: 32_768,
            max_users_per_change: limits::MAX_USERS_PER_CHANGE,
            max_entry_bytes: max_entry_bytes_for(ferry_protocol::DEFAULT_MAX_FRAME_BYTES),
            homes: None,
            node_id: 0,
            seq_cache_entries: 1_000_000,
        }
    }
}

/// Room a page frame needs around one entry, in bytes: what
/// [`max_entry_bytes_for`] keeps from the frame size.
///
/// A `SyncBatch` (or `HistoryPage`) holding one entry adds to the entry:
/// the `Frame` field's tag and length (at most 1 + 5 bytes), the page's
/// `request_id`, `max_seq` (at most 11 bytes each) and `has_more` (2), and
/// the entry's own tag and length (at most 1 + 5): 36 bytes. The router's
/// page builder budgets 64 bytes for a page's fields plus the 4-byte length
/// prefix, then the entry's tag and length: 72 bytes. 128 covers both with
/// room to spare.
pub const ENTRY_FRAME_ROOM: usize = 128;

/// The [`CommitOptions::max_entry_bytes`] for frames of `max_frame_bytes`:
/// the frame size less [`ENTRY_FRAME_ROOM`].
pub const fn max_entry_bytes_for(max_frame_bytes: usize) -> usize {
    max_frame_bytes.saturating_sub(ENTRY_FRAME_ROOM)
}

/// Whom a message or receipt is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One user.
    Direct(Arc<str>),
    /// A group.
    Group(Arc<str>),
}

impl Target {
    fn conv(&self, from: &str) -> ConvKey {
        match self {
            Target::Direct(peer) => ConvKey::direct(from, peer),
            Target::Group(g) => ConvKey::Group(g.to_string()),
        }
    }
}

/// A change to a group.
#[derive(Debug, Clone)]
pub enum GroupChange {
    /// Create; the actor becomes owner. An empty id gets a generated one.
    Create {
        /// Requested id (may be empty).
        group_id: String,
        /// Display name.
        name: String,
        /// Initial members besides the actor.
        members: Vec<String>,
    },
    /// Add members (owner/admin).
    Add {
        /// Group.
        group_id: String,
        /// Users to add.
        members: Vec<String>,
    },
    /// Remove members (owner/admin).
    Remove {
        /// Group.
        group_id: String,
        /// Users to remove.
        members: Vec<String>,
    },
    /// The actor leaves.
    Leave {
        /// Group.
        group_id: String,
    },
    /// Delete the group (owner).
    Dissolve {
        /// Group.
        group_id: String,
    },
    /// Change a member's role (owner).
    SetRole {
        /// Group.
        group_id: String,
        /// Member.
        user: String,
        /// ADMIN or MEMBER.
        role: GroupRole,
    },
}

/// One write.
#[derive(Debug, Clone)]
pub enum Op {
    /// A message (or, with `system`, a message from the server).
    Send {
        /// Sender ("" for system messages).
        from: Arc<str>,
        /// Sender's id for dedup (0: no dedup).
        client_msg_id: u64,
        /// Recipient.
        to: Target,
        /// App content type.
        content_type: String,
        /// Body.
        body: Bytes,
        /// A system message: no sender copy, no membership check.
        system: bool,
    },
    /// Recall one's own message.
    Recall {
        /// Who asks (must be the sender).
        from: Arc<str>,
        /// The conversation.
        to: Target,
        /// The message.
        msg_id: u64,
        /// Window after the send, in ms.
        window_ms: u64,
    },
    /// A read receipt.
    Read {
        /// Reader.
        from: Arc<str>,
        /// Conversation.
        to: Target,
        /// Last message read.
        up_to_msg_id: u64,
    },
    /// A device's cumulative ack.
    Ack {
        /// User.
        user: Arc<str>,
        /// Device.
        device: Arc<str>,
        /// Acked up to.
        seq: u64,
    },
    /// A group change by `actor`.
    Group {
        /// Who asks.
        actor: Arc<str>,
        /// What.
        change: GroupChange,
    },
    /// A peer node's link batch (cluster mode): applied if it is the next
    /// one of its link, each exactly once (see `link`).
    ApplyLink {
        /// The node it came from.
        from: NodeId,
        /// Its link epoch.
        epoch: u64,
        /// The batch.
        batch: ferry_protocol::bus::LinkBatch,
        /// The sender's link as it stood when it published the batch
        /// (default from a sender that does not say).
        head: ferry_protocol::bus::LinkHead,
    },
    /// Refuse `user`'s tokens issued before `issued_before` (on `device`
    /// only, or on every device); see `revoke`. Stored on the user's home
    /// node, where its sessions and logins are.
    Revoke {
        /// The user.
        user: Arc<str>,
        /// One device; `None`: every device.
        device: Option<Arc<str>>,
        /// Tokens whose `iat` (Unix seconds) is before this are refused.
        issued_before: u64,
    },
}

/// One entry to deliver to several inboxes: the same content, each target
/// with its own seq.
#[derive(Debug, Clone)]
pub struct Fanout {
    /// The entry (seq 0; fill in per target).
    pub entry: proto::Deliver,
    /// (user, seq) pairs, in seq order per user.
    pub targets: Vec<(Arc<str>, u64)>,
}

/// What became of an op, reported after its batch is durable.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Stored (or found already stored, when `duplicate`).
    Sent {
        /// The ack for the sender.
        ack: proto::SendAck,
        /// A retransmit: nothing new was stored or is delivered.
        duplicate: bool,
        /// Inboxes written, on this node or staged for a peer's (cluster
        /// mode), the sender's own copy excluded.
        recipients: usize,
        /// What to deliver (users homed on this node only).
        fanouts: Vec<Fanout>,
    },
    /// Recalled.
    Recalled {
        /// The message.
        msg_id: u64,
        /// Recall entries to deliver.
        fanouts: Vec<Fanout>,
    },
    /// A group change was applied.
    GroupChanged {
        /// The group after the change (None once dissolved).
        group: Option<Arc<Group>>,
        /// The group id.
        group_id: String,
        /// Event entries to deliver.
        fanouts: Vec<Fanout>,
    },
    /// Applied with nothing to report but deliveries (receipts, acks).
    Applied {
        /// What to deliver.
        fanouts: Vec<Fanout>,
    },
    /// What became of a peer's link batch (`Op::ApplyLink`).
    Link(LinkOutcome),
    /// Refused by a rule (not a member, window passed, …).
    Refused(Refusal),
    /// The batch could not be written.
    Failed(String),
}

/// What became of a peer's link batch.
#[derive(Debug, Clone)]
pub enum LinkOutcome {
    /// Applied (durable once reported), or found applied before.
    Applied {
        /// What to deliver to this node's users.
        fanouts: Vec<Fanout>,
        /// Applied before: nothing was written.
        duplicate: bool,
    },
    /// Not the next batch of its link (an earlier one is missing): try later.
    NotNext,
    /// From an earlier epoch of its sender: never to be applied.
    Dropped,
    /// Its contents do not decode: its seq is taken (the link goes on) and
    /// nothing of it is stored. A bug or a version mismatch; logged loudly.
    Skipped(String),
}

enum Request<T> {
    Op(Op, T),
    Barrier(oneshot::Sender<()>),
    /// Finish what came before, then end both threads.
    Stop(oneshot::Sender<()>),
}

/// Committed batches the delivery thread may hold, waiting or in progress.
pub const DELIVERY_QUEUE_BATCHES: usize = 2;

/// From the committer thread to the delivery thread, in commit order.
enum Delivery<T> {
    Batch(Vec<(T, Outcome)>, Vec<LinkOut>),
    Barrier(oneshot::Sender<()>),
    Stop(oneshot::Sender<()>),
}

/// Aborts the process when the thread it lives on unwinds. Without its
/// committer or delivery thread a node stores and delivers nothing while
/// still looking alive (its connections stay open, its sends fail): better
/// that it ends, so that its supervisor restarts it and its clients
/// reconnect. Nothing is lost: an op is acknowledged only once durable.
struct AbortOnPanic(&'static str);

impl Drop for AbortOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!(
                thread = self.0,
                "thread panicked (the panic message is above): aborting the process"
            );
            std::process::abort();
        }
    }
}

/// Submits ops to the committer thread.
pub struct Committer<T> {
    tx: mpsc::Sender<Request<T>>,
}

impl<T> Clone for Committer<T> {
    fn clone(&self) -> Self {
        Committer {
            tx: self.tx.clone(),
        }
    }
}

/// The committer thread has stopped.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("committer stopped")]
pub struct CommitterStopped;

impl<T: Send + 'static> Committer<T> {
    /// Starts the committer thread and its delivery thread. `sink`
    /// receives each batch's outcomes, with their tags, after the batch is
    /// durable, on the delivery thread, one batch at a time in commit order.
    pub fn start(
        storage: Arc<Storage>,
        options: CommitOptions,
        sink: impl FnMut(Vec<(T, Outcome)>, Vec<LinkOut>) + Send + 'static,
    ) -> Result<Committer<T>, StorageError> {
        let (tx, rx) = mpsc::channel(options.queue_ops.max(1));
        let last_msg_id = storage.meta_u64(keys::META_MSG_ID_HIGH_WATER)?;
        // Cluster mode: this data dir's link epoch names its link batches.
        let link_epoch = match options.homes {
            Some(_) => storage.link_epoch()?,
            None => 0,
        };
        let seq_floor = storage.seq_floor()?;
        let mut worker = Worker::new(storage, options, last_msg_id);
        worker.link_epoch = link_epoch;
        worker.seq_floor = seq_floor;
        let (deliver_tx, deliver_rx) = std::sync::mpsc::sync_channel(DELIVERY_QUEUE_BATCHES);
        std::thread::Builder::new()
            .name("ferry-deliver".into())
            .spawn(move || {
                let _abort = AbortOnPanic("ferry-deliver");
                deliver(deliver_rx, sink)
            })
            .map_err(|e| StorageError::Io(e.to_string()))?;
        std::thread::Builder::new()
            .name("ferry-commit".into())
            .spawn(move || {
                let _abort = AbortOnPanic("ferry-commit");
                let stopped = worker.run(rx, deliver_tx);
                // Storage goes before the stop is confirmed.
                drop(worker);
                if let Some(done) = stopped {
                    let _ = done.send(());
                }
            })
            .map_err(|e| StorageError::Io(e.to_string()))?;
        Ok(Committer { tx })
    }

    /// Queues `op`; waits only while the queue is full.
    pub async fn submit(&self, op: Op, tag: T) -> Result<(), CommitterStopped> {
        self.tx
            .send(Request::Op(op, tag))
            .await
            .map_err(|_| CommitterStopped)
    }

    /// Queues `op` from a non-async thread.
    pub fn blocking_submit(&self, op: Op, tag: T) -> Result<(), CommitterStopped> {
        self.tx
            .blocking_send(Request::Op(op, tag))
            .map_err(|_| CommitterStopped)
    }

    /// Waits until everything submitted before this call is committed and
    /// its outcomes handed to the sink.
    pub async fn barrier(&self) -> Result<(), CommitterStopped> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Request::Barrier(done))
            .await
            .map_err(|_| CommitterStopped)?;
        wait.await.map_err(|_| CommitterStopped)
    }

    /// Commits and delivers everything submitted before this call, then
    /// stops the committer and delivery threads and waits until both have
    /// dropped what they hold (the storage, the sink). Later submits fail
    /// with [`CommitterStopped`].
    ///
    /// The process must not exit while these threads can still touch
    /// RocksDB: C++ static destructors run at exit, and a database call
    /// racing them aborts the process.
    pub async fn stop(&self) -> Result<(), CommitterStopped> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Request::Stop(done))
            .await
            .map_err(|_| CommitterStopped)?;
        wait.await.map_err(|_| CommitterStopped)
    }

    /// [`Committer::stop`] from a non-async thread.
    pub fn blocking_stop(&self) -> Result<(), CommitterStopped> {
        let (done, wait) = oneshot::channel();
        self.tx
            .blocking_send(Request::Stop(done))
            .map_err(|_| CommitterStopped)?;
        wait.blocking_recv().map_err(|_| CommitterStopped)
    }
}
