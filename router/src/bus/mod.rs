//! The cluster bus (docs/CLUSTER.md): how this node talks to its peers over
//! NSQ. Only a node with a `[cluster]` configuration has one; a single node
//! never builds any of this and its every user and group is local.
//!
//! - [`outbound`]: the sending side of the links (publishers, resends, trims).
//! - [`inbound`]: the receiving side (order, exactly-once, confirmations).
//! - [`calls`]: requests forwarded to a group's owner and their replies.
//! - [`membership`]: the node list digest check (`Hello`).
//!
//! The delivery thread reaches the bus only through [`Bus::committed`],
//! which never waits: the publishers run on their own tasks. The consumer
//! task ([`Bus::run_consumer`]) is the only reader of this node's topic.

pub(crate) mod calls;
pub(crate) mod inbound;
pub(crate) mod membership;
pub(crate) mod outbound;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_cluster::Placement;
use ferry_nsq::{Consumer, ConsumerConfig, Delivery, Producer, ProducerConfig, Topic};
use ferry_protocol::bus::{self, envelope::Body as BusBody};
use ferry_protocol::proto::{self, frame::Body};
use ferry_protocol::{ErrorCode, Frame};
use ferry_storage::{Homes, LinkOut, NodeId, Op, Storage};
use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::delivery::Reply;
use crate::session::Conn;
use crate::{Router, error_frame};

pub(crate) use calls::Waiter;
pub use outbound::OutboundConfig;

use inbound::{Arrival, InboundLink, InboundLinks, LinkDone, LinkResult};

/// The NSQ topic node `id` consumes.
pub fn topic_of(id: NodeId) -> String {
    format!("ferry.node.{id}")
}

/// The one channel every node consumes its topic on.
pub const CHANNEL: &str = "ferry";

/// Cluster settings the bus needs besides the placement (the gateway
/// builds them from `[cluster]`).
#[derive(Debug, Clone)]
pub struct BusConfig {
    /// nsqd TCP addresses to publish to (the first that works).
    pub nsqd_publish: Vec<String>,
    /// nsqd TCP addresses to consume from.
    pub nsqd_consume: Vec<String>,
    /// nsqlookupd HTTP addresses to discover more nsqd from.
    pub lookupd: Vec<String>,
    /// Sending side settings.
    pub outbound: OutboundConfig,
    /// How long a forwarded request waits for the owner's reply.
    pub call_timeout: Duration,
    /// How often `Hello` goes to every peer.
    pub hello_interval: Duration,
    /// Most un-FINed bus messages at once (NSQ `RDY`).
    pub max_in_flight: u32,
}

impl BusConfig {
    /// Defaults around the nsqd addresses (published to and consumed from).
    pub fn new(nsqd: Vec<String>) -> Self {
        BusConfig {
            nsqd_publish: nsqd.clone(),
            nsqd_consume: nsqd,
            lookupd: Vec::new(),
            outbound: OutboundConfig::default(),
            call_timeout: Duration::from_secs(5),
            hello_interval: Duration::from_secs(2),
            max_in_flight: 256,
        }
    }
}

/// The cluster's placement as the committer asks for it.
#[derive(Debug)]
pub(crate) struct PlacementHomes(pub Arc<Placement>);

impl Homes for PlacementHomes {
    fn this_node(&self) -> NodeId {
        self.0.self_id().get()
    }

    fn home_of_user(&self, user: &str) -> NodeId {
        self.0.home_of_user(user).get()
    }

    fn owner_of_group(&self, group: &str) -> NodeId {
        self.0.owner_of_group(group).get()
    }
}

/// Metrics of the consuming side, resolved once.
struct BusMetrics {
    /// Envelopes that are not usable (undecodable, not for this node, from a
    /// node that is not a peer, a bad frame inside).
    rejected: metrics::Counter,
    held: metrics::Counter,
    per_peer: HashMap<NodeId, PeerMetrics>,
}

/// What one peer's envelopes did here, labelled `peer`.
struct PeerMetrics {
    consumed: metrics::Counter,
    redelivered: metrics::Counter,
    duplicates: metrics::Counter,
    requeued: metrics::Counter,
    /// Gaps skipped because the peer no longer holds them (a restore).
    gaps_skipped: metrics::Counter,
}

impl BusMetrics {
    fn new(peers: &[NodeId]) -> Self {
        let per_peer = peers
            .iter()
            .map(|&peer| {
                let label = peer.to_string();
                let metrics = PeerMetrics {
                    consumed: metrics::counter!("ferry_bus_consumed_total", "peer" => label.clone()),
                    redelivered: metrics::counter!("ferry_bus_redelivered_total", "peer" => label.clone()),
                    duplicates: metrics::counter!("ferry_bus_link_duplicates_total", "peer" => label.clone()),
                    requeued: metrics::counter!("ferry_bus_requeued_total", "peer" => label.clone()),
                    gaps_skipped: metrics::counter!("ferry_bus_link_gaps_skipped_total", "peer" => label),
                };
                (peer, metrics)
            })
            .collect();
        BusMetrics {
            rejected: metrics::counter!("ferry_bus_rejected_total"),
            held: metrics::counter!("ferry_bus_link_batches_held_total"),
            per_peer,
        }
    }

    fn peer(&self, peer: NodeId) -> Option<&PeerMetrics> {
        self.per_peer.get(&peer)
    }
}

/// This node's end of the bus.
pub struct Bus {
    this: NodeId,
    /// Every node id, this one included.
    nodes: Vec<NodeId>,
    homes: Arc<dyn Homes>,
    config: BusConfig,
    epoch: u64,
    producer: Producer,
    outbound: outbound::Outbound,
    calls: calls::Calls,
    membership: membership::Membership,
    metrics: BusMetrics,
    stop: CancellationToken,
    tasks: Mutex<tokio::task::JoinSet<()>>,
    /// Inbound link outcomes, from the delivery thread to the consumer task.
    done_tx: mpsc::UnboundedSender<LinkDone>,
    done_rx: Mutex<Option<mpsc::UnboundedReceiver<LinkDone>>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus").field("this", &self.this).finish()
    }
}

impl Bus {
    /// Loads the links from `storage` and starts the publishers. Must run
    /// inside a tokio runtime.
    pub fn start(
        placement: &Arc<Placement>,
        config: BusConfig,
        storage: &Arc<Storage>,
    ) -> Result<Bus, ferry_storage::StorageError> {
        let this = placement.self_id().get();
        let nodes: Vec<NodeId> = placement.nodes().iter().map(|n| n.id.get()).collect();
        let peers: Vec<NodeId> = nodes.iter().copied().filter(|n| *n != this).collect();
        let epoch = storage.link_epoch()?;
        let metrics = BusMetrics::new(&peers);
        let outbound = outbound::Outbound::load(storage, peers, config.outbound.clone())?;
        let producer = Producer::start(ProducerConfig::new(config.nsqd_publish.clone()));
        let stop = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        outbound.spawn(producer.clone(), storage.clone(), stop.clone(), &mut tasks);
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Ok(Bus {
            this,
            membership: membership::Membership::new(
                placement.digest(),
                nodes.len(),
                config.hello_interval,
            ),
            nodes,
            homes: Arc::new(PlacementHomes(placement.clone())),
            calls: calls::Calls::new(config.call_timeout),
            config,
            epoch,
            producer,
            outbound,
            metrics,
            stop,
            tasks: Mutex::new(tasks),
            done_tx,
            done_rx: Mutex::new(Some(done_rx)),
        })
    }

    /// This node's id.
    pub fn this_node(&self) -> NodeId {
        self.this
    }

    /// Where users and groups live.
    pub fn homes(&self) -> &Arc<dyn Homes> {
        &self.homes
    }

    /// Whether this node may serve clients (its node list is confirmed by
    /// a majority; see [`membership`]).
    pub fn serving(&self) -> bool {
        self.membership.serving()
    }

    /// Peers heard recently with another node list.
    pub fn disagreeing_peers(&self) -> Vec<NodeId> {
        self.membership.disagreeing()
    }

    /// Whether the producer has an nsqd connection (for `/readyz`).
    pub fn nsqd_reachable(&self) -> bool {
        self.producer.stats().connected()
    }

    /// Link batches not yet confirmed by their peers.
    pub fn unconfirmed_batches(&self) -> u64 {
        self.outbound.unconfirmed()
    }

    /// Durable link batches from the committer (delivery thread; never waits).
    pub(crate) fn committed(&self, batches: Vec<LinkOut>) {
        self.outbound.committed(batches);
    }

    /// Publishes a non-durable envelope to `peer` without waiting. Returns
    /// false when the producer's queue is full or closed.
    fn publish_now(&self, peer: NodeId, body: BusBody) -> bool {
        let Ok(topic) = Topic::new(&topic_of(peer)) else {
            return false;
        };
        let bytes = bus::encode_envelope(self.this, peer, body);
        self.producer.try_enqueue(&topic, bytes).is_ok()
    }

    /// Forwards a client request to `owner` as a call. With a `waiter` the
    /// connection waits for an answer (its slot is held until then);
    /// without one the call is fire-and-forget.
    pub(crate) fn call(
        &self,
        owner: NodeId,
        conn: &Arc<Conn>,
        body: Body,
        waiter: Option<calls::Waiter>,
    ) {
        let frame = Frame { body: Some(body) }.encode_to_vec();
        let reply_wanted = waiter.is_some();
        let call_id = match waiter {
            Some(waiter) => self.calls.register(conn.clone(), waiter),
            None => 0,
        };
        let call = bus::Call {
            call_id,
            user: conn.user().to_string(),
            device: conn.device().to_string(),
            frame: frame.into(),
            reply_wanted,
        };
        if !self.publish_now(owner, BusBody::Call(call)) && reply_wanted {
            self.calls.abandon(call_id, "the cluster bus is congested");
        }
    }

    /// Pushes a best-effort frame to users of other nodes, one envelope per node.
    pub(crate) fn ephemeral(&self, by_node: Vec<(NodeId, Vec<String>)>, frame: &Frame) {
        let bytes = Bytes::from(frame.encode_to_vec());
        for (node, users) in by_node {
            self.publish_now(
                node,
                BusBody::Ephemeral(bus::Ephemeral {
                    users,
                    frame: bytes.clone(),
                }),
            );
        }
    }

    /// Stops every bus task.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        let mut tasks = std::mem::take(&mut *self.tasks.lock().expect("not poisoned"));
        while tasks.join_next().await.is_some() {}
        self.producer.shutdown().await;
    }

    /// Starts the consumer of this node's topic and the timers (hello, call
    /// expiry). `router` is the router this bus belongs to.
    pub fn run(
        self: &Arc<Self>,
        router: Weak<Router>,
        storage: Arc<Storage>,
    ) -> Result<(), ferry_nsq::ConsumerError> {
        let mut config = ConsumerConfig::new(
            self.config.nsqd_consume.clone(),
            &topic_of(self.this),
            CHANNEL,
        );
        config.lookupd_http_addresses = self.config.lookupd.clone();
        config.max_in_flight = self.config.max_in_flight;
        let consumer = Consumer::start(config)?;
        let done_rx = self
            .done_rx
            .lock()
            .expect("not poisoned")
            .take()
            .expect("the bus runs once");
        let mut tasks = self.tasks.lock().expect("not poisoned");
        tasks.spawn(self.clone().consume(consumer, done_rx, router, storage));
        tasks.spawn(self.clone().timers());
        Ok(())
    }

    async fn timers(self: Arc<Self>) {
        let mut hello = tokio::time::interval(self.config.hello_interval);
        let mut expiry = tokio::time::interval(Duration::from_millis(250));
        let mut first = true;
        loop {
            tokio::select! {
                _ = hello.tick() => {
                    for &peer in &self.nodes {
                        if peer == self.this {
                            continue;
                        }
                        self.publish_now(peer, BusBody::Hello(bus::Hello {
                            digest: self.membership.digest().to_owned(),
                            reply_wanted: first,
                            started_ms: 0,
                        }));
                    }
                    first = false;
                }
                _ = expiry.tick() => self.calls.expire(Instant::now()),
                _ = self.stop.cancelled() => return,
            }
        }
    }

    async fn consume(
        self: Arc<Self>,
        mut consumer: Consumer,
        mut done_rx: mpsc::UnboundedReceiver<LinkDone>,
        router: Weak<Router>,
        storage: Arc<Storage>,
    ) {
        let mut links = InboundLinks::new();
        for &peer in &self.nodes {
            if peer == self.this {
                continue;
            }
            let s = storage.clone();
            let position = tokio::task::spawn_blocking(move || s.link_in_applied(peer)).await;
            let (epoch, applied) = match position {
                Ok(Ok(p)) => p,
                _ => {
                    tracing::error!(
                        peer,
                        "cannot read the link position; the bus does not start"
                    );
                    return;
                }
            };
            links.insert(peer, InboundLink::new(epoch, applied));
        }
        let mut confirm_tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                delivery = consumer.recv() => {
                    let Some(delivery) = delivery else { break };
                    self.on_delivery(delivery, &mut links, &router).await;
                }
                Some(done) = done_rx.recv() => self.on_link_done(done, &mut links, &router).await,
                _ = confirm_tick.tick() => self.confirm_and_ask(&mut links).await,
                _ = self.stop.cancelled() => break,
            }
        }
        consumer.shutdown().await;
    }

    async fn on_delivery(
        &self,
        delivery: Delivery,
        links: &mut InboundLinks,
        router: &Weak<Router>,
    ) {
        let envelope = match bus::decode_envelope(delivery.body()) {
            Ok(e) => e,
            Err(e) => {
                self.metrics.rejected.increment(1);
                tracing::warn!(error = %e, "dropping a bus message that is not a usable envelope");
                let _ = delivery.fin().await;
                return;
            }
        };
        let from = envelope.from_node as NodeId;
        if envelope.to_node == u32::from(self.this)
            && !links.contains_key(&from)
            && let Some(BusBody::Hello(hello)) = &envelope.body
        {
            // A node this one does not list: tell it our digest, so that it
            // learns it disagrees (it then refuses to serve); it does not
            // count here.
            let _ = delivery.fin().await;
            self.membership.heard_stranger(from, &hello.digest);
            if hello.reply_wanted || hello.digest != self.membership.digest() {
                self.publish_now(
                    from,
                    BusBody::Hello(bus::Hello {
                        digest: self.membership.digest().to_owned(),
                        reply_wanted: false,
                        started_ms: 0,
                    }),
                );
            }
            return;
        }
        if envelope.to_node != u32::from(self.this) || !links.contains_key(&from) {
            self.metrics.rejected.increment(1);
            tracing::warn!(
                from,
                to = envelope.to_node,
                "dropping an envelope from a node that is not a peer, or for another node"
            );
            let _ = delivery.fin().await;
            return;
        }
        if let Some(peer) = self.metrics.peer(from) {
            peer.consumed.increment(1);
            if delivery.attempts() > 1 {
                peer.redelivered.increment(1);
            }
        }
        let Some(body) = envelope.body else {
            // Checked by the decoder; FIN so that nsqd never redelivers it.
            let _ = delivery.fin().await;
            return;
        };
        match body {
            BusBody::LinkBatch(batch) => {
                let head = envelope.link_head.unwrap_or_default();
                self.on_link_batch(from, delivery, batch, head, links, router)
                    .await;
            }
            other => {
                let _ = delivery.fin().await;
                self.on_message(from, other, router).await;
            }
        }
    }

    async fn on_message(&self, from: NodeId, body: BusBody, router: &Weak<Router>) {
        match body {
            BusBody::Hello(hello) => {
                tracing::debug!(peer = from, kind = "hello", "bus envelope");
                self.membership.heard(from, &hello.digest);
                if hello.reply_wanted {
                    self.publish_now(
                        from,
                        BusBody::Hello(bus::Hello {
                            digest: self.membership.digest().to_owned(),
                            reply_wanted: false,
                            started_ms: 0,
                        }),
                    );
                }
            }
            BusBody::LinkConfirm(confirm) => {
                if confirm.epoch == self.epoch {
                    self.outbound.confirmed(from, confirm.applied_through);
                }
            }
            BusBody::LinkResend(resend) => {
                if resend.epoch == self.epoch {
                    tracing::debug!(peer = from, from_seq = resend.from_seq, "resend asked");
                    self.outbound.resend_from(from, resend.from_seq);
                }
            }
            BusBody::Call(call) => {
                if let Some(router) = router.upgrade() {
                    tokio::spawn(answer_call(router, from, call));
                }
            }
            BusBody::CallReply(reply) => self.calls.complete(reply.call_id, &reply.frame),
            BusBody::Ephemeral(e) => {
                let Some(router) = router.upgrade() else {
                    return;
                };
                let Ok(frame) = Frame::decode(e.frame.as_ref()) else {
                    self.metrics.rejected.increment(1);
                    return;
                };
                for user in &e.users {
                    router.sessions().for_each_connection(user, |c| {
                        c.try_push_best_effort(frame.clone());
                    });
                }
            }
            BusBody::LinkBatch(_) => unreachable!("handled by on_link_batch"),
        }
    }

    async fn on_link_batch(
        &self,
        from: NodeId,
        delivery: Delivery,
        batch: bus::LinkBatch,
        head: bus::LinkHead,
        links: &mut InboundLinks,
        router: &Weak<Router>,
    ) {
        let link = links.get_mut(&from).expect("checked by the caller");
        let arrival = link.arrive(batch.epoch, batch.seq, &head);
        if let Arrival::SkipGap(first, last) = arrival {
            tracing::warn!(
                peer = from,
                first,
                last,
                "link gap skipped: the peer no longer holds these batches, which this node \
                 had applied and lost with its tail (restored from a backup)"
            );
            if let Some(peer) = self.metrics.peer(from) {
                peer.gaps_skipped.increment(1);
            }
        }
        match arrival {
            Arrival::Submit | Arrival::SkipGap(..) => {
                self.submit_batch(from, delivery, batch, head, router).await;
                loop {
                    let link = links.get_mut(&from).expect("present");
                    let Some((delivery, batch)) = link.next_held() else {
                        break;
                    };
                    let head = bus::LinkHead::default();
                    self.submit_batch(from, delivery, batch, head, router).await;
                }
            }
            Arrival::Duplicate => {
                if let Some(peer) = self.metrics.peer(from) {
                    peer.duplicates.increment(1);
                }
                let _ = delivery.fin().await;
            }
            Arrival::Held => {
                self.metrics.held.increment(1);
                link.held.insert(batch.seq, (delivery, batch));
            }
            Arrival::Overflow => {
                let _ = delivery.fin().await;
            }
            Arrival::OtherEpoch => {
                let _ = delivery.fin().await;
                if link.resend_due(Instant::now()) {
                    self.publish_now(
                        from,
                        BusBody::LinkResend(bus::LinkResend {
                            from_seq: 1,
                            epoch: batch.epoch,
                        }),
                    );
                }
            }
        }
    }

    async fn submit_batch(
        &self,
        from: NodeId,
        delivery: Delivery,
        batch: bus::LinkBatch,
        head: bus::LinkHead,
        router: &Weak<Router>,
    ) {
        let Some(router) = router.upgrade() else {
            return;
        };
        let (epoch, seq) = (batch.epoch, batch.seq);
        let op = Op::ApplyLink {
            from,
            epoch,
            batch,
            head,
        };
        let reply = Reply::Link(crate::delivery::LinkTag {
            origin: from,
            epoch,
            seq,
            delivery,
            done: self.done_tx.clone(),
        });
        if router.submit_op(op, reply).await.is_err() {
            // Shutting down: the message is redelivered to the next process.
        }
    }

    async fn on_link_done(&self, done: LinkDone, links: &mut InboundLinks, router: &Weak<Router>) {
        let LinkDone {
            origin,
            epoch,
            seq,
            delivery,
            result,
        } = done;
        tracing::debug!(
            peer = origin,
            seq,
            ?result,
            kind = "link_batch",
            "bus envelope applied"
        );
        let rewound = links
            .get_mut(&origin)
            .is_some_and(|link| link.done(epoch, seq, &result));
        match result {
            LinkResult::Applied | LinkResult::Dropped => {
                let _ = delivery.fin().await;
            }
            LinkResult::NotNext => {
                if let Some(peer) = self.metrics.peer(origin) {
                    peer.requeued.increment(1);
                }
                let _ = delivery.req(Duration::from_millis(100)).await;
            }
            LinkResult::Failed => {
                if let Some(peer) = self.metrics.peer(origin) {
                    peer.requeued.increment(1);
                }
                let _ = delivery.req_backoff().await;
            }
        }
        if rewound {
            // Held batches may now be next again once the redelivery comes;
            // nothing to submit from here.
            let _ = router;
        }
    }

    /// Confirms applied positions and asks for resends of open gaps.
    async fn confirm_and_ask(&self, links: &mut InboundLinks) {
        let now = Instant::now();
        for (&peer, link) in links.iter_mut() {
            if link.touch_due(now) {
                for (delivery, _) in link.held.values() {
                    let _ = delivery.touch().await;
                }
            }
            if link.confirm_due {
                let sent = self.publish_now(
                    peer,
                    BusBody::LinkConfirm(bus::LinkConfirm {
                        applied_through: link.applied,
                        epoch: link.epoch,
                    }),
                );
                link.confirm_due = !sent;
            }
            if link.resend_due(now) {
                self.publish_now(
                    peer,
                    BusBody::LinkResend(bus::LinkResend {
                        from_seq: link.submitted + 1,
                        epoch: link.epoch,
                    }),
                );
            }
        }
    }
}

/// Handles a call from `from` as if its user had sent the frame here, and
/// publishes the first frame the router answers with.
async fn answer_call(router: Arc<Router>, from: NodeId, call: bus::Call) {
    let Some(bus) = router.bus() else { return };
    let answer = |frame: Frame| {
        if call.reply_wanted {
            bus.publish_now(
                from,
                BusBody::CallReply(bus::CallReply {
                    call_id: call.call_id,
                    frame: frame.encode_to_vec().into(),
                }),
            );
        }
    };
    let body = match Frame::decode(call.frame.as_ref()) {
        Ok(Frame { body: Some(body) }) => body,
        _ => {
            bus.metrics.rejected.increment(1);
            answer(error_frame(
                ErrorCode::MalformedFrame,
                "the forwarded request is not a frame".into(),
                0,
                0,
            ));
            return;
        }
    };
    if ferry_protocol::limits::check_id("user", &call.user).is_err()
        || ferry_protocol::limits::check_id("device_id", &call.device).is_err()
    {
        bus.metrics.rejected.increment(1);
        return;
    }
    tracing::debug!(peer = from, kind = body.kind_name(), "bus call");
    // A connection that is never registered: nothing is delivered to it,
    // it only collects the router's answer.
    let conn = Conn::new(
        router.sessions().next_conn_id(),
        call.user.as_str().into(),
        call.device.as_str().into(),
        16,
    );
    conn.mark_remote();
    router.handle(&conn, body, None).await;
    if !call.reply_wanted {
        return;
    }
    let drained = tokio::select! {
        d = conn.drain(usize::MAX) => d,
        _ = tokio::time::sleep(bus.config.call_timeout) => return,
    };
    let Some(first) = drained.frames().next() else {
        return;
    };
    let frame = match first {
        crate::session::Outgoing::Frame(frame) => frame,
        crate::session::Outgoing::Encoded(bytes) => {
            match Frame::decode(&bytes[ferry_protocol::LENGTH_PREFIX_BYTES..]) {
                Ok(f) => f,
                Err(_) => return,
            }
        }
        crate::session::Outgoing::Entry { .. } => return,
    };
    answer(frame);
}

/// Which node a request must be handled on, when it is not this one: the
/// owner of the group it is about. `None`: here.
pub(crate) fn owner_elsewhere(homes: &dyn Homes, body: &Body) -> Option<NodeId> {
    use proto::group_request::Op as GroupOp;
    fn group_of_conv(conv: &Option<proto::Conversation>) -> Option<&str> {
        conv.as_ref()
            .filter(|c| c.kind() == proto::ConversationKind::Group)
            .map(|c| c.id.as_str())
    }
    let group = match body {
        Body::Send(s) => group_of_conv(&s.to),
        Body::Recall(r) => group_of_conv(&r.conversation),
        Body::Read(r) => group_of_conv(&r.conversation),
        Body::Typing(t) => group_of_conv(&t.conversation),
        Body::History(h) => group_of_conv(&h.conversation),
        Body::GroupRequest(g) => match &g.op {
            // A create without an id gets one owned here (the committer
            // picks it); with an id, its owner creates it.
            Some(GroupOp::Create(c)) if c.group_id.is_empty() => None,
            Some(GroupOp::Create(c)) => Some(c.group_id.as_str()),
            Some(GroupOp::AddMembers(a)) => Some(a.group_id.as_str()),
            Some(GroupOp::RemoveMembers(r)) => Some(r.group_id.as_str()),
            Some(GroupOp::Leave(l)) => Some(l.group_id.as_str()),
            Some(GroupOp::Dissolve(d)) => Some(d.group_id.as_str()),
            Some(GroupOp::SetRole(s)) => Some(s.group_id.as_str()),
            Some(GroupOp::ListMembers(l)) => Some(l.group_id.as_str()),
            None => None,
        },
        _ => None,
    }?;
    let owner = homes.owner_of_group(group);
    (owner != homes.this_node()).then_some(owner)
}

impl Router {
    /// The bus, in cluster mode.
    pub fn bus(&self) -> Option<&Arc<Bus>> {
        self.bus.as_ref()
    }
}
