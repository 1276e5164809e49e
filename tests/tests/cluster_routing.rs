//! Cluster mode, "everything else routes too" (docs/CLUSTER.md §2.2–2.5):
//! recalls, read receipts, typing, group history and member lists, group
//! changes, and the admin API (kick, presence, system messages, stats) work
//! from any node for users and groups that live on another. Three real
//! `ferry serve` nodes on the nsqd test double.

use std::time::Duration;

use ferry_e2e::cluster::TestCluster;
use ferry_e2e::*;
use ferry_protocol::client::Client;
use ferry_protocol::proto::{self, frame::Body};

fn conv(kind: proto::ConversationKind, id: &str) -> Option<proto::Conversation> {
    Some(proto::Conversation {
        kind: kind as i32,
        id: id.into(),
    })
}

fn direct(peer: &str) -> Option<proto::Conversation> {
    conv(proto::ConversationKind::Direct, peer)
}

fn group(id: &str) -> Option<proto::Conversation> {
    conv(proto::ConversationKind::Group, id)
}

fn send(to: Option<proto::Conversation>, cid: u64, body: &str) -> proto::Send {
    proto::Send {
        client_msg_id: cid,
        to,
        content_type: "text/plain".into(),
        body: body.as_bytes().to_vec().into(),
    }
}

/// The next frame that is not a sync page (the login sync of an empty
/// inbox, or pages of entries the test does not look at).
async fn next_live(client: &mut Client) -> Body {
    loop {
        match within(client.recv_frame()).await.expect("recv") {
            Body::SyncBatch(_) => continue,
            other => return other,
        }
    }
}

/// The next `Deliver` of `kind`, skipping other entries and frames.
async fn next_entry(client: &mut Client, kind: proto::EntryKind) -> proto::Deliver {
    loop {
        match next_live(client).await {
            Body::Deliver(d) if d.kind() == kind => return d,
            Body::Error(e) => panic!("error {:?}: {}", e.code(), e.message),
            _ => continue,
        }
    }
}

/// Creates group `gid` through node `via`'s admin API.
async fn create_group(cluster: &TestCluster, via: u16, gid: &str, owner: &str, members: &[&str]) {
    let body =
        serde_json::json!({ "group_id": gid, "name": gid, "owner": owner, "members": members });
    let r = admin(
        cluster.ops(via),
        "POST",
        "/admin/groups",
        Some(&body.to_string()),
    )
    .await;
    assert!(r.status < 300, "create: {} {}", r.status, r.body);
}

#[tokio::test]
async fn recalls_read_receipts_and_typing_cross_nodes() {
    let cluster = TestCluster::start(3).await;
    let alice = cluster.user_on(1, "alice");
    let bob = cluster.user_on(2, "bob");
    let mut a = cluster.login_home(&alice, "phone", 0).await;
    let mut b = cluster.login_home(&bob, "phone", 0).await;

    a.send(send(direct(&bob), 1, "oops")).await.unwrap();
    let ack = await_ack(&mut a, 1).await;
    let got = next_entry(&mut b, proto::EntryKind::Message).await;
    assert_eq!(got.msg_id, ack.msg_id);

    // Typing: ephemeral, straight to bob's node.
    a.send(proto::Typing {
        conversation: direct(&bob),
        typing: true,
        from: String::new(),
    })
    .await
    .unwrap();
    match next_live(&mut b).await {
        Body::Typing(t) => {
            assert_eq!(t.from, alice);
            assert!(t.typing);
        }
        other => panic!("expected Typing, got {}", other.kind_name()),
    }

    // Bob reads it: alice's home gets the receipt.
    b.send(proto::Read {
        conversation: direct(&alice),
        up_to_msg_id: ack.msg_id,
    })
    .await
    .unwrap();
    let read = next_entry(&mut a, proto::EntryKind::Read).await;
    assert_eq!(read.from, bob);
    assert_eq!(read.ref_msg_id, ack.msg_id);

    // Alice recalls it: bob's copy on node 2 is replaced.
    a.send(proto::Recall {
        request_id: 7,
        msg_id: ack.msg_id,
        conversation: direct(&bob),
    })
    .await
    .unwrap();
    loop {
        match next_live(&mut a).await {
            Body::RecallAck(r) => {
                assert_eq!((r.request_id, r.msg_id), (7, ack.msg_id));
                break;
            }
            Body::Error(e) => panic!("recall refused: {:?} {}", e.code(), e.message),
            _ => continue,
        }
    }
    let recall = next_entry(&mut b, proto::EntryKind::Recall).await;
    assert_eq!(recall.ref_msg_id, ack.msg_id);
    assert_eq!(recall.from, alice);
    // A later sync of bob's shows the recalled message as recalled.
    let mut b2 = Client::connect(cluster.addr(2)).await.unwrap();
    within(b2.authenticate(&cluster.token(&bob), "tablet", 0))
        .await
        .unwrap();
    let page = loop {
        if let Body::SyncBatch(p) = within(b2.recv_frame()).await.unwrap() {
            break p;
        }
    };
    let first = page
        .entries
        .iter()
        .find(|d| d.msg_id == ack.msg_id)
        .unwrap();
    assert_eq!(first.kind(), proto::EntryKind::Recall);
    assert!(first.body.is_empty(), "the body is gone everywhere");
}

#[tokio::test]
async fn group_requests_from_any_node_act_on_the_owner() {
    let cluster = TestCluster::start(3).await;
    let gid = cluster.group_on(3, "crew");
    let owner = cluster.user_on(1, "captain");
    let mate = cluster.user_on(2, "mate");
    let cook = cluster.user_on(1, "cook");
    create_group(&cluster, 1, &gid, &owner, &[&mate]).await;

    // The owner, on node 1, adds the cook through the group's node 3.
    let mut o = cluster.login_home(&owner, "phone", 0).await;
    o.send(proto::GroupRequest {
        request_id: 1,
        op: Some(proto::group_request::Op::AddMembers(proto::AddMembers {
            group_id: gid.clone(),
            members: vec![cook.clone()],
        })),
    })
    .await
    .unwrap();
    loop {
        match next_live(&mut o).await {
            Body::GroupReply(r) if r.request_id == 1 => break,
            Body::Error(e) => panic!("add refused: {:?} {}", e.code(), e.message),
            _ => continue,
        }
    }
    // The member list, asked on node 2, comes from the owner.
    let mut m = cluster.login_home(&mate, "phone", 0).await;
    m.send(proto::GroupRequest {
        request_id: 2,
        op: Some(proto::group_request::Op::ListMembers(proto::ListMembers {
            group_id: gid.clone(),
            after_user_id: String::new(),
            limit: 0,
        })),
    })
    .await
    .unwrap();
    let listed = loop {
        match next_live(&mut m).await {
            Body::GroupReply(r) if r.request_id == 2 => break r,
            Body::Error(e) => panic!("list refused: {:?} {}", e.code(), e.message),
            _ => continue,
        }
    };
    let mut ids: Vec<String> = listed.members.iter().map(|m| m.user_id.clone()).collect();
    ids.sort();
    let mut want = vec![owner.clone(), mate.clone(), cook.clone()];
    want.sort();
    assert_eq!(ids, want);

    // Messages, then the history asked from node 2.
    for i in 1..=3u64 {
        m.send(send(group(&gid), i, &format!("h{i}")))
            .await
            .unwrap();
        let ack = await_ack(&mut m, i).await;
        assert_eq!(ack.seq, 0, "owned by node 3: the copy comes later");
    }
    m.send(proto::History {
        request_id: 3,
        conversation: group(&gid),
        before_msg_id: 0,
        limit: 10,
    })
    .await
    .unwrap();
    let page = loop {
        match next_live(&mut m).await {
            Body::HistoryPage(p) if p.request_id == 3 => break p,
            Body::Error(e) => panic!("history refused: {:?} {}", e.code(), e.message),
            _ => continue,
        }
    };
    let bodies: Vec<String> = page
        .entries
        .iter()
        .filter(|d| d.kind() == proto::EntryKind::Message)
        .map(|d| String::from_utf8_lossy(&d.body).into_owned())
        .collect();
    assert_eq!(bodies, vec!["h3", "h2", "h1"], "newest first");

    // Typing in the group reaches a member on another node through the owner.
    let mut c = cluster.login_home(&cook, "phone", 0).await;
    m.send(proto::Typing {
        conversation: group(&gid),
        typing: true,
        from: String::new(),
    })
    .await
    .unwrap();
    loop {
        match next_live(&mut c).await {
            Body::Typing(t) => {
                assert_eq!(t.from, mate);
                assert_eq!(t.conversation.unwrap().id, gid);
                break;
            }
            _ => continue,
        }
    }
}

#[tokio::test]
async fn admin_calls_on_any_node_reach_the_user_or_group() {
    let cluster = TestCluster::start(3).await;
    let bob = cluster.user_on(2, "bob");
    let carol = cluster.user_on(3, "carol");
    let gid = cluster.group_on(1, "news");
    let mut b = cluster.login_home(&bob, "phone", 0).await;

    // Presence of bob (node 2), asked on node 3.
    let r = admin(
        cluster.ops(3),
        "GET",
        &format!("/admin/users/{bob}/presence"),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["online"], true, "{}", r.body);
    assert_eq!(r.header("x-ferry-forwarded-by"), None);

    // A system message to bob, posted on node 1.
    let r = admin(
        cluster.ops(1),
        "POST",
        &format!("/admin/users/{bob}/messages"),
        Some(r#"{"text": "hello from ops"}"#),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let sys = next_entry(&mut b, proto::EntryKind::System).await;
    assert_eq!(&sys.body[..], b"hello from ops");

    // A group on node 1 with members on nodes 2 and 3, a system message
    // posted on node 3: both members get it.
    create_group(&cluster, 2, &gid, &bob, &[&carol]).await;
    let mut c = cluster.login_home(&carol, "phone", 0).await;
    let r = admin(
        cluster.ops(3),
        "POST",
        &format!("/admin/groups/{gid}/messages"),
        Some(r#"{"text": "maintenance at noon"}"#),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["recipients"], 2, "{}", r.body);
    for client in [&mut b, &mut c] {
        let sys = next_entry(client, proto::EntryKind::System).await;
        assert_eq!(&sys.body[..], b"maintenance at noon");
    }

    // Stats say which node answered.
    let r = admin(cluster.ops(3), "GET", "/admin/stats", None).await;
    assert_eq!(r.json()["node_id"], "3");

    // A kick of bob, asked on node 1, closes his connection on node 2.
    let r = admin(
        cluster.ops(1),
        "POST",
        &format!("/admin/users/{bob}/kick"),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    loop {
        match within(b.recv_frame()).await {
            Ok(Body::Kick(_)) => break,
            Ok(_) => continue,
            Err(e) => panic!("expected a Kick before the close: {e}"),
        }
    }
    expect_closed(&mut b).await;
    let r = within(async {
        loop {
            let r = admin(
                cluster.ops(3),
                "GET",
                &format!("/admin/users/{bob}/presence"),
                None,
            )
            .await;
            if r.json()["online"] == false {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(r.status, 200);
}
