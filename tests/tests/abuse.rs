//! Abuse limits: connections and new connections per second per source
//! address, failed logins per address, the slowloris bound on a begun
//! frame, and the admin API's body cap. Loopback is exempt by default, so
//! the tests that exercise the per-address limits turn `limit_loopback` on.

use std::time::Duration;

use ferry_e2e::*;
use ferry_gateway::config::Config;
use ferry_protocol::ErrorCode;
use ferry_protocol::client::ClientError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn limited(config: &mut Config) {
    config.limit_loopback = true;
}

/// Authenticates `user` on a fresh connection, returning the refusal code
/// if the server refuses it (at accept or at auth).
async fn try_login(
    server: &TestServer,
    user: &str,
) -> Result<ferry_protocol::client::Client, ErrorCode> {
    let mut client = server.connect().await;
    match within(client.authenticate(&server.token(user), "phone", 0)).await {
        Ok(_) => Ok(client),
        Err(ClientError::Rejected(e)) => Err(e.code()),
        Err(e) => panic!("login of {user}: {e}"),
    }
}

#[tokio::test]
async fn connections_per_address_are_capped_with_too_many_connections() {
    let server = TestServer::start_with(|c| {
        limited(c);
        c.max_connections_per_ip = 2;
    })
    .await;
    let a = try_login(&server, "a").await.expect("first");
    let mut b = try_login(&server, "b").await.expect("second");
    assert_eq!(
        try_login(&server, "c").await.err(),
        Some(ErrorCode::TooManyConnections)
    );
    // Closing one gives its place back (once the server has cleaned up).
    drop(a);
    within(async {
        loop {
            match try_login(&server, "c").await {
                Ok(_) => break,
                Err(code) => assert_eq!(code, ErrorCode::TooManyConnections),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_alive(&mut b).await;
    server.stop().await;
}

#[tokio::test]
async fn new_connections_per_second_per_address_are_rate_limited() {
    let server = TestServer::start_with(|c| {
        limited(c);
        c.max_connects_per_sec_per_ip = 3;
    })
    .await;
    // A burst of 10 in a few milliseconds spans at most two seconds of the
    // server's clock: at most 6 get in, and the rest hear RATE_LIMITED.
    let mut admitted = Vec::new();
    let mut refused = 0;
    for i in 0..10 {
        match try_login(&server, &format!("u{i}")).await {
            Ok(c) => admitted.push(c),
            Err(code) => {
                assert_eq!(code, ErrorCode::RateLimited);
                refused += 1;
            }
        }
    }
    assert!(
        admitted.len() >= 3 && admitted.len() <= 6,
        "{}",
        admitted.len()
    );
    assert_eq!(refused, 10 - admitted.len());
    for c in &mut admitted {
        assert_alive(c).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn failed_logins_from_one_address_are_throttled() {
    let server = TestServer::start_with(|c| {
        limited(c);
        c.max_auth_failures_per_min_per_ip = 3;
    })
    .await;
    for _ in 0..3 {
        let mut c = server.connect().await;
        let e = within(c.authenticate("not.a.token", "phone", 0))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::BadToken));
    }
    // Now even a good token from that address waits for the next minute.
    assert_eq!(
        try_login(&server, "alice").await.err(),
        Some(ErrorCode::RateLimited)
    );
    server.stop().await;
}

#[tokio::test]
async fn loopback_clients_are_exempt_by_default() {
    let server = TestServer::start_with(|c| {
        c.max_connections_per_ip = 2;
        c.max_connects_per_sec_per_ip = 2;
        c.max_auth_failures_per_min_per_ip = 1;
    })
    .await;
    let mut held = Vec::new();
    for i in 0..20 {
        held.push(try_login(&server, &format!("u{i}")).await.expect("exempt"));
    }
    for _ in 0..3 {
        let mut c = server.connect().await;
        assert!(within(c.authenticate("bad", "phone", 0)).await.is_err());
    }
    try_login(&server, "late").await.expect("exempt");
    server.stop().await;
}

#[tokio::test]
async fn a_frame_whose_body_trickles_is_closed_after_the_read_timeout() {
    let server = TestServer::start_with(|c| {
        c.frame_read_timeout_secs = 1;
    })
    .await;
    let mut idle = server.login("idle", "phone").await;
    let mut slow = server.login("slow", "phone").await;
    // A length prefix for 100 bytes, then 10 of them, then nothing.
    let mut partial = vec![0, 0, 0, 100];
    partial.extend_from_slice(&[0x42; 10]);
    slow.send_raw(&partial).await.unwrap();
    expect_error_then_close(&mut slow, ErrorCode::FrameTimeout).await;
    // An idle connection with nothing half-sent is not affected.
    assert_alive(&mut idle).await;
    server.stop().await;
}

/// One raw HTTP/1.1 request; the status code of the answer.
async fn raw_http(addr: std::net::SocketAddr, request: &[u8]) -> u16 {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut head = vec![0u8; 12];
    within(stream.read_exact(&mut head)).await.unwrap();
    let text = String::from_utf8_lossy(&head).into_owned();
    text[9..12]
        .parse()
        .unwrap_or_else(|_| panic!("status line {text}"))
}

#[tokio::test]
async fn admin_request_bodies_are_capped_with_413() {
    let server = TestServer::start_with(|c| {
        c.admin_max_body_bytes = Some(4096);
    })
    .await;
    let auth = format!("Bearer {TEST_ADMIN_TOKEN}");
    // Over the cap, declared: refused whole.
    let big = format!(
        r#"{{"group_id": "g1", "owner": "alice", "name": "{}"}}"#,
        "x".repeat(8000)
    );
    let r = http(
        server.http,
        "POST",
        "/admin/groups",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        Some(&big),
    )
    .await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["code"], "too_large");
    // A huge declared length is refused before a byte of it is read (the
    // server would otherwise wait for it).
    let request = format!(
        "POST /admin/groups HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n{{"
    );
    assert_eq!(raw_http(server.http, request.as_bytes()).await, 413);
    // Chunked, with no length: cut at the cap.
    let chunk = "y".repeat(3000);
    let mut request = format!(
        "POST /admin/groups HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    for _ in 0..3 {
        request.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
    }
    request.push_str("0\r\n\r\n");
    assert_eq!(raw_http(server.http, request.as_bytes()).await, 413);
    // Under the cap, the call goes through.
    let r = admin(
        server.http,
        "POST",
        "/admin/groups",
        Some(r#"{"group_id": "g1", "owner": "alice"}"#),
    )
    .await;
    assert!(r.status < 300, "{} {}", r.status, r.body);
    server.stop().await;
}
