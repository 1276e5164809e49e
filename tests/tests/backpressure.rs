//! Per-connection bounds and back-pressure over real sockets: a client that
//! reads is never cut off however much it pipelines, a client that does not
//! read is held to the byte bound, a slow link is fed as fast as it reads,
//! and Typing cannot be used to get someone else disconnected.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ferry_e2e::*;
use ferry_protocol::proto::{self, frame::Body};
use ferry_protocol::{Frame, FrameCodec};
use ferry_router::session::Conn;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn direct(id: &str) -> Option<proto::Conversation> {
    Some(proto::Conversation {
        kind: proto::ConversationKind::Direct as i32,
        id: id.into(),
    })
}

fn send(to: &str, cid: u64, body_len: usize) -> proto::Send {
    proto::Send {
        client_msg_id: cid,
        to: direct(to),
        content_type: "application/octet-stream".into(),
        body: Bytes::from(vec![b'x'; body_len]),
    }
}

/// The server's connection of `user` once it is registered.
async fn registered(server: &TestServer, user: &str) -> Arc<Conn> {
    within(async {
        loop {
            if let Some(conn) = server.router.sessions().connections(user).pop() {
                return conn;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

/// Issue #15: each Send produces a SendAck and the sender's own copy, so a
/// client pipelining ~512 Sends used to overflow the 1,024-frame queue and
/// be cut off with SLOW_CONSUMER while reading all the time (here at a
/// phone's pace, a few thousand frames a second). Now the server stops
/// reading instead: all 2,000 are acknowledged.
#[tokio::test]
async fn a_client_that_reads_is_never_cut_off_however_much_it_pipelines() {
    const SENDS: u64 = 2000;
    let server = TestServer::start_with(|c| c.max_frames_per_sec = 1_000_000).await;
    let client = server.login("alice", "phone").await;
    let (mut reader, mut writer) = client.split();
    let sending = tokio::spawn(async move {
        for cid in 1..=SENDS {
            writer.feed(send("bob", cid, 512)).await.expect("feed");
        }
        writer.flush().await.expect("flush");
        writer
    });
    let mut acked = 0;
    let mut frames = 0u64;
    let reading = async {
        while acked < SENDS {
            let frame = reader.recv().await.expect("recv").expect("not closed");
            frames += 1;
            if frames.is_multiple_of(4) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            match frame.body {
                Some(Body::SendAck(_)) => acked += 1,
                Some(Body::Error(e)) => {
                    panic!("after {acked} acks: {:?} {}", e.code(), e.message)
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), reading)
        .await
        .expect("all acks within 60 s");
    let _writer = within(sending).await.unwrap();
    assert_eq!(acked, SENDS);
    server.stop().await;
}

/// Issue #3: a client that sends itself large messages and never reads
/// used to make the server hold up to 1,024 of them per connection. Now the
/// server stops reading it at half the byte bound, its queue never exceeds
/// the bound, and nobody else notices.
#[tokio::test]
async fn a_client_that_does_not_read_is_held_to_the_byte_bound() {
    const BOUND: u32 = 256 * 1024;
    let server = TestServer::start_with(|c| {
        c.write_queue_bytes = BOUND;
        c.max_frames_per_sec = 1_000_000;
    })
    .await;
    let mut carol = server.login("carol", "phone").await;
    let mut dave = server.login("dave", "phone").await;
    let mut mallory = server.connect_small_window(16 * 1024).await;
    within(mallory.authenticate(&server.token("mallory"), "phone", 0))
        .await
        .unwrap();
    let conn = registered(&server, "mallory").await;
    // 400 × 60 KB = 24 MB to herself, far beyond what socket buffers hold.
    let (mallory_reader, mut mallory_writer) = mallory.split();
    let flood = tokio::spawn(async move {
        for cid in 1..=400 {
            if mallory_writer
                .send(send("mallory", cid, 60_000))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    // The server fills her queue up to the back-pressure level and then
    // stops reading her.
    within(async {
        while conn.queued_bytes() < BOUND as usize / 4 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    // Meanwhile everyone else is served.
    carol.send(send("dave", 1, 100)).await.unwrap();
    loop {
        match within(dave.recv_frame()).await.unwrap() {
            Body::Deliver(d) if d.from == "carol" => break,
            Body::Error(e) => panic!("{:?}", e.code()),
            _ => continue,
        }
    }
    assert_alive(&mut carol).await;
    // Her sends are stalled (the server reads nothing more from her), not
    // buffered in the server's memory.
    assert!(!flood.is_finished(), "the server must stop reading her");
    assert!(
        conn.peak_queued_bytes() <= BOUND as usize,
        "queued {} bytes, bound {BOUND}",
        conn.peak_queued_bytes()
    );
    assert!(
        !conn.is_closing(),
        "her own replies never overflow her queue"
    );
    flood.abort();
    let _ = flood.await;
    drop(mallory_reader);
    server.stop().await;
}

/// Issue #10: the write timeout used to cover a whole drained batch, so a
/// slow link receiving a large sync was cut after 10 s however steadily it
/// read. Now only a write that makes no progress times out: a client reading
/// 64 KiB every 50 ms gets an 8 MB sync with a 1 s write timeout (the
/// kernel's socket buffers, up to 4 MB here, hide smaller ones).
#[tokio::test]
async fn a_slow_but_steady_reader_gets_a_sync_larger_than_the_write_timeout() {
    const MESSAGES: u64 = 400;
    const BODY: usize = 20_000;
    let server = TestServer::start_with(|c| {
        c.write_timeout_secs = 1;
        c.max_frames_per_sec = 1_000_000;
    })
    .await;
    // Alice's inbox: 8 MB while she is offline. Bob reads while he sends
    // (his own copies come back to him).
    let (mut bob_reader, mut bob_writer) = server.login("bob", "phone").await.split();
    let sending = tokio::spawn(async move {
        for cid in 1..=MESSAGES {
            bob_writer.feed(send("alice", cid, BODY)).await.unwrap();
        }
        bob_writer.flush().await.unwrap();
        bob_writer
    });
    let mut acks = 0;
    while acks < MESSAGES {
        let frame = within(bob_reader.recv())
            .await
            .unwrap()
            .expect("bob connected");
        if let Some(Body::SendAck(_)) = frame.body {
            acks += 1;
        }
    }
    let _bob_writer = within(sending).await.unwrap();

    // Alice logs in with a small window and reads slowly through the sync.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    let mut stream = socket.connect(server.addr).await.unwrap();
    let codec = FrameCodec::default();
    let mut out = BytesMut::new();
    let auth = Frame::from(proto::Auth {
        token: server.token("alice"),
        device_id: "phone".into(),
        protocol_version: ferry_protocol::PROTOCOL_VERSION as i32,
        last_seq: 0,
        skip_sync: false,
    });
    codec.encode_frame(&auth, &mut out).unwrap();
    stream.write_all(&out).await.unwrap();
    let mut buf = BytesMut::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut entries = 0;
    let started = std::time::Instant::now();
    while entries < MESSAGES {
        let n = within(stream.read(&mut chunk)).await.unwrap();
        assert!(
            n > 0,
            "disconnected after {entries} entries, {:?}",
            started.elapsed()
        );
        buf.extend_from_slice(&chunk[..n]);
        while let Some(raw) = codec.decode_raw(&mut buf).unwrap() {
            match Frame::decode(raw).unwrap().body {
                Some(Body::SyncBatch(batch)) => entries += batch.entries.len() as u64,
                Some(Body::Error(e)) => panic!("{:?} {}", e.code(), e.message),
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        started.elapsed() > Duration::from_secs(1),
        "the sync must outlast the write timeout to prove anything"
    );
    server.stop().await;
}

/// Issue #5: Typing frames used to fill a victim's queue, and the next real
/// message then closed the victim with SLOW_CONSUMER. Now a sender's Typing
/// is rate-limited and best-effort frames use only a share of the queue, not
/// counted against real frames: a flood never gets the victim closed, and
/// the next message arrives.
#[tokio::test]
async fn a_typing_flood_never_gets_the_victim_disconnected() {
    let server = TestServer::start_with(|c| {
        c.write_queue_frames = 64;
        c.max_frames_per_sec = 1_000_000;
    })
    .await;
    // The victim does not read for now, through a small window.
    let mut victim = server.connect_small_window(4 * 1024).await;
    within(victim.authenticate(&server.token("victim"), "phone", 0))
        .await
        .unwrap();
    let conn = registered(&server, "victim").await;
    // Bob's messages fill the victim's socket buffers until the server's
    // queue for the victim starts holding frames (a phone in a tunnel).
    let mut bob = server.login("bob", "phone").await;
    let mut cid = 0;
    within(async {
        while conn.queued() == 0 {
            cid += 1;
            bob.send(send("victim", cid, 20_000)).await.unwrap();
            loop {
                match bob.recv_frame().await.unwrap() {
                    Body::SendAck(_) => break,
                    Body::Error(e) => panic!("{:?}", e.code()),
                    _ => continue,
                }
            }
            // Give the victim's writer the moment it needs to hand the
            // entry to the socket, if the socket takes it.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let mut attacker = server.login("mallory", "phone").await;
    for _ in 0..20_000 {
        attacker
            .feed(proto::Typing {
                conversation: direct("victim"),
                typing: true,
                from: String::new(),
            })
            .await
            .unwrap();
    }
    attacker.flush().await.unwrap();
    // Frames are handled in order: once the Pong is back, every Typing was.
    assert_alive(&mut attacker).await;
    assert!(!conn.is_closing(), "typing alone must not close the victim");

    cid += 1;
    bob.send(send("victim", cid, 100)).await.unwrap();
    loop {
        if let Body::SendAck(_) = within(bob.recv_frame()).await.unwrap() {
            break;
        }
    }
    assert!(
        !conn.is_closing(),
        "a real message after the flood is queued"
    );
    // Now the victim reads: every message of bob's is there, and no error.
    let mut from_bob = 0;
    while from_bob < cid {
        match within(victim.recv_frame())
            .await
            .expect("victim still connected")
        {
            Body::Deliver(d) if d.from == "bob" => from_bob += 1,
            Body::Error(e) => panic!("victim got {:?}: {}", e.code(), e.message),
            Body::Typing(_) | Body::SyncBatch(_) => continue,
            other => panic!("unexpected {}", other.kind_name()),
        }
    }
    assert_alive(&mut victim).await;
    server.stop().await;
}
