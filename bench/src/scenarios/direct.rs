//! `direct`: N connected users sending one-to-one messages to random other
//! users at a total offered rate, in steps of increasing rate on the same
//! connections.
//!
//! Each worker paces its users with a central ticker (every 10 ms it queues
//! the sends that are due, round-robin over its users, so every user sends
//! at the same steady rate). Latencies: send→SendAck at the sender, and
//! send→Deliver at the recipient, from the timestamp in the body. After each
//! step the harness waits up to 5 s for every send to be answered and for
//! what was acknowledged to arrive, then counts loss (acknowledged but not
//! delivered) and duplicates (the same (sender, counter) delivered twice).
//! A step that is still not answered after 5 s is reported as overloaded;
//! its loss cannot be told from lateness and is not counted. Acks and
//! deliveries of an earlier step that arrive later are counted apart.
//!
//! In a spawned cluster the harness knows every user's home node (the
//! placement every node computes); `--cross-node` then sends every message
//! to a recipient homed on another node than its sender, so that each one
//! crosses the NSQ bus. Without it about (N-1)/N of them do; both are counted.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use ferry_protocol::client::FrameReader;
use ferry_protocol::proto::{self, EntryKind, Frame, frame::Body};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::mpsc;

use crate::clients::{
    AckTracker, Conn, Drops, Fleet, OUT_QUEUE, Out, Tokens, WriterStats, describe_end, open_all,
    read_login_sync, spawn_writer,
};
use crate::hist::{Hist, SharedHist};
use crate::payload::{Payload, micros_since, now_ns};
use crate::report::{Outcome, Table, count, latency_cell, mib};
use crate::server_metrics::ServerFigures;
use crate::target::{CommonArgs, Target};
use crate::worker::{self, Io, Pool};

/// How long after a step's sending ends the harness waits for its messages.
const DRAIN: Duration = Duration::from_secs(5);

/// How often the pacer queues due sends.
const TICK: Duration = Duration::from_millis(10);

/// Options of `direct`.
#[derive(Debug, Clone, clap::Args)]
pub struct DirectArgs {
    /// Users, all connected for the whole run.
    #[arg(long, default_value_t = 10_000)]
    pub users: u32,
    /// Offered msgs/s (total) of each step; steps run one after another.
    #[arg(long, value_delimiter = ',', default_values_t = [20_000u32, 50_000])]
    pub rate: Vec<u32>,
    /// Seconds of each step.
    #[arg(long, default_value_t = 30)]
    pub duration: u64,
    /// Every recipient is homed on another node than its sender (needs --spawn-cluster).
    #[arg(long)]
    pub cross_node: bool,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// One worker's part.
#[derive(Debug, Serialize, Deserialize)]
pub struct Job {
    fleet: Fleet,
    cross_node: bool,
}

/// Who a user sends to.
struct Recipients {
    /// Home node of every user of the run (in a spawned cluster).
    homes: Option<Vec<u16>>,
    /// With `--cross-node`: per node, every user homed elsewhere.
    elsewhere: Option<HashMap<u16, Vec<u32>>>,
}

impl Recipients {
    fn new(fleet: &Fleet, cross_node: bool) -> anyhow::Result<Recipients> {
        let homes: Option<Vec<u16>> = fleet.cluster.as_ref().map(|_| {
            (0..fleet.total_users)
                .map(|i| fleet.home(i).expect("a cluster"))
                .collect()
        });
        let elsewhere = match (&homes, &fleet.cluster) {
            (Some(homes), Some(map)) if cross_node => {
                let mut by = HashMap::new();
                for node in map.nodes() {
                    let others: Vec<u32> = (0..fleet.total_users)
                        .filter(|&i| homes[i as usize] != node.id)
                        .collect();
                    anyhow::ensure!(
                        !others.is_empty() || !homes.contains(&node.id),
                        "every user is homed on node {}: --cross-node needs more --users",
                        node.id
                    );
                    by.insert(node.id, others);
                }
                Some(by)
            }
            _ if cross_node => bail!("--cross-node needs --spawn-cluster"),
            _ => None,
        };
        Ok(Recipients { homes, elsewhere })
    }

    /// A random recipient for `me` (never `me`).
    fn pick(&self, me: u32, total: u32, rng: &mut impl Rng) -> u32 {
        if let (Some(homes), Some(elsewhere)) = (&self.homes, &self.elsewhere) {
            let others = &elsewhere[&homes[me as usize]];
            return others[rng.random_range(0..others.len())];
        }
        let to = rng.random_range(0..total - 1);
        if to >= me { to + 1 } else { to }
    }

    /// Whether a message from `from` to `to` crosses the bus (`false`
    /// outside a cluster).
    fn crosses(&self, from: u32, to: u32) -> bool {
        self.homes
            .as_ref()
            .is_some_and(|h| h[from as usize] != h[to as usize])
    }
}

#[derive(Debug, Serialize, Deserialize)]
enum Cmd {
    Connect,
    Step {
        tag: u8,
        rate: f64,
        start_ns: u64,
        duration_ns: u64,
    },
    Poll,
    Finish,
    Close,
}

#[derive(Debug, Serialize, Deserialize)]
struct Connected {
    ok: u32,
    failed: u32,
    retries: u32,
    first_error: Option<String>,
    setup_hist: String,
    max_frames_per_sec: u32,
}

#[derive(Debug, Serialize, Deserialize)]
struct StepSent {
    sent: u64,
    skipped: u64,
    /// Of `sent`, those to a recipient homed on another node.
    cross_node: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Progress {
    received: u64,
    acked: u64,
    send_errors: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct StepDone {
    acked: u64,
    send_errors: u64,
    late_acks: u64,
    first_send_error: Option<String>,
    ack_hist: String,
    received: u64,
    in_window: u64,
    dups: u64,
    late: u64,
    foreign: u64,
    drops: u64,
    first_drop: Option<String>,
    deliver_hist: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Closed;

/// Shared by a worker's connections.
#[derive(Default)]
struct State {
    /// Tag of the running step.
    tag: AtomicU8,
    /// Acks of messages stamped before this instant belong to earlier steps.
    step_start_ns: AtomicU64,
    /// Deliveries after this instant are outside the step's window.
    window_end_ns: AtomicU64,
    received: AtomicU64,
    in_window: AtomicU64,
    dups: AtomicU64,
    late: AtomicU64,
    foreign: AtomicU64,
    acked: AtomicU64,
    late_acks: AtomicU64,
    send_errors: AtomicU64,
    first_send_error: std::sync::Mutex<Option<String>>,
    ack_hist: SharedHist,
    deliver_hist: SharedHist,
    drops: Drops,
    writer: Arc<WriterStats>,
    /// Set while a step is being counted (deliveries before the first step are foreign).
    counting: AtomicBool,
}

impl State {
    fn reset_step(&self, tag: u8, start_ns: u64, window_end_ns: u64) {
        for c in [
            &self.received,
            &self.in_window,
            &self.dups,
            &self.late,
            &self.foreign,
            &self.acked,
            &self.late_acks,
            &self.send_errors,
        ] {
            c.store(0, Ordering::Relaxed);
        }
        self.ack_hist.take();
        self.deliver_hist.take();
        self.tag.store(tag, Ordering::Relaxed);
        self.step_start_ns.store(start_ns, Ordering::Relaxed);
        self.window_end_ns.store(window_end_ns, Ordering::Relaxed);
        self.counting.store(true, Ordering::Relaxed);
    }
}

/// One user's receiving side.
struct Receiver {
    me: String,
    state: Arc<State>,
    tx: mpsc::Sender<Out>,
    acks: AckTracker,
    /// (sender, counter) of every message received, for duplicates.
    seen: HashSet<u64>,
}

impl Receiver {
    fn entry(&mut self, d: proto::Deliver) {
        self.acks.saw(d.seq, &self.tx);
        if d.kind() != EntryKind::Message || d.client_msg_id != 0 || d.from == self.me {
            return; // a copy of our own message, or not a message
        }
        let s = &self.state;
        let Some(p) = Payload::decode(&d.body) else {
            s.foreign.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if !self.seen.insert(p.id()) {
            s.dups.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if !s.counting.load(Ordering::Relaxed) || p.tag != s.tag.load(Ordering::Relaxed) {
            s.late.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let now = now_ns();
        s.deliver_hist.record(now.saturating_sub(p.sent_ns) / 1000);
        s.received.fetch_add(1, Ordering::Relaxed);
        if now <= s.window_end_ns.load(Ordering::Relaxed) {
            s.in_window.fetch_add(1, Ordering::Relaxed);
        }
    }

    async fn run(mut self, mut reader: FrameReader, initial: Vec<proto::Deliver>) {
        for d in initial {
            self.entry(d);
        }
        loop {
            let frame = reader.recv().await;
            match frame {
                Ok(Some(Frame {
                    body: Some(Body::SendAck(a)),
                })) => {
                    // client_msg_id is the send stamp (see Out::Stamped).
                    let s = &self.state;
                    if a.client_msg_id < s.step_start_ns.load(Ordering::Relaxed) {
                        s.late_acks.fetch_add(1, Ordering::Relaxed);
                    } else {
                        s.ack_hist.record(micros_since(a.client_msg_id));
                        s.acked.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(Some(Frame {
                    body: Some(Body::Deliver(d)),
                })) => self.entry(d),
                Ok(Some(Frame {
                    body: Some(Body::SyncBatch(b)),
                })) => {
                    for d in b.entries {
                        self.entry(d);
                    }
                }
                Ok(Some(Frame {
                    body: Some(Body::Error(e)),
                })) if !e.closing => {
                    if e.client_msg_id != 0 {
                        self.state.send_errors.fetch_add(1, Ordering::Relaxed);
                    }
                    self.state
                        .first_send_error
                        .lock()
                        .expect("lock")
                        .get_or_insert_with(|| format!("{:?}: {}", e.code(), e.message));
                }
                Ok(Some(Frame {
                    body: Some(Body::Kick(_) | Body::Error(_)),
                }))
                | Ok(None)
                | Err(_) => {
                    self.state.drops.record(describe_end(frame));
                    return;
                }
                Ok(Some(_)) => {}
            }
        }
    }
}

/// Queues the step's sends: `rate` per second from `start_ns` for
/// `duration_ns`, round-robin over `conns`. Returns (queued, skipped because
/// a connection's queue was full).
async fn pace(
    conns: &[(u32, Conn)],
    fleet: &Fleet,
    recipients: &Recipients,
    counters: &mut [u32],
    cursor: &mut usize,
    step: (u8, f64, u64, u64),
) -> StepSent {
    let (tag, rate, start_ns, duration_ns) = step;
    let mut rng = rand::rngs::SmallRng::from_rng(&mut rand::rng());
    let (mut sent, mut skipped, mut issued, mut cross) = (0u64, 0u64, 0u64, 0u64);
    let end_ns = start_ns + duration_ns;
    let total = fleet.total_users;
    tokio::time::sleep(Duration::from_nanos(start_ns.saturating_sub(now_ns()))).await;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let now = now_ns().min(end_ns);
        let due = ((now - start_ns) as f64 / 1e9 * rate) as u64;
        while issued < due {
            issued += 1;
            let (me, conn) = &conns[*cursor];
            let slot = *cursor;
            *cursor = (*cursor + 1) % conns.len();
            let to = recipients.pick(*me, total, &mut rng);
            let out = Out::Stamped {
                to: fleet.direct_to(to),
                counter: counters[slot],
                tag,
            };
            match conn.tx.try_send(out) {
                Ok(()) => {
                    counters[slot] += 1;
                    sent += 1;
                    cross += u64::from(recipients.crosses(*me, to));
                }
                Err(_) => skipped += 1,
            }
        }
        if now >= end_ns {
            return StepSent {
                sent,
                skipped,
                cross_node: cross,
            };
        }
    }
}

/// The worker side.
pub async fn worker(job: Job, _index: usize, io: &mut Io) -> anyhow::Result<()> {
    let tokens = Arc::new(Tokens::mint(&job.fleet));
    let recipients = Recipients::new(&job.fleet, job.cross_node)?;
    let Cmd::Connect = io.recv().await? else {
        bail!("expected Connect")
    };
    let state = Arc::new(State::default());
    let fleet = Arc::new(job.fleet);
    let ping = Duration::from_secs(fleet.ping_secs);
    let max_fps = Arc::new(AtomicU64::new(u64::MAX));
    let opened = {
        let (state, fleet, max_fps) = (state.clone(), fleet.clone(), max_fps.clone());
        open_all(fleet.users.clone(), fleet.ramp_per_sec, move |i| {
            let (state, fleet, tokens, max_fps) = (
                state.clone(),
                fleet.clone(),
                tokens.clone(),
                max_fps.clone(),
            );
            async move {
                let (mut reader, writer, ok) = fleet.login(&tokens, i, 0, false).await?;
                max_fps.fetch_min(ok.max_frames_per_sec as u64, Ordering::Relaxed);
                let initial = read_login_sync(&mut reader).await?;
                let (tx, rx) = mpsc::channel(OUT_QUEUE);
                let w = spawn_writer(writer, i, rx, ping, state.writer.clone());
                let receiver = Receiver {
                    me: fleet.user_id(i),
                    state,
                    tx: tx.clone(),
                    acks: AckTracker::default(),
                    seen: HashSet::new(),
                };
                let r = tokio::spawn(receiver.run(reader, initial));
                Ok(Conn::new(tx, w, r))
            }
        })
        .await
    };
    let conns = opened.conns;
    io.reply(&Connected {
        ok: conns.len() as u32,
        failed: opened.failed,
        retries: opened.retries,
        first_error: opened.first_error,
        setup_hist: opened.setup_hist.to_hex(),
        max_frames_per_sec: max_fps.load(Ordering::Relaxed).min(u32::MAX as u64) as u32,
    })
    .await?;

    let mut counters = vec![0u32; conns.len()];
    let mut cursor = 0usize;
    loop {
        match io.recv().await? {
            Cmd::Step {
                tag,
                rate,
                start_ns,
                duration_ns,
            } => {
                state.reset_step(tag, start_ns, start_ns + duration_ns);
                let sent = if conns.is_empty() {
                    StepSent {
                        sent: 0,
                        skipped: 0,
                        cross_node: 0,
                    }
                } else {
                    let step = (tag, rate, start_ns, duration_ns);
                    let (c, r) = (&mut counters, &mut cursor);
                    pace(&conns, &fleet, &recipients, c, r, step).await
                };
                io.reply(&sent).await?;
            }
            Cmd::Poll => {
                io.reply(&Progress {
                    received: state.received.load(Ordering::Relaxed),
                    acked: state.acked.load(Ordering::Relaxed),
                    send_errors: state.send_errors.load(Ordering::Relaxed),
                })
                .await?
            }
            Cmd::Finish => {
                state.counting.store(false, Ordering::Relaxed);
                let first_send_error = state.first_send_error.lock().expect("lock").clone();
                io.reply(&StepDone {
                    acked: state.acked.load(Ordering::Relaxed),
                    send_errors: state.send_errors.load(Ordering::Relaxed),
                    late_acks: state.late_acks.load(Ordering::Relaxed),
                    first_send_error,
                    ack_hist: state.ack_hist.take().to_hex(),
                    received: state.received.load(Ordering::Relaxed),
                    in_window: state.in_window.load(Ordering::Relaxed),
                    dups: state.dups.load(Ordering::Relaxed),
                    late: state.late.load(Ordering::Relaxed),
                    foreign: state.foreign.load(Ordering::Relaxed),
                    drops: state.drops.count(),
                    first_drop: state.drops.first(),
                    deliver_hist: state.deliver_hist.take().to_hex(),
                })
                .await?;
            }
            Cmd::Close => {
                state.drops.closing.store(true, Ordering::Relaxed);
                drop(conns);
                return io.reply(&Closed).await;
            }
            Cmd::Connect => bail!("Connect twice"),
        }
    }
}

/// Figures of one step.
#[derive(Debug, Serialize)]
struct StepFigures {
    offered_per_sec: u32,
    duration_secs: u64,
    sent: u64,
    sent_per_sec: f64,
    /// Of `sent`, those to a recipient homed on another node (cluster).
    cross_node_sent: u64,
    skipped_queue_full: u64,
    acked: u64,
    send_errors: u64,
    /// Sends with neither SendAck nor Error when the drain ended.
    unacked: u64,
    /// SendAcks of earlier steps' messages that arrived during this step.
    late_acks: u64,
    /// Every send was answered and everything acknowledged was delivered
    /// within the drain period.
    drained: bool,
    delivered_in_window: u64,
    delivered_per_sec: f64,
    delivered_total: u64,
    /// Acknowledged but not delivered by the end of the drain; `None` when
    /// sends were still unanswered (the server is overloaded and the count
    /// would be meaningless).
    lost: Option<u64>,
    duplicates: u64,
    late_from_earlier_steps: u64,
    foreign: u64,
    drained_secs: f64,
    ack_latency: crate::hist::Summary,
    deliver_latency: crate::hist::Summary,
    usage: crate::procfs::Usage,
    /// From the server's `/metrics`, over the step and its drain.
    server: ServerFigures,
}

/// Runs `direct` and prints its table.
pub async fn run(args: &DirectArgs) -> anyhow::Result<Outcome> {
    let common = &args.common;
    anyhow::ensure!(args.users >= 2, "--users must be at least 2");
    anyhow::ensure!(!args.rate.is_empty(), "--rate needs at least one step");
    anyhow::ensure!(args.rate.len() <= 250, "at most 250 steps");
    anyhow::ensure!(args.duration >= 1, "--duration must be at least 1");
    anyhow::ensure!(
        !args.cross_node || common.spawn_cluster.is_some(),
        "--cross-node needs --spawn-cluster N (the harness must know every user's home node)"
    );
    let mut target = Target::open(common).await?;
    let spread = target.spread("users", args.users);
    let slices = worker::slices(args.users, common.harness.per_process);
    let workers = slices.len();
    let shares: Vec<f64> = slices
        .iter()
        .map(|s| s.len() as f64 / args.users as f64)
        .collect();
    let jobs = slices
        .into_iter()
        .map(|users| {
            worker::Job::Direct(Job {
                fleet: target.fleet(common, users, args.users, workers),
                cross_node: args.cross_node,
            })
        })
        .collect();
    let mut pool = Pool::start(jobs).await?;
    target.sampler.add_harness(pool.pids());
    eprintln!(
        "direct: connecting {} users over {} process(es)…",
        args.users, workers
    );
    let t0 = now_ns();
    let connected: Vec<Connected> = pool.ask(&Cmd::Connect).await?;
    let connect_secs = (now_ns() - t0) as f64 / 1e9;
    let failed: u32 = connected.iter().map(|c| c.failed).sum();
    if failed > 0 {
        bail!(
            "{failed} users could not connect: {}",
            connected
                .iter()
                .find_map(|c| c.first_error.clone())
                .unwrap_or_default()
        );
    }
    let max_fps = connected
        .iter()
        .map(|c| c.max_frames_per_sec)
        .min()
        .unwrap_or(u32::MAX);
    let top = *args.rate.iter().max().expect("non-empty") as f64;
    let per_user = top / args.users as f64;
    // Each user sends per_user Sends/s plus a DeliverAck per 100 entries.
    anyhow::ensure!(
        per_user * 1.1 <= max_fps as f64 * 0.5,
        "{per_user:.0} msgs/s per user is too close to the server's limit of {max_fps} \
         frames/s per connection: use more --users or raise --max-frames-per-sec"
    );

    let mut steps = Vec::new();
    for (k, &rate) in args.rate.iter().enumerate() {
        let tag = k as u8;
        let duration_ns = args.duration * 1_000_000_000;
        // Before the start is set: the scrape must not eat the 200 ms lead.
        let metrics_before = target.scrape().await;
        let start_ns = now_ns() + 200_000_000;
        eprintln!(
            "direct: step {}: {rate} msgs/s for {} s…",
            k + 1,
            args.duration
        );
        for (w, share) in shares.iter().enumerate() {
            pool.send(
                w,
                &Cmd::Step {
                    tag,
                    rate: rate as f64 * share,
                    start_ns,
                    duration_ns,
                },
            )
            .await?;
        }
        let sent: Vec<StepSent> = pool.gather().await?;
        let end_ns = start_ns + duration_ns;
        let n_sent: u64 = sent.iter().map(|s| s.sent).sum();
        // Drain: wait until every send is answered and everything
        // acknowledged has arrived, or 5 s.
        let drain_deadline = end_ns + DRAIN.as_nanos() as u64;
        let drained = loop {
            let progress: Vec<Progress> = pool.ask(&Cmd::Poll).await?;
            let received: u64 = progress.iter().map(|p| p.received).sum();
            let acked: u64 = progress.iter().map(|p| p.acked).sum();
            let errors: u64 = progress.iter().map(|p| p.send_errors).sum();
            if acked + errors >= n_sent && received >= acked {
                break true;
            }
            if now_ns() >= drain_deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let drained_secs = now_ns().saturating_sub(end_ns) as f64 / 1e9;
        let done: Vec<StepDone> = pool.ask(&Cmd::Finish).await?;
        target.check_alive()?;
        let server =
            ServerFigures::between(metrics_before.as_ref(), target.scrape().await.as_ref());
        let usage = target.sampler.usage(start_ns, end_ns).await;

        let mut ack_hist = Hist::new();
        let mut deliver_hist = Hist::new();
        for d in &done {
            ack_hist.merge(&Hist::from_hex(&d.ack_hist).context("ack histogram")?);
            deliver_hist.merge(&Hist::from_hex(&d.deliver_hist).context("deliver histogram")?);
        }
        let sum = |f: fn(&StepSent) -> u64| sent.iter().map(f).sum::<u64>();
        let sumd = |f: fn(&StepDone) -> u64| done.iter().map(f).sum::<u64>();
        let (acked, n_errors) = (sumd(|d| d.acked), sumd(|d| d.send_errors));
        let unacked = n_sent.saturating_sub(acked + n_errors);
        let received = sumd(|d| d.received);
        let in_window = sumd(|d| d.in_window);
        let secs = args.duration as f64;
        let fig = StepFigures {
            offered_per_sec: rate,
            duration_secs: args.duration,
            sent: n_sent,
            sent_per_sec: n_sent as f64 / secs,
            cross_node_sent: sum(|s| s.cross_node),
            skipped_queue_full: sum(|s| s.skipped),
            acked,
            send_errors: n_errors,
            unacked,
            late_acks: sumd(|d| d.late_acks),
            drained,
            delivered_in_window: in_window,
            delivered_per_sec: in_window as f64 / secs,
            delivered_total: received,
            lost: (unacked == 0).then(|| acked.saturating_sub(received)),
            duplicates: sumd(|d| d.dups),
            late_from_earlier_steps: sumd(|d| d.late),
            foreign: sumd(|d| d.foreign),
            drained_secs,
            ack_latency: ack_hist.summary(),
            deliver_latency: deliver_hist.summary(),
            usage,
            server,
        };
        let drops = sumd(|d| d.drops);
        if drops > 0 {
            bail!(
                "{drops} connections were closed by the server during step {}: {}",
                k + 1,
                done.iter()
                    .find_map(|d| d.first_drop.clone())
                    .unwrap_or_default()
            );
        }
        if n_errors > 0 {
            eprintln!(
                "direct: {n_errors} sends refused, e.g. {}",
                done.iter()
                    .find_map(|d| d.first_send_error.clone())
                    .unwrap_or_default()
            );
        }
        steps.push(fig);
    }
    let _: Vec<Closed> = pool.ask(&Cmd::Close).await?;
    pool.finish().await?;
    let describe = target.describe();
    let processes = target.close().await;

    let mut header = vec![String::new()];
    header.extend((1..=steps.len()).map(|k| format!("step {k}")));
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    let mut t = Table::with_header(
        format!(
            "direct: {} users, {} process(es), connected in {connect_secs:.1} s",
            args.users, workers
        ),
        &header,
    );
    let row = |t: &mut Table, label: &str, f: &dyn Fn(&StepFigures) -> String| {
        let mut cells = vec![label.to_owned()];
        cells.extend(steps.iter().map(f));
        t.cells(cells);
    };
    row(&mut t, "offered msgs/s", &|s| {
        count(s.offered_per_sec as u64)
    });
    row(&mut t, "sent msgs/s", &|s| format!("{:.0}", s.sent_per_sec));
    row(&mut t, "delivered msgs/s (in window)", &|s| {
        format!("{:.0}", s.delivered_per_sec)
    });
    if spread.is_some() {
        row(&mut t, "sent across nodes", &|s| count(s.cross_node_sent));
    }
    row(&mut t, "sent / acked", &|s| {
        format!("{} / {}", count(s.sent), count(s.acked))
    });
    row(&mut t, "delivered (after drain)", &|s| {
        count(s.delivered_total)
    });
    row(&mut t, "lost / duplicated", &|s| {
        let lost = s
            .lost
            .map(|l| l.to_string())
            .unwrap_or_else(|| "n/a".into());
        format!("{lost} / {}", s.duplicates)
    });
    row(&mut t, "send errors / unacked / skipped", &|s| {
        format!(
            "{} / {} / {}",
            s.send_errors, s.unacked, s.skipped_queue_full
        )
    });
    row(&mut t, "drained", &|s| {
        if s.drained {
            format!("yes, in {:.2} s", s.drained_secs)
        } else if s.unacked > 0 {
            format!("NO: overloaded, {} unanswered after 5 s", count(s.unacked))
        } else {
            format!(
                "NO: {} acknowledged but undelivered after 5 s",
                count(s.acked.saturating_sub(s.delivered_total))
            )
        }
    });
    row(&mut t, "late acks / deliveries (earlier steps)", &|s| {
        format!("{} / {}", s.late_acks, s.late_from_earlier_steps)
    });
    row(&mut t, "ack p50/p99/p99.9/max", &|s| {
        latency_cell(&s.ack_latency)
    });
    row(&mut t, "deliver p50/p99/p99.9/max", &|s| {
        latency_cell(&s.deliver_latency)
    });
    row(&mut t, "server CPU (% of a core)", &|s| {
        s.usage
            .server_cpu_pct
            .map(|p| format!("{p:.0}%"))
            .unwrap_or_else(|| "n/a".into())
    });
    if spread.is_some() {
        row(&mut t, "node CPU (% of a core)", &|s| {
            s.usage.per_server().unwrap_or_else(|| "n/a".into())
        });
        row(&mut t, "nsqd CPU (% of a core)", &|s| {
            s.usage
                .nsqd_cpu_pct
                .map(|p| format!("{p:.0}%"))
                .unwrap_or_else(|| "n/a".into())
        });
    }
    row(&mut t, "server peak RSS", &|s| {
        mib(s.usage.server_peak_rss_mib)
    });
    row(&mut t, "harness CPU (% of a core)", &|s| {
        format!("{:.0}%", s.usage.harness_cpu_pct)
    });
    let server_rows: Vec<Vec<(&str, String)>> = steps.iter().map(|s| s.server.rows()).collect();
    let most = server_rows
        .iter()
        .max_by_key(|rows| rows.len())
        .expect("at least one step");
    for (r, (label, _)) in most.iter().enumerate() {
        let mut cells = vec![(*label).to_owned()];
        cells.extend(
            server_rows
                .iter()
                .map(|rows| rows.get(r).map_or_else(|| "n/a".into(), |c| c.1.clone())),
        );
        t.cells(cells);
    }
    t.print();
    crate::report::process_table(&processes).print();

    let mut failures = Vec::new();
    for (k, s) in steps.iter().enumerate() {
        if let Some(lost) = s.lost.filter(|&l| l > 0) {
            failures.push(format!(
                "step {}: {lost} acknowledged messages not delivered within 5 s",
                k + 1
            ));
        }
        if s.duplicates > 0 {
            failures.push(format!("step {}: {} duplicates", k + 1, s.duplicates));
        }
    }
    let json = json!({
        "target": describe,
        "users": args.users,
        "processes": workers,
        "connect_secs": connect_secs,
        "max_frames_per_sec": max_fps,
        "cross_node": args.cross_node,
        "spread_by_node": spread,
        "steps": steps,
        "processes": processes,
    });
    Ok(Outcome {
        name: "direct",
        json,
        failures,
    })
}
