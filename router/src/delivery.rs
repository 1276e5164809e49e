//! After a batch is durable: acks and replies to requesters, and the
//! fan-out of inbox entries to every online connection of every target.
//!
//! This runs on the committer's delivery thread, one durable batch after
//! another, so entries reach outboxes in commit order, which is seq order
//! for every user. It never blocks: a push is a short lock and a
//! `VecDeque::push_back`, and an entry is encoded once per fan-out, however
//! many recipients it has.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use bytes::Bytes;
use ferry_protocol::proto;
use ferry_protocol::{ErrorCode, Frame, LENGTH_PREFIX_BYTES};
use ferry_storage::{Fanout, Group, Outcome, Storage};
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
}

pub(crate) struct Shared {
    pub sessions: Sessions,
    /// `ferry_deliveries_total`, resolved once (as are the next two).
    pub deliveries: metrics::Counter,
    /// `ferry_sync_pages_total`.
    pub sync_pages: metrics::Counter,
    /// `ferry_send_ack_seconds`: from taking a Send in to queueing its ack.
    pub send_ack_seconds: metrics::Histogram,
    pub storage: Arc<Storage>,
    pub max_frame_bytes: usize,
    pub runtime: tokio::runtime::Handle,
    pub stopping: AtomicBool,
}

impl Shared {
    pub fn new(
        storage: Arc<Storage>,
        max_frame_bytes: usize,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        Shared {
            sessions: Sessions::new(),
            deliveries: metrics::counter!("ferry_deliveries_total"),
            sync_pages: metrics::counter!("ferry_sync_pages_total"),
            send_ack_seconds: metrics::histogram!("ferry_send_ack_seconds"),
            storage,
            max_frame_bytes,
            runtime,
            stopping: AtomicBool::new(false),
        }
    }

    /// The committer's sink.
    pub fn committed(self: &Arc<Self>, results: Vec<(Reply, Outcome)>) {
        for (reply, outcome) in results {
            self.complete(reply, outcome);
        }
    }

    fn complete(self: &Arc<Self>, reply: Reply, outcome: Outcome) {
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
    /// every target.
    fn deliver(self: &Arc<Self>, fanout: &Fanout) {
        let shared = Bytes::from(fanout.entry.encode_to_vec());
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
        | Outcome::Applied { fanouts } => Some(fanouts),
        Outcome::Refused(_) | Outcome::Failed(_) => None,
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
        Reply::None | Reply::Admin(_) => {}
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

/// Splits `entries` into runs that each fit in one frame, with room for a
/// page's other fields. Always at least one run (maybe empty).
pub fn chunk_entries(
    entries: Vec<proto::Deliver>,
    max_frame_bytes: usize,
) -> Vec<Vec<proto::Deliver>> {
    let budget = max_frame_bytes.saturating_sub(64 + LENGTH_PREFIX_BYTES);
    let mut chunks = Vec::new();
    let mut current = Vec::new();
    let mut used = 0;
    for entry in entries {
        let len = entry.encoded_len();
        let len = len + 1 + prost::encoding::encoded_len_varint(len as u64);
        if used + len > budget && !current.is_empty() {
            chunks.push(std::mem::take(&mut current));
            used = 0;
        }
        used += len;
        current.push(entry);
    }
    chunks.push(current);
    chunks
}

/// The first frame's worth of `entries`, and whether anything was cut.
pub fn fit_entries(
    entries: Vec<proto::Deliver>,
    max_frame_bytes: usize,
) -> (Vec<proto::Deliver>, bool) {
    let mut chunks = chunk_entries(entries, max_frame_bytes).into_iter();
    let first = chunks.next().unwrap_or_default();
    (first, chunks.next().is_some())
}

/// Streams `conn`'s missed entries from storage as SyncBatch frames, until
/// it has caught up with everything committed; then live pushes resume.
pub(crate) fn spawn_sync(shared: Arc<Shared>, conn: Arc<Conn>) {
    shared.runtime.clone().spawn(run_sync(shared, conn));
}

async fn run_sync(shared: Arc<Shared>, conn: Arc<Conn>) {
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
        let last_seq = page.last_seq;
        let page_is_last = !page.has_more;
        shared.sync_pages.increment(1);
        let result = conn.push_sync_page(last_seq, page_is_last, |has_more| {
            let chunks = chunk_entries(page.entries, max);
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
