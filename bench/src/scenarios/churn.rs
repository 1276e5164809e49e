//! `churn`: exactly-once delivery while connections come and go.
//!
//! Every user runs a small but complete client (docs/PROTOCOL.md §16): an
//! outbox of unacknowledged Sends, resent with the same `client_msg_id`
//! after every reconnect; a cursor (`last_seq`) sent as `Auth.last_seq`;
//! entries processed strictly in seq order, with gaps filled by `Sync`.
//! While users send to each other, a random fraction of them disconnects
//! and reconnects every round; with `--kill-server` the server is killed
//! with SIGKILL once and restarted on the same data dir (on new ports); in
//! a spawned cluster (`--spawn-cluster N`) one node is killed and restarted
//! on its data dir and its ports, while the other nodes go on serving.
//! At the end every device reconnects and syncs to the end of its inbox,
//! and the harness checks that every stored message reached its recipient
//! exactly once and that nothing arrived that was never sent.
//!
//! It runs in one process (at most `--per-process` users).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use ferry_gateway::auth::TokenVerifier;
use ferry_protocol::client::{FrameReader, FrameWriter};
use ferry_protocol::proto::{self, EntryKind, ErrorCode, Frame, frame::Body};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::clients::{connect_login, user_id, wait_until};
use crate::cluster::ClusterMap;
use crate::payload::{Payload, now_ns};
use crate::report::{Outcome, Table, count, mib, usage_rows};
use crate::server_metrics::{self, ServerFigures, Snapshot};
use crate::target::{CommonArgs, Target};

/// A Send without SendAck for this long means the connection is broken.
const ACK_TIMEOUT: Duration = Duration::from_secs(15);

/// How long the end of the run may take (acks, then the final syncs).
const FINAL_TIMEOUT: Duration = Duration::from_secs(120);

/// Options of `churn`.
#[derive(Debug, Clone, clap::Args)]
pub struct ChurnArgs {
    /// Users (one device each).
    #[arg(long, default_value_t = 2000)]
    pub users: u32,
    /// Messages to send in total.
    #[arg(long, default_value_t = 100_000)]
    pub messages: u64,
    /// Fraction of the users that disconnect in each round.
    #[arg(long, default_value_t = 0.1)]
    pub disconnect_fraction: f64,
    /// Seconds between two disconnect rounds.
    #[arg(long, default_value_t = 1.0)]
    pub round_secs: f64,
    /// Offered msgs/s (total).
    #[arg(long, default_value_t = 2000)]
    pub rate: u32,
    /// Kill the server with SIGKILL at a random point and restart it (needs --spawn,
    /// or --spawn-cluster: then one node is killed).
    #[arg(long)]
    pub kill_server: bool,
    /// With --spawn-cluster --kill-server: the node to kill [default: a random one].
    #[arg(long, value_name = "ID")]
    pub kill_node: Option<u16>,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// Where a message goes: a user (by index) or a group (by its index in
/// [`Shared::group_ids`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dest {
    /// One-to-one, to user `i`.
    User(u32),
    /// To every other member of group `g`.
    Group(u32),
}

/// What the coordinator tells a device.
#[derive(Debug)]
pub(crate) enum Cmd {
    /// Send a new message.
    Send { to: Dest },
    /// Close the connection, wait, reconnect.
    Drop { pause: Duration },
    /// Stop reading (and writing) for `pause`: a slow reader. The
    /// connection stays open; the server's frames wait in the socket
    /// buffers and the server's write queue.
    Stall { pause: Duration },
    /// Reconnect, sync to the end of the inbox, and finish.
    Final,
}

/// Shared by the devices.
pub(crate) struct Shared {
    pub(crate) addr: watch::Receiver<SocketAddr>,
    /// A spawned cluster: where each device dials first.
    pub(crate) map: Option<ClusterMap>,
    pub(crate) run_id: String,
    pub(crate) source_ips: u32,
    pub(crate) tokens: TokenVerifier,
    /// The ids of the groups of the run ([`Dest::Group`] indexes them).
    pub(crate) group_ids: Vec<String>,
    /// Messages in outboxes (created, neither acknowledged nor refused).
    pub(crate) outstanding: AtomicI64,
    /// Devices that have logged in at least once.
    pub(crate) connected_once: AtomicU32,
}

impl Shared {
    /// The devices' shared state for the server (or cluster) `target`.
    pub(crate) fn new(
        target: &Target,
        addr: watch::Receiver<SocketAddr>,
        source_ips: u32,
        group_ids: Vec<String>,
    ) -> Shared {
        Shared {
            addr,
            map: target.map().cloned(),
            run_id: target.run_id.clone(),
            source_ips,
            tokens: TokenVerifier::new(&target.secret),
            group_ids,
            outstanding: AtomicI64::new(0),
            connected_once: AtomicU32::new(0),
        }
    }
}

/// One device's record of the run.
#[derive(Debug, Default)]
pub(crate) struct DeviceReport {
    index: u32,
    /// Recipient of every message created, by counter.
    sent_to: Vec<Dest>,
    /// Counters with a SendAck.
    acked: HashSet<u32>,
    /// Counters known stored: a SendAck, or the own copy in the inbox.
    stored: HashSet<u32>,
    /// Counters the server refused (request errors).
    refused: Vec<u32>,
    /// Still in the outbox at the end.
    unacked: u32,
    /// Messages processed, in order: ((sender, counter), seq).
    received: Vec<(u64, u64)>,
    /// Entries whose sender id does not match the body, or foreign bodies.
    malformed: u64,
    /// Sync pages that skipped seqs (the inbox must be gap-free).
    seq_gaps: u64,
    /// Entries seen again with seq ≤ cursor (normal; ignored).
    pub(crate) redelivered: u64,
    /// Syncs started to fill a gap in live delivery.
    pub(crate) gap_syncs: u64,
    pub(crate) logins: u64,
    pub(crate) connect_failures: u64,
    pub(crate) commanded_drops: u64,
    /// Commanded stalls (slow reading) served while connected.
    pub(crate) stalls: u64,
    pub(crate) lost_sessions: u64,
    pub(crate) first_loss: Option<String>,
    pub(crate) resends: u64,
    last_seq: u64,
    final_synced: bool,
}

/// A message waiting for its SendAck.
struct Pending {
    to: Dest,
    counter: u32,
    body: Bytes,
    sent_at: Option<Instant>,
}

enum SessionEnd {
    Dropped(Duration),
    Lost(String),
    FinalRequested,
    Synced,
}

/// Per-connection state of the receive rules.
#[derive(Default)]
struct Session {
    syncing: bool,
    pending: BTreeMap<u64, proto::Deliver>,
    request_id: u64,
    acked_seq: u64,
    unacked_entries: u32,
    last_write: Option<Instant>,
}

fn cmid(index: u32, counter: u32) -> u64 {
    (index as u64 + 1) << 32 | (counter as u64 + 1)
}

fn counter_of(cmid: u64) -> u32 {
    ((cmid & 0xffff_ffff) as u32).wrapping_sub(1)
}

struct Device {
    index: u32,
    me: String,
    token: String,
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Cmd>,
    outbox: BTreeMap<u64, Pending>,
    report: DeviceReport,
    final_mode: bool,
}

impl Device {
    fn conv(&self, to: Dest) -> proto::Conversation {
        match to {
            Dest::User(to) => proto::Conversation {
                kind: proto::ConversationKind::Direct as i32,
                id: user_id(&self.shared.run_id, to),
            },
            Dest::Group(g) => proto::Conversation {
                kind: proto::ConversationKind::Group as i32,
                id: self.shared.group_ids[g as usize].clone(),
            },
        }
    }

    fn send_frame(&self, p: &Pending) -> Frame {
        proto::Send {
            client_msg_id: cmid(self.index, p.counter),
            to: Some(self.conv(p.to)),
            content_type: "application/x-ferry-bench".into(),
            body: p.body.clone(),
        }
        .into()
    }

    /// Creates a message and puts it in the outbox; returns its cmid.
    fn create(&mut self, to: Dest) -> u64 {
        let counter = self.report.sent_to.len() as u32;
        self.report.sent_to.push(to);
        let body = Payload {
            sent_ns: now_ns(),
            sender: self.index,
            counter,
            tag: 0,
        }
        .encode();
        let id = cmid(self.index, counter);
        self.outbox.insert(
            id,
            Pending {
                to,
                counter,
                body,
                sent_at: None,
            },
        );
        self.shared.outstanding.fetch_add(1, Ordering::Relaxed);
        id
    }

    fn settle(&mut self, cmid: u64) {
        if self.outbox.remove(&cmid).is_some() {
            self.shared.outstanding.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Waits `pause`, still taking commands. Returns early on `Final`.
    async fn pause(&mut self, pause: Duration) {
        let until = Instant::now() + pause;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return,
                cmd = self.rx.recv(), if !self.final_mode => match cmd {
                    Some(Cmd::Send { to }) => { self.create(to); }
                    Some(Cmd::Drop { .. } | Cmd::Stall { .. }) => {}
                    Some(Cmd::Final) | None => { self.final_mode = true; return; }
                },
            }
        }
    }

    async fn connect(&mut self) -> anyhow::Result<(FrameReader, FrameWriter, proto::AuthOk)> {
        let addr = match &self.shared.map {
            Some(map) => map.dial(&self.me, self.index),
            None => *self.shared.addr.borrow(),
        };
        // Connecting (5 s) and the login (30 s), redirects included.
        tokio::time::timeout(
            Duration::from_secs(35),
            connect_login(
                addr,
                self.shared.source_ips,
                self.index,
                &self.token,
                self.report.last_seq,
                false,
            ),
        )
        .await
        .context("connect and login timeout")?
    }

    async fn run(mut self) -> DeviceReport {
        let mut backoff = Duration::from_millis(100);
        let mut rng = rand::rngs::SmallRng::from_rng(&mut rand::rng());
        loop {
            let (reader, writer, ok) = match self.connect().await {
                Ok(c) => c,
                Err(_) => {
                    self.report.connect_failures += 1;
                    let jitter = rng.random_range(0.5..1.0);
                    self.pause(backoff.mul_f64(jitter)).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            if self.report.logins == 0 {
                self.shared.connected_once.fetch_add(1, Ordering::Relaxed);
            }
            self.report.logins += 1;
            match self.session(reader, writer, ok).await {
                SessionEnd::Dropped(pause) => {
                    self.report.commanded_drops += 1;
                    self.pause(pause).await;
                }
                SessionEnd::Lost(why) => {
                    self.report.lost_sessions += 1;
                    self.report.first_loss.get_or_insert(why);
                    let pause = Duration::from_millis(rng.random_range(50..200));
                    self.pause(pause).await;
                }
                SessionEnd::FinalRequested => self.final_mode = true,
                SessionEnd::Synced => {
                    self.report.final_synced = true;
                    break;
                }
            }
        }
        self.report.unacked = self.outbox.len() as u32;
        self.report
    }

    async fn write(&self, w: &mut FrameWriter, s: &mut Session, f: Frame) -> Result<(), String> {
        s.last_write = Some(Instant::now());
        w.send(f).await.map_err(|e| format!("write: {e}"))
    }

    async fn session(
        &mut self,
        mut reader: FrameReader,
        mut writer: FrameWriter,
        ok: proto::AuthOk,
    ) -> SessionEnd {
        let mut s = Session {
            syncing: true, // the login sync follows AuthOk
            acked_seq: self.report.last_seq,
            ..Default::default()
        };
        // Resend the outbox, same client_msg_id.
        let frames: Vec<Frame> = self.outbox.values().map(|p| self.send_frame(p)).collect();
        let now = Instant::now();
        for p in self.outbox.values_mut() {
            if p.sent_at.is_some() {
                self.report.resends += 1;
            }
            p.sent_at = Some(now);
        }
        for f in frames {
            if let Err(e) = self.write(&mut writer, &mut s, f).await {
                return SessionEnd::Lost(e);
            }
        }
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            let end = tokio::select! {
                frame = reader.recv() => match frame {
                    Ok(Some(Frame { body: Some(body) })) => self.on_frame(body, &mut s, &mut writer).await,
                    Ok(Some(Frame { body: None })) => None,
                    Ok(None) => Some(SessionEnd::Lost("closed by the server".into())),
                    Err(e) => Some(SessionEnd::Lost(format!("read: {e}"))),
                },
                cmd = self.rx.recv(), if !self.final_mode => match cmd {
                    Some(Cmd::Send { to }) => {
                        let id = self.create(to);
                        let p = self.outbox.get_mut(&id).expect("just created");
                        p.sent_at = Some(Instant::now());
                        let f = self.send_frame(self.outbox.get(&id).expect("just created"));
                        self.write(&mut writer, &mut s, f).await.err().map(SessionEnd::Lost)
                    }
                    Some(Cmd::Drop { pause }) => Some(SessionEnd::Dropped(pause)),
                    Some(Cmd::Stall { pause }) => {
                        self.stall(pause).await;
                        None
                    }
                    Some(Cmd::Final) | None => Some(SessionEnd::FinalRequested),
                },
                _ = tick.tick() => self.on_tick(&mut s, &mut writer).await,
            };
            if let Some(end) = end {
                return end;
            }
            if self.final_mode
                && !s.syncing
                && s.pending.is_empty()
                && self.report.last_seq >= ok.max_seq
            {
                let ack = proto::DeliverAck {
                    up_to_seq: self.report.last_seq,
                };
                let _ = self.write(&mut writer, &mut s, ack.into()).await;
                return SessionEnd::Synced;
            }
        }
    }

    /// Reads nothing for `pause`. Sends still waiting for their SendAck
    /// were not late: their ack timeout starts again.
    async fn stall(&mut self, pause: Duration) {
        self.report.stalls += 1;
        tokio::time::sleep(pause).await;
        let now = Instant::now();
        for p in self.outbox.values_mut() {
            if p.sent_at.is_some() {
                p.sent_at = Some(now);
            }
        }
    }

    async fn on_tick(&mut self, s: &mut Session, w: &mut FrameWriter) -> Option<SessionEnd> {
        let now = Instant::now();
        if self.report.last_seq > s.acked_seq {
            s.acked_seq = self.report.last_seq;
            s.unacked_entries = 0;
            let ack = proto::DeliverAck {
                up_to_seq: s.acked_seq,
            };
            if let Err(e) = self.write(w, s, ack.into()).await {
                return Some(SessionEnd::Lost(e));
            }
        }
        if s.last_write
            .is_none_or(|t| now - t > Duration::from_secs(5))
            && let Err(e) = self.write(w, s, proto::Ping { nonce: 1 }.into()).await
        {
            return Some(SessionEnd::Lost(e));
        }
        let stale = self
            .outbox
            .values()
            .any(|p| p.sent_at.is_some_and(|t| now - t > ACK_TIMEOUT));
        stale.then(|| SessionEnd::Lost("no SendAck within 15 s".into()))
    }

    async fn on_frame(
        &mut self,
        body: Body,
        s: &mut Session,
        w: &mut FrameWriter,
    ) -> Option<SessionEnd> {
        match body {
            Body::SendAck(a) => {
                let counter = counter_of(a.client_msg_id);
                self.report.acked.insert(counter);
                self.report.stored.insert(counter);
                self.settle(a.client_msg_id);
            }
            Body::Deliver(d) => {
                if d.seq <= self.report.last_seq {
                    self.report.redelivered += 1;
                } else if d.seq == self.report.last_seq + 1 && !s.syncing {
                    self.process(d, s);
                    return self.ack_if_due(s, w).await;
                } else {
                    s.pending.insert(d.seq, d);
                    if !s.syncing {
                        return self.start_sync(s, w).await;
                    }
                }
            }
            Body::SyncBatch(b) => {
                for e in b.entries {
                    if e.seq <= self.report.last_seq {
                        self.report.redelivered += 1;
                        continue;
                    }
                    if e.seq != self.report.last_seq + 1 {
                        self.report.seq_gaps += 1;
                    }
                    self.process(e, s);
                }
                if b.has_more {
                    if b.request_id != 0 {
                        let sync = proto::Sync {
                            request_id: b.request_id,
                            after_seq: self.report.last_seq,
                            limit: 0,
                        };
                        if let Err(e) = self.write(w, s, sync.into()).await {
                            return Some(SessionEnd::Lost(e));
                        }
                    }
                } else {
                    s.syncing = false;
                    // Process the live entries kept aside that now follow.
                    while let Some(d) = s.pending.remove(&(self.report.last_seq + 1)) {
                        self.process(d, s);
                    }
                    let cursor = self.report.last_seq;
                    s.pending.retain(|&seq, _| seq > cursor);
                    if !s.pending.is_empty() {
                        return self.start_sync(s, w).await;
                    }
                }
                return self.ack_if_due(s, w).await;
            }
            Body::Error(e) if !e.closing => {
                if e.client_msg_id != 0 {
                    let code = e.code();
                    if code == ErrorCode::Unavailable || code == ErrorCode::Internal {
                        // Retried by the reconnect below, same client_msg_id.
                        return Some(SessionEnd::Lost(format!("send error {code:?}")));
                    }
                    self.report.refused.push(counter_of(e.client_msg_id));
                    self.settle(e.client_msg_id);
                } else if e.request_id != 0 {
                    return Some(SessionEnd::Lost(format!("sync error {:?}", e.code())));
                }
            }
            Body::Error(e) => {
                return Some(SessionEnd::Lost(format!(
                    "error {:?}: {}",
                    e.code(),
                    e.message
                )));
            }
            Body::Kick(k) => return Some(SessionEnd::Lost(format!("kicked: {:?}", k.reason()))),
            _ => {}
        }
        None
    }

    async fn start_sync(&mut self, s: &mut Session, w: &mut FrameWriter) -> Option<SessionEnd> {
        s.syncing = true;
        s.request_id += 1;
        self.report.gap_syncs += 1;
        let sync = proto::Sync {
            request_id: s.request_id,
            after_seq: self.report.last_seq,
            limit: 0,
        };
        self.write(w, s, sync.into())
            .await
            .err()
            .map(SessionEnd::Lost)
    }

    async fn ack_if_due(&mut self, s: &mut Session, w: &mut FrameWriter) -> Option<SessionEnd> {
        if s.unacked_entries < crate::clients::ACK_EVERY {
            return None;
        }
        s.unacked_entries = 0;
        s.acked_seq = self.report.last_seq;
        let ack = proto::DeliverAck {
            up_to_seq: s.acked_seq,
        };
        self.write(w, s, ack.into())
            .await
            .err()
            .map(SessionEnd::Lost)
    }

    /// Processes one entry, the next in seq order.
    fn process(&mut self, d: proto::Deliver, s: &mut Session) {
        self.report.last_seq = d.seq;
        s.unacked_entries += 1;
        if d.kind() != EntryKind::Message {
            return;
        }
        if d.from == self.me {
            if d.client_msg_id != 0 {
                // Our own copy: the message is stored, no need to resend it.
                self.report.stored.insert(counter_of(d.client_msg_id));
                self.settle(d.client_msg_id);
            }
            return;
        }
        match Payload::decode(&d.body) {
            Some(p) if d.from == user_id(&self.shared.run_id, p.sender) => {
                self.report.received.push((p.id(), d.seq));
            }
            _ => self.report.malformed += 1,
        }
    }
}

/// Totals of the end-of-run check. A group message counts once per
/// recipient (every member but its sender) in `delivered`, `lost` and
/// `duplicated`.
#[derive(Debug, Default, Serialize)]
pub(crate) struct Check {
    pub(crate) created: u64,
    pub(crate) acked: u64,
    pub(crate) stored: u64,
    pub(crate) refused: u64,
    pub(crate) unacked: u64,
    /// (message, recipient) pairs delivered at least once.
    pub(crate) delivered: u64,
    /// (message, recipient) pairs of stored messages never delivered.
    pub(crate) lost: u64,
    /// Deliveries beyond the first of a (message, recipient) pair.
    pub(crate) duplicated: u64,
    /// Deliveries of messages never sent, or to a device not a recipient.
    pub(crate) phantom: u64,
    pub(crate) malformed: u64,
    pub(crate) seq_gaps: u64,
    pub(crate) devices_not_synced: u64,
}

impl Check {
    /// The failures of the exactly-once checks, as report lines.
    pub(crate) fn failures(&self) -> Vec<String> {
        let mut failures = Vec::new();
        if self.lost > 0 {
            failures.push(format!(
                "{} deliveries of stored messages never made",
                self.lost
            ));
        }
        if self.duplicated > 0 {
            failures.push(format!("{} messages delivered twice", self.duplicated));
        }
        if self.phantom > 0 {
            failures.push(format!(
                "{} deliveries of messages never sent",
                self.phantom
            ));
        }
        if self.seq_gaps > 0 {
            failures.push(format!("{} gaps in inbox seqs", self.seq_gaps));
        }
        if self.unacked > 0 {
            failures.push(format!("{} messages never acknowledged", self.unacked));
        }
        if self.devices_not_synced > 0 {
            failures.push(format!(
                "{} devices did not finish the final sync",
                self.devices_not_synced
            ));
        }
        failures
    }
}

/// Checks every device's record: each stored message reached each of its
/// recipients exactly once. `groups[g]` lists the members of group `g`.
pub(crate) fn check(reports: &[DeviceReport], groups: &[Vec<u32>]) -> Check {
    let mut c = Check::default();
    let members: Vec<HashSet<u32>> = groups.iter().map(|m| m.iter().copied().collect()).collect();
    // Where each message went.
    let mut dest_of: HashMap<u64, Dest> = HashMap::new();
    for r in reports {
        c.created += r.sent_to.len() as u64;
        c.acked += r.acked.len() as u64;
        c.stored += r.stored.len() as u64;
        c.refused += r.refused.len() as u64;
        c.unacked += r.unacked as u64;
        c.malformed += r.malformed;
        c.seq_gaps += r.seq_gaps;
        c.devices_not_synced += u64::from(!r.final_synced);
        for (counter, &to) in r.sent_to.iter().enumerate() {
            dest_of.insert((r.index as u64) << 32 | counter as u64, to);
        }
    }
    let recipient = |id: u64, index: u32| match dest_of.get(&id) {
        Some(Dest::User(to)) => *to == index,
        Some(Dest::Group(g)) => {
            (id >> 32) as u32 != index
                && members.get(*g as usize).is_some_and(|m| m.contains(&index))
        }
        None => false,
    };
    // Deliveries per (message, recipient).
    let mut times: HashMap<(u64, u32), u32> = HashMap::new();
    for r in reports {
        for &(id, _) in &r.received {
            if !recipient(id, r.index) {
                c.phantom += 1;
                continue;
            }
            *times.entry((id, r.index)).or_default() += 1;
        }
    }
    c.delivered = times.len() as u64;
    c.duplicated = times.values().map(|&n| n as u64 - 1).sum();
    for r in reports {
        for &counter in &r.stored {
            let id = (r.index as u64) << 32 | counter as u64;
            let missing = |to: u32| !times.contains_key(&(id, to));
            c.lost += match r.sent_to.get(counter as usize) {
                Some(Dest::User(to)) => u64::from(missing(*to)),
                Some(Dest::Group(g)) => groups.get(*g as usize).map_or(0, |m| {
                    m.iter().filter(|&&to| to != r.index && missing(to)).count() as u64
                }),
                None => 0,
            };
        }
    }
    c
}

/// Spawns the devices of users `0..users`, starting `ramp` per second, and
/// returns their command queues and tasks.
pub(crate) fn start_devices(
    shared: &Arc<Shared>,
    users: u32,
    ramp: f64,
) -> (
    Vec<mpsc::Sender<Cmd>>,
    Vec<tokio::task::JoinHandle<DeviceReport>>,
) {
    let mut devices = Vec::with_capacity(users as usize);
    let mut handles = Vec::with_capacity(users as usize);
    let per = Duration::from_secs_f64(1.0 / ramp.max(1.0));
    for i in 0..users {
        let (tx, rx) = mpsc::channel(256);
        let me = user_id(&shared.run_id, i);
        let device = Device {
            index: i,
            token: shared.tokens.mint(&me, None, 7 * 86_400),
            me,
            shared: shared.clone(),
            rx,
            outbox: BTreeMap::new(),
            report: DeviceReport {
                index: i,
                ..Default::default()
            },
            final_mode: false,
        };
        let start = per * i;
        handles.push(tokio::spawn(async move {
            tokio::time::sleep(start).await;
            device.run().await
        }));
        devices.push(tx);
    }
    (devices, handles)
}

/// Waits until every device has logged in once (at most 120 s).
pub(crate) async fn wait_all_in(shared: &Shared, users: u32) -> anyhow::Result<()> {
    let all_in = wait_until(Duration::from_secs(120), Duration::from_millis(50), || {
        shared.connected_once.load(Ordering::Relaxed) >= users
    })
    .await;
    anyhow::ensure!(
        all_in,
        "only {} of {} users could log in",
        shared.connected_once.load(Ordering::Relaxed),
        users
    );
    Ok(())
}

/// The end of a run, once no more messages are created: waits for every
/// SendAck, then has every device reconnect and sync to the end of its
/// inbox, and returns their records (their connections are closed).
pub(crate) async fn finish_devices(
    what: &str,
    shared: &Shared,
    devices: &[mpsc::Sender<Cmd>],
    handles: Vec<tokio::task::JoinHandle<DeviceReport>>,
) -> anyhow::Result<Vec<DeviceReport>> {
    eprintln!("{what}: waiting for every message to be acknowledged…");
    // A device that stalls (or reconnects) takes its queued Sends later:
    // every queue must be empty too, or a message created after this wait
    // would miss its recipients' final syncs.
    let drained = || devices.iter().all(|d| d.capacity() == d.max_capacity());
    let acked_all = wait_until(FINAL_TIMEOUT, Duration::from_millis(50), || {
        drained() && shared.outstanding.load(Ordering::Relaxed) <= 0
    })
    .await;
    if !acked_all {
        eprintln!(
            "{what}: {} messages still unacknowledged after {FINAL_TIMEOUT:?}",
            shared.outstanding.load(Ordering::Relaxed)
        );
    }
    eprintln!("{what}: final reconnect and sync of every device…");
    for d in devices {
        let _ = d.send(Cmd::Final).await;
    }
    let deadline = Instant::now() + FINAL_TIMEOUT;
    let mut reports = Vec::with_capacity(handles.len());
    for h in handles {
        let left = deadline.saturating_duration_since(Instant::now());
        let h = match tokio::time::timeout(left, h).await {
            Ok(joined) => joined,
            Err(_) => bail!("devices did not finish their final sync within {FINAL_TIMEOUT:?}"),
        };
        reports.push(h.context("device task panicked")?);
    }
    Ok(reports)
}

/// Runs `churn` and prints its table.
pub async fn run(args: &ChurnArgs) -> anyhow::Result<Outcome> {
    let common = &args.common;
    anyhow::ensure!(args.users >= 2, "--users must be at least 2");
    anyhow::ensure!(
        args.users <= common.harness.per_process,
        "churn runs in one process: --users must be at most --per-process ({})",
        common.harness.per_process
    );
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.disconnect_fraction),
        "--disconnect-fraction must be in 0..=1"
    );
    anyhow::ensure!(args.rate >= 1, "--rate must be at least 1");
    anyhow::ensure!(
        !args.kill_server || common.spawn || common.spawn_cluster.is_some(),
        "--kill-server needs --spawn or --spawn-cluster"
    );
    anyhow::ensure!(
        args.kill_node.is_none() || (args.kill_server && common.spawn_cluster.is_some()),
        "--kill-node needs --spawn-cluster and --kill-server"
    );
    if let (Some(id), Some(n)) = (args.kill_node, common.spawn_cluster) {
        anyhow::ensure!((1..=n).contains(&id), "--kill-node must be in 1..={n}");
    }
    let mut target = Target::open(common).await?;
    let spread = target.spread("users", args.users);
    let (addr_tx, addr_rx) = watch::channel(target.addr);
    let shared = Arc::new(Shared::new(
        &target,
        addr_rx,
        common.harness.source_ips,
        Vec::new(),
    ));

    eprintln!("churn: connecting {} users…", args.users);
    let (devices, handles) = start_devices(&shared, args.users, common.harness.ramp);
    wait_all_in(&shared, args.users).await?;

    eprintln!(
        "churn: {} messages at {} msgs/s, {:.0}% of users reconnecting every {} s{}…",
        args.messages,
        args.rate,
        args.disconnect_fraction * 100.0,
        args.round_secs,
        if args.kill_server {
            ", one server kill -9"
        } else {
            ""
        }
    );
    let metrics_start = target.scrape().await;
    let t0 = now_ns();
    let progress = Arc::new(AtomicU64::new(0));
    let stop_churn = Arc::new(AtomicBool::new(false));
    let skipped = Arc::new(AtomicU64::new(0));
    let dispatcher = {
        let (devices, progress, skipped) = (devices.clone(), progress.clone(), skipped.clone());
        let (messages, rate, users) = (args.messages, args.rate as f64, args.users);
        tokio::spawn(async move {
            let mut rng = rand::rngs::SmallRng::from_rng(&mut rand::rng());
            let start = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut issued = 0u64;
            while issued < messages {
                tick.tick().await;
                let due = ((start.elapsed().as_secs_f64() * rate) as u64).min(messages);
                while issued < due {
                    issued += 1;
                    let from = rng.random_range(0..users);
                    let mut to = rng.random_range(0..users - 1);
                    if to >= from {
                        to += 1;
                    }
                    let to = Dest::User(to);
                    if devices[from as usize].try_send(Cmd::Send { to }).is_err() {
                        skipped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                progress.store(issued, Ordering::Relaxed);
            }
        })
    };
    let churner = {
        let (devices, stop) = (devices.clone(), stop_churn.clone());
        let (fraction, users, round) = (args.disconnect_fraction, args.users, args.round_secs);
        tokio::spawn(async move {
            let mut rng = rand::rngs::SmallRng::from_rng(&mut rand::rng());
            let per_round = (fraction * users as f64).round() as usize;
            let mut rounds = 0u64;
            loop {
                tokio::time::sleep(Duration::from_secs_f64(round.max(0.05))).await;
                if stop.load(Ordering::Relaxed) {
                    return rounds;
                }
                rounds += 1;
                for _ in 0..per_round {
                    let i = rng.random_range(0..users) as usize;
                    let pause = Duration::from_millis(rng.random_range(50..500));
                    let _ = devices[i].try_send(Cmd::Drop { pause });
                }
            }
        })
    };
    let mut kill = None;
    // The server's counters up to the kill; its successor counts from 0.
    let mut metrics_before = metrics_start.clone();
    let mut metrics_before_kill = None;
    let mut killed_node = None;
    if args.kill_server {
        let at = (args.messages as f64 * rand::rng().random_range(0.2..0.8)) as u64;
        wait_until(Duration::from_secs(3600), Duration::from_millis(5), || {
            progress.load(Ordering::Relaxed) >= at || dispatcher.is_finished()
        })
        .await;
        let at_kill = target.scrape().await;
        metrics_before_kill = Some(server_metrics::change(
            metrics_start.as_ref(),
            at_kill.as_ref(),
        ));
        // Its last CPU time, before it goes.
        target.sampler.refresh();
        let t_kill = now_ns();
        if let Some(cluster) = target.cluster.as_mut() {
            let ids: Vec<u16> = cluster.nodes.keys().copied().collect();
            let id = args
                .kill_node
                .unwrap_or_else(|| ids[rand::rng().random_range(0..ids.len())]);
            // The other nodes' counters go on; the new process counts from 0.
            metrics_before = at_kill.map(|s| s.without_node(id));
            cluster.kill9(id).await?;
            eprintln!(
                "churn: killed node {id} (kill -9) after {at} messages; restarting it on its \
                 data dir and ports…"
            );
            cluster.restart(id).await?;
            let restart_secs = (now_ns() - t_kill) as f64 / 1e9;
            eprintln!("churn: node {id} ready again after {restart_secs:.2} s");
            target
                .sampler
                .set_pid(&format!("node {id}"), cluster.nodes[&id].pid);
            killed_node = Some(id);
            kill = Some((at, restart_secs));
        } else {
            metrics_before = Some(Snapshot::default());
            let server = target.server.as_mut().context("no spawned server")?;
            server.kill9().await?;
            eprintln!("churn: killed the server (kill -9) after {at} messages; restarting…");
            server.restart().await?;
            let restart_secs = (now_ns() - t_kill) as f64 / 1e9;
            eprintln!(
                "churn: server back on {} after {restart_secs:.2} s",
                server.client_addr
            );
            let _ = addr_tx.send(server.client_addr);
            target.sampler.set_server(Some(server.pid));
            target.addr = server.client_addr;
            target.ops = Some(server.ops_addr);
            kill = Some((at, restart_secs));
        }
    }
    dispatcher.await.context("dispatcher")?;
    let send_secs = (now_ns() - t0) as f64 / 1e9;
    stop_churn.store(true, Ordering::Relaxed);
    let rounds = churner.await.context("churner")?;

    let reports = finish_devices("churn", &shared, &devices, handles).await?;
    let t1 = now_ns();
    target.check_alive()?;
    let mut metrics =
        server_metrics::change(metrics_before.as_ref(), target.scrape().await.as_ref());
    if let Some(up_to_kill) = metrics_before_kill {
        metrics = server_metrics::then(up_to_kill, metrics);
    }
    let server = ServerFigures::from_change(metrics.as_ref());
    let usage = target.sampler.usage(t0, t1).await;
    let describe = target.describe();
    let processes = target.close().await;

    let c = check(&reports, &[]);
    let sum = |f: fn(&DeviceReport) -> u64| reports.iter().map(f).sum::<u64>();
    let logins = sum(|r| r.logins);
    let lost_sessions = sum(|r| r.lost_sessions);
    let first_loss = reports.iter().find_map(|r| r.first_loss.clone());

    let mut t = Table::new(format!(
        "churn: {} users, {} messages, {:.0}% reconnecting per {} s round{}",
        args.users,
        count(args.messages),
        args.disconnect_fraction * 100.0,
        args.round_secs,
        if args.kill_server {
            ", server killed once"
        } else {
            ""
        }
    ));
    t.row(
        "sent (created) / acked / stored",
        format!(
            "{} / {} / {}",
            count(c.created),
            count(c.acked),
            count(c.stored)
        ),
    )
    .row("delivered (unique)", count(c.delivered))
    .row(
        "lost / duplicated / phantom",
        format!("{} / {} / {}", c.lost, c.duplicated, c.phantom),
    )
    .row(
        "refused / never acknowledged",
        format!("{} / {}", c.refused, c.unacked),
    )
    .row(
        "malformed entries / seq gaps",
        format!("{} / {}", c.malformed, c.seq_gaps),
    )
    .row("devices not synced to the end", c.devices_not_synced)
    .row(
        "send phase",
        format!(
            "{send_secs:.1} s ({:.0} msgs/s offered, {} skipped: queue full)",
            args.messages as f64 / send_secs,
            skipped.load(Ordering::Relaxed)
        ),
    )
    .row("disconnect rounds", rounds)
    .row(
        "logins / commanded drops / lost sessions",
        format!(
            "{} / {} / {}",
            logins,
            sum(|r| r.commanded_drops),
            lost_sessions
        ),
    )
    .row("resent Sends", sum(|r| r.resends))
    .row(
        "gap syncs / redelivered entries",
        format!("{} / {}", sum(|r| r.gap_syncs), sum(|r| r.redelivered)),
    )
    .row("connect failures (retried)", sum(|r| r.connect_failures))
    .row(
        "redirects followed (cluster)",
        crate::clients::redirects_followed(),
    );
    if let Some((at, secs)) = kill {
        match killed_node {
            Some(id) => t.row(
                "node kill -9",
                format!("node {id} after {at} messages, ready again in {secs:.2} s"),
            ),
            None => t.row(
                "server kill -9",
                format!("after {at} messages, back in {secs:.2} s"),
            ),
        };
    }
    t.row("server peak RSS", mib(usage.server_peak_rss_mib));
    usage_rows(&mut t, "whole run", &usage);
    server.add_rows(&mut t);
    t.print();
    crate::report::process_table(&processes).print();
    if let Some(why) = &first_loss {
        eprintln!("churn: first unplanned disconnect: {why}");
    }

    let failures = c.failures();
    let json = json!({
        "target": describe,
        "users": args.users,
        "messages": args.messages,
        "rate": args.rate,
        "disconnect_fraction": args.disconnect_fraction,
        "round_secs": args.round_secs,
        "kill_server": kill.map(|(at, secs)| json!({
            "after_messages": at,
            "restart_secs": secs,
            "node": killed_node,
        })),
        "spread_by_node": spread,
        "processes": processes,
        "send_secs": send_secs,
        "skipped_queue_full": skipped.load(Ordering::Relaxed),
        "disconnect_rounds": rounds,
        "logins": logins,
        "redirects": crate::clients::redirects_followed(),
        "lost_sessions": lost_sessions,
        "first_unplanned_disconnect": first_loss,
        "resends": sum(|r| r.resends),
        "gap_syncs": sum(|r| r.gap_syncs),
        "redelivered": sum(|r| r.redelivered),
        "check": c,
        "usage": usage,
        "server_metrics": server,
    });
    Ok(Outcome {
        name: "churn",
        json,
        failures,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmid_round_trip() {
        assert_ne!(cmid(0, 0), 0);
        assert_eq!(counter_of(cmid(7, 41)), 41);
        assert_ne!(cmid(1, 0), cmid(0, 1));
    }

    #[test]
    fn check_counts_loss_duplicates_and_phantoms() {
        let mut a = DeviceReport {
            index: 0,
            sent_to: vec![Dest::User(1); 3],
            ..Default::default()
        };
        a.stored.extend([0, 1, 2]);
        let mut b = DeviceReport {
            index: 1,
            ..Default::default()
        };
        b.received = vec![(0, 1), (1, 2), (1, 3), (5 << 32, 4)];
        let c = check(&[a, b], &[]);
        assert_eq!(c.delivered, 2);
        assert_eq!(c.duplicated, 1);
        assert_eq!(c.lost, 1);
        assert_eq!(c.phantom, 1);
    }
}
