//! Durable messaging end to end: 1:1, offline sync, multiple devices,
//! dedup, groups, recall, history, ordering, and crash safety.

use std::time::Duration;

use bytes::Bytes;
use ferry_e2e::*;
use ferry_protocol::client::Client;
use ferry_protocol::proto::{self, frame::Body, group_request::Op as GroupOp};
use ferry_protocol::{ErrorCode, Frame};

fn direct(id: &str) -> Option<proto::Conversation> {
    Some(proto::Conversation {
        kind: proto::ConversationKind::Direct as i32,
        id: id.into(),
    })
}

fn group(id: &str) -> Option<proto::Conversation> {
    Some(proto::Conversation {
        kind: proto::ConversationKind::Group as i32,
        id: id.into(),
    })
}

fn send_to(to: Option<proto::Conversation>, cid: u64, body: &str) -> proto::Send {
    proto::Send {
        client_msg_id: cid,
        to,
        content_type: "text/plain".into(),
        body: Bytes::copy_from_slice(body.as_bytes()),
    }
}

/// Reads inbox entries (live or synced) until `n` have arrived; checks they
/// come in seq order with no gap and no duplicate after `after`.
async fn entries(client: &mut Client, after: u64, n: usize) -> Vec<proto::Deliver> {
    let mut out: Vec<proto::Deliver> = Vec::new();
    let mut last = after;
    while out.len() < n {
        let body = within(client.recv_frame()).await.expect("recv");
        let batch = match body {
            Body::Deliver(d) => vec![d],
            Body::SyncBatch(b) => b.entries,
            _ => continue,
        };
        for d in batch {
            assert_eq!(d.seq, last + 1, "entries must be in order without gaps");
            last = d.seq;
            out.push(d);
        }
    }
    out
}

async fn login_at(server: &TestServer, user: &str, device: &str, last_seq: u64) -> Client {
    let mut c = server.connect().await;
    within(c.authenticate(&server.token(user), device, last_seq))
        .await
        .expect("auth");
    c
}

/// Logs in and consumes the login sync (ends with has_more = false).
async fn login_synced(server: &TestServer, user: &str, device: &str) -> Client {
    let mut c = login_at(server, user, device, 0).await;
    loop {
        if let Body::SyncBatch(b) = within(c.recv_frame()).await.unwrap()
            && !b.has_more
        {
            return c;
        }
    }
}

#[tokio::test]
async fn a_to_b_online() {
    let server = TestServer::start().await;
    let mut a = login_synced(&server, "alice", "phone").await;
    let mut b = login_synced(&server, "bob", "phone").await;
    a.send(send_to(direct("bob"), 1, "hello")).await.unwrap();
    let ack = await_ack(&mut a, 1).await;
    assert!(ack.msg_id > 0 && ack.seq == 1);
    let got = entries(&mut b, 0, 1).await;
    assert_eq!(got[0].body, Bytes::from_static(b"hello"));
    assert_eq!(got[0].from, "alice");
    assert_eq!(got[0].msg_id, ack.msg_id);
    assert_eq!(
        got[0].conversation,
        direct("alice"),
        "named after the other party"
    );
    assert_eq!(got[0].client_msg_id, 0, "only the sender's copies carry it");
    // The sending device receives its own copy too, after the ack.
    let own = entries(&mut a, 0, 1).await;
    assert_eq!(own[0].msg_id, ack.msg_id);
    assert_eq!(own[0].client_msg_id, 1);
    assert_eq!(own[0].conversation, direct("bob"));
    server.stop().await;
}

#[tokio::test]
async fn a_to_b_offline_then_sync_on_login() {
    let server = TestServer::start().await;
    let mut a = login_synced(&server, "alice", "phone").await;
    for i in 1..=3 {
        a.send(send_to(direct("bob"), i, &format!("m{i}")))
            .await
            .unwrap();
        await_ack(&mut a, i).await;
    }
    let mut b = login_at(&server, "bob", "phone", 0).await;
    let got = entries(&mut b, 0, 3).await;
    let bodies: Vec<_> = got.iter().map(|d| d.body.clone()).collect();
    assert_eq!(bodies, vec!["m1", "m2", "m3"]);
    // Logging in again from seq 2 resends only what follows.
    drop(b);
    let mut b = login_at(&server, "bob", "phone", 2).await;
    let got = entries(&mut b, 2, 1).await;
    assert_eq!(got[0].body, Bytes::from_static(b"m3"));
    server.stop().await;
}

#[tokio::test]
async fn two_devices_both_receive_and_ack_independently() {
    let server = TestServer::start().await;
    let mut a = login_synced(&server, "alice", "phone").await;
    let mut b1 = login_synced(&server, "bob", "phone").await;
    let mut b2 = login_synced(&server, "bob", "tablet").await;
    a.send(send_to(direct("bob"), 1, "x")).await.unwrap();
    a.send(send_to(direct("bob"), 2, "y")).await.unwrap();
    assert_eq!(entries(&mut b1, 0, 2).await.len(), 2);
    assert_eq!(entries(&mut b2, 0, 2).await.len(), 2);
    b1.send(proto::DeliverAck { up_to_seq: 2 }).await.unwrap();
    b2.send(proto::DeliverAck { up_to_seq: 1 }).await.unwrap();
    // A later write from each device commits after its ack.
    b1.send(send_to(direct("alice"), 10, "ok")).await.unwrap();
    await_ack(&mut b1, 10).await;
    b2.send(send_to(direct("alice"), 11, "ok")).await.unwrap();
    await_ack(&mut b2, 11).await;
    let storage = server.router.storage();
    assert_eq!(storage.cursor("bob", "phone").unwrap(), 2);
    assert_eq!(storage.cursor("bob", "tablet").unwrap(), 1);
    server.stop().await;
}

#[tokio::test]
async fn senders_other_device_sees_the_sent_message() {
    let server = TestServer::start().await;
    let mut phone = login_synced(&server, "alice", "phone").await;
    let mut laptop = login_synced(&server, "alice", "laptop").await;
    phone
        .send(send_to(direct("bob"), 5, "from phone"))
        .await
        .unwrap();
    let ack = await_ack(&mut phone, 5).await;
    let got = entries(&mut laptop, 0, 1).await;
    assert_eq!(got[0].msg_id, ack.msg_id);
    assert_eq!(got[0].from, "alice");
    assert_eq!(got[0].body, Bytes::from_static(b"from phone"));
    server.stop().await;
}

#[tokio::test]
async fn same_client_msg_id_twice_is_one_message_with_the_same_ack() {
    let server = TestServer::start().await;
    let mut a = login_synced(&server, "alice", "phone").await;
    let mut b = login_synced(&server, "bob", "phone").await;
    a.send(send_to(direct("bob"), 77, "once")).await.unwrap();
    let first = await_ack(&mut a, 77).await;
    a.send(send_to(direct("bob"), 77, "once")).await.unwrap();
    let second = await_ack(&mut a, 77).await;
    assert_eq!(first, second);
    a.send(send_to(direct("bob"), 78, "next")).await.unwrap();
    await_ack(&mut a, 78).await;
    let got = entries(&mut b, 0, 2).await;
    assert_eq!(got[0].body, Bytes::from_static(b"once"));
    assert_eq!(
        got[1].body,
        Bytes::from_static(b"next"),
        "no duplicate in between"
    );
    server.stop().await;
}

async fn group_request(
    client: &mut Client,
    id: u64,
    op: GroupOp,
) -> Result<proto::GroupReply, ErrorCode> {
    client
        .send(proto::GroupRequest {
            request_id: id,
            op: Some(op),
        })
        .await
        .unwrap();
    loop {
        match within(client.recv_frame()).await.unwrap() {
            Body::GroupReply(r) if r.request_id == id => return Ok(r),
            Body::Error(e) if e.request_id == id => return Err(e.code()),
            _ => continue,
        }
    }
}

#[tokio::test]
async fn group_of_three_with_one_offline_member() {
    let server = TestServer::start().await;
    let mut owner = login_synced(&server, "owner", "d").await;
    let mut m1 = login_synced(&server, "m1", "d").await;
    let reply = group_request(
        &mut owner,
        1,
        GroupOp::Create(proto::CreateGroup {
            group_id: "team".into(),
            name: "Team".into(),
            members: vec!["m1".into(), "m2".into()],
        }),
    )
    .await
    .unwrap();
    assert_eq!(reply.group_id, "team");
    assert_eq!(reply.members.len(), 3);

    owner
        .send(send_to(group("team"), 1, "hi team"))
        .await
        .unwrap();
    await_ack(&mut owner, 1).await;
    // m1 (online) gets the creation event, then the message.
    let got = entries(&mut m1, 0, 2).await;
    assert_eq!(got[0].kind, proto::EntryKind::GroupEvent as i32);
    assert_eq!(got[1].body, Bytes::from_static(b"hi team"));
    assert_eq!(got[1].conversation, group("team"));
    // m2 was offline and syncs both.
    let mut m2 = login_at(&server, "m2", "d", 0).await;
    let got = entries(&mut m2, 0, 2).await;
    assert_eq!(got[1].body, Bytes::from_static(b"hi team"));

    // Members list; a non-member can neither list nor send.
    let list = group_request(
        &mut m2,
        2,
        GroupOp::ListMembers(proto::ListMembers {
            group_id: "team".into(),
            ..Default::default()
        }),
    )
    .await
    .unwrap();
    assert_eq!(list.members.len(), 3);
    let mut outsider = login_synced(&server, "eve", "d").await;
    outsider
        .send(send_to(group("team"), 9, "let me in"))
        .await
        .unwrap();
    let code = loop {
        if let Body::Error(e) = within(outsider.recv_frame()).await.unwrap() {
            assert_eq!(e.client_msg_id, 9);
            assert!(!e.closing);
            break e.code();
        }
    };
    assert_eq!(code, ErrorCode::NotAMember);
    assert_alive(&mut outsider).await;
    // Roles are enforced.
    let denied = group_request(
        &mut m1,
        3,
        GroupOp::AddMembers(proto::AddMembers {
            group_id: "team".into(),
            members: vec!["eve".into()],
        }),
    )
    .await;
    assert_eq!(denied.unwrap_err(), ErrorCode::PermissionDenied);
    server.stop().await;
}

/// One `list_members` page: (user ids, has_more).
async fn members_page(
    client: &mut Client,
    id: u64,
    group_id: &str,
    after: &str,
    limit: u32,
) -> (Vec<String>, bool) {
    let reply = group_request(
        client,
        id,
        GroupOp::ListMembers(proto::ListMembers {
            group_id: group_id.into(),
            after_user_id: after.into(),
            limit,
        }),
    )
    .await
    .unwrap_or_else(|code| panic!("list_members after {after:?}: {code:?}"));
    assert_eq!(reply.group_id, group_id);
    let ids = reply.members.into_iter().map(|m| m.user_id).collect();
    (ids, reply.has_more)
}

/// Pages through a group's members as a client following the protocol
/// does; checks each page is non-empty when `has_more` was promised and
/// continues where the previous one stopped.
async fn all_member_pages(client: &mut Client, group_id: &str, limit: u32) -> Vec<Vec<String>> {
    let mut pages: Vec<Vec<String>> = Vec::new();
    let mut after = String::new();
    loop {
        let id = 1000 + pages.len() as u64;
        let (ids, has_more) = members_page(client, id, group_id, &after, limit).await;
        assert!(
            !(has_more && ids.is_empty()),
            "page {} is empty but has_more",
            pages.len()
        );
        if let Some(last) = ids.last() {
            after = last.clone();
        }
        pages.push(ids);
        if !has_more {
            return pages;
        }
        assert!(pages.len() < 10_000, "paging does not end");
    }
}

/// Every member once, in bytewise ascending order.
fn assert_all_once_in_order(pages: &[Vec<String>], expected: &[String]) {
    let listed = pages.concat();
    assert!(
        listed.windows(2).all(|w| w[0].as_bytes() < w[1].as_bytes()),
        "members must come in strictly ascending user id order"
    );
    assert_eq!(listed.len(), expected.len());
    assert_eq!(listed, expected);
}

#[tokio::test]
async fn list_members_pages_through_a_group_too_big_for_one_frame() {
    let server = TestServer::start().await;
    let mut owner = login_synced(&server, "owner", "d").await;
    group_request(
        &mut owner,
        1,
        GroupOp::Create(proto::CreateGroup {
            group_id: "big".into(),
            name: "Big".into(),
            members: Vec::new(),
        }),
    )
    .await
    .unwrap();
    // 4,500 members: a third with short ids ("a00003"), the rest with ids
    // of the maximum 64 bytes, which 1,000 to a page would not fit in a
    // 64 KiB frame. As one list they take about 230 KB. Added in a
    // scrambled order (7919 is prime to 4500), so join order is not id
    // order.
    const N: usize = 4500;
    let ids: Vec<String> = (0..N)
        .map(|k| k * 7919 % N)
        .map(|i| match i % 3 {
            0 => format!("a{i:05}"),
            _ => format!("b{i:05}{}", "x".repeat(58)),
        })
        .collect();
    assert!(ids.iter().all(|id| id.len() <= 64));
    for (n, chunk) in ids.chunks(500).enumerate() {
        group_request(
            &mut owner,
            10 + n as u64,
            GroupOp::AddMembers(proto::AddMembers {
                group_id: "big".into(),
                members: chunk.to_vec(),
            }),
        )
        .await
        .unwrap();
    }
    let mut expected = ids.clone();
    expected.push("owner".into());
    expected.sort();

    // A plain member pages with the default limit: the 1,500 short ids
    // come first, 1,000 (the default page) to a page; then the long ones,
    // fewer than 1,000 to a page because the frame is full.
    let mut member = login_synced(&server, "a00000", "d").await;
    let pages = all_member_pages(&mut member, "big", 0).await;
    assert_all_once_in_order(&pages, &expected);
    assert_eq!(pages[0].len(), 1000, "the default page is 1,000 members");
    assert!(pages.iter().all(|p| p.len() <= 1000));
    assert!(
        pages[..pages.len() - 1].iter().any(|p| p.len() < 1000),
        "pages of 64-byte ids are cut to fit the frame"
    );
    assert!(pages.len() >= 5, "{} pages", pages.len());

    // A limit above the cap is reduced to it.
    let (first, has_more) = members_page(&mut member, 2, "big", "", u32::MAX).await;
    assert_eq!((first.len(), has_more), (1000, true));
    assert_eq!(first, pages[0]);

    // A small explicit limit: full pages but the last.
    let pages = all_member_pages(&mut member, "big", 250).await;
    assert_all_once_in_order(&pages, &expected);
    assert_eq!(pages.len(), (N + 1).div_ceil(250));
    assert!(pages[..pages.len() - 1].iter().all(|p| p.len() == 250));

    // The cursor is exclusive, need not be a member, and past the end
    // gives an empty last page.
    let (page, _) = members_page(&mut member, 3, "big", &expected[9], 5).await;
    assert_eq!(page, expected[10..15]);
    let (page, _) = members_page(&mut member, 4, "big", "a00001", 2).await;
    assert_eq!(page, ["a00003", "a00006"]);
    let last = expected.last().unwrap();
    assert_eq!(
        members_page(&mut member, 5, "big", last, 0).await,
        (Vec::new(), false)
    );
    assert_eq!(
        members_page(&mut member, 6, "big", "zzz", 0).await,
        (Vec::new(), false)
    );
    server.stop().await;
}

#[tokio::test]
async fn list_members_limit_on_a_small_group() {
    let server = TestServer::start().await;
    let mut owner = login_synced(&server, "dave", "d").await;
    let reply = group_request(
        &mut owner,
        1,
        GroupOp::Create(proto::CreateGroup {
            group_id: "small".into(),
            name: "Small".into(),
            members: ["erin", "bob", "Zed", "carol", "alice"]
                .map(String::from)
                .to_vec(),
        }),
    )
    .await
    .unwrap();
    assert!(!reply.has_more, "has_more is for list_members only");
    // Bytewise: upper case sorts before lower case.
    let expected: Vec<String> = ["Zed", "alice", "bob", "carol", "dave", "erin"]
        .map(String::from)
        .to_vec();

    // What an old client sends (group_id alone): the first page, with
    // roles and the group's name.
    let list = group_request(
        &mut owner,
        2,
        GroupOp::ListMembers(proto::ListMembers {
            group_id: "small".into(),
            ..Default::default()
        }),
    )
    .await
    .unwrap();
    assert_eq!((list.name.as_str(), list.has_more), ("Small", false));
    let ids: Vec<&str> = list.members.iter().map(|m| m.user_id.as_str()).collect();
    assert_eq!(ids, expected);
    assert_eq!(list.members[4].role(), proto::GroupRole::Owner);
    assert_eq!(list.members[0].role(), proto::GroupRole::Member);

    let pages = all_member_pages(&mut owner, "small", 2).await;
    assert_eq!(
        pages,
        [["Zed", "alice"], ["bob", "carol"], ["dave", "erin"]]
    );
    assert_eq!(
        members_page(&mut owner, 3, "small", "carol", 2).await,
        (vec!["dave".to_string(), "erin".to_string()], false),
        "has_more is false when the page ends exactly at the last member"
    );
    assert_eq!(
        members_page(&mut owner, 4, "small", "bob", 1).await,
        (vec!["carol".to_string()], true)
    );
    let pages = all_member_pages(&mut owner, "small", 1).await;
    assert_all_once_in_order(&pages, &expected);
    assert_eq!(pages.len(), 6);

    // The documented errors are unchanged.
    let list = |group_id: &str| {
        GroupOp::ListMembers(proto::ListMembers {
            group_id: group_id.into(),
            after_user_id: "alice".into(),
            limit: 2,
        })
    };
    let mut outsider = login_synced(&server, "eve", "d").await;
    assert_eq!(
        group_request(&mut outsider, 5, list("small"))
            .await
            .unwrap_err(),
        ErrorCode::NotAMember
    );
    assert_eq!(
        group_request(&mut owner, 6, list("nope"))
            .await
            .unwrap_err(),
        ErrorCode::NoSuchGroup
    );
    assert_alive(&mut owner).await;
    server.stop().await;
}

#[tokio::test]
async fn recall_inside_and_outside_the_window() {
    let server = TestServer::start().await;
    let mut a = login_synced(&server, "alice", "phone").await;
    let mut b = login_synced(&server, "bob", "phone").await;
    a.send(send_to(direct("bob"), 1, "oops")).await.unwrap();
    let ack = await_ack(&mut a, 1).await;
    entries(&mut b, 0, 1).await;
    a.send(proto::Recall {
        request_id: 5,
        msg_id: ack.msg_id,
        conversation: direct("bob"),
    })
    .await
    .unwrap();
    loop {
        match within(a.recv_frame()).await.unwrap() {
            Body::RecallAck(r) => {
                assert_eq!((r.request_id, r.msg_id), (5, ack.msg_id));
                break;
            }
            Body::Error(e) => panic!("recall failed: {:?}", e.code()),
            _ => continue,
        }
    }
    let got = entries(&mut b, 1, 1).await;
    assert_eq!(got[0].kind, proto::EntryKind::Recall as i32);
    assert_eq!(got[0].ref_msg_id, ack.msg_id);
    // Bob cannot recall Alice's message.
    b.send(proto::Recall {
        request_id: 6,
        msg_id: ack.msg_id,
        conversation: direct("alice"),
    })
    .await
    .unwrap();
    loop {
        if let Body::Error(e) = within(b.recv_frame()).await.unwrap() {
            assert_eq!((e.code(), e.request_id), (ErrorCode::NoSuchMessage, 6));
            break;
        }
    }
    server.stop().await;

    let server = TestServer::start_with(|c| c.recall_window_secs = 0).await;
    let mut a = login_synced(&server, "alice", "phone").await;
    a.send(send_to(direct("bob"), 1, "too late")).await.unwrap();
    let ack = await_ack(&mut a, 1).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    a.send(proto::Recall {
        request_id: 7,
        msg_id: ack.msg_id,
        conversation: direct("bob"),
    })
    .await
    .unwrap();
    loop {
        if let Body::Error(e) = within(a.recv_frame()).await.unwrap() {
            assert_eq!(
                (e.code(), e.request_id),
                (ErrorCode::RecallWindowExpired, 7)
            );
            break;
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn history_pages_backwards() {
    let server = TestServer::start().await;
    let mut a = login_synced(&server, "alice", "phone").await;
    for i in 1..=7 {
        a.send(send_to(direct("bob"), i, &format!("h{i}")))
            .await
            .unwrap();
        await_ack(&mut a, i).await;
    }
    let mut b = login_synced(&server, "bob", "phone").await;
    let mut before = 0;
    let mut seen = Vec::new();
    for (page, expect_more) in [(3, true), (3, true), (1, false)] {
        b.send(proto::History {
            request_id: page as u64,
            conversation: direct("alice"),
            before_msg_id: before,
            limit: 3,
        })
        .await
        .unwrap();
        let hp = loop {
            if let Body::HistoryPage(hp) = within(b.recv_frame()).await.unwrap() {
                break hp;
            }
        };
        assert_eq!(hp.entries.len(), page);
        assert_eq!(hp.has_more, expect_more);
        before = hp.entries.last().unwrap().msg_id;
        seen.extend(
            hp.entries
                .iter()
                .map(|e| String::from_utf8_lossy(&e.body).into_owned()),
        );
    }
    assert_eq!(seen, vec!["h7", "h6", "h5", "h4", "h3", "h2", "h1"]);
    server.stop().await;
}

#[tokio::test]
async fn sync_and_live_pushes_never_reorder() {
    let server = TestServer::start_with(|c| c.max_frames_per_sec = 100_000).await;
    let mut a = login_synced(&server, "alice", "phone").await;
    let total = 600u64;
    // Half the messages exist before Bob logs in; the rest arrive while his
    // login sync is streaming.
    for i in 1..=total / 2 {
        a.feed(send_to(direct("bob"), i, "m")).await.unwrap();
    }
    a.flush().await.unwrap();
    await_ack(&mut a, total / 2).await;
    let mut b = login_at(&server, "bob", "phone", 0).await;
    let sender = tokio::spawn(async move {
        for i in total / 2 + 1..=total {
            a.feed(send_to(direct("bob"), i, "m")).await.unwrap();
            if i % 50 == 0 {
                a.flush().await.unwrap();
            }
        }
        a.flush().await.unwrap();
        await_ack(&mut a, total).await;
        a
    });
    let got = entries(&mut b, 0, total as usize).await;
    assert_eq!(got.len(), total as usize);
    let _a = sender.await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn bad_requests_fail_alone() {
    let server = TestServer::start().await;
    let mut a = login_synced(&server, "alice", "phone").await;
    a.send(send_to(None, 1, "nowhere")).await.unwrap();
    let e = loop {
        if let Body::Error(e) = within(a.recv_frame()).await.unwrap() {
            break e;
        }
    };
    assert_eq!(
        (e.code(), e.client_msg_id, e.closing),
        (ErrorCode::InvalidRequest, 1, false)
    );
    a.send(send_to(direct("bob"), 0, "no id")).await.unwrap();
    let e = loop {
        if let Body::Error(e) = within(a.recv_frame()).await.unwrap() {
            break e;
        }
    };
    assert_eq!(e.code(), ErrorCode::InvalidRequest);
    a.send(send_to(direct("bob"), 2, "fine")).await.unwrap();
    await_ack(&mut a, 2).await;
    server.stop().await;
}

#[tokio::test]
async fn crash_safety_kill_9_loses_no_acked_message() {
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--max-frames-per-sec=100000"];
    let server = ServerProcess::start(dir.path(), &flags).await;
    let tokens = ferry_gateway::auth::TokenVerifier::new(TEST_SECRET.as_bytes());
    let mut a = Client::connect(server.addr).await.unwrap();
    within(a.authenticate(&tokens.mint("alice", None, 600), "phone", 0))
        .await
        .unwrap();
    let total = 1000u64;
    let mut acked = Vec::new();
    for chunk in (1..=total).collect::<Vec<_>>().chunks(100) {
        for i in chunk {
            a.feed(send_to(direct("bob"), *i, &format!("msg-{i}")))
                .await
                .unwrap();
        }
        a.flush().await.unwrap();
        for _ in chunk {
            loop {
                match within(a.recv_frame()).await.unwrap() {
                    Body::SendAck(ack) => {
                        acked.push(ack.client_msg_id);
                        break;
                    }
                    Body::Error(e) => panic!("send failed: {:?}", e.code()),
                    _ => continue,
                }
            }
        }
    }
    assert_eq!(acked.len(), total as usize);
    let mut server = server;
    server.signal(libc::SIGKILL);
    let _ = within(server.child.wait()).await;

    let server = ServerProcess::start(dir.path(), &flags).await;
    let mut b = Client::connect(server.addr).await.unwrap();
    within(b.authenticate(&tokens.mint("bob", None, 600), "phone", 0))
        .await
        .unwrap();
    let got = entries(&mut b, 0, total as usize).await;
    for (i, d) in got.iter().enumerate() {
        assert_eq!(
            d.body,
            Bytes::from(format!("msg-{}", i + 1)),
            "in send order"
        );
    }
    // And nothing more: a ping round trip shows no extra entry is pending.
    let nonce = 31337;
    b.send(proto::Ping { nonce }).await.unwrap();
    loop {
        match within(b.recv()).await.unwrap() {
            Some(Frame {
                body: Some(Body::Pong(p)),
            }) if p.nonce == nonce => break,
            Some(Frame {
                body: Some(Body::SyncBatch(sb)),
            }) => {
                assert!(sb.entries.is_empty(), "no entry beyond the 1000")
            }
            Some(other) => panic!("unexpected {}", other.kind_name()),
            None => panic!("closed"),
        }
    }
}
