//! The consumer: one topic/channel, one task per nsqd address, one bounded queue of
//! [`Delivery`] handles for the application.
//!
//! ```text
//!  nsqd A --msg--> session A --+                     +--> Delivery::fin()/req()/touch()
//!  nsqd B --msg--> session B --+--bounded mpsc--> app      (back to the session that got it)
//! ```
//!
//! Flow control: after `SUB`, each session sends `RDY n` where the n of all sessions add up to
//! the caller's `max_in_flight` (clamped to nsqd's `max_rdy_count`). nsqd (v1.x,
//! `clientV2.IsReadyForMessages`) treats RDY as a ceiling on un-FINed messages, not a budget,
//! so a message's slot comes back when the application FINs or REQs it; the session tracks
//! its in-flight count and re-issues RDY whenever the caller changes `max_in_flight`
//! ([`Consumer::set_max_in_flight`], e.g. to what the node can commit; 0 pauses) and on every
//! reconnect. Because nsqd never has more than RDY messages out, a session's local buffer is
//! bounded by its RDY and the session never stops reading its socket (a session that stopped
//! reading would stop answering heartbeats and be dropped).
//!
//! FIN after our own commit: the application calls [`Delivery::fin`] only once what the
//! message carries is durable. If the connection the message came on has gone, `fin` reports
//! [`AckError::ConnectionGone`]: nsqd will redeliver it after its msg timeout, and the
//! application's idempotent apply absorbs the duplicate. A [`Delivery`] dropped without FIN or
//! REQ is requeued (`REQ id <requeue_delay>`), best effort.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::codec::{self, CLOSE_WAIT, Command, Message, MessageId};
use crate::connection::{Backoff, Connection, ConnectionConfig, ConnectionError, Event};
use crate::lookup;

/// Consumer settings.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// nsqd TCP addresses; the consumer keeps one connection to each.
    pub addresses: Vec<String>,
    /// nsqlookupd HTTP addresses (`host:port`), asked every `lookupd_poll_interval` which
    /// nsqd have the topic; each newly found nsqd gets a connection of its own.
    pub lookupd_http_addresses: Vec<String>,
    /// How often nsqlookupd is asked (go-nsq's default: 60 s).
    pub lookupd_poll_interval: Duration,
    /// Topic to SUB to.
    pub topic: String,
    /// Channel to SUB to.
    pub channel: String,
    /// Most un-FINed messages across all connections (split between them).
    pub max_in_flight: u32,
    /// IDENTIFY settings and limits.
    pub connection: ConnectionConfig,
    /// Delay of the REQ sent for a [`Delivery`] dropped without FIN or REQ, and the step of
    /// [`Delivery::req_backoff`].
    pub requeue_delay: Duration,
    /// Largest delay [`Delivery::req_backoff`] asks for.
    pub max_requeue_delay: Duration,
    /// Reconnect back-off.
    pub backoff: Backoff,
}

impl ConsumerConfig {
    /// Defaults for `topic`/`channel` on `addresses`.
    pub fn new(addresses: Vec<String>, topic: &str, channel: &str) -> Self {
        ConsumerConfig {
            addresses,
            lookupd_http_addresses: Vec::new(),
            lookupd_poll_interval: Duration::from_secs(60),
            topic: topic.into(),
            channel: channel.into(),
            max_in_flight: 256,
            connection: ConnectionConfig::default(),
            requeue_delay: Duration::from_secs(1),
            max_requeue_delay: Duration::from_secs(60),
            backoff: Backoff::default(),
        }
    }
}

/// Why a consumer could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// A topic or channel name nsqd would reject.
    #[error("invalid topic or channel name {0:?}")]
    BadName(String),
    /// Neither an nsqd nor an nsqlookupd address.
    #[error("no nsqd and no nsqlookupd address")]
    NoAddress,
}

/// Why FIN/REQ/TOUCH could not be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    /// The connection the message came on is gone; nsqd redelivers it after its msg timeout.
    #[error("the message's connection is gone (nsqd will redeliver it)")]
    ConnectionGone,
}

#[derive(Debug)]
enum Ack {
    Fin(MessageId),
    Req(MessageId, u64),
    Touch(MessageId),
}

/// One delivered message. FIN it after the commit, REQ it if the commit failed, TOUCH it if the
/// commit may outlast nsqd's msg timeout.
#[derive(Debug)]
pub struct Delivery {
    message: Message,
    acks: mpsc::Sender<Ack>,
    requeue_delay_ms: u64,
    max_requeue_delay_ms: u64,
    msg_timeout: Duration,
    answered: bool,
}

impl Delivery {
    /// The message id.
    pub fn id(&self) -> MessageId {
        self.message.id
    }

    /// Deliveries so far, this one included (1 the first time).
    pub fn attempts(&self) -> u16 {
        self.message.attempts
    }

    /// When nsqd accepted the message (Unix ns).
    pub fn timestamp_ns(&self) -> i64 {
        self.message.timestamp_ns
    }

    /// The body.
    pub fn body(&self) -> &Bytes {
        &self.message.body
    }

    /// The whole message.
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// The msg timeout nsqd applies to this message (from IDENTIFY): a commit that may take
    /// longer should [`Delivery::touch`] before it runs out, or nsqd redelivers the message.
    pub fn msg_timeout(&self) -> Duration {
        self.msg_timeout
    }

    /// `REQ` with back-off for a failed commit: `requeue_delay x attempts`, at most
    /// `max_requeue_delay`.
    pub async fn req_backoff(self) -> Result<(), AckError> {
        let ms = self
            .requeue_delay_ms
            .saturating_mul(self.message.attempts as u64)
            .min(self.max_requeue_delay_ms);
        self.req(Duration::from_millis(ms)).await
    }

    /// `FIN`: done with the message (call only after the durable commit).
    pub async fn fin(mut self) -> Result<(), AckError> {
        self.answered = true;
        let id = self.message.id;
        self.acks
            .send(Ack::Fin(id))
            .await
            .map_err(|_| AckError::ConnectionGone)
    }

    /// `REQ`: redeliver after `delay` (0 = at once); attempts goes up by one.
    pub async fn req(mut self, delay: Duration) -> Result<(), AckError> {
        self.answered = true;
        let id = self.message.id;
        self.acks
            .send(Ack::Req(id, delay.as_millis() as u64))
            .await
            .map_err(|_| AckError::ConnectionGone)
    }

    /// `TOUCH`: restart nsqd's msg timeout for this message (up to its max-msg-timeout).
    pub async fn touch(&self) -> Result<(), AckError> {
        self.acks
            .send(Ack::Touch(self.message.id))
            .await
            .map_err(|_| AckError::ConnectionGone)
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if !self.answered {
            let _ = self
                .acks
                .try_send(Ack::Req(self.message.id, self.requeue_delay_ms));
        }
    }
}

/// Counters for tests and metrics.
#[derive(Debug, Default)]
pub struct ConsumerStats {
    /// Messages received.
    pub received: AtomicU64,
    /// FINs sent.
    pub fins: AtomicU64,
    /// REQs sent.
    pub reqs: AtomicU64,
    /// TOUCHes sent.
    pub touches: AtomicU64,
    /// RDY commands sent.
    pub rdys: AtomicU64,
    /// Successful connections (SUB done), all addresses.
    pub connects: AtomicU64,
    /// Heartbeats answered.
    pub heartbeats: AtomicU64,
    /// nsqlookupd lookups that answered.
    pub lookups: AtomicU64,
    /// nsqd found through nsqlookupd (connections started for them).
    pub discovered: AtomicU64,
}

/// A running consumer.
#[derive(Debug)]
pub struct Consumer {
    rx: mpsc::Receiver<Delivery>,
    max_in_flight: Arc<watch::Sender<u32>>,
    stats: Arc<ConsumerStats>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl Consumer {
    /// Starts one session task per address (they connect in the background).
    pub fn start(config: ConsumerConfig) -> Result<Consumer, ConsumerError> {
        for name in [&config.topic, &config.channel] {
            if !codec::is_valid_name(name) {
                return Err(ConsumerError::BadName(name.clone()));
            }
        }
        if config.addresses.is_empty() && config.lookupd_http_addresses.is_empty() {
            return Err(ConsumerError::NoAddress);
        }
        // Room for every message the sessions can have out at once, so a session's send
        // never waits on a full queue in the steady state.
        let capacity = (config.max_in_flight as usize)
            .max(config.addresses.len())
            .max(1);
        let (tx, rx) = mpsc::channel(capacity);
        let max_tx = Arc::new(watch::channel(config.max_in_flight).0);
        let stats = Arc::new(ConsumerStats::default());
        let shutdown = CancellationToken::new();
        let config = Arc::new(config);
        let spawner = Arc::new(SessionSpawner {
            config: config.clone(),
            tx,
            max_tx: max_tx.clone(),
            sessions: Arc::new(AtomicUsize::new(0)),
            stats: stats.clone(),
            shutdown: shutdown.clone(),
        });
        let mut tasks = JoinSet::new();
        for addr in &config.addresses {
            spawner.spawn(&mut tasks, addr.clone());
        }
        if !config.lookupd_http_addresses.is_empty() {
            tasks.spawn(discover(spawner));
        }
        Ok(Consumer {
            rx,
            max_in_flight: max_tx,
            stats,
            shutdown,
            tasks,
        })
    }

    /// The next message; `None` once shut down.
    pub async fn recv(&mut self) -> Option<Delivery> {
        self.rx.recv().await
    }

    /// Changes the total RDY (re-issued on every connection); 0 pauses delivery.
    pub fn set_max_in_flight(&self, n: u32) {
        self.max_in_flight.send_replace(n);
    }

    /// Counters.
    pub fn stats(&self) -> &ConsumerStats {
        &self.stats
    }

    /// Sends CLS on every connection and stops. Deliveries not yet FINed are redelivered by
    /// nsqd later.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        self.rx.close();
        while self.tasks.join_next().await.is_some() {}
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Where a session connects, and its place among the sessions (for its share of the RDY).
struct Session {
    addr: String,
    index: usize,
    /// How many sessions there are now (grows as nsqlookupd reveals nsqd).
    sessions: Arc<AtomicUsize>,
}

/// Asks nsqlookupd every poll interval and starts a session for each nsqd not seen before.
/// Sessions are never stopped: one whose nsqd went away keeps retrying with back-off.
async fn discover(spawner: Arc<SessionSpawner>) {
    let SessionSpawner {
        config,
        stats,
        shutdown,
        max_tx,
        ..
    } = &*spawner;
    let mut known: HashSet<String> = config.addresses.iter().cloned().collect();
    let mut spawned = JoinSet::new();
    let mut tick = tokio::time::interval(config.lookupd_poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    'poll: loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => break,
        }
        for lookupd in &config.lookupd_http_addresses {
            let found = tokio::select! {
                found = lookup::lookup(lookupd, &config.topic, config.connection.connect_timeout) => found,
                _ = shutdown.cancelled() => break 'poll,
            };
            let addrs = match found {
                Ok(addrs) => addrs,
                Err(e) => {
                    warn!(nsqlookupd = %lookupd, error = %e, topic = %config.topic, "nsq lookup failed");
                    continue;
                }
            };
            stats.lookups.fetch_add(1, Ordering::Relaxed);
            for addr in addrs {
                if !known.insert(addr.clone()) {
                    continue;
                }
                info!(nsqlookupd = %lookupd, nsqd = %addr, topic = %config.topic, "nsqd discovered");
                stats.discovered.fetch_add(1, Ordering::Relaxed);
                spawner.spawn(&mut spawned, addr);
                // Every session recomputes its share of the RDY.
                max_tx.send_modify(|_| {});
            }
        }
    }
    while spawned.join_next().await.is_some() {}
}

/// What every session of one consumer shares: starts a session per nsqd
/// address, the configured ones and the discovered ones alike.
struct SessionSpawner {
    config: Arc<ConsumerConfig>,
    tx: mpsc::Sender<Delivery>,
    max_tx: Arc<watch::Sender<u32>>,
    /// Sessions started so far: each takes the next index, for its RDY share.
    sessions: Arc<AtomicUsize>,
    stats: Arc<ConsumerStats>,
    shutdown: CancellationToken,
}

impl SessionSpawner {
    fn spawn(self: &Arc<Self>, set: &mut JoinSet<()>, addr: String) {
        let index = self.sessions.fetch_add(1, Ordering::Relaxed);
        set.spawn(run(
            self.config.clone(),
            Session {
                addr,
                index,
                sessions: self.sessions.clone(),
            },
            self.tx.clone(),
            self.max_tx.subscribe(),
            self.stats.clone(),
            self.shutdown.clone(),
        ));
    }
}

/// This session's share of the total RDY.
fn share(total: u32, sessions: usize, index: usize) -> u64 {
    let total = total as u64;
    let n = sessions as u64;
    let base = total / n;
    let extra = u64::from((index as u64) < total % n);
    base + extra
}

async fn run(
    config: Arc<ConsumerConfig>,
    me: Session,
    tx: mpsc::Sender<Delivery>,
    mut max_rx: watch::Receiver<u32>,
    stats: Arc<ConsumerStats>,
    shutdown: CancellationToken,
) {
    let addr = &me.addr;
    let mut attempt = 0u32;
    loop {
        let connected = tokio::select! {
            c = async {
                let mut conn = Connection::connect(addr, &config.connection).await?;
                conn.subscribe(&config.topic, &config.channel).await?;
                Ok::<_, ConnectionError>(conn)
            } => c,
            _ = shutdown.cancelled() => return,
        };
        let mut conn = match connected {
            Ok(conn) => conn,
            Err(e) => {
                let delay = config.backoff.delay(attempt);
                warn!(nsqd = %addr, error = %e, ?delay, topic = %config.topic,
                    "nsq consumer cannot connect; retrying");
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => continue,
                    _ = shutdown.cancelled() => return,
                }
            }
        };
        stats.connects.fetch_add(1, Ordering::Relaxed);
        info!(nsqd = %conn.peer(), topic = %config.topic, channel = %config.channel, "nsq consumer subscribed");
        let started = tokio::time::Instant::now();
        match session(&config, &me, &mut conn, &tx, &mut max_rx, &stats, &shutdown).await {
            Ok(()) => return,
            Err(e) => {
                warn!(nsqd = %conn.peer(), error = %e, "nsq consumer connection lost; reconnecting")
            }
        }
        match config
            .backoff
            .after_session(started.elapsed(), &mut attempt)
        {
            None => {}
            Some(delay) => tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.cancelled() => return,
            },
        }
    }
}

async fn session(
    config: &ConsumerConfig,
    me: &Session,
    conn: &mut Connection,
    tx: &mpsc::Sender<Delivery>,
    max_rx: &mut watch::Receiver<u32>,
    stats: &ConsumerStats,
    shutdown: &CancellationToken,
) -> Result<(), ConnectionError> {
    let max_rdy = conn.settings().max_rdy_count;
    let rdy_for = |total: u32| {
        let n = me.sessions.load(Ordering::Relaxed).max(me.index + 1);
        share(total, n, me.index).min(max_rdy)
    };
    let mut rdy = rdy_for(*max_rx.borrow_and_update());
    conn.send(&Command::Rdy(rdy)).await?;
    stats.rdys.fetch_add(1, Ordering::Relaxed);
    let (ack_tx, mut ack_rx) = mpsc::channel::<Ack>(rdy.max(1) as usize * 2 + 16);
    let requeue_delay_ms = config.requeue_delay.as_millis() as u64;
    let max_requeue_delay_ms = config.max_requeue_delay.as_millis() as u64;
    let msg_timeout = Duration::from_millis(conn.settings().msg_timeout);
    let mut buffer: VecDeque<Delivery> = VecDeque::new();
    let mut in_flight: u64 = 0;
    let mut closing = false;
    // Set once nsqd answered CLS with CLOSE_WAIT while messages were out.
    let mut close_deadline: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            frame = conn.read_frame() => {
                match conn.on_frame(frame?).await? {
                    None => { stats.heartbeats.fetch_add(1, Ordering::Relaxed); }
                    Some(Event::Message(message)) => {
                        stats.received.fetch_add(1, Ordering::Relaxed);
                        in_flight += 1;
                        buffer.push_back(Delivery {
                            message,
                            acks: ack_tx.clone(),
                            requeue_delay_ms,
                            max_requeue_delay_ms,
                            msg_timeout,
                            answered: false,
                        });
                    }
                    Some(Event::Response(data)) if data.as_ref() == CLOSE_WAIT => {
                        debug!(nsqd = %conn.peer(), in_flight, "CLOSE_WAIT");
                        if in_flight == 0 {
                            return Ok(());
                        }
                        // nsqd sends no more messages, but still takes FIN and
                        // REQ for the ones out: wait for the application's
                        // answers (its commits), at most until nsqd would time
                        // them out and redeliver anyway.
                        close_deadline = Some(tokio::time::Instant::now() + msg_timeout);
                    }
                    Some(Event::Response(data)) => {
                        warn!(nsqd = %conn.peer(), data = ?data, "unexpected response on a consumer");
                    }
                    Some(Event::Error(err)) => {
                        // E_FIN_FAILED etc.: typically the message timed out in nsqd and was
                        // redelivered; the duplicate is the application's idempotent apply.
                        warn!(nsqd = %conn.peer(), error = %err, "nsqd refused an ack");
                    }
                }
            }
            permit = tx.reserve(), if !buffer.is_empty() => {
                match permit {
                    Ok(permit) => permit.send(buffer.pop_front().expect("not empty")),
                    // The application is gone: stop.
                    Err(_) => return Ok(()),
                }
            }
            ack = ack_rx.recv() => {
                let mut next = ack;
                while let Some(ack) = next {
                    let cmd = match ack {
                        Ack::Fin(id) => {
                            stats.fins.fetch_add(1, Ordering::Relaxed);
                            in_flight = in_flight.saturating_sub(1);
                            Command::Fin(id)
                        }
                        Ack::Req(id, ms) => {
                            stats.reqs.fetch_add(1, Ordering::Relaxed);
                            in_flight = in_flight.saturating_sub(1);
                            Command::Req(id, ms)
                        }
                        Ack::Touch(id) => {
                            stats.touches.fetch_add(1, Ordering::Relaxed);
                            Command::Touch(id)
                        }
                    };
                    conn.queue(&cmd)?;
                    next = ack_rx.try_recv().ok();
                }
                conn.flush().await?;
                if closing && in_flight == 0 {
                    return Ok(());
                }
            }
            changed = max_rx.changed(), if !closing => {
                if changed.is_err() {
                    continue;
                }
                let want = rdy_for(*max_rx.borrow_and_update());
                if want != rdy {
                    rdy = want;
                    debug!(nsqd = %conn.peer(), rdy, in_flight, "RDY");
                    conn.send(&Command::Rdy(rdy)).await?;
                    stats.rdys.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ = shutdown.cancelled(), if !closing => {
                closing = true;
                // What the application was never handed goes back to nsqd
                // now (each dropped Delivery sends a REQ), rather than after
                // the message timeout.
                buffer.clear();
                conn.send(&Command::Cls).await?;
            }
            // Evaluated even while disabled: a far deadline stands in.
            _ = tokio::time::sleep_until(close_deadline.unwrap_or_else(far_future)), if close_deadline.is_some() => {
                warn!(nsqd = %conn.peer(), in_flight, "closing with messages unanswered; nsqd will redeliver them");
                return Ok(());
            }
        }
    }
}

/// A deadline that never comes in practice (for a disabled `select!` branch).
fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86_400)
}

#[cfg(test)]
mod tests {
    use super::share;

    #[test]
    fn rdy_shares_add_up() {
        for total in 0..50u32 {
            for n in 1..7usize {
                let sum: u64 = (0..n).map(|i| share(total, n, i)).sum();
                assert_eq!(sum, total as u64);
            }
        }
    }
}
