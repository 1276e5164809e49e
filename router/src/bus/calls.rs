//! Calls (docs/CLUSTER.md §2.3): client requests about a group, forwarded
//! by the user's home node to the group's owner, and their replies.
//!
//! The calling side keeps a table of pending calls (the requesting
//! connection, its request slot, the ids an error must echo) and answers
//! `UNAVAILABLE` when no reply comes within the call timeout: calls are not
//! durable, the client retries, and a retried `Send` is deduplicated by the
//! owner. The answering side handles the frame as if the user had sent it
//! on a connection of this node ([`super::Bus`] gives it a connection that
//! is never registered, so nothing is ever delivered to it), and sends back
//! the first frame the router writes to it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferry_protocol::{ErrorCode, Frame};
use prost::Message;

use crate::error_frame;
use crate::session::{Conn, RequestSlot};

/// A call waiting for its reply.
/// What a forwarded request needs to answer its connection when the
/// owner's reply (or the timeout) comes back.
pub(crate) struct Waiter {
    /// Held until the answer, so the connection's in-flight cap counts it.
    pub slot: Option<RequestSlot>,
    /// Echoed in the answer or the timeout error.
    pub request_id: u64,
    /// Echoed in the answer or the timeout error (sends).
    pub client_msg_id: u64,
}

struct PendingCall {
    conn: Arc<Conn>,
    /// Released when the reply (or the timeout's error) is queued.
    _slot: Option<RequestSlot>,
    request_id: u64,
    client_msg_id: u64,
    deadline: Instant,
}

/// The calling side: pending calls and their timeouts.
pub(crate) struct Calls {
    next_id: AtomicU64,
    pending: Mutex<HashMap<u64, PendingCall>>,
    timeout: Duration,
    timeouts: metrics::Counter,
}

impl Calls {
    pub fn new(timeout: Duration) -> Calls {
        Calls {
            // Unique per process: a reply to a call of a previous process
            // (same node, restarted) finds nothing.
            next_id: AtomicU64::new(ferry_storage::now_ms() << 20),
            pending: Mutex::new(HashMap::new()),
            timeout,
            timeouts: metrics::counter!("ferry_bus_call_timeouts_total"),
        }
    }

    /// Registers a call whose reply goes to `conn`; its id.
    pub fn register(&self, conn: Arc<Conn>, waiter: Waiter) -> u64 {
        let Waiter {
            slot,
            request_id,
            client_msg_id,
        } = waiter;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.pending.lock().expect("not poisoned").insert(
            id,
            PendingCall {
                conn,
                _slot: slot,
                request_id,
                client_msg_id,
                deadline: Instant::now() + self.timeout,
            },
        );
        id
    }

    /// Forgets a call that could not be published; `conn` gets `UNAVAILABLE`.
    pub fn abandon(&self, id: u64, why: &str) {
        let call = self.pending.lock().expect("not poisoned").remove(&id);
        if let Some(call) = call {
            let _ = call.conn.push(error_frame(
                ErrorCode::Unavailable,
                format!("{why}; retry"),
                call.request_id,
                call.client_msg_id,
            ));
        }
    }

    /// A reply came: its frame goes to the waiting connection. A reply
    /// after the timeout (or to another process) is dropped.
    pub fn complete(&self, id: u64, frame: &[u8]) {
        let call = self.pending.lock().expect("not poisoned").remove(&id);
        let Some(call) = call else { return };
        match Frame::decode(frame) {
            Ok(frame) => {
                let _ = call.conn.push(frame);
            }
            Err(e) => {
                tracing::warn!(error = %e, "a call reply is not a frame");
                let _ = call.conn.push(error_frame(
                    ErrorCode::Internal,
                    "the group's node sent an unreadable reply".into(),
                    call.request_id,
                    call.client_msg_id,
                ));
            }
        }
    }

    /// Answers every call past its deadline with `UNAVAILABLE`.
    pub fn expire(&self, now: Instant) {
        let expired: Vec<PendingCall> = {
            let mut pending = self.pending.lock().expect("not poisoned");
            let ids: Vec<u64> = pending
                .iter()
                .filter(|(_, c)| c.deadline <= now)
                .map(|(id, _)| *id)
                .collect();
            ids.into_iter()
                .filter_map(|id| pending.remove(&id))
                .collect()
        };
        for call in expired {
            self.timeouts.increment(1);
            let _ = call.conn.push(error_frame(
                ErrorCode::Unavailable,
                "the node that owns this group did not answer in time; retry".into(),
                call.request_id,
                call.client_msg_id,
            ));
        }
    }
}
