//! The TLS client port of a real `ferry` process: clients authenticate and
//! exchange messages inside TLS; plaintext clients and bad handshakes on
//! the TLS port are counted and closed; SIGHUP swaps the certificate while
//! open connections keep working. Certificates are made here with rcgen.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use ferry_e2e::tls::TestCa;
use ferry_e2e::{
    ServerProcess, TEST_SECRET, WAIT, assert_alive, await_ack, expect_closed, ferry_binary, http,
    within,
};
use ferry_gateway::auth::TokenVerifier;
use ferry_protocol::ErrorCode;
use ferry_protocol::client::{Client, ClientError, Transport};
use ferry_protocol::proto::{self, frame::Body};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

fn token(user: &str) -> String {
    TokenVerifier::new(TEST_SECRET.as_bytes()).mint(user, None, 3600)
}

/// Connects over `transport` and logs `user` in.
async fn login(addr: SocketAddr, transport: &Transport, user: &str) -> Client {
    let mut client = within(Client::connect_via(&addr.to_string(), transport))
        .await
        .expect("connect");
    let ok = within(client.authenticate(&token(user), "phone", 0))
        .await
        .expect("auth");
    assert_eq!(ok.user_id, user);
    client
}

fn text_to(user: &str, cid: u64, text: &str) -> proto::Send {
    proto::Send {
        client_msg_id: cid,
        to: Some(proto::Conversation {
            kind: proto::ConversationKind::Direct as i32,
            id: user.into(),
        }),
        content_type: "text/plain".into(),
        body: Bytes::copy_from_slice(text.as_bytes()),
    }
}

/// Reads until a Deliver from someone else arrives and returns its body
/// (a sender's own copies are skipped).
async fn next_deliver(client: &mut Client) -> String {
    loop {
        match within(client.recv_frame()).await.expect("recv") {
            Body::Deliver(d) if d.client_msg_id == 0 => {
                return String::from_utf8(d.body.to_vec()).unwrap();
            }
            Body::Deliver(_) | Body::SyncBatch(_) | Body::SendAck(_) => continue,
            other => panic!("expected a Deliver, got {}", other.kind_name()),
        }
    }
}

/// The value of one sample (`name{labels}` exactly as rendered) in `/metrics`.
async fn metric(ops: SocketAddr, sample: &str) -> Option<f64> {
    let r = http(ops, "GET", "/metrics", &[], None).await;
    assert_eq!(r.status, 200);
    r.body.lines().find_map(|line| {
        let value = line.strip_prefix(sample)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

/// Scrapes until `sample` reaches `value` (a counter moves when the server
/// gets to it, which a client cannot observe).
async fn metric_until(ops: SocketAddr, sample: &str, value: f64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = metric(ops, sample).await;
        if now == Some(value) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sample} is {now:?}, expected {value}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn failures(reason: &str) -> String {
    format!("ferry_tls_handshake_failures_total{{reason=\"{reason}\"}}")
}

/// Starts ferry with a TLS port whose certificate `ca` signed for
/// `localhost`; `plain` keeps the plaintext port too.
async fn start_tls(dir: &std::path::Path, ca: &TestCa, plain: bool) -> ServerProcess {
    let (cert, key) = ca.write_leaf(dir, &["localhost"]);
    let data = dir.join("data");
    let flags = [
        "--tls-listen=127.0.0.1:0".to_owned(),
        format!("--tls-cert={}", cert.display()),
        format!("--tls-key={}", key.display()),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let listen = if plain { "127.0.0.1:0" } else { "" };
    ServerProcess::start_on(&data, listen, "127.0.0.1:0", &flags).await
}

#[tokio::test]
async fn a_tls_only_node_serves_messages_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("ferry test CA");
    let server = start_tls(dir.path(), &ca, false).await;
    let tls_addr = server.tls.expect("a TLS port");
    assert_eq!(server.addr, tls_addr, "no plaintext port: clients=off");
    let tls = ca.transport("localhost");

    let mut alice = login(tls_addr, &tls, "alice").await;
    let mut bob = login(tls_addr, &tls, "bob").await;
    bob.send(text_to("alice", 1, "hello over TLS"))
        .await
        .unwrap();
    let ack = await_ack(&mut bob, 1).await;
    assert!(ack.seq > 0);
    assert_eq!(next_deliver(&mut alice).await, "hello over TLS");
    alice.send(text_to("bob", 1, "and back")).await.unwrap();
    await_ack(&mut alice, 1).await;
    assert_eq!(next_deliver(&mut bob).await, "and back");
    assert_alive(&mut alice).await;

    // `ferry chat --tls --ca` reaches the same port.
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.ca_pem()).unwrap();
    let out = within(
        tokio::process::Command::new(ferry_binary())
            .arg("chat")
            .arg(format!("--server=localhost:{}", tls_addr.port()))
            .arg("--tls")
            .arg(format!("--ca={}", ca_file.display()))
            .args(["--uid", "carol", "--to", "alice", "--send", "from chat"])
            .env("FERRY_JWT_SECRET", TEST_SECRET)
            .env_remove("FERRY_TOKEN")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("run ferry chat");
    assert!(
        out.status.success(),
        "ferry chat --tls failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(next_deliver(&mut alice).await, "from chat");

    for reason in ["not_tls", "timeout", "alert", "protocol", "closed"] {
        assert_eq!(metric(server.http, &failures(reason)).await, Some(0.0));
    }
}

#[tokio::test]
async fn plaintext_clients_and_bad_handshakes_on_the_tls_port_are_counted_and_closed() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("ferry test CA");
    let server = start_tls(dir.path(), &ca, true).await;
    let tls_addr = server.tls.expect("a TLS port");

    // A plaintext ferry client on the TLS port hears why, in its framing.
    let mut plain = within(Client::connect(tls_addr)).await.unwrap();
    match within(plain.authenticate(&token("carol"), "phone", 0)).await {
        Err(e) => assert_eq!(e.code(), Some(ErrorCode::AuthRequired), "{e}"),
        Ok(_) => panic!("a plaintext Auth on the TLS port was accepted"),
    }
    expect_closed(&mut plain).await;
    metric_until(server.http, &failures("not_tls"), 1.0).await;

    // A client that does not trust the certificate aborts the handshake
    // with an alert.
    let stranger = TestCa::new("another CA").transport("localhost");
    match within(Client::connect_via(&tls_addr.to_string(), &stranger)).await {
        Err(ClientError::Tls(_)) => {}
        Err(e) => panic!("expected a TLS error, got {e}"),
        Ok(_) => panic!("the handshake succeeded with an untrusted certificate"),
    }
    metric_until(server.http, &failures("alert"), 1.0).await;

    // A TLS record header followed by garbage: a protocol failure, closed.
    let mut raw = within(tokio::net::TcpStream::connect(tls_addr))
        .await
        .unwrap();
    raw.write_all(&[
        0x16, 0x03, 0x01, 0x00, 0x08, 1, 0, 0, 4, 0xde, 0xad, 0xbe, 0xef,
    ])
    .await
    .unwrap();
    let mut sink = Vec::new();
    // The server may send an alert first; then the stream ends.
    let _ = within(raw.read_to_end(&mut sink)).await;
    metric_until(server.http, &failures("protocol"), 1.0).await;

    // None of it disturbed the plain port or a good TLS client.
    let mut good = login(tls_addr, &ca.transport("localhost"), "dave").await;
    assert_alive(&mut good).await;
    let mut plain_ok = login(server.addr, &Transport::Plain, "erin").await;
    assert_alive(&mut plain_ok).await;
    // A name the certificate does not hold is refused by the client.
    let wrong_name = ca.transport("chat.example.com");
    assert!(matches!(
        within(Client::connect_via(&tls_addr.to_string(), &wrong_name)).await,
        Err(ClientError::Tls(_))
    ));
}

#[tokio::test]
async fn a_silent_client_on_the_tls_port_is_closed_at_the_auth_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("ferry test CA");
    let (cert, key) = ca.write_leaf(dir.path(), &["localhost"]);
    let flags = [
        "--tls-listen=127.0.0.1:0".to_owned(),
        format!("--tls-cert={}", cert.display()),
        format!("--tls-key={}", key.display()),
        "--auth-timeout-secs=1".to_owned(),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = ServerProcess::start(&dir.path().join("data"), &flags).await;
    let tls_addr = server.tls.unwrap();
    // Connects and never says hello: the handshake counts against the
    // auth timeout.
    let mut raw = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
    let mut sink = Vec::new();
    let n = within(raw.read_to_end(&mut sink)).await.unwrap();
    assert_eq!(n, 0, "closed without a word");
    metric_until(server.http, &failures("timeout"), 1.0).await;
}

#[tokio::test]
async fn sighup_swaps_the_certificate_and_open_connections_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let old_ca = TestCa::new("old CA");
    let server = start_tls(dir.path(), &old_ca, false).await;
    let tls_addr = server.tls.unwrap();
    let mut alice = login(tls_addr, &old_ca.transport("localhost"), "alice").await;

    // The new certificate, from another CA, in place of the old files.
    let new_ca = TestCa::new("new CA");
    new_ca.write_leaf(dir.path(), &["localhost"]);
    server.signal(libc::SIGHUP);
    metric_until(
        server.http,
        "ferry_tls_cert_reloads_total{result=\"ok\"}",
        1.0,
    )
    .await;

    // New handshakes present the new certificate ...
    let mut bob = login(tls_addr, &new_ca.transport("localhost"), "bob").await;
    assert!(matches!(
        within(Client::connect_via(
            &tls_addr.to_string(),
            &old_ca.transport("localhost")
        ))
        .await,
        Err(ClientError::Tls(_))
    ));
    // ... and the connection made before the reload is still served.
    assert_alive(&mut alice).await;
    bob.send(text_to("alice", 7, "after the reload"))
        .await
        .unwrap();
    await_ack(&mut bob, 7).await;
    assert_eq!(next_deliver(&mut alice).await, "after the reload");

    // A reload that fails (a broken key) keeps the current certificate.
    std::fs::write(dir.path().join("key.pem"), "not a key").unwrap();
    server.signal(libc::SIGHUP);
    metric_until(
        server.http,
        "ferry_tls_cert_reloads_total{result=\"error\"}",
        1.0,
    )
    .await;
    let mut carol = login(tls_addr, &new_ca.transport("localhost"), "carol").await;
    assert_alive(&mut carol).await;
    assert_alive(&mut alice).await;
}
