//! After a batch is durable: acks and replies to requesters, and the
//! fan-out of inbox entries to every online connection of every target.
//!
//! This runs on the committer's delivery thread, one durable batch after
//! another, so entries reach outboxes in commit order, which is seq order
//! for every user. It never blocks: a push is a short lock and a
//! `VecDeque::push_back`, and an entry is encoded once per fan-out, however
//! many recipients it has.
//!
//! It also owns the rule that no stored entry can wedge a device: an entry
//! too large to go out in one frame (stored under a larger
//! `max_frame_bytes`, or by a bug) is sent as an `ENTRY_KIND_OMITTED`
//! placeholder with the same seq ([`omitted`]), live and in every page, so
//! the device's cursor moves past it instead of the connection closing on
//! every login.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use bytes::Bytes;
use ferry_protocol::proto;
use ferry_protocol::{ErrorCode, Frame, LENGTH_PREFIX_BYTES};
use ferry_storage::{Fanout, Group, LinkOut, LinkOutcome, Outcome, Storage};
use prost::Message;
use tokio::sync::oneshot;

use crate::SYNC_PAGE;
use crate::error_frame;
use crate::session::{Conn, LivePush, RequestSlot, Sessions};

/// Where the outcome of a write goes.
pub enum Reply {
    /// Nobody waits (acks, receipts).
    None,
    /// A Send: SendAck or Error with this client msg id.
    Send {
        /// The sending connection.
        conn: Arc<Conn>,
        /// The Send's client msg id.
        client_msg_id: u64,
        /// When the Send was taken in (for `ferry_send_ack_seconds`).
        received: std::time::Instant,
        /// The sender's request slot, released once the ack is queued.
        slot: Option<RequestSlot>,
    },
    /// A request with a request id: RecallAck / GroupReply, or Error.
    Request {
        /// The requesting connection.
        conn: Arc<Conn>,
        /// The request id.
        request_id: u64,
        /// The requester's request slot, released once the reply is queued.
        slot: Option<RequestSlot>,
    },
    /// The admin API waits for the outcome itself.
    Admin(oneshot::Sender<Outcome>),
    /// A peer's link batch (cluster mode): the bus FINs its NSQ message
    /// once told the outcome.
    Link(LinkTag),
}

/// A peer's link batch in flight through the committer (cluster mode).
/// Only the bus makes them.
pub struct LinkTag {
    /// The peer it came from.
    pub(crate) origin: ferry_storage::NodeId,
    /// Its link epoch.
    pub(crate) epoch: u64,
    /// Its seq.
    pub(crate) seq: u64,
    /// The NSQ message, FINed or REQueued by the bus.
    pub(crate) delivery: ferry_nsq::Delivery,
    /// Where the outcome goes (the bus's consumer task).
    pub(crate) done: tokio::sync::mpsc::UnboundedSender<crate::bus::inbound::LinkDone>,
}

/// The delivery side of the router: the session registry, the storage it
/// reads sync pages from, and the metrics of delivery. Shared by the router
/// (requests) and the committer's sink (durable batches).
pub(crate) struct Hub {
    pub sessions: Sessions,
    /// `ferry_deliveries_total`, resolved once (as are the next two).
    pub deliveries: metrics::Counter,
    /// `ferry_sync_pages_total`.
    pub sync_pages: metrics::Counter,
    /// `ferry_send_ack_seconds`: from taking a Send in to queueing its ack.
    pub send_ack_seconds: metrics::Histogram,
    /// `ferry_entries_omitted_total`: entries sent as OMITTED placeholders.
    pub omitted: metrics::Counter,
    pub storage: Arc<Storage>,
    pub max_frame_bytes: usize,
    pub runtime: tokio::runtime::Handle,
    pub stopping: AtomicBool,
    /// The cluster bus, in cluster mode: link batches go to its publishers.
    pub bus: std::sync::OnceLock<Arc<crate::bus::Bus>>,
}

impl Hub {
    pub fn new(
        storage: Arc<Storage>,
        max_frame_bytes: usize,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        Hub {
            sessions: Sessions::new(),
            deliveries: metrics::counter!("ferry_deliveries_total"),
            sync_pages: metrics::counter!("ferry_sync_pages_total"),
            send_ack_seconds: metrics::histogram!("ferry_send_ack_seconds"),
            omitted: metrics::counter!("ferry_entries_omitted_total"),
            storage,
            max_frame_bytes,
            runtime,
            stopping: AtomicBool::new(false),
            bus: std::sync::OnceLock::new(),
        }
    }

    /// The committer's sink: link batches for peers first (their
    /// publishers run on their own tasks), then replies and fan-out.
    pub fn committed(self: &Arc<Self>, results: Vec<(Reply, Outcome)>, links: Vec<LinkOut>) {
        if !links.is_empty() {
            match self.bus.get() {
                Some(bus) => bus.committed(links),
                None => tracing::error!("link batches committed without a bus"),
            }
        }
        for (reply, outcome) in results {
            self.complete(reply, outcome);
        }
    }

    fn complete(self: &Arc<Self>, reply: Reply, outcome: Outcome) {
        if let Reply::Link(LinkTag {
            origin,
            epoch,
            seq,
            delivery,
            done,
        }) = reply
        {
            use crate::bus::inbound::{LinkDone, LinkResult};
            let result = match outcome {
                Outcome::Link(LinkOutcome::Applied { fanouts, .. }) => {
                    self.deliver_all(&fanouts);
                    LinkResult::Applied
                }
                Outcome::Link(LinkOutcome::NotNext) => LinkResult::NotNext,
                Outcome::Link(LinkOutcome::Skipped(why)) => {
                    tracing::error!(peer = origin, seq, %why, "a link batch was skipped");
                    LinkResult::Applied
                }
                Outcome::Link(LinkOutcome::Dropped) => LinkResult::Dropped,
                Outcome::Failed(_) => LinkResult::Failed,
                other => {
                    tracing::error!(
                        peer = origin,
                        seq,
                        ?other,
                        "unexpected outcome of a link batch"
                    );
                    LinkResult::Failed
                }
            };
            let _ = done.send(LinkDone {
                origin,
                epoch,
                seq,
                delivery,
                result,
            });
            return;
        }
        if let Reply::Admin(tx) = reply {
            if let Some(fanouts) = fanouts_of(&outcome) {
                self.deliver_all(fanouts);
            }
            let _ = tx.send(outcome);
            return;
        }
        match outcome {
            Outcome::Sent { ack, fanouts, .. } => {
                if let Reply::Send { conn, received, .. } = &reply {
                    // The ack goes first: the sender's own copy follows it.
                    let _ = conn.push(Frame::from(ack));
                    self.send_ack_seconds.record(received.elapsed());
                }
                self.deliver_all(&fanouts);
            }
            Outcome::Recalled { msg_id, fanouts } => {
                if let Reply::Request {
                    conn, request_id, ..
                } = &reply
                {
                    let _ = conn.push(Frame::from(proto::RecallAck {
                        request_id: *request_id,
                        msg_id,
                    }));
                }
                self.deliver_all(&fanouts);
            }
            Outcome::GroupChanged {
                group,
                group_id,
                fanouts,
            } => {
                if let Reply::Request {
                    conn, request_id, ..
                } = &reply
                {
                    let frame = match &group {
                        Some(g) => {
                            let mut reply = group_reply(*request_id, g);
                            // A big group's member list does not fit in one
                            // frame; the change succeeded, so reply without it.
                            if reply.encoded_len() + 64 > self.max_frame_bytes {
                                reply.members.clear();
                            }
                            reply
                        }
                        None => proto::GroupReply {
                            request_id: *request_id,
                            group_id,
                            ..Default::default()
                        },
                    };
                    let _ = conn.push(Frame::from(frame));
                }
                self.deliver_all(&fanouts);
            }
            Outcome::Applied { fanouts } => self.deliver_all(&fanouts),
            Outcome::Link(_) => {}
            Outcome::Refused(refusal) => reply_error(&reply, refusal.code, refusal.message),
            Outcome::Failed(message) => {
                tracing::warn!(%message, "write failed");
                reply_error(
                    &reply,
                    ErrorCode::Unavailable,
                    "storage write failed, retry".into(),
                )
            }
        }
    }

    fn deliver_all(self: &Arc<Self>, fanouts: &[Fanout]) {
        for fanout in fanouts {
            self.deliver(fanout);
        }
    }

    /// Encodes the entry once and pushes it to every online connection of
    /// every target. An entry whose `Deliver` frame would not fit in one
    /// frame goes out as its OMITTED placeholder (the stored entry stays;
    /// a sync under a larger frame size would still carry it).
    fn deliver(self: &Arc<Self>, fanout: &Fanout) {
        let mut encoded = fanout.entry.encode_to_vec();
        if !live_entry_fits(encoded.len(), self.max_frame_bytes) {
            self.omitted.increment(1);
            tracing::warn!(
                msg_id = fanout.entry.msg_id,
                bytes = encoded.len(),
                "entry too large for a frame: pushed as OMITTED"
            );
            encoded = omitted(&fanout.entry).encode_to_vec();
        }
        let shared = Bytes::from(encoded);
        self.deliveries.increment(fanout.targets.len() as u64);
        for (user, seq) in &fanout.targets {
            self.sessions.for_each_connection(user, |conn| {
                if conn.push_entry(*seq, &shared) == LivePush::NeedsSync {
                    spawn_sync(self.clone(), conn.clone());
                }
            });
        }
    }
}

fn fanouts_of(outcome: &Outcome) -> Option<&[Fanout]> {
    match outcome {
        Outcome::Sent { fanouts, .. }
        | Outcome::Recalled { fanouts, .. }
        | Outcome::GroupChanged { fanouts, .. }
        | Outcome::Applied { fanouts }
        | Outcome::Link(LinkOutcome::Applied { fanouts, .. }) => Some(fanouts),
        Outcome::Refused(_) | Outcome::Failed(_) | Outcome::Link(_) => None,
    }
}

fn reply_error(reply: &Reply, code: ErrorCode, message: String) {
    match reply {
        Reply::Send {
            conn,
            client_msg_id,
            ..
        } => {
            let _ = conn.push(error_frame(code, message, 0, *client_msg_id));
        }
        Reply::Request {
            conn, request_id, ..
        } => {
            let _ = conn.push(error_frame(code, message, *request_id, 0));
        }
        Reply::None | Reply::Admin(_) | Reply::Link(_) => {}
    }
}

/// The reply describing `group`.
pub fn group_reply(request_id: u64, group: &Group) -> proto::GroupReply {
    proto::GroupReply {
        request_id,
        group_id: group.id.to_string(),
        members: group
            .members
            .iter()
            .map(|m| proto::GroupMember {
                user_id: m.to_string(),
                role: group.role(m).unwrap_or(proto::GroupRole::Member) as i32,
            })
            .collect(),
        name: group.meta.name.clone(),
        has_more: false,
    }
}

/// The placeholder sent instead of `entry` when `entry` cannot fit in one
/// frame: kind `OMITTED`, the same seq, msg_id, from, conversation,
/// server_time_ms, ref_msg_id and client_msg_id, and no content_type, body
/// or group_event. A few hundred bytes at most (ids are at most 64 bytes),
/// so it fits in the smallest frame a server may be configured with.
pub fn omitted(entry: &proto::Deliver) -> proto::Deliver {
    proto::Deliver {
        seq: entry.seq,
        msg_id: entry.msg_id,
        from: entry.from.clone(),
        conversation: entry.conversation.clone(),
        server_time_ms: entry.server_time_ms,
        kind: proto::EntryKind::Omitted as i32,
        ref_msg_id: entry.ref_msg_id,
        client_msg_id: entry.client_msg_id,
        ..Default::default()
    }
}

/// Whether a live `Deliver` frame built from an entry encoded (without its
/// seq) in `encoded_len` bytes fits in `max_frame_bytes`, whatever seq the
/// writer splices in (at most 11 bytes: a tag and a 10-byte varint).
pub fn live_entry_fits(encoded_len: usize, max_frame_bytes: usize) -> bool {
    let inner = encoded_len + 11;
    1 + prost::encoding::encoded_len_varint(inner as u64) + inner <= max_frame_bytes
}

/// Room a page (`SyncBatch`, `HistoryPage`) leaves in a frame for entries.
fn page_budget(max_frame_bytes: usize) -> usize {
    max_frame_bytes.saturating_sub(64 + LENGTH_PREFIX_BYTES)
}

/// Splits `entries` into runs that each fit in one frame, with room for a
/// page's other fields. Always at least one run (maybe empty). An entry
/// that cannot fit in a frame on its own is replaced by its [`omitted`]
/// placeholder, so that a page never carries what the writer cannot
/// encode; the second value counts them.
pub fn chunk_entries(
    entries: Vec<proto::Deliver>,
    max_frame_bytes: usize,
) -> (Vec<Vec<proto::Deliver>>, usize) {
    let budget = page_budget(max_frame_bytes);
    let mut chunks = Vec::new();
    let mut current = Vec::new();
    let mut used = 0;
    let mut omissions = 0;
    let framed = |entry: &proto::Deliver| {
        let len = entry.encoded_len();
        len + 1 + prost::encoding::encoded_len_varint(len as u64)
    };
    for mut entry in entries {
        let mut len = framed(&entry);
        if len > budget {
            tracing::warn!(
                seq = entry.seq,
                msg_id = entry.msg_id,
                bytes = len,
                "entry too large for a frame: sent as OMITTED"
            );
            entry = omitted(&entry);
            len = framed(&entry);
            omissions += 1;
        }
        if used + len > budget && !current.is_empty() {
            chunks.push(std::mem::take(&mut current));
            used = 0;
        }
        used += len;
        current.push(entry);
    }
    chunks.push(current);
    (chunks, omissions)
}

/// The first frame's worth of `entries` (oversized ones as placeholders,
/// see [`chunk_entries`]), whether anything was cut, and how many entries
/// were replaced by placeholders.
pub fn fit_entries(
    entries: Vec<proto::Deliver>,
    max_frame_bytes: usize,
) -> (Vec<proto::Deliver>, bool, usize) {
    let (chunks, omissions) = chunk_entries(entries, max_frame_bytes);
    let mut chunks = chunks.into_iter();
    let first = chunks.next().unwrap_or_default();
    (first, chunks.next().is_some(), omissions)
}

/// Streams `conn`'s missed entries from storage as SyncBatch frames, until
/// it has caught up with everything committed; then live pushes resume.
pub(crate) fn spawn_sync(shared: Arc<Hub>, conn: Arc<Conn>) {
    shared.runtime.clone().spawn(run_sync(shared, conn));
}

async fn run_sync(shared: Arc<Hub>, conn: Arc<Conn>) {
    let pace = conn.limits().watermark();
    loop {
        let after = conn.delivered();
        let storage = shared.storage.clone();
        let user = conn.user().clone();
        let page =
            match tokio::task::spawn_blocking(move || storage.read_inbox(&user, after, SYNC_PAGE))
                .await
            {
                Ok(Ok(page)) => page,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "sync read failed");
                    conn.close(
                        crate::session::CloseReason::Code(ErrorCode::Internal),
                        Some(Frame::closing_error(
                            ErrorCode::Internal,
                            "sync failed; reconnect",
                        )),
                    );
                    return;
                }
                Err(_) => return,
            };
        let max = shared.max_frame_bytes;
        // A page is read by entry count; what it queues at once is bounded
        // by bytes too (half the queue's byte bound, at least one frame), so
        // a sync adds at most that much beyond the watermark it waits for.
        let (entries, last_seq, page_is_last) =
            cut_page_to_bytes(page.entries, page.last_seq, !page.has_more, pace.max(max));
        shared.sync_pages.increment(1);
        let result = conn.push_sync_page(last_seq, page_is_last, |has_more| {
            let (chunks, omissions) = chunk_entries(entries, max);
            shared.omitted.increment(omissions as u64);
            let count = chunks.len();
            chunks
                .into_iter()
                .enumerate()
                .map(|(i, entries)| {
                    Frame::from(proto::SyncBatch {
                        request_id: 0,
                        entries,
                        has_more: i + 1 < count || has_more,
                        max_seq: last_seq,
                    })
                })
                .collect()
        });
        match result {
            Ok(true) | Err(_) => return,
            Ok(false) => conn.wait_below_bytes(pace).await,
        }
    }
}

/// Keeps the first entries of a sync page whose encoded sizes add up to at
/// most `budget` bytes (always at least one). When entries are cut, the page
/// ends at the last one kept: its seq becomes the page's last seq, and the
/// page is not the last one (the rest is read again next).
fn cut_page_to_bytes(
    mut entries: Vec<proto::Deliver>,
    last_seq: u64,
    page_is_last: bool,
    budget: usize,
) -> (Vec<proto::Deliver>, u64, bool) {
    let mut used = 0;
    let keep = entries
        .iter()
        .position(|entry| {
            used += entry.encoded_len();
            used > budget
        })
        .map_or(entries.len(), |cut| cut.max(1));
    if keep == entries.len() {
        return (entries, last_seq, page_is_last);
    }
    entries.truncate(keep);
    let last_kept = entries.last().map_or(last_seq, |e| e.seq);
    (entries, last_kept, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sync_page_is_cut_to_its_byte_budget_and_ends_at_the_last_entry_kept() {
        let page: Vec<proto::Deliver> = (1..=10).map(|seq| entry(seq, 1000)).collect();
        let one = page[0].encoded_len();
        // Everything fits: the page is untouched.
        let (kept, last, is_last) = cut_page_to_bytes(page.clone(), 12, true, 100 * one);
        assert_eq!((kept.len(), last, is_last), (10, 12, true));
        // Three fit: the page ends at seq 3 and is not the last one.
        let (kept, last, is_last) = cut_page_to_bytes(page.clone(), 12, true, 3 * one + 1);
        assert_eq!((kept.len(), last, is_last), (3, 3, false));
        // Not even one fits: one is kept, so the sync always moves on.
        let (kept, last, is_last) = cut_page_to_bytes(page, 12, true, 10);
        assert_eq!((kept.len(), last, is_last), (1, 1, false));
    }

    fn entry(seq: u64, body_len: usize) -> proto::Deliver {
        proto::Deliver {
            seq,
            msg_id: 1000 + seq,
            from: "alice".into(),
            conversation: Some(proto::Conversation {
                kind: proto::ConversationKind::Direct as i32,
                id: "bob".into(),
            }),
            content_type: "text/plain".into(),
            body: vec![b'x'; body_len].into(),
            server_time_ms: 7,
            kind: proto::EntryKind::Message as i32,
            client_msg_id: 3,
            ..Default::default()
        }
    }

    #[test]
    fn an_entry_larger_than_a_frame_becomes_a_placeholder_in_place() {
        let entries = vec![entry(1, 10), entry(2, 5000), entry(3, 10)];
        let (chunks, omissions) = chunk_entries(entries, 2048);
        assert_eq!(omissions, 1);
        let all: Vec<proto::Deliver> = chunks.concat();
        assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
        let placeholder = &all[1];
        assert_eq!(placeholder.kind(), proto::EntryKind::Omitted);
        assert_eq!(placeholder.msg_id, 1002);
        assert_eq!(placeholder.from, "alice");
        assert_eq!(placeholder.client_msg_id, 3);
        assert!(placeholder.body.is_empty() && placeholder.content_type.is_empty());
        for chunk in chunks {
            let page = Frame::from(proto::SyncBatch {
                request_id: u64::MAX,
                entries: chunk,
                has_more: true,
                max_seq: u64::MAX,
            });
            assert!(page.encoded_len() <= 2048);
        }
    }

    #[test]
    fn live_fit_allows_for_the_largest_seq() {
        let max = 2048;
        let fits = (0..max).rev().find(|&n| live_entry_fits(n, max)).unwrap();
        // The largest shared encoding (seq 0, as fan-out encodes it) that fits.
        let mut e = entry(0, 0);
        let body = (0..max)
            .rev()
            .find(|&n| {
                e.body = vec![b'x'; n].into();
                e.encoded_len() <= fits
            })
            .unwrap();
        e.body = vec![b'x'; body].into();
        assert!(fits - e.encoded_len() <= 2, "close to the bound");
        // The writer's frame: Frame{deliver} with the largest seq spliced in.
        e.seq = u64::MAX;
        assert!(Frame::from(e.clone()).encoded_len() <= max);
        assert!(!live_entry_fits(fits + 1, max));
        assert!(live_entry_fits(
            omitted(&entry(1, 60_000)).encoded_len(),
            max
        ));
    }
}
