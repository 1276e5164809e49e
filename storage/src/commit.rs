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
//! key; a failed write rolls the map back, so no seq is ever skipped.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
// Keyed by user ids: a seeded hasher, several times faster than SipHash here.
use ferry_protocol::ErrorCode;
use ferry_protocol::proto::{self, EntryKind, GroupEventKind, GroupRole};
use foldhash::fast::RandomState;
use prost::Message;
use rocksdb::{WriteBatch, WriteOptions};
use tokio::sync::{mpsc, oneshot};

use crate::StorageError;
use crate::db::{Storage, cf, message_entry};
use crate::groups::{Group, Refusal, refuse};
use crate::keys::{self, ConvKey};
use crate::model::{DedupValue, GroupMeta, InboxValue, MSG_ID_TIME_SHIFT, StoredMessage};

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
    /// Most users named in one add/remove (keeps group events small).
    pub max_users_per_change: usize,
}

impl Default for CommitOptions {
    fn default() -> Self {
        CommitOptions {
            durability: Durability::Fsync,
            max_group_members: 10_000,
            queue_ops: 16_384,
            max_batch_entries: 32_768,
            max_users_per_change: 500,
        }
    }
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
        /// What to deliver.
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
    /// Refused by a rule (not a member, window passed, …).
    Refused(Refusal),
    /// The batch could not be written.
    Failed(String),
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
    Batch(Vec<(T, Outcome)>),
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
        sink: impl FnMut(Vec<(T, Outcome)>) + Send + 'static,
    ) -> Result<Committer<T>, StorageError> {
        let (tx, rx) = mpsc::channel(options.queue_ops.max(1));
        let last_msg_id = storage
            .db
            .get_cf(storage.cf(cf::META), keys::META_MSG_ID_HIGH_WATER)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map_or(0, u64::from_be_bytes);
        let mut worker = Worker {
            storage,
            options,
            next_seq: HashMap::default(),
            last_msg_id,
        };
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
    next_seq: HashMap<Arc<str>, u64, RandomState>,
    last_msg_id: u64,
}

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
    cursors: HashMap<(Arc<str>, Arc<str>), u64, RandomState>,
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

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The delivery thread: hands each committed batch to the sink, and
/// releases barriers once everything before them has been through it.
fn deliver<T>(
    batches: std::sync::mpsc::Receiver<Delivery<T>>,
    mut sink: impl FnMut(Vec<(T, Outcome)>),
) {
    let sink_seconds = metrics::histogram!("ferry_commit_sink_seconds");
    for delivery in batches {
        match delivery {
            Delivery::Batch(results) => {
                let started = std::time::Instant::now();
                sink(results);
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
            if !results.is_empty() {
                let ops = results.len();
                let entries = state.entries;
                batch_ops.record(ops as f64);
                let applied = std::time::Instant::now();
                apply_seconds.record(applied - started);
                self.commit(state, &mut results);
                let committed = std::time::Instant::now();
                commit_seconds.record(committed - applied);
                tracing::debug!(
                    ops,
                    entries,
                    apply_us = (applied - started).as_micros() as u64,
                    write_us = (committed - applied).as_micros() as u64,
                    "batch committed"
                );
                if deliveries.send(Delivery::Batch(results)).is_err() {
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

    fn commit<T>(&mut self, mut state: BatchState, results: &mut [(T, Outcome)]) {
        state.put(
            cf::META,
            keys::META_MSG_ID_HIGH_WATER,
            self.last_msg_id.to_be_bytes(),
        );
        let mut wo = WriteOptions::default();
        // The ack waits for this write; with Fsync it also waits for the
        // WAL to reach the disk, once for the whole batch.
        wo.set_sync(self.options.durability == Durability::Fsync);
        let batch = state.writes.into_write_batch(&self.storage);
        match self.storage.db.write_opt(batch, &wo) {
            Ok(()) => {
                for (id, group) in state.groups {
                    self.storage.cache_group(&id, group);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "commit failed; the batch is refused");
                for (user, old) in state.seq_journal {
                    match old {
                        Some(v) => self.next_seq.insert(user, v),
                        None => self.next_seq.remove(&user),
                    };
                }
                for (_, outcome) in results.iter_mut() {
                    if !matches!(outcome, Outcome::Refused(_)) {
                        *outcome = Outcome::Failed(e.to_string());
                    }
                }
            }
        }
    }

    fn next_msg_id(&mut self) -> u64 {
        let candidate = now_ms() << MSG_ID_TIME_SHIFT;
        self.last_msg_id = candidate.max(self.last_msg_id + 1);
        self.last_msg_id
    }

    fn assign_seq(&mut self, user: &Arc<str>, state: &mut BatchState) -> Result<u64, StorageError> {
        let current = match self.next_seq.get(user) {
            Some(v) => *v,
            None => self.storage.max_seq(user)? + 1,
        };
        let previous = self.next_seq.insert(user.clone(), current + 1);
        state.seq_journal.entry(user.clone()).or_insert(previous);
        Ok(current)
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

    fn apply(&mut self, op: Op, state: &mut BatchState) -> Outcome {
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
        state.put(
            cf::MSGS,
            keys::msg_key(&conv_bytes, msg_id),
            msg.encode_to_vec(),
        );
        let pointer = InboxValue {
            conv: conv_bytes,
            msg_id,
            inline: None,
        };
        let mut sender_seq = 0;
        let mut others = Vec::with_capacity(recipients.len());
        for user in &recipients {
            let seq = self.put_inbox(user, &pointer, state)?;
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
            state.dedup.insert((from.clone(), client_msg_id), record);
        }
        Ok(Outcome::Sent {
            ack: proto::SendAck {
                client_msg_id,
                msg_id,
                server_time_ms: time,
                seq: sender_seq,
            },
            duplicate: false,
            fanouts,
        })
    }

    /// Puts the same inline entry in each user's inbox, with the
    /// conversation named as each of them sees it.
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
            let seq = self.put_inbox(user, &value, state)?;
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
        msg.recalled = true;
        msg.body = Bytes::new();
        msg.content_type.clear();
        state.put(
            cf::MSGS,
            keys::msg_key(&conv.encode(), msg_id),
            msg.encode_to_vec(),
        );
        let entry = self.notice(&from, &conv, EntryKind::Recall, msg_id);
        let fanouts = self.put_inline(&users, &conv, entry, state)?;
        Ok(Outcome::Recalled { msg_id, fanouts })
    }

    fn read(
        &mut self,
        from: Arc<str>,
        to: Target,
        up_to_msg_id: u64,
        state: &mut BatchState,
    ) -> Result<Outcome, StorageError> {
        let conv = to.conv(&from);
        let users: Vec<Arc<str>> = match &to {
            Target::Direct(peer) if *peer != from => vec![peer.clone(), from.clone()],
            _ => vec![from.clone()],
        };
        let entry = self.notice(&from, &conv, EntryKind::Read, up_to_msg_id);
        let fanouts = self.put_inline(&users, &conv, entry, state)?;
        Ok(Outcome::Applied { fanouts })
    }

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
            state.put(
                cf::CURSORS,
                keys::cursor_key(&key.0, &key.1),
                seq.to_be_bytes(),
            );
            state.cursors.insert(key, seq);
        }
        Ok(Outcome::Applied {
            fanouts: Vec::new(),
        })
    }

    fn group_change(
        &mut self,
        actor: Arc<str>,
        change: GroupChange,
        state: &mut BatchState,
    ) -> Result<Outcome, StorageError> {
        let max_change = self.options.max_users_per_change;
        let group_id = match &change {
            GroupChange::Create { group_id, .. } if group_id.is_empty() => {
                format!("g{:x}", self.next_msg_id())
            }
            GroupChange::Create { group_id, .. }
            | GroupChange::Add { group_id, .. }
            | GroupChange::Remove { group_id, .. }
            | GroupChange::Leave { group_id }
            | GroupChange::Dissolve { group_id }
            | GroupChange::SetRole { group_id, .. } => group_id.clone(),
        };
        if group_id.len() > 64 {
            return Ok(Outcome::Refused(refuse(
                ErrorCode::InvalidRequest,
                "group id must be 1..=64 bytes",
            )));
        }
        let existing = self.group_in_batch(&group_id, state)?;

        if let GroupChange::Create { name, members, .. } = &change {
            if existing.is_some() {
                return Ok(Outcome::Refused(refuse(
                    ErrorCode::GroupExists,
                    format!("group {group_id} exists"),
                )));
            }
            let mut group = Group {
                id: group_id.as_str().into(),
                meta: GroupMeta {
                    name: name.clone(),
                    owner: actor.to_string(),
                    created_ms: now_ms(),
                },
                members: Vec::new(),
                roles: HashMap::new(),
            };
            group.add(actor.clone(), GroupRole::Owner);
            for m in members {
                if m.is_empty() || m.len() > 64 {
                    return Ok(Outcome::Refused(refuse(
                        ErrorCode::InvalidRequest,
                        "member ids must be 1..=64 bytes",
                    )));
                }
                group.add(m.as_str().into(), GroupRole::Member);
            }
            if group.members.len() > self.options.max_group_members {
                return Ok(Outcome::Refused(refuse(
                    ErrorCode::GroupFull,
                    format!("at most {} members", self.options.max_group_members),
                )));
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
            let event = proto::GroupEvent {
                kind: GroupEventKind::Created as i32,
                users: Vec::new(),
                name: name.clone(),
                role: 0,
            };
            let audience = group.members.clone();
            let fanouts = self.group_event(&actor, &group_id, event, &audience, state)?;
            state.groups.insert(group_id.clone(), Some(group.clone()));
            return Ok(Outcome::GroupChanged {
                group: Some(group),
                group_id,
                fanouts,
            });
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
        let (event, audience) = match change {
            GroupChange::Create { .. } => unreachable!("handled above"),
            GroupChange::Add { members, .. } => {
                if !is_manager {
                    return Ok(Outcome::Refused(refuse(
                        ErrorCode::PermissionDenied,
                        "only the owner or an admin may add members",
                    )));
                }
                if members.len() > max_change
                    || members.iter().any(|m| m.is_empty() || m.len() > 64)
                {
                    return Ok(Outcome::Refused(refuse(
                        ErrorCode::InvalidRequest,
                        format!("1..={max_change} member ids of 1..=64 bytes per request"),
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
                for m in &added {
                    group.add(m.as_str().into(), GroupRole::Member);
                    state.put(
                        cf::GROUPS,
                        keys::group_member_key(&group_id, m),
                        [GroupRole::Member as u8],
                    );
                }
                let event = proto::GroupEvent {
                    kind: GroupEventKind::MembersAdded as i32,
                    users: added,
                    ..Default::default()
                };
                (event, group.members.clone())
            }
            GroupChange::Remove { members, .. } => {
                if !is_manager {
                    return Ok(Outcome::Refused(refuse(
                        ErrorCode::PermissionDenied,
                        "only the owner or an admin may remove members",
                    )));
                }
                if members.len() > max_change {
                    return Ok(Outcome::Refused(refuse(
                        ErrorCode::InvalidRequest,
                        format!("at most {max_change} member ids per request"),
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
                let audience = group.members.clone();
                for m in &removed {
                    group.remove(m);
                    state
                        .writes
                        .delete(cf::GROUPS, keys::group_member_key(&group_id, m));
                }
                let event = proto::GroupEvent {
                    kind: GroupEventKind::MembersRemoved as i32,
                    users: removed,
                    ..Default::default()
                };
                (event, audience)
            }
            GroupChange::Leave { .. } => {
                if actor_role == GroupRole::Owner {
                    return Ok(Outcome::Refused(refuse(
                        ErrorCode::PermissionDenied,
                        "the owner cannot leave; dissolve the group instead",
                    )));
                }
                let audience = group.members.clone();
                group.remove(&actor);
                state
                    .writes
                    .delete(cf::GROUPS, keys::group_member_key(&group_id, &actor));
                let event = proto::GroupEvent {
                    kind: GroupEventKind::MemberLeft as i32,
                    users: vec![actor.to_string()],
                    ..Default::default()
                };
                (event, audience)
            }
            GroupChange::Dissolve { .. } => {
                if actor_role != GroupRole::Owner {
                    return Ok(Outcome::Refused(refuse(
                        ErrorCode::PermissionDenied,
                        "only the owner may dissolve the group",
                    )));
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
                let event = proto::GroupEvent {
                    kind: GroupEventKind::Dissolved as i32,
                    ..Default::default()
                };
                let fanouts = self.group_event(&actor, &group_id, event, &audience, state)?;
                state.groups.insert(group_id.clone(), None);
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
                let user: Arc<str> = user.as_str().into();
                group.roles.insert(user.clone(), role);
                state.put(
                    cf::GROUPS,
                    keys::group_member_key(&group_id, &user),
                    [role as u8],
                );
                let event = proto::GroupEvent {
                    kind: GroupEventKind::RoleChanged as i32,
                    users: vec![user.to_string()],
                    role: role as i32,
                    ..Default::default()
                };
                (event, group.members.clone())
            }
        };
        let fanouts = self.group_event(&actor, &group_id, event, &audience, state)?;
        let group = Arc::new(group);
        state.groups.insert(group_id.clone(), Some(group.clone()));
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
        state.put(
            cf::MSGS,
            keys::msg_key(&conv_bytes, msg_id),
            msg.encode_to_vec(),
        );
        let pointer = InboxValue {
            conv: conv_bytes,
            msg_id,
            inline: None,
        };
        let mut targets = Vec::with_capacity(audience.len());
        for user in audience {
            targets.push((user.clone(), self.put_inbox(user, &pointer, state)?));
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
