//! The gateway's metrics, through the `metrics` facade.
//!
//! Per-frame counters are resolved to handles once (the first time they are
//! used, after the exporter is installed) and then incremented with an
//! atomic add: nothing on the per-frame path takes a lock or hashes a label.

use std::sync::LazyLock;

use ferry_protocol::ErrorCode;
use ferry_router::session::CloseReason;
use metrics::{Counter, Gauge, counter, gauge};

const KINDS: &[&str] = &[
    "auth",
    "auth_ok",
    "ping",
    "pong",
    "send",
    "send_ack",
    "deliver",
    "deliver_ack",
    "sync",
    "sync_batch",
    "recall",
    "recall_ack",
    "read",
    "typing",
    "kick",
    "redirect",
    "error",
    "group_request",
    "group_reply",
    "history",
    "history_page",
    "encoded",
    "empty",
];

struct Handles {
    frames_in: Vec<Counter>,
    frames_out: Vec<Counter>,
    bytes_in: Counter,
    bytes_out: Counter,
    accepted: Counter,
    authenticated: Counter,
    open: Gauge,
}

static HANDLES: LazyLock<Handles> = LazyLock::new(|| Handles {
    frames_in: KINDS
        .iter()
        .map(|k| counter!("ferry_frames_in_total", "kind" => *k))
        .collect(),
    frames_out: KINDS
        .iter()
        .map(|k| counter!("ferry_frames_out_total", "kind" => *k))
        .collect(),
    bytes_in: counter!("ferry_bytes_in_total"),
    bytes_out: counter!("ferry_bytes_out_total"),
    accepted: counter!("ferry_connections_accepted_total"),
    authenticated: counter!("ferry_connections_authenticated_total"),
    open: gauge!("ferry_connections_open"),
});

fn kind_index(kind: &str) -> usize {
    KINDS
        .iter()
        .position(|k| *k == kind)
        .unwrap_or(KINDS.len() - 1)
}

/// Forces the handles to register (so /metrics lists them from the start).
pub fn init() {
    LazyLock::force(&HANDLES);
}

/// One inbound frame of this kind.
pub fn frame_in(kind: &str) {
    HANDLES.frames_in[kind_index(kind)].increment(1);
}

/// One outbound frame of this kind.
pub fn frame_out(kind: &str) {
    HANDLES.frames_out[kind_index(kind)].increment(1);
}

/// Bytes read from clients.
pub fn bytes_in(n: usize) {
    HANDLES.bytes_in.increment(n as u64);
}

/// Bytes written to clients.
pub fn bytes_out(n: usize) {
    HANDLES.bytes_out.increment(n as u64);
}

/// A TCP connection was accepted.
pub fn accepted() {
    HANDLES.accepted.increment(1);
    HANDLES.open.increment(1.0);
}

/// A connection finished (authenticated or not).
pub fn released() {
    HANDLES.open.decrement(1.0);
}

/// A connection authenticated.
pub fn authenticated() {
    HANDLES.authenticated.increment(1);
}

fn code_label(code: ErrorCode) -> &'static str {
    code.as_str_name()
        .strip_prefix("ERROR_CODE_")
        .unwrap_or("UNSPECIFIED")
}

/// A connection was refused before or at auth.
pub fn rejected(code: ErrorCode) {
    counter!("ferry_connections_rejected_total", "reason" => code_label(code)).increment(1);
}

/// The server closed an authenticated connection for breaking a rule.
pub fn closed_for(code: ErrorCode) {
    counter!("ferry_disconnects_total", "reason" => code_label(code)).increment(1);
}

/// An authenticated connection ended.
pub fn connection_closed(reason: CloseReason) {
    let label = match reason {
        CloseReason::Disconnected => "disconnected",
        CloseReason::HeartbeatTimeout => "heartbeat_timeout",
        CloseReason::Code(code) => code_label(code),
    };
    counter!("ferry_connections_closed_total", "reason" => label).increment(1);
}
