//! Cluster mode end to end (docs/CLUSTER.md): real `ferry serve` nodes,
//! real sockets, and the NSQ-protocol test double as their nsqd, with its
//! fault injection. Every test checks what a client sees: every acked
//! message arrives exactly once, in per-sender order, whatever the bus does.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use ferry_e2e::cluster::TestCluster;
use ferry_e2e::*;
use ferry_protocol::client::Client;
use ferry_protocol::proto::{self, frame::Body};

fn direct(peer: &str) -> Option<proto::Conversation> {
    Some(proto::Conversation {
        kind: proto::ConversationKind::Direct as i32,
        id: peer.into(),
    })
}

fn group(id: &str) -> Option<proto::Conversation> {
    Some(proto::Conversation {
        kind: proto::ConversationKind::Group as i32,
        id: id.into(),
    })
}

fn send(to: Option<proto::Conversation>, cid: u64, body: &str) -> proto::Send {
    proto::Send {
        client_msg_id: cid,
        to,
        content_type: "text/plain".into(),
        body: body.as_bytes().to_vec().into(),
    }
}

/// Reads entries (live `Deliver`s and sync pages) until `n` message
/// entries have come; returns them in arrival order. Fails on a seq that
/// is not the next one.
async fn messages(client: &mut Client, mut last_seq: u64, n: usize) -> Vec<proto::Deliver> {
    let mut out = Vec::new();
    let mut take = |entry: proto::Deliver, out: &mut Vec<proto::Deliver>| {
        assert_eq!(entry.seq, last_seq + 1, "entries arrive gap-free and once");
        last_seq = entry.seq;
        if entry.kind() == proto::EntryKind::Message {
            out.push(entry);
        }
    };
    while out.len() < n {
        match within(client.recv_frame()).await.expect("recv") {
            Body::Deliver(d) => take(d, &mut out),
            Body::SyncBatch(page) => {
                for entry in page.entries {
                    take(entry, &mut out);
                }
            }
            Body::Error(e) => panic!("error {:?}: {}", e.code(), e.message),
            _ => {}
        }
    }
    out
}

fn bodies(entries: &[proto::Deliver]) -> Vec<String> {
    entries
        .iter()
        .map(|d| String::from_utf8_lossy(&d.body).into_owned())
        .collect()
}

/// A counter's value in node `id`'s /metrics (summed over its labels).
async fn metric(cluster: &TestCluster, id: u16, name: &str) -> f64 {
    let r = http(cluster.ops(id), "GET", "/metrics", &[], None).await;
    assert_eq!(r.status, 200);
    r.body
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn direct_messages_cross_nodes_online_and_offline() {
    let cluster = TestCluster::start(3).await;
    let alice = cluster.user_on(1, "alice");
    let bob = cluster.user_on(2, "bob");
    let mut a = cluster.login_home(&alice, "phone", 0).await;
    let mut a2 = cluster.login_home(&alice, "tablet", 0).await;
    let mut b = cluster.login_home(&bob, "phone", 0).await;

    // Online: each acked message reaches bob's node and his phone, in order.
    for i in 1..=20u64 {
        a.send(send(direct(&bob), i, &format!("m{i}")))
            .await
            .unwrap();
        let ack = await_ack(&mut a, i).await;
        assert_ne!(ack.msg_id, 0);
    }
    let got = messages(&mut b, 0, 20).await;
    assert_eq!(
        bodies(&got),
        (1..=20).map(|i| format!("m{i}")).collect::<Vec<_>>()
    );
    assert!(got.iter().all(|d| d.from == alice));
    assert_eq!(
        got[0].conversation.as_ref().unwrap().id,
        alice,
        "named after the peer"
    );
    // Alice's other device gets her own copies (committed on her home).
    let own = messages(&mut a2, 0, 20).await;
    assert_eq!(bodies(&own), bodies(&got));

    // Offline: bob is away while alice sends; he syncs them on his return.
    drop(b);
    for i in 21..=30u64 {
        a.send(send(direct(&bob), i, &format!("m{i}")))
            .await
            .unwrap();
        await_ack(&mut a, i).await;
    }
    // Confirmed by bob's node: nothing is left in alice's node's outbox.
    within(async {
        while metric(&cluster, 1, "ferry_bus_outbox_entries").await > 0.0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let mut b = cluster.login_home(&bob, "phone", 20).await;
    let later = messages(&mut b, 20, 10).await;
    assert_eq!(
        bodies(&later),
        (21..=30).map(|i| format!("m{i}")).collect::<Vec<_>>()
    );

    // And back: bob answers across the nodes.
    b.send(send(direct(&alice), 1, "hi alice")).await.unwrap();
    await_ack(&mut b, 1).await;
    // Alice's tablet has her own copies of m21..m30 first, then the reply.
    let rest = messages(&mut a2, 20, 11).await;
    let reply = &rest[10];
    assert_eq!(bodies(&rest[..10]), bodies(&later));
    assert_eq!(bodies(std::slice::from_ref(reply)), vec!["hi alice"]);
    assert_eq!(reply.conversation.as_ref().unwrap().id, bob);
}

#[tokio::test]
async fn a_device_that_followed_a_redirect_gets_its_messages_beside_its_other_device() {
    let cluster = TestCluster::start(3).await;
    let alice = cluster.user_on(1, "alice");
    let bob = cluster.user_on(2, "bob");
    // Bob's phone dials node 3 and follows the redirect to node 2.
    let login3 = within(Client::connect_and_authenticate(
        &cluster.addr(3).to_string(),
        &cluster.token(&bob),
        "phone",
        0,
    ))
    .await
    .expect("follow the redirect");
    assert_eq!(login3.redirects, 1);
    assert_eq!(login3.auth_ok.node_id, "2");
    let mut phone = login3.client;
    let mut tablet = cluster.login_home(&bob, "tablet", 0).await;
    let mut a = cluster.login_home(&alice, "phone", 0).await;
    for i in 1..=5u64 {
        a.send(send(direct(&bob), i, &format!("m{i}")))
            .await
            .unwrap();
        await_ack(&mut a, i).await;
    }
    let want: Vec<String> = (1..=5).map(|i| format!("m{i}")).collect();
    assert_eq!(bodies(&messages(&mut phone, 0, 5).await), want);
    assert_eq!(bodies(&messages(&mut tablet, 0, 5).await), want);
}

#[tokio::test]
async fn a_duplicated_bus_delivery_makes_one_inbox_entry() {
    let cluster = TestCluster::start(2).await;
    let alice = cluster.user_on(1, "alice");
    let bob = cluster.user_on(2, "bob");
    cluster.nsqd.set_duplicate_delivery(true);
    let mut a = cluster.login_home(&alice, "phone", 0).await;
    for i in 1..=10u64 {
        a.send(send(direct(&bob), i, &format!("m{i}")))
            .await
            .unwrap();
        await_ack(&mut a, i).await;
    }
    within(async {
        while metric(&cluster, 2, "ferry_bus_link_duplicates_total").await < 1.0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    cluster.nsqd.set_duplicate_delivery(false);
    let mut b = cluster.login_home(&bob, "phone", 0).await;
    let got = messages(&mut b, 0, 10).await;
    assert_eq!(
        bodies(&got),
        (1..=10).map(|i| format!("m{i}")).collect::<Vec<_>>()
    );
    // A marker sent now is the very next entry: nothing was stored twice.
    a.send(send(direct(&bob), 11, "marker")).await.unwrap();
    await_ack(&mut a, 11).await;
    let marker = messages(&mut b, got.last().unwrap().seq, 1).await;
    assert_eq!(bodies(&marker), vec!["marker"]);
    assert_eq!(marker[0].seq, 11);
}

/// Alice (node 1) sends `n` messages to bob (node 2) one after another,
/// each acked, calling `fault` after message `at`.
async fn survive<'a>(
    cluster: &'a TestCluster,
    n: u64,
    at: u64,
    fault: impl FnOnce(),
) -> Survived<'a> {
    let alice = cluster.user_on(1, "alice");
    let bob = cluster.user_on(2, "bob");
    let mut a = cluster.login_home(&alice, "phone", 0).await;
    let b = cluster.login_home(&bob, "phone", 0).await;
    let mut fault = Some(fault);
    for i in 1..=n {
        a.send(send(direct(&bob), i, &format!("m{i}")))
            .await
            .unwrap();
        await_ack(&mut a, i).await;
        if i == at {
            (fault.take().unwrap())();
        }
    }
    Survived {
        b,
        n,
        _cluster: cluster,
    }
}

/// Bob's side of [`survive`].
struct Survived<'a> {
    b: Client,
    n: u64,
    _cluster: &'a TestCluster,
}

impl Survived<'_> {
    /// Bob gets every acked message, once, in order.
    async fn check(mut self) {
        let got = messages(&mut self.b, 0, self.n as usize).await;
        assert_eq!(
            bodies(&got),
            (1..=self.n).map(|i| format!("m{i}")).collect::<Vec<_>>()
        );
    }

    /// Runs `step` once every message is acked, then [`Survived::check`].
    async fn crash_then(self, step: impl FnOnce()) {
        step();
        self.check().await
    }
}

#[tokio::test]
async fn the_bus_dropping_every_connection_mid_stream_loses_nothing() {
    let cluster = TestCluster::start_with(2, &["--cluster-resend-after-ms=500"]).await;
    survive(&cluster, 200, 100, || cluster.nsqd.drop_connections())
        .await
        .check()
        .await;
}

#[tokio::test]
async fn nsqd_losing_its_in_flight_and_queued_messages_loses_nothing() {
    let cluster = TestCluster::start_with(2, &["--cluster-resend-after-ms=500"]).await;
    // From message 101 on, nsqd holds what it is given (as if slow); the
    // crash then loses all of it, in flight and queued alike.
    survive(&cluster, 200, 100, || {
        cluster.nsqd.set_delivery_delay(Duration::from_secs(60))
    })
    .await
    .crash_then(|| {
        assert!(cluster.nsqd.crash() > 0, "the double lost messages");
        cluster.nsqd.set_delivery_delay(Duration::ZERO);
    })
    .await;
    assert!(metric(&cluster, 1, "ferry_bus_link_batches_resent_total").await >= 1.0);
}

#[tokio::test]
async fn a_node_killed_with_batches_in_its_outbox_publishes_them_after_restart() {
    let mut cluster = TestCluster::start_with(2, &["--cluster-resend-after-ms=60000"]).await;
    let alice = cluster.user_on(1, "alice");
    let bob = cluster.user_on(2, "bob");
    // What alice's node publishes now is held by nsqd for a minute, then
    // lost with the crash: only alice's outbox still has it.
    cluster.nsqd.set_delivery_delay(Duration::from_secs(60));
    let mut a = cluster.login_home(&alice, "phone", 0).await;
    for i in 1..=50u64 {
        a.send(send(direct(&bob), i, &format!("m{i}")))
            .await
            .unwrap();
        await_ack(&mut a, i).await;
    }
    drop(a);
    cluster.kill(1).await;
    cluster.nsqd.crash();
    cluster.nsqd.set_delivery_delay(Duration::ZERO);
    cluster.restart(1).await;
    let mut b = cluster.login_home(&bob, "phone", 0).await;
    let got = messages(&mut b, 0, 50).await;
    assert_eq!(
        bodies(&got),
        (1..=50).map(|i| format!("m{i}")).collect::<Vec<_>>()
    );
    // Exactly once: the next entry is the 51st.
    let mut a = cluster.login_home(&alice, "phone", 50).await;
    a.send(send(direct(&bob), 51, "after")).await.unwrap();
    await_ack(&mut a, 51).await;
    let next = messages(&mut b, 50, 1).await;
    assert_eq!(
        (next[0].seq, bodies(&next)),
        (51, vec!["after".to_string()])
    );
}

#[tokio::test]
async fn a_group_with_members_on_every_node_gets_each_message_once_in_one_order() {
    let cluster = TestCluster::start(3).await;
    let gid = cluster.group_on(2, "team");
    let members: Vec<String> = (0..2000).map(|i| format!("member-{i}")).collect();
    for node in 1..=3u16 {
        assert!(members.iter().any(|m| cluster.home(m) == node));
    }
    // Built through the admin API of node 1: forwarded to the owner.
    let create = serde_json::json!({
        "group_id": gid, "name": "team", "owner": members[0],
        "members": members[1..500].to_vec(),
    });
    let r = admin(
        cluster.ops(1),
        "POST",
        "/admin/groups",
        Some(&create.to_string()),
    )
    .await;
    assert!(r.status < 300, "create: {} {}", r.status, r.body);
    for chunk in members[500..].chunks(500) {
        let add = serde_json::json!({ "members": chunk });
        let path = format!("/admin/groups/{gid}/members");
        let r = admin(cluster.ops(3), "POST", &path, Some(&add.to_string())).await;
        assert!(r.status < 300, "add: {} {}", r.status, r.body);
    }
    // One sender per node, sending at once.
    let senders: Vec<String> = (1..=3u16)
        .map(|node| {
            members
                .iter()
                .find(|m| cluster.home(m) == node)
                .unwrap()
                .clone()
        })
        .collect();
    let mut tasks = Vec::new();
    for (s, sender) in senders.iter().enumerate() {
        let mut c = cluster.login_home(sender, "phone", 0).await;
        let gid = gid.clone();
        tasks.push(tokio::spawn(async move {
            for i in 1..=10u64 {
                c.send(send(group(&gid), i, &format!("s{s}-{i}")))
                    .await
                    .unwrap();
                let ack = await_ack(&mut c, i).await;
                assert_ne!(ack.msg_id, 0);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Every member, on every node: the 30 messages once, in one order.
    let mut orders: HashMap<Vec<String>, usize> = HashMap::new();
    let mut per_node: BTreeMap<u16, usize> = BTreeMap::new();
    for chunk in members.chunks(100) {
        let mut reads = Vec::new();
        for m in chunk {
            let mut c = cluster.login_home(m, "phone", 0).await;
            *per_node.entry(cluster.home(m)).or_default() += 1;
            reads.push(tokio::spawn(async move {
                bodies(&messages(&mut c, 0, 30).await)
            }));
        }
        for r in reads {
            *orders.entry(r.await.unwrap()).or_default() += 1;
        }
    }
    assert_eq!(
        orders.len(),
        1,
        "every member sees the same order: {orders:?}"
    );
    let order = orders.keys().next().unwrap();
    for (s, _) in senders.iter().enumerate() {
        let mine: Vec<&String> = order
            .iter()
            .filter(|b| b.starts_with(&format!("s{s}-")))
            .collect();
        let want: Vec<String> = (1..=10).map(|i| format!("s{s}-{i}")).collect();
        assert_eq!(mine, want.iter().collect::<Vec<_>>(), "per-sender order");
    }
    assert_eq!(per_node.values().sum::<usize>(), 2000);
}

#[tokio::test]
async fn a_non_member_gets_not_a_member_from_the_owner_never_an_ack() {
    let cluster = TestCluster::start(3).await;
    let gid = cluster.group_on(2, "club");
    let owner = cluster.user_on(1, "owner");
    let outsider = cluster.user_on(3, "outsider");
    let create =
        serde_json::json!({ "group_id": gid, "name": "club", "owner": owner, "members": [] });
    let r = admin(
        cluster.ops(1),
        "POST",
        "/admin/groups",
        Some(&create.to_string()),
    )
    .await;
    assert!(r.status < 300, "create: {} {}", r.status, r.body);
    let mut c = cluster.login_home(&outsider, "phone", 0).await;
    c.send(send(group(&gid), 1, "let me in")).await.unwrap();
    loop {
        match within(c.recv_frame()).await.unwrap() {
            Body::SyncBatch(_) => continue, // the (empty) login sync
            Body::Error(e) => {
                assert_eq!(e.code(), proto::ErrorCode::NotAMember);
                assert_eq!(e.client_msg_id, 1);
                break;
            }
            other => panic!("expected NOT_A_MEMBER, got {}", other.kind_name()),
        }
    }
    // The owner (on node 1, the group on node 2) can send.
    let mut o = cluster.login_home(&owner, "phone", 0).await;
    o.send(send(group(&gid), 1, "welcome")).await.unwrap();
    let ack = await_ack(&mut o, 1).await;
    assert_eq!(
        ack.seq, 0,
        "the sender's copy is appended by its home, later"
    );
    // The copy reaches the owner's devices through the group's node.
    let mut tablet = cluster.login_home(&owner, "tablet", 0).await;
    let own = messages(&mut tablet, 0, 1).await;
    assert_eq!(bodies(&own), vec!["welcome"]);
    assert_eq!(
        own[0].client_msg_id, 1,
        "the sender's own copy carries its client id"
    );
}

#[tokio::test]
async fn a_node_with_a_different_node_list_refuses_to_serve() {
    let cluster = TestCluster::start(3).await;
    // A fourth process that believes in a 4-node cluster (its own list).
    let ports = ferry_e2e::cluster::free_ports(2);
    let mut layout = cluster.layout.clone();
    let addr = |p: u16| std::net::SocketAddr::from(([127, 0, 0, 1], p));
    layout.insert(4, (addr(ports[0]), addr(ports[1])));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("other.toml");
    std::fs::write(
        &config,
        ferry_e2e::cluster::cluster_toml(&layout, &cluster.nsqd.addr().to_string()),
    )
    .unwrap();
    let data = tempfile::tempdir().unwrap();
    let odd = ServerProcess::start_on(
        data.path(),
        &layout[&4].0.to_string(),
        &layout[&4].1.to_string(),
        &[
            &format!("--config={}", config.display()),
            "--cluster-node-id=4",
        ],
    )
    .await;
    // It hears the others' digests and never serves.
    within(async {
        loop {
            let r = http(odd.http, "GET", "/readyz", &[], None).await;
            assert_eq!(r.status, 503);
            if r.body.contains("different node list") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let user = (0..)
        .map(|i| format!("u-{i}"))
        .find(|u| {
            let p = ferry_cluster::Placement::new(
                4,
                layout
                    .iter()
                    .map(|(&id, (c, o))| ferry_cluster::Node {
                        id: ferry_cluster::NodeId::new(id).unwrap(),
                        client_address: c.to_string(),
                        ops_address: o.to_string(),
                    })
                    .collect(),
            )
            .unwrap();
            p.home_of_user(u).get() == 4
        })
        .unwrap();
    let mut c = Client::connect(odd.addr).await.unwrap();
    let err = within(c.authenticate(&cluster.token(&user), "phone", 0))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Some(proto::ErrorCode::Unavailable), "{err}");
    // The three agreeing nodes go on serving.
    for id in 1..=3 {
        let r = http(cluster.ops(id), "GET", "/readyz", &[], None).await;
        assert_eq!(r.status, 200, "node {id}: {}", r.body);
    }
}
