//! Opening many client connections: tokens, source addresses, the ramp,
//! the login handshake, and the writer task every ferry connection uses.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use ferry_gateway::auth::TokenVerifier;
use ferry_protocol::client::{
    Client, FrameReader, FrameWriter, MAX_REDIRECTS, TlsConnector, Transport,
};
use ferry_protocol::proto::{self, Frame, frame::Body};
use ferry_protocol::{FrameCodec, PROTOCOL_VERSION};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc};

use crate::cluster::ClusterMap;
use crate::hist::Hist;
use crate::payload::{Payload, now_ns};

/// Device id of every harness connection.
pub const DEVICE: &str = "bench";

/// Token lifetime: longer than any run.
const TOKEN_TTL_SECS: u64 = 7 * 86_400;

/// Connection attempts before a user counts as failed.
const CONNECT_ATTEMPTS: u32 = 3;

/// Handshakes in flight at once per process (keeps the SYN and accept
/// queues from overflowing when the ramp outpaces the server).
const MAX_IN_FLIGHT: usize = 512;

/// How long the server may take to answer Auth.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Frames queued per connection in the harness before sends are skipped.
pub const OUT_QUEUE: usize = 256;

/// How a process reaches the server and which users it plays. Sent to
/// worker processes as part of their job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Fleet {
    /// The server's client listener (in a spawned cluster, node 1's).
    pub addr: SocketAddr,
    /// A spawned cluster: where each user dials first.
    pub cluster: Option<ClusterMap>,
    /// JWT secret.
    pub secret: Vec<u8>,
    /// Prefix of the user ids of this run.
    pub run_id: String,
    /// The users (global indices) this process plays.
    pub users: Range<u32>,
    /// Users in the whole run, over all processes.
    pub total_users: u32,
    /// Source addresses to spread over (0 = let the OS choose).
    pub source_ips: u32,
    /// New connections per second, for this process.
    pub ramp_per_sec: f64,
    /// Idle seconds before a Ping.
    pub ping_secs: u64,
    /// Connect with TLS trusting this (`--tls`).
    pub tls: Option<FleetTls>,
}

/// What a harness process trusts with `--tls`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetTls {
    /// The CA certificate(s), PEM.
    pub ca_pem: String,
    /// The name verified in the server's certificate (default: the host dialled).
    pub server_name: Option<String>,
}

/// How this process's connections are made: plain until [`use_tls`].
static TRANSPORT: std::sync::OnceLock<Transport> = std::sync::OnceLock::new();

/// Makes every later connection of this process TLS, trusting `tls`.
pub fn use_tls(tls: &FleetTls) -> anyhow::Result<()> {
    let mut connector = TlsConnector::from_ca_pem(tls.ca_pem.as_bytes())?;
    if let Some(name) = &tls.server_name {
        connector = connector.with_server_name(name)?;
    }
    let _ = TRANSPORT.set(Transport::Tls(connector));
    Ok(())
}

fn transport() -> &'static Transport {
    TRANSPORT.get_or_init(|| Transport::Plain)
}

impl Fleet {
    /// The user id of global user `index`.
    pub fn user_id(&self, index: u32) -> String {
        user_id(&self.run_id, index)
    }

    /// The address user `index` dials first: in a spawned cluster as
    /// `--entry` says, else the server's.
    pub fn dial(&self, index: u32) -> SocketAddr {
        match &self.cluster {
            Some(map) => map.dial(&self.user_id(index), index),
            None => self.addr,
        }
    }

    /// The home node of user `index` in a spawned cluster.
    pub fn home(&self, index: u32) -> Option<u16> {
        self.cluster.as_ref().map(|m| m.home(&self.user_id(index)))
    }

    /// A DIRECT conversation with user `index`.
    pub fn direct_to(&self, index: u32) -> proto::Conversation {
        proto::Conversation {
            kind: proto::ConversationKind::Direct as i32,
            id: self.user_id(index),
        }
    }

    /// Connects, authenticates user `index` and returns the split client.
    pub async fn login(
        &self,
        tokens: &Tokens,
        index: u32,
        last_seq: u64,
        skip_sync: bool,
    ) -> anyhow::Result<(FrameReader, FrameWriter, proto::AuthOk)> {
        if let Some(tls) = &self.tls
            && TRANSPORT.get().is_none()
        {
            use_tls(tls)?;
        }
        connect_login(
            self.dial(index),
            self.source_ips,
            index,
            tokens.get(index),
            last_seq,
            skip_sync,
        )
        .await
    }
}

/// The tokens of a fleet's users, minted before connecting so that the
/// signing is not part of the measured connect time.
pub struct Tokens {
    first: u32,
    tokens: Vec<String>,
}

impl Tokens {
    /// Mints a token for every user of `fleet`.
    pub fn mint(fleet: &Fleet) -> Tokens {
        let verifier = TokenVerifier::new(&fleet.secret);
        Tokens {
            first: fleet.users.start,
            tokens: fleet
                .users
                .clone()
                .map(|i| verifier.mint(&fleet.user_id(i), None, TOKEN_TTL_SECS))
                .collect(),
        }
    }

    /// The token of global user `index` (one of the fleet's).
    pub fn get(&self, index: u32) -> &str {
        &self.tokens[(index - self.first) as usize]
    }
}

/// The largest frame the harness accepts: the sanity limit docs/PROTOCOL.md
/// suggests (16 MiB), so a server configured with a larger
/// `--max-frame-bytes` than the default works too.
pub const CLIENT_MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// The codec of every harness connection.
pub fn client_codec() -> FrameCodec {
    FrameCodec::new(CLIENT_MAX_FRAME_BYTES)
}

/// The user id of global user `index` in run `run_id`.
pub fn user_id(run_id: &str, index: u32) -> String {
    format!("{run_id}-{index}")
}

/// A TCP connection to `addr` from source address `127.0.0.(2 + index % n)`
/// when `source_ips` is n > 0 (loopback only; the caller checked).
pub async fn tcp_connect(
    addr: SocketAddr,
    source_ips: u32,
    index: u32,
) -> std::io::Result<TcpStream> {
    let stream = if source_ips > 0 {
        let socket = TcpSocket::new_v4()?;
        let last_octet = 2 + (index % source_ips) as u8;
        let local = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last_octet)), 0);
        socket.bind(local)?;
        socket.connect(addr).await?
    } else {
        TcpStream::connect(addr).await?
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Redirects this process's logins followed (cluster mode), for the reports.
static REDIRECTS: AtomicU64 = AtomicU64::new(0);

/// Redirects followed so far by this process's logins.
pub fn redirects_followed() -> u64 {
    REDIRECTS.load(Ordering::Relaxed)
}

/// Connects to `addr` (from a source address as [`tcp_connect`] picks it)
/// and logs in; in a cluster, follows `Redirect`s to the user's home node,
/// at most [`MAX_REDIRECTS`] in a row (docs/PROTOCOL.md section 4.7).
pub async fn connect_login(
    addr: SocketAddr,
    source_ips: u32,
    index: u32,
    token: &str,
    last_seq: u64,
    skip_sync: bool,
) -> anyhow::Result<(FrameReader, FrameWriter, proto::AuthOk)> {
    let mut addr = addr;
    for _ in 0..=MAX_REDIRECTS {
        let stream = tcp_connect(addr, source_ips, index).await?;
        let client = Client::over(stream, &addr.to_string(), transport(), client_codec()).await?;
        match login_or_redirect(client, token, last_seq, skip_sync).await? {
            Ok(logged_in) => return Ok(logged_in),
            Err(redirect) => {
                REDIRECTS.fetch_add(1, Ordering::Relaxed);
                addr = tokio::net::lookup_host(redirect.address.as_str())
                    .await
                    .ok()
                    .and_then(|mut addrs| addrs.next())
                    .with_context(|| {
                        format!("redirect to an unusable address `{}`", redirect.address)
                    })?;
            }
        }
    }
    bail!("more than {MAX_REDIRECTS} redirects in a row: the cluster's node lists disagree")
}

/// Sends Auth and waits for AuthOk (`Ok(Ok)`) or a Redirect (`Ok(Err)`).
async fn login_or_redirect(
    mut client: Client,
    token: &str,
    last_seq: u64,
    skip_sync: bool,
) -> anyhow::Result<Result<(FrameReader, FrameWriter, proto::AuthOk), proto::Redirect>> {
    client
        .send(proto::Auth {
            token: token.to_owned(),
            device_id: DEVICE.to_owned(),
            protocol_version: PROTOCOL_VERSION as i32,
            last_seq,
            skip_sync,
        })
        .await?;
    let ok = tokio::time::timeout(LOGIN_TIMEOUT, async {
        loop {
            match client.recv().await? {
                Some(Frame {
                    body: Some(Body::AuthOk(ok)),
                }) => return Ok(Ok(ok)),
                Some(Frame {
                    body: Some(Body::Error(e)),
                }) => bail!("login refused: {:?}: {}", e.code(), e.message),
                Some(Frame {
                    body: Some(Body::Kick(k)),
                }) => bail!("kicked during login: {:?}", k.reason()),
                Some(Frame {
                    body: Some(Body::Redirect(r)),
                }) => return Ok(Err(r)),
                Some(_) => continue,
                None => bail!("the server closed the connection during login"),
            }
        }
    })
    .await
    .context("no AuthOk within 30 s")??;
    let ok = match ok {
        Ok(ok) => ok,
        Err(redirect) => return Ok(Err(redirect)),
    };
    let (reader, writer) = client.split();
    Ok(Ok((reader, writer, ok)))
}

/// Reads the login sync (SyncBatch frames with request_id 0) to its end and
/// returns its entries, oldest first.
pub async fn read_login_sync(reader: &mut FrameReader) -> anyhow::Result<Vec<proto::Deliver>> {
    let mut entries = Vec::new();
    tokio::time::timeout(LOGIN_TIMEOUT, async {
        loop {
            match reader.recv().await?.and_then(|f| f.body) {
                Some(Body::SyncBatch(b)) if b.request_id == 0 => {
                    entries.extend(b.entries);
                    if !b.has_more {
                        return Ok(());
                    }
                }
                // Live entries can only follow the sync, but keep them in order anyway.
                Some(Body::Deliver(d)) => entries.push(d),
                Some(Body::Error(e)) if e.closing => {
                    bail!("error during the login sync: {:?}: {}", e.code(), e.message)
                }
                Some(_) => {}
                None => bail!("the server closed the connection during the login sync"),
            }
        }
    })
    .await
    .context("login sync did not finish within 30 s")??;
    Ok(entries)
}

/// What the harness sends on one connection.
#[derive(Debug)]
pub enum Out {
    /// Any frame, as is.
    Frame(Frame),
    /// A harness message, stamped when written: the body's timestamp and the
    /// `client_msg_id` are both the write time in `now_ns()` (made unique per
    /// connection), so the SendAck alone tells the ack latency.
    Stamped {
        /// Recipient or group.
        to: proto::Conversation,
        /// The sender's counter for this message.
        counter: u32,
        /// The payload tag.
        tag: u8,
    },
}

/// Counters of the writer tasks of one process.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Pings written.
    pub pings: AtomicU64,
    /// Stamped messages written.
    pub sends: AtomicU64,
}

/// Spawns the task that writes `rx` to `writer`, batching what is queued
/// into one flush, and pings after `ping_every` of silence. It ends when
/// every sender of `rx` is dropped or a write fails.
pub fn spawn_writer(
    mut writer: FrameWriter,
    sender_index: u32,
    mut rx: mpsc::Receiver<Out>,
    ping_every: Duration,
    stats: Arc<WriterStats>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last_stamp = 0u64;
        let mut nonce = 0u64;
        loop {
            let item = tokio::select! {
                item = rx.recv() => item,
                _ = tokio::time::sleep(ping_every) => {
                    nonce += 1;
                    stats.pings.fetch_add(1, Ordering::Relaxed);
                    if writer.send(proto::Ping { nonce }).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            let Some(mut item) = item else { return };
            let mut batch = 0;
            loop {
                let frame = match item {
                    Out::Frame(f) => f,
                    Out::Stamped { to, counter, tag } => {
                        let stamp = now_ns().max(last_stamp + 1);
                        last_stamp = stamp;
                        stats.sends.fetch_add(1, Ordering::Relaxed);
                        let body = Payload {
                            sent_ns: stamp,
                            sender: sender_index,
                            counter,
                            tag,
                        }
                        .encode();
                        proto::Send {
                            client_msg_id: stamp,
                            to: Some(to),
                            content_type: "application/x-ferry-bench".into(),
                            body,
                        }
                        .into()
                    }
                };
                if writer.feed(frame).await.is_err() {
                    return;
                }
                batch += 1;
                match rx.try_recv() {
                    Ok(next) if batch < 64 => item = next,
                    Ok(next) => {
                        if writer.flush().await.is_err() {
                            return;
                        }
                        batch = 0;
                        item = next;
                    }
                    Err(_) => break,
                }
            }
            if writer.flush().await.is_err() {
                return;
            }
        }
    })
}

/// Result of opening a range of connections.
pub struct Opened<T> {
    /// One value per user that connected, with its global index.
    pub conns: Vec<(u32, T)>,
    /// Users that failed every attempt.
    pub failed: u32,
    /// The first failure, for the report.
    pub first_error: Option<String>,
    /// Time from starting a user's first attempt to its setup finishing.
    pub setup_hist: Hist,
    /// Connection attempts that were retried.
    pub retries: u32,
}

/// Runs `setup(index)` for every index of `users`, starting `ramp_per_sec`
/// per second with at most [`MAX_IN_FLIGHT`] at once, retrying failures.
pub async fn open_all<T, F, Fut>(users: Range<u32>, ramp_per_sec: f64, setup: F) -> Opened<T>
where
    T: Send + 'static,
    F: Fn(u32) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<T>> + Send + 'static,
{
    open_all_limited(users, ramp_per_sec, MAX_IN_FLIGHT, setup).await
}

/// [`open_all`] with at most `in_flight` setups at once (at least 1).
pub async fn open_all_limited<T, F, Fut>(
    users: Range<u32>,
    ramp_per_sec: f64,
    in_flight: usize,
    setup: F,
) -> Opened<T>
where
    T: Send + 'static,
    F: Fn(u32) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<T>> + Send + 'static,
{
    let setup = Arc::new(setup);
    let limit = Arc::new(Semaphore::new(in_flight.max(1)));
    let start = tokio::time::Instant::now();
    let per = Duration::from_secs_f64(1.0 / ramp_per_sec.max(1.0));
    let mut tasks = tokio::task::JoinSet::new();
    for (k, index) in users.enumerate() {
        tokio::time::sleep_until(start + per * k as u32).await;
        let permit = limit.clone().acquire_owned().await.expect("semaphore open");
        let setup = setup.clone();
        tasks.spawn(async move {
            let began = now_ns();
            let mut retries = 0;
            let mut result = setup(index).await;
            while result.is_err() && retries + 1 < CONNECT_ATTEMPTS {
                retries += 1;
                tokio::time::sleep(Duration::from_millis(200 * retries as u64)).await;
                result = setup(index).await;
            }
            drop(permit);
            (index, result, (now_ns() - began) / 1000, retries)
        });
    }
    let mut opened = Opened {
        conns: Vec::new(),
        failed: 0,
        first_error: None,
        setup_hist: Hist::new(),
        retries: 0,
    };
    while let Some(joined) = tasks.join_next().await {
        let (index, result, micros, retries) = joined.expect("setup task panicked");
        opened.retries += retries;
        match result {
            Ok(v) => {
                opened.setup_hist.record(micros);
                opened.conns.push((index, v));
            }
            Err(e) => {
                opened.failed += 1;
                opened
                    .first_error
                    .get_or_insert_with(|| format!("user {index}: {e:#}"));
            }
        }
    }
    opened.conns.sort_by_key(|(i, _)| *i);
    opened
}

/// Where a connection's inbox cursor is, and when to send DeliverAck.
#[derive(Debug, Default)]
pub struct AckTracker {
    /// Highest seq seen.
    pub last_seq: u64,
    unacked: u32,
}

/// Entries between two DeliverAcks.
pub const ACK_EVERY: u32 = 100;

impl AckTracker {
    /// Notes entry `seq`; every [`ACK_EVERY`] entries queues a cumulative
    /// DeliverAck (skipped if the queue is full: the next one covers it).
    pub fn saw(&mut self, seq: u64, tx: &mpsc::Sender<Out>) {
        self.last_seq = self.last_seq.max(seq);
        self.unacked += 1;
        if self.unacked >= ACK_EVERY {
            self.unacked = 0;
            let _ = tx.try_send(Out::Frame(
                proto::DeliverAck {
                    up_to_seq: self.last_seq,
                }
                .into(),
            ));
        }
    }
}

/// Why a read loop ended, as text for the report.
pub fn describe_end(frame: Result<Option<Frame>, ferry_protocol::client::ClientError>) -> String {
    match frame {
        Ok(None) => "closed by the server".into(),
        Ok(Some(Frame {
            body: Some(Body::Kick(k)),
        })) => format!("kicked: {:?} {}", k.reason(), k.message),
        Ok(Some(Frame {
            body: Some(Body::Error(e)),
        })) => format!("error {:?}: {}", e.code(), e.message),
        Ok(Some(f)) => format!("unexpected {:?}", f.body.map(|b| b.kind_name())),
        Err(e) => format!("read error: {e}"),
    }
}

/// Waits until `done()` or `timeout`, checking every `every`.
pub async fn wait_until(
    timeout: Duration,
    every: Duration,
    mut done: impl FnMut() -> bool,
) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(every).await;
    }
}

/// A live connection: its send queue and its reader and writer tasks.
/// Dropping it closes the connection.
pub struct Conn {
    /// The send queue (see [`Out`]).
    pub tx: mpsc::Sender<Out>,
    tasks: [tokio::task::JoinHandle<()>; 2],
}

impl Conn {
    /// Wraps a connection's send queue and tasks.
    pub fn new(
        tx: mpsc::Sender<Out>,
        writer: tokio::task::JoinHandle<()>,
        reader: tokio::task::JoinHandle<()>,
    ) -> Conn {
        Conn {
            tx,
            tasks: [writer, reader],
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Connections that ended without the harness closing them.
#[derive(Debug, Default)]
pub struct Drops {
    /// Set before the harness closes its connections on purpose.
    pub closing: std::sync::atomic::AtomicBool,
    count: AtomicU64,
    first: std::sync::Mutex<Option<String>>,
}

impl Drops {
    /// A connection ended for `why`; counts unless the harness is closing.
    pub fn record(&self, why: String) {
        if !self.closing.load(Ordering::Relaxed) {
            self.count.fetch_add(1, Ordering::Relaxed);
            self.first.lock().expect("drops lock").get_or_insert(why);
        }
    }

    /// Drops so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The reason of the first drop.
    pub fn first(&self) -> Option<String> {
        self.first.lock().expect("drops lock").clone()
    }
}
