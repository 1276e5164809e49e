//! The gateway's metrics, through the `metrics` facade, and the Prometheus
//! recorder that `/metrics` renders.
//!
//! [`install`] puts a `metrics-exporter-prometheus` recorder in place, once
//! per process, with the histogram buckets of every histogram ferry records
//! (the storage and router crates record theirs through the same facade).
//! There is no exporter listener: the ops HTTP server renders the recorder
//! through its [`PrometheusHandle`] on `GET /metrics`, and a small task runs
//! the recorder's upkeep so histogram samples never pile up between scrapes.
//!
//! Per-frame counters are resolved to handles once, after the recorder is
//! installed, and then incremented with an atomic add: nothing on the
//! per-frame path takes a lock or hashes a label. Per-connection events
//! (close reasons, kicks, rejections) use pre-resolved handles too, so
//! every reason shows up at 0 from the first scrape.
//!
//! Process figures (RSS, open descriptors) are read from `/proc/self` when
//! scraped, not sampled in the background.

use std::sync::{LazyLock, OnceLock};
use std::time::Duration;

use ferry_protocol::ErrorCode;
use ferry_router::session::CloseReason;
use metrics::{
    Counter, Gauge, Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::ip_limits::IpRefusal;
use crate::tls::HandshakeFailure;

/// Buckets (seconds) of the latency histograms (`ferry_commit_seconds`,
/// `ferry_commit_apply_seconds`, `ferry_commit_sink_seconds`,
/// `ferry_send_ack_seconds`): from 50 µs (applying a small batch to the
/// memtable) through half a millisecond (a WAL write without fsync) to 5 s
/// (a disk in trouble).
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
];

/// Buckets of `ferry_commit_batch_ops` (ops per group commit): powers of two
/// up to the committer's largest batch.
pub const BATCH_OPS_BUCKETS: [f64; 16] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
    16384.0, 32768.0,
];

/// How often the recorder's upkeep drains histogram samples into buckets.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

static RECORDER: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder as the process's global recorder, once;
/// later calls return the same handle. `None` if another recorder was
/// installed first (an embedding application's): metrics then go there and
/// `/metrics` answers 503.
///
/// Call before anything records a metric: handles resolved earlier stay
/// bound to the no-op recorder.
pub fn install() -> Option<&'static PrometheusHandle> {
    RECORDER
        .get_or_init(|| {
            let latency = [
                "ferry_commit_seconds",
                "ferry_commit_apply_seconds",
                "ferry_commit_sink_seconds",
                "ferry_send_ack_seconds",
                "ferry_bus_confirm_seconds",
            ];
            let builder = latency
                .iter()
                .try_fold(PrometheusBuilder::new(), |b, name| {
                    b.set_buckets_for_metric(Matcher::Full((*name).into()), &LATENCY_BUCKETS)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("ferry_commit_batch_ops".into()),
                        &BATCH_OPS_BUCKETS,
                    )
                })
                .expect("bucket lists are non-empty constants");
            match builder.install_recorder() {
                Ok(handle) => {
                    describe_all();
                    Some(handle)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed; /metrics is disabled");
                    None
                }
            }
        })
        .as_ref()
}

/// Runs the recorder's upkeep every [`UPKEEP_INTERVAL`] until dropped
/// (spawned by the server next to the ops HTTP task).
pub async fn upkeep_loop() {
    let Some(handle) = install() else { return };
    let mut ticks = tokio::time::interval(UPKEEP_INTERVAL);
    loop {
        ticks.tick().await;
        handle.run_upkeep();
    }
}

fn describe_all() {
    describe_gauge!(
        "ferry_connections_open",
        "TCP connections held now, authenticated or not"
    );
    describe_gauge!(
        "ferry_connections_pending_auth",
        "Connections accepted and not yet authenticated (bounded by max_pending_auth)"
    );
    describe_gauge!(
        "ferry_sessions_online",
        "Authenticated connections registered for delivery"
    );
    describe_counter!(
        "ferry_connections_accepted_total",
        "TCP connections accepted (not counting refusals at the connection limit)"
    );
    describe_counter!(
        "ferry_connections_authenticated_total",
        "Connections that completed the Auth handshake"
    );
    describe_counter!(
        "ferry_connections_rejected_total",
        "Connections refused before or at auth, by error code"
    );
    describe_counter!(
        "ferry_connections_closed_total",
        "Authenticated connections that ended, by reason"
    );
    describe_counter!(
        "ferry_kicks_total",
        "Connections closed with a Kick frame, by reason"
    );
    describe_counter!(
        "ferry_heartbeat_timeouts_total",
        "Connections closed for silence (3 x heartbeat_secs)"
    );
    describe_counter!(
        "ferry_frames_in_total",
        "Frames received from authenticated clients, by kind"
    );
    describe_counter!("ferry_frames_out_total", "Frames sent to clients, by kind");
    describe_counter!(
        "ferry_bytes_in_total",
        Unit::Bytes,
        "Frame bytes received from authenticated clients, length prefixes included"
    );
    describe_counter!(
        "ferry_bytes_out_total",
        Unit::Bytes,
        "Bytes written to authenticated clients"
    );
    describe_counter!(
        "ferry_redirects_total",
        "Cluster mode: Auths answered with Redirect, by the user's home node"
    );
    describe_counter!(
        "ferry_tls_handshake_failures_total",
        "TLS port: connections closed before or during the TLS handshake, by reason \
         (not_tls, timeout, alert, incompatible, protocol, closed)"
    );
    describe_counter!(
        "ferry_ip_limit_refusals_total",
        "Connections refused at accept by a per-address limit, by limit \
         (connections_per_ip, connects_per_sec_per_ip, auth_failures_per_ip)"
    );
    describe_counter!(
        "ferry_frame_timeouts_total",
        "Connections closed because a begun frame did not arrive whole within frame_read_timeout_secs"
    );
    describe_counter!(
        "ferry_tls_cert_reloads_total",
        "TLS certificate reloads (SIGHUP), by result (ok, error)"
    );
    describe_counter!(
        "ferry_admin_requests_total",
        "Admin API requests, by HTTP status"
    );
    describe_gauge!(
        "process_resident_memory_bytes",
        Unit::Bytes,
        "Resident set size, read from /proc/self/statm at scrape time"
    );
    describe_gauge!(
        "process_open_fds",
        "Open file descriptors, counted in /proc/self/fd at scrape time"
    );
    describe_gauge!("process_max_fds", "The soft open-file limit");
    describe_counter!(
        "ferry_log_lines_dropped_total",
        "Log lines that could not be written (stderr failing, e.g. on a full disk) and were dropped"
    );
    describe_gauge!(
        "ferry_storage_cache_bytes",
        Unit::Bytes,
        "RocksDB's shared block cache in use, memtable reservations included (bounded by storage_memory_mb)"
    );
    describe_gauge!(
        "ferry_storage_cache_capacity_bytes",
        Unit::Bytes,
        "Capacity of RocksDB's shared block cache: storage_memory_mb"
    );
    describe_gauge!(
        "ferry_storage_cache_entry_bytes",
        Unit::Bytes,
        "RocksDB's block cache by kind of entry (role: data-block, index-block, filter-block, write-buffer: the memtables' reservation, misc), from its census of the cache (redone at a scrape when over 10 s old)"
    );
    describe_gauge!(
        "ferry_storage_memtable_bytes",
        Unit::Bytes,
        "RocksDB memtables, mutable and being flushed (counted inside ferry_storage_cache_bytes)"
    );
    describe_gauge!(
        "ferry_storage_table_readers_bytes",
        Unit::Bytes,
        "RocksDB table readers' memory outside the block cache"
    );
    describe_gauge!(
        "ferry_storage_sst_bytes",
        Unit::Bytes,
        "Live RocksDB table files on disk"
    );
    describe_gauge!(
        "ferry_storage_wal_bytes",
        Unit::Bytes,
        "RocksDB write-ahead log files on disk"
    );
    describe_gauge!(
        "process_start_time_seconds",
        Unit::Seconds,
        "Process start, seconds since the Unix epoch"
    );
    // Recorded by the storage and router crates; described here, where the
    // recorder is.
    describe_histogram!(
        "ferry_commit_seconds",
        Unit::Seconds,
        "Time to write and sync one group-commit batch"
    );
    describe_histogram!(
        "ferry_commit_apply_seconds",
        Unit::Seconds,
        "Time to apply one batch's ops (dedup, seqs, checks) before its write"
    );
    describe_histogram!(
        "ferry_commit_sink_seconds",
        Unit::Seconds,
        "Time to hand one durable batch's acks and fan-out to connection outboxes"
    );
    describe_histogram!(
        "ferry_commit_batch_ops",
        "Ops coalesced into one group-commit batch"
    );
    describe_histogram!(
        "ferry_send_ack_seconds",
        Unit::Seconds,
        "A Send's latency inside the server, up to its SendAck"
    );
    describe_counter!(
        "ferry_deliveries_total",
        "Inbox entries fanned out to recipients (online or not)"
    );
    describe_counter!("ferry_sync_pages_total", "Sync pages served");
    describe_counter!(
        "ferry_entries_omitted_total",
        "Entries too large for a frame, sent as ENTRY_KIND_OMITTED placeholders"
    );
}

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

/// Codes a connection can be refused with before or at auth.
const REJECT_CODES: &[ErrorCode] = &[
    ErrorCode::BadToken,
    ErrorCode::TokenExpired,
    ErrorCode::AuthTimeout,
    ErrorCode::AuthRequired,
    ErrorCode::UnsupportedVersion,
    ErrorCode::FrameTooLarge,
    ErrorCode::MalformedFrame,
    ErrorCode::BadAuth,
    ErrorCode::TokenRevoked,
    ErrorCode::TooManyConnections,
    ErrorCode::RateLimited,
    ErrorCode::ShuttingDown,
    ErrorCode::Unavailable,
];

/// Codes the server closes an authenticated connection with.
const CLOSE_CODES: &[ErrorCode] = &[
    ErrorCode::SlowConsumer,
    ErrorCode::RateLimited,
    ErrorCode::FrameTooLarge,
    ErrorCode::MalformedFrame,
    ErrorCode::FrameTimeout,
    ErrorCode::LoggedInElsewhere,
    ErrorCode::Kicked,
    ErrorCode::TokenRevoked,
    ErrorCode::ShuttingDown,
    ErrorCode::Internal,
    ErrorCode::Unavailable,
];

/// Close codes that are sent as a `Kick` frame.
const KICK_CODES: &[ErrorCode] = &[
    ErrorCode::LoggedInElsewhere,
    ErrorCode::Kicked,
    ErrorCode::TokenRevoked,
    ErrorCode::ShuttingDown,
];

struct Handles {
    frames_in: Vec<Counter>,
    frames_out: Vec<Counter>,
    bytes_in: Counter,
    bytes_out: Counter,
    accepted: Counter,
    authenticated: Counter,
    open: Gauge,
    pending_auth: Gauge,
    rejected: Vec<Counter>,
    closed: Vec<Counter>,
    closed_disconnected: Counter,
    closed_heartbeat: Counter,
    kicks: Vec<Counter>,
    heartbeat_timeouts: Counter,
    sessions_online: Gauge,
    rss: Gauge,
    open_fds: Gauge,
    max_fds: Gauge,
    tls_failures: Vec<Counter>,
    ip_refusals: Vec<Counter>,
}

fn by_code(name: &'static str, label: &'static str, codes: &[ErrorCode]) -> Vec<Counter> {
    codes
        .iter()
        .map(|c| counter!(name, label => code_label(*c)))
        .collect()
}

static HANDLES: LazyLock<Handles> = LazyLock::new(|| {
    let start = gauge!("process_start_time_seconds");
    start.set(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
            - process_age_secs(),
    );
    Handles {
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
        pending_auth: gauge!("ferry_connections_pending_auth"),
        rejected: by_code("ferry_connections_rejected_total", "reason", REJECT_CODES),
        closed: by_code("ferry_connections_closed_total", "reason", CLOSE_CODES),
        closed_disconnected: counter!("ferry_connections_closed_total", "reason" => "disconnected"),
        closed_heartbeat: counter!("ferry_connections_closed_total", "reason" => "heartbeat_timeout"),
        kicks: by_code("ferry_kicks_total", "reason", KICK_CODES),
        heartbeat_timeouts: counter!("ferry_heartbeat_timeouts_total"),
        sessions_online: gauge!("ferry_sessions_online"),
        rss: gauge!("process_resident_memory_bytes"),
        open_fds: gauge!("process_open_fds"),
        max_fds: gauge!("process_max_fds"),
        tls_failures: HandshakeFailure::ALL
            .iter()
            .map(|f| counter!("ferry_tls_handshake_failures_total", "reason" => f.label()))
            .collect(),
        ip_refusals: IpRefusal::ALL
            .iter()
            .map(|r| counter!("ferry_ip_limit_refusals_total", "limit" => r.label()))
            .collect(),
    }
});

fn kind_index(kind: &str) -> usize {
    KINDS
        .iter()
        .position(|k| *k == kind)
        .unwrap_or(KINDS.len() - 1)
}

/// Installs the recorder (see [`install`]) and registers every handle, so
/// `/metrics` lists them from the start.
pub fn init() {
    install();
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

/// `delta` connections started (+1) or stopped (−1) waiting for auth.
pub fn pending_auth(delta: f64) {
    HANDLES.pending_auth.increment(delta);
}

/// A connection authenticated.
pub fn authenticated() {
    HANDLES.authenticated.increment(1);
}

/// Registers `ferry_redirects_total{node}` at 0 for every other node of
/// the cluster, so the series exist from the first scrape (none outside a
/// cluster).
pub fn init_redirects(placement: &ferry_cluster::Placement) {
    for node in placement.nodes() {
        if node.id != placement.self_id() {
            counter!("ferry_redirects_total", "node" => node.id.to_string()).increment(0);
        }
    }
}

/// A verified Auth was redirected to the user's home node `node` (once per
/// redirected connection, not per frame: the label lookup is affordable).
pub fn redirected(node: ferry_cluster::NodeId) {
    counter!("ferry_redirects_total", "node" => node.to_string()).increment(1);
}

/// The metric label of an error code: its protocol name in lower case
/// (`ERROR_CODE_SLOW_CONSUMER` → `slow_consumer`).
pub fn code_label(code: ErrorCode) -> String {
    code.as_str_name()
        .strip_prefix("ERROR_CODE_")
        .unwrap_or("UNSPECIFIED")
        .to_ascii_lowercase()
}

/// Increments the handle of `code` in `handles` (built from `codes`), or a
/// dynamically resolved counter for a code outside the list.
fn count_code(handles: &[Counter], codes: &[ErrorCode], name: &'static str, code: ErrorCode) {
    match codes.iter().position(|c| *c == code) {
        Some(i) => handles[i].increment(1),
        None => counter!(name, "reason" => code_label(code)).increment(1),
    }
}

/// A connection was refused before or at auth.
pub fn rejected(code: ErrorCode) {
    count_code(
        &HANDLES.rejected,
        REJECT_CODES,
        "ferry_connections_rejected_total",
        code,
    );
}

/// An authenticated connection ended; a close with a kick code also counts
/// as a kick.
pub fn connection_closed(reason: CloseReason) {
    match reason {
        CloseReason::Disconnected => HANDLES.closed_disconnected.increment(1),
        CloseReason::HeartbeatTimeout => HANDLES.closed_heartbeat.increment(1),
        CloseReason::Code(code) => {
            count_code(
                &HANDLES.closed,
                CLOSE_CODES,
                "ferry_connections_closed_total",
                code,
            );
            if let Some(i) = KICK_CODES.iter().position(|c| *c == code) {
                HANDLES.kicks[i].increment(1);
            }
        }
    }
}

/// `n` connections were closed for silence.
pub fn heartbeat_timeouts(n: usize) {
    HANDLES.heartbeat_timeouts.increment(n as u64);
}

/// A TLS handshake failed (the connection was closed).
pub fn tls_handshake_failed(failure: HandshakeFailure) {
    if let Some(i) = HandshakeFailure::ALL.iter().position(|f| *f == failure) {
        HANDLES.tls_failures[i].increment(1);
    }
}

/// A connection was closed for a frame that did not arrive whole in time.
pub fn frame_timeout() {
    counter!("ferry_frame_timeouts_total").increment(1);
}

/// A connection was refused by a per-address limit.
pub fn ip_refused(refusal: IpRefusal) {
    if let Some(i) = IpRefusal::ALL.iter().position(|r| *r == refusal) {
        HANDLES.ip_refusals[i].increment(1);
    }
}

/// A certificate reload ended (`ok` false: the old certificate stays).
pub fn tls_cert_reloaded(ok: bool) {
    let result = if ok { "ok" } else { "error" };
    counter!("ferry_tls_cert_reloads_total", "result" => result).increment(1);
}

/// One admin API request answered with `status`.
pub fn admin_request(status: u16) {
    // Per request, not per frame: the registry lookup is fine here.
    counter!("ferry_admin_requests_total", "status" => status.to_string()).increment(1);
}

/// Updates the scrape-time gauges and renders every metric in the
/// Prometheus text format; `None` when the recorder is not ours. Reads
/// `/proc`: call it on a blocking thread.
pub fn render(sessions_online: u64, storage: &ferry_storage::Storage) -> Option<String> {
    let handle = install()?;
    HANDLES.sessions_online.set(sessions_online as f64);
    let usage = storage.usage();
    gauge!("ferry_storage_cache_bytes").set(usage.cache_bytes as f64);
    gauge!("ferry_storage_cache_capacity_bytes").set(usage.cache_capacity_bytes as f64);
    gauge!("ferry_storage_memtable_bytes").set(usage.memtable_bytes as f64);
    for (role, bytes) in ferry_storage::CACHE_ROLES.iter().zip(usage.cache_roles) {
        gauge!("ferry_storage_cache_entry_bytes", "role" => *role).set(bytes as f64);
    }
    gauge!("ferry_storage_table_readers_bytes").set(usage.table_reader_bytes as f64);
    gauge!("ferry_storage_sst_bytes").set(usage.sst_bytes as f64);
    gauge!("ferry_storage_wal_bytes").set(usage.wal_bytes as f64);
    if let Some(rss) = process::resident_bytes() {
        HANDLES.rss.set(rss as f64);
    }
    if let Some(fds) = process::open_fds() {
        HANDLES.open_fds.set(fds as f64);
    }
    if let Ok((soft, _)) = crate::rlimit::nofile() {
        HANDLES.max_fds.set(soft as f64);
    }
    counter!("ferry_log_lines_dropped_total").absolute(crate::log_output::dropped_lines());
    Some(handle.render())
}

/// Seconds since this process started (from /proc/self/stat), 0 if unknown.
fn process_age_secs() -> f64 {
    process::age_secs().unwrap_or(0.0)
}

/// Figures about this process from `/proc/self`.
pub mod process {
    /// Resident set size in bytes (`/proc/self/statm`, field 2 × page size).
    pub fn resident_bytes() -> Option<u64> {
        let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
        let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
        Some(pages * page_size())
    }

    /// Open file descriptors: the entries of `/proc/self/fd`, less the one
    /// the listing itself holds open.
    pub fn open_fds() -> Option<u64> {
        let count = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        Some(count.saturating_sub(1))
    }

    /// Seconds since the process started.
    pub fn age_secs() -> Option<f64> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Field 22 (starttime, in clock ticks since boot) counts from the
        // closing parenthesis of the command name, which may hold spaces.
        let after_comm = &stat[stat.rfind(')')? + 2..];
        let start_ticks: f64 = after_comm.split_whitespace().nth(19)?.parse().ok()?;
        let uptime: f64 = std::fs::read_to_string("/proc/uptime")
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        // SAFETY: sysconf has no memory effects.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        (ticks > 0).then(|| (uptime - start_ticks / ticks as f64).max(0.0))
    }

    fn page_size() -> u64 {
        // SAFETY: sysconf has no memory effects.
        let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if size > 0 { size as u64 } else { 4096 }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn proc_figures_are_plausible() {
            let rss = super::resident_bytes().unwrap();
            assert!(rss > 1024 * 1024, "rss {rss}");
            // Other tests open files concurrently: only a lower bound holds.
            let _file = std::fs::File::open("/proc/self/statm").unwrap();
            assert!(super::open_fds().unwrap() >= 4, "stdio + the file");
            let age = super::age_secs().unwrap();
            assert!((0.0..3600.0).contains(&age), "age {age}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_labels_are_lower_case_protocol_names() {
        assert_eq!(code_label(ErrorCode::SlowConsumer), "slow_consumer");
        assert_eq!(code_label(ErrorCode::Kicked), "kicked");
    }

    #[test]
    fn every_kick_code_is_a_close_code() {
        assert!(KICK_CODES.iter().all(|c| CLOSE_CODES.contains(c)));
    }
}
