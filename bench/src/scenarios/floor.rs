//! `floor`: the shapes of `conns`, `direct` and `group` over bare sockets
//! with nothing in between, as the baseline ferry is compared with. The
//! bare servers run in a child process (`ferry-bench floor-server`) so that
//! client and server are separate processes, as with ferry.
//!
//! - idle: N plain TCP connections to an accept-and-echo server;
//! - relay: N connections to a server that forwards every 4-byte
//!   length-prefixed frame to a random other connection, clients writing
//!   as fast as TCP lets them (no auth, no storage, no acks);
//! - fan-out: one frame written by the server to each of N sockets, timed
//!   until the last one has read it, M times.

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::{Bytes, BytesMut};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc};

use crate::clients::{open_all, tcp_connect, wait_until};
use crate::hist::{Hist, SharedHist, fmt_us};
use crate::payload::{BODY_BYTES, Payload, now_ns};
use crate::procfs::{Sampler, Watched};
use crate::report::{Outcome, Table, count, latency_cell, mib, usage_rows};
use crate::spawn::FloorServer;
use crate::target::HarnessArgs;
use crate::worker::{self, Io, Pool};

/// Frames queued per connection in the bare servers.
const SERVER_QUEUE: usize = 1024;

/// Frames a relay client writes per `write_all`, by default.
pub const WRITE_BATCH_DEFAULT: u32 = 16;

/// Relay frames in flight per connection of a worker process (written by
/// it and not yet received by it), at most [`RELAY_WINDOW_MAX`] per worker.
/// Enough to keep the relay busy, few enough that the latency is not all
/// queueing. Independent of `--relay-batch`: the same frames are in flight
/// whether they leave one per write or sixteen.
const RELAY_WINDOW: u64 = 16;

/// Upper bound of the relay window of one worker.
const RELAY_WINDOW_MAX: u64 = 4096;

/// The first frame the relay and fan-out servers send to a connection.
const WELCOME: Payload = Payload {
    sent_ns: 0,
    sender: u32::MAX,
    counter: 0,
    tag: u8::MAX,
};

/// Options of `floor`.
#[derive(Debug, Clone, clap::Args)]
pub struct FloorArgs {
    /// Idle connections.
    #[arg(long, default_value_t = 18_000)]
    pub n: u32,
    /// Relay connections.
    #[arg(long, default_value_t = 10_000)]
    pub users: u32,
    /// Seconds of relaying.
    #[arg(long, default_value_t = 30)]
    pub duration: u64,
    /// Frames a relay client writes per write (1..=64). 16 measures the
    /// relay ceiling; 1 is the shape of `direct`, one frame per syscall.
    #[arg(long, default_value_t = WRITE_BATCH_DEFAULT,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub relay_batch: u32,
    /// Fan-out connections.
    #[arg(long, default_value_t = 10_000)]
    pub members: u32,
    /// Fan-out repetitions.
    #[arg(long, default_value_t = 20)]
    pub messages: u32,
    /// Milliseconds between two fan-outs.
    #[arg(long, default_value_t = 500)]
    pub interval_ms: u64,
    #[command(flatten)]
    pub harness: HarnessArgs,
}

// ------------------------------------------------------------ the server

/// Binds a loopback listener on port 0 with a deep backlog.
fn listen() -> anyhow::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind("127.0.0.1:0".parse().expect("literal"))?;
    Ok(socket.listen(4096)?)
}

/// Live connections of one bare server: their write queues.
#[derive(Default)]
struct Peers {
    slots: RwLock<Vec<Option<mpsc::Sender<Bytes>>>>,
}

impl Peers {
    fn add(&self, tx: mpsc::Sender<Bytes>) -> usize {
        let mut slots = self.slots.write().expect("peers lock");
        if let Some(i) = slots.iter().position(Option::is_none) {
            slots[i] = Some(tx);
            i
        } else {
            slots.push(Some(tx));
            slots.len() - 1
        }
    }

    fn remove(&self, i: usize) {
        self.slots.write().expect("peers lock")[i] = None;
    }

    fn random_other(&self, me: usize, rng: &mut impl Rng) -> Option<mpsc::Sender<Bytes>> {
        let slots = self.slots.read().expect("peers lock");
        for _ in 0..32 {
            let j = rng.random_range(0..slots.len());
            if j != me
                && let Some(tx) = &slots[j]
            {
                return Some(tx.clone());
            }
        }
        None
    }

    fn all_but(&self, me: usize) -> Vec<mpsc::Sender<Bytes>> {
        let slots = self.slots.read().expect("peers lock");
        slots
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != me)
            .filter_map(|(_, s)| s.clone())
            .collect()
    }
}

/// Writes queued frames, coalescing what is queued into one write.
async fn write_queue(mut w: OwnedWriteHalf, mut rx: mpsc::Receiver<Bytes>) {
    let mut buf = BytesMut::new();
    while let Some(frame) = rx.recv().await {
        buf.extend_from_slice(&frame);
        while buf.len() < 64 * 1024 {
            match rx.try_recv() {
                Ok(more) => buf.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        if w.write_all(&buf).await.is_err() {
            return;
        }
        buf.clear();
    }
}

/// Reads one length-prefixed frame, prefix included.
async fn read_frame(r: &mut BufReader<OwnedReadHalf>) -> std::io::Result<Bytes> {
    let len = r.read_u32().await? as usize;
    if len > 64 * 1024 {
        return Err(std::io::Error::other("frame too large"));
    }
    let mut frame = BytesMut::with_capacity(4 + len);
    frame.extend_from_slice(&(len as u32).to_be_bytes());
    frame.resize(4 + len, 0);
    r.read_exact(&mut frame[4..]).await?;
    Ok(frame.freeze())
}

#[derive(Clone, Copy)]
enum Mode {
    Relay,
    Fanout,
}

async fn serve_peer(stream: TcpStream, peers: Arc<Peers>, mode: Mode) {
    let _ = stream.set_nodelay(true);
    let (r, w) = stream.into_split();
    let (tx, rx) = mpsc::channel(SERVER_QUEUE);
    // Tell the client it is registered, so nothing is sent before it is.
    let _ = tx.try_send(Bytes::copy_from_slice(&frame(&WELCOME)));
    let me = peers.add(tx);
    let writer = tokio::spawn(write_queue(w, rx));
    let mut r = BufReader::new(r);
    let mut rng = rand::rngs::SmallRng::from_rng(&mut rand::rng());
    while let Ok(frame) = read_frame(&mut r).await {
        match mode {
            Mode::Relay => {
                if let Some(tx) = peers.random_other(me, &mut rng) {
                    // Backpressure: a full queue slows this reader, and TCP the client.
                    let _ = tx.send(frame).await;
                }
            }
            Mode::Fanout => {
                for tx in peers.all_but(me) {
                    if tx.try_send(frame.clone()).is_err() {
                        eprintln!("floor-server: a fan-out queue was full");
                    }
                }
            }
        }
    }
    // The writer ends once it has written what is queued for this peer.
    peers.remove(me);
    drop(writer);
}

/// `ferry-bench floor-server`: the bare servers, until killed.
pub async fn serve() -> anyhow::Result<()> {
    let idle = listen()?;
    let relay = listen()?;
    let fanout = listen()?;
    println!(
        "floor listening: idle={} relay={} fanout={}",
        idle.local_addr()?,
        relay.local_addr()?,
        fanout.local_addr()?
    );
    tokio::spawn(async move {
        while let Ok((mut s, _)) = idle.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 256];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    if s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    for (listener, mode) in [(relay, Mode::Relay), (fanout, Mode::Fanout)] {
        let peers = Arc::new(Peers::default());
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(serve_peer(s, peers.clone(), mode));
            }
        });
    }
    std::future::pending::<()>().await;
    Ok(())
}

// ------------------------------------------------------------ the clients

/// One worker's part of one phase.
#[derive(Debug, Serialize, Deserialize)]
pub struct Job {
    phase: Phase,
    addr: SocketAddr,
    users: Range<u32>,
    source_ips: u32,
    ramp_per_sec: f64,
    messages: u32,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
enum Phase {
    Idle,
    Relay,
    Fanout,
}

#[derive(Debug, Serialize, Deserialize)]
enum Cmd {
    Connect,
    Relay {
        start_ns: u64,
        duration_ns: u64,
        batch: u32,
    },
    Send {
        k: u32,
    },
    Await {
        k: u32,
    },
    Finish,
    Close,
}

#[derive(Debug, Serialize, Deserialize)]
struct Connected {
    ok: u32,
    failed: u32,
    first_error: Option<String>,
    setup_hist: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Relayed {
    sent: u64,
    received: u64,
    in_window: u64,
    hist: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Sent {
    sent_ns: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Arrived {
    received: u64,
    expected: u64,
    last_ns: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Finished {
    hists: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Closed;

#[derive(Default)]
struct Arrivals {
    count: AtomicU64,
    last_ns: AtomicU64,
    hist: SharedHist,
}

/// What the client readers of a worker count.
struct State {
    /// Relay window: permits for frames in flight.
    window: Semaphore,
    received: AtomicU64,
    in_window: AtomicU64,
    window_end_ns: AtomicU64,
    hist: SharedHist,
    fanout: Vec<Arrivals>,
}

fn frame(p: &Payload) -> [u8; 4 + BODY_BYTES] {
    let mut f = [0u8; 4 + BODY_BYTES];
    f[..4].copy_from_slice(&(BODY_BYTES as u32).to_be_bytes());
    p.write(&mut f[4..]);
    f
}

async fn read_loop(mut r: BufReader<OwnedReadHalf>, state: Arc<State>, phase: Phase) {
    while let Ok(f) = read_frame(&mut r).await {
        let Some(p) = Payload::decode(&f[4..]) else {
            continue;
        };
        let now = now_ns();
        let micros = now.saturating_sub(p.sent_ns) / 1000;
        match phase {
            Phase::Relay => {
                state.hist.record(micros);
                state.window.add_permits(1);
                state.received.fetch_add(1, Ordering::Relaxed);
                if now <= state.window_end_ns.load(Ordering::Relaxed) {
                    state.in_window.fetch_add(1, Ordering::Relaxed);
                }
            }
            Phase::Fanout => {
                if let Some(a) = state.fanout.get(p.tag as usize) {
                    a.hist.record(micros);
                    a.last_ns.fetch_max(now, Ordering::Relaxed);
                    a.count.fetch_add(1, Ordering::Relaxed);
                }
            }
            Phase::Idle => {}
        }
    }
}

/// Writes frames as fast as TCP takes them until `end_ns`. Returns the
/// number written and the write half (kept open until the phase closes).
async fn relay_writer(
    mut w: OwnedWriteHalf,
    sender: u32,
    batch: u32,
    state: Arc<State>,
    start_ns: u64,
    end_ns: u64,
) -> (u64, OwnedWriteHalf) {
    tokio::time::sleep(Duration::from_nanos(start_ns.saturating_sub(now_ns()))).await;
    let mut counter = 0u32;
    let mut written = 0u64;
    let mut buf = Vec::with_capacity(batch as usize * (4 + BODY_BYTES));
    loop {
        // One permit per frame in flight; readers give them back.
        let left = Duration::from_nanos(end_ns.saturating_sub(now_ns()));
        match tokio::time::timeout(left, state.window.acquire_many(batch)).await {
            Ok(Ok(permit)) => permit.forget(),
            _ => break,
        }
        buf.clear();
        let sent_ns = now_ns();
        for _ in 0..batch {
            let p = Payload {
                sent_ns,
                sender,
                counter,
                tag: 0,
            };
            counter = counter.wrapping_add(1);
            buf.extend_from_slice(&frame(&p));
        }
        if w.write_all(&buf).await.is_err() {
            break;
        }
        written += u64::from(batch);
    }
    (written, w)
}

struct Client {
    index: u32,
    write: Option<OwnedWriteHalf>,
    reader: Option<tokio::task::JoinHandle<()>>,
    _stream: Option<TcpStream>,
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(r) = &self.reader {
            r.abort();
        }
    }
}

/// The worker side of one phase.
pub async fn worker(job: Job, index: usize, io: &mut Io) -> anyhow::Result<()> {
    let Cmd::Connect = io.recv().await? else {
        bail!("expected Connect")
    };
    let state = Arc::new(State {
        window: Semaphore::new(0),
        received: AtomicU64::new(0),
        in_window: AtomicU64::new(0),
        window_end_ns: AtomicU64::new(0),
        hist: SharedHist::default(),
        fanout: (0..job.messages).map(|_| Arrivals::default()).collect(),
    });
    let (addr, ips, phase) = (job.addr, job.source_ips, job.phase);
    let opened = {
        let state = state.clone();
        open_all(job.users.clone(), job.ramp_per_sec, move |i| {
            let state = state.clone();
            async move {
                let stream = tcp_connect(addr, ips, i).await?;
                if phase == Phase::Idle {
                    return Ok(Client {
                        index: i,
                        write: None,
                        reader: None,
                        _stream: Some(stream),
                    });
                }
                let (r, w) = stream.into_split();
                let mut r = BufReader::new(r);
                let welcome = read_frame(&mut r).await?;
                anyhow::ensure!(
                    Payload::decode(&welcome[4..]) == Some(WELCOME),
                    "the floor server did not welcome the connection"
                );
                Ok(Client {
                    index: i,
                    write: Some(w),
                    reader: Some(tokio::spawn(read_loop(r, state, phase))),
                    _stream: None,
                })
            }
        })
        .await
    };
    let mut clients: Vec<Client> = opened.conns.into_iter().map(|(_, c)| c).collect();
    io.reply(&Connected {
        ok: clients.len() as u32,
        failed: opened.failed,
        first_error: opened.first_error,
        setup_hist: opened.setup_hist.to_hex(),
    })
    .await?;
    let expected = job.users.clone().filter(|&i| i != 0).count() as u64;
    loop {
        match io.recv().await? {
            Cmd::Relay {
                start_ns,
                duration_ns,
                batch,
            } => {
                let end_ns = start_ns + duration_ns;
                state.window_end_ns.store(end_ns, Ordering::Relaxed);
                let mut writers = tokio::task::JoinSet::new();
                let conns = clients.len() as u64;
                state
                    .window
                    .add_permits((RELAY_WINDOW * conns).min(RELAY_WINDOW_MAX) as usize);
                for (slot, c) in clients.iter_mut().enumerate() {
                    let w = c.write.take().context("relay writer already used")?;
                    let index = c.index;
                    let state = state.clone();
                    writers.spawn(async move {
                        (
                            slot,
                            relay_writer(w, index, batch, state, start_ns, end_ns).await,
                        )
                    });
                }
                let mut sent = 0;
                while let Some(joined) = writers.join_next().await {
                    let (slot, (n, w)) = joined.context("relay writer panicked")?;
                    sent += n;
                    clients[slot].write = Some(w);
                }
                // Let what is in flight arrive: stop when everything did, or
                // when the count has been stable for a while.
                let mut last = u64::MAX;
                wait_until(Duration::from_secs(5), Duration::from_millis(250), || {
                    let now = state.received.load(Ordering::Relaxed);
                    let stable = now == last || now >= sent;
                    last = now;
                    stable
                })
                .await;
                io.reply(&Relayed {
                    sent,
                    received: state.received.load(Ordering::Relaxed),
                    in_window: state.in_window.load(Ordering::Relaxed),
                    hist: state.hist.take().to_hex(),
                })
                .await?;
            }
            Cmd::Send { k } => {
                anyhow::ensure!(index == 0, "only worker 0 sends fan-outs");
                let c = clients
                    .first_mut()
                    .filter(|c| c.index == 0)
                    .context("connection 0 is not open")?;
                let w = c.write.as_mut().context("no writer")?;
                let sent_ns = now_ns();
                let p = Payload {
                    sent_ns,
                    sender: 0,
                    counter: k,
                    tag: k as u8,
                };
                w.write_all(&frame(&p)).await?;
                io.reply(&Sent { sent_ns }).await?;
            }
            Cmd::Await { k } => {
                let a = state.fanout.get(k as usize).context("no such message")?;
                wait_until(Duration::from_secs(60), Duration::from_millis(2), || {
                    a.count.load(Ordering::Relaxed) >= expected
                })
                .await;
                io.reply(&Arrived {
                    received: a.count.load(Ordering::Relaxed),
                    expected,
                    last_ns: a.last_ns.load(Ordering::Relaxed),
                })
                .await?;
            }
            Cmd::Finish => {
                let hists = state
                    .fanout
                    .iter()
                    .map(|a| a.hist.take().to_hex())
                    .collect();
                io.reply(&Finished { hists }).await?;
            }
            Cmd::Close => {
                drop(clients);
                return io.reply(&Closed).await;
            }
            Cmd::Connect => bail!("Connect twice"),
        }
    }
}

/// Starts the workers of one phase and connects them.
async fn connect_phase(
    phase: Phase,
    addr: SocketAddr,
    n: u32,
    messages: u32,
    h: &HarnessArgs,
    sampler: &Sampler,
) -> anyhow::Result<(Pool, Hist, f64, u32)> {
    let slices = worker::slices(n, h.per_process);
    let workers = slices.len();
    let jobs = slices
        .into_iter()
        .map(|users| {
            worker::Job::Floor(Job {
                phase,
                addr,
                users,
                source_ips: h.source_ips,
                ramp_per_sec: h.ramp / workers as f64,
                messages,
            })
        })
        .collect();
    let mut pool = Pool::start(jobs).await?;
    sampler.add_harness(pool.pids());
    let t0 = now_ns();
    let connected: Vec<Connected> = pool.ask(&Cmd::Connect).await?;
    let secs = (now_ns() - t0) as f64 / 1e9;
    let failed: u32 = connected.iter().map(|c| c.failed).sum();
    if failed > 0 {
        bail!(
            "floor {phase:?}: {failed} connections failed: {}",
            connected
                .iter()
                .find_map(|c| c.first_error.clone())
                .unwrap_or_default()
        );
    }
    let mut hist = Hist::new();
    for c in &connected {
        hist.merge(&Hist::from_hex(&c.setup_hist)?);
    }
    Ok((pool, hist, secs, workers as u32))
}

/// Runs `floor` and prints its table.
pub async fn run(args: &FloorArgs) -> anyhow::Result<Outcome> {
    let h = &args.harness;
    anyhow::ensure!(
        args.users >= 2 && args.members >= 2,
        "need at least 2 connections"
    );
    anyhow::ensure!(
        (1..=250).contains(&args.messages),
        "--messages must be in 1..=250"
    );
    if h.source_ips > 0 {
        anyhow::ensure!(h.source_ips <= 250, "--source-ips is at most 250");
    }
    let mut server = FloorServer::spawn().await?;
    let sampler = Sampler::start(Watched {
        server: Some(server.pid),
        harness: vec![std::process::id()],
    });
    tokio::time::sleep(Duration::from_millis(500)).await;

    // (a) idle connections
    eprintln!("floor: {} idle connections…", args.n);
    let rss_before = sampler.server_rss_now();
    let fds_before = crate::procfs::open_fds(server.pid);
    let t0 = now_ns();
    let (mut pool, idle_hist, idle_secs, idle_workers) =
        connect_phase(Phase::Idle, server.idle, args.n, 1, h, &sampler).await?;
    let t1 = now_ns();
    // Connections complete in the kernel before the server accepts them:
    // wait until it holds a descriptor for each.
    let baseline_fds = fds_before.unwrap_or(0);
    wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        crate::procfs::open_fds(server.pid).is_some_and(|n| n >= baseline_fds + args.n as usize)
    })
    .await;
    let rss_after = sampler.server_rss_now();
    let _: Vec<Closed> = pool.ask(&Cmd::Close).await?;
    pool.finish().await?;
    let idle_usage = sampler.usage(t0, t1).await;
    let idle_rate = args.n as f64 / idle_secs;
    let per_conn = match (rss_before, rss_after) {
        (Some(b), Some(a)) => Some((a as f64 - b as f64) * 1024.0 / args.n as f64),
        _ => None,
    };
    tokio::time::sleep(Duration::from_secs(1)).await;

    // (b) relay at the maximum rate
    eprintln!(
        "floor: relay over {} connections for {} s…",
        args.users, args.duration
    );
    let (mut pool, _, relay_connect_secs, relay_workers) =
        connect_phase(Phase::Relay, server.relay, args.users, 1, h, &sampler).await?;
    let start_ns = now_ns() + 200_000_000;
    let duration_ns = args.duration * 1_000_000_000;
    let relayed: Vec<Relayed> = pool
        .ask(&Cmd::Relay {
            start_ns,
            duration_ns,
            batch: args.relay_batch,
        })
        .await?;
    let relay_usage = sampler.usage(start_ns, start_ns + duration_ns).await;
    let _: Vec<Closed> = pool.ask(&Cmd::Close).await?;
    pool.finish().await?;
    let mut relay_hist = Hist::new();
    for r in &relayed {
        relay_hist.merge(&Hist::from_hex(&r.hist)?);
    }
    let relay_sent: u64 = relayed.iter().map(|r| r.sent).sum();
    let relay_received: u64 = relayed.iter().map(|r| r.received).sum();
    let relay_in_window: u64 = relayed.iter().map(|r| r.in_window).sum();
    let relay_rate = relay_in_window as f64 / args.duration as f64;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // (c) fan-out
    eprintln!(
        "floor: fan-out to {} connections × {}…",
        args.members, args.messages
    );
    let (mut pool, _, fan_connect_secs, fan_workers) = connect_phase(
        Phase::Fanout,
        server.fanout,
        args.members,
        args.messages,
        h,
        &sampler,
    )
    .await?;
    let mut p100s = Vec::new();
    let mut missing = 0u64;
    for k in 0..args.messages {
        pool.send(0, &Cmd::Send { k }).await?;
        let sent: Sent = pool.recv(0).await?;
        let arrived: Vec<Arrived> = pool.ask(&Cmd::Await { k }).await?;
        let last = arrived.iter().map(|a| a.last_ns).max().unwrap_or(0);
        missing += arrived
            .iter()
            .map(|a| a.expected.saturating_sub(a.received))
            .sum::<u64>();
        p100s.push(last.saturating_sub(sent.sent_ns) / 1000);
        let next = sent.sent_ns + args.interval_ms * 1_000_000;
        tokio::time::sleep(Duration::from_nanos(next.saturating_sub(now_ns()))).await;
    }
    let finished: Vec<Finished> = pool.ask(&Cmd::Finish).await?;
    let _: Vec<Closed> = pool.ask(&Cmd::Close).await?;
    pool.finish().await?;
    server.stop().await;
    let mut fan_hist = Hist::new();
    for f in &finished {
        for hex in &f.hists {
            fan_hist.merge(&Hist::from_hex(hex)?);
        }
    }
    let mut sorted = p100s.clone();
    sorted.sort_unstable();
    let p100_median = sorted[sorted.len() / 2];
    let p100_max = *sorted.last().expect("at least one message");

    let mut t = Table::new("floor: bare sockets, no ferry (baseline)");
    t.row(
        "idle: connect rate",
        format!(
            "{idle_rate:.0} conns/s for {} (ramp {}/s, {} process(es))",
            count(args.n as u64),
            h.ramp,
            idle_workers
        ),
    )
    .row(
        "idle: connect latency p50/p99/p99.9/max",
        latency_cell(&idle_hist.summary()),
    )
    .row(
        "idle: bare server memory per connection",
        per_conn
            .map(|b| format!("{:.1} KiB ({b:.0} bytes)", b / 1024.0))
            .unwrap_or_else(|| "n/a".into()),
    )
    .row(
        "relay: msgs/s at max rate",
        format!(
            "{relay_rate:.0} ({} connections, {} process(es), {} s, {} frame(s) per write)",
            count(args.users as u64),
            relay_workers,
            args.duration,
            args.relay_batch
        ),
    )
    .row(
        "relay: sent / received",
        format!("{} / {}", count(relay_sent), count(relay_received)),
    )
    .row(
        "relay: latency at saturation p50/p99/p99.9/max",
        latency_cell(&relay_hist.summary()),
    )
    .row(
        "fan-out: p100 median / max",
        format!(
            "{} / {} ({} connections, {} process(es))",
            fmt_us(p100_median),
            fmt_us(p100_max),
            count(args.members as u64),
            fan_workers
        ),
    )
    .row(
        "fan-out: all deliveries p50/p99/p99.9/max",
        latency_cell(&fan_hist.summary()),
    )
    .row("fan-out: missing deliveries", missing)
    .row("bare server peak RSS", mib(relay_usage.server_peak_rss_mib));
    usage_rows(&mut t, "relay", &relay_usage);
    t.print();

    let mut failures = Vec::new();
    if missing > 0 {
        failures.push(format!("floor fan-out: {missing} deliveries missing"));
    }
    let json = json!({
        "idle": {
            "connections": args.n,
            "processes": idle_workers,
            "connect_secs": idle_secs,
            "connect_rate_per_sec": idle_rate,
            "connect_latency": idle_hist.summary(),
            "server_rss_before_kib": rss_before,
            "server_rss_after_kib": rss_after,
            "server_bytes_per_connection": per_conn,
            "usage": idle_usage,
        },
        "relay": {
            "connections": args.users,
            "processes": relay_workers,
            "frames_per_write": args.relay_batch,
            "connect_secs": relay_connect_secs,
            "duration_secs": args.duration,
            "sent": relay_sent,
            "received": relay_received,
            "received_in_window": relay_in_window,
            "msgs_per_sec": relay_rate,
            "latency": relay_hist.summary(),
            "usage": relay_usage,
        },
        "fanout": {
            "connections": args.members,
            "processes": fan_workers,
            "connect_secs": fan_connect_secs,
            "messages": args.messages,
            "interval_ms": args.interval_ms,
            "p100_us": p100s,
            "p100_median_us": p100_median,
            "p100_max_us": p100_max,
            "latency": fan_hist.summary(),
            "missing_deliveries": missing,
        },
    });
    Ok(Outcome {
        name: "floor",
        json,
        failures,
    })
}
