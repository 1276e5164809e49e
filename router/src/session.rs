//! Who is online: the registry from user id → device → connection, and the
//! connection handle ([`Conn`]) through which the router delivers.
//!
//! A [`Conn`] owns a bounded outbox. Anything may push to it without
//! awaiting (the router fanning a group message out to 10,000 members must
//! not wait on any one of them); the connection's writer task drains it, all
//! of it per wake-up, into one buffered write. A push to a full outbox closes
//! the connection with `SLOW_CONSUMER`: the device resyncs when it comes back,
//! and memory stays bounded.
//!
//! The outbox is a `VecDeque` behind a `std` mutex held only for a push or a
//! drain (never across an await). An idle connection's outbox holds no
//! allocation at all, which a channel could not promise, and memory per idle
//! connection is what decides how many fit in a machine.
//!
//! The registry keys sessions by user and device and unregisters by
//! connection id: when a device reconnects before its old connection is
//! noticed dead, the new connection replaces the old one (which is kicked),
//! and the old one's late unregister finds a different id and does nothing.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use ferry_protocol::{ErrorCode, Frame, proto};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Unique id of one connection for the life of the process.
pub type ConnId = u64;

/// One frame waiting in an outbox.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// A frame to encode.
    Frame(Frame),
    /// A frame already encoded, length prefix included.
    Encoded(Bytes),
    /// An inbox entry shared by a fan-out: a `Deliver` encoded once with
    /// seq 0, completed with this connection's seq by the writer.
    Entry {
        /// The seq in this user's inbox.
        seq: u64,
        /// The encoded `Deliver` without its seq.
        shared: Bytes,
    },
}

impl From<Frame> for Outgoing {
    fn from(frame: Frame) -> Self {
        Outgoing::Frame(frame)
    }
}

/// Why a push did not enqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// The connection is closing or closed.
    #[error("connection closed")]
    Closed,
    /// The outbox was full: the connection is now closing with `SLOW_CONSUMER`.
    #[error("outbox full: slow consumer")]
    SlowConsumer,
}

/// How a connection ended, as seen by its writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer went away or the reader stopped.
    Disconnected,
    /// Nothing arrived for 3 × the heartbeat interval.
    HeartbeatTimeout,
    /// The server closed it with this code (after sending a final frame).
    Code(ErrorCode),
}

struct Outbox {
    frames: VecDeque<Outgoing>,
    /// Set once; after it, pushes fail and the writer finishes up.
    closing: Option<CloseReason>,
    /// Highest inbox seq handed to this connection, live or by sync.
    delivered: u64,
    /// A sync is streaming stored entries; live pushes wait for it.
    syncing: bool,
    /// A live push was skipped during the sync: read storage once more.
    missed: bool,
}

/// What a live push of an inbox entry did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LivePush {
    /// Queued: it was the next seq.
    Queued,
    /// Not needed: already delivered, or a running sync will fetch it.
    Skipped,
    /// It is ahead of the next expected seq: the caller must start a sync
    /// (the connection is now marked as syncing).
    NeedsSync,
    /// The connection is closing.
    Closed,
}

/// The shared handle of one authenticated connection.
pub struct Conn {
    id: ConnId,
    user: Arc<str>,
    device: Arc<str>,
    capacity: usize,
    outbox: Mutex<Outbox>,
    wake: Notify,
    cancel: CancellationToken,
    /// Woken when the writer has drained the outbox (sync pacing).
    space: Notify,
    /// Coarse clock second of the last inbound frame (heartbeat).
    last_seen: AtomicU32,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("id", &self.id)
            .field("user", &self.user)
            .field("device", &self.device)
            .finish()
    }
}

/// A batch of outgoing frames taken from the outbox by the writer.
pub struct Drained {
    /// The frames, oldest first.
    pub frames: VecDeque<Outgoing>,
    /// Set when the connection is closing: write `frames`, then close.
    pub closing: Option<CloseReason>,
}

impl Conn {
    /// A new connection handle with an outbox of `capacity` frames.
    pub fn new(id: ConnId, user: Arc<str>, device: Arc<str>, capacity: usize) -> Arc<Conn> {
        Arc::new(Conn {
            id,
            user,
            device,
            capacity: capacity.max(1),
            outbox: Mutex::new(Outbox {
                frames: VecDeque::new(),
                closing: None,
                delivered: 0,
                syncing: false,
                missed: false,
            }),
            wake: Notify::new(),
            cancel: CancellationToken::new(),
            space: Notify::new(),
            last_seen: AtomicU32::new(0),
        })
    }

    /// The connection's unique id.
    pub fn id(&self) -> ConnId {
        self.id
    }

    /// The authenticated user.
    pub fn user(&self) -> &Arc<str> {
        &self.user
    }

    /// The device id from Auth.
    pub fn device(&self) -> &Arc<str> {
        &self.device
    }

    fn lock(&self) -> MutexGuard<'_, Outbox> {
        // A panic while holding this lock cannot leave the queue half-updated
        // (push_back/take are atomic from our point of view), so poisoning is
        // safe to ignore.
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a frame for the writer. A full outbox closes the connection
    /// with `SLOW_CONSUMER`.
    pub fn push(&self, out: impl Into<Outgoing>) -> Result<(), PushError> {
        let outbox = self.lock();
        self.push_locked(outbox, out.into())
    }

    fn push_locked(
        &self,
        mut outbox: MutexGuard<'_, Outbox>,
        out: Outgoing,
    ) -> Result<(), PushError> {
        if outbox.closing.is_some() {
            return Err(PushError::Closed);
        }
        if outbox.frames.len() >= self.capacity {
            Self::close_locked(
                &mut outbox,
                CloseReason::Code(ErrorCode::SlowConsumer),
                Some(Frame::error(
                    ErrorCode::SlowConsumer,
                    "write queue full: read faster, then resync",
                )),
            );
            drop(outbox);
            self.signal_close();
            return Err(PushError::SlowConsumer);
        }
        outbox.frames.push_back(out);
        let first = outbox.frames.len() == 1;
        drop(outbox);
        if first {
            // The writer drains everything per wake-up, so only the push that
            // makes the queue non-empty needs to wake it.
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Starts the connection's inbox position at `delivered`; with
    /// `syncing`, live pushes wait for a sync that the caller runs.
    pub fn start_at(&self, delivered: u64, syncing: bool) {
        let mut outbox = self.lock();
        outbox.delivered = delivered;
        outbox.syncing = syncing;
        outbox.missed = false;
    }

    /// Highest inbox seq handed to this connection.
    pub fn delivered(&self) -> u64 {
        self.lock().delivered
    }

    /// Pushes inbox entry `seq` live, keeping the connection's inbox stream
    /// gap-free and duplicate-free (see [`LivePush`]).
    pub fn push_entry(&self, seq: u64, shared: &Bytes) -> LivePush {
        let mut outbox = self.lock();
        if outbox.closing.is_some() {
            return LivePush::Closed;
        }
        if outbox.syncing {
            outbox.missed = true;
            return LivePush::Skipped;
        }
        if seq <= outbox.delivered {
            return LivePush::Skipped;
        }
        if seq > outbox.delivered + 1 {
            outbox.syncing = true;
            outbox.missed = false;
            return LivePush::NeedsSync;
        }
        outbox.delivered = seq;
        let entry = Outgoing::Entry {
            seq,
            shared: shared.clone(),
        };
        match self.push_locked(outbox, entry) {
            Ok(()) => LivePush::Queued,
            Err(_) => LivePush::Closed,
        }
    }

    /// Queues the frames of one sync page whose entries end at `last_seq`.
    /// `page_is_last`: storage had nothing after it when read. Returns
    /// whether the sync is finished (live pushes resume), which is only
    /// when no live push was skipped meanwhile. `frames` is called under
    /// the lock with the final has_more flag.
    pub fn push_sync_page(
        &self,
        last_seq: u64,
        page_is_last: bool,
        frames: impl FnOnce(bool) -> Vec<Frame>,
    ) -> Result<bool, PushError> {
        let mut outbox = self.lock();
        if outbox.closing.is_some() {
            return Err(PushError::Closed);
        }
        let finished = page_is_last && !outbox.missed;
        outbox.missed = false;
        outbox.delivered = outbox.delivered.max(last_seq);
        if finished {
            outbox.syncing = false;
        }
        let frames = frames(!finished);
        let count = frames.len();
        outbox
            .frames
            .extend(frames.into_iter().map(Outgoing::Frame));
        let first = outbox.frames.len() == count;
        drop(outbox);
        if first {
            self.wake.notify_one();
        }
        Ok(finished)
    }

    /// Waits until at most `level` frames are queued (or the connection closes).
    pub async fn wait_below(&self, level: usize) {
        loop {
            let notified = self.space.notified();
            {
                let outbox = self.lock();
                if outbox.frames.len() <= level || outbox.closing.is_some() {
                    return;
                }
            }
            notified.await;
        }
    }

    /// The outbox capacity in frames.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Queues a frame only if the outbox has room, without closing the
    /// connection otherwise (for best-effort frames such as Typing).
    pub fn try_push_best_effort(&self, out: impl Into<Outgoing>) -> bool {
        let mut outbox = self.lock();
        if outbox.closing.is_some() || outbox.frames.len() >= self.capacity {
            return false;
        }
        outbox.frames.push_back(out.into());
        let first = outbox.frames.len() == 1;
        drop(outbox);
        if first {
            self.wake.notify_one();
        }
        true
    }

    /// Closes the connection after sending `last` (if any). Frames already
    /// queued go out first. Idempotent: only the first close counts.
    pub fn close(&self, reason: CloseReason, last: Option<Frame>) -> bool {
        let mut outbox = self.lock();
        if outbox.closing.is_some() {
            return false;
        }
        Self::close_locked(&mut outbox, reason, last);
        drop(outbox);
        self.signal_close();
        true
    }

    /// Sends `Kick { reason }` and closes.
    pub fn kick(&self, reason: ErrorCode, message: &str) -> bool {
        let kick: Frame = proto::Kick {
            reason: reason as i32,
            message: message.to_owned(),
        }
        .into();
        self.close(CloseReason::Code(reason), Some(kick))
    }

    fn close_locked(outbox: &mut Outbox, reason: CloseReason, last: Option<Frame>) {
        outbox.closing = Some(reason);
        if let Some(frame) = last {
            // The final frame may exceed the capacity by one: it is the reason.
            outbox.frames.push_back(Outgoing::Frame(frame));
        }
    }

    fn signal_close(&self) {
        self.wake.notify_one();
        self.cancel.cancel();
    }

    /// Whether the connection is closing or closed.
    pub fn is_closing(&self) -> bool {
        self.lock().closing.is_some()
    }

    /// Cancelled when the connection starts closing: the reader stops on it.
    pub fn cancelled(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Waits until there is something to write (or the connection closes),
    /// then takes all of it. Used by the connection's writer task only.
    pub async fn drain(&self) -> Drained {
        loop {
            // Register interest before checking, so a push between the check
            // and the await is not missed.
            let notified = self.wake.notified();
            {
                let mut outbox = self.lock();
                if !outbox.frames.is_empty() || outbox.closing.is_some() {
                    // Take the queue and leave an unallocated one behind: an
                    // idle connection keeps no buffer.
                    self.space.notify_waiters();
                    return Drained {
                        frames: std::mem::take(&mut outbox.frames),
                        closing: outbox.closing,
                    };
                }
            }
            notified.await;
        }
    }

    /// Frames currently queued (for tests and metrics).
    pub fn queued(&self) -> usize {
        self.lock().frames.len()
    }

    /// Records inbound activity at coarse-clock second `now`.
    pub fn touch(&self, now: u32) {
        self.last_seen.store(now, Ordering::Relaxed);
    }

    /// Coarse-clock second of the last inbound frame.
    pub fn last_seen(&self) -> u32 {
        self.last_seen.load(Ordering::Relaxed)
    }
}

const SHARDS: usize = 64;

type DeviceMap = Vec<Arc<Conn>>;
/// Seeded per process (user ids come from tokens), and much cheaper than
/// SipHash on the fan-out path, which looks up every recipient.
type Hasher = foldhash::fast::RandomState;
type Shard = Mutex<HashMap<Arc<str>, DeviceMap, Hasher>>;

/// The online-session registry: user id → that user's connections (one per device).
///
/// Sharded by user id so that registering and looking up from many tasks at
/// once rarely contend; each shard's lock is held for a map operation only.
pub struct Sessions {
    shards: Box<[Shard]>,
    hasher: Hasher,
    next_id: AtomicU64,
    online: AtomicU64,
    /// Unregisters that found another connection in the slot (the reconnect
    /// race resolved in favour of the newer connection).
    stale_unregisters: AtomicU64,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions::new()
    }
}

impl Sessions {
    /// An empty registry.
    pub fn new() -> Sessions {
        Sessions {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::default()))
                .collect(),
            hasher: Default::default(),
            next_id: AtomicU64::new(1),
            online: AtomicU64::new(0),
            stale_unregisters: AtomicU64::new(0),
        }
    }

    /// A fresh, never reused connection id.
    pub fn next_conn_id(&self) -> ConnId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn shard(&self, user: &str) -> MutexGuard<'_, HashMap<Arc<str>, DeviceMap, Hasher>> {
        let i = (self.hasher.hash_one(user) as usize) % SHARDS;
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `conn`; returns the connection it replaces (same user and
    /// device), which the caller kicks.
    pub fn register(&self, conn: Arc<Conn>) -> Option<Arc<Conn>> {
        let mut shard = self.shard(conn.user());
        let devices = shard.entry(conn.user().clone()).or_default();
        if let Some(slot) = devices.iter_mut().find(|c| c.device() == conn.device()) {
            Some(std::mem::replace(slot, conn))
        } else {
            devices.push(conn);
            self.online.fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    /// Removes `conn` if, and only if, it is still the registered connection
    /// of its (user, device). Returns whether it was removed.
    pub fn unregister(&self, conn: &Conn) -> bool {
        let mut shard = self.shard(conn.user());
        let Some(devices) = shard.get_mut(conn.user().as_ref()) else {
            self.stale_unregisters.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        let Some(pos) = devices.iter().position(|c| c.id() == conn.id()) else {
            self.stale_unregisters.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        devices.swap_remove(pos);
        if devices.is_empty() {
            shard.remove(conn.user().as_ref());
        }
        self.online.fetch_sub(1, Ordering::Relaxed);
        true
    }

    /// The online connections of `user` (empty when offline).
    pub fn connections(&self, user: &str) -> Vec<Arc<Conn>> {
        self.shard(user).get(user).cloned().unwrap_or_default()
    }

    /// Calls `f` with each online connection of `user`, under the shard
    /// lock: for fan-out without cloning. `f` must not block.
    pub fn for_each_connection(&self, user: &str, mut f: impl FnMut(&Arc<Conn>)) {
        if let Some(devices) = self.shard(user).get(user) {
            devices.iter().for_each(&mut f);
        }
    }

    /// Number of registered connections.
    pub fn online(&self) -> u64 {
        self.online.load(Ordering::Relaxed)
    }

    /// How many unregisters found a newer connection in their place.
    pub fn stale_unregisters(&self) -> u64 {
        self.stale_unregisters.load(Ordering::Relaxed)
    }

    /// Every registered connection (for shutdown).
    pub fn all(&self) -> Vec<Arc<Conn>> {
        let mut all = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            all.extend(shard.values().flatten().cloned());
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(sessions: &Sessions, user: &str, device: &str) -> Arc<Conn> {
        Conn::new(sessions.next_conn_id(), user.into(), device.into(), 4)
    }

    #[test]
    fn same_device_replaces_and_late_unregister_is_a_no_op() {
        let s = Sessions::new();
        let old = conn(&s, "alice", "phone");
        assert!(s.register(old.clone()).is_none());
        let new = conn(&s, "alice", "phone");
        let replaced = s.register(new.clone()).expect("old one replaced");
        assert_eq!(replaced.id(), old.id());
        // The old connection's late close must not remove the new one.
        assert!(!s.unregister(&old));
        assert_eq!(s.stale_unregisters(), 1);
        let now = s.connections("alice");
        assert_eq!(now.len(), 1);
        assert_eq!(now[0].id(), new.id());
        assert_eq!(s.online(), 1);
        assert!(s.unregister(&new));
        assert!(s.connections("alice").is_empty());
        assert_eq!(s.online(), 0);
    }

    #[test]
    fn devices_coexist() {
        let s = Sessions::new();
        s.register(conn(&s, "alice", "phone"));
        s.register(conn(&s, "alice", "laptop"));
        s.register(conn(&s, "bob", "phone"));
        assert_eq!(s.connections("alice").len(), 2);
        assert_eq!(s.online(), 3);
        assert_eq!(s.all().len(), 3);
    }

    #[tokio::test]
    async fn full_outbox_closes_with_slow_consumer() {
        let s = Sessions::new();
        let c = conn(&s, "alice", "phone");
        for i in 0..4 {
            c.push(Frame::from(proto::Ping { nonce: i })).unwrap();
        }
        assert_eq!(
            c.push(Frame::from(proto::Ping { nonce: 9 })),
            Err(PushError::SlowConsumer)
        );
        assert!(c.cancelled().is_cancelled());
        assert_eq!(
            c.push(Frame::from(proto::Ping { nonce: 10 })),
            Err(PushError::Closed)
        );
        let drained = c.drain().await;
        assert_eq!(drained.frames.len(), 5, "4 queued + the error frame");
        assert_eq!(
            drained.closing,
            Some(CloseReason::Code(ErrorCode::SlowConsumer))
        );
    }

    #[tokio::test]
    async fn drain_takes_everything_and_leaves_no_allocation() {
        let s = Sessions::new();
        let c = conn(&s, "alice", "phone");
        c.push(Frame::from(proto::Ping { nonce: 1 })).unwrap();
        c.push(Frame::from(proto::Ping { nonce: 2 })).unwrap();
        let drained = c.drain().await;
        assert_eq!(drained.frames.len(), 2);
        assert_eq!(drained.closing, None);
        assert_eq!(c.lock().frames.capacity(), 0);
    }
}
