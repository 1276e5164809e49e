//! One client connection, from accept to close.
//!
//! ```text
//!  accept ──▶ auth (first frame, time-limited) ──▶ register ──▶ read loop ──▶ cleanup
//!                                                   │
//!                                                   └──▶ writer task (drains the outbox)
//! ```
//!
//! Before auth the connection writes directly (it has nothing else to say
//! but AuthOk or one Error), and reads one frame of at most
//! [`MAX_AUTH_FRAME_BYTES`]: an unauthenticated peer makes the server buffer
//! no more than that, and holds one of the `max_pending_auth` places besides
//! its connection slot. After auth, everything it sends goes through the
//! [`Conn`] outbox, drained by a writer task in chunks of [`WRITE_CHUNK`]
//! bytes, one buffered write each. Read and write buffers are dropped
//! whenever they are empty, so an idle connection holds no buffer memory.
//!
//! Back-pressure: before each inbound frame the reader waits for room in the
//! outbox ([`Conn::wait_for_room`]) and takes a [`RequestSlot`] for each
//! request that gets a reply, passing it to the router, which drops it once
//! the reply is queued. A client that pipelines more than it reads is simply
//! read more slowly; it is never cut off for the replies to its own requests.
//! A write that makes no progress at all for `write_timeout_secs` drops the
//! connection; a slow but moving one is never cut.
//!
//! In cluster mode, a verified `Auth` whose user is homed on another node is
//! answered with `Redirect` (that node's id and client address) and closed
//! the same way as a refused one.
//!
//! On the TLS port the handshake comes first, and it shares the auth
//! timeout with the `Auth` frame: one deadline from accept covers both.
//! After the handshake the connection is the same code over the TLS
//! stream's halves ([`ReadSide`]).
//!
//! Every server-initiated close sends its reason first, half-closes, and then
//! reads and discards whatever the client still sends for a moment
//! ("lingering close"): closing a socket with unread input makes the kernel
//! send RST, which can destroy the very Error frame the client needs to see.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Poll, ready};
use std::time::Duration;

use bytes::BytesMut;
use ferry_protocol::limits::{FRAME_HEADROOM, MAX_AUTH_FRAME_BYTES};
use ferry_protocol::proto::{self, frame::Body};
use ferry_protocol::{CodecError, ErrorCode, Frame, FrameCodec, LENGTH_PREFIX_BYTES};
use ferry_router::session::{CloseReason, Conn, Outgoing, RequestSlot};
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::time::Instant;
use tracing::{debug, info};

use crate::auth::MAX_ID_BYTES;
use crate::ip_limits::IpSlot;
use crate::metrics as m;
use crate::server::{PendingAuth, ServerState};
use crate::tls::{HandshakeFailure, TLS_HANDSHAKE_RECORD, TlsAcceptor};
use crate::wheel::TimerKey;

/// Bytes read per read call when nothing larger is pending.
const READ_CHUNK: usize = 4096;
/// Most encoded bytes the writer takes from the outbox for one write (plus
/// at most one frame): a slow link is fed in pieces, and what is not taken
/// stays queued, counted against the connection's byte bound.
pub const WRITE_CHUNK: usize = 256 * 1024;
/// How long the pre-auth goodbye (one Error frame) may take to write.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(10);
/// Reply room reserved for a frame that is not a request with a reply
/// (a Pong, or an Error answering a bad frame).
const SMALL_REPLY: usize = 256;
/// How long a closing connection keeps draining input before dropping.
const LINGER: Duration = Duration::from_millis(500);
/// Most bytes a lingering close reads before giving up.
const LINGER_MAX_BYTES: usize = 256 * 1024;

/// The read half of a client connection, plain TCP or TLS.
pub(crate) trait ReadSide: AsyncRead + Unpin + Send + 'static {
    /// One read into `buf`, holding no buffer while it waits: idle
    /// connections park here. `Ok(0)` is the end of the stream.
    fn read_some(
        &mut self,
        buf: &mut BytesMut,
    ) -> impl Future<Output = std::io::Result<usize>> + Send;
}

impl ReadSide for OwnedReadHalf {
    async fn read_some(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        // Wait for readability without holding a buffer.
        self.readable().await?;
        if buf.capacity() == buf.len() {
            buf.reserve(READ_CHUNK);
        }
        // `read_buf`, not `try_read_buf`: a read that comes back short proves
        // the socket drained, and tokio then forgets the readiness, so the next
        // `readable()` parks at once instead of costing a read that would block
        // (one wasted syscall per frame on a busy connection).
        self.read_buf(buf).await
    }
}

/// The server side of a TLS connection.
pub(crate) type TlsStream = tokio_rustls::server::TlsStream<TcpStream>;

impl ReadSide for ReadHalf<TlsStream> {
    async fn read_some(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        // A TLS stream has no readiness of its own (rustls may hold
        // decrypted bytes): poll it with a stack buffer, so that a parked
        // read holds no heap buffer, and copy out what arrived.
        std::future::poll_fn(|cx| {
            let mut chunk = [0u8; TLS_READ_CHUNK];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut *self).poll_read(cx, &mut read))?;
            buf.extend_from_slice(read.filled());
            Poll::Ready(Ok(read.filled().len()))
        })
        .await
    }
}

/// Plaintext bytes taken per poll of a TLS stream (one TLS record at most).
const TLS_READ_CHUNK: usize = 16 * 1024;

/// When the auth timeout of a connection accepted now runs out: the TLS
/// handshake and the `Auth` frame must both be done by then.
fn auth_deadline(shared: &ServerState) -> Instant {
    Instant::now() + Duration::from_secs(shared.config.auth_timeout_secs as u64)
}

/// Serves one accepted plain TCP connection until it closes.
pub(crate) async fn serve_plain(
    shared: Arc<ServerState>,
    stream: TcpStream,
    peer: SocketAddr,
    pending: PendingAuth,
    ip_slot: IpSlot,
) {
    let deadline = auth_deadline(&shared);
    let (read, write) = stream.into_split();
    serve(shared, read, write, peer, pending, ip_slot, deadline).await;
}

/// Serves one accepted connection of the TLS port: the handshake (within
/// the auth timeout), then the same as a plain one. A failed handshake is
/// counted by reason and closes the socket.
pub(crate) async fn serve_tls(
    shared: Arc<ServerState>,
    stream: TcpStream,
    peer: SocketAddr,
    pending: PendingAuth,
    ip_slot: IpSlot,
    tls: Arc<TlsAcceptor>,
) {
    let deadline = auth_deadline(&shared);
    // A plaintext ferry client starts with a length prefix (0x00 ...), never
    // with a TLS record: tell it, in its own framing, what is wrong.
    let mut first = [0u8; 1];
    let peeked = tokio::select! {
        r = tokio::time::timeout_at(deadline, stream.peek(&mut first)) => r,
        _ = shared.shutdown.cancelled() => return,
    };
    match peeked {
        Ok(Ok(1)) if first[0] == TLS_HANDSHAKE_RECORD => {}
        Ok(Ok(1)) => {
            m::tls_handshake_failed(HandshakeFailure::NotTls);
            let (mut read, mut write) = stream.into_split();
            let codec = FrameCodec::new(shared.config.max_frame_bytes as usize);
            let frame = Frame::error(
                ErrorCode::AuthRequired,
                "this port speaks TLS: connect with TLS, or to the plaintext port",
            );
            let _ = goodbye(&codec, &mut read, &mut write, &frame).await;
            return;
        }
        Ok(_) => {
            m::tls_handshake_failed(HandshakeFailure::Closed);
            return;
        }
        Err(_elapsed) => {
            m::tls_handshake_failed(HandshakeFailure::Timeout);
            return;
        }
    }
    let handshake = tls.acceptor().accept(stream);
    let stream = tokio::select! {
        r = tokio::time::timeout_at(deadline, handshake) => r,
        _ = shared.shutdown.cancelled() => return,
    };
    let stream = match stream {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            m::tls_handshake_failed(HandshakeFailure::of(&e));
            return;
        }
        Err(_elapsed) => {
            m::tls_handshake_failed(HandshakeFailure::Timeout);
            return;
        }
    };
    let (read, write) = tokio::io::split(stream);
    serve(shared, read, write, peer, pending, ip_slot, deadline).await;
}

/// Serves one connection (after its TLS handshake, if any) until it closes.
///
/// Logs carry the connection's fields explicitly rather than through a
/// span: a span lives as long as the connection and costs several hundred
/// bytes per idle connection in the subscriber's registry.
async fn serve<R: ReadSide, W: AsyncWrite + Unpin + Send + 'static>(
    shared: Arc<ServerState>,
    mut read: R,
    mut write: W,
    peer: SocketAddr,
    pending: PendingAuth,
    ip_slot: IpSlot,
    deadline: Instant,
) {
    let peer = Some(peer);
    let codec = FrameCodec::new(shared.config.max_frame_bytes as usize);
    let mut buf = BytesMut::new();

    let auth = read_auth(&shared, &mut read, &mut buf, deadline).await;
    // Authenticated or not, it no longer waits for auth.
    drop(pending);
    let auth = match auth {
        Ok(auth) => auth,
        Err(AuthFailure::Gone) => {
            debug!(?peer, "closed before auth");
            return;
        }
        Err(AuthFailure::Reject(code, message)) => {
            m::rejected(code);
            // Guessing tokens from one address is throttled (ip_limits).
            if matches!(
                code,
                ErrorCode::BadToken | ErrorCode::TokenExpired | ErrorCode::BadAuth
            ) {
                shared.ip_limits.auth_failed(&ip_slot, shared.clock.now());
            }
            info!(?peer, ?code, %message, "auth rejected");
            let frame = Frame::error(code, message);
            let _ = goodbye(&codec, &mut read, &mut write, &frame).await;
            return;
        }
    };

    // Cluster mode: until a majority of the nodes agree on the node list,
    // placement may be wrong: neither serve nor redirect (docs/CLUSTER.md §1).
    if !shared.router.serving() {
        let frame = Frame::closing_error(
            ErrorCode::Unavailable,
            "this node's cluster membership is not confirmed yet; retry with back-off",
        );
        m::rejected(ErrorCode::Unavailable);
        let _ = goodbye(&codec, &mut read, &mut write, &frame).await;
        return;
    }

    // Cluster mode: a user's connections live on its home node. Only a
    // verified user is redirected, so placement never leaks to a bad token.
    let placement = shared.router.placement();
    if !placement.is_local_user(&auth.user) {
        let home = placement.home_of_user(&auth.user);
        let address = placement
            .node(home)
            .map(|n| n.client_address.clone())
            .unwrap_or_default();
        m::redirected(home);
        debug!(?peer, user = %auth.user, node = %home, %address, "redirected to the home node");
        let frame = Frame::from(proto::Redirect {
            node_id: home.to_string(),
            address,
        });
        let _ = goodbye(&codec, &mut read, &mut write, &frame).await;
        return;
    }

    // The id is taken after the token is verified, so ids order
    // connections by when they authenticated: the registry keeps the newest.
    let conn = Conn::with_limits(
        shared.router.sessions().next_conn_id(),
        auth.user.as_str().into(),
        auth.device.as_str().into(),
        shared.config.outbox_limits(),
    );
    conn.touch(shared.clock.now());
    conn.set_token_issued_at(auth.issued_at);

    let auth_ok = proto::AuthOk {
        user_id: auth.user.clone(),
        device_id: auth.device.clone(),
        heartbeat_secs: shared.config.heartbeat_secs,
        max_frame_bytes: shared.config.max_frame_bytes,
        server_time_ms: ferry_router::now_ms(),
        max_seq: 0,
        node_id: shared.router.node_id().to_owned(),
        max_frames_per_sec: shared.config.max_frames_per_sec,
    };
    // Queue AuthOk first, then become visible to delivery: nothing can be
    // pushed ahead of AuthOk.
    if let Err(e) = shared
        .router
        .login(&conn, auth_ok, auth.last_seq, auth.skip_sync)
        .await
    {
        let (code, message) = match e {
            ferry_router::RouterError::TokenRevoked => {
                (ErrorCode::TokenRevoked, ferry_router::TOKEN_REVOKED_MESSAGE)
            }
            _ => (ErrorCode::Unavailable, "login failed, retry later"),
        };
        m::rejected(code);
        info!(?peer, user = %conn.user(), error = %e, "login failed");
        let frame = Frame::closing_error(code, message);
        let _ = goodbye(&codec, &mut read, &mut write, &frame).await;
        return;
    }
    m::authenticated();
    info!(?peer, user = %conn.user(), device = %conn.device(), id = conn.id(), "connection open");
    let logged_in = LoggedIn {
        shared: &shared,
        timer: shared.heartbeat.register(conn.clone()),
        conn: conn.clone(),
    };
    if shared.shutdown.is_cancelled() {
        // Shutdown began while we authenticated; the shutdown sweep may
        // have missed us.
        conn.kick(ErrorCode::ShuttingDown, "server shutting down");
    }

    let write_timeout = Duration::from_secs(shared.config.write_timeout_secs as u64);
    let writer = tokio::spawn(write_loop(conn.clone(), codec, write, write_timeout));
    let read_result = read_loop(&shared, &conn, &codec, &mut read, buf).await;
    let (reason, last_frame) = match read_result {
        Ok(()) => (CloseReason::Disconnected, None),
        Err((code, message)) => (CloseReason::Code(code), Some(Frame::error(code, message))),
    };
    conn.close(reason, last_frame);

    let close_reason = match writer.await {
        Ok(Some((write, reason))) => {
            if !matches!(reason, CloseReason::Disconnected) {
                linger(read, write).await;
            }
            reason
        }
        _ => CloseReason::Disconnected,
    };
    drop(logged_in);
    m::connection_closed(close_reason);
    info!(?peer, user = %conn.user(), device = %conn.device(), id = conn.id(), reason = ?close_reason, "connection closed");
}

/// What a logged-in connection holds in the server: its session in the
/// router and its heartbeat timer. Dropping it gives both back, and so also
/// when the task serving the connection panics: a bug in one connection's
/// handling must not leave a session that fan-out keeps queueing to, nor a
/// writer task holding the socket open.
struct LoggedIn<'a> {
    shared: &'a ServerState,
    conn: Arc<Conn>,
    timer: TimerKey,
}

impl Drop for LoggedIn<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The reader is gone: let the writer tell the client and end.
            self.conn.close(
                CloseReason::Code(ErrorCode::Internal),
                Some(Frame::closing_error(
                    ErrorCode::Internal,
                    "server fault; reconnect",
                )),
            );
        }
        self.shared.heartbeat.unregister(self.timer, &self.conn);
        self.shared.router.logout(&self.conn);
        self.shared
            .last_seen
            .record(self.conn.user(), ferry_router::now_ms());
    }
}

struct AuthRequest {
    user: String,
    device: String,
    last_seq: u64,
    skip_sync: bool,
    /// The token's `iat` (Unix seconds), 0 without one (see
    /// `ferry_router::revocation`).
    issued_at: u64,
}

enum AuthFailure {
    Gone,
    Reject(ErrorCode, String),
}

/// Reads and verifies the first frame, by `deadline` (the auth timeout from
/// accept). The frame may be at most [`MAX_AUTH_FRAME_BYTES`] (or the frame
/// size, if smaller): a longer length prefix is refused before any of it is
/// buffered.
async fn read_auth<R: ReadSide>(
    shared: &ServerState,
    read: &mut R,
    buf: &mut BytesMut,
    deadline: Instant,
) -> Result<AuthRequest, AuthFailure> {
    let codec = FrameCodec::new(MAX_AUTH_FRAME_BYTES.min(shared.config.max_frame_bytes as usize));
    let timeout = Duration::from_secs(shared.config.auth_timeout_secs as u64);
    let first = tokio::select! {
        r = tokio::time::timeout_at(deadline, read_frame(&codec, read, buf)) => r,
        _ = shared.shutdown.cancelled() => {
            return Err(AuthFailure::Reject(ErrorCode::ShuttingDown, "server shutting down".into()));
        }
    };
    let frame = match first {
        Err(_elapsed) => {
            return Err(AuthFailure::Reject(
                ErrorCode::AuthTimeout,
                format!("no Auth within {} s", timeout.as_secs()),
            ));
        }
        Ok(Err(ReadError::Gone)) => return Err(AuthFailure::Gone),
        Ok(Err(ReadError::Codec(code, message))) => return Err(AuthFailure::Reject(code, message)),
        Ok(Ok(frame)) => frame,
    };
    let Some(Body::Auth(auth)) = frame.body else {
        return Err(AuthFailure::Reject(
            ErrorCode::AuthRequired,
            format!("first frame must be Auth, got {}", frame.kind_name()),
        ));
    };
    if auth.protocol_version != ferry_protocol::PROTOCOL_VERSION as i32 {
        return Err(AuthFailure::Reject(
            ErrorCode::UnsupportedVersion,
            format!(
                "protocol version {} not supported; use 1",
                auth.protocol_version
            ),
        ));
    }
    let claims = shared
        .tokens
        .verify(&auth.token)
        .map_err(|r| AuthFailure::Reject(r.code, r.message))?;
    if auth.device_id.is_empty() || auth.device_id.len() > MAX_ID_BYTES {
        return Err(AuthFailure::Reject(
            ErrorCode::BadAuth,
            format!("device_id must be 1..={MAX_ID_BYTES} bytes"),
        ));
    }
    if claims
        .dev
        .as_ref()
        .is_some_and(|dev| *dev != auth.device_id)
    {
        return Err(AuthFailure::Reject(
            ErrorCode::BadToken,
            "token is bound to another device".into(),
        ));
    }
    Ok(AuthRequest {
        user: claims.sub,
        device: auth.device_id,
        last_seq: auth.last_seq,
        skip_sync: auth.skip_sync,
        issued_at: claims.iat.unwrap_or(0),
    })
}

enum ReadError {
    /// EOF or a transport error: nobody to answer.
    Gone,
    /// A protocol violation to report.
    Codec(ErrorCode, String),
}

fn codec_error(e: CodecError) -> ReadError {
    match e.error_code() {
        Some(code) => ReadError::Codec(code, e.to_string()),
        None => ReadError::Gone,
    }
}

/// Reads until one whole frame is buffered and decodes it.
async fn read_frame<R: ReadSide>(
    codec: &FrameCodec,
    read: &mut R,
    buf: &mut BytesMut,
) -> Result<Frame, ReadError> {
    loop {
        if let Some(raw) = codec.decode_raw(buf).map_err(codec_error)? {
            return Frame::decode(raw).map_err(|e| codec_error(e.into()));
        }
        match read.read_some(buf).await {
            Ok(0) | Err(_) => return Err(ReadError::Gone),
            Ok(_) => {}
        }
    }
}

type CloseWith = (ErrorCode, String);

/// Reads frames until the peer leaves, the connection is closed elsewhere,
/// or the client breaks a rule (returned as the code to close with).
async fn read_loop<R: ReadSide>(
    shared: &ServerState,
    conn: &Arc<Conn>,
    codec: &FrameCodec,
    read: &mut R,
    mut buf: BytesMut,
) -> Result<(), CloseWith> {
    let max_per_sec = shared.config.max_frames_per_sec;
    let mut window = shared.clock.now();
    let mut frames_in_window = 0u32;
    let frame_timeout = Duration::from_secs(shared.config.frame_read_timeout_secs as u64);
    // When the frame now partly buffered must be complete (slowloris bound).
    let mut frame_deadline: Option<Instant> = None;
    loop {
        let mut decoded = false;
        // Frames already buffered (the auth read may have over-read).
        loop {
            let raw = match codec.decode_raw(&mut buf) {
                Ok(Some(raw)) => raw,
                Ok(None) => break,
                Err(e) => {
                    let code = e.error_code().unwrap_or(ErrorCode::MalformedFrame);
                    return Err((code, e.to_string()));
                }
            };
            let now = shared.clock.now();
            conn.touch(now);
            if now != window {
                window = now;
                frames_in_window = 0;
            }
            frames_in_window += 1;
            if frames_in_window > max_per_sec {
                return Err((
                    ErrorCode::RateLimited,
                    format!("more than {max_per_sec} frames per second"),
                ));
            }
            decoded = true;
            let raw_len = raw.len();
            m::bytes_in(raw_len + LENGTH_PREFIX_BYTES);
            let frame = Frame::decode(raw)
                .map_err(|e| (ErrorCode::MalformedFrame, format!("malformed frame: {e}")))?;
            // Back-pressure: take nothing more while the client leaves its
            // replies unread. Nothing is read from the socket meanwhile.
            let max_frame = shared.config.max_frame_bytes as usize;
            let reply = frame
                .body
                .as_ref()
                .and_then(|body| reply_bytes(body, raw_len, max_frame));
            let reply_room = reply.unwrap_or(SMALL_REPLY);
            if !conn.has_room(reply_room) {
                // Boxed: rare, and inline it would grow every idle
                // connection's task by its size.
                Box::pin(conn.wait_for_room(reply_room)).await;
            }
            if conn.is_closing() {
                return Ok(());
            }
            let slot = reply.map(|bytes| conn.begin_request(bytes));
            if let Some(request) = dispatch(shared, conn, frame, slot) {
                request.await;
            }
        }
        if buf.is_empty() {
            // Give the allocation back: idle connections hold no read buffer.
            buf = BytesMut::new();
            frame_deadline = None;
        } else if decoded || frame_deadline.is_none() {
            // A new frame has begun: it gets the whole timeout.
            frame_deadline = Some(Instant::now() + frame_timeout);
        }
        // Boxed: inline, the timer would grow every idle connection's task.
        let frame_timer = async {
            match frame_deadline {
                Some(at) => Box::pin(tokio::time::sleep_until(at)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = conn.cancelled().cancelled() => return Ok(()),
            r = read.read_some(&mut buf) => match r {
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => {}
            },
            _ = frame_timer => {
                m::frame_timeout();
                return Err((
                    ErrorCode::FrameTimeout,
                    format!(
                        "a frame begun was not complete within {} s",
                        frame_timeout.as_secs()
                    ),
                ));
            }
        }
    }
}

/// The most bytes the replies to request `body` (of `raw_len` bytes) add to
/// the requester's own queue, or `None` when it is not a request with a
/// reply (and so takes no [`RequestSlot`]).
fn reply_bytes(body: &Body, raw_len: usize, max_frame: usize) -> Option<usize> {
    let frame = max_frame + LENGTH_PREFIX_BYTES;
    match body {
        // The SendAck, and the sender's own copy: the Send's content plus
        // what the server adds around it (FRAME_HEADROOM covers that).
        Body::Send(_) => Some(raw_len + FRAME_HEADROOM + SMALL_REPLY),
        // The RecallAck and the recall event in the sender's own inbox.
        Body::Recall(_) => Some(2 * FRAME_HEADROOM),
        // One page.
        Body::Sync(_) | Body::History(_) => Some(frame),
        // The GroupReply and the event in the requester's own inbox.
        Body::GroupRequest(_) => Some(2 * frame),
        _ => None,
    }
}

/// A request being handled by the router, boxed: the request futures are
/// large, and inlining them would grow every idle connection's task by
/// their size.
type Handling<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

/// Acts on one inbound frame of an authenticated connection: answers it
/// right away, or returns the router's handling of it, to be awaited.
/// `slot` is the request's place (see [`reply_bytes`]), released once its
/// reply is queued.
fn dispatch<'a>(
    shared: &'a ServerState,
    conn: &'a Arc<Conn>,
    frame: Frame,
    slot: Option<RequestSlot>,
) -> Option<Handling<'a>> {
    let Some(body) = frame.body else {
        m::frame_in("empty");
        let _ = conn.push(Frame::error(
            ErrorCode::UnexpectedFrame,
            "frame has no body (unknown frame kind?)",
        ));
        return None;
    };
    m::frame_in(body.kind_name());
    match body {
        Body::Ping(ping) => {
            let _ = conn.push(Frame::from(proto::Pong {
                nonce: ping.nonce,
                server_time_ms: ferry_router::now_ms(),
            }));
        }
        Body::Auth(_) => {
            let _ = conn.push(Frame::error(
                ErrorCode::UnexpectedFrame,
                "already authenticated",
            ));
        }
        body @ (Body::Send(_)
        | Body::DeliverAck(_)
        | Body::Sync(_)
        | Body::Recall(_)
        | Body::Read(_)
        | Body::Typing(_)
        | Body::GroupRequest(_)
        | Body::History(_)) => return Some(Box::pin(shared.router.handle(conn, body, slot))),
        other => {
            let _ = conn.push(Frame::error(
                ErrorCode::UnexpectedFrame,
                format!("{} is a server-to-client frame", other.kind_name()),
            ));
        }
    }
    None
}

/// Drains the outbox into the socket, [`WRITE_CHUNK`] bytes at a time,
/// until the connection closes. Returns the write half (for the lingering
/// close) and why it closed. A write that makes no progress for
/// `write_timeout` drops the connection.
async fn write_loop<W: AsyncWrite + Unpin>(
    conn: Arc<Conn>,
    codec: FrameCodec,
    mut write: W,
    write_timeout: Duration,
) -> Option<(W, CloseReason)> {
    let mut out = BytesMut::new();
    loop {
        let drained = conn.drain(WRITE_CHUNK).await;
        let closing = drained.closing;
        let mut unencodable = None;
        for item in drained.frames() {
            let result = match item {
                Outgoing::Frame(frame) => {
                    m::frame_out(frame.kind_name());
                    codec
                        .encode_frame(&frame, &mut out)
                        .map_err(|e| format!("{} frame: {e}", frame.kind_name()))
                }
                Outgoing::Encoded(bytes) => {
                    m::frame_out("encoded");
                    out.extend_from_slice(&bytes);
                    Ok(())
                }
                Outgoing::Entry {
                    seq,
                    deliver_without_seq,
                } => {
                    m::frame_out("deliver");
                    codec
                        .encode_entry(seq, &deliver_without_seq, &mut out)
                        .map_err(|e| format!("entry {seq}: {e}"))
                }
            };
            if let Err(e) = result {
                // Only a bug gets here (the server built an oversize frame).
                // Skipping it would leave a gap the client cannot see, and
                // what follows must not go out after a hole: close instead,
                // so that the client reconnects and syncs.
                unencodable = Some(e);
                break;
            }
        }
        if let Some(e) = unencodable {
            tracing::error!(error = %e, "cannot encode an outgoing frame; closing the connection");
            conn.close(
                CloseReason::Code(ErrorCode::Internal),
                Some(Frame::closing_error(
                    ErrorCode::Internal,
                    "server fault: a frame could not be encoded; reconnect and sync",
                )),
            );
        }
        if !out.is_empty() {
            m::bytes_out(out.len());
            if write_with_progress(&mut write, &out, write_timeout)
                .await
                .is_err()
            {
                conn.close(CloseReason::Disconnected, None);
                return None;
            }
            // Keep a modest buffer while busy; give a big one back.
            if out.capacity() > 64 * 1024 {
                out = BytesMut::new();
            } else {
                out.clear();
            }
        }
        if let Some(reason) = closing {
            // On TLS this writes close_notify: bounded like any write.
            let _ = tokio::time::timeout(write_timeout, write.shutdown()).await;
            return Some((write, reason));
        }
        if conn.queued() == 0 {
            out = BytesMut::new();
        }
    }
}

/// Writes all of `buf`, failing only when one write call makes no progress
/// for `timeout` (or the socket fails): a slow link that keeps moving is
/// never cut, however long the whole buffer takes. Then flushes (a no-op
/// on TCP; on TLS it pushes out the records rustls still holds, at most its
/// buffer limit, under the same timeout).
async fn write_with_progress<W: AsyncWrite + Unpin>(
    write: &mut W,
    mut buf: &[u8],
    timeout: Duration,
) -> std::io::Result<()> {
    while !buf.is_empty() {
        match tokio::time::timeout(timeout, write.write(buf)).await {
            Ok(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(Ok(n)) => buf = &buf[n..],
            Ok(Err(e)) => return Err(e),
            Err(_elapsed) => return Err(std::io::ErrorKind::TimedOut.into()),
        }
    }
    match tokio::time::timeout(timeout, write.flush()).await {
        Ok(result) => result,
        Err(_elapsed) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// Sends one frame directly (pre-auth), then closes gracefully.
async fn goodbye<R: ReadSide, W: AsyncWrite + Unpin>(
    codec: &FrameCodec,
    read: &mut R,
    write: &mut W,
    frame: &Frame,
) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    if codec.encode_frame(frame, &mut out).is_ok() {
        tokio::time::timeout(GOODBYE_TIMEOUT, async {
            write.write_all(&out).await?;
            write.flush().await
        })
        .await
        .map_err(|_| std::io::ErrorKind::TimedOut)??;
    }
    tokio::time::timeout(GOODBYE_TIMEOUT, write.shutdown())
        .await
        .map_err(|_| std::io::ErrorKind::TimedOut)??;
    linger_read(read).await;
    Ok(())
}

async fn linger<R: ReadSide, W>(mut read: R, write: W) {
    linger_read(&mut read).await;
    drop(write);
}

/// Reads and discards input until EOF, a byte budget, or a short deadline.
async fn linger_read<R: ReadSide>(read: &mut R) {
    let drain = async {
        let mut sink = BytesMut::new();
        let mut total = 0;
        loop {
            sink.clear();
            match read.read_some(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    total += n;
                    if total > LINGER_MAX_BYTES {
                        break;
                    }
                }
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A transport that hands over `first` on its first read and then
    /// panics, standing in for a bug anywhere in a logged-in connection's
    /// handling.
    struct PanicsAfterFirstRead {
        first: Option<Vec<u8>>,
    }

    impl AsyncRead for PanicsAfterFirstRead {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl ReadSide for PanicsAfterFirstRead {
        async fn read_some(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
            let first = self
                .first
                .take()
                .expect("a bug in the connection's handling");
            buf.extend_from_slice(&first);
            Ok(first.len())
        }
    }

    /// A panic while serving a logged-in connection gives back its session
    /// and heartbeat timer, and the client is told INTERNAL and closed.
    #[tokio::test]
    async fn a_panicking_connection_task_leaves_no_session_behind() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::Config {
            data_dir: dir.path().to_owned(),
            ..Default::default()
        };
        let router = crate::open_router(&config).unwrap();
        let verifier = config.token_verifier(b"a test secret of enough bytes");
        let token = verifier.mint("alice", None, 600);
        let server = crate::Server::new(config, router.clone(), verifier);
        let shared = server.state().clone();

        let auth = Frame::from(proto::Auth {
            token,
            device_id: "phone".into(),
            protocol_version: ferry_protocol::PROTOCOL_VERSION as i32,
            ..Default::default()
        });
        let mut first = BytesMut::new();
        FrameCodec::new(shared.config.max_frame_bytes as usize)
            .encode_frame(&auth, &mut first)
            .unwrap();
        let read = PanicsAfterFirstRead {
            first: Some(first.to_vec()),
        };
        // The client's end reads to EOF once the writer task is gone.
        let (mut client, server_end) = tokio::io::duplex(64 << 10);
        let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let pending = PendingAuth::new(shared.pending_auth.clone().try_acquire_owned().unwrap());
        let ip_slot = shared
            .ip_limits
            .admit(peer.ip(), shared.clock.now())
            .unwrap();
        let deadline = auth_deadline(&shared);

        let task = tokio::spawn(serve(
            shared.clone(),
            read,
            server_end,
            peer,
            pending,
            ip_slot,
            deadline,
        ));
        assert!(task.await.unwrap_err().is_panic());

        assert_eq!(router.sessions().online(), 0, "session left registered");
        assert_eq!(shared.heartbeat.watched(), 0, "heartbeat timer left");
        // The writer task sends the closing error and ends.
        let mut sent = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut sent))
            .await
            .expect("the writer task still holds the connection")
            .unwrap();
        let codec = FrameCodec::new(shared.config.max_frame_bytes as usize);
        let mut sent = BytesMut::from(&sent[..]);
        let mut last = None;
        while let Some(raw) = codec.decode_raw(&mut sent).unwrap() {
            last = Frame::decode(raw).unwrap().body;
        }
        let Some(Body::Error(error)) = last else {
            panic!("the last frame is not an error: {last:?}");
        };
        assert_eq!(error.code, ErrorCode::Internal as i32);
        assert!(error.closing);
        router.shutdown().await;
    }
}
