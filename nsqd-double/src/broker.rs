//! The test double's in-memory state: topics, channels, queued / in-flight / deferred
//! messages, per-client RDY and in-flight counts, counters. One `std::sync::Mutex` guards it
//! all (never held across an `.await`); connection tasks are woken through a per-client
//! `Notify`.
//!
//! Semantics follow nsqd v1.3.0 (`nsqd/topic.go`, `channel.go`, `client_v2.go`): a topic with
//! no channel keeps its messages until the first channel appears; every channel gets a copy
//! (same id); `attempts` counts deliveries; an un-FINed message goes back to the queue after
//! the client's msg timeout; `REQ 0` requeues at once, `REQ n` after n ms; a client may have
//! at most RDY messages in flight; a disconnected client's in-flight messages wait for their
//! timeout.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ferry_nsq::codec::MessageId;
use tokio::sync::Notify;

/// One message as the double stores it.
#[derive(Debug, Clone)]
pub(crate) struct Msg {
    pub id: MessageId,
    pub body: Bytes,
    pub timestamp_ns: i64,
    pub attempts: u16,
}

#[derive(Debug)]
struct InFlight {
    msg: Msg,
    client: u64,
    delivered_at: Instant,
    deadline: Instant,
}

#[derive(Debug, Default)]
struct Channel {
    queue: VecDeque<Msg>,
    in_flight: HashMap<MessageId, InFlight>,
    deferred: Vec<(Instant, Msg)>,
    clients: Vec<u64>,
}

#[derive(Debug, Default)]
struct Topic {
    /// Messages published before the topic had a channel (nsqd keeps them for the first one).
    backlog: VecDeque<(Option<Instant>, Msg)>,
    channels: BTreeMap<String, Channel>,
}

/// Per-connection state the broker needs.
#[derive(Debug)]
pub(crate) struct ClientInfo {
    pub rdy: u64,
    pub in_flight: u64,
    pub msg_timeout: Duration,
    pub sub: Option<(String, String)>,
    pub closing: bool,
    pub wake: Arc<Notify>,
}

/// Counters and gauges of the double, for tests to wait on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Commands read, by name (`PUB`, `MPUB`, `FIN`, `NOP`, ...; unknown ones as sent).
    pub commands: BTreeMap<String, u64>,
    /// Messages accepted by PUB/MPUB/DPUB (duplicates injected by the double not counted).
    pub published: u64,
    /// Message frames written (redeliveries included).
    pub delivered: u64,
    /// Successful FINs.
    pub finished: u64,
    /// Successful REQs.
    pub requeued: u64,
    /// Successful TOUCHes.
    pub touched: u64,
    /// Messages redelivered because their msg timeout passed.
    pub timed_out: u64,
    /// `_heartbeat_` frames written.
    pub heartbeats: u64,
    /// TCP connections accepted.
    pub connections: u64,
    /// Connections open now.
    pub open_connections: u64,
    /// Messages thrown away by fault injection.
    pub lost: u64,
}

impl Stats {
    /// How many times command `name` was read.
    pub fn command(&self, name: &str) -> u64 {
        self.commands.get(name).copied().unwrap_or(0)
    }
}

/// Depth of one channel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Depth {
    /// Waiting for delivery.
    pub queued: usize,
    /// Delivered, not yet FINed.
    pub in_flight: usize,
    /// Waiting for a REQ delay, a DPUB delay or an injected delivery delay.
    pub deferred: usize,
}

/// The whole in-memory state.
#[derive(Debug, Default)]
pub(crate) struct Broker {
    topics: HashMap<String, Topic>,
    pub clients: HashMap<u64, ClientInfo>,
    next_client: u64,
    id_seq: u64,
    pub stats: Stats,
    pub delivery_delay: Duration,
    pub duplicate: bool,
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Why FIN/REQ/TOUCH failed (nsqd's texts).
pub(crate) enum AckFailure {
    NotInFlight,
    NotOwner,
}

impl AckFailure {
    pub fn text(&self) -> &'static str {
        match self {
            AckFailure::NotInFlight => "ID not in flight",
            AckFailure::NotOwner => "client does not own message",
        }
    }
}

impl Broker {
    pub fn new() -> Self {
        Broker {
            // Ids look like nsqd's: 16 lowercase hex characters, from a time-based start.
            id_seq: (now_ns() as u64 >> 20) << 22,
            ..Default::default()
        }
    }

    fn new_id(&mut self) -> MessageId {
        self.id_seq += 1;
        let text = format!("{:016x}", self.id_seq);
        let mut id = [0u8; 16];
        id.copy_from_slice(&text.as_bytes()[text.len() - 16..]);
        MessageId(id)
    }

    pub fn add_client(&mut self, msg_timeout: Duration) -> (u64, Arc<Notify>) {
        self.next_client += 1;
        let wake = Arc::new(Notify::new());
        self.clients.insert(
            self.next_client,
            ClientInfo {
                rdy: 0,
                in_flight: 0,
                msg_timeout,
                sub: None,
                closing: false,
                wake: wake.clone(),
            },
        );
        (self.next_client, wake)
    }

    pub fn remove_client(&mut self, id: u64) {
        if let Some(info) = self.clients.remove(&id)
            && let Some((t, c)) = info.sub
            && let Some(ch) = self.topics.get_mut(&t).and_then(|t| t.channels.get_mut(&c))
        {
            ch.clients.retain(|&c| c != id);
        }
    }

    fn wake_channel(&self, topic: &str, channel: &str) {
        if let Some(ch) = self.topics.get(topic).and_then(|t| t.channels.get(channel)) {
            for c in &ch.clients {
                if let Some(info) = self.clients.get(c) {
                    info.wake.notify_one();
                }
            }
        }
    }

    fn wake_topic(&self, topic: &str) {
        if let Some(t) = self.topics.get(topic) {
            for name in t.channels.keys() {
                self.wake_channel(topic, name);
            }
        }
    }

    /// SUB: creates the topic and channel if needed; the first channel takes the backlog.
    pub fn subscribe(&mut self, client: u64, topic: &str, channel: &str) {
        let t = self.topics.entry(topic.to_owned()).or_default();
        let first = t.channels.is_empty();
        let ch = t.channels.entry(channel.to_owned()).or_default();
        if first {
            for (until, msg) in t.backlog.drain(..) {
                match until {
                    Some(at) => ch.deferred.push((at, msg)),
                    None => ch.queue.push_back(msg),
                }
            }
        }
        ch.clients.push(client);
        if let Some(info) = self.clients.get_mut(&client) {
            info.sub = Some((topic.to_owned(), channel.to_owned()));
        }
        self.wake_channel(topic, channel);
    }

    /// PUB/MPUB/DPUB: one message per body, each channel gets a copy.
    pub fn publish(&mut self, topic: &str, bodies: Vec<Bytes>, defer: Duration) {
        let defer = defer.max(self.delivery_delay);
        let until = (!defer.is_zero()).then(|| Instant::now() + defer);
        self.stats.published += bodies.len() as u64;
        let copies = if self.duplicate { 2 } else { 1 };
        let mut msgs = Vec::with_capacity(bodies.len() * copies);
        for body in bodies {
            let timestamp_ns = now_ns();
            for _ in 0..copies {
                msgs.push(Msg {
                    id: self.new_id(),
                    body: body.clone(),
                    timestamp_ns,
                    attempts: 0,
                });
            }
        }
        let t = self.topics.entry(topic.to_owned()).or_default();
        if t.channels.is_empty() {
            t.backlog.extend(msgs.into_iter().map(|m| (until, m)));
            return;
        }
        for ch in t.channels.values_mut() {
            for msg in &msgs {
                match until {
                    Some(at) => ch.deferred.push((at, msg.clone())),
                    None => ch.queue.push_back(msg.clone()),
                }
            }
        }
        self.wake_topic(topic);
    }

    /// Takes the messages `client` may receive now (RDY minus in flight) and marks them in
    /// flight, attempts + 1.
    pub fn take_ready(&mut self, client: u64) -> Vec<Msg> {
        let Some(info) = self.clients.get(&client) else {
            return Vec::new();
        };
        let Some((topic, channel)) = info.sub.clone() else {
            return Vec::new();
        };
        if info.closing || info.in_flight >= info.rdy {
            return Vec::new();
        }
        let room = (info.rdy - info.in_flight) as usize;
        let msg_timeout = info.msg_timeout;
        let Some(ch) = self
            .topics
            .get_mut(&topic)
            .and_then(|t| t.channels.get_mut(&channel))
        else {
            return Vec::new();
        };
        let now = Instant::now();
        let mut out = Vec::new();
        while out.len() < room {
            let Some(mut msg) = ch.queue.pop_front() else {
                break;
            };
            msg.attempts = msg.attempts.saturating_add(1);
            ch.in_flight.insert(
                msg.id,
                InFlight {
                    msg: msg.clone(),
                    client,
                    delivered_at: now,
                    deadline: now + msg_timeout,
                },
            );
            out.push(msg);
        }
        let n = out.len() as u64;
        if let Some(info) = self.clients.get_mut(&client) {
            info.in_flight += n;
        }
        self.stats.delivered += n;
        out
    }

    fn channel_of(&mut self, client: u64) -> Option<(&mut Channel, &mut ClientInfo)> {
        let info = self.clients.get_mut(&client)?;
        let (t, c) = info.sub.as_ref()?;
        let ch = self.topics.get_mut(t)?.channels.get_mut(c)?;
        Some((ch, info))
    }

    fn pop_in_flight(&mut self, client: u64, id: &MessageId) -> Result<Msg, AckFailure> {
        let (ch, info) = self.channel_of(client).ok_or(AckFailure::NotInFlight)?;
        match ch.in_flight.get(id) {
            None => Err(AckFailure::NotInFlight),
            Some(f) if f.client != client => Err(AckFailure::NotOwner),
            Some(_) => {
                let f = ch.in_flight.remove(id).expect("present");
                info.in_flight = info.in_flight.saturating_sub(1);
                info.wake.notify_one();
                Ok(f.msg)
            }
        }
    }

    pub fn finish(&mut self, client: u64, id: &MessageId) -> Result<(), AckFailure> {
        self.pop_in_flight(client, id)?;
        self.stats.finished += 1;
        Ok(())
    }

    pub fn requeue(
        &mut self,
        client: u64,
        id: &MessageId,
        delay: Duration,
    ) -> Result<(), AckFailure> {
        let msg = self.pop_in_flight(client, id)?;
        self.stats.requeued += 1;
        let (ch, _) = self.channel_of(client).expect("was in flight");
        if delay.is_zero() {
            ch.queue.push_back(msg);
        } else {
            ch.deferred.push((Instant::now() + delay, msg));
        }
        if let Some((t, c)) = self.clients.get(&client).and_then(|i| i.sub.clone()) {
            self.wake_channel(&t, &c);
        }
        Ok(())
    }

    pub fn touch(
        &mut self,
        client: u64,
        id: &MessageId,
        max_msg_timeout: Duration,
    ) -> Result<(), AckFailure> {
        let (ch, info) = self.channel_of(client).ok_or(AckFailure::NotInFlight)?;
        let msg_timeout = info.msg_timeout;
        match ch.in_flight.get_mut(id) {
            None => Err(AckFailure::NotInFlight),
            Some(f) if f.client != client => Err(AckFailure::NotOwner),
            Some(f) => {
                let cap = f.delivered_at + max_msg_timeout;
                f.deadline = (Instant::now() + msg_timeout).min(cap);
                self.stats.touched += 1;
                Ok(())
            }
        }
    }

    /// Requeues timed-out in-flight messages and due deferred ones; wakes their clients.
    pub fn scan(&mut self, now: Instant) {
        let mut to_wake = Vec::new();
        let mut timed_out = 0;
        let mut freed: Vec<u64> = Vec::new();
        for (tname, t) in self.topics.iter_mut() {
            for (cname, ch) in t.channels.iter_mut() {
                let expired: Vec<MessageId> = ch
                    .in_flight
                    .iter()
                    .filter(|(_, f)| f.deadline <= now)
                    .map(|(id, _)| *id)
                    .collect();
                let mut changed = !expired.is_empty();
                for id in expired {
                    let f = ch.in_flight.remove(&id).expect("listed");
                    freed.push(f.client);
                    ch.queue.push_back(f.msg);
                    timed_out += 1;
                }
                let before = ch.deferred.len();
                let mut i = 0;
                while i < ch.deferred.len() {
                    if ch.deferred[i].0 <= now {
                        let (_, msg) = ch.deferred.swap_remove(i);
                        ch.queue.push_back(msg);
                    } else {
                        i += 1;
                    }
                }
                changed |= ch.deferred.len() != before;
                if changed {
                    to_wake.push((tname.clone(), cname.clone()));
                }
            }
        }
        for c in freed {
            if let Some(info) = self.clients.get_mut(&c) {
                info.in_flight = info.in_flight.saturating_sub(1);
            }
        }
        self.stats.timed_out += timed_out;
        for (t, c) in to_wake {
            self.wake_channel(&t, &c);
        }
    }

    /// Throws away every in-flight message (as an nsqd crash would).
    pub fn lose_in_flight(&mut self) -> usize {
        let mut n = 0;
        for t in self.topics.values_mut() {
            for ch in t.channels.values_mut() {
                n += ch.in_flight.len();
                ch.in_flight.clear();
            }
        }
        for info in self.clients.values_mut() {
            info.in_flight = 0;
            info.wake.notify_one();
        }
        self.stats.lost += n as u64;
        n
    }

    /// Throws away every queued and deferred message (nsqd's memory queue).
    pub fn lose_queued(&mut self) -> usize {
        let mut n = 0;
        for t in self.topics.values_mut() {
            n += t.backlog.len();
            t.backlog.clear();
            for ch in t.channels.values_mut() {
                n += ch.queue.len() + ch.deferred.len();
                ch.queue.clear();
                ch.deferred.clear();
            }
        }
        self.stats.lost += n as u64;
        n
    }

    pub fn depth(&self, topic: &str, channel: &str) -> Depth {
        self.topics
            .get(topic)
            .and_then(|t| t.channels.get(channel))
            .map(|ch| Depth {
                queued: ch.queue.len(),
                in_flight: ch.in_flight.len(),
                deferred: ch.deferred.len(),
            })
            .unwrap_or_default()
    }
}
