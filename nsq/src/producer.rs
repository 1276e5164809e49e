//! The producer: one task owning one connection at a time, fed by a bounded queue.
//!
//! ```text
//!  publish()/enqueue() --bounded mpsc--> producer task --PUB | MPUB--> nsqd
//!        ^                                   |   <------- OK / E_* ------
//!        +------- Receipt (oneshot) <--------+
//! ```
//!
//! At most one publish command is in flight. When the connection is idle a request goes out
//! at once as a single `PUB` (no added latency); whatever queues while that publish waits
//! for its `OK` goes out next as one `MPUB` per run of the same topic, capped by
//! `max_batch_messages` and by nsqd's `--max-body-size`. Under load, batches grow by
//! themselves, and the number of commands falls below the number of messages.
//!
//! Each request resolves when nsqd answers its command: `Ok(())` on `OK`,
//! [`PublishError::Rejected`] on an error frame, [`PublishError::Disconnected`] if the
//! connection died with the command in flight (nsqd may or may not have it: the caller's
//! outbox republishes). A full queue makes `enqueue` wait (back-pressure) and `try_enqueue`
//! fail. While disconnected, requests wait in the queue; the task reconnects with back-off,
//! cycling through the configured nsqd addresses.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::codec::{self, Command, DEFAULT_MAX_BODY_SIZE, OK};
use crate::connection::{Backoff, Connection, ConnectionConfig, ConnectionError, Event};

/// A validated topic name, cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Topic(Arc<str>);

impl Topic {
    /// Checks `name` the way nsqd does (1-64 chars of `[.a-zA-Z0-9_-]`, optional `#ephemeral`).
    pub fn new(name: &str) -> Result<Self, PublishError> {
        if codec::is_valid_name(name) {
            Ok(Topic(name.into()))
        } else {
            Err(PublishError::BadTopic(name.into()))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Producer settings.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// nsqd TCP addresses; the producer uses one at a time and moves to the next on failure.
    pub addresses: Vec<String>,
    /// IDENTIFY settings and limits.
    pub connection: ConnectionConfig,
    /// Requests that may wait for the connection (the back-pressure bound).
    pub queue_capacity: usize,
    /// Most messages in one MPUB.
    pub max_batch_messages: usize,
    /// nsqd's `--max-body-size`: the largest MPUB body.
    pub max_body_size: usize,
    /// Reconnect back-off.
    pub backoff: Backoff,
}

impl ProducerConfig {
    /// Defaults for publishing to `addresses`.
    pub fn new(addresses: Vec<String>) -> Self {
        ProducerConfig {
            addresses,
            connection: ConnectionConfig::default(),
            queue_capacity: 4096,
            max_batch_messages: 512,
            max_body_size: DEFAULT_MAX_BODY_SIZE,
            backoff: Backoff::default(),
        }
    }
}

/// Why a publish did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// A topic name nsqd would reject.
    #[error("invalid topic name {0:?}")]
    BadTopic(String),
    /// nsqd rejects empty bodies.
    #[error("empty message body")]
    EmptyBody,
    /// Larger than nsqd's `--max-msg-size`.
    #[error("message of {len} bytes exceeds max_msg_size {max}")]
    TooBig {
        /// Body size.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// nsqd answered with an error frame (its text).
    #[error("nsqd rejected the publish: {0}")]
    Rejected(String),
    /// The connection died while the command was in flight: nsqd may or may not have it.
    #[error("connection lost with the publish in flight (outcome unknown)")]
    Disconnected,
    /// The queue is full (`try_enqueue` only).
    #[error("publish queue full")]
    QueueFull,
    /// The producer was shut down.
    #[error("producer shut down")]
    Closed,
}

struct Request {
    topic: Topic,
    body: Bytes,
    done: oneshot::Sender<Result<(), PublishError>>,
}

/// Resolves when nsqd has answered the publish.
#[derive(Debug)]
pub struct Receipt(oneshot::Receiver<Result<(), PublishError>>);

impl Future for Receipt {
    type Output = Result<(), PublishError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(PublishError::Closed)))
    }
}

/// Counters a test or a metrics exporter can read.
#[derive(Debug, Default)]
pub struct ProducerStats {
    /// PUB commands written.
    pub pubs: std::sync::atomic::AtomicU64,
    /// MPUB commands written.
    pub mpubs: std::sync::atomic::AtomicU64,
    /// Messages acknowledged by nsqd.
    pub acked: std::sync::atomic::AtomicU64,
    /// Successful connections (1 + reconnects).
    pub connects: std::sync::atomic::AtomicU64,
    /// Whether the producer holds a connection to an nsqd right now.
    pub connected_now: std::sync::atomic::AtomicBool,
}

impl ProducerStats {
    /// Whether the producer holds a connection to an nsqd right now (a
    /// node's `/readyz` reports it).
    pub fn connected(&self) -> bool {
        self.connected_now
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A handle to the producer task. Cheap to clone; the task ends when every handle is gone
/// (after what is queued has been answered) or on [`Producer::shutdown`].
#[derive(Debug, Clone)]
pub struct Producer {
    tx: mpsc::Sender<Request>,
    max_msg_size: usize,
    stats: Arc<ProducerStats>,
    shutdown: CancellationToken,
    task: Arc<std::sync::Mutex<Option<JoinHandle<()>>>>,
}

impl Producer {
    /// Starts the producer task (it connects in the background).
    pub fn start(config: ProducerConfig) -> Producer {
        assert!(!config.addresses.is_empty(), "at least one nsqd address");
        let (tx, rx) = mpsc::channel(config.queue_capacity.max(1));
        let stats = Arc::new(ProducerStats::default());
        let shutdown = CancellationToken::new();
        let max_msg_size = config.connection.max_msg_size;
        let task = tokio::spawn(run(config, rx, stats.clone(), shutdown.clone()));
        Producer {
            tx,
            max_msg_size,
            stats,
            shutdown,
            task: Arc::new(std::sync::Mutex::new(Some(task))),
        }
    }

    fn request(&self, topic: &Topic, body: Bytes) -> Result<(Request, Receipt), PublishError> {
        if body.is_empty() {
            return Err(PublishError::EmptyBody);
        }
        if body.len() > self.max_msg_size {
            return Err(PublishError::TooBig {
                len: body.len(),
                max: self.max_msg_size,
            });
        }
        let (done, rx) = oneshot::channel();
        Ok((
            Request {
                topic: topic.clone(),
                body,
                done,
            },
            Receipt(rx),
        ))
    }

    /// Queues a publish, waiting for room in the queue; the [`Receipt`] resolves on nsqd's answer.
    pub async fn enqueue(&self, topic: &Topic, body: Bytes) -> Result<Receipt, PublishError> {
        let (req, receipt) = self.request(topic, body)?;
        self.tx.send(req).await.map_err(|_| PublishError::Closed)?;
        Ok(receipt)
    }

    /// Queues a publish without waiting: [`PublishError::QueueFull`] when the queue is full.
    pub fn try_enqueue(&self, topic: &Topic, body: Bytes) -> Result<Receipt, PublishError> {
        let (req, receipt) = self.request(topic, body)?;
        self.tx.try_send(req).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => PublishError::QueueFull,
            mpsc::error::TrySendError::Closed(_) => PublishError::Closed,
        })?;
        Ok(receipt)
    }

    /// Publishes and waits for nsqd's `OK`.
    pub async fn publish(&self, topic: &Topic, body: Bytes) -> Result<(), PublishError> {
        self.enqueue(topic, body).await?.await
    }

    /// Counters (commands written, messages acked, connects).
    pub fn stats(&self) -> &ProducerStats {
        &self.stats
    }

    /// Stops the task now: queued and in-flight requests resolve with an error.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        let task = self.task.lock().expect("not poisoned").take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

async fn run(
    config: ProducerConfig,
    mut rx: mpsc::Receiver<Request>,
    stats: Arc<ProducerStats>,
    shutdown: CancellationToken,
) {
    let mut attempt = 0u32;
    let mut next_addr = 0usize;
    let mut carry: Option<Request> = None;
    loop {
        let addr = &config.addresses[next_addr % config.addresses.len()];
        let connected = tokio::select! {
            c = Connection::connect(addr, &config.connection) => c,
            _ = shutdown.cancelled() => break,
        };
        let mut conn = match connected {
            Ok(conn) => conn,
            Err(e) => {
                let delay = config.backoff.delay(attempt);
                warn!(nsqd = %addr, error = %e, ?delay, "nsq producer cannot connect; retrying");
                attempt = attempt.saturating_add(1);
                next_addr += 1;
                // Every handle is gone and nothing waits: stop retrying.
                if rx.is_closed() && rx.is_empty() && carry.is_none() {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => continue,
                    _ = shutdown.cancelled() => break,
                }
            }
        };
        stats
            .connects
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        info!(nsqd = %conn.peer(), "nsq producer connected");
        stats
            .connected_now
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let started = tokio::time::Instant::now();
        let ended = session(&config, &mut conn, &mut rx, &mut carry, &stats, &shutdown).await;
        stats
            .connected_now
            .store(false, std::sync::atomic::Ordering::Relaxed);
        match ended {
            Ok(()) => break,
            Err(e) => {
                warn!(nsqd = %conn.peer(), error = %e, "nsq producer connection lost; reconnecting");
                next_addr += 1;
            }
        }
        if let Some(delay) = config
            .backoff
            .after_session(started.elapsed(), &mut attempt)
        {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.cancelled() => break,
            }
        }
    }
    // Shut down: everything still queued learns it.
    if let Some(req) = carry.take() {
        let _ = req.done.send(Err(PublishError::Closed));
    }
    rx.close();
    while let Ok(req) = rx.try_recv() {
        let _ = req.done.send(Err(PublishError::Closed));
    }
}

/// Serves one connection. `Ok(())` means shut down (or every handle dropped and the queue
/// drained); `Err` means reconnect.
async fn session(
    config: &ProducerConfig,
    conn: &mut Connection,
    rx: &mut mpsc::Receiver<Request>,
    carry: &mut Option<Request>,
    stats: &ProducerStats,
    shutdown: &CancellationToken,
) -> Result<(), ConnectionError> {
    let mut in_flight: VecDeque<oneshot::Sender<Result<(), PublishError>>> = VecDeque::new();
    let mut batch: Vec<Bytes> = Vec::new();
    let mut draining = false;
    let result = loop {
        if in_flight.is_empty() {
            if carry.is_none() {
                if draining {
                    break Ok(());
                }
                // Idle: wait for a request (answering heartbeats meanwhile).
                tokio::select! {
                    req = rx.recv() => match req {
                        Some(req) => *carry = Some(req),
                        None => { draining = true; continue; }
                    },
                    frame = conn.read_frame() => {
                        let frame = match frame {
                            Ok(frame) => frame,
                            Err(e) => break Err(e),
                        };
                        match conn.on_frame(frame).await {
                            Ok(None) => {}
                            Ok(Some(ev)) => {
                                warn!(nsqd = %conn.peer(), event = ?ev, "unexpected frame on an idle producer");
                            }
                            Err(e) => break Err(e),
                        }
                        continue;
                    }
                    _ = shutdown.cancelled() => break Ok(()),
                }
            }
            // Build the next command: the carried request plus what else is queued for the
            // same topic, within the caps.
            let first = carry.take().expect("set above");
            let topic = first.topic.clone();
            let mut body_size = 4 + 4 + first.body.len();
            batch.clear();
            batch.push(first.body);
            in_flight.push_back(first.done);
            while batch.len() < config.max_batch_messages {
                match rx.try_recv() {
                    Ok(req) => {
                        if req.topic != topic
                            || body_size + 4 + req.body.len() > config.max_body_size
                        {
                            *carry = Some(req);
                            break;
                        }
                        body_size += 4 + req.body.len();
                        batch.push(req.body);
                        in_flight.push_back(req.done);
                    }
                    Err(_) => break,
                }
            }
            let encoded = if batch.len() == 1 {
                stats
                    .pubs
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                conn.queue(&Command::Pub {
                    topic: topic.as_str().into(),
                    body: batch.pop().expect("one"),
                })
            } else {
                stats
                    .mpubs
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                codec::encode_mpub(topic.as_str(), &batch, conn.write_buffer())
                    .map_err(ConnectionError::from)
            };
            batch.clear();
            if let Err(e) = encoded {
                break Err(e);
            }
            debug!(nsqd = %conn.peer(), topic = topic.as_str(), messages = in_flight.len(), "publishing");
            if let Err(e) = conn.flush().await {
                break Err(e);
            }
        }
        // A publish is in flight: wait for its answer.
        let frame = tokio::select! {
            frame = conn.read_frame() => frame,
            _ = shutdown.cancelled() => break Ok(()),
        };
        let event = match frame {
            Ok(frame) => conn.on_frame(frame).await,
            Err(e) => Err(e),
        };
        match event {
            Ok(None) => {}
            Ok(Some(Event::Response(data))) if data.as_ref() == OK => {
                stats
                    .acked
                    .fetch_add(in_flight.len() as u64, std::sync::atomic::Ordering::Relaxed);
                for done in in_flight.drain(..) {
                    let _ = done.send(Ok(()));
                }
            }
            Ok(Some(Event::Error(err))) => {
                for done in in_flight.drain(..) {
                    let _ = done.send(Err(PublishError::Rejected(err.text())));
                }
            }
            Ok(Some(other)) => {
                break Err(ConnectionError::Protocol(format!(
                    "expected OK for a publish, got {other:?}"
                )));
            }
            Err(ConnectionError::Server(err)) => {
                for done in in_flight.drain(..) {
                    let _ = done.send(Err(PublishError::Rejected(err.text())));
                }
                break Err(ConnectionError::Server(err));
            }
            Err(e) => break Err(e),
        }
    };
    for done in in_flight.drain(..) {
        let _ = done.send(Err(PublishError::Disconnected));
    }
    result
}
