//! The connection engine over real sockets: auth, heartbeat, sessions,
//! kicks, limits and shutdown. Every refusal is checked by its exact code,
//! and a bystander connection checks that nobody else noticed.

use std::time::Duration;

use ferry_e2e::*;
use ferry_gateway::auth::{Claims, TokenVerifier, unix_now};
use ferry_protocol::proto::{self, frame::Body};
use ferry_protocol::{ErrorCode, Frame};

fn auth_frame(token: String, device: &str) -> proto::Auth {
    proto::Auth {
        token,
        device_id: device.into(),
        protocol_version: ferry_protocol::PROTOCOL_VERSION as i32,
        last_seq: 0,
        skip_sync: true,
    }
}

#[tokio::test]
async fn auth_ok_reports_the_session_parameters() {
    let server = TestServer::start_with(|c| c.heartbeat_secs = 7).await;
    let mut client = server.connect().await;
    let ok = within(client.authenticate(&server.token("alice"), "phone", 0))
        .await
        .unwrap();
    assert_eq!(ok.user_id, "alice");
    assert_eq!(ok.device_id, "phone");
    assert_eq!(ok.heartbeat_secs, 7);
    assert_eq!(ok.max_frame_bytes, 65536);
    assert!(ok.server_time_ms > 0);
    assert_alive(&mut client).await;
    server.stop().await;
}

#[tokio::test]
async fn bad_tokens_are_refused_with_their_codes() {
    let server = TestServer::start().await;
    let mut bystander = server.login("carol", "phone").await;

    // Signed with another secret.
    let forged = TokenVerifier::new(b"some-other-secret-0123456789").mint("alice", None, 60);
    let mut c = server.connect().await;
    c.send(auth_frame(forged, "phone")).await.unwrap();
    expect_error_then_close(&mut c, ErrorCode::BadToken).await;

    // Expired.
    let expired = server.tokens.mint_claims(&Claims {
        sub: "alice".into(),
        exp: unix_now() - 600,
        iat: None,
        nbf: None,
        dev: None,
    });
    let mut c = server.connect().await;
    c.send(auth_frame(expired, "phone")).await.unwrap();
    expect_error_then_close(&mut c, ErrorCode::TokenExpired).await;

    // Not a JWT at all.
    let mut c = server.connect().await;
    c.send(auth_frame("garbage".into(), "phone")).await.unwrap();
    expect_error_then_close(&mut c, ErrorCode::BadToken).await;

    // Bound to another device.
    let bound = server.tokens.mint("alice", Some("tablet"), 60);
    let mut c = server.connect().await;
    c.send(auth_frame(bound, "phone")).await.unwrap();
    expect_error_then_close(&mut c, ErrorCode::BadToken).await;

    // Empty device id.
    let mut c = server.connect().await;
    c.send(auth_frame(server.token("alice"), "")).await.unwrap();
    expect_error_then_close(&mut c, ErrorCode::BadAuth).await;

    // Unsupported protocol version.
    let mut c = server.connect().await;
    let mut auth = auth_frame(server.token("alice"), "phone");
    auth.protocol_version = 99;
    c.send(auth).await.unwrap();
    expect_error_then_close(&mut c, ErrorCode::UnsupportedVersion).await;

    assert_alive(&mut bystander).await;
    server.stop().await;
}

#[tokio::test]
async fn first_frame_must_be_auth() {
    let server = TestServer::start().await;
    let mut c = server.connect().await;
    c.send(proto::Ping { nonce: 1 }).await.unwrap();
    expect_error_then_close(&mut c, ErrorCode::AuthRequired).await;
    server.stop().await;
}

#[tokio::test]
async fn silence_past_the_auth_timeout() {
    let server = TestServer::start_with(|c| c.auth_timeout_secs = 1).await;
    let mut bystander = server.login("carol", "phone").await;
    let mut c = server.connect().await;
    // Send nothing: the server must give up on its own.
    expect_error_then_close(&mut c, ErrorCode::AuthTimeout).await;
    assert_alive(&mut bystander).await;
    server.stop().await;
}

#[tokio::test]
async fn oversize_length_prefix_before_and_after_auth() {
    let server = TestServer::start_with(|c| c.max_frame_bytes = 2048).await;
    let mut bystander = server.login("carol", "phone").await;

    let mut c = server.connect().await;
    // Announce 1 GiB and send nothing more: refused from the header alone.
    c.send_raw(&(1u32 << 30).to_be_bytes()).await.unwrap();
    expect_error_then_close(&mut c, ErrorCode::FrameTooLarge).await;

    let mut c = server.login("alice", "phone").await;
    c.send_raw(&2049u32.to_be_bytes()).await.unwrap();
    expect_error_then_close(&mut c, ErrorCode::FrameTooLarge).await;

    assert_alive(&mut bystander).await;
    server.stop().await;
}

#[tokio::test]
async fn garbage_bytes_are_malformed() {
    let server = TestServer::start().await;
    let mut bystander = server.login("carol", "phone").await;
    let garbage: Vec<u8> = (0..64).map(|i| (i * 37 + 11) as u8 | 0x07).collect();
    let mut frame = (garbage.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&garbage);

    let mut c = server.connect().await;
    c.send_raw(&frame).await.unwrap();
    expect_error_then_close(&mut c, ErrorCode::MalformedFrame).await;

    let mut c = server.login("alice", "phone").await;
    c.send_raw(&frame).await.unwrap();
    expect_error_then_close(&mut c, ErrorCode::MalformedFrame).await;

    assert_alive(&mut bystander).await;
    server.stop().await;
}

#[tokio::test]
async fn ping_gets_pong_with_the_nonce() {
    let server = TestServer::start().await;
    let mut c = server.login("alice", "phone").await;
    c.send(proto::Ping { nonce: 424242 }).await.unwrap();
    loop {
        match within(c.recv()).await.unwrap() {
            // The login sync may come first.
            Some(Frame {
                body: Some(Body::SyncBatch(_)),
            }) => continue,
            Some(Frame {
                body: Some(Body::Pong(p)),
            }) => {
                assert_eq!(p.nonce, 424242);
                assert!(p.server_time_ms > 0);
                break;
            }
            other => panic!("expected Pong, got {other:?}"),
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn silent_connections_expire_and_pinging_ones_stay() {
    let server = TestServer::start_with(|c| c.heartbeat_secs = 1).await;
    // Before the silent client's last frame (its Auth) is sent.
    let started = std::time::Instant::now();
    let mut silent = server.login("alice", "phone").await;
    let mut pinging = server.login("bob", "phone").await;

    // The pinging client keeps talking once a second while the silent one
    // is expired by the wheel (3 × 1 s, on 1 s ticks).
    let keep_alive = async {
        for _ in 0..6 {
            assert_alive(&mut pinging).await;
            tokio::time::sleep(Duration::from_millis(900)).await;
        }
        pinging
    };
    let closed = async {
        expect_closed(&mut silent).await;
        started.elapsed()
    };
    let (silent_for, mut pinging) = tokio::join!(closed, keep_alive);
    // Never before 3 × heartbeat_secs of silence, at most about 1 s later.
    assert!(
        silent_for > Duration::from_secs(3),
        "closed too early: {silent_for:?}"
    );
    assert!(
        silent_for < Duration::from_secs(5),
        "closed too late: {silent_for:?}"
    );
    assert!(server.router.sessions().connections("alice").is_empty());
    assert_alive(&mut pinging).await;
    server.stop().await;
}

#[tokio::test]
async fn same_device_is_kicked_and_other_devices_coexist() {
    let server = TestServer::start().await;
    let mut phone = server.login("alice", "phone").await;
    let mut laptop = server.login("alice", "laptop").await;
    assert_eq!(server.router.sessions().connections("alice").len(), 2);

    let mut phone2 = server.login("alice", "phone").await;
    expect_error_then_close(&mut phone, ErrorCode::LoggedInElsewhere).await;
    assert_alive(&mut laptop).await;
    assert_alive(&mut phone2).await;
    assert_eq!(server.router.sessions().connections("alice").len(), 2);
    server.stop().await;
}

#[tokio::test]
async fn reconnect_race_new_connection_wins() {
    let server = TestServer::start().await;
    // The old connection is still open (not yet noticed dead) when the
    // device reconnects.
    let old = server.login("alice", "phone").await;
    let old_id = server.router.sessions().connections("alice")[0].id();
    let mut new = server.login("alice", "phone").await;
    // Now the old one's close arrives late.
    drop(old);
    // Wait for the server to process that close: its unregister finds the
    // new connection in the slot and leaves it alone.
    within(async {
        while server.router.sessions().stale_unregisters() < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert_alive(&mut new).await;
    let conns = server.router.sessions().connections("alice");
    assert_eq!(conns.len(), 1, "exactly one registered connection");
    assert_ne!(conns[0].id(), old_id, "the new connection is registered");

    // And it receives what is delivered to the user.
    conns[0]
        .push(Frame::from(proto::Typing {
            conversation: None,
            typing: true,
            from: "bob".into(),
        }))
        .unwrap();
    loop {
        match within(new.recv_frame()).await.unwrap() {
            Body::SyncBatch(_) => continue,
            Body::Typing(t) => break assert_eq!(t.from, "bob"),
            other => panic!("expected Typing, got {}", other.kind_name()),
        }
    }
    // A little later still nothing has unregistered it.
    for _ in 0..3 {
        assert_alive(&mut new).await;
    }
    assert_eq!(server.router.sessions().connections("alice").len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn flooding_gets_rate_limited() {
    let server = TestServer::start_with(|c| c.max_frames_per_sec = 20).await;
    let mut bystander = server.login("carol", "phone").await;
    let mut c = server.login("alice", "phone").await;
    for i in 0..200 {
        c.feed(proto::Ping { nonce: i }).await.unwrap();
    }
    c.flush().await.unwrap();
    expect_error_then_close(&mut c, ErrorCode::RateLimited).await;
    assert_alive(&mut bystander).await;
    server.stop().await;
}

#[tokio::test]
async fn connection_limit_refuses_the_extra_one() {
    let server = TestServer::start_with(|c| c.max_connections = 2).await;
    let mut a = server.login("alice", "phone").await;
    let mut b = server.login("bob", "phone").await;
    let mut c = server.connect().await;
    expect_error_then_close(&mut c, ErrorCode::TooManyConnections).await;
    assert_alive(&mut a).await;
    assert_alive(&mut b).await;
    // A slot frees up when someone leaves.
    drop(a);
    let mut retry = server.login_once_a_slot_frees("dave", "phone").await;
    assert_alive(&mut retry).await;
    server.stop().await;
}

#[tokio::test]
async fn server_only_frames_from_a_client_are_refused_but_not_fatal() {
    let server = TestServer::start().await;
    let mut c = server.login("alice", "phone").await;
    c.send(proto::Pong::default()).await.unwrap();
    assert_eq!(next_error_code(&mut c).await, ErrorCode::UnexpectedFrame);
    c.send(Frame { body: None }).await.unwrap();
    assert_eq!(next_error_code(&mut c).await, ErrorCode::UnexpectedFrame);
    assert_alive(&mut c).await;
    server.stop().await;
}

#[tokio::test]
async fn sigterm_kicks_everyone_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(dir.path(), &[]).await;
    let tokens = TokenVerifier::new(TEST_SECRET.as_bytes());
    let mut clients = Vec::new();
    for i in 0..5 {
        let mut c = ferry_protocol::client::Client::connect(server.addr)
            .await
            .unwrap();
        within(c.authenticate(&tokens.mint(&format!("u{i}"), None, 60), "d", 0))
            .await
            .unwrap();
        clients.push(c);
    }
    server.signal(libc::SIGTERM);
    for c in &mut clients {
        expect_error_then_close(c, ErrorCode::ShuttingDown).await;
    }
    let status = within(server.child.wait()).await.unwrap();
    assert!(status.success(), "exit status {status:?}");
}

/// Issue #9: login reads the inbox's max seq before it registers, so an
/// older connection whose login finished later used to replace the newer
/// one and kick it with LOGGED_IN_ELSEWHERE. Connection ids are taken after
/// auth, in order: here the older connection's id is taken before the real
/// client authenticates, and its login completes afterwards.
#[tokio::test]
async fn a_stale_login_that_finishes_late_does_not_kick_the_newer_connection() {
    let server = TestServer::start().await;
    let sessions = server.router.sessions();
    let older = ferry_router::session::Conn::new(
        sessions.next_conn_id(),
        "alice".into(),
        "phone".into(),
        64,
    );
    let mut newer = server.login("alice", "phone").await;
    server
        .router
        .login(&older, proto::AuthOk::default(), 0, true)
        .await
        .unwrap();
    assert!(older.is_closing(), "the late, older connection is kicked");
    let last = older.drain(usize::MAX).await.frames().last();
    match last {
        Some(ferry_router::session::Outgoing::Frame(Frame {
            body: Some(Body::Kick(k)),
        })) => assert_eq!(k.reason(), ErrorCode::LoggedInElsewhere),
        other => panic!("expected a Kick, got {other:?}"),
    }
    assert_eq!(sessions.superseded(), 1);
    // The newer one stays registered and served.
    assert_alive(&mut newer).await;
    let conns = sessions.connections("alice");
    assert_eq!(conns.len(), 1);
    assert_ne!(conns[0].id(), older.id());
    server.stop().await;
}

/// Issue #7: the Auth frame may be at most MAX_AUTH_FRAME_BYTES whatever
/// the frame size, refused from its length prefix before it is buffered.
#[tokio::test]
async fn an_auth_frame_over_the_auth_limit_is_refused_from_its_prefix() {
    let server = TestServer::start().await;
    let max = ferry_protocol::limits::MAX_AUTH_FRAME_BYTES as u32;
    let mut c = server.connect().await;
    c.send_raw(&(max + 1).to_be_bytes()).await.unwrap();
    expect_error_then_close(&mut c, ErrorCode::FrameTooLarge).await;
    // An ordinary Auth is far below it.
    let mut ok = server.login("alice", "phone").await;
    assert_alive(&mut ok).await;
    server.stop().await;
}

/// Issue #7: sockets that never authenticate may hold at most
/// `max_pending_auth` places; beyond that new sockets are refused while
/// authenticated users keep their connections, and a place frees up when a
/// pending connection authenticates.
#[tokio::test]
async fn pending_auth_connections_are_bounded_separately() {
    let server = TestServer::start_with(|c| {
        c.max_pending_auth = 2;
        c.max_connections = 100;
    })
    .await;
    let mut carol = server.login("carol", "phone").await;
    let mut idle1 = server.connect().await;
    let _idle2 = server.connect().await;
    let mut refused = server.connect().await;
    expect_error_then_close(&mut refused, ErrorCode::TooManyConnections).await;
    assert_alive(&mut carol).await;
    // One pending connection authenticates: its place is free again.
    within(idle1.authenticate(&server.token("alice"), "phone", 0))
        .await
        .unwrap();
    let mut dave = server.login_once_a_slot_frees("dave", "phone").await;
    assert_alive(&mut dave).await;
    assert_alive(&mut idle1).await;
    server.stop().await;
}

/// Issue #16: a frame size below MIN_MAX_FRAME_BYTES leaves no room for a
/// Send's content; `ferry serve` refuses it at start with a clear message.
#[tokio::test]
async fn a_frame_size_below_the_minimum_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let output = tokio::process::Command::new(ferry_binary())
        .arg("serve")
        .arg("--listen=127.0.0.1:0")
        .arg("--http-listen=127.0.0.1:0")
        .arg(format!("--data-dir={}", dir.path().display()))
        .arg("--max-frame-bytes=1023")
        .output();
    let output = within(output).await.unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("max_frame_bytes must be in 2048..=16777216"),
        "{stderr}"
    );
}
