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
//! key; a failed write rolls the map back, so no seq is ever skipped. The
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

mod link;

use crate::groups::{Group, Refusal, refuse};
use crate::keys::{self, ConvKey};
use crate::model::{
    DedupValue, GroupMeta, InboxValue, MSG_ID_TIME_SHIFT, StoredMessage, mint_msg_id,
};
use crate::{StorageError, now_ms};
pub use link::MAX_LINK_BATCH_BYTES;

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

/// Bytes a `Deliver` built from a [`StoredMessage`] can have beyond the
/// stored message's own encoding: `seq`, `msg_id` and `ref_msg_id` (at most
/// 11 bytes each), the conversation (tag, length, kind, and an id of at
/// most [`MAX_ID_BYTES`] with its tag and length) and a kind that differs
/// from the stored one (2).
const DELIVER_EXTRA_BYTES: usize = 3 * 11 + (2 + 2 + 2 + MAX_ID_BYTES) + 2;

/// An upper bound of the encoded size of the `Deliver` any viewer gets for
/// `msg` (whatever its seq, whatever the conversation is called for them).
fn entry_len_bound(msg: &StoredMessage) -> usize {
    msg.encoded_len() + DELIVER_EXTRA_BYTES
}

/// An upper bound of the encoded size of an inline entry as any viewer of
/// it sees it: its seq is filled in and, for a direct conversation, the
/// conversation id becomes the viewer's peer.
fn inline_len_bound(entry: &proto::Deliver) -> usize {
    entry.encoded_len() + 11 + (2 + MAX_ID_BYTES)
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

/// Checks every client-supplied string of `op` against
/// `ferry_protocol::limits` (ids, names, content types, user lists), before
/// anything is read or staged. The router and the admin API check first;
/// this is the committer's own defence: nothing longer ever reaches a key
/// or an entry.
fn check_op(op: &Op, options: &CommitOptions) -> Result<(), Refusal> {
    let invalid = |e: limits::LimitError| refuse(ErrorCode::InvalidRequest, e.to_string());
    let check_target = |to: &Target| match to {
        Target::Direct(id) | Target::Group(id) => limits::check_id("conversation.id", id),
    };
    let check_users = |field: &'static str, users: &[String]| {
        if users.len() > options.max_users_per_change {
            return Err(refuse(
                ErrorCode::InvalidRequest,
                format!(
                    "{field} may name at most {} users per request (got {})",
                    options.max_users_per_change,
                    users.len()
                ),
            ));
        }
        users
            .iter()
            .try_for_each(|u| limits::check_id(field, u))
            .map_err(invalid)
    };
    match op {
        Op::Send {
            from,
            to,
            content_type,
            system,
            ..
        } => {
            if !system {
                limits::check_id("from", from).map_err(invalid)?;
            }
            check_target(to).map_err(invalid)?;
            limits::check_len("content_type", content_type, 0, MAX_CONTENT_TYPE_BYTES)
                .map_err(invalid)
        }
        Op::Recall { from, to, .. } | Op::Read { from, to, .. } => {
            limits::check_id("from", from).map_err(invalid)?;
            check_target(to).map_err(invalid)
        }
        Op::Ack { user, device, .. } => {
            limits::check_id("user", user).map_err(invalid)?;
            limits::check_id("device_id", device).map_err(invalid)
        }
        Op::Group { actor, change } => {
            limits::check_id("actor", actor).map_err(invalid)?;
            match change {
                GroupChange::Create {
                    group_id,
                    name,
                    members,
                } => {
                    if !group_id.is_empty() {
                        limits::check_id("group_id", group_id).map_err(invalid)?;
                    }
                    limits::check_len("name", name, 0, MAX_GROUP_NAME_BYTES).map_err(invalid)?;
                    check_users("members", members)
                }
                GroupChange::Add { group_id, members }
                | GroupChange::Remove { group_id, members } => {
                    limits::check_id("group_id", group_id).map_err(invalid)?;
                    check_users("members", members)
                }
                GroupChange::Leave { group_id } | GroupChange::Dissolve { group_id } => {
                    limits::check_id("group_id", group_id).map_err(invalid)
                }
                GroupChange::SetRole { group_id, user, .. } => {
                    limits::check_id("group_id", group_id).map_err(invalid)?;
                    limits::check_id("user_id", user).map_err(invalid)
                }
            }
        }
        // Checked entry by entry as it is applied (`link::decode_link_batch`).
        Op::ApplyLink { .. } => Ok(()),
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
        let last_msg_id = storage
            .db
            .get_cf(storage.cf(cf::META), keys::META_MSG_ID_HIGH_WATER)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map_or(0, u64::from_be_bytes);
        // Cluster mode: this data dir's link epoch names its link batches.
        let link_epoch = match options.homes {
            Some(_) => storage.link_epoch()?,
            None => 0,
        };
        let mut worker = Worker::new(storage, options, last_msg_id);
        worker.link_epoch = link_epoch;
        let (deliver_tx, deliver_rx) = std::sync::mpsc::sync_channel(DELIVERY_QUEUE_BATCHES);
        std::thread::Builder::new()
            .name("ferry-deliver".into())
            .spawn(move || deliver(deliver_rx, sink))
            .map_err(|e| StorageError::Io(e.to_string()))?;
        std::thread::Builder::new()
            .name("ferry-commit".into())
            .spawn(move || {
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

struct Worker {
    storage: Arc<Storage>,
    options: CommitOptions,
    next_seq: SeqCache,
    last_msg_id: u64,
    /// The current op's savepoint and journals (reused, cleared per op).
    undo: OpUndo,
    /// `ferry_commit_failures_total`: batches whose write failed.
    failures: metrics::Counter,
    /// `ferry_commit_seq_cache_entries`.
    seq_cache_gauge: metrics::Gauge,
    /// Cluster mode: what the current op staged for other nodes.
    op_remote: link::OpRemote,
    /// Last link seq assigned per peer (loaded lazily from `meta`).
    link_out: HashMap<NodeId, u64, RandomState>,
    /// (epoch, last seq applied) per origin (loaded lazily from `meta`).
    link_in: HashMap<NodeId, (u64, u64), RandomState>,
    /// This data dir's link epoch (cluster mode; 0 otherwise).
    link_epoch: u64,
}

/// The per-user next seq, bounded: two generations of at most half the
/// bound each between batches. Lookups try the current generation, then
/// the previous one (moving a hit back to the current one).
struct SeqCache {
    current: HashMap<Arc<str>, u64, RandomState>,
    previous: HashMap<Arc<str>, u64, RandomState>,
    max_entries: usize,
}

impl SeqCache {
    fn new(max_entries: usize) -> SeqCache {
        SeqCache {
            current: HashMap::default(),
            previous: HashMap::default(),
            max_entries,
        }
    }

    fn get(&mut self, user: &Arc<str>) -> Option<u64> {
        if let Some(v) = self.current.get(user) {
            return Some(*v);
        }
        let (user, v) = self.previous.remove_entry(user)?;
        self.current.insert(user, v);
        Some(v)
    }

    fn insert(&mut self, user: Arc<str>, next: u64) {
        self.current.insert(user, next);
    }

    fn remove(&mut self, user: &Arc<str>) {
        self.current.remove(user);
        self.previous.remove(user);
    }

    /// Drops the older generation once the newer one holds half the bound.
    /// Only between batches and after a successful write: an entry of a
    /// batch in progress holds seqs the database does not have yet.
    fn evict(&mut self) {
        let half = self.max_entries / 2;
        if self.current.len() > half {
            self.previous = std::mem::take(&mut self.current);
            if self.previous.len() > half {
                // One batch touched more users than half the bound.
                self.previous.clear();
            }
        }
    }

    fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }
}

/// What the current op changed, to undo it if it is refused or fails.
#[derive(Default)]
struct OpUndo {
    /// `writes.puts.len()` before the op.
    puts: usize,
    /// `entries` before the op.
    entries: usize,
    /// `last_msg_id` before the op.
    last_msg_id: u64,
    /// (user, next seq before) for every seq the op assigned, in order.
    seqs: Vec<(Arc<str>, Option<u64>)>,
    /// Dedup records the op added to the batch.
    dedup: Vec<(Arc<str>, u64)>,
    /// (group, batch snapshot before) for every snapshot the op set.
    groups: Vec<(String, Option<Option<Arc<Group>>>)>,
    /// (cursor, batch value before) for every cursor the op moved.
    cursors: Vec<(CursorKey, Option<u64>)>,
    /// (origin, link position before) for a link batch the op applied.
    link_in: Vec<(NodeId, Option<(u64, u64)>)>,
}

type CursorKey = (Arc<str>, Arc<str>);

/// What one batch has changed so far, for ops later in the same batch and
/// for rollback.
#[derive(Default)]
struct BatchState {
    writes: SortedWrites,
    entries: usize,
    /// First-touch values of `next_seq`, restored if the write fails.
    /// One entry per user: a map, since a batch can touch tens of
    /// thousands of users and a linear scan made batching quadratic.
    seq_journal: HashMap<Arc<str>, Option<u64>, RandomState>,
    dedup: HashMap<(Arc<str>, u64), DedupValue, RandomState>,
    groups: HashMap<String, Option<Arc<Group>>, RandomState>,
    /// Cursors moved by this batch's acks; written once each at commit, so
    /// several acks of one device in a batch make one put.
    cursors: HashMap<CursorKey, u64, RandomState>,
    /// Whether an op other than an ack was applied: only then does the
    /// batch need its WAL synced.
    needs_sync: bool,
    /// Cluster mode: items for each peer node, sealed into link batches at commit.
    remote: std::collections::BTreeMap<NodeId, link::RemoteItems>,
    /// First-touch values of `link_out`, restored if the write fails.
    link_out_journal: HashMap<NodeId, u64, RandomState>,
    /// First-touch values of `link_in`, restored if the write fails.
    link_in_journal: HashMap<NodeId, Option<(u64, u64)>, RandomState>,
}

/// A batch's puts, kept aside and sorted by column family and key before
/// they go into the `WriteBatch`.
///
/// The memtable is a skiplist, and inserting keys in order lets each insert
/// start from where the previous one ended instead of searching from the
/// top: in the random order the ops arrive in (one inbox after another),
/// the skiplist search was most of the committer's CPU time.
#[derive(Default)]
struct SortedWrites {
    puts: Vec<PendingWrite>,
}

/// (column family, key, value); a `None` value deletes the key.
type PendingWrite = (&'static str, Vec<u8>, Option<Vec<u8>>);

impl SortedWrites {
    fn put(&mut self, cf: &'static str, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.puts.push((cf, key.into(), Some(value.into())));
    }

    fn delete(&mut self, cf: &'static str, key: impl Into<Vec<u8>>) {
        self.puts.push((cf, key.into(), None));
    }

    /// The batch to write. The sort is stable, so two puts of one key keep
    /// their order and the later one wins, as in the order they were made.
    fn into_write_batch(mut self, storage: &Storage) -> WriteBatch {
        self.puts
            .sort_by(|a, b| a.0.cmp(b.0).then_with(|| a.1.cmp(&b.1)));
        let mut batch = WriteBatch::default();
        let mut current: Option<(&'static str, &rocksdb::ColumnFamily)> = None;
        for (name, key, value) in &self.puts {
            let handle = match current {
                Some((n, h)) if n == *name => h,
                _ => {
                    let h = storage.cf(name);
                    current = Some((name, h));
                    h
                }
            };
            match value {
                Some(value) => batch.put_cf(handle, key, value),
                None => batch.delete_cf(handle, key),
            }
        }
        batch
    }
}

impl BatchState {
    fn put(&mut self, cf: &'static str, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.writes.put(cf, key, value);
    }
}

/// The delivery thread: hands each committed batch to the sink, and
/// releases barriers once everything before them has been through it.
fn deliver<T>(
    batches: std::sync::mpsc::Receiver<Delivery<T>>,
    mut sink: impl FnMut(Vec<(T, Outcome)>, Vec<LinkOut>),
) {
    let sink_seconds = metrics::histogram!("ferry_commit_sink_seconds");
    for delivery in batches {
        match delivery {
            Delivery::Batch(results, links) => {
                let started = std::time::Instant::now();
                sink(results, links);
                sink_seconds.record(started.elapsed());
            }
            Delivery::Barrier(done) => {
                let _ = done.send(());
            }
            Delivery::Stop(done) => {
                drop(sink);
                let _ = done.send(());
                return;
            }
        }
    }
}

impl Worker {
    fn new(storage: Arc<Storage>, options: CommitOptions, last_msg_id: u64) -> Worker {
        Worker {
            storage,
            next_seq: SeqCache::new(options.seq_cache_entries),
            options,
            last_msg_id,
            undo: OpUndo::default(),
            failures: metrics::counter!("ferry_commit_failures_total"),
            seq_cache_gauge: metrics::gauge!("ferry_commit_seq_cache_entries"),
            op_remote: link::OpRemote::default(),
            link_out: HashMap::default(),
            link_in: HashMap::default(),
            link_epoch: 0,
        }
    }

    fn run<T>(
        &mut self,
        mut rx: mpsc::Receiver<Request<T>>,
        deliveries: std::sync::mpsc::SyncSender<Delivery<T>>,
    ) -> Option<oneshot::Sender<()>> {
        // Resolved once: the recorder is installed before the committer
        // starts, and a handle records with atomics only.
        let batch_ops = metrics::histogram!("ferry_commit_batch_ops");
        let commit_seconds = metrics::histogram!("ferry_commit_seconds");
        let apply_seconds = metrics::histogram!("ferry_commit_apply_seconds");
        let queue_depth = metrics::gauge!("ferry_commit_queue_depth");
        let mut barriers = Vec::new();
        let mut stop = None;
        while let Some(first) = rx.blocking_recv() {
            let started = std::time::Instant::now();
            let mut state = BatchState::default();
            let mut results = Vec::new();
            let mut next = Some(first);
            while let Some(request) = next.take() {
                match request {
                    Request::Op(op, tag) => {
                        let outcome = self.apply(op, &mut state);
                        results.push((tag, outcome));
                    }
                    Request::Barrier(done) => barriers.push(done),
                    Request::Stop(done) => {
                        stop = Some(done);
                        break;
                    }
                }
                if state.entries >= self.options.max_batch_entries {
                    break;
                }
                next = rx.try_recv().ok();
            }
            // What arrived while this batch was applied waits for the next.
            queue_depth.set(rx.len() as f64);
            if !results.is_empty() {
                let ops = results.len();
                let entries = state.entries;
                batch_ops.record(ops as f64);
                let applied = std::time::Instant::now();
                apply_seconds.record(applied - started);
                let links = self.commit(state, &mut results);
                let committed = std::time::Instant::now();
                commit_seconds.record(committed - applied);
                tracing::debug!(
                    ops,
                    entries,
                    apply_us = (applied - started).as_micros() as u64,
                    write_us = (committed - applied).as_micros() as u64,
                    "batch committed"
                );
                if deliveries.send(Delivery::Batch(results, links)).is_err() {
                    return None;
                }
            }
            for done in barriers.drain(..) {
                if deliveries.send(Delivery::Barrier(done)).is_err() {
                    return None;
                }
            }
            if let Some(done) = stop {
                // The delivery thread answers once it has dropped the sink;
                // the caller drops this worker (and its storage) next.
                let (delivered, wait) = oneshot::channel();
                if deliveries.send(Delivery::Stop(delivered)).is_ok() {
                    drop(deliveries);
                    let _ = wait.blocking_recv();
                }
                rx.close();
                return Some(done);
            }
        }
        None
    }

    /// Writes the batch (one `WriteBatch`, one WAL write), then installs
    /// its group changes in the cache and trims the seq map; or, if the
    /// write fails, rolls the seq map back and fails every op that was not
    /// refused.
    fn commit<T>(&mut self, mut state: BatchState, results: &mut [(T, Outcome)]) -> Vec<LinkOut> {
        let links = match self.seal_links(&mut state) {
            Ok(links) => links,
            Err(e) => {
                self.fail_batch(&e, state, results);
                return Vec::new();
            }
        };
        state.put(
            cf::META,
            keys::META_MSG_ID_HIGH_WATER,
            self.last_msg_id.to_be_bytes(),
        );
        for ((user, device), seq) in state.cursors.drain() {
            state.writes.put(
                cf::CURSORS,
                keys::cursor_key(&user, &device),
                seq.to_be_bytes(),
            );
        }
        let sync = self.sync_batch(&state);
        let groups = std::mem::take(&mut state.groups);
        let writes = std::mem::take(&mut state.writes);
        let batch = writes.into_write_batch(&self.storage);
        match self.write(batch, sync) {
            Ok(()) => {
                self.storage.writes_failing.store(false, Ordering::Relaxed);
                if !groups.is_empty() {
                    self.storage.cache_groups(groups);
                }
                self.next_seq.evict();
                self.seq_cache_gauge.set(self.next_seq.len() as f64);
                links
            }
            Err(e) => {
                self.fail_batch(&e, state, results);
                Vec::new()
            }
        }
    }

    /// The batch could not be written: every in-memory position it moved
    /// (seqs, link seqs and positions) goes back, and every op that was not
    /// refused fails.
    fn fail_batch<T>(&mut self, e: &StorageError, state: BatchState, results: &mut [(T, Outcome)]) {
        tracing::error!(error = %e, "commit failed; the batch is refused");
        self.failures.increment(1);
        self.storage.writes_failing.store(true, Ordering::Relaxed);
        for (user, old) in state.seq_journal {
            match old {
                Some(v) => self.next_seq.insert(user, v),
                None => self.next_seq.remove(&user),
            };
        }
        for (peer, old) in state.link_out_journal {
            self.link_out.insert(peer, old);
        }
        for (origin, old) in state.link_in_journal {
            match old {
                Some(p) => self.link_in.insert(origin, p),
                None => self.link_in.remove(&origin),
            };
        }
        for (_, outcome) in results.iter_mut() {
            if !matches!(outcome, Outcome::Refused(_)) {
                *outcome = Outcome::Failed(e.to_string());
            }
        }
    }

    /// Whether the batch's write waits for the WAL to reach the disk.
    ///
    /// With `Fsync` durability the acks wait for it, once for the whole
    /// batch. A batch of nothing but device acks (`Op::Ack`) is not synced:
    /// it only moves cursors, which recall alone reads, and a cursor lost
    /// to a power cut only makes a device receive again entries it already
    /// has and drops by seq. The next synced batch syncs it anyway.
    fn sync_batch(&self, state: &BatchState) -> bool {
        self.options.durability == Durability::Fsync && state.needs_sync
    }

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), StorageError> {
        #[cfg(test)]
        if self.storage.faults.fail_writes.load(Ordering::Relaxed) {
            return Err(StorageError::Io("injected write fault".into()));
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.storage.db.write_opt(batch, &wo)?;
        Ok(())
    }

    /// A new group id. In cluster mode it is one this node owns (ids are
    /// minted until one hashes here: about as many tries as there are
    /// nodes), so that a group created without an id is created here.
    fn new_group_id(&mut self) -> String {
        loop {
            let id = format!("g{:x}", self.next_msg_id());
            match &self.options.homes {
                Some(homes) if homes.owner_of_group(&id) != homes.this_node() => continue,
                _ => return id,
            }
        }
    }

    fn next_msg_id(&mut self) -> u64 {
        self.last_msg_id = mint_msg_id(self.last_msg_id, now_ms(), self.options.node_id);
        self.last_msg_id
    }

    fn assign_seq(&mut self, user: &Arc<str>, state: &mut BatchState) -> Result<u64, StorageError> {
        let previous = self.next_seq.get(user);
        let current = match previous {
            Some(v) => v,
            None => self.storage.max_seq(user)? + 1,
        };
        self.next_seq.insert(user.clone(), current + 1);
        self.undo.seqs.push((user.clone(), previous));
        if !state.seq_journal.contains_key(user) {
            state.seq_journal.insert(user.clone(), previous);
        }
        Ok(current)
    }

    /// Starts an op: its savepoint.
    fn savepoint(&mut self, state: &BatchState) {
        let undo = &mut self.undo;
        undo.puts = state.writes.puts.len();
        undo.entries = state.entries;
        undo.last_msg_id = self.last_msg_id;
        undo.seqs.clear();
        undo.dedup.clear();
        undo.groups.clear();
        undo.cursors.clear();
        undo.link_in.clear();
        self.op_remote.clear();
    }

    /// Undoes everything the current op staged or changed since its
    /// savepoint, newest first.
    fn rollback(&mut self, state: &mut BatchState) {
        let undo = &mut self.undo;
        state.writes.puts.truncate(undo.puts);
        state.entries = undo.entries;
        self.last_msg_id = undo.last_msg_id;
        for (user, previous) in undo.seqs.drain(..).rev() {
            match previous {
                Some(v) => self.next_seq.insert(user, v),
                None => self.next_seq.remove(&user),
            }
        }
        // The batch's seq journal keeps what it had: a user first touched by
        // this op was journaled with the value just restored.
        for key in undo.dedup.drain(..) {
            state.dedup.remove(&key);
        }
        for (id, previous) in undo.groups.drain(..).rev() {
            match previous {
                Some(g) => state.groups.insert(id, g),
                None => state.groups.remove(&id),
            };
        }
        for (key, previous) in undo.cursors.drain(..).rev() {
            match previous {
                Some(seq) => state.cursors.insert(key, seq),
                None => state.cursors.remove(&key),
            };
        }
        for (origin, previous) in undo.link_in.drain(..).rev() {
            match previous {
                Some(p) => self.link_in.insert(origin, p),
                None => self.link_in.remove(&origin),
            };
        }
        self.op_remote.clear();
    }

    /// Records a dedup record in the batch (journaled).
    fn stage_dedup(&mut self, key: (Arc<str>, u64), record: DedupValue, state: &mut BatchState) {
        if state.dedup.insert(key.clone(), record).is_none() {
            self.undo.dedup.push(key);
        }
    }

    /// Records a group snapshot in the batch (journaled); `None`: dissolved.
    fn stage_group(&mut self, id: String, group: Option<Arc<Group>>, state: &mut BatchState) {
        let previous = state.groups.insert(id.clone(), group);
        self.undo.groups.push((id, previous));
    }

    fn put_inbox(
        &mut self,
        user: &Arc<str>,
        value: &InboxValue,
        state: &mut BatchState,
    ) -> Result<u64, StorageError> {
        let seq = self.assign_seq(user, state)?;
        state.put(cf::INBOX, keys::inbox_key(user, seq), value.encode_to_vec());
        state.entries += 1;
        Ok(seq)
    }

    /// Applies one op to the batch, all or nothing: a refused or failed op
    /// leaves the batch as it found it.
    fn apply(&mut self, op: Op, state: &mut BatchState) -> Outcome {
        self.savepoint(state);
        let is_ack = matches!(op, Op::Ack { .. });
        let outcome = match check_op(&op, &self.options) {
            Ok(()) => self.apply_checked(op, state),
            Err(refusal) => Outcome::Refused(refusal),
        };
        match outcome {
            Outcome::Refused(_) | Outcome::Failed(_) => self.rollback(state),
            _ if !is_ack => {
                self.keep_op_remote(state);
                state.needs_sync = true;
            }
            _ => {}
        }
        outcome
    }

    fn apply_checked(&mut self, op: Op, state: &mut BatchState) -> Outcome {
        let result = match op {
            Op::Send {
                from,
                client_msg_id,
                to,
                content_type,
                body,
                system,
            } => self.send(from, client_msg_id, to, content_type, body, system, state),
            Op::Recall {
                from,
                to,
                msg_id,
                window_ms,
            } => self.recall(from, to, msg_id, window_ms, state),
            Op::Read {
                from,
                to,
                up_to_msg_id,
            } => self.read(from, to, up_to_msg_id, state),
            Op::Ack { user, device, seq } => self.ack(user, device, seq, state),
            Op::Group { actor, change } => self.group_change(actor, change, state),
            Op::ApplyLink { from, epoch, batch } => self.apply_link(from, epoch, batch, state),
        };
        result.unwrap_or_else(|e| Outcome::Failed(e.to_string()))
    }

    fn group_in_batch(
        &self,
        id: &str,
        state: &BatchState,
    ) -> Result<Option<Arc<Group>>, StorageError> {
        match state.groups.get(id) {
            Some(g) => Ok(g.clone()),
            None => self.storage.group(id),
        }
    }

    /// Refuses an entry whose size bound exceeds `max_entry_bytes`.
    fn refuse_unfit(&self, what: &str, len_bound: usize) -> Option<Refusal> {
        let max = self.options.max_entry_bytes;
        (len_bound > max).then(|| {
            refuse(
                ErrorCode::InvalidRequest,
                format!(
                    "{what} would not fit in a frame: its entry takes up to {len_bound} bytes, \
                     at most {max} can be delivered"
                ),
            )
        })
    }

    /// [`Worker::refuse_unfit`] for the entry a group event becomes.
    fn refuse_unfit_event(&self, actor: &str, event: &proto::GroupEvent) -> Option<Refusal> {
        let without_event = StoredMessage {
            from: actor.to_owned(),
            kind: EntryKind::GroupEvent as i32,
            server_time_ms: u64::MAX,
            ..Default::default()
        };
        let bound =
            entry_len_bound(&without_event) + prost::encoding::message::encoded_len(8, event);
        self.refuse_unfit("the group event", bound)
    }

    #[allow(clippy::too_many_arguments)]
    fn send(
        &mut self,
        from: Arc<str>,
        client_msg_id: u64,
        to: Target,
        content_type: String,
        body: Bytes,
        system: bool,
        state: &mut BatchState,
    ) -> Result<Outcome, StorageError> {
        if client_msg_id != 0 && !system {
            let known = match state.dedup.get(&(from.clone(), client_msg_id)) {
                Some(v) => Some(*v),
                None => self.storage.dedup(&from, client_msg_id)?,
            };
            if let Some(first) = known {
                return Ok(Outcome::Sent {
                    ack: proto::SendAck {
                        client_msg_id,
                        msg_id: first.msg_id,
                        server_time_ms: first.server_time_ms,
                        seq: first.seq,
                    },
                    duplicate: true,
                    recipients: 0,
                    fanouts: Vec::new(),
                });
            }
        }
        let recipients: Vec<Arc<str>> = match &to {
            Target::Direct(peer) => {
                let mut r = vec![peer.clone()];
                if !system && *peer != from {
                    r.push(from.clone());
                }
                r
            }
            Target::Group(g) => {
                let Some(group) = self.group_in_batch(g, state)? else {
                    return Ok(Outcome::Refused(refuse(
                        ErrorCode::NoSuchGroup,
                        format!("no group {g}"),
                    )));
                };
                if !system && !group.is_member(&from) {
                    return Ok(Outcome::Refused(refuse(
                        ErrorCode::NotAMember,
                        format!("not a member of {g}"),
                    )));
                }
                group.members.clone()
            }
        };
        let conv = to.conv(&from);
        let conv_bytes = conv.encode();
        let msg_id = self.next_msg_id();
        let time = msg_id >> MSG_ID_TIME_SHIFT;
        let msg = StoredMessage {
            from: from.to_string(),
            kind: if system {
                EntryKind::System
            } else {
                EntryKind::Message
            } as i32,
            content_type,
            body,
            server_time_ms: time,
            client_msg_id,
            recalled: false,
            group_event: None,
        };
        if let Some(refusal) = self.refuse_unfit("the message", entry_len_bound(&msg)) {
            return Ok(Outcome::Refused(refusal));
        }
        self.put_message_row(&conv_bytes, msg_id, &msg, state);
        let pointer = InboxValue {
            conv: conv_bytes,
            msg_id,
            inline: None,
        };
        let mut sender_seq = 0;
        let mut others = Vec::with_capacity(recipients.len());
        let written = recipients
            .iter()
            .filter(|user| system || **user != from)
            .count();
        for user in &recipients {
            // A user homed on another node gets the entry there (cluster mode).
            let Some(seq) = self.put_entry(user, &pointer, state)? else {
                continue;
            };
            if *user == from && !system {
                sender_seq = seq;
            } else {
                others.push((user.clone(), seq));
            }
        }
        let mut fanouts = Vec::with_capacity(2);
        if !others.is_empty() {
            // Everyone but the sender sees the same entry, except that a
            // direct conversation is named after the other party.
            let viewer = others[0].0.clone();
            fanouts.push(Fanout {
                entry: message_entry(&viewer, 0, msg_id, &conv, msg.clone()),
                targets: others,
            });
        }
        if sender_seq != 0 {
            fanouts.push(Fanout {
                entry: message_entry(&from, 0, msg_id, &conv, msg),
                targets: vec![(from.clone(), sender_seq)],
            });
        }
        if client_msg_id != 0 && !system {
            let record = DedupValue {
                msg_id,
                seq: sender_seq,
                server_time_ms: time,
            };
            state.put(
                cf::DEDUP,
                keys::dedup_key(&from, client_msg_id),
                record.encode_to_vec(),
            );
            self.stage_dedup((from.clone(), client_msg_id), record, state);
        }
        Ok(Outcome::Sent {
            ack: proto::SendAck {
                client_msg_id,
                msg_id,
                server_time_ms: time,
                seq: sender_seq,
            },
            duplicate: false,
            recipients: written,
            fanouts,
        })
    }

    /// Puts the same inline entry in each user's inbox, with the
    /// conversation named as each of them sees it. The caller has checked
    /// its size ([`inline_len_bound`]).
    fn put_inline(
        &mut self,
        users: &[Arc<str>],
        conv: &ConvKey,
        entry: proto::Deliver,
        state: &mut BatchState,
    ) -> Result<Vec<Fanout>, StorageError> {
        let conv_bytes = conv.encode();
        let mut fanouts: Vec<Fanout> = Vec::new();
        for user in users {
            let mut view = entry.clone();
            if let (ConvKey::Direct(..), Some(c)) = (conv, view.conversation.as_mut()) {
                c.id = conv.peer_of(user).to_owned();
            }
            let value = InboxValue {
                conv: conv_bytes.clone(),
                msg_id: entry.msg_id,
                inline: Some(view.clone()),
            };
            let Some(seq) = self.put_entry(user, &value, state)? else {
                continue;
            };
            match fanouts.iter_mut().find(|f| f.entry == view) {
                Some(f) => f.targets.push((user.clone(), seq)),
                None => fanouts.push(Fanout {
                    entry: view,
                    targets: vec![(user.clone(), seq)],
                }),
            }
        }
        Ok(fanouts)
    }

    fn notice(
        &mut self,
        from: &str,
        conv: &ConvKey,
        kind: EntryKind,
        ref_msg_id: u64,
    ) -> proto::Deliver {
        let msg_id = self.next_msg_id();
        let (ckind, id) = match conv {
            ConvKey::Direct(..) => (proto::ConversationKind::Direct, String::new()),
            ConvKey::Group(g) => (proto::ConversationKind::Group, g.clone()),
        };
        proto::Deliver {
            msg_id,
            from: from.to_owned(),
            conversation: Some(proto::Conversation {
                kind: ckind as i32,
                id,
            }),
            server_time_ms: msg_id >> MSG_ID_TIME_SHIFT,
            kind: kind as i32,
            ref_msg_id,
            ..Default::default()
        }
    }

    fn recall(
        &mut self,
        from: Arc<str>,
        to: Target,
        msg_id: u64,
        window_ms: u64,
        state: &mut BatchState,
    ) -> Result<Outcome, StorageError> {
        let conv = to.conv(&from);
        let Some(mut msg) = self.storage.message(&conv, msg_id)? else {
            return Ok(Outcome::Refused(refuse(
                ErrorCode::NoSuchMessage,
                "no such message in this conversation",
            )));
        };
        if msg.from != *from {
            return Ok(Outcome::Refused(refuse(
                ErrorCode::NoSuchMessage,
                "only the sender may recall a message",
            )));
        }
        if msg.recalled {
            return Ok(Outcome::Recalled {
                msg_id,
                fanouts: Vec::new(),
            });
        }
        if now_ms().saturating_sub(msg.server_time_ms) > window_ms {
            return Ok(Outcome::Refused(refuse(
                ErrorCode::RecallWindowExpired,
                format!("recall window of {} s has passed", window_ms / 1000),
            )));
        }
        let users: Vec<Arc<str>> = match &to {
            Target::Direct(peer) if *peer != from => vec![peer.clone(), from.clone()],
            Target::Direct(_) => vec![from.clone()],
            Target::Group(g) => {
                let mut users = match self.group_in_batch(g, state)? {
                    Some(group) => group.members.clone(),
                    None => Vec::new(),
                };
                // A sender who has left still sees their own recall.
                if !users.contains(&from) {
                    users.push(from.clone());
                }
                users
            }
        };
        let entry = self.notice(&from, &conv, EntryKind::Recall, msg_id);
        if let Some(refusal) = self.refuse_unfit("the recall", inline_len_bound(&entry)) {
            return Ok(Outcome::Refused(refusal));
        }
        msg.recalled = true;
        msg.body = Bytes::new();
        msg.content_type.clear();
        self.put_message_row(&conv.encode(), msg_id, &msg, state);
        let fanouts = self.put_inline(&users, &conv, entry, state)?;
        Ok(Outcome::Recalled { msg_id, fanouts })
    }

    /// A read receipt. It goes only into conversations the reader is part
    /// of: for DIRECT, `up_to_msg_id` must be a message the peer sent in
    /// this conversation (one point read), so a receipt reaches only a user
    /// who wrote to the reader; for GROUP, the reader must be a member (and
    /// only the reader's own inbox gets the entry).
    fn read(
        &mut self,
        from: Arc<str>,
        to: Target,
        up_to_msg_id: u64,
        state: &mut BatchState,
    ) -> Result<Outcome, StorageError> {
        let conv = to.conv(&from);
        let users: Vec<Arc<str>> = match &to {
            Target::Direct(peer) => {
                let from_peer = self
                    .storage
                    .message(&conv, up_to_msg_id)?
                    .is_some_and(|msg| msg.from == **peer);
                if !from_peer {
                    return Ok(Outcome::Refused(refuse(
                        ErrorCode::NoSuchMessage,
                        format!("up_to_msg_id is not a message {peer} sent in this conversation"),
                    )));
                }
                if *peer != from {
                    vec![peer.clone(), from.clone()]
                } else {
                    vec![from.clone()]
                }
            }
            Target::Group(g) => {
                match self.group_in_batch(g, state)? {
                    None => {
                        return Ok(Outcome::Refused(refuse(
                            ErrorCode::NoSuchGroup,
                            format!("no group {g}"),
                        )));
                    }
                    Some(group) if !group.is_member(&from) => {
                        return Ok(Outcome::Refused(refuse(
                            ErrorCode::NotAMember,
                            format!("not a member of {g}"),
                        )));
                    }
                    Some(_) => {}
                }
                vec![from.clone()]
            }
        };
        let entry = self.notice(&from, &conv, EntryKind::Read, up_to_msg_id);
        if let Some(refusal) = self.refuse_unfit("the read receipt", inline_len_bound(&entry)) {
            return Ok(Outcome::Refused(refusal));
        }
        let fanouts = self.put_inline(&users, &conv, entry, state)?;
        Ok(Outcome::Applied { fanouts })
    }

    /// A device's cumulative ack: moves its cursor forward in the batch
    /// (written once per device at commit).
    fn ack(
        &mut self,
        user: Arc<str>,
        device: Arc<str>,
        seq: u64,
        state: &mut BatchState,
    ) -> Result<Outcome, StorageError> {
        let key = (user, device);
        let current = match state.cursors.get(&key) {
            Some(v) => *v,
            None => self.storage.cursor(&key.0, &key.1)?,
        };
        if seq > current {
            let previous = state.cursors.insert(key.clone(), seq);
            self.undo.cursors.push((key, previous));
        }
        Ok(Outcome::Applied {
            fanouts: Vec::new(),
        })
    }

    /// Whether `group_id` was ever used by a group that is gone: dissolved
    /// in this batch, tombstoned, or (for a data dir written before
    /// tombstones) still with messages in its conversation.
    fn id_was_used(&self, group_id: &str, state: &BatchState) -> Result<bool, StorageError> {
        if matches!(state.groups.get(group_id), Some(None)) {
            return Ok(true);
        }
        if self.storage.group_tombstone(group_id)?.is_some() {
            return Ok(true);
        }
        self.storage
            .has_messages(&ConvKey::Group(group_id.to_owned()))
    }

    fn group_change(
        &mut self,
        actor: Arc<str>,
        change: GroupChange,
        state: &mut BatchState,
    ) -> Result<Outcome, StorageError> {
        let group_id = match &change {
            GroupChange::Create { group_id, .. } if group_id.is_empty() => self.new_group_id(),
            GroupChange::Create { group_id, .. }
            | GroupChange::Add { group_id, .. }
            | GroupChange::Remove { group_id, .. }
            | GroupChange::Leave { group_id }
            | GroupChange::Dissolve { group_id }
            | GroupChange::SetRole { group_id, .. } => group_id.clone(),
        };
        let existing = self.group_in_batch(&group_id, state)?;

        if let GroupChange::Create { name, members, .. } = change {
            return self.create_group(actor, group_id, name, members, existing, state);
        }

        let Some(existing) = existing else {
            return Ok(Outcome::Refused(refuse(
                ErrorCode::NoSuchGroup,
                format!("no group {group_id}"),
            )));
        };
        let Some(actor_role) = existing.role(&actor) else {
            return Ok(Outcome::Refused(refuse(
                ErrorCode::NotAMember,
                format!("not a member of {group_id}"),
            )));
        };
        let is_manager = matches!(actor_role, GroupRole::Owner | GroupRole::Admin);
        let mut group = (*existing).clone();
        // Each arm checks everything (rules, then the event's size) before
        // it stages a write.
        let (event, audience) = match change {
            GroupChange::Create { .. } => unreachable!("handled above"),
            GroupChange::Add { members, .. } => {
                if !is_manager {
                    return Ok(Outcome::Refused(refuse(
                        ErrorCode::PermissionDenied,
                        "only the owner or an admin may add members",
                    )));
                }
                let added: Vec<String> = members
                    .into_iter()
                    .filter(|m| !group.is_member(m))
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect();
                if group.members.len() + added.len() > self.options.max_group_members {
                    return Ok(Outcome::Refused(refuse(
                        ErrorCode::GroupFull,
                        format!("at most {} members", self.options.max_group_members),
                    )));
                }
                let event = proto::GroupEvent {
                    kind: GroupEventKind::MembersAdded as i32,
                    users: added,
                    ..Default::default()
                };
                if let Some(refusal) = self.refuse_unfit_event(&actor, &event) {
                    return Ok(Outcome::Refused(refusal));
                }
                for m in &event.users {
                    group.add(m.as_str().into(), GroupRole::Member);
                    state.put(
                        cf::GROUPS,
                        keys::group_member_key(&group_id, m),
                        [GroupRole::Member as u8],
                    );
                }
                (event, group.members.clone())
            }
            GroupChange::Remove { members, .. } => {
                if !is_manager {
                    return Ok(Outcome::Refused(refuse(
                        ErrorCode::PermissionDenied,
                        "only the owner or an admin may remove members",
                    )));
                }
                let mut removed = Vec::new();
                for m in &members {
                    match group.role(m) {
                        None => continue,
                        Some(GroupRole::Owner) => {
                            return Ok(Outcome::Refused(refuse(
                                ErrorCode::PermissionDenied,
                                "the owner cannot be removed",
                            )));
                        }
                        Some(GroupRole::Admin) if actor_role != GroupRole::Owner => {
                            return Ok(Outcome::Refused(refuse(
                                ErrorCode::PermissionDenied,
                                "only the owner may remove an admin",
                            )));
                        }
                        Some(_) => removed.push(m.clone()),
                    }
                }
                let event = proto::GroupEvent {
                    kind: GroupEventKind::MembersRemoved as i32,
                    users: removed,
                    ..Default::default()
                };
                if let Some(refusal) = self.refuse_unfit_event(&actor, &event) {
                    return Ok(Outcome::Refused(refusal));
                }
                let audience = group.members.clone();
                for m in &event.users {
                    group.remove(m);
                    state
                        .writes
                        .delete(cf::GROUPS, keys::group_member_key(&group_id, m));
                }
                (event, audience)
            }
            GroupChange::Leave { .. } => {
                if actor_role == GroupRole::Owner {
                    return Ok(Outcome::Refused(refuse(
                        ErrorCode::PermissionDenied,
                        "the owner cannot leave; dissolve the group instead",
                    )));
                }
                let event = proto::GroupEvent {
                    kind: GroupEventKind::MemberLeft as i32,
                    users: vec![actor.to_string()],
                    ..Default::default()
                };
                if let Some(refusal) = self.refuse_unfit_event(&actor, &event) {
                    return Ok(Outcome::Refused(refusal));
                }
                let audience = group.members.clone();
                group.remove(&actor);
                state
                    .writes
                    .delete(cf::GROUPS, keys::group_member_key(&group_id, &actor));
                (event, audience)
            }
            GroupChange::Dissolve { .. } => {
                if actor_role != GroupRole::Owner {
                    return Ok(Outcome::Refused(refuse(
                        ErrorCode::PermissionDenied,
                        "only the owner may dissolve the group",
                    )));
                }
                let event = proto::GroupEvent {
                    kind: GroupEventKind::Dissolved as i32,
                    ..Default::default()
                };
                if let Some(refusal) = self.refuse_unfit_event(&actor, &event) {
                    return Ok(Outcome::Refused(refusal));
                }
                let audience = group.members.clone();
                state
                    .writes
                    .delete(cf::GROUPS, keys::group_meta_key(&group_id));
                for m in &audience {
                    state
                        .writes
                        .delete(cf::GROUPS, keys::group_member_key(&group_id, m));
                }
                // The id is never used again: a new group under it would
                // show its members this group's history.
                state.put(
                    cf::GROUPS,
                    keys::group_tombstone_key(&group_id),
                    now_ms().to_be_bytes(),
                );
                let fanouts = self.group_event(&actor, &group_id, event, &audience, state)?;
                self.stage_group(group_id.clone(), None, state);
                return Ok(Outcome::GroupChanged {
                    group: None,
                    group_id,
                    fanouts,
                });
            }
            GroupChange::SetRole { user, role, .. } => {
                if actor_role != GroupRole::Owner {
                    return Ok(Outcome::Refused(refuse(
                        ErrorCode::PermissionDenied,
                        "only the owner may change roles",
                    )));
                }
                if !matches!(role, GroupRole::Admin | GroupRole::Member) {
                    return Ok(Outcome::Refused(refuse(
                        ErrorCode::InvalidRequest,
                        "role must be ADMIN or MEMBER",
                    )));
                }
                let Some(current) = group.role(&user) else {
                    return Ok(Outcome::Refused(refuse(
                        ErrorCode::NotAMember,
                        format!("{user} is not a member"),
                    )));
                };
                if current == GroupRole::Owner {
                    return Ok(Outcome::Refused(refuse(
                        ErrorCode::PermissionDenied,
                        "the owner's role cannot change",
                    )));
                }
                let event = proto::GroupEvent {
                    kind: GroupEventKind::RoleChanged as i32,
                    users: vec![user.clone()],
                    role: role as i32,
                    ..Default::default()
                };
                if let Some(refusal) = self.refuse_unfit_event(&actor, &event) {
                    return Ok(Outcome::Refused(refusal));
                }
                let user: Arc<str> = user.as_str().into();
                group.roles.insert(user.clone(), role);
                state.put(
                    cf::GROUPS,
                    keys::group_member_key(&group_id, &user),
                    [role as u8],
                );
                (event, group.members.clone())
            }
        };
        let fanouts = self.group_event(&actor, &group_id, event, &audience, state)?;
        let group = Arc::new(group);
        self.stage_group(group_id.clone(), Some(group.clone()), state);
        Ok(Outcome::GroupChanged {
            group: Some(group),
            group_id,
            fanouts,
        })
    }

    fn create_group(
        &mut self,
        actor: Arc<str>,
        group_id: String,
        name: String,
        members: Vec<String>,
        existing: Option<Arc<Group>>,
        state: &mut BatchState,
    ) -> Result<Outcome, StorageError> {
        if existing.is_some() {
            return Ok(Outcome::Refused(refuse(
                ErrorCode::GroupExists,
                format!("group {group_id} exists"),
            )));
        }
        if self.id_was_used(&group_id, state)? {
            return Ok(Outcome::Refused(refuse(
                ErrorCode::GroupExists,
                format!("group id {group_id} was used by a dissolved group; ids are never reused"),
            )));
        }
        let mut group = Group {
            id: group_id.as_str().into(),
            meta: GroupMeta {
                name,
                owner: actor.to_string(),
                created_ms: now_ms(),
            },
            members: Vec::new(),
            roles: HashMap::new(),
        };
        group.add(actor.clone(), GroupRole::Owner);
        for m in members {
            group.add(m.into(), GroupRole::Member);
        }
        if group.members.len() > self.options.max_group_members {
            return Ok(Outcome::Refused(refuse(
                ErrorCode::GroupFull,
                format!("at most {} members", self.options.max_group_members),
            )));
        }
        let event = proto::GroupEvent {
            kind: GroupEventKind::Created as i32,
            users: Vec::new(),
            name: group.meta.name.clone(),
            role: 0,
        };
        if let Some(refusal) = self.refuse_unfit_event(&actor, &event) {
            return Ok(Outcome::Refused(refusal));
        }
        state.put(
            cf::GROUPS,
            keys::group_meta_key(&group_id),
            group.meta.encode_to_vec(),
        );
        for m in &group.members {
            let role = group.role(m).unwrap_or(GroupRole::Member);
            state.put(
                cf::GROUPS,
                keys::group_member_key(&group_id, m),
                [role as u8],
            );
        }
        let group = Arc::new(group);
        let audience = group.members.clone();
        let fanouts = self.group_event(&actor, &group_id, event, &audience, state)?;
        self.stage_group(group_id.clone(), Some(group.clone()), state);
        Ok(Outcome::GroupChanged {
            group: Some(group),
            group_id,
            fanouts,
        })
    }

    /// Stores a group event once in the group's log and points every
    /// member of `audience` at it.
    fn group_event(
        &mut self,
        actor: &Arc<str>,
        group_id: &str,
        event: proto::GroupEvent,
        audience: &[Arc<str>],
        state: &mut BatchState,
    ) -> Result<Vec<Fanout>, StorageError> {
        let conv = ConvKey::Group(group_id.to_owned());
        let conv_bytes = conv.encode();
        let msg_id = self.next_msg_id();
        let msg = StoredMessage {
            from: actor.to_string(),
            kind: EntryKind::GroupEvent as i32,
            server_time_ms: msg_id >> MSG_ID_TIME_SHIFT,
            group_event: Some(event),
            ..Default::default()
        };
        self.put_message_row(&conv_bytes, msg_id, &msg, state);
        let pointer = InboxValue {
            conv: conv_bytes,
            msg_id,
            inline: None,
        };
        let mut targets = Vec::with_capacity(audience.len());
        for user in audience {
            if let Some(seq) = self.put_entry(user, &pointer, state)? {
                targets.push((user.clone(), seq));
            }
        }
        Ok(vec![Fanout {
            entry: message_entry(actor, 0, msg_id, &conv, msg),
            targets,
        }])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StorageOptions;

    /// A worker on a fresh database, driven batch by batch from the test
    /// thread (no committer threads: batches are exactly what a test says).
    fn worker(options: CommitOptions) -> (tempfile::TempDir, Arc<Storage>, Worker) {
        worker_with(options, StorageOptions::default())
    }

    fn worker_with(
        options: CommitOptions,
        storage_options: StorageOptions,
    ) -> (tempfile::TempDir, Arc<Storage>, Worker) {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), storage_options).unwrap();
        let worker = Worker::new(storage.clone(), options, 0);
        (dir, storage, worker)
    }

    /// Applies `ops` as one batch and commits it.
    fn batch(worker: &mut Worker, ops: Vec<Op>) -> Vec<Outcome> {
        let mut state = BatchState::default();
        let mut results: Vec<((), Outcome)> = ops
            .into_iter()
            .map(|op| ((), worker.apply(op, &mut state)))
            .collect();
        worker.commit(state, &mut results);
        results.into_iter().map(|(_, o)| o).collect()
    }

    fn send(from: &str, cid: u64, to: &str) -> Op {
        Op::Send {
            from: from.into(),
            client_msg_id: cid,
            to: Target::Direct(to.into()),
            content_type: "text/plain".into(),
            body: Bytes::from_static(b"hi"),
            system: false,
        }
    }

    fn group_op(actor: &str, change: GroupChange) -> Op {
        Op::Group {
            actor: actor.into(),
            change,
        }
    }

    fn create(actor: &str, id: &str, name: &str, members: &[&str]) -> Op {
        group_op(
            actor,
            GroupChange::Create {
                group_id: id.into(),
                name: name.into(),
                members: members.iter().map(|m| m.to_string()).collect(),
            },
        )
    }

    fn seq_of(outcome: &Outcome, user: &str) -> Option<u64> {
        let fanouts = match outcome {
            Outcome::Sent { fanouts, .. }
            | Outcome::Recalled { fanouts, .. }
            | Outcome::GroupChanged { fanouts, .. }
            | Outcome::Applied { fanouts } => fanouts,
            _ => return None,
        };
        fanouts
            .iter()
            .flat_map(|f| f.targets.iter())
            .find(|(u, _)| u.as_ref() == user)
            .map(|(_, seq)| *seq)
    }

    fn refused(outcome: &Outcome) -> ErrorCode {
        match outcome {
            Outcome::Refused(r) => r.code,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn fail_reads(storage: &Storage, what: &'static str, id: &str) {
        *storage.faults.fail_reads_of.lock().unwrap() = Some((what, id.to_owned()));
    }

    fn heal(storage: &Storage) {
        *storage.faults.fail_reads_of.lock().unwrap() = None;
    }

    #[test]
    fn an_op_that_fails_midway_leaves_nothing_and_its_batch_commits_the_rest() {
        let (_dir, storage, mut w) = worker(CommitOptions::default());
        // alice -> bob puts bob's entry, then fails reading alice's seq.
        fail_reads(&storage, "max_seq", "alice");
        let mut state = BatchState::default();
        let first = w.apply(send("carol", 1, "dave"), &mut state);
        let failed = w.apply(send("alice", 7, "bob"), &mut state);
        assert!(matches!(failed, Outcome::Failed(_)), "{failed:?}");
        let next = w.apply(send("erin", 1, "bob"), &mut state);
        let mut results = vec![((), first), ((), failed), ((), next)];
        w.commit(state, &mut results);
        assert_eq!(seq_of(&results[0].1, "dave"), Some(1));
        assert_eq!(
            seq_of(&results[2].1, "bob"),
            Some(1),
            "the failed op used up no seq of bob"
        );
        heal(&storage);

        // Nothing of the failed op reached the database.
        let bob = storage.read_inbox("bob", 0, 10).unwrap();
        assert_eq!(bob.entries.len(), 1);
        assert_eq!(bob.entries[0].from, "erin");
        assert_eq!(storage.max_seq("alice").unwrap(), 0);
        assert_eq!(storage.dedup("alice", 7).unwrap(), None);
        let (history, _) = storage
            .history("bob", &ConvKey::direct("alice", "bob"), 0, 10)
            .unwrap();
        assert!(history.is_empty(), "the failed op's message was stored");
        assert_eq!(storage.read_inbox("dave", 0, 10).unwrap().entries.len(), 1);

        // The retry is a first send, gap-free for everyone.
        let retry = batch(&mut w, vec![send("alice", 7, "bob")]);
        let Outcome::Sent { duplicate, .. } = &retry[0] else {
            panic!("{:?}", retry[0])
        };
        assert!(!duplicate);
        assert_eq!(seq_of(&retry[0], "bob"), Some(2));
        assert_eq!(seq_of(&retry[0], "alice"), Some(1));
    }

    #[test]
    fn a_group_change_that_fails_midway_leaves_no_group() {
        let (_dir, storage, mut w) = worker(CommitOptions::default());
        fail_reads(&storage, "max_seq", "m2");
        let mut state = BatchState::default();
        let failed = w.apply(create("owner", "g", "G", &["m1", "m2"]), &mut state);
        assert!(matches!(failed, Outcome::Failed(_)), "{failed:?}");
        // Later ops of the batch do not see the group either.
        let send_to_g = Op::Send {
            from: "owner".into(),
            client_msg_id: 1,
            to: Target::Group("g".into()),
            content_type: String::new(),
            body: Bytes::from_static(b"x"),
            system: false,
        };
        let no_group = w.apply(send_to_g, &mut state);
        assert_eq!(refused(&no_group), ErrorCode::NoSuchGroup);
        heal(&storage);
        let created = w.apply(create("owner", "g", "G", &["m1", "m2"]), &mut state);
        assert_eq!(seq_of(&created, "m1"), Some(1));
        let mut results = vec![((), failed), ((), no_group), ((), created)];
        w.commit(state, &mut results);
        for user in ["owner", "m1", "m2"] {
            let page = storage.read_inbox(user, 0, 10).unwrap();
            assert_eq!(page.entries.len(), 1, "{user}: one CREATED event");
            assert_eq!(page.entries[0].seq, 1);
        }
        assert_eq!(storage.group("g").unwrap().unwrap().members.len(), 3);
    }

    #[test]
    fn a_failed_write_fails_the_batch_and_is_reported_until_one_succeeds() {
        let (_dir, storage, mut w) = worker(CommitOptions::default());
        storage.faults.fail_writes.store(true, Ordering::Relaxed);
        let out = batch(&mut w, vec![send("a", 1, "b")]);
        assert!(matches!(out[0], Outcome::Failed(_)));
        assert!(storage.writes_failing());
        storage.faults.fail_writes.store(false, Ordering::Relaxed);
        let out = batch(&mut w, vec![send("a", 1, "b")]);
        assert_eq!(seq_of(&out[0], "b"), Some(1), "no seq skipped");
        assert!(!storage.writes_failing());
    }

    #[test]
    fn entries_that_would_not_fit_a_frame_are_refused_and_nothing_is_stored() {
        let options = CommitOptions {
            max_entry_bytes: 600,
            ..Default::default()
        };
        let (_dir, storage, mut w) = worker(options);
        // A name that fits.
        let out = batch(
            &mut w,
            vec![create("owner", "g", &"n".repeat(200), &["m1"])],
        );
        assert!(
            matches!(out[0], Outcome::GroupChanged { .. }),
            "{:?}",
            out[0]
        );
        // A MEMBERS_ADDED event naming 20 users of 60 bytes does not.
        let users: Vec<String> = (0..20).map(|i| format!("{i:0>60}")).collect();
        let add = group_op(
            "owner",
            GroupChange::Add {
                group_id: "g".into(),
                members: users.clone(),
            },
        );
        let out = batch(&mut w, vec![add]);
        let Outcome::Refused(r) = &out[0] else {
            panic!("{:?}", out[0])
        };
        assert_eq!(r.code, ErrorCode::InvalidRequest);
        assert!(
            r.message.contains("would not fit in a frame"),
            "{}",
            r.message
        );
        let g = storage.group("g").unwrap().unwrap();
        assert_eq!(g.members.len(), 2, "no member was added");
        assert_eq!(storage.max_seq("owner").unwrap(), 1, "no event was stored");
        assert_eq!(storage.max_seq(&users[0]).unwrap(), 0);
        // Fewer users fit.
        let add = group_op(
            "owner",
            GroupChange::Add {
                group_id: "g".into(),
                members: users[..3].to_vec(),
            },
        );
        let out = batch(&mut w, vec![add]);
        assert_eq!(seq_of(&out[0], &users[0]), Some(1));
        // A message too large for the frame.
        let big = Op::Send {
            from: "a".into(),
            client_msg_id: 1,
            to: Target::Direct("b".into()),
            content_type: String::new(),
            body: Bytes::from(vec![b'x'; 600]),
            system: false,
        };
        let out = batch(&mut w, vec![big]);
        assert_eq!(refused(&out[0]), ErrorCode::InvalidRequest);
        assert_eq!(storage.max_seq("b").unwrap(), 0);
        assert_eq!(storage.dedup("a", 1).unwrap(), None);
    }

    #[test]
    fn the_entry_bound_covers_every_viewer() {
        let msg = StoredMessage {
            from: "f".repeat(MAX_ID_BYTES),
            kind: EntryKind::Message as i32,
            content_type: "t".repeat(MAX_CONTENT_TYPE_BYTES),
            body: Bytes::from(vec![1; 1000]),
            server_time_ms: u64::MAX >> MSG_ID_TIME_SHIFT,
            client_msg_id: u64::MAX,
            recalled: false,
            group_event: None,
        };
        let peer = "p".repeat(MAX_ID_BYTES);
        let conv = ConvKey::direct(&msg.from, &peer);
        let bound = entry_len_bound(&msg);
        for viewer in [msg.from.as_str(), peer.as_str()] {
            let entry = message_entry(viewer, u64::MAX, u64::MAX, &conv, msg.clone());
            assert!(
                entry.encoded_len() <= bound,
                "{} > {bound}",
                entry.encoded_len()
            );
        }
        let mut recalled = msg.clone();
        recalled.recalled = true;
        let entry = message_entry(&peer, u64::MAX, u64::MAX, &conv, recalled.clone());
        assert!(entry.encoded_len() <= entry_len_bound(&recalled));
        assert!(bound < msg.encoded_len() + 128, "the bound stays close");
    }

    #[test]
    fn ids_names_and_content_types_over_their_limits_are_refused() {
        let (_dir, storage, mut w) = worker(CommitOptions::default());
        let long = "x".repeat(300);
        let mut ct = send("a", 1, "b");
        if let Op::Send { content_type, .. } = &mut ct {
            *content_type = "c".repeat(MAX_CONTENT_TYPE_BYTES + 1);
        }
        let ops = vec![
            send("a", 1, &long),
            send(&long, 1, "b"),
            ct,
            create("a", &"g".repeat(65), "G", &[]),
            create("a", "g", &"n".repeat(MAX_GROUP_NAME_BYTES + 1), &[]),
            create("a", "g", "G", &[long.as_str()]),
            create("a", "g", "G", &[""]),
            Op::Ack {
                user: "a".into(),
                device: long.as_str().into(),
                seq: 1,
            },
        ];
        for outcome in batch(&mut w, ops) {
            assert_eq!(refused(&outcome), ErrorCode::InvalidRequest);
        }
        assert_eq!(storage.max_seq("b").unwrap(), 0);
        assert_eq!(storage.max_seq(&long).unwrap(), 0);
        assert!(storage.group("g").unwrap().is_none());
        let out = batch(
            &mut w,
            vec![create("a", "g", &"n".repeat(MAX_GROUP_NAME_BYTES), &[])],
        );
        assert!(matches!(out[0], Outcome::GroupChanged { .. }));
    }

    #[test]
    fn create_obeys_the_per_change_member_limit() {
        let options = CommitOptions {
            max_users_per_change: 3,
            ..Default::default()
        };
        let (_dir, storage, mut w) = worker(options);
        let out = batch(&mut w, vec![create("o", "g", "G", &["a", "b", "c", "d"])]);
        assert_eq!(refused(&out[0]), ErrorCode::InvalidRequest);
        assert!(storage.group("g").unwrap().is_none());
        assert_eq!(storage.max_seq("a").unwrap(), 0);
        let out = batch(&mut w, vec![create("o", "g", "G", &["a", "b", "c"])]);
        assert!(matches!(out[0], Outcome::GroupChanged { .. }));
        assert_eq!(
            CommitOptions::default().max_users_per_change,
            limits::MAX_USERS_PER_CHANGE
        );
    }

    #[test]
    fn a_dissolved_groups_id_is_never_reused() {
        let (_dir, storage, mut w) = worker(CommitOptions::default());
        let to_g = Op::Send {
            from: "o".into(),
            client_msg_id: 1,
            to: Target::Group("g".into()),
            content_type: String::new(),
            body: Bytes::from_static(b"secret"),
            system: false,
        };
        let dissolve = || {
            group_op(
                "o",
                GroupChange::Dissolve {
                    group_id: "g".into(),
                },
            )
        };
        batch(&mut w, vec![create("o", "g", "G", &["m"]), to_g]);
        let out = batch(&mut w, vec![dissolve()]);
        assert!(matches!(out[0], Outcome::GroupChanged { group: None, .. }));
        assert!(storage.group("g").unwrap().is_none());
        assert!(storage.group_tombstone("g").unwrap().is_some());
        // The history is still stored, but nobody can become a member.
        let out = batch(&mut w, vec![create("intruder", "g", "G", &[])]);
        let Outcome::Refused(r) = &out[0] else {
            panic!("{:?}", out[0])
        };
        assert_eq!(r.code, ErrorCode::GroupExists);
        assert!(r.message.contains("never reused"), "{}", r.message);
        assert!(storage.group("g").unwrap().is_none());
        assert!(matches!(storage.group_if_cached("g"), Some(None)));

        // Dissolved and re-created in one batch: refused too.
        batch(&mut w, vec![create("o", "h", "H", &[])]);
        let out = batch(
            &mut w,
            vec![
                group_op(
                    "o",
                    GroupChange::Dissolve {
                        group_id: "h".into(),
                    },
                ),
                create("o", "h", "H", &[]),
            ],
        );
        assert_eq!(refused(&out[1]), ErrorCode::GroupExists);

        // A group dissolved before tombstones existed: its messages still
        // keep the id.
        storage
            .db
            .delete_cf(storage.cf(cf::GROUPS), keys::group_tombstone_key("g"))
            .unwrap();
        let out = batch(&mut w, vec![create("intruder", "g", "G", &[])]);
        assert_eq!(refused(&out[0]), ErrorCode::GroupExists);
    }

    #[test]
    fn the_seq_map_stays_bounded_and_seqs_stay_right_after_eviction() {
        let options = CommitOptions {
            seq_cache_entries: 10,
            ..Default::default()
        };
        let (_dir, storage, mut w) = worker(options);
        for round in 1..=3u64 {
            for i in 0..50u64 {
                let out = batch(&mut w, vec![send("s", round * 100 + i, &format!("u{i}"))]);
                assert_eq!(seq_of(&out[0], &format!("u{i}")), Some(round));
                assert_eq!(seq_of(&out[0], "s"), Some((round - 1) * 50 + i + 1));
                assert!(w.next_seq.len() <= 10, "{} entries", w.next_seq.len());
            }
        }
        assert_eq!(storage.max_seq("s").unwrap(), 150);
        // A batch touching more users than the bound is trimmed after it.
        let ops = (0..30).map(|i| send(&format!("x{i}"), 1, "s")).collect();
        batch(&mut w, ops);
        assert!(w.next_seq.len() <= 10);
        assert_eq!(storage.max_seq("s").unwrap(), 180);
    }

    #[test]
    fn acks_of_a_batch_make_one_unsynced_put_per_device() {
        let (_dir, storage, mut w) = worker(CommitOptions::default());
        let ack = |seq| Op::Ack {
            user: "u".into(),
            device: "d".into(),
            seq,
        };
        let mut state = BatchState::default();
        for seq in [5, 9, 7] {
            w.apply(ack(seq), &mut state);
        }
        assert!(
            state.writes.puts.is_empty(),
            "cursors are written at commit"
        );
        assert_eq!(state.cursors.len(), 1);
        assert!(!w.sync_batch(&state), "a batch of acks needs no fsync");
        w.commit(state, &mut Vec::<((), Outcome)>::new());
        assert_eq!(storage.cursor("u", "d").unwrap(), 9);

        let mut state = BatchState::default();
        w.apply(ack(3), &mut state);
        assert!(state.cursors.is_empty(), "a cursor never goes back");
        w.apply(send("u", 1, "v"), &mut state);
        assert!(w.sync_batch(&state), "a message is synced");
    }

    #[test]
    fn read_receipts_reach_only_conversations_of_the_reader() {
        let (_dir, storage, mut w) = worker(CommitOptions::default());
        let out = batch(&mut w, vec![send("alice", 1, "bob")]);
        let Outcome::Sent { ack, .. } = &out[0] else {
            panic!()
        };
        let msg_id = ack.msg_id;
        let read = |from: &str, to: Target, id| Op::Read {
            from: from.into(),
            to,
            up_to_msg_id: id,
        };
        let out = batch(
            &mut w,
            vec![
                // Mallory never talked to alice: alice's message to bob
                // is not in their conversation.
                read("mallory", Target::Direct("alice".into()), msg_id),
                // Alice's own message is not one bob sent her.
                read("alice", Target::Direct("bob".into()), msg_id),
                // Bob read alice's message: both get the receipt.
                read("bob", Target::Direct("alice".into()), msg_id),
            ],
        );
        assert_eq!(refused(&out[0]), ErrorCode::NoSuchMessage);
        assert_eq!(refused(&out[1]), ErrorCode::NoSuchMessage);
        assert_eq!(seq_of(&out[2], "alice"), Some(2));
        assert_eq!(seq_of(&out[2], "bob"), Some(2));
        assert_eq!(storage.max_seq("alice").unwrap(), 2);
        assert_eq!(storage.max_seq("mallory").unwrap(), 0);

        batch(&mut w, vec![create("o", "g", "G", &["m"])]);
        let out = batch(
            &mut w,
            vec![
                read("mallory", Target::Group("g".into()), 1),
                read("m", Target::Group("g".into()), 1),
                read("m", Target::Group("nope".into()), 1),
            ],
        );
        assert_eq!(refused(&out[0]), ErrorCode::NotAMember);
        assert_eq!(seq_of(&out[1], "m"), Some(2));
        assert_eq!(refused(&out[2]), ErrorCode::NoSuchGroup);
        assert_eq!(storage.max_seq("mallory").unwrap(), 0);
    }

    #[test]
    fn the_group_cache_stays_bounded_and_right() {
        let (_dir, storage, mut w) = worker_with(
            CommitOptions::default(),
            StorageOptions {
                group_cache_members: 20,
                ..Default::default()
            },
        );
        for i in 0..40 {
            batch(
                &mut w,
                vec![create("o", &format!("g{i}"), "G", &["a", "b"])],
            );
            assert!(storage.group_cache_size().1 <= 20);
        }
        for i in (0..40).rev() {
            let g = storage.group(&format!("g{i}")).unwrap().unwrap();
            assert_eq!(g.members.len(), 3);
            assert!(storage.group(&format!("nope{i}")).unwrap().is_none());
            let (entries, weight) = storage.group_cache_size();
            assert!(weight <= 20 && entries <= 20, "{entries} entries, {weight}");
        }
    }

    #[test]
    fn unknown_ids_are_cached_as_absent_until_created() {
        let (_dir, storage, mut w) = worker(CommitOptions::default());
        assert!(storage.group_if_cached("g").is_none());
        assert!(storage.group("g").unwrap().is_none());
        assert!(matches!(storage.group_if_cached("g"), Some(None)));
        // Known absent: no database read (one would fail now).
        fail_reads(&storage, "group", "g");
        assert!(storage.group("g").unwrap().is_none());
        heal(&storage);
        batch(&mut w, vec![create("o", "g", "G", &[])]);
        assert!(matches!(storage.group_if_cached("g"), Some(Some(_))));
        assert!(matches!(
            storage.group_if_cached(&"x".repeat(300)),
            Some(None)
        ));
    }

    #[test]
    fn a_load_that_raced_a_dissolve_does_not_bring_the_group_back() {
        let (_dir, storage, mut w) = worker(CommitOptions::default());
        batch(&mut w, vec![create("o", "g", "G", &["m"])]);
        // Start from a cold cache, so the reader below loads from the DB.
        *storage.groups.write().unwrap() = crate::groups::GroupCache::new(1000);
        let (loaded_tx, loaded) = std::sync::mpsc::channel();
        let (go, go_rx) = std::sync::mpsc::channel::<()>();
        *storage.faults.after_group_load.lock().unwrap() = Some(Box::new(move || {
            loaded_tx.send(()).unwrap();
            go_rx.recv().unwrap();
        }));
        let reader = {
            let storage = storage.clone();
            std::thread::spawn(move || storage.group("g").unwrap())
        };
        // The reader has loaded the group and waits before filling the cache.
        loaded.recv().unwrap();
        let out = batch(
            &mut w,
            vec![group_op(
                "o",
                GroupChange::Dissolve {
                    group_id: "g".into(),
                },
            )],
        );
        assert!(matches!(out[0], Outcome::GroupChanged { group: None, .. }));
        go.send(()).unwrap();
        let stale = reader.join().unwrap();
        assert!(stale.is_some(), "the reader loaded before the dissolve");
        assert!(
            storage.group("g").unwrap().is_none(),
            "the stale load was put back into the cache"
        );
        assert!(matches!(storage.group_if_cached("g"), Some(None)));
    }

    #[test]
    fn over_long_ids_read_as_nothing_stored() {
        let (_dir, storage, mut w) = worker(CommitOptions::default());
        // 300 bytes: a length byte would hold 300 % 256 = 44 of them.
        let long = "x".repeat(300);
        let short = "x".repeat(44);
        batch(&mut w, vec![send(&short, 1, &short)]);
        assert_eq!(storage.max_seq(&long).unwrap(), 0);
        let page = storage.read_inbox(&long, 0, 10).unwrap();
        assert!(page.entries.is_empty() && !page.has_more);
        assert_eq!(storage.cursor(&long, "d").unwrap(), 0);
        assert_eq!(storage.cursor("u", &long).unwrap(), 0);
        assert_eq!(storage.dedup(&long, 1).unwrap(), None);
        assert!(storage.group(&long).unwrap().is_none());
        assert_eq!(storage.group_tombstone(&long).unwrap(), None);
        let conv = ConvKey::direct(&long, &short);
        assert_eq!(storage.message(&conv, 1).unwrap(), None);
        assert!(storage.history(&short, &conv, 0, 10).unwrap().0.is_empty());
        let group_conv = ConvKey::Group(long.clone());
        assert!(
            storage
                .history(&short, &group_conv, 0, 10)
                .unwrap()
                .0
                .is_empty()
        );
        // And the committer stores nothing under such an id.
        let out = batch(&mut w, vec![send(&short, 2, &long)]);
        assert_eq!(refused(&out[0]), ErrorCode::InvalidRequest);
        assert_eq!(storage.max_seq(&short).unwrap(), 1);
    }

    #[test]
    fn sorted_writes_keep_the_order_of_puts_and_deletes_of_one_key() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), StorageOptions::default()).unwrap();
        let mut writes = SortedWrites::default();
        writes.put(cf::GROUPS, b"b".to_vec(), b"1".to_vec());
        writes.put(cf::GROUPS, b"a".to_vec(), b"1".to_vec());
        writes.delete(cf::GROUPS, b"a".to_vec());
        writes.put(cf::GROUPS, b"b".to_vec(), b"2".to_vec());
        writes.delete(cf::GROUPS, b"c".to_vec());
        writes.put(cf::GROUPS, b"c".to_vec(), b"3".to_vec());
        writes.put(cf::META, b"a".to_vec(), b"m".to_vec());
        let batch = writes.into_write_batch(&storage);
        storage.db.write(batch).unwrap();
        let get = |cf_name, key: &[u8]| storage.db.get_cf(storage.cf(cf_name), key).unwrap();
        assert_eq!(get(cf::GROUPS, b"a"), None, "the delete came after the put");
        assert_eq!(get(cf::GROUPS, b"b").as_deref(), Some(&b"2"[..]));
        assert_eq!(get(cf::GROUPS, b"c").as_deref(), Some(&b"3"[..]));
        assert_eq!(get(cf::META, b"a").as_deref(), Some(&b"m"[..]));
    }
}
