//! `group`: one group with every member online; member 0 (the owner)
//! sends M messages, one at a time, spaced apart. Per message: the time
//! until the last member has it (p100) and the spread of the individual
//! delivery latencies.
//!
//! The group is built as a client would: `create` with the first 499 other
//! members, then `add_members` in chunks of 500 (the server's cap per
//! change). Every member must have received its membership events
//! (CREATED, MEMBERS_ADDED) before the first message is timed.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use ferry_protocol::client::FrameReader;
use ferry_protocol::proto::{self, EntryKind, Frame, frame::Body, group_request::Op};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::mpsc;

use crate::clients::{
    AckTracker, Conn, Drops, Fleet, OUT_QUEUE, Out, Tokens, WriterStats, describe_end, open_all,
    read_login_sync, spawn_writer, wait_until,
};
use crate::hist::{Hist, SharedHist, fmt_us};
use crate::payload::{Payload, now_ns};
use crate::report::{Outcome, Table, count, latency_cell, mib, usage_rows};
use crate::server_metrics::ServerFigures;
use crate::target::{CommonArgs, Target};
use crate::worker::{self, Io, Pool};

/// Most users one membership change may carry.
const CHANGE_MAX: u32 = 500;

/// How long the harness waits for one message to reach every member.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the membership events may take to reach everyone.
const EVENTS_TIMEOUT: Duration = Duration::from_secs(180);

/// Options of `group`.
#[derive(Debug, Clone, clap::Args)]
pub struct GroupArgs {
    /// Members including the owner (the server's --max-group-members caps it, 10,000 by default).
    #[arg(long, default_value_t = 10_000)]
    pub members: u32,
    /// Messages the owner sends.
    #[arg(long, default_value_t = 20)]
    pub messages: u32,
    /// Milliseconds between two sends (a send also waits for the previous message to arrive everywhere).
    #[arg(long, default_value_t = 500)]
    pub interval_ms: u64,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// One worker's part.
#[derive(Debug, Serialize, Deserialize)]
pub struct Job {
    fleet: Fleet,
    group_id: String,
    messages: u32,
}

#[derive(Debug, Serialize, Deserialize)]
enum Cmd {
    Connect,
    Create,
    AwaitEvents,
    Send { k: u32 },
    Await { k: u32 },
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
struct Created {
    changes: u32,
    secs: f64,
}

#[derive(Debug, Serialize, Deserialize)]
struct EventsDone {
    members: u32,
    incomplete: u32,
    missing_events: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Sent {
    sent_ns: u64,
    ack_us: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Arrived {
    received: u64,
    expected: u64,
    last_ns: u64,
    drops: u64,
    first_drop: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Finished {
    hists: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Closed;

/// The membership changes that build a group of `members` (owner = user 0):
/// `create` with users `1..min(500, members)`, then `add_members` of 500 each.
pub fn changes(members: u32) -> Vec<Range<u32>> {
    let mut out = Vec::new();
    out.push(1..members.min(CHANGE_MAX));
    let mut start = CHANGE_MAX;
    while start < members {
        let end = (start + CHANGE_MAX).min(members);
        out.push(start..end);
        start = end;
    }
    out
}

/// Membership events user `i` receives while the group is built: one for
/// the change that adds it and one for every later change.
fn expected_events(plan: &[Range<u32>], i: u32) -> u32 {
    let joined = plan.iter().position(|r| r.contains(&i)).unwrap_or(0);
    (plan.len() - joined) as u32
}

/// Arrivals of one message.
#[derive(Default)]
struct MessageStats {
    count: AtomicU64,
    last_ns: AtomicU64,
    hist: SharedHist,
}

/// Shared by a worker's connections.
struct State {
    group_id: String,
    /// Group events received, per local member.
    events: Vec<AtomicU32>,
    messages: Vec<MessageStats>,
    drops: Drops,
    writer: Arc<WriterStats>,
}

struct Member {
    local: usize,
    state: Arc<State>,
    tx: mpsc::Sender<Out>,
    acks: AckTracker,
    /// The owner's replies (GroupReply, SendAck, request errors).
    control: Option<mpsc::Sender<Body>>,
}

impl Member {
    fn entry(&mut self, d: proto::Deliver) {
        self.acks.saw(d.seq, &self.tx);
        let in_group =
            d.conversation.as_ref().map(|c| c.id.as_str()) == Some(self.state.group_id.as_str());
        if !in_group {
            return;
        }
        match d.kind() {
            EntryKind::GroupEvent => {
                self.state.events[self.local].fetch_add(1, Ordering::Relaxed);
            }
            EntryKind::Message if d.client_msg_id == 0 => {
                if let Some(p) = Payload::decode(&d.body)
                    && let Some(m) = self.state.messages.get(p.tag as usize)
                {
                    let now = now_ns();
                    m.hist.record(now.saturating_sub(p.sent_ns) / 1000);
                    m.last_ns.fetch_max(now, Ordering::Relaxed);
                    m.count.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ => {}
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
                    body: Some(body @ (Body::GroupReply(_) | Body::SendAck(_))),
                })) => {
                    if let Some(c) = &self.control {
                        let _ = c.send(body).await;
                    }
                }
                Ok(Some(Frame {
                    body: Some(Body::Error(e)),
                })) if !e.closing => {
                    if let Some(c) = &self.control {
                        let _ = c.send(Body::Error(e)).await;
                    }
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

/// Waits for the owner's answer to request `request_id`.
async fn group_reply(control: &mut mpsc::Receiver<Body>, request_id: u64) -> anyhow::Result<()> {
    let wait = async {
        while let Some(body) = control.recv().await {
            match body {
                Body::GroupReply(r) if r.request_id == request_id => return Ok(()),
                Body::Error(e) if e.request_id == request_id => {
                    bail!("group request refused: {:?}: {}", e.code(), e.message)
                }
                _ => {}
            }
        }
        bail!("the owner's connection closed")
    };
    tokio::time::timeout(Duration::from_secs(60), wait)
        .await
        .context("no GroupReply within 60 s (see the server log)")?
}

/// The owner's connection (user 0, first of worker 0).
fn owner(conns: &[(u32, Conn)], worker: usize) -> anyhow::Result<&Conn> {
    anyhow::ensure!(worker == 0, "only worker 0 holds the owner");
    conns
        .first()
        .filter(|(i, _)| *i == 0)
        .map(|(_, c)| c)
        .context("the owner is not connected")
}

/// The worker side.
pub async fn worker(job: Job, index: usize, io: &mut Io) -> anyhow::Result<()> {
    let tokens = Arc::new(Tokens::mint(&job.fleet));
    let Cmd::Connect = io.recv().await? else {
        bail!("expected Connect")
    };
    let fleet = Arc::new(job.fleet);
    let local_users = fleet.users.len();
    let state = Arc::new(State {
        group_id: job.group_id.clone(),
        events: (0..local_users).map(|_| AtomicU32::new(0)).collect(),
        messages: (0..job.messages).map(|_| MessageStats::default()).collect(),
        drops: Drops::default(),
        writer: Arc::new(WriterStats::default()),
    });
    let ping = Duration::from_secs(fleet.ping_secs);
    let (control_tx, mut control_rx) = mpsc::channel(64);
    let opened = {
        let (state, fleet) = (state.clone(), fleet.clone());
        open_all(fleet.users.clone(), fleet.ramp_per_sec, move |i| {
            let (state, fleet, tokens) = (state.clone(), fleet.clone(), tokens.clone());
            let control = (i == 0).then(|| control_tx.clone());
            async move {
                let (mut reader, writer, _ok) = fleet.login(&tokens, i, 0, false).await?;
                let initial = read_login_sync(&mut reader).await?;
                let (tx, rx) = mpsc::channel(OUT_QUEUE);
                let w = spawn_writer(writer, i, rx, ping, state.writer.clone());
                let member = Member {
                    local: (i - fleet.users.start) as usize,
                    state,
                    tx: tx.clone(),
                    acks: AckTracker::default(),
                    control,
                };
                let r = tokio::spawn(member.run(reader, initial));
                Ok(Conn::new(tx, w, r))
            }
        })
        .await
    };
    let conns = opened.conns;
    io.reply(&Connected {
        ok: conns.len() as u32,
        failed: opened.failed,
        first_error: opened.first_error,
        setup_hist: opened.setup_hist.to_hex(),
    })
    .await?;

    let plan = changes(fleet.total_users);
    let group = proto::Conversation {
        kind: proto::ConversationKind::Group as i32,
        id: job.group_id.clone(),
    };
    loop {
        match io.recv().await? {
            Cmd::Create => {
                let t0 = now_ns();
                let owner = owner(&conns, index)?;
                for (n, users) in plan.iter().enumerate() {
                    let ids: Vec<String> = users.clone().map(|u| fleet.user_id(u)).collect();
                    let op = if n == 0 {
                        Op::Create(proto::CreateGroup {
                            group_id: job.group_id.clone(),
                            name: "ferry-bench".into(),
                            members: ids,
                        })
                    } else {
                        Op::AddMembers(proto::AddMembers {
                            group_id: job.group_id.clone(),
                            members: ids,
                        })
                    };
                    let request_id = n as u64 + 1;
                    let frame = proto::GroupRequest {
                        request_id,
                        op: Some(op),
                    };
                    owner
                        .tx
                        .send(Out::Frame(frame.into()))
                        .await
                        .context("owner connection closed")?;
                    let t = now_ns();
                    group_reply(&mut control_rx, request_id)
                        .await
                        .with_context(|| {
                            format!("membership change {} of {}", n + 1, plan.len())
                        })?;
                    if std::env::var_os("FERRY_BENCH_DEBUG").is_some() {
                        eprintln!(
                            "group: change {} ({} users) took {:.3} s",
                            n + 1,
                            users.len(),
                            (now_ns() - t) as f64 / 1e9
                        );
                    }
                }
                io.reply(&Created {
                    changes: plan.len() as u32,
                    secs: (now_ns() - t0) as f64 / 1e9,
                })
                .await?;
            }
            Cmd::AwaitEvents => {
                let expected: Vec<u32> = fleet
                    .users
                    .clone()
                    .map(|i| expected_events(&plan, i))
                    .collect();
                let complete = || {
                    state
                        .events
                        .iter()
                        .zip(&expected)
                        .all(|(got, want)| got.load(Ordering::Relaxed) >= *want)
                };
                wait_until(EVENTS_TIMEOUT, Duration::from_millis(20), complete).await;
                let mut incomplete = 0;
                let mut missing = 0u64;
                for (got, want) in state.events.iter().zip(&expected) {
                    let got = got.load(Ordering::Relaxed);
                    if got < *want {
                        incomplete += 1;
                        missing += (*want - got) as u64;
                    }
                }
                io.reply(&EventsDone {
                    members: local_users as u32,
                    incomplete,
                    missing_events: missing,
                })
                .await?;
            }
            Cmd::Send { k } => {
                let owner = owner(&conns, index)?;
                owner
                    .tx
                    .send(Out::Stamped {
                        to: group.clone(),
                        counter: k,
                        tag: k as u8,
                    })
                    .await
                    .context("owner connection closed")?;
                let ack = tokio::time::timeout(Duration::from_secs(60), async {
                    while let Some(body) = control_rx.recv().await {
                        match body {
                            Body::SendAck(a) => return Ok(a),
                            Body::Error(e) if e.client_msg_id != 0 => {
                                bail!("group send refused: {:?}: {}", e.code(), e.message)
                            }
                            _ => {}
                        }
                    }
                    bail!("the owner's connection closed")
                })
                .await
                .context("no SendAck within 60 s")??;
                io.reply(&Sent {
                    sent_ns: ack.client_msg_id,
                    ack_us: now_ns().saturating_sub(ack.client_msg_id) / 1000,
                })
                .await?;
            }
            Cmd::Await { k } => {
                let m = state.messages.get(k as usize).context("no such message")?;
                let expected = fleet.users.clone().filter(|&i| i != 0).count() as u64;
                wait_until(MESSAGE_TIMEOUT, Duration::from_millis(2), || {
                    m.count.load(Ordering::Relaxed) >= expected || state.drops.count() > 0
                })
                .await;
                io.reply(&Arrived {
                    received: m.count.load(Ordering::Relaxed),
                    expected,
                    last_ns: m.last_ns.load(Ordering::Relaxed),
                    drops: state.drops.count(),
                    first_drop: state.drops.first(),
                })
                .await?;
            }
            Cmd::Finish => {
                let hists = state
                    .messages
                    .iter()
                    .map(|m| m.hist.take().to_hex())
                    .collect();
                io.reply(&Finished { hists }).await?;
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

/// Figures of one message.
#[derive(Debug, Serialize)]
struct MessageFigures {
    ack_us: u64,
    received: u64,
    expected: u64,
    p100_us: u64,
    latency: crate::hist::Summary,
}

/// Runs `group` and prints its table.
pub async fn run(args: &GroupArgs) -> anyhow::Result<Outcome> {
    let common = &args.common;
    anyhow::ensure!(args.members >= 2, "--members must be at least 2");
    anyhow::ensure!(
        (1..=250).contains(&args.messages),
        "--messages must be in 1..=250"
    );
    let mut target = Target::open(common).await?;
    let group_id = format!("{}-g", target.run_id);
    let spread = target.spread("members", args.members);
    let owner_node = target.map().map(|m| m.owner(&group_id));
    if let (Some(owner), Some(map)) = (owner_node, target.map()) {
        eprintln!(
            "cluster: the group is owned by node {owner}; its owner (sender) is homed on node {}",
            map.home(&crate::clients::user_id(&target.run_id, 0))
        );
    }
    let slices = worker::slices(args.members, common.harness.per_process);
    let workers = slices.len();
    let jobs = slices
        .into_iter()
        .map(|users| {
            worker::Job::Group(Job {
                fleet: target.fleet(common, users, args.members, workers),
                group_id: group_id.clone(),
                messages: args.messages,
            })
        })
        .collect();
    let mut pool = Pool::start(jobs).await?;
    target.sampler.add_harness(pool.pids());
    eprintln!(
        "group: connecting {} members over {} process(es)…",
        args.members, workers
    );
    let connected: Vec<Connected> = pool.ask(&Cmd::Connect).await?;
    let failed: u32 = connected.iter().map(|c| c.failed).sum();
    if failed > 0 {
        bail!(
            "{failed} members could not connect: {}",
            connected
                .iter()
                .find_map(|c| c.first_error.clone())
                .unwrap_or_default()
        );
    }
    eprintln!("group: building the group…");
    let t_setup = now_ns();
    pool.send(0, &Cmd::Create).await?;
    let created: Created = pool.recv(0).await?;
    let events: Vec<EventsDone> = pool.ask(&Cmd::AwaitEvents).await?;
    let setup_secs = (now_ns() - t_setup) as f64 / 1e9;
    let incomplete: u32 = events.iter().map(|e| e.incomplete).sum();
    if incomplete > 0 {
        bail!(
            "{incomplete} members did not get all their membership events within {EVENTS_TIMEOUT:?} \
             ({} events missing)",
            events.iter().map(|e| e.missing_events).sum::<u64>()
        );
    }
    target.check_alive()?;

    eprintln!("group: sending {} messages…", args.messages);
    let metrics_before = target.scrape().await;
    let t0 = now_ns();
    let mut figures = Vec::new();
    for k in 0..args.messages {
        pool.send(0, &Cmd::Send { k }).await?;
        let sent: Sent = pool.recv(0).await?;
        let arrived: Vec<Arrived> = pool.ask(&Cmd::Await { k }).await?;
        let drops: u64 = arrived.iter().map(|a| a.drops).sum();
        if drops > 0 {
            bail!(
                "{drops} members were disconnected: {}",
                arrived
                    .iter()
                    .find_map(|a| a.first_drop.clone())
                    .unwrap_or_default()
            );
        }
        let received: u64 = arrived.iter().map(|a| a.received).sum();
        let expected: u64 = arrived.iter().map(|a| a.expected).sum();
        let last = arrived.iter().map(|a| a.last_ns).max().unwrap_or(0);
        figures.push(MessageFigures {
            ack_us: sent.ack_us,
            received,
            expected,
            p100_us: last.saturating_sub(sent.sent_ns) / 1000,
            latency: Default::default(),
        });
        let next = sent.sent_ns + args.interval_ms * 1_000_000;
        tokio::time::sleep(Duration::from_nanos(next.saturating_sub(now_ns()))).await;
    }
    let t1 = now_ns();
    let server = ServerFigures::between(metrics_before.as_ref(), target.scrape().await.as_ref());
    let finished: Vec<Finished> = pool.ask(&Cmd::Finish).await?;
    let _: Vec<Closed> = pool.ask(&Cmd::Close).await?;
    pool.finish().await?;
    let usage = target.sampler.usage(t0, t1).await;
    let describe = target.describe();
    let processes = target.close().await;

    let mut all = Hist::new();
    for (k, fig) in figures.iter_mut().enumerate() {
        let mut h = Hist::new();
        for f in &finished {
            h.merge(&Hist::from_hex(&f.hists[k])?);
        }
        fig.latency = h.summary();
        all.merge(&h);
    }
    let mut p100s: Vec<u64> = figures.iter().map(|f| f.p100_us).collect();
    p100s.sort_unstable();
    let p100_median = p100s[p100s.len() / 2];
    let p100_max = *p100s.last().expect("at least one message");
    let missing: u64 = figures
        .iter()
        .map(|f| f.expected.saturating_sub(f.received))
        .sum();

    let mut t = Table::with_header(
        format!(
            "group: {} members, {} messages every {} ms",
            args.members, args.messages, args.interval_ms
        ),
        &[
            "message",
            "ack",
            "p50",
            "p99",
            "p100 (last member)",
            "received",
        ],
    );
    for (k, f) in figures.iter().enumerate() {
        t.cells(vec![
            (k + 1).to_string(),
            fmt_us(f.ack_us),
            fmt_us(f.latency.p50_us),
            fmt_us(f.latency.p99_us),
            fmt_us(f.p100_us),
            format!("{} of {}", count(f.received), count(f.expected)),
        ]);
    }
    t.print();
    let mut s = Table::new("group: summary");
    s.row("processes", workers)
        .row(
            "group built",
            format!(
                "{} changes in {:.2} s; all membership events delivered after {setup_secs:.2} s",
                created.changes, created.secs
            ),
        )
        .row(
            "p100 median / max",
            format!("{} / {}", fmt_us(p100_median), fmt_us(p100_max)),
        )
        .row(
            "all deliveries p50/p99/p99.9/max",
            latency_cell(&all.summary()),
        )
        .row("missing deliveries", missing)
        .row("server peak RSS", mib(usage.server_peak_rss_mib));
    usage_rows(&mut s, "sending", &usage);
    server.add_rows(&mut s);
    s.print();
    crate::report::process_table(&processes).print();

    let mut failures = Vec::new();
    if missing > 0 {
        failures.push(format!(
            "{missing} deliveries missing after {MESSAGE_TIMEOUT:?}"
        ));
    }
    let json = json!({
        "target": describe,
        "members": args.members,
        "messages": args.messages,
        "interval_ms": args.interval_ms,
        "processes": workers,
        "group_changes": created.changes,
        "group_build_secs": created.secs,
        "group_events_delivered_secs": setup_secs,
        "p100_median_us": p100_median,
        "p100_max_us": p100_max,
        "latency": all.summary(),
        "missing_deliveries": missing,
        "per_message": figures,
        "usage": usage,
        "server_metrics": server,
        "spread_by_node": spread,
        "group_owner_node": owner_node,
        "processes": processes,
    });
    Ok(Outcome {
        name: "group",
        json,
        failures,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_plan() {
        assert_eq!(changes(2), vec![1..2]);
        assert_eq!(changes(500), vec![1..500]);
        assert_eq!(changes(501), vec![1..500, 500..501]);
        let plan = changes(10_000);
        assert_eq!(plan.len(), 20);
        assert_eq!(plan[0], 1..500);
        assert_eq!(plan[19], 9500..10_000);
        assert!(plan.iter().all(|r| r.len() <= 500));
        assert_eq!(expected_events(&plan, 0), 20);
        assert_eq!(expected_events(&plan, 499), 20);
        assert_eq!(expected_events(&plan, 500), 19);
        assert_eq!(expected_events(&plan, 9999), 1);
    }
}
