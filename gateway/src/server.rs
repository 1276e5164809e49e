//! The server: listeners, accept loop, connection limit, heartbeat task and
//! graceful shutdown.
//!
//! [`Server::run`] takes bound listeners and a shutdown future, so tests bind
//! port 0 and read the address back; the binary binds from the configuration
//! with [`bind_client_listener`] (socket2: SO_REUSEADDR, a deep backlog).

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
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::admin::AdminToken;
use crate::auth::TokenVerifier;
use crate::config::Config;
use crate::presence::LastSeen;
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

    /// Starts watching `conn` (its last_seen must be set).
    pub(crate) fn register(&self, conn: Arc<Conn>) -> TimerKey {
        let deadline = conn.last_seen() as u64 + self.timeout as u64;
        self.lock().insert(conn, deadline)
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
                    let deadline = conn.last_seen() as u64 + self.timeout as u64;
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

/// State shared by every connection task.
pub(crate) struct Shared {
    pub config: Config,
    pub router: Arc<Router>,
    pub tokens: TokenVerifier,
    pub clock: CoarseClock,
    pub heartbeat: Heartbeat,
    pub shutdown: CancellationToken,
    /// One permit per connection slot (`max_connections`).
    pub permits: Arc<Semaphore>,
    /// When users' connections last ended (admin presence).
    pub last_seen: LastSeen,
}

impl Shared {
    /// Connections held now, authenticated or not.
    pub fn connections_open(&self) -> usize {
        (self.config.max_connections as usize).saturating_sub(self.permits.available_permits())
    }
}

/// A running ferry node.
pub struct Server {
    shared: Arc<Shared>,
    tracker: TaskTracker,
    admin_token: Option<Arc<AdminToken>>,
}

impl Server {
    /// A server over `router`, verifying tokens with `tokens`. The admin API
    /// accepts `config.admin_token` if set (see [`Server::with_admin_token`]);
    /// with no token at all it refuses every call.
    pub fn new(config: Config, router: Arc<Router>, tokens: TokenVerifier) -> Server {
        m::init();
        let heartbeat = Heartbeat::new(config.heartbeat_secs);
        let admin_token = config
            .admin_token
            .as_ref()
            .map(|t| Arc::new(AdminToken::new(t.as_bytes())));
        let permits = Arc::new(Semaphore::new(config.max_connections as usize));
        Server {
            shared: Arc::new(Shared {
                config,
                router,
                tokens,
                clock: CoarseClock::new(),
                heartbeat,
                shutdown: CancellationToken::new(),
                permits,
                last_seen: LastSeen::default(),
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
        let shared = self.shared.clone();
        let permits = shared.permits.clone();
        // Refusals get their own small budget so a flood cannot pile up tasks.
        let refusals = Arc::new(Semaphore::new(256));

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

        tokio::select! {
            _ = accept_loop(&shared, &self.tracker, &listener, permits, refusals) => {}
            _ = shutdown => {}
        }
        info!("shutting down: no longer accepting");
        drop(listener);
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

async fn accept_loop(
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    listener: &TcpListener,
    permits: Arc<Semaphore>,
    refusals: Arc<Semaphore>,
) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let (stream, _peer) = match listener.accept().await {
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
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            m::rejected(ErrorCode::TooManyConnections);
            if let Ok(refusal) = refusals.clone().try_acquire_owned() {
                let codec = FrameCodec::new(shared.config.max_frame_bytes as usize);
                tracker.spawn(async move {
                    refuse(stream, codec, ErrorCode::TooManyConnections).await;
                    drop(refusal);
                });
            }
            continue;
        };
        m::accepted();
        let shared = shared.clone();
        tracker.spawn(async move {
            connection::serve(shared, stream).await;
            m::released();
            drop(permit);
        });
    }
}

fn tune_socket(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10));
    let _ = SockRef::from(stream).set_tcp_keepalive(&keepalive);
}

async fn refuse(mut stream: TcpStream, codec: FrameCodec, code: ErrorCode) {
    let mut out = bytes::BytesMut::new();
    if codec
        .encode_frame(
            &Frame::error(code, "server at its connection limit"),
            &mut out,
        )
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

async fn heartbeat_loop(shared: Arc<Shared>) {
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let now = shared.clock.update();
        let expired = shared.heartbeat.advance(now);
        if expired > 0 {
            info!(expired, "closed silent connections");
        }
    }
}
