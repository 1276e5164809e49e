//! The server: listeners, accept loop, connection limit, heartbeat task and
//! graceful shutdown.
//!
//! [`Server::run`] takes bound listeners and a shutdown future, so tests bind
//! port 0 and read the address back; the binary binds from the configuration
//! with [`bind_client_listener`] (socket2: SO_REUSEADDR, a deep backlog).
//! [`Server::run_on`] takes [`Listeners`]: a plain TCP port, a TLS port, or
//! both, sharing one connection limit.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_protocol::{ErrorCode, Frame, FrameCodec};
use ferry_router::Router;
use ferry_router::session::{CloseReason, Conn};
use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::admin::AdminToken;
use crate::auth::TokenVerifier;
use crate::config::Config;
use crate::ip_limits::IpLimits;
use crate::presence::LastSeen;
use crate::tls::TlsAcceptor;
use crate::wheel::{TimerKey, TimerWheel};
use crate::{connection, http, metrics as m};

/// Listen backlog for the client port: a reconnect storm after a restart
/// must queue, not be refused.
pub const LISTEN_BACKLOG: i32 = 8192;

/// Binds the client listener with socket2: SO_REUSEADDR and a deep backlog.
pub fn bind_client_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// A coarse clock in whole seconds since start, advanced by the heartbeat
/// task: reading it on every frame is one atomic load, no syscall.
pub struct CoarseClock {
    start: Instant,
    /// Wall clock at `start`, to turn clock seconds into dates.
    start_unix_ms: u64,
    secs: AtomicU32,
}

impl CoarseClock {
    fn new() -> Self {
        CoarseClock {
            start: Instant::now(),
            start_unix_ms: ferry_router::now_ms(),
            secs: AtomicU32::new(0),
        }
    }

    /// Milliseconds since the Unix epoch at clock second `secs`.
    pub fn unix_ms_at(&self, secs: u32) -> u64 {
        self.start_unix_ms + secs as u64 * 1000
    }

    /// Time since the server was created.
    pub fn uptime(&self) -> Duration {
        self.start.elapsed()
    }

    /// Seconds since start, as of the last tick.
    pub fn now(&self) -> u32 {
        self.secs.load(Ordering::Relaxed)
    }

    fn update(&self) -> u32 {
        let secs = self.start.elapsed().as_secs() as u32;
        self.secs.store(secs, Ordering::Relaxed);
        secs
    }
}

/// The heartbeat deadlines of all authenticated connections.
pub struct Heartbeat {
    wheel: Mutex<TimerWheel<Arc<Conn>>>,
    /// Silence after which a connection is closed, in seconds.
    timeout: u32,
}

impl Heartbeat {
    fn new(heartbeat_secs: u32) -> Self {
        let timeout = heartbeat_secs.saturating_mul(3);
        // One lap covers the timeout, so nothing wraps in normal operation.
        let slots = (timeout as usize + 2).next_power_of_two();
        Heartbeat {
            wheel: Mutex::new(TimerWheel::new(slots, 0)),
            timeout,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TimerWheel<Arc<Conn>>> {
        self.wheel.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The tick at which `conn` is silent for too long, unless it sends
    /// something before.
    ///
    /// `last_seen` is a whole coarse-clock second, truncated: a frame seen
    /// at second s arrived anywhere in [s, s + 1). Closing at tick
    /// s + timeout could therefore come after only timeout − 1 seconds of
    /// silence (plus a moment); closing at s + timeout + 1 comes after more
    /// than `timeout` seconds, and at most about one second more (plus the
    /// tick's own delay). So a frame that arrives within 3 × heartbeat_secs
    /// of the previous one always keeps the connection.
    fn deadline(&self, conn: &Conn) -> u64 {
        conn.last_seen() as u64 + self.timeout as u64 + 1
    }

    /// Starts watching `conn` (its last_seen must be set).
    pub(crate) fn register(&self, conn: Arc<Conn>) -> TimerKey {
        let deadline = self.deadline(&conn);
        self.lock().insert(conn, deadline)
    }

    /// How many connections are watched (for tests).
    #[cfg(test)]
    pub(crate) fn watched(&self) -> usize {
        self.lock().len()
    }

    /// Stops watching `conn`. The key may have been reused if the heartbeat
    /// task already expired it, so the connection id is checked.
    pub(crate) fn unregister(&self, key: TimerKey, conn: &Conn) {
        let mut wheel = self.lock();
        if wheel.get(key).is_some_and(|c| c.id() == conn.id()) {
            wheel.remove(key);
        }
    }

    /// Advances to `now` and closes connections silent for the timeout.
    fn advance(&self, now: u32) -> usize {
        let mut expired = Vec::new();
        {
            let mut wheel = self.lock();
            while wheel.now() < now as u64 {
                for key in wheel.tick() {
                    let Some(conn) = wheel.get(key) else { continue };
                    let deadline = self.deadline(conn);
                    if deadline <= wheel.now() {
                        if let Some(conn) = wheel.remove(key) {
                            expired.push(conn);
                        }
                    } else {
                        wheel.reschedule(key, deadline);
                    }
                }
            }
        }
        for conn in &expired {
            conn.close(CloseReason::HeartbeatTimeout, None);
        }
        if !expired.is_empty() {
            m::heartbeat_timeouts(expired.len());
        }
        expired.len()
    }
}

/// The server's state, shared by every connection task, the accept loop and
/// the ops HTTP server.
pub(crate) struct ServerState {
    pub config: Config,
    pub router: Arc<Router>,
    pub tokens: TokenVerifier,
    pub clock: CoarseClock,
    pub heartbeat: Heartbeat,
    pub shutdown: CancellationToken,
    /// One permit per connection slot (`max_connections`).
    pub permits: Arc<Semaphore>,
    /// One permit per connection between accept and auth
    /// (`max_pending_auth`), held besides its connection slot.
    pub pending_auth: Arc<Semaphore>,
    /// When users' connections last ended (admin presence).
    pub last_seen: LastSeen,
    /// Connections, connects per second and failed logins per source address.
    pub ip_limits: Arc<IpLimits>,
    /// The bound client and ops addresses, once [`Server::run`] has them
    /// (a single node's `/v1/route` answers with them).
    pub bound: std::sync::OnceLock<(SocketAddr, SocketAddr)>,
}

/// A connection's place among those waiting for auth: released (and the
/// `ferry_connections_pending_auth` gauge lowered) when dropped.
pub(crate) struct PendingAuth {
    _permit: OwnedSemaphorePermit,
}

impl PendingAuth {
    pub(crate) fn new(permit: OwnedSemaphorePermit) -> Self {
        m::pending_auth(1.0);
        PendingAuth { _permit: permit }
    }
}

/// A connection's place under `max_connections`, counted in
/// `ferry_connections_open` for as long as it is held: the gauge and the
/// limit are released together, in `Drop`, so that however the connection
/// task ends (a panic included) the gauge never counts a freed place.
struct ConnectionSlot {
    _permit: OwnedSemaphorePermit,
}

impl ConnectionSlot {
    fn new(permit: OwnedSemaphorePermit) -> ConnectionSlot {
        m::accepted();
        ConnectionSlot { _permit: permit }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        m::released();
    }
}

impl Drop for PendingAuth {
    fn drop(&mut self) {
        m::pending_auth(-1.0);
    }
}

impl ServerState {
    /// Connections held now, authenticated or not.
    pub fn connections_open(&self) -> usize {
        (self.config.max_connections as usize).saturating_sub(self.permits.available_permits())
    }
}

/// The client ports of a node: plain TCP, TLS, or both (at least one).
/// Both serve the same protocol and share the connection limits.
#[derive(Default)]
pub struct Listeners {
    /// Plaintext frames.
    pub plain: Option<TcpListener>,
    /// TLS, then the same frames inside it.
    pub tls: Option<(TcpListener, Arc<TlsAcceptor>)>,
}

impl Listeners {
    /// Only a plain TCP port.
    pub fn plain(listener: TcpListener) -> Listeners {
        Listeners {
            plain: Some(listener),
            tls: None,
        }
    }

    /// The address clients reach this node at: the plain port's, or the
    /// TLS port's when there is no plain one.
    fn client_addr(&self) -> Option<SocketAddr> {
        match (&self.plain, &self.tls) {
            (Some(l), _) => l.local_addr().ok(),
            (None, Some((l, _))) => l.local_addr().ok(),
            (None, None) => None,
        }
    }
}

/// A running ferry node.
pub struct Server {
    shared: Arc<ServerState>,
    tracker: TaskTracker,
    admin_token: Option<Arc<AdminToken>>,
}

impl Server {
    /// A server over `router`, verifying tokens with `tokens`. The admin API
    /// accepts `config.admin_token` if set (see [`Server::with_admin_token`]);
    /// with no token at all it refuses every call.
    pub fn new(config: Config, router: Arc<Router>, tokens: TokenVerifier) -> Server {
        m::init();
        m::init_redirects(router.placement());
        let heartbeat = Heartbeat::new(config.heartbeat_secs);
        let admin_token = config
            .admin_token
            .as_ref()
            .map(|t| Arc::new(AdminToken::new(t.as_bytes())));
        let permits = Arc::new(Semaphore::new(config.max_connections as usize));
        let pending_auth = Arc::new(Semaphore::new(config.max_pending_auth as usize));
        let ip_limits = IpLimits::new(config.ip_limits());
        Server {
            shared: Arc::new(ServerState {
                config,
                router,
                tokens,
                clock: CoarseClock::new(),
                heartbeat,
                shutdown: CancellationToken::new(),
                permits,
                pending_auth,
                last_seen: LastSeen::default(),
                ip_limits,
                bound: std::sync::OnceLock::new(),
            }),
            tracker: TaskTracker::new(),
            admin_token,
        }
    }

    /// Uses `token` as the admin API's bearer token (the binary passes the
    /// one from the data dir when none is configured).
    pub fn with_admin_token(mut self, token: &[u8]) -> Server {
        self.admin_token = Some(Arc::new(AdminToken::new(token)));
        self
    }

    /// The router (for the ops API and tests).
    pub fn router(&self) -> &Arc<Router> {
        &self.shared.router
    }

    /// What its connection tasks share (for the crate's tests).
    #[cfg(test)]
    pub(crate) fn state(&self) -> &Arc<ServerState> {
        &self.shared
    }

    /// Serves clients on `listener` and ops HTTP on `http` until `shutdown`
    /// completes, then drains: stop accepting, Kick every connection with
    /// SHUTTING_DOWN, wait for them to flush (bounded by the configured
    /// timeout), flush storage.
    pub async fn run(
        self,
        listener: TcpListener,
        http: TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        self.run_on(Listeners::plain(listener), http, shutdown)
            .await
    }

    /// [`Server::run`] on a plain port, a TLS port, or both.
    pub async fn run_on(
        self,
        listeners: Listeners,
        http: TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let shared = self.shared.clone();
        let permits = shared.permits.clone();
        // Refusals get their own small budget so a flood cannot pile up tasks.
        let refusals = Arc::new(Semaphore::new(256));

        if let (Some(client), Ok(ops)) = (listeners.client_addr(), http.local_addr()) {
            let _ = shared.bound.set((client, ops));
        }
        let heartbeat_task = tokio::spawn(heartbeat_loop(shared.clone()));
        if let Ok(addr) = http.local_addr()
            && !addr.ip().is_loopback()
        {
            warn!(
                %addr,
                "the ops port (admin API, metrics) listens beyond loopback: \
                 firewall it to your backends and monitoring"
            );
        }
        let http_task = tokio::spawn(http::serve(http, shared.clone(), self.admin_token.clone()));
        let upkeep_task = tokio::spawn(m::upkeep_loop());

        let plain = async {
            match &listeners.plain {
                Some(l) => accept_loop(&shared, &self.tracker, l, None, &permits, &refusals).await,
                None => std::future::pending().await,
            }
        };
        let tls = async {
            match &listeners.tls {
                Some((l, tls)) => {
                    accept_loop(&shared, &self.tracker, l, Some(tls), &permits, &refusals).await
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = plain => {}
            _ = tls => {}
            _ = shutdown => {}
        }
        info!("shutting down: no longer accepting");
        drop(listeners);
        shared.shutdown.cancel();
        for conn in shared.router.sessions().all() {
            conn.kick(ErrorCode::ShuttingDown, "server shutting down");
        }
        self.tracker.close();
        let deadline = Duration::from_secs(shared.config.shutdown_timeout_secs as u64);
        if tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                remaining = self.tracker.len(),
                "shutdown deadline passed with connections still open"
            );
        }
        heartbeat_task.abort();
        upkeep_task.abort();
        let _ = http_task.await;
        shared.router.shutdown().await;
        info!("shutdown complete");
    }
}

/// Accepts on one client port until it fails for good (never, in practice:
/// errors back off and retry). `tls`: the port's TLS, if it is the TLS port.
async fn accept_loop(
    shared: &Arc<ServerState>,
    tracker: &TaskTracker,
    listener: &TcpListener,
    tls: Option<&Arc<TlsAcceptor>>,
    permits: &Arc<Semaphore>,
    refusals: &Arc<Semaphore>,
) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => {
                backoff = Duration::from_millis(5);
                accepted
            }
            Err(e) => {
                // EMFILE and friends: wait for connections to close instead
                // of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        tune_socket(&stream);
        // Per source address first: a flood from one address is refused
        // before it can take places shared by everyone.
        let ip_slot = match shared.ip_limits.admit(peer.ip(), shared.clock.now()) {
            Ok(slot) => slot,
            Err(refusal) => {
                m::ip_refused(refusal);
                let (code, message) = refusal.error();
                m::rejected(code);
                spawn_refusal(
                    shared,
                    tracker,
                    refusals,
                    stream,
                    tls.is_some(),
                    code,
                    message,
                );
                continue;
            }
        };
        // A connection needs a slot, and until it authenticates, one of the
        // places for pending auths too: sockets that never authenticate
        // cannot take the slots of users who do.
        let acquired = permits.clone().try_acquire_owned().and_then(|slot| {
            let pending = shared.pending_auth.clone().try_acquire_owned()?;
            Ok((slot, pending))
        });
        let Ok((permit, pending)) = acquired else {
            m::rejected(ErrorCode::TooManyConnections);
            spawn_refusal(
                shared,
                tracker,
                refusals,
                stream,
                tls.is_some(),
                ErrorCode::TooManyConnections,
                "server at its connection limit",
            );
            continue;
        };
        let slot = ConnectionSlot::new(permit);
        let shared = shared.clone();
        let pending = PendingAuth::new(pending);
        match tls {
            None => tracker.spawn(async move {
                connection::serve_plain(shared, stream, peer, pending, ip_slot).await;
                drop(slot);
            }),
            Some(tls) => {
                let tls = tls.clone();
                tracker.spawn(async move {
                    connection::serve_tls(shared, stream, peer, pending, ip_slot, tls).await;
                    drop(slot);
                })
            }
        };
    }
}

/// Unsent bytes the kernel may hold for one client socket (TCP_NOTSENT_LOWAT).
///
/// Without it, send-buffer autotuning lets a socket whose peer reads slowly
/// take up to `net.ipv4.tcp_wmem`'s maximum (4 MiB by default) of unsent
/// data: kernel memory per connection, and — since a full socket becomes
/// writable again only when a third of that has drained — write stalls of
/// seconds on a slow but steady link, which the writer's no-progress
/// timeout would take for a dead one. With it, the writer hears about
/// progress every 64 KiB or so, and what waits stays in the counted,
/// bounded outbox.
pub const NOTSENT_LOWAT_BYTES: u32 = 128 * 1024;

fn tune_socket(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10));
    let socket = SockRef::from(stream);
    let _ = socket.set_tcp_keepalive(&keepalive);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let _ = socket.set_tcp_notsent_lowat(NOTSENT_LOWAT_BYTES);
}

/// Answers a refused connection with `code` and closes it, within the
/// refusals' own small budget (beyond it, or on the TLS port, which cannot
/// say anything without a handshake a flood must not get: just closes).
fn spawn_refusal(
    shared: &ServerState,
    tracker: &TaskTracker,
    refusals: &Arc<Semaphore>,
    stream: TcpStream,
    is_tls: bool,
    code: ErrorCode,
    message: &'static str,
) {
    if is_tls {
        return;
    }
    if let Ok(refusal) = refusals.clone().try_acquire_owned() {
        let codec = FrameCodec::new(shared.config.max_frame_bytes as usize);
        tracker.spawn(async move {
            refuse(stream, codec, code, message).await;
            drop(refusal);
        });
    }
}

async fn refuse(mut stream: TcpStream, codec: FrameCodec, code: ErrorCode, message: &str) {
    let mut out = bytes::BytesMut::new();
    if codec
        .encode_frame(&Frame::error(code, message), &mut out)
        .is_ok()
    {
        let write = async {
            stream.write_all(&out).await?;
            stream.shutdown().await
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), write).await;
    }
    // Let the client read the frame before the socket goes away.
    let mut sink = [0u8; 512];
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            match tokio::io::AsyncReadExt::read(&mut stream, &mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
}

async fn heartbeat_loop(shared: Arc<ServerState>) {
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let now = shared.clock.update();
        if now.is_multiple_of(10) {
            shared.ip_limits.sweep(now);
        }
        let expired = shared.heartbeat.advance(now);
        if expired > 0 {
            info!(expired, "closed silent connections");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(id: u64) -> Arc<Conn> {
        Conn::new(id, "alice".into(), "phone".into(), 16)
    }

    /// A frame seen at coarse second 5 may have come at 5.999: with a 1 s
    /// heartbeat (3 s timeout) the close must not come at tick 8, which may
    /// be only 2.001 s later, but at tick 9.
    #[test]
    fn never_closes_before_three_heartbeats_of_silence() {
        let hb = Heartbeat::new(1);
        let c = conn(1);
        c.touch(5);
        hb.advance(5);
        hb.register(c.clone());
        assert_eq!(hb.advance(8), 0, "at most 2.x s of silence at tick 8");
        assert!(!c.is_closing());
        assert_eq!(hb.advance(9), 1, "more than 3 s of silence at tick 9");
        assert!(c.is_closing());
    }

    #[test]
    fn a_frame_in_time_postpones_the_close_and_the_latest_one_counts() {
        let hb = Heartbeat::new(2);
        let c = conn(1);
        c.touch(0);
        hb.register(c.clone());
        // Seen again at second 6: within 3 × 2 s of the first frame.
        hb.advance(6);
        c.touch(6);
        assert_eq!(hb.advance(12), 0, "deadline moved to 6 + 6 + 1");
        assert_eq!(hb.advance(13), 1);
        // A slow heartbeat: 1 h × 3, far beyond one lap of the wheel.
        let hb = Heartbeat::new(3600);
        let c = conn(2);
        c.touch(0);
        hb.register(c.clone());
        assert_eq!(hb.advance(10_800), 0);
        assert_eq!(hb.advance(10_801), 1);
    }
}
