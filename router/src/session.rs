//! Who is online: the registry from user id → device → connection, and the
//! connection handle ([`Conn`]) through which the router delivers.
//!
//! A [`Conn`] owns a bounded outbox. Anything may push to it without
//! awaiting (the router fanning a group message out to 10,000 members must
//! not wait on any one of them); the connection's writer task drains it, a
//! bounded chunk per wake-up ([`Conn::drain`]), into one buffered write.
//!
//! # Bounds and back-pressure
//!
//! The outbox is bounded twice, in frames and in encoded bytes
//! ([`OutboxLimits`]). A push over either bound closes the connection with
//! `SLOW_CONSUMER`: the device resyncs when it comes back, and memory stays
//! bounded. What a connection's own requests produce never gets there while
//! the client reads: the reader takes a [`RequestSlot`] per request that gets
//! a reply, and stops reading the socket ([`Conn::wait_for_room`]) while
//! [`MAX_IN_FLIGHT`] requests are unanswered or the queue, counting the
//! replies still to come, is above half the byte bound. So a client that
//! pipelines is slowed down, never cut off; only a client that stops reading
//! while others' traffic keeps arriving reaches the bound.
//!
//! Three kinds of frames share the queue:
//!
//! ```text
//!   kind         counted against the bounds        when over
//!   real         frames and bytes (net of others)  SLOW_CONSUMER, close
//!   best effort  1/8 of each bound, separately      dropped silently
//!   sync page    not (paced by the sync itself)     —
//! ```
//!
//! Best-effort frames (Typing) may use only a small share, and real frames
//! are checked without counting them, so a flood of them can never push a
//! connection into `SLOW_CONSUMER`. Sync pages are pushed only when the
//! queue is below half the byte bound ([`Conn::wait_below_bytes`]), so they
//! add at most one page beyond it.
//!
//! The outbox is a `VecDeque` behind a `std` mutex held only for a push or a
//! drain (never across an await). An idle connection's outbox holds no
//! allocation at all, which a channel could not promise, and memory per idle
//! connection is what decides how many fit in a machine.
//!
//! The registry keys sessions by user and device and unregisters by
//! connection id. Connection ids are handed out after auth, in order, so the
//! newest authenticated connection of a device has the highest id, and
//! [`Sessions::register`] keeps that one whatever order logins finish in: a
//! newer connection replaces (and kicks) an older one; an older one whose
//! login finishes late is refused (and kicked) instead. A late unregister
//! finds a different id and does nothing.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;
use ferry_protocol::{ErrorCode, Frame, LENGTH_PREFIX_BYTES, proto};
use prost::Message;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Unique id of one connection for the life of the process.
pub type ConnId = u64;

/// Most requests of one connection that may await their reply at once;
/// beyond it the server stops reading the connection until one is answered.
pub const MAX_IN_FLIGHT: u32 = 128;

/// Default byte bound of one outbox (`write_queue_bytes`).
pub const DEFAULT_WRITE_QUEUE_BYTES: usize = 1024 * 1024;

/// Best-effort frames may use at most 1/`BEST_EFFORT_SHARE` of each bound.
pub const BEST_EFFORT_SHARE: usize = 8;

/// Frames reserved for the replies to one request in flight (a Send's
/// SendAck and own copy; a GroupRequest's reply and event).
pub const REPLY_FRAMES: usize = 2;

/// Typing frames one connection may send per second; more are dropped.
pub const TYPING_PER_SEC: u32 = 5;

/// Encoded bytes an inbox entry adds to its shared `Deliver`: the length
/// prefix, the `Frame.deliver` tag and length, and the seq field.
const ENTRY_OVERHEAD: usize = LENGTH_PREFIX_BYTES + 1 + 5 + 1 + 10;

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
        /// The encoded `Deliver` without its seq, shared by every recipient.
        deliver_without_seq: Bytes,
    },
}

impl Outgoing {
    /// Bytes this takes on the wire, length prefix included (an upper
    /// bound for entries, whose seq varint is not known in advance).
    pub fn wire_len(&self) -> usize {
        match self {
            Outgoing::Frame(frame) => LENGTH_PREFIX_BYTES + frame.encoded_len(),
            Outgoing::Encoded(bytes) => bytes.len(),
            Outgoing::Entry {
                deliver_without_seq,
                ..
            } => ENTRY_OVERHEAD + deliver_without_seq.len(),
        }
    }
}

impl From<Frame> for Outgoing {
    fn from(frame: Frame) -> Self {
        Outgoing::Frame(frame)
    }
}

/// The bounds of one outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxLimits {
    /// Most frames queued (`write_queue_frames`).
    pub frames: usize,
    /// Most encoded bytes queued (`write_queue_bytes`).
    pub bytes: usize,
}

impl OutboxLimits {
    /// Queue level above which the reader stops taking requests, and below
    /// which a sync pushes its next page: half the byte bound.
    pub fn watermark(&self) -> usize {
        self.bytes / 2
    }

    /// The same in frames: half the frame bound.
    pub fn frame_watermark(&self) -> usize {
        self.frames / 2
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

/// Which bound a queued frame counts against (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Real,
    BestEffort,
    Sync,
}

struct Queued {
    out: Outgoing,
    /// [`Outgoing::wire_len`], computed once at push.
    bytes: u32,
    kind: Kind,
}

/// Frames and bytes of one kind of queued frame.
#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    frames: usize,
    bytes: usize,
}

impl Usage {
    fn add(&mut self, bytes: usize) {
        self.frames += 1;
        self.bytes += bytes;
    }

    fn sub(&mut self, bytes: usize) {
        self.frames -= 1;
        self.bytes -= bytes;
    }
}

struct Outbox {
    queue: VecDeque<Queued>,
    /// Everything queued, of every kind.
    total: Usage,
    best_effort: Usage,
    sync: Usage,
    /// Most bytes ever queued at once (a test hook, and a metric's source).
    peak_bytes: usize,
    /// Set once; after it, pushes fail and the writer finishes up.
    closing: Option<CloseReason>,
    /// Highest inbox seq handed to this connection, live or by sync.
    delivered: u64,
    /// A sync is streaming stored entries; live pushes wait for it.
    syncing: bool,
    /// A live push was skipped during the sync: read storage once more.
    missed: bool,
    /// Requests taken in whose replies are not queued yet.
    in_flight: u32,
    /// Bytes those replies may still add (the slots' reservations).
    reserved: usize,
    /// Second (since process start) of the Typing rate window, and the
    /// Typing frames counted in it.
    typing_window: u32,
    typing_count: u32,
}

impl Outbox {
    fn enqueue(&mut self, out: Outgoing, bytes: usize, kind: Kind) {
        self.total.add(bytes);
        match kind {
            Kind::Real => {}
            Kind::BestEffort => self.best_effort.add(bytes),
            Kind::Sync => self.sync.add(bytes),
        }
        self.peak_bytes = self.peak_bytes.max(self.total.bytes);
        self.queue.push_back(Queued {
            out,
            bytes: bytes.min(u32::MAX as usize) as u32,
            kind,
        });
    }

    fn dequeue(&mut self) -> Option<Queued> {
        let item = self.queue.pop_front()?;
        let bytes = item.bytes as usize;
        self.total.sub(bytes);
        match item.kind {
            Kind::Real => {}
            Kind::BestEffort => self.best_effort.sub(bytes),
            Kind::Sync => self.sync.sub(bytes),
        }
        Some(item)
    }

    /// Real frames and bytes: the total less best-effort and sync ones.
    fn real(&self) -> Usage {
        Usage {
            frames: self.total.frames - self.best_effort.frames - self.sync.frames,
            bytes: self.total.bytes - self.best_effort.bytes - self.sync.bytes,
        }
    }
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
    limits: OutboxLimits,
    outbox: Mutex<Outbox>,
    wake: Notify,
    cancel: CancellationToken,
    /// Woken when the queue shrinks or a request is answered (sync pacing
    /// and the reader's back-pressure wait).
    space: Notify,
    /// Coarse clock second of the last inbound frame (heartbeat).
    last_seen: AtomicU32,
    /// A stand-in for a connection on another node (a forwarded request):
    /// never registered, never forwards again.
    remote: std::sync::atomic::AtomicBool,
    /// When the token the connection authenticated with was issued (JWT
    /// `iat`, Unix seconds; 0 without one): a revocation kicks sessions
    /// whose token is older than it.
    token_issued_at: AtomicU64,
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
    items: VecDeque<Queued>,
    /// Set when the connection is closing and this batch holds everything
    /// that was left: write the frames, then close.
    pub closing: Option<CloseReason>,
}

impl Drained {
    /// Number of frames in the batch.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the batch has no frame (a close with nothing left to write).
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The frames, oldest first.
    pub fn frames(self) -> impl Iterator<Item = Outgoing> {
        self.items.into_iter().map(|q| q.out)
    }
}

/// One request of a connection whose reply is still to come.
///
/// Taken by the reader with [`Conn::begin_request`] and carried with the
/// request to where its reply is queued; dropping it (after the reply is
/// pushed, or when the request is abandoned) frees its place and wakes a
/// reader waiting in [`Conn::wait_for_room`].
pub struct RequestSlot {
    conn: Arc<Conn>,
    reserved: usize,
}

impl std::fmt::Debug for RequestSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestSlot")
            .field("conn", &self.conn.id)
            .field("reserved", &self.reserved)
            .finish()
    }
}

impl Drop for RequestSlot {
    fn drop(&mut self) {
        {
            let mut outbox = self.conn.lock();
            outbox.in_flight -= 1;
            outbox.reserved -= self.reserved;
        }
        self.conn.space.notify_waiters();
    }
}

/// Seconds since the first Typing frame of the process (the rate window).
fn typing_clock() -> u32 {
    static START: LazyLock<Instant> = LazyLock::new(Instant::now);
    START.elapsed().as_secs() as u32
}

impl Conn {
    /// A new connection handle with an outbox of `capacity` frames and the
    /// default byte bound ([`DEFAULT_WRITE_QUEUE_BYTES`]).
    pub fn new(id: ConnId, user: Arc<str>, device: Arc<str>, capacity: usize) -> Arc<Conn> {
        Conn::with_limits(
            id,
            user,
            device,
            OutboxLimits {
                frames: capacity,
                bytes: DEFAULT_WRITE_QUEUE_BYTES,
            },
        )
    }

    /// A new connection handle whose outbox is bounded by `limits`.
    pub fn with_limits(
        id: ConnId,
        user: Arc<str>,
        device: Arc<str>,
        limits: OutboxLimits,
    ) -> Arc<Conn> {
        Arc::new(Conn {
            id,
            user,
            device,
            limits: OutboxLimits {
                frames: limits.frames.max(1),
                bytes: limits.bytes.max(1),
            },
            outbox: Mutex::new(Outbox {
                queue: VecDeque::new(),
                total: Usage::default(),
                best_effort: Usage::default(),
                sync: Usage::default(),
                peak_bytes: 0,
                closing: None,
                delivered: 0,
                syncing: false,
                missed: false,
                in_flight: 0,
                reserved: 0,
                typing_window: 0,
                typing_count: 0,
            }),
            wake: Notify::new(),
            cancel: CancellationToken::new(),
            space: Notify::new(),
            last_seen: AtomicU32::new(0),
            remote: std::sync::atomic::AtomicBool::new(false),
            token_issued_at: AtomicU64::new(0),
        })
    }

    /// Records when the connection's token was issued (JWT `iat`, Unix
    /// seconds; leave it 0 for a token without `iat`). Set before login.
    pub fn set_token_issued_at(&self, secs: u64) {
        self.token_issued_at.store(secs, Ordering::Relaxed);
    }

    /// When the connection's token was issued (Unix seconds, 0 if unknown).
    pub fn token_issued_at(&self) -> u64 {
        self.token_issued_at.load(Ordering::Relaxed)
    }

    /// Marks this handle as the stand-in for a connection of another node
    /// (a request forwarded over the cluster bus).
    pub fn mark_remote(&self) {
        self.remote
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether this handle stands in for a connection of another node.
    pub fn is_remote(&self) -> bool {
        self.remote.load(std::sync::atomic::Ordering::Relaxed)
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

    /// The outbox bounds.
    pub fn limits(&self) -> OutboxLimits {
        self.limits
    }

    fn lock(&self) -> MutexGuard<'_, Outbox> {
        // A panic while holding this lock cannot leave the queue half-updated
        // (push_back/take are atomic from our point of view), so poisoning is
        // safe to ignore.
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a frame for the writer. A full outbox (frames or bytes)
    /// closes the connection with `SLOW_CONSUMER`.
    pub fn push(&self, out: impl Into<Outgoing>) -> Result<(), PushError> {
        let out = out.into();
        let bytes = out.wire_len();
        let outbox = self.lock();
        self.push_locked(outbox, out, bytes)
    }

    fn push_locked(
        &self,
        mut outbox: MutexGuard<'_, Outbox>,
        out: Outgoing,
        bytes: usize,
    ) -> Result<(), PushError> {
        if outbox.closing.is_some() {
            return Err(PushError::Closed);
        }
        let real = outbox.real();
        // One frame always fits in an empty queue, whatever its size.
        if real.frames >= self.limits.frames
            || (real.frames > 0 && real.bytes + bytes > self.limits.bytes)
        {
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
        outbox.enqueue(out, bytes, Kind::Real);
        let first = outbox.queue.len() == 1;
        drop(outbox);
        if first {
            // The writer drains until the queue is empty before it waits,
            // so only the push that makes the queue non-empty wakes it.
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
    /// gap-free and duplicate-free (see [`LivePush`]). `deliver_without_seq`
    /// is the entry's `Deliver` encoded once for every recipient.
    pub fn push_entry(&self, seq: u64, deliver_without_seq: &Bytes) -> LivePush {
        let entry = Outgoing::Entry {
            seq,
            deliver_without_seq: deliver_without_seq.clone(),
        };
        let bytes = entry.wire_len();
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
        match self.push_locked(outbox, entry, bytes) {
            Ok(()) => LivePush::Queued,
            Err(_) => LivePush::Closed,
        }
    }

    /// Queues the frames of one sync page whose entries end at `last_seq`.
    /// `page_is_last`: storage had nothing after it when read. Returns
    /// whether the sync is finished (live pushes resume), which is only
    /// when no live push was skipped meanwhile. `frames` is called under
    /// the lock with the final has_more flag.
    ///
    /// Sync frames are not checked against the bounds: the sync paces
    /// itself with [`Conn::wait_below_bytes`] instead.
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
        let was_empty = outbox.queue.is_empty();
        for frame in frames(!finished) {
            let out = Outgoing::Frame(frame);
            let bytes = out.wire_len();
            outbox.enqueue(out, bytes, Kind::Sync);
        }
        let wake = was_empty && !outbox.queue.is_empty();
        drop(outbox);
        if wake {
            self.wake.notify_one();
        }
        Ok(finished)
    }

    /// Waits until at most `level` frames are queued (or the connection closes).
    pub async fn wait_below(&self, level: usize) {
        self.wait_until(|outbox| outbox.total.frames <= level).await
    }

    /// Waits until at most `level` bytes are queued (or the connection
    /// closes). The sync paces itself with it, at
    /// [`OutboxLimits::watermark`], so that a page is pushed only when the
    /// queue is below half the byte bound.
    pub async fn wait_below_bytes(&self, level: usize) {
        self.wait_until(|outbox| outbox.total.bytes <= level).await
    }

    /// Waits until the reader may take another frame whose replies add at
    /// most `reply_bytes` to the queue (or the connection closes): fewer
    /// than [`MAX_IN_FLIGHT`] requests unanswered, and the queue plus the
    /// replies still to come plus this frame's within the watermarks, in
    /// bytes (`reply_bytes`) and in frames ([`REPLY_FRAMES`] per request). A
    /// connection with nothing queued and nothing in flight may always go on.
    ///
    /// The reader calls this before each frame, so while it waits it reads
    /// nothing: a client that does not read its replies stops being read.
    pub async fn wait_for_room(&self, reply_bytes: usize) {
        self.wait_until(|outbox| self.room_locked(outbox, reply_bytes))
            .await
    }

    /// Whether [`Conn::wait_for_room`] would return at once: the reader's
    /// fast path, which needs no future.
    pub fn has_room(&self, reply_bytes: usize) -> bool {
        let outbox = self.lock();
        outbox.closing.is_some() || self.room_locked(&outbox, reply_bytes)
    }

    fn room_locked(&self, outbox: &Outbox, reply_bytes: usize) -> bool {
        let frames = outbox.total.frames + REPLY_FRAMES * (outbox.in_flight as usize + 1);
        (outbox.in_flight == 0 && outbox.total.frames == 0)
            || (outbox.in_flight < MAX_IN_FLIGHT
                && outbox.total.bytes + outbox.reserved + reply_bytes <= self.limits.watermark()
                && frames <= self.limits.frame_watermark())
    }

    async fn wait_until(&self, ready: impl Fn(&Outbox) -> bool) {
        loop {
            // Registered before the check: `notify_waiters` reaches a
            // `Notified` from its creation, so no wake-up is lost.
            let notified = self.space.notified();
            {
                let outbox = self.lock();
                if outbox.closing.is_some() || ready(&outbox) {
                    return;
                }
            }
            notified.await;
        }
    }

    /// Takes a place for one request whose replies will add at most
    /// `reply_bytes` to the queue. The place is held until the returned
    /// slot is dropped, which the router does once the reply is queued.
    pub fn begin_request(self: &Arc<Self>, reply_bytes: usize) -> RequestSlot {
        let mut outbox = self.lock();
        outbox.in_flight += 1;
        outbox.reserved += reply_bytes;
        RequestSlot {
            conn: self.clone(),
            reserved: reply_bytes,
        }
    }

    /// Requests taken in and not yet answered.
    pub fn in_flight(&self) -> u32 {
        self.lock().in_flight
    }

    /// The outbox capacity in frames.
    pub fn capacity(&self) -> usize {
        self.limits.frames
    }

    /// Queues a frame only if best-effort frames use less than their share
    /// (1/[`BEST_EFFORT_SHARE`] of each bound), without closing the
    /// connection otherwise (for best-effort frames such as Typing).
    /// Returns whether it was queued.
    pub fn try_push_best_effort(&self, out: impl Into<Outgoing>) -> bool {
        let out = out.into();
        let bytes = out.wire_len();
        let frame_share = (self.limits.frames / BEST_EFFORT_SHARE).max(1);
        let byte_share = self.limits.bytes / BEST_EFFORT_SHARE;
        let mut outbox = self.lock();
        if outbox.closing.is_some()
            || outbox.best_effort.frames >= frame_share
            || outbox.best_effort.bytes + bytes > byte_share
        {
            return false;
        }
        outbox.enqueue(out, bytes, Kind::BestEffort);
        let first = outbox.queue.len() == 1;
        drop(outbox);
        if first {
            self.wake.notify_one();
        }
        true
    }

    /// Whether this connection may send one more Typing frame now: at most
    /// [`TYPING_PER_SEC`] per second. Counts the frame when it may.
    pub fn typing_allowed(&self) -> bool {
        let now = typing_clock();
        let mut outbox = self.lock();
        if outbox.typing_window != now {
            outbox.typing_window = now;
            outbox.typing_count = 0;
        }
        if outbox.typing_count >= TYPING_PER_SEC {
            return false;
        }
        outbox.typing_count += 1;
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
            // The final frame may exceed the bounds: it is the reason.
            let out = Outgoing::Frame(frame);
            let bytes = out.wire_len();
            outbox.enqueue(out, bytes, Kind::Real);
        }
    }

    fn signal_close(&self) {
        self.wake.notify_one();
        self.cancel.cancel();
        // Waiters (sync pacing, the reader) return on a closing connection.
        self.space.notify_waiters();
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
    /// then takes the oldest frames, about `max_bytes` of them (at least
    /// one, so a frame may take it over by up to one frame). What is not
    /// taken stays queued, and counted. Used by the connection's writer
    /// task only.
    pub async fn drain(&self, max_bytes: usize) -> Drained {
        loop {
            // Register interest before checking, so a push between the check
            // and the await is not missed.
            let notified = self.wake.notified();
            {
                let mut outbox = self.lock();
                if !outbox.queue.is_empty() || outbox.closing.is_some() {
                    let items = if outbox.total.bytes <= max_bytes {
                        // All of it: take the queue and leave an unallocated
                        // one behind, so an idle connection keeps no buffer.
                        outbox.total = Usage::default();
                        outbox.best_effort = Usage::default();
                        outbox.sync = Usage::default();
                        std::mem::take(&mut outbox.queue)
                    } else {
                        let mut items = VecDeque::new();
                        let mut taken = 0;
                        while taken < max_bytes {
                            let Some(item) = outbox.dequeue() else { break };
                            taken += item.bytes as usize;
                            items.push_back(item);
                        }
                        items
                    };
                    let closing = if outbox.queue.is_empty() {
                        outbox.queue = VecDeque::new();
                        outbox.closing
                    } else {
                        None
                    };
                    drop(outbox);
                    self.space.notify_waiters();
                    return Drained { items, closing };
                }
            }
            notified.await;
        }
    }

    /// Frames currently queued (for tests and metrics).
    pub fn queued(&self) -> usize {
        self.lock().queue.len()
    }

    /// Encoded bytes currently queued, of every kind (for tests and metrics).
    pub fn queued_bytes(&self) -> usize {
        self.lock().total.bytes
    }

    /// Most encoded bytes ever queued at once (for tests).
    pub fn peak_queued_bytes(&self) -> usize {
        self.lock().peak_bytes
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
    /// Registrations refused because a newer connection of the same device
    /// was already registered (a stale login that finished late).
    superseded: AtomicU64,
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
            superseded: AtomicU64::new(0),
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

    /// Registers `conn` unless a newer connection of the same user and
    /// device is registered. Returns the connection that lost, which the
    /// caller kicks: the older one it replaced, or `conn` itself when it is
    /// the older one (its login finished after a newer connection's).
    ///
    /// Connection ids are handed out after auth in increasing order, so the
    /// higher id is the newer connection, whatever order logins finish in.
    pub fn register(&self, conn: Arc<Conn>) -> Option<Arc<Conn>> {
        let mut shard = self.shard(conn.user());
        let devices = shard.entry(conn.user().clone()).or_default();
        if let Some(slot) = devices.iter_mut().find(|c| c.device() == conn.device()) {
            if slot.id() > conn.id() {
                self.superseded.fetch_add(1, Ordering::Relaxed);
                return Some(conn);
            }
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

    /// How many logins found a newer connection of their device registered
    /// (and were kicked instead of it).
    pub fn superseded(&self) -> u64 {
        self.superseded.load(Ordering::Relaxed)
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
        let drained = c.drain(usize::MAX).await;
        assert_eq!(drained.len(), 5, "4 queued + the error frame");
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
        let drained = c.drain(usize::MAX).await;
        assert_eq!(drained.len(), 2);
        assert_eq!(drained.closing, None);
        assert_eq!(c.lock().queue.capacity(), 0);
    }

    fn limited(frames: usize, bytes: usize) -> Arc<Conn> {
        Conn::with_limits(
            1,
            "alice".into(),
            "phone".into(),
            OutboxLimits { frames, bytes },
        )
    }

    /// A frame of about `len` bytes on the wire.
    fn big(len: usize) -> Frame {
        Frame::from(proto::Error {
            message: "x".repeat(len - 8),
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn the_byte_bound_closes_with_slow_consumer() {
        let c = limited(1024, 10_000);
        for _ in 0..4 {
            c.push(big(2000)).unwrap();
        }
        assert!(c.queued_bytes() <= 10_000);
        assert_eq!(c.push(big(2500)), Err(PushError::SlowConsumer));
        assert!(
            c.peak_queued_bytes() <= 10_000,
            "the refused frame is not queued"
        );
        let drained = c.drain(usize::MAX).await;
        assert_eq!(drained.len(), 5, "4 queued + the error frame");
    }

    #[tokio::test]
    async fn a_drain_takes_a_bounded_chunk_and_closes_only_at_the_end() {
        let c = limited(1024, 100_000);
        for _ in 0..10 {
            c.push(big(1000)).unwrap();
        }
        c.close(CloseReason::Disconnected, None);
        let first = c.drain(2500).await;
        assert_eq!(first.len(), 3, "until the chunk is reached");
        assert_eq!(first.closing, None, "frames remain");
        assert!(c.queued_bytes() > 0 && c.queued() == 7);
        let rest = c.drain(usize::MAX).await;
        assert_eq!(rest.len(), 7);
        assert_eq!(rest.closing, Some(CloseReason::Disconnected));
        assert_eq!(c.queued_bytes(), 0);
    }

    #[tokio::test]
    async fn best_effort_frames_use_a_share_and_never_cause_slow_consumer() {
        let c = limited(64, 80_000);
        let typing = || {
            Frame::from(proto::Typing {
                typing: true,
                from: "bob".into(),
                ..Default::default()
            })
        };
        let queued = (0..1000)
            .filter(|_| c.try_push_best_effort(typing()))
            .count();
        assert_eq!(queued, 64 / BEST_EFFORT_SHARE, "the frame share");
        // Real frames still get the whole bound.
        for _ in 0..64 {
            c.push(Frame::from(proto::Ping { nonce: 1 })).unwrap();
        }
        assert_eq!(
            c.push(Frame::from(proto::Ping { nonce: 1 })),
            Err(PushError::SlowConsumer)
        );
        // The byte share, with bigger frames.
        let c = limited(1024, 80_000);
        let queued = (0..1000)
            .filter(|_| c.try_push_best_effort(big(1000)))
            .count();
        assert_eq!(queued, 9, "80,000 / 8 bytes, at 1,002 bytes each");
        for _ in 0..79 {
            c.push(big(1000)).unwrap();
        }
    }

    #[test]
    fn typing_is_rate_limited_per_connection() {
        let c = limited(16, 10_000);
        let other = limited(16, 10_000);
        let allowed = (0..100).filter(|_| c.typing_allowed()).count();
        // The window may turn over once during the loop.
        assert!(
            (TYPING_PER_SEC as usize..=2 * TYPING_PER_SEC as usize).contains(&allowed),
            "{allowed}"
        );
        assert!(other.typing_allowed(), "per connection");
    }

    #[tokio::test]
    async fn the_reader_waits_for_in_flight_requests_and_queued_bytes() {
        let c = limited(1024, 20_000);
        // Nothing queued, nothing in flight: any request may go.
        c.wait_for_room(50_000).await;
        let slots: Vec<RequestSlot> = (0..MAX_IN_FLIGHT).map(|_| c.begin_request(10)).collect();
        assert_eq!(c.in_flight(), MAX_IN_FLIGHT);
        let wait = c.wait_for_room(10);
        tokio::pin!(wait);
        assert!(
            futures_poll(&mut wait).is_pending(),
            "{MAX_IN_FLIGHT} requests in flight"
        );
        drop(slots);
        assert!(futures_poll(&mut wait).is_ready());

        // Above the watermark (half the byte bound): wait for the writer.
        for _ in 0..6 {
            c.push(big(2000)).unwrap();
        }
        let wait = c.wait_for_room(10);
        tokio::pin!(wait);
        assert!(futures_poll(&mut wait).is_pending());
        let _ = c.drain(4000).await;
        assert!(futures_poll(&mut wait).is_ready(), "8,000 + 10 ≤ 10,000");
        let _ = c.drain(usize::MAX).await;

        // A reservation counts as if its reply were queued.
        let slot = c.begin_request(9_000);
        let wait = c.wait_for_room(2_000);
        tokio::pin!(wait);
        assert!(futures_poll(&mut wait).is_pending());
        drop(slot);
        assert!(futures_poll(&mut wait).is_ready());
    }

    #[tokio::test]
    async fn the_reader_also_waits_on_queued_frames() {
        let c = limited(64, 1 << 20);
        for _ in 0..28 {
            c.push(Frame::from(proto::Ping { nonce: 1 })).unwrap();
        }
        // 28 queued + 2 for this request = 30 ≤ 32: room.
        c.wait_for_room(10).await;
        let slot = c.begin_request(10);
        // 28 + 2 × 2 = 32: still room; with two in flight, no more.
        c.wait_for_room(10).await;
        let slot2 = c.begin_request(10);
        let wait = c.wait_for_room(10);
        tokio::pin!(wait);
        assert!(
            futures_poll(&mut wait).is_pending(),
            "28 + 2 × 3 > 32 frames"
        );
        drop((slot, slot2));
        assert!(futures_poll(&mut wait).is_ready());
    }

    /// Polls `f` once.
    fn futures_poll<F: std::future::Future + Unpin>(f: &mut F) -> std::task::Poll<F::Output> {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        std::pin::Pin::new(f).poll(&mut cx)
    }

    #[test]
    fn an_older_connection_that_registers_late_loses() {
        let s = Sessions::new();
        let older = conn(&s, "alice", "phone");
        let newer = conn(&s, "alice", "phone");
        assert!(older.id() < newer.id());
        // The newer login finishes first.
        assert!(s.register(newer.clone()).is_none());
        // The older one's comes late: it is the one to kick.
        let loser = s.register(older.clone()).expect("someone loses");
        assert_eq!(loser.id(), older.id());
        assert_eq!(s.superseded(), 1);
        let now = s.connections("alice");
        assert_eq!(now.len(), 1);
        assert_eq!(now[0].id(), newer.id(), "the newest stays registered");
        assert!(!s.unregister(&older), "its close leaves the newer one");
        assert_eq!(s.online(), 1);
    }
}
