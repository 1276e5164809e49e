//! Size limits on client- and backend-supplied strings, and entries that
//! cannot wedge a device: what a hostile or unlucky user sends is refused
//! at the edge, and a stored entry too large for a frame (stored under a
//! larger `max_frame_bytes`) goes out as an `OMITTED` placeholder instead
//! of closing the connection on every login.

use std::sync::Arc;

use bytes::Bytes;
use ferry_e2e::*;
use ferry_protocol::ErrorCode;
use ferry_protocol::client::Client;
use ferry_protocol::proto::{self, frame::Body, group_request::Op as GroupOp};

fn direct(id: &str) -> Option<proto::Conversation> {
    Some(proto::Conversation {
        kind: proto::ConversationKind::Direct as i32,
        id: id.into(),
    })
}

fn send_to(to: &str, cid: u64, body: Vec<u8>) -> proto::Send {
    proto::Send {
        client_msg_id: cid,
        to: direct(to),
        content_type: "text/plain".into(),
        body: Bytes::from(body),
    }
}

/// Reads until the `Error`, skipping the login sync and live entries.
async fn next_error(client: &mut Client) -> proto::Error {
    loop {
        match within(client.recv_frame()).await.expect("recv") {
            Body::Error(e) => return e,
            Body::SyncBatch(_) | Body::Deliver(_) => continue,
            other => panic!("expected an error, got {}", other.kind_name()),
        }
    }
}

/// Logs in at `last_seq` and returns the login sync's entries.
async fn login_sync(
    server: &TestServer,
    user: &str,
    last_seq: u64,
) -> (Client, Vec<proto::Deliver>) {
    let mut c = server.connect().await;
    within(c.authenticate(&server.token(user), "phone", last_seq))
        .await
        .expect("auth");
    let mut entries = Vec::new();
    loop {
        match within(c.recv_frame()).await.expect("login sync") {
            Body::SyncBatch(b) => {
                assert_eq!(b.request_id, 0);
                entries.extend(b.entries);
                if !b.has_more {
                    return (c, entries);
                }
            }
            Body::Error(e) => panic!("login sync failed: {:?} {}", e.code(), e.message),
            other => panic!("unexpected {}", other.kind_name()),
        }
    }
}

fn group_request(request_id: u64, op: GroupOp) -> proto::GroupRequest {
    proto::GroupRequest {
        request_id,
        op: Some(op),
    }
}

#[tokio::test]
async fn a_group_name_over_the_limit_is_refused_and_wedges_nobody() {
    // Small frames: on a server without the name cap the CREATED event
    // (name + ids) no longer fits in a frame, and every member's login
    // closed with INTERNAL.
    let server = TestServer::start_with(|c| c.max_frame_bytes = 4096).await;
    let (mut alice, _) = login_sync(&server, "alice", 0).await;
    let create = GroupOp::Create(proto::CreateGroup {
        group_id: "g".into(),
        name: "n".repeat(4000),
        members: vec!["bob".into()],
    });
    alice.send(group_request(41, create)).await.unwrap();
    let e = next_error(&mut alice).await;
    assert_eq!(e.code(), ErrorCode::InvalidRequest);
    assert_eq!(e.request_id, 41);
    assert!(!e.closing);
    assert!(
        e.message.contains("name") && e.message.contains("256"),
        "{}",
        e.message
    );
    assert_alive(&mut alice).await;
    // Nothing was stored: bob's login sync completes, empty.
    let (mut bob, entries) = login_sync(&server, "bob", 0).await;
    assert!(entries.is_empty());
    assert_alive(&mut bob).await;
    server.stop().await;
}

#[tokio::test]
async fn a_65_kb_group_name_is_refused_with_the_default_frame_size() {
    let server = TestServer::start().await;
    let (mut alice, _) = login_sync(&server, "alice", 0).await;
    let create = GroupOp::Create(proto::CreateGroup {
        group_id: String::new(),
        name: "n".repeat(65_000),
        members: vec!["bob".into()],
    });
    alice.send(group_request(5, create)).await.unwrap();
    let e = next_error(&mut alice).await;
    assert_eq!((e.code(), e.request_id), (ErrorCode::InvalidRequest, 5));
    let (mut bob, entries) = login_sync(&server, "bob", 0).await;
    assert!(entries.is_empty(), "no group was created");
    assert_alive(&mut bob).await;
    server.stop().await;
}

#[tokio::test]
async fn an_overlong_list_members_group_id_is_invalid_request() {
    let server = TestServer::start().await;
    let (mut alice, _) = login_sync(&server, "alice", 0).await;
    let list = GroupOp::ListMembers(proto::ListMembers {
        group_id: "g".repeat(300),
        after_user_id: String::new(),
        limit: 0,
    });
    alice.send(group_request(9, list)).await.unwrap();
    let e = next_error(&mut alice).await;
    assert_eq!((e.code(), e.request_id), (ErrorCode::InvalidRequest, 9));
    assert!(e.message.contains("group_id"), "{}", e.message);
    // A cursor over the id limit too.
    let list = GroupOp::ListMembers(proto::ListMembers {
        group_id: "g".into(),
        after_user_id: "u".repeat(65),
        limit: 0,
    });
    alice.send(group_request(10, list)).await.unwrap();
    let e = next_error(&mut alice).await;
    assert_eq!((e.code(), e.request_id), (ErrorCode::InvalidRequest, 10));
    assert!(e.message.contains("after_user_id"), "{}", e.message);
    // And every other op's ids.
    let set_role = GroupOp::SetRole(proto::SetRole {
        group_id: "g".into(),
        user_id: "u".repeat(65),
        role: proto::GroupRole::Admin as i32,
    });
    alice.send(group_request(11, set_role)).await.unwrap();
    let e = next_error(&mut alice).await;
    assert_eq!((e.code(), e.request_id), (ErrorCode::InvalidRequest, 11));
    assert!(e.message.contains("user_id"), "{}", e.message);
    assert_alive(&mut alice).await;
    server.stop().await;
}

#[tokio::test]
async fn an_overlong_content_type_is_refused_with_its_client_msg_id() {
    let server = TestServer::start().await;
    let (mut alice, _) = login_sync(&server, "alice", 0).await;
    let mut send = send_to("bob", 77, b"hi".to_vec());
    send.content_type = "t".repeat(129);
    alice.send(send).await.unwrap();
    let e = next_error(&mut alice).await;
    assert_eq!((e.code(), e.client_msg_id), (ErrorCode::InvalidRequest, 77));
    assert!(e.message.contains("content_type"), "{}", e.message);
    // An empty content type is valid.
    let mut send = send_to("bob", 78, b"hi".to_vec());
    send.content_type.clear();
    alice.send(send).await.unwrap();
    await_ack(&mut alice, 78).await;
    server.stop().await;
}

#[tokio::test]
async fn admin_inputs_over_their_limits_get_400() {
    let server = TestServer::start().await;
    let (mut bob, _) = login_sync(&server, "bob", 0).await;
    let long = "m".repeat(257);
    let r = admin(
        server.http,
        "POST",
        "/admin/users/bob/kick",
        Some(&format!(r#"{{"message":"{long}"}}"#)),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("message"), "{}", r.body);
    assert_alive(&mut bob).await;
    let name = "n".repeat(300);
    let r = admin(
        server.http,
        "POST",
        "/admin/groups",
        Some(&format!(r#"{{"owner":"alice","name":"{name}"}}"#)),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    let r = admin(
        server.http,
        "POST",
        "/admin/users/bob/messages",
        Some(&format!(
            r#"{{"text":"hi","content_type":"{}"}}"#,
            "t".repeat(129)
        )),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    let r = admin(
        server.http,
        "GET",
        &format!("/admin/groups/g/members?after={}", "u".repeat(65)),
        None,
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    server.stop().await;
}

#[tokio::test]
async fn an_entry_too_large_for_the_frame_size_is_sent_as_omitted() {
    // Store a 20 KB message under 64 KiB frames...
    let server = TestServer::start().await;
    let dir: Arc<tempfile::TempDir> = server.dir.clone();
    let (mut alice, _) = login_sync(&server, "alice", 0).await;
    alice
        .send(send_to("bob", 1, vec![b'x'; 20_000]))
        .await
        .unwrap();
    let big = await_ack(&mut alice, 1).await;
    alice
        .send(send_to("bob", 2, b"after".to_vec()))
        .await
        .unwrap();
    let small = await_ack(&mut alice, 2).await;
    drop(alice);
    server.stop().await;
    // ...then restart the same data dir with 4 KiB frames.
    let mut config = test_config(dir.path());
    config.max_frame_bytes = 4096;
    let server = TestServer::start_in(config, dir).await;

    // The login sync completes: a placeholder at the big entry's seq, then
    // the entries after it.
    let (mut bob, entries) = login_sync(&server, "bob", 0).await;
    assert_eq!(entries.len(), 2, "{entries:?}");
    let omitted = &entries[0];
    assert_eq!(omitted.seq, 1);
    assert_eq!(omitted.kind(), proto::EntryKind::Omitted);
    assert_eq!(omitted.msg_id, big.msg_id);
    assert_eq!(omitted.from, "alice");
    assert_eq!(omitted.conversation, direct("alice"));
    assert_eq!(omitted.server_time_ms, big.server_time_ms);
    assert!(omitted.body.is_empty() && omitted.content_type.is_empty());
    assert_eq!(entries[1].seq, 2);
    assert_eq!(entries[1].msg_id, small.msg_id);
    assert_eq!(entries[1].body, Bytes::from_static(b"after"));

    // An explicit Sync degrades the same way and answers its request id.
    bob.send(proto::Sync {
        request_id: 8,
        after_seq: 0,
        limit: 0,
    })
    .await
    .unwrap();
    let batch = loop {
        match within(bob.recv_frame()).await.unwrap() {
            Body::SyncBatch(b) => break b,
            Body::Error(e) => panic!("sync failed: {:?} {}", e.code(), e.message),
            _ => continue,
        }
    };
    assert_eq!(batch.request_id, 8);
    assert!(!batch.has_more);
    let kinds: Vec<_> = batch.entries.iter().map(|e| (e.seq, e.kind())).collect();
    assert_eq!(
        kinds,
        [
            (1, proto::EntryKind::Omitted),
            (2, proto::EntryKind::Message)
        ]
    );

    // So does History.
    bob.send(proto::History {
        request_id: 9,
        conversation: direct("alice"),
        before_msg_id: 0,
        limit: 0,
    })
    .await
    .unwrap();
    let page = loop {
        match within(bob.recv_frame()).await.unwrap() {
            Body::HistoryPage(p) => break p,
            Body::Error(e) => panic!("history failed: {:?} {}", e.code(), e.message),
            _ => continue,
        }
    };
    let kinds: Vec<_> = page.entries.iter().map(|e| (e.msg_id, e.kind())).collect();
    assert_eq!(
        kinds,
        [
            (small.msg_id, proto::EntryKind::Message),
            (big.msg_id, proto::EntryKind::Omitted)
        ]
    );
    assert_alive(&mut bob).await;

    // The sender's own copy, synced on its device, keeps its client_msg_id.
    let (_alice, entries) = login_sync(&server, "alice", 0).await;
    assert_eq!(entries[0].kind(), proto::EntryKind::Omitted);
    assert_eq!(entries[0].client_msg_id, 1);
    server.stop().await;
}
