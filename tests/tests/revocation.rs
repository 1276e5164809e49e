//! Token revocation (issue 15 part 3, docs/ADMIN_API.md §6.3): the admin
//! API refuses a user's tokens issued before a time, or one device's; live
//! sessions holding them are kicked with `TOKEN_REVOKED`, and a later Auth
//! with one is refused with the same code. The revocation is durable
//! (survives `kill -9` and a restart) and, in a cluster, lives on the
//! user's home node whatever node the call reaches. Also secret rotation:
//! two accepted secrets, chosen by the token header's `kid`.

use ferry_e2e::cluster::TestCluster;
use ferry_e2e::*;
use ferry_gateway::auth::{Claims, TokenVerifier, unix_now};
use ferry_protocol::ErrorCode;
use ferry_protocol::client::Client;
use std::net::SocketAddr;

fn verifier() -> TokenVerifier {
    TokenVerifier::new(TEST_SECRET.as_bytes())
}

/// A token for `user` issued at `iat` (None: without an `iat` claim).
fn token_issued(user: &str, iat: Option<u64>) -> String {
    verifier().mint_claims(&Claims {
        sub: user.into(),
        exp: unix_now() + 3600,
        iat,
        nbf: None,
        dev: None,
    })
}

async fn login_with(addr: SocketAddr, token: &str, device: &str) -> Client {
    let mut client = Client::connect(addr).await.expect("connect");
    within(client.authenticate(token, device, 0))
        .await
        .expect("auth");
    client
}

/// Asserts that an Auth with `token` is refused with `TOKEN_REVOKED` (an
/// `Error` with `closing` set), then the connection closes.
async fn assert_refused(addr: SocketAddr, token: &str, device: &str) {
    let mut client = Client::connect(addr).await.expect("connect");
    let error = within(client.authenticate(token, device, 0))
        .await
        .expect_err("a revoked token must be refused");
    assert_eq!(error.code(), Some(ErrorCode::TokenRevoked), "{error}");
    match error {
        ferry_protocol::client::ClientError::Rejected(e) => assert!(e.closing),
        other => panic!("expected an Error frame, got {other}"),
    }
    expect_closed(&mut client).await;
}

async fn revoke(ops: SocketAddr, user: &str, body: &str) -> serde_json::Value {
    let r = admin(
        ops,
        "POST",
        &format!("/admin/users/{user}/revoke"),
        Some(body),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

#[tokio::test]
async fn revoking_before_t_kicks_live_sessions_and_refuses_older_tokens_only() {
    let server = TestServer::start().await;
    let t = unix_now();
    let old = token_issued("alice", Some(t - 100));
    let new = token_issued("alice", Some(t));
    let mut phone = login_with(server.addr, &old, "phone").await;
    let mut tablet = login_with(server.addr, &old, "tablet").await;
    // A session whose token was issued at T itself is kept.
    let mut laptop = login_with(server.addr, &new, "laptop").await;
    let mut bob = server.login("bob", "phone").await;

    let answer = revoke(server.http, "alice", &format!(r#"{{"issued_before":{t}}}"#)).await;
    assert_eq!(answer["issued_before"], t);
    assert_eq!(answer["kicked"], serde_json::json!(["phone", "tablet"]));

    expect_error_then_close(&mut phone, ErrorCode::TokenRevoked).await;
    expect_error_then_close(&mut tablet, ErrorCode::TokenRevoked).await;
    assert_alive(&mut laptop).await;
    assert_alive(&mut bob).await;

    // The old token is refused at Auth; one issued at or after T works, on
    // any device; a token without `iat` counts as issued at time 0.
    assert_refused(server.addr, &old, "phone").await;
    assert_refused(server.addr, &token_issued("alice", None), "desk").await;
    let mut again = login_with(server.addr, &new, "phone").await;
    assert_alive(&mut again).await;
    let later = token_issued("alice", Some(t + 1));
    let mut tablet = login_with(server.addr, &later, "tablet").await;
    assert_alive(&mut tablet).await;
    // Bob's tokens are untouched.
    let mut bob2 = login_with(server.addr, &token_issued("bob", None), "tablet").await;
    assert_alive(&mut bob2).await;

    // An earlier time than the one in force takes nothing back.
    let answer = revoke(
        server.http,
        "alice",
        &format!(r#"{{"issued_before":{}}}"#, t - 1000),
    )
    .await;
    assert_eq!(answer["issued_before"], t);
    assert_eq!(answer["kicked"], serde_json::json!([]));
    assert_refused(server.addr, &old, "phone").await;

    let stats = admin(server.http, "GET", "/admin/stats", None).await.json();
    assert_eq!(stats["revoked_users"], 1);
    server.stop().await;
}

#[tokio::test]
async fn revoking_one_device_leaves_the_users_other_devices_alone() {
    let server = TestServer::start().await;
    let token = server.token("alice");
    let mut phone = login_with(server.addr, &token, "phone").await;
    let mut tablet = login_with(server.addr, &token, "tablet").await;

    // No issued_before: every token issued up to the call.
    let answer = revoke(server.http, "alice", r#"{"device_id":"phone"}"#).await;
    assert_eq!(answer["kicked"], serde_json::json!(["phone"]));
    assert_eq!(answer["device_id"], "phone");
    expect_error_then_close(&mut phone, ErrorCode::TokenRevoked).await;
    assert_alive(&mut tablet).await;

    assert_refused(server.addr, &token, "phone").await;
    // The same token still logs in on other devices.
    let mut desk = login_with(server.addr, &token, "desk").await;
    assert_alive(&mut desk).await;
    assert_alive(&mut tablet).await;

    // Bad requests are refused before anything is stored.
    for body in [
        r#"{"issued_before": 1700000000000}"#,
        r#"{"device_id": ""}"#,
        r#"{"unknown": 1}"#,
    ] {
        let r = admin(server.http, "POST", "/admin/users/alice/revoke", Some(body)).await;
        assert_eq!(r.status, 400, "{body}: {}", r.body);
    }
    server.stop().await;
}

#[tokio::test]
async fn a_revocation_survives_kill_9_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let t = unix_now();
    let old = token_issued("alice", Some(t - 100));
    let mut server = ServerProcess::start(dir.path(), &[]).await;
    let mut phone = login_with(server.addr, &old, "phone").await;
    let answer = revoke(server.http, "alice", &format!(r#"{{"issued_before":{t}}}"#)).await;
    assert_eq!(answer["kicked"], serde_json::json!(["phone"]));
    expect_error_then_close(&mut phone, ErrorCode::TokenRevoked).await;

    // The answer came after the WAL sync: kill -9 right away loses nothing.
    server.child.start_kill().expect("SIGKILL");
    let _ = server.child.wait().await;
    let server = ServerProcess::start(dir.path(), &[]).await;
    assert_refused(server.addr, &old, "phone").await;
    assert_refused(server.addr, &old, "tablet").await;
    let mut fresh = login_with(server.addr, &token_issued("alice", Some(t)), "phone").await;
    assert_alive(&mut fresh).await;
}

#[tokio::test]
async fn in_a_cluster_a_revocation_on_any_node_acts_on_the_users_home() {
    let cluster = TestCluster::start(3).await;
    let user = cluster.user_on(2, "rev");
    let t = unix_now();
    let old = token_issued(&user, Some(t - 100));
    let mut phone = login_with(cluster.addr(2), &old, "phone").await;

    // Called on node 3: forwarded to node 2, where the user's sessions are.
    let answer = revoke(
        cluster.ops(3),
        &user,
        &format!(r#"{{"issued_before":{t}}}"#),
    )
    .await;
    assert_eq!(answer["kicked"], serde_json::json!(["phone"]));
    expect_error_then_close(&mut phone, ErrorCode::TokenRevoked).await;
    assert_refused(cluster.addr(2), &old, "phone").await;

    // Another node does not know the revocation and need not: it sends the
    // client home, where it is refused.
    let mut elsewhere = Client::connect(cluster.addr(1)).await.expect("connect");
    match within(elsewhere.authenticate(&old, "phone", 0)).await {
        Err(ferry_protocol::client::ClientError::Redirected(r)) => assert_eq!(r.node_id, "2"),
        other => panic!("expected a Redirect, got {other:?}"),
    }
    let mut fresh = login_with(cluster.addr(2), &token_issued(&user, Some(t)), "phone").await;
    assert_alive(&mut fresh).await;
}

#[tokio::test]
async fn during_a_secret_rotation_the_kid_chooses_the_current_or_the_previous_secret() {
    const OLD: &str = "old-secret-0123456789abcdef";
    let server = TestServer::start_with(|c| {
        c.jwt_kid = Some("k2".into());
        c.jwt_previous_secret = Some(OLD.into());
        c.jwt_previous_kid = Some("k1".into());
    })
    .await;
    let old = TokenVerifier::new(OLD.as_bytes()).with_kid("k1");
    // Minted before the rotation (previous secret, kid k1) and after it
    // (the server's current secret, kid k2): both log in.
    let mut before = login_with(server.addr, &old.mint("alice", None, 600), "phone").await;
    let mut after = login_with(server.addr, &server.token("bob"), "phone").await;
    assert_alive(&mut before).await;
    assert_alive(&mut after).await;
    // The old secret under the current kid, or an unknown kid: refused.
    for token in [
        TokenVerifier::new(OLD.as_bytes())
            .with_kid("k2")
            .mint("carol", None, 600),
        TokenVerifier::new(OLD.as_bytes())
            .with_kid("k7")
            .mint("carol", None, 600),
    ] {
        let mut c = Client::connect(server.addr).await.expect("connect");
        let e = within(c.authenticate(&token, "phone", 0))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::BadToken), "{e}");
    }
    server.stop().await;
}
