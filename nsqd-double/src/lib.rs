//! `ferry-nsqd-double`: an NSQ-protocol **TEST DOUBLE** — an in-memory stand-in for nsqd,
//! for ferry's test suite and local clusters, because a real nsqd cannot be installed on the
//! machines these run on. It is not nsqd and not for production: production code talks only
//! to a real nsqd, through `ferry-nsq`.
//!
//! It is faithful to captures of a real nsqd v1.3.0 (`nsq/tests/transcripts/`): the same
//! bytes for the same exchanges (IDENTIFY JSON reply, `OK`, `CLOSE_WAIT`, every `E_*` text
//! and whether it closes the connection), heartbeats every `heartbeat_interval`, the silent
//! close after 2 intervals without a command, 16-hex-character ids, attempts counting, REQ
//! redelivery, msg-timeout redelivery, RDY limits, MPUB. Topics and channels live in memory.
//!
//! - [`broker`]: topics, channels, in-flight and deferred messages, counters.
//! - [`conn`](self): one task trio per connection (reader, message pump, writer), as in nsqd.
//!
//! Fault injection through [`NsqdDouble`]: [`NsqdDouble::drop_connections`],
//! [`NsqdDouble::lose_in_flight`], [`NsqdDouble::lose_queued`] (what an nsqd crash loses),
//! [`NsqdDouble::set_delivery_delay`], [`NsqdDouble::set_duplicate_delivery`]. Tests
//! synchronise on [`NsqdDouble::wait_for`] (woken on every state change), never on sleeps.
//!
//! Not modelled: TLS, compression, AUTH (answered `E_AUTH_DISABLED`), the disk queue
//! (the memory queue is unbounded: the double never spills), ephemeral topic deletion,
//! pausing, the HTTP API, nsqlookupd.
#![warn(missing_docs)]

pub mod broker;
mod conn;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use broker::Broker;
pub use broker::{Depth, Stats};

/// The double's settings: nsqd v1.3.0's flag defaults.
#[derive(Debug, Clone)]
pub struct DoubleConfig {
    /// `--max-msg-size` (1 MiB).
    pub max_msg_size: usize,
    /// `--max-body-size` (5 MiB).
    pub max_body_size: usize,
    /// `--max-rdy-count` (2500).
    pub max_rdy_count: u64,
    /// `--msg-timeout` (60 s).
    pub msg_timeout: Duration,
    /// `--max-msg-timeout` (15 min).
    pub max_msg_timeout: Duration,
    /// `--max-req-timeout` (1 h).
    pub max_req_timeout: Duration,
    /// `--max-heartbeat-interval` (60 s).
    pub max_heartbeat_interval: Duration,
    /// nsqd's client timeout (60 s): the heartbeat interval before IDENTIFY is half of it.
    pub client_timeout: Duration,
    /// `--output-buffer-timeout` (250 ms); only echoed, the double writes at once.
    pub output_buffer_timeout: Duration,
    /// The version the IDENTIFY reply reports.
    pub version: String,
    /// How often timed-out and deferred messages are looked for (nsqd: 100 ms).
    pub scan_interval: Duration,
}

impl Default for DoubleConfig {
    fn default() -> Self {
        DoubleConfig {
            max_msg_size: 1024 * 1024,
            max_body_size: 5 * 1024 * 1024,
            max_rdy_count: 2500,
            msg_timeout: Duration::from_secs(60),
            max_msg_timeout: Duration::from_secs(15 * 60),
            max_req_timeout: Duration::from_secs(3600),
            max_heartbeat_interval: Duration::from_secs(60),
            client_timeout: Duration::from_secs(60),
            output_buffer_timeout: Duration::from_millis(250),
            version: "1.3.0".into(),
            scan_interval: Duration::from_millis(20),
        }
    }
}

/// State shared by the accept loop, the connections and the handle.
pub(crate) struct Shared {
    pub config: DoubleConfig,
    broker: Mutex<Broker>,
    changed: Notify,
    dropper: Mutex<CancellationToken>,
}

impl Shared {
    /// Runs `f` on the broker under its lock and wakes everyone waiting for a change.
    pub fn with<R>(&self, f: impl FnOnce(&mut Broker) -> R) -> R {
        let r = f(&mut self.broker.lock().expect("not poisoned"));
        self.changed.notify_waiters();
        r
    }

    fn dropper(&self) -> CancellationToken {
        self.dropper.lock().expect("not poisoned").clone()
    }
}

/// Serves the NSQ protocol on `listener` until `shutdown` completes (mini-redis style: the
/// caller binds, so tests use port 0). [`NsqdDouble::start`] wraps this with a handle.
pub async fn run(listener: TcpListener, config: DoubleConfig, shutdown: impl Future) {
    let shared = new_shared(config);
    serve(listener, shared, shutdown).await
}

fn new_shared(config: DoubleConfig) -> Arc<Shared> {
    Arc::new(Shared {
        config,
        broker: Mutex::new(Broker::new()),
        changed: Notify::new(),
        dropper: Mutex::new(CancellationToken::new()),
    })
}

async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: impl Future) {
    let local = listener.local_addr().ok();
    info!(addr = ?local, "nsqd test double: listening (TEST DOUBLE, not a real nsqd)");
    let scanner = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(shared.config.scan_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let now = std::time::Instant::now();
                shared.with(|b| b.scan(now));
            }
        })
    };
    let all = CancellationToken::new();
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    // A connection closes on drop_connections() or on shutdown.
                    let dropped = shared.dropper();
                    let all = all.clone();
                    let shared = shared.clone();
                    conns.spawn(async move {
                        let either = CancellationToken::new();
                        let e2 = either.clone();
                        let watcher = tokio::spawn(async move {
                            tokio::select! {
                                _ = dropped.cancelled() => {}
                                _ = all.cancelled() => {}
                            }
                            e2.cancel();
                        });
                        conn::serve(stream, shared, either).await;
                        watcher.abort();
                    });
                }
                Err(e) => warn!(error = %e, "nsqd test double: accept failed"),
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = &mut shutdown => break,
        }
    }
    all.cancel();
    while conns.join_next().await.is_some() {}
    scanner.abort();
    info!(addr = ?local, "nsqd test double: stopped");
}

/// A running test double, with fault injection and observation.
pub struct NsqdDouble {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl NsqdDouble {
    /// Binds `127.0.0.1:0` and starts serving.
    pub async fn start(config: DoubleConfig) -> std::io::Result<NsqdDouble> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        Self::start_on(listener, config)
    }

    /// Starts serving on a bound listener.
    pub fn start_on(listener: TcpListener, config: DoubleConfig) -> std::io::Result<NsqdDouble> {
        let addr = listener.local_addr()?;
        let shared = new_shared(config);
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(
            listener,
            shared.clone(),
            stop.clone().cancelled_owned(),
        ));
        Ok(NsqdDouble {
            addr,
            shared,
            stop,
            task: Some(task),
        })
    }

    /// The TCP address clients dial.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.shared
            .broker
            .lock()
            .expect("not poisoned")
            .stats
            .clone()
    }

    /// Queued / in-flight / deferred counts of a channel.
    pub fn depth(&self, topic: &str, channel: &str) -> Depth {
        self.shared
            .broker
            .lock()
            .expect("not poisoned")
            .depth(topic, channel)
    }

    /// Waits until `pred` holds for the counters; re-checked on every state change.
    pub async fn wait_for(&self, pred: impl Fn(&Stats) -> bool) -> Stats {
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let stats = self.stats();
            if pred(&stats) {
                return stats;
            }
            notified.await;
        }
    }

    /// Waits until `pred` holds for a channel's depth.
    pub async fn wait_for_depth(&self, topic: &str, channel: &str, pred: impl Fn(&Depth) -> bool) {
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if pred(&self.depth(topic, channel)) {
                return;
            }
            notified.await;
        }
    }

    /// Fault: closes every open connection (TCP FIN), as a network cut or an nsqd restart
    /// would. In-flight messages stay in flight until their msg timeout, as in nsqd.
    pub fn drop_connections(&self) {
        let old = std::mem::replace(
            &mut *self.shared.dropper.lock().expect("not poisoned"),
            CancellationToken::new(),
        );
        warn!(addr = %self.addr, "nsqd test double: fault injected: dropping all connections");
        old.cancel();
    }

    /// Fault: forgets every in-flight message (an nsqd crash loses them). Returns how many.
    pub fn lose_in_flight(&self) -> usize {
        let n = self.shared.with(|b| b.lose_in_flight());
        warn!(addr = %self.addr, lost = n, "nsqd test double: fault injected: in-flight messages lost");
        n
    }

    /// Fault: forgets every queued and deferred message (nsqd's memory queue). Returns how many.
    pub fn lose_queued(&self) -> usize {
        let n = self.shared.with(|b| b.lose_queued());
        warn!(addr = %self.addr, lost = n, "nsqd test double: fault injected: queued messages lost");
        n
    }

    /// Fault: what an nsqd crash and restart does: all connections dropped, every message
    /// in memory lost.
    pub fn crash(&self) -> usize {
        let n = self.lose_in_flight() + self.lose_queued();
        self.drop_connections();
        n
    }

    /// Fault: messages published from now on become deliverable only after `delay`.
    pub fn set_delivery_delay(&self, delay: Duration) {
        self.shared.with(|b| b.delivery_delay = delay);
    }

    /// Fault: every message published from now on is delivered twice (two copies, two ids).
    pub fn set_duplicate_delivery(&self, on: bool) {
        self.shared.with(|b| b.duplicate = on);
    }

    /// Stops serving and closes every connection.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for NsqdDouble {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
