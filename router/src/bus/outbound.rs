//! The sending side of the links (docs/CLUSTER.md §2.1): one publisher task
//! per peer node.
//!
//! The committer's delivery thread hands every durable link batch to
//! [`Outbound::committed`], which only takes a short lock and wakes the
//! peer's publisher: it never waits for NSQ. The publisher publishes the
//! batches in seq order (the NSQ producer turns what queues meanwhile into
//! MPUBs), keeps what the peer has not confirmed, and publishes again from
//! the oldest unconfirmed batch when the peer asks (`LinkResend`) or when no
//! confirmation came for `resend_after`. Batch bytes are held in memory up
//! to a bound; beyond it they are read back from the outbox when needed, so
//! a peer that is down for hours costs disk, not memory.
//!
//! Every batch goes out with the link's head appended (`LinkHead`: its
//! oldest unconfirmed seq now, and the epoch it continues after a restore),
//! so that a receiver restored from a backup can tell a gap no one can fill
//! from one the sender will resend (docs/CLUSTER.md §2.6).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_nsq::{Producer, PublishError, Topic};
use ferry_protocol::bus;
use ferry_storage::{LinkOut, NodeId, Storage};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Batches published per round (the producer makes them one MPUB).
const PUBLISH_CHUNK: usize = 64;
/// Publish times kept for the confirmation latency histogram.
const PUBLISH_TIMES_KEPT: usize = 4096;

/// Settings of the sending side.
#[derive(Debug, Clone)]
pub struct OutboundConfig {
    /// Publish again from the oldest unconfirmed batch when nothing was
    /// confirmed for this long.
    pub resend_after: Duration,
    /// Batch bytes held in memory per peer; more is read back from the outbox.
    pub held_bytes_per_peer: usize,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        OutboundConfig {
            resend_after: Duration::from_secs(5),
            held_bytes_per_peer: 64 << 20,
        }
    }
}

/// Per-peer metrics, resolved once.
struct LinkMetrics {
    published: metrics::Counter,
    publish_failures: metrics::Counter,
    resent: metrics::Counter,
    confirm_seconds: metrics::Histogram,
    outbox_entries: metrics::Gauge,
    outbox_oldest_seconds: metrics::Gauge,
}

impl LinkMetrics {
    fn new(peer: NodeId) -> Self {
        let peer = peer.to_string();
        LinkMetrics {
            published: metrics::counter!("ferry_bus_link_batches_published_total", "peer" => peer.clone()),
            publish_failures: metrics::counter!("ferry_bus_publish_failures_total", "peer" => peer.clone()),
            resent: metrics::counter!("ferry_bus_link_batches_resent_total", "peer" => peer.clone()),
            confirm_seconds: metrics::histogram!("ferry_bus_confirm_seconds", "peer" => peer.clone()),
            outbox_entries: metrics::gauge!("ferry_bus_outbox_entries", "peer" => peer.clone()),
            outbox_oldest_seconds: metrics::gauge!("ferry_bus_outbox_oldest_seconds", "peer" => peer),
        }
    }
}

/// What one link knows about its batches. Seqs `confirmed + 1 ..= last`
/// are in the outbox; `next` is the next one to publish.
struct LinkState {
    /// The peer applied everything up to here.
    confirmed: u64,
    /// The last batch committed.
    last: u64,
    /// The next batch to publish (`<= last + 1`).
    next: u64,
    /// Bytes of unconfirmed batches, as far as the memory bound allows.
    held: BTreeMap<u64, Bytes>,
    held_bytes: usize,
    /// (seq, first published) of published chunks, for the latency histogram.
    published_at: VecDeque<(u64, Instant)>,
    /// When the oldest unconfirmed batch was committed (or found at start-up).
    oldest_since: Option<Instant>,
    /// The last confirmation that moved `confirmed`, or the last resend.
    progress_at: Instant,
    /// `confirmed` as last trimmed from the outbox.
    trimmed: u64,
}

/// The link to one peer.
pub(crate) struct PeerLink {
    peer: NodeId,
    /// The epoch this link continues after a restore and the last seq it
    /// carried over from it (`(0, 0)`: none); sent in every `LinkHead`.
    prev: (u64, u64),
    topic: Topic,
    state: Mutex<LinkState>,
    wake: Notify,
    metrics: LinkMetrics,
}

impl PeerLink {
    /// Picks the link up where the outbox left it: everything in the
    /// outbox is unconfirmed and is published again.
    fn load(storage: &Storage, peer: NodeId) -> Result<PeerLink, ferry_storage::StorageError> {
        let last = storage.link_out_last(peer)?;
        let first = storage
            .outbox_page(peer, 0, 1)?
            .first()
            .map(|(seq, _)| *seq)
            .unwrap_or(last + 1);
        let confirmed = first.saturating_sub(1).min(last);
        let now = Instant::now();
        let topic = Topic::new(&super::topic_of(peer)).expect("node topics are valid names");
        let link = PeerLink {
            peer,
            prev: storage.link_prev(peer)?,
            topic,
            state: Mutex::new(LinkState {
                confirmed,
                last,
                next: confirmed + 1,
                held: BTreeMap::new(),
                held_bytes: 0,
                published_at: VecDeque::new(),
                oldest_since: (last > confirmed).then_some(now),
                progress_at: now,
                trimmed: confirmed,
            }),
            wake: Notify::new(),
            metrics: LinkMetrics::new(peer),
        };
        link.metrics.outbox_entries.set((last - confirmed) as f64);
        Ok(link)
    }
}

/// The sending side of every link of this node.
pub(crate) struct Outbound {
    links: HashMap<NodeId, Arc<PeerLink>>,
    config: OutboundConfig,
}

impl Outbound {
    /// Loads the link to each of `peers` from the outbox.
    pub fn load(
        storage: &Storage,
        peers: impl IntoIterator<Item = NodeId>,
        config: OutboundConfig,
    ) -> Result<Outbound, ferry_storage::StorageError> {
        let mut links = HashMap::new();
        for peer in peers {
            links.insert(peer, Arc::new(PeerLink::load(storage, peer)?));
        }
        Ok(Outbound { links, config })
    }

    /// Starts one publisher per peer.
    pub fn spawn(
        &self,
        producer: Producer,
        storage: Arc<Storage>,
        stop: CancellationToken,
        tasks: &mut tokio::task::JoinSet<()>,
    ) {
        for link in self.links.values() {
            tasks.spawn(publish_loop(
                link.clone(),
                producer.clone(),
                storage.clone(),
                self.config.clone(),
                stop.clone(),
            ));
        }
    }

    /// Takes batches the committer made durable (from the delivery thread:
    /// a short lock per batch, never a wait).
    pub fn committed(&self, batches: Vec<LinkOut>) {
        for out in batches {
            let Some(link) = self.links.get(&out.peer) else {
                tracing::error!(peer = out.peer, "link batch for a node that is not a peer");
                continue;
            };
            let mut state = link.state.lock().expect("not poisoned");
            debug_assert_eq!(out.seq, state.last + 1, "link batches arrive in seq order");
            state.last = out.seq;
            if state.oldest_since.is_none() {
                state.oldest_since = Some(Instant::now());
            }
            if state.held_bytes + out.envelope.len() <= self.config.held_bytes_per_peer {
                state.held_bytes += out.envelope.len();
                state.held.insert(out.seq, out.envelope);
            }
            link.metrics
                .outbox_entries
                .set((state.last - state.confirmed) as f64);
            drop(state);
            link.wake.notify_one();
        }
    }

    /// The peer applied everything through `through`.
    pub fn confirmed(&self, peer: NodeId, through: u64) {
        let Some(link) = self.links.get(&peer) else {
            return;
        };
        let mut state = link.state.lock().expect("not poisoned");
        if through > state.last {
            // The peer applied batches this node never committed on this
            // epoch: it cannot happen unless the epochs are mixed up.
            tracing::error!(
                peer,
                through,
                last = state.last,
                "confirmation beyond the last batch"
            );
            return;
        }
        if through <= state.confirmed {
            return;
        }
        let now = Instant::now();
        state.confirmed = through;
        state.progress_at = now;
        state.next = state.next.max(through + 1);
        let kept = state.held.split_off(&(through + 1));
        let dropped: usize = state.held.values().map(Bytes::len).sum();
        state.held = kept;
        state.held_bytes -= dropped;
        while let Some(&(seq, at)) = state.published_at.front() {
            if seq > through {
                break;
            }
            link.metrics.confirm_seconds.record(now - at);
            state.published_at.pop_front();
        }
        state.oldest_since = (state.last > through).then_some(now);
        link.metrics
            .outbox_entries
            .set((state.last - state.confirmed) as f64);
        drop(state);
        link.wake.notify_one();
    }

    /// The peer asks for the link again from `from_seq`.
    pub fn resend_from(&self, peer: NodeId, from_seq: u64) {
        let Some(link) = self.links.get(&peer) else {
            return;
        };
        let mut state = link.state.lock().expect("not poisoned");
        let from = from_seq.max(state.confirmed + 1);
        if from < state.next {
            link.metrics.resent.increment(state.next - from);
            state.next = from;
            state.progress_at = Instant::now();
        }
        drop(state);
        link.wake.notify_one();
    }

    /// Unconfirmed batches, all peers.
    pub fn unconfirmed(&self) -> u64 {
        self.links
            .values()
            .map(|l| {
                let s = l.state.lock().expect("not poisoned");
                s.last - s.confirmed
            })
            .sum()
    }
}

/// Seqs of a publisher round and their bytes where held.
type Chunk = Vec<(u64, Option<Bytes>)>;

/// What a publisher round takes, and the link's head (its oldest
/// unconfirmed seq) as it stands now.
fn take_chunk(link: &PeerLink) -> Option<(Chunk, bus::LinkHead)> {
    let mut state = link.state.lock().expect("not poisoned");
    if state.next > state.last {
        return None;
    }
    let from = state.next;
    if from == state.confirmed + 1 {
        // Nothing was outstanding: the wait for a confirmation starts now,
        // not when the link last made progress.
        state.progress_at = Instant::now();
    }
    let to = state.last.min(from + PUBLISH_CHUNK as u64 - 1);
    let chunk = (from..=to)
        .map(|seq| (seq, state.held.get(&seq).cloned()))
        .collect();
    state.next = to + 1;
    let head = bus::LinkHead {
        held_from: state.confirmed + 1,
        prev_epoch: link.prev.0,
        prev_through: link.prev.1,
    };
    Some((chunk, head))
}

/// Fills in the bytes of batches no longer held in memory, from the outbox.
/// A batch missing there was confirmed (and trimmed) meanwhile: dropped.
async fn fill_from_outbox(
    storage: &Arc<Storage>,
    peer: NodeId,
    chunk: Vec<(u64, Option<Bytes>)>,
) -> Result<Vec<(u64, Bytes)>, ferry_storage::StorageError> {
    let Some(first_missing) = chunk.iter().find(|(_, b)| b.is_none()).map(|(s, _)| *s) else {
        return Ok(chunk
            .into_iter()
            .map(|(s, b)| (s, b.expect("all held")))
            .collect());
    };
    let storage = storage.clone();
    let n = chunk.len();
    let rows = tokio::task::spawn_blocking(move || storage.outbox_page(peer, first_missing, n))
        .await
        .map_err(|_| ferry_storage::StorageError::Io("outbox read task failed".into()))??;
    let rows: HashMap<u64, Bytes> = rows.into_iter().collect();
    Ok(chunk
        .into_iter()
        .filter_map(|(seq, held)| held.or_else(|| rows.get(&seq).cloned()).map(|b| (seq, b)))
        .collect())
}

async fn publish_loop(
    link: Arc<PeerLink>,
    producer: Producer,
    storage: Arc<Storage>,
    config: OutboundConfig,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures = 0u32;
    loop {
        housekeeping(&link, &storage, &config).await;
        let Some((chunk, head)) = take_chunk(&link) else {
            tokio::select! {
                _ = link.wake.notified() => {}
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            continue;
        };
        let first = chunk[0].0;
        let batches = match fill_from_outbox(&storage, link.peer, chunk).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(peer = link.peer, error = %e, "reading the outbox failed");
                rewind(&link, first);
                backoff(&mut failures, &stop).await;
                continue;
            }
        };
        match publish_chunk(&link, &producer, &batches, &head).await {
            Ok(()) => {
                failures = 0;
                if let Some(&(last, _)) = batches.last() {
                    let mut state = link.state.lock().expect("not poisoned");
                    if state.published_at.back().is_none_or(|(s, _)| *s < last) {
                        state.published_at.push_back((last, Instant::now()));
                        if state.published_at.len() > PUBLISH_TIMES_KEPT {
                            state.published_at.pop_front();
                        }
                    }
                }
            }
            Err((seq, e)) => {
                link.metrics.publish_failures.increment(1);
                tracing::warn!(peer = link.peer, seq, error = %e, "link publish failed; will retry");
                rewind(&link, seq);
                backoff(&mut failures, &stop).await;
            }
        }
        if stop.is_cancelled() {
            return;
        }
    }
}

/// Publishes `batches` in order; on the first failure, the seq to go on from.
async fn publish_chunk(
    link: &PeerLink,
    producer: &Producer,
    batches: &[(u64, Bytes)],
    head: &bus::LinkHead,
) -> Result<(), (u64, PublishError)> {
    let mut receipts = Vec::with_capacity(batches.len());
    for (seq, bytes) in batches {
        let bytes = bus::with_link_head(bytes, head);
        match producer.enqueue(&link.topic, bytes).await {
            Ok(receipt) => receipts.push((*seq, receipt)),
            Err(e) => return Err((*seq, e)),
        }
    }
    for (seq, receipt) in receipts {
        receipt.await.map_err(|e| (seq, e))?;
        link.metrics.published.increment(1);
    }
    Ok(())
}

fn rewind(link: &PeerLink, seq: u64) {
    let mut state = link.state.lock().expect("not poisoned");
    state.next = state.next.min(seq.max(state.confirmed + 1));
}

async fn backoff(failures: &mut u32, stop: &CancellationToken) {
    *failures = (*failures + 1).min(7);
    let delay = Duration::from_millis(50 << *failures);
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = stop.cancelled() => {}
    }
}

/// The timer's work: resend after silence, trim what was confirmed, age gauge.
async fn housekeeping(link: &PeerLink, storage: &Arc<Storage>, config: &OutboundConfig) {
    let trim = {
        let mut state = link.state.lock().expect("not poisoned");
        let now = Instant::now();
        let waiting = state.next > state.confirmed + 1;
        if waiting && now - state.progress_at >= config.resend_after {
            link.metrics
                .resent
                .increment(state.next - state.confirmed - 1);
            tracing::info!(
                peer = link.peer,
                from = state.confirmed + 1,
                "no confirmation for {:?}: publishing the link again",
                config.resend_after
            );
            state.next = state.confirmed + 1;
            state.progress_at = now;
        }
        let oldest = state
            .oldest_since
            .map_or(0.0, |at| (now - at).as_secs_f64());
        link.metrics.outbox_oldest_seconds.set(oldest);
        (state.confirmed > state.trimmed).then(|| {
            state.trimmed = state.confirmed;
            state.confirmed
        })
    };
    if let Some(through) = trim {
        let storage = storage.clone();
        let peer = link.peer;
        let result = tokio::task::spawn_blocking(move || storage.trim_outbox(peer, through)).await;
        if let Ok(Err(e)) = result {
            // Harmless: the rows are published again and dropped by the peer.
            tracing::warn!(peer, error = %e, "trimming the outbox failed");
        }
    }
}
