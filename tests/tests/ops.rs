//! The ops port end to end: the admin API (auth, errors, every call),
//! system messages reaching online and offline users, and `/metrics`
//! scraped and parsed while clients connect, send, and are kicked.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_e2e::*;
use ferry_protocol::ErrorCode;
use ferry_protocol::client::Client;
use ferry_protocol::proto::{self, frame::Body};
use serde_json::{Value, json};

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

/// Reads frames until `n` inbox entries (live or synced) have arrived.
async fn entries(client: &mut Client, n: usize) -> Vec<proto::Deliver> {
    let mut out = Vec::new();
    while out.len() < n {
        match within(client.recv_frame()).await.expect("recv") {
            Body::Deliver(d) => out.push(d),
            Body::SyncBatch(b) => out.extend(b.entries),
            _ => continue,
        }
    }
    assert_eq!(out.len(), n, "more entries than expected");
    out
}

/// Reads frames until the next inbox entry.
async fn next_entry(client: &mut Client) -> proto::Deliver {
    entries(client, 1).await.remove(0)
}

/// Logs in and consumes the login sync.
async fn login_synced(server: &TestServer, user: &str, device: &str) -> Client {
    let mut c = server.login(user, device).await;
    loop {
        if let Body::SyncBatch(b) = within(c.recv_frame()).await.unwrap()
            && !b.has_more
        {
            return c;
        }
    }
}

/// Everything but the volatile field `created_ms`, which must be a
/// plausible time.
fn without_created(mut v: Value) -> Value {
    let created = v["created_ms"].as_u64().expect("created_ms");
    assert!(created > 1_600_000_000_000, "created_ms {created}");
    v.as_object_mut().unwrap().remove("created_ms");
    v
}

// ---------------------------------------------------------------- auth, errors

#[tokio::test]
async fn admin_calls_without_the_token_get_401() {
    let server = TestServer::start().await;
    let unauthorized = json!({"error": "missing or invalid admin token", "code": "unauthorized"});
    let cases: [&[(&str, &str)]; 4] = [
        &[],
        &[("Authorization", "Bearer wrong-token-0123456789")],
        &[("Authorization", "Basic dGVzdA==")],
        // The right token, with a byte too many.
        &[("Authorization", "Bearer test-admin-token-0123456789x")],
    ];
    for headers in cases {
        for (method, path) in [
            ("GET", "/admin/stats"),
            ("POST", "/admin/groups"),
            ("GET", "/admin/no/such/endpoint"),
        ] {
            let r = http(server.http, method, path, headers, None).await;
            assert_eq!(r.status, 401, "{method} {path} with {headers:?}");
            assert_eq!(r.json(), unauthorized);
            assert_eq!(
                r.header("www-authenticate"),
                Some("Bearer realm=\"ferry-admin\"")
            );
            assert_eq!(r.header("content-type"), Some("application/json"));
        }
    }
    // Health and metrics stay open.
    assert_eq!(
        http(server.http, "GET", "/healthz", &[], None).await.status,
        200
    );
    assert_eq!(
        http(server.http, "GET", "/readyz", &[], None).await.status,
        200
    );
    server.stop().await;
}

#[tokio::test]
async fn admin_bad_requests_get_400_with_a_message() {
    let server = TestServer::start().await;
    let cases = [
        (
            "POST",
            "/admin/groups",
            "{\"owner\": ",
            json!({"error": "bad JSON: EOF while parsing a value at line 1 column 10", "code": "bad_json"}),
        ),
        (
            "POST",
            "/admin/groups",
            "{\"ownr\": \"alice\"}",
            json!({"error": "bad JSON: unknown field `ownr`, expected one of `group_id`, `name`, `owner`, `members` at line 1 column 7", "code": "bad_json"}),
        ),
        (
            "POST",
            "/admin/groups",
            "{\"owner\": \"\"}",
            json!({"error": "owner must be 1..=64 bytes (got 0)", "code": "invalid_request"}),
        ),
        (
            "POST",
            "/admin/users/bob/messages",
            "{}",
            json!({"error": "give exactly one of text and body_base64", "code": "invalid_request"}),
        ),
        (
            "POST",
            "/admin/users/bob/messages",
            "{\"body_base64\": \"***\"}",
            json!({"error": "body_base64: Invalid symbol 42, offset 0.", "code": "invalid_request"}),
        ),
        (
            "POST",
            "/admin/users/bob/kick",
            "42",
            json!({"error": "bad JSON: invalid type: integer `42`, expected struct Kick at line 1 column 2", "code": "bad_json"}),
        ),
    ];
    for (method, path, body, expected) in cases {
        let r = admin(server.http, method, path, Some(body)).await;
        assert_eq!(r.status, 400, "{method} {path} {body}: {}", r.body);
        assert_eq!(r.json(), expected, "{method} {path} {body}");
    }
    // Query parameters are checked too (on an existing group).
    let r = admin(
        server.http,
        "POST",
        "/admin/groups",
        Some(r#"{"group_id": "g", "owner": "alice"}"#),
    )
    .await;
    assert_eq!(r.status, 201);
    for limit in ["0", "1001", "ten"] {
        let r = admin(
            server.http,
            "GET",
            &format!("/admin/groups/g/members?limit={limit}"),
            None,
        )
        .await;
        assert_eq!(r.status, 400);
        assert_eq!(
            r.json(),
            json!({"error": "limit must be an integer in 1..=1000", "code": "invalid_request"})
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn admin_unknown_ids_get_404() {
    let server = TestServer::start().await;
    let no_group = json!({"error": "no group nope", "code": "no_such_group"});
    for (method, path, body) in [
        ("GET", "/admin/groups/nope", None),
        ("DELETE", "/admin/groups/nope", None),
        ("GET", "/admin/groups/nope/members", None),
        (
            "POST",
            "/admin/groups/nope/members",
            Some(r#"{"members": ["bob"]}"#),
        ),
        (
            "POST",
            "/admin/groups/nope/members/remove",
            Some(r#"{"members": ["bob"]}"#),
        ),
        ("DELETE", "/admin/groups/nope/members/bob", None),
        (
            "POST",
            "/admin/groups/nope/messages",
            Some(r#"{"text": "hi"}"#),
        ),
    ] {
        let r = admin(server.http, method, path, body).await;
        assert_eq!(r.status, 404, "{method} {path}: {}", r.body);
        assert_eq!(r.json(), no_group, "{method} {path}");
    }

    let r = admin(server.http, "POST", "/admin/users/bob/kick", None).await;
    assert_eq!(r.status, 404);
    assert_eq!(
        r.json(),
        json!({"error": "bob has no online connection", "code": "not_online"})
    );
    let _bob = server.login("bob", "phone").await;
    let r = admin(
        server.http,
        "POST",
        "/admin/users/bob/kick",
        Some(r#"{"device_id": "tablet"}"#),
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(
        r.json(),
        json!({"error": "bob has no online connection on device tablet", "code": "not_online"})
    );

    let r = admin(
        server.http,
        "POST",
        "/admin/groups",
        Some(r#"{"group_id": "g", "owner": "alice"}"#),
    )
    .await;
    assert_eq!(r.status, 201);
    let r = admin(server.http, "DELETE", "/admin/groups/g/members/zed", None).await;
    assert_eq!(r.status, 404);
    assert_eq!(
        r.json(),
        json!({"error": "zed is not a member of g", "code": "not_a_member"})
    );

    let r = admin(server.http, "GET", "/admin/nothing/here", None).await;
    assert_eq!(r.status, 404);
    assert_eq!(
        r.json(),
        json!({"error": "no such admin endpoint", "code": "not_found"})
    );
    let r = admin(server.http, "PUT", "/admin/stats", Some("{}")).await;
    assert_eq!(r.status, 405);
    assert_eq!(
        r.json(),
        json!({"error": "method not allowed on this endpoint", "code": "method_not_allowed"})
    );
    server.stop().await;
}

// ------------------------------------------------------------------ groups

#[tokio::test]
async fn admin_manages_a_group_from_creation_to_dissolution() {
    let server = TestServer::start().await;
    let mut alice = login_synced(&server, "alice", "phone").await;

    let r = admin(
        server.http,
        "POST",
        "/admin/groups",
        Some(
            r#"{"group_id": "g1", "name": "Team", "owner": "alice", "members": ["carol", "bob"]}"#,
        ),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        without_created(r.json()),
        json!({"group_id": "g1", "name": "Team", "owner": "alice", "member_count": 3})
    );
    // The owner's devices see the creation, made in the owner's name.
    let created = next_entry(&mut alice).await;
    assert_eq!(created.kind(), proto::EntryKind::GroupEvent);
    assert_eq!(created.from, "alice");
    assert_eq!(created.conversation, group("g1"));

    let r = admin(server.http, "GET", "/admin/groups/g1", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        without_created(r.json()),
        json!({"group_id": "g1", "name": "Team", "owner": "alice", "member_count": 3})
    );

    let r = admin(
        server.http,
        "POST",
        "/admin/groups",
        Some(r#"{"group_id": "g1", "owner": "dave"}"#),
    )
    .await;
    assert_eq!(r.status, 409);
    assert_eq!(
        r.json(),
        json!({"error": "group g1 exists", "code": "group_exists"})
    );

    let r = admin(
        server.http,
        "POST",
        "/admin/groups/g1/members",
        Some(r#"{"members": ["erin", "dave", "bob"]}"#),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        json!({"group_id": "g1", "added": ["dave", "erin"], "member_count": 5})
    );
    let added = next_entry(&mut alice).await;
    assert_eq!(
        added.group_event.unwrap().users,
        vec!["dave".to_string(), "erin".to_string()]
    );

    // Paged by user id.
    let page = |after: &str| {
        let path = format!("/admin/groups/g1/members?limit=2&after={after}");
        async move { admin(server.http, "GET", &path, None).await.json() }
    };
    let member = |id: &str, role: &str| json!({"user_id": id, "role": role});
    assert_eq!(
        page("").await,
        json!({"group_id": "g1", "member_count": 5, "next_after": "bob",
               "members": [member("alice", "owner"), member("bob", "member")]})
    );
    assert_eq!(
        page("bob").await,
        json!({"group_id": "g1", "member_count": 5, "next_after": "dave",
               "members": [member("carol", "member"), member("dave", "member")]})
    );
    assert_eq!(
        page("dave").await,
        json!({"group_id": "g1", "member_count": 5, "next_after": null,
               "members": [member("erin", "member")]})
    );
    let r = admin(server.http, "GET", "/admin/groups/g1/members", None).await;
    assert_eq!(r.json()["members"].as_array().unwrap().len(), 5);

    let r = admin(server.http, "DELETE", "/admin/groups/g1/members/bob", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        json!({"group_id": "g1", "removed": ["bob"], "member_count": 4})
    );
    let r = admin(
        server.http,
        "POST",
        "/admin/groups/g1/members/remove",
        Some(r#"{"members": ["carol", "zed"]}"#),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        json!({"group_id": "g1", "removed": ["carol"], "member_count": 3})
    );
    // The storage's rules hold for the admin too: the owner stays.
    let r = admin(
        server.http,
        "DELETE",
        "/admin/groups/g1/members/alice",
        None,
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(
        r.json(),
        json!({"error": "the owner cannot be removed", "code": "permission_denied"})
    );

    let r = admin(server.http, "DELETE", "/admin/groups/g1", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"group_id": "g1", "dissolved": true}));
    let r = admin(server.http, "GET", "/admin/groups/g1", None).await;
    assert_eq!(r.status, 404);

    // A generated id when none is given.
    let r = admin(
        server.http,
        "POST",
        "/admin/groups",
        Some(r#"{"owner": "alice"}"#),
    )
    .await;
    assert_eq!(r.status, 201);
    let id = r.json()["group_id"].as_str().unwrap().to_owned();
    assert!(id.starts_with('g') && id.len() > 1, "generated id {id}");
    server.stop().await;
}

// ---------------------------------------------------------------- messages

#[tokio::test]
async fn system_messages_reach_online_and_offline_users() {
    let server = TestServer::start().await;
    let mut alice = login_synced(&server, "alice", "phone").await;
    let r = admin(
        server.http,
        "POST",
        "/admin/groups",
        Some(r#"{"group_id": "ops", "owner": "alice", "members": ["bob"]}"#),
    )
    .await;
    assert_eq!(r.status, 201);
    next_entry(&mut alice).await; // the creation event

    // To a group: alice is online, bob is not.
    let r = admin(
        server.http,
        "POST",
        "/admin/groups/ops/messages",
        Some(r#"{"text": "maintenance at 02:00"}"#),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let sent = r.json();
    assert_eq!(sent["recipients"], 2);
    // A string: message ids do not fit a JavaScript number.
    let msg_id: u64 = sent["msg_id"].as_str().unwrap().parse().unwrap();
    assert!(sent["server_time_ms"].as_u64().unwrap() > 0);

    let live = next_entry(&mut alice).await;
    assert_eq!(live.kind(), proto::EntryKind::System);
    assert_eq!(live.from, "");
    assert_eq!(live.msg_id, msg_id);
    assert_eq!(live.conversation, group("ops"));
    assert_eq!(live.content_type, "text/plain");
    assert_eq!(live.body, Bytes::from_static(b"maintenance at 02:00"));

    // To one user, with a binary body: carol is offline.
    let r = admin(
        server.http,
        "POST",
        "/admin/users/carol/messages",
        Some(r#"{"content_type": "app/card", "body_base64": "AAEC/w=="}"#),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["recipients"], 1);

    // bob logs in later and syncs: the creation event, then the message.
    let mut bob = server.login("bob", "phone").await;
    let [event, stored] = <[_; 2]>::try_from(entries(&mut bob, 2).await).unwrap();
    assert_eq!(event.kind(), proto::EntryKind::GroupEvent);
    assert_eq!(stored.seq, 2);
    assert_eq!(stored.kind(), proto::EntryKind::System);
    assert_eq!(stored.msg_id, msg_id);
    assert_eq!(stored.body, Bytes::from_static(b"maintenance at 02:00"));

    let mut carol = server.login("carol", "phone").await;
    let stored = next_entry(&mut carol).await;
    assert_eq!(stored.seq, 1);
    assert_eq!(stored.kind(), proto::EntryKind::System);
    // A system message to a user lives in the DIRECT conversation with "".
    assert_eq!(stored.conversation, direct(""));
    assert_eq!(stored.content_type, "app/card");
    assert_eq!(stored.body, Bytes::from_static(&[0, 1, 2, 0xff]));

    // And live to a user who is online.
    let r = admin(
        server.http,
        "POST",
        "/admin/users/carol/messages",
        Some(r#"{"text": "welcome"}"#),
    )
    .await;
    assert_eq!(r.status, 200);
    let live = next_entry(&mut carol).await;
    assert_eq!((live.seq, live.kind()), (2, proto::EntryKind::System));
    assert_eq!(live.body, Bytes::from_static(b"welcome"));

    // Too large for a frame.
    let big = "x".repeat(70_000);
    let r = admin(
        server.http,
        "POST",
        "/admin/users/carol/messages",
        Some(&format!(r#"{{"text": "{big}"}}"#)),
    )
    .await;
    assert_eq!(r.status, 413);
    assert_eq!(
        r.json(),
        json!({"error": "body + content_type must be at most 64512 bytes", "code": "too_large"})
    );
    server.stop().await;
}

// ------------------------------------------------------- kick and presence

#[tokio::test]
async fn admin_kicks_one_device_or_all() {
    let server = TestServer::start().await;
    let mut phone = server.login("bob", "phone").await;
    let mut laptop = server.login("bob", "laptop").await;

    let r = admin(
        server.http,
        "POST",
        "/admin/users/bob/kick",
        Some(r#"{"device_id": "laptop", "message": "session revoked"}"#),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"user_id": "bob", "kicked": ["laptop"]}));
    loop {
        match within(laptop.recv_frame()).await.expect("recv") {
            Body::Kick(k) => {
                assert_eq!(k.reason(), ErrorCode::Kicked);
                assert_eq!(k.message, "session revoked");
                break;
            }
            Body::SyncBatch(_) => continue,
            other => panic!("expected Kick, got {}", other.kind_name()),
        }
    }
    expect_closed(&mut laptop).await;
    assert_alive(&mut phone).await;

    let r = admin(server.http, "POST", "/admin/users/bob/kick", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"user_id": "bob", "kicked": ["phone"]}));
    expect_error_then_close(&mut phone, ErrorCode::Kicked).await;
    server.stop().await;
}

#[tokio::test]
async fn presence_shows_devices_and_last_seen() {
    let server = TestServer::start().await;
    let r = admin(server.http, "GET", "/admin/users/ghost/presence", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        json!({"user_id": "ghost", "online": false, "devices": [], "last_seen_ms": null})
    );

    let before = ferry_router::now_ms();
    let phone = server.login("bob", "phone").await;
    let laptop = server.login("bob", "laptop").await;
    let p = admin(server.http, "GET", "/admin/users/bob/presence", None)
        .await
        .json();
    assert_eq!(p["online"], true);
    let devices = p["devices"].as_array().unwrap();
    let names: Vec<&str> = devices
        .iter()
        .map(|d| d["device_id"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["laptop", "phone"]);
    for d in devices {
        assert!(d["connection_id"].as_u64().unwrap() > 0);
        // Coarse (whole seconds of the server's clock).
        let active = d["last_active_ms"].as_u64().unwrap();
        assert!(active + 2_000 >= before && active <= ferry_router::now_ms() + 1_000);
    }

    drop(phone);
    drop(laptop);
    // The server notices the closes on its own time: poll.
    let deadline = Instant::now() + WAIT;
    let p = loop {
        let p = admin(server.http, "GET", "/admin/users/bob/presence", None)
            .await
            .json();
        if p["online"] == false {
            break p;
        }
        assert!(Instant::now() < deadline, "bob still online: {p}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(p["devices"], json!([]));
    let seen = p["last_seen_ms"].as_u64().unwrap();
    assert!(seen >= before && seen <= ferry_router::now_ms());
    server.stop().await;
}

#[tokio::test]
async fn stats_describe_the_node() {
    let server = TestServer::start().await;
    let _a = server.login("alice", "phone").await;
    let _b = server.login("bob", "phone").await;
    let r = admin(server.http, "GET", "/admin/stats", None).await;
    assert_eq!(r.status, 200);
    let s = r.json();
    assert_eq!(s["node_id"], "ferry-1");
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(s["ready"], true);
    assert_eq!(s["sessions_online"], 2);
    assert_eq!(s["connections_open"], 2);
    assert_eq!(s["max_connections"], 100_000);
    assert!(s["uptime_secs"].is_u64());
    server.stop().await;
}

// ----------------------------------------------------------------- metrics

type Metrics = HashMap<String, f64>;

/// Scrapes `/metrics` and parses it with a Prometheus text parser; keys are
/// `name` or `name{label="value",…}` with labels sorted.
async fn scrape(addr: SocketAddr) -> Metrics {
    let r = http(addr, "GET", "/metrics", &[], None).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let lines = r.body.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
    let mut out = Metrics::new();
    for sample in scrape.samples {
        let value = match &sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            // A histogram counts as its number of observations (the +Inf bucket).
            prometheus_parse::Value::Histogram(buckets) => {
                let count = buckets.iter().map(|b| b.count).fold(0.0, f64::max);
                out.insert(format!("{}_count", sample.metric), count);
                continue;
            }
            _ => continue,
        };
        let mut labels: Vec<(String, String)> = sample
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.sort();
        let key = if labels.is_empty() {
            sample.metric
        } else {
            let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            format!("{}{{{}}}", sample.metric, inner.join(","))
        };
        out.insert(key, value);
    }
    out
}

fn get(m: &Metrics, key: &str) -> f64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("{key} missing from /metrics"))
}

/// Scrapes until `key` has `value` (counters move when the server gets to
/// it, which a client cannot observe).
async fn scrape_until(addr: SocketAddr, key: &str, value: f64) -> Metrics {
    let deadline = Instant::now() + WAIT;
    loop {
        let m = scrape(addr).await;
        if m.get(key) == Some(&value) {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "{key} is {:?}, expected {value}",
            m.get(key)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn metrics_count_connects_sends_and_kicks() {
    // A process of its own, so no other test moves its counters.
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]).await;
    let tokens = ferry_gateway::auth::TokenVerifier::new(TEST_SECRET.as_bytes());
    let m0 = scrape(server.http).await;
    for key in [
        "ferry_connections_accepted_total",
        "ferry_connections_authenticated_total",
        "ferry_connections_rejected_total{reason=\"bad_token\"}",
        "ferry_connections_closed_total{reason=\"slow_consumer\"}",
        "ferry_connections_closed_total{reason=\"rate_limited\"}",
        "ferry_kicks_total{reason=\"kicked\"}",
        "ferry_heartbeat_timeouts_total",
        "ferry_frames_in_total{kind=\"send\"}",
        "ferry_bytes_in_total",
    ] {
        assert_eq!(get(&m0, key), 0.0, "{key} starts at 0");
    }
    assert_eq!(get(&m0, "ferry_connections_open"), 0.0);
    assert!(get(&m0, "process_resident_memory_bytes") > 1e6);
    assert!(get(&m0, "process_open_fds") >= 3.0);
    assert!(get(&m0, "process_max_fds") >= get(&m0, "process_open_fds"));
    assert!(get(&m0, "process_start_time_seconds") > 1.6e9);

    // Logged in, with the login sync consumed: what follows is pushed live.
    let connect = |user: &'static str| {
        let token = tokens.mint(user, None, 3600);
        async move {
            let mut c = Client::connect(server.addr).await.unwrap();
            within(c.authenticate(&token, "phone", 0)).await.unwrap();
            loop {
                if let Body::SyncBatch(b) = within(c.recv_frame()).await.unwrap()
                    && !b.has_more
                {
                    return c;
                }
            }
        }
    };
    let mut alice = connect("alice").await;
    let mut bob = connect("bob").await;
    let mut bad = Client::connect(server.addr).await.unwrap();
    let err = within(bad.authenticate("not-a-token", "phone", 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadToken));

    alice
        .send(proto::Send {
            client_msg_id: 1,
            to: direct("bob"),
            content_type: "text/plain".into(),
            body: Bytes::from_static(b"hi"),
        })
        .await
        .unwrap();
    loop {
        if let Body::SendAck(_) = within(alice.recv_frame()).await.unwrap() {
            break;
        }
    }
    assert_eq!(next_entry(&mut bob).await.body, Bytes::from_static(b"hi"));
    // alice's own copy, so its write is counted before the scrape.
    assert_eq!(next_entry(&mut alice).await.body, Bytes::from_static(b"hi"));

    let r = http(
        server.http,
        "POST",
        "/admin/users/bob/kick",
        &[("Authorization", &format!("Bearer {TEST_ADMIN_TOKEN}"))],
        None,
    )
    .await;
    assert_eq!(r.status, 200);
    expect_error_then_close(&mut bob, ErrorCode::Kicked).await;
    drop(bob);

    let m1 = scrape_until(server.http, "ferry_kicks_total{reason=\"kicked\"}", 1.0).await;
    let delta = |key: &str| get(&m1, key) - get(&m0, key);
    assert_eq!(delta("ferry_connections_accepted_total"), 3.0);
    assert_eq!(delta("ferry_connections_authenticated_total"), 2.0);
    assert_eq!(
        delta("ferry_connections_rejected_total{reason=\"bad_token\"}"),
        1.0
    );
    assert_eq!(
        delta("ferry_connections_closed_total{reason=\"kicked\"}"),
        1.0
    );
    assert_eq!(delta("ferry_frames_in_total{kind=\"send\"}"), 1.0);
    assert_eq!(delta("ferry_frames_out_total{kind=\"send_ack\"}"), 1.0);
    assert_eq!(delta("ferry_frames_out_total{kind=\"auth_ok\"}"), 2.0);
    assert_eq!(delta("ferry_frames_out_total{kind=\"kick\"}"), 1.0);
    // bob's copy and alice's own.
    assert_eq!(delta("ferry_frames_out_total{kind=\"deliver\"}"), 2.0);
    // Storage and router figures: histograms appear with their first
    // observation, so a missing one counts as zero before.
    let grown = |key: &str| get(&m1, key) - m0.get(key).copied().unwrap_or(0.0);
    assert_eq!(grown("ferry_send_ack_seconds_count"), 1.0);
    assert!(grown("ferry_commit_batch_ops_count") >= 1.0);
    assert!(grown("ferry_commit_seconds_count") >= 1.0);
    // bob's entry and alice's own copy.
    assert_eq!(grown("ferry_deliveries_total"), 2.0);
    assert!(delta("ferry_bytes_in_total") > 0.0);
    assert!(delta("ferry_bytes_out_total") > 0.0);
    // RocksDB's figures: the message sits in a memtable, which the shared
    // cache accounts for, behind a WAL on disk; nothing flushed yet.
    assert!(get(&m1, "ferry_storage_memtable_bytes") > 0.0);
    assert!(get(&m1, "ferry_storage_cache_bytes") > 0.0);
    assert_eq!(
        get(&m1, "ferry_storage_cache_capacity_bytes"),
        128.0 * 1024.0 * 1024.0
    );
    assert!(
        get(&m1, "ferry_storage_cache_bytes") <= get(&m1, "ferry_storage_cache_capacity_bytes")
    );
    assert!(get(&m1, "ferry_storage_wal_bytes") > 0.0);
    assert!(get(&m1, "ferry_storage_table_readers_bytes") >= 0.0);
    assert_eq!(get(&m1, "ferry_storage_sst_bytes"), 0.0);
    // The gauge is read a moment before the counters are rendered.
    scrape_until(server.http, "ferry_sessions_online", 1.0).await;
    assert_eq!(get(&m1, "ferry_admin_requests_total{status=\"200\"}"), 1.0);
    drop(alice);
    drop(bad);
    scrape_until(server.http, "ferry_connections_open", 0.0).await;
}

#[tokio::test]
async fn metrics_count_heartbeat_timeouts_and_rate_limits() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(
        dir.path(),
        &["--heartbeat-secs=1", "--max-frames-per-sec=20"],
    )
    .await;
    let tokens = ferry_gateway::auth::TokenVerifier::new(TEST_SECRET.as_bytes());

    // Too many frames in one second.
    let mut noisy = Client::connect(server.addr).await.unwrap();
    within(noisy.authenticate(&tokens.mint("noisy", None, 60), "phone", 0))
        .await
        .unwrap();
    // Enough that however the frames straddle a second, one second has > 20.
    for nonce in 0..100 {
        noisy.feed(proto::Ping { nonce }).await.unwrap();
    }
    noisy.flush().await.unwrap();
    loop {
        match within(noisy.recv_frame()).await {
            Ok(Body::Error(e)) => {
                assert_eq!(e.code(), ErrorCode::RateLimited);
                break;
            }
            Ok(_) => continue,
            Err(e) => panic!("expected RATE_LIMITED, got {e}"),
        }
    }

    // Silence for 3 × 1 s.
    let mut silent = Client::connect(server.addr).await.unwrap();
    within(silent.authenticate(&tokens.mint("silent", None, 60), "phone", 0))
        .await
        .unwrap();
    expect_closed(&mut silent).await;

    // The close is counted once the server's side is done (after the
    // lingering close), a moment after the client sees the end of stream.
    let m = scrape_until(
        server.http,
        "ferry_connections_closed_total{reason=\"heartbeat_timeout\"}",
        1.0,
    )
    .await;
    assert_eq!(get(&m, "ferry_heartbeat_timeouts_total"), 1.0);
    let m = scrape_until(
        server.http,
        "ferry_connections_closed_total{reason=\"rate_limited\"}",
        1.0,
    )
    .await;
    assert_eq!(
        get(
            &m,
            "ferry_connections_closed_total{reason=\"slow_consumer\"}"
        ),
        0.0
    );
}

/// The server turns transparent huge pages off for itself (see
/// `ferry_gateway::huge_pages`): with them its memory grows in 2 MiB steps
/// that freeing does not give back.
#[tokio::test]
async fn the_server_runs_without_transparent_huge_pages() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]).await;
    let pid = server.child.id().expect("running");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let Some(line) = status.lines().find(|l| l.starts_with("THP_enabled:")) else {
        eprintln!("SKIPPED: /proc/{pid}/status has no THP_enabled line (kernel before 6.0?)");
        return;
    };
    assert_eq!(line.split_whitespace().nth(1), Some("0"), "{line}");
}
