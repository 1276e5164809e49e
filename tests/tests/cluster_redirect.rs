//! Cluster membership, placement and redirects over real `ferry serve`
//! processes: three nodes with the same `[cluster]` list and the NSQ test
//! double as their nsqd (they serve once they hear each other).
//! `Auth` on a node that is not the user's home gets `Redirect` and a close;
//! the client follows it to the home node; `/v1/route` gives the same answer
//! on every node; a single node never redirects; bad cluster configs are
//! refused at start.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Stdio;

use ferry_cluster::{Node, NodeId, Placement};
use ferry_e2e::cluster::{TestCluster, free_ports};
use ferry_e2e::*;
use ferry_protocol::ErrorCode;
use ferry_protocol::client::{Client, ClientError, MAX_REDIRECTS};

/// One user homed on each node: (home id, user).
fn one_user_per_node(cluster: &TestCluster) -> Vec<(u16, String)> {
    let mut found = BTreeMap::new();
    for i in 0.. {
        let user = format!("user-{i}");
        found.entry(cluster.home(&user)).or_insert(user);
        if found.len() == cluster.nodes.len() {
            break;
        }
    }
    found.into_iter().collect()
}

fn token(user: &str) -> String {
    ferry_gateway::auth::TokenVerifier::new(TEST_SECRET.as_bytes()).mint(user, None, 600)
}

async fn scrape_redirects(ops: SocketAddr, to_node: u16) -> u64 {
    let r = http(ops, "GET", "/metrics", &[], None).await;
    assert_eq!(r.status, 200);
    let key = format!("ferry_redirects_total{{node=\"{to_node}\"}} ");
    r.body
        .lines()
        .find_map(|l| l.strip_prefix(&key))
        .map_or(0, |v| v.trim().parse().expect("counter value"))
}

#[tokio::test]
async fn auth_on_a_wrong_node_is_redirected_home_and_the_client_follows() {
    let cluster = TestCluster::start(3).await;
    for (home, user) in one_user_per_node(&cluster) {
        let home_addr = cluster.nodes[&home].addr.to_string();
        for (&id, node) in &cluster.nodes {
            if id == home {
                // At home: AuthOk, with the node's cluster id.
                let mut c = Client::connect(node.addr).await.unwrap();
                let ok = within(c.authenticate(&token(&user), "phone", 0))
                    .await
                    .expect("auth at home");
                assert_eq!(ok.node_id, home.to_string());
                continue;
            }
            // Elsewhere: Redirect to the home node, then the socket closes.
            let before = scrape_redirects(node.http, home).await;
            let mut c = Client::connect(node.addr).await.unwrap();
            match within(c.authenticate(&token(&user), "phone", 0)).await {
                Err(ClientError::Redirected(r)) => {
                    assert_eq!(r.node_id, home.to_string(), "{user} on node {id}");
                    assert_eq!(r.address, home_addr);
                }
                other => panic!("{user} on node {id}: expected Redirect, got {other:?}"),
            }
            expect_closed(&mut c).await;
            assert_eq!(scrape_redirects(node.http, home).await, before + 1);

            // The following client ends authenticated at home.
            let login = within(Client::connect_and_authenticate(
                &node.addr.to_string(),
                &token(&user),
                "tablet",
                0,
            ))
            .await
            .expect("follow the redirect");
            assert_eq!(login.redirects, 1);
            assert_eq!(login.address, home_addr);
            assert_eq!(login.auth_ok.node_id, home.to_string());
            assert_eq!(login.auth_ok.user_id, user);
            let mut client = login.client;
            assert_alive(&mut client).await;
        }
    }
}

#[tokio::test]
async fn a_bad_token_gets_bad_token_never_a_redirect() {
    let cluster = TestCluster::start(3).await;
    let (home, user) = one_user_per_node(&cluster).remove(0);
    let wrong = cluster.nodes.keys().find(|&&id| id != home).unwrap();
    let forged = ferry_gateway::auth::TokenVerifier::new(b"another-secret-0123456789")
        .mint(&user, None, 600);
    let mut c = Client::connect(cluster.nodes[wrong].addr).await.unwrap();
    let err = within(c.authenticate(&forged, "phone", 0))
        .await
        .expect_err("forged token");
    assert_eq!(err.code(), Some(ErrorCode::BadToken), "{err}");
    // A token bound to another device is refused before placement too.
    let bound =
        ferry_gateway::auth::TokenVerifier::new(TEST_SECRET.as_bytes()).mint(&user, Some("a"), 600);
    let mut c = Client::connect(cluster.nodes[wrong].addr).await.unwrap();
    let err = within(c.authenticate(&bound, "b", 0))
        .await
        .expect_err("dev");
    assert_eq!(err.code(), Some(ErrorCode::BadToken), "{err}");
}

#[tokio::test]
async fn route_answers_alike_on_every_node_and_matches_where_auth_lands() {
    let cluster = TestCluster::start(3).await;
    for i in 0..30 {
        let user = format!("route-user-{i}");
        let mut answers = Vec::new();
        for node in cluster.nodes.values() {
            // No admin token needed.
            let r = http(
                node.http,
                "GET",
                &format!("/v1/route?uid={user}"),
                &[],
                None,
            )
            .await;
            assert_eq!(r.status, 200, "{}", r.body);
            answers.push(r.json());
        }
        assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
        let home = cluster.home(&user);
        let home_node = &cluster.nodes[&home];
        assert_eq!(
            answers[0],
            serde_json::json!({
                "uid": user,
                "node_id": home.to_string(),
                "address": home_node.addr.to_string(),
                "ops_address": home_node.http.to_string(),
            })
        );
        // Dialling the answered address first needs no redirect.
        let login = within(Client::connect_and_authenticate(
            answers[0]["address"].as_str().unwrap(),
            &token(&user),
            "phone",
            0,
        ))
        .await
        .unwrap();
        assert_eq!(login.redirects, 0);
        assert_eq!(login.auth_ok.node_id, home.to_string());
    }
    // Groups: the owner by the same hash of the group id.
    for i in 0..10 {
        let gid = format!("group-{i}");
        let owner = cluster.placement.owner_of_group(&gid).get();
        for node in cluster.nodes.values() {
            let r = http(node.http, "GET", &format!("/v1/route?gid={gid}"), &[], None).await;
            assert_eq!(r.status, 200, "{}", r.body);
            let v = r.json();
            assert_eq!(v["gid"], gid.as_str());
            assert_eq!(v["node_id"], owner.to_string());
            assert_eq!(v["address"], cluster.nodes[&owner].addr.to_string());
            assert!(v.get("uid").is_none());
        }
    }
    for (id, node) in &cluster.nodes {
        // stats says which node answered.
        let r = admin(node.http, "GET", "/admin/stats", None).await;
        assert_eq!(r.json()["node_id"], id.to_string());
        // A redirect series per other node, at 0 (nobody was redirected).
        let metrics = http(node.http, "GET", "/metrics", &[], None).await.body;
        for other in cluster.nodes.keys() {
            let series = format!("ferry_redirects_total{{node=\"{other}\"}} 0");
            assert_eq!(
                metrics.contains(&series),
                other != id,
                "{series} on node {id}"
            );
        }
    }
}

#[tokio::test]
async fn route_refuses_missing_and_invalid_ids() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]).await;
    let long = "x".repeat(ferry_protocol::limits::MAX_ID_BYTES + 1);
    for query in [
        "/v1/route".to_owned(),
        "/v1/route?uid=".to_owned(),
        format!("/v1/route?uid={long}"),
        format!("/v1/route?gid={long}"),
        "/v1/route?uid=a&gid=b".to_owned(),
    ] {
        let r = http(server.http, "GET", &query, &[], None).await;
        assert_eq!(r.status, 400, "{query}: {}", r.body);
        assert_eq!(r.json()["code"], "invalid_request", "{query}");
    }
}

#[tokio::test]
async fn a_single_node_never_redirects_and_routes_to_itself() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]).await;
    for i in 0..20 {
        let user = format!("user-{i}");
        let login = within(Client::connect_and_authenticate(
            &server.addr.to_string(),
            &token(&user),
            "phone",
            0,
        ))
        .await
        .expect("auth");
        assert_eq!(login.redirects, 0);
        assert_eq!(login.auth_ok.node_id, "ferry-1");
        let r = http(
            server.http,
            "GET",
            &format!("/v1/route?uid={user}"),
            &[],
            None,
        )
        .await;
        assert_eq!(
            r.json(),
            serde_json::json!({
                "uid": user,
                "node_id": "ferry-1",
                "address": server.addr.to_string(),
                "ops_address": server.http.to_string(),
            })
        );
    }
    let metrics = http(server.http, "GET", "/metrics", &[], None).await.body;
    assert!(!metrics.contains("ferry_redirects_total{"), "{metrics}");
}

/// A node whose list sends users of node 2 back to itself (a misconfigured
/// cluster): the client gives up after MAX_REDIRECTS.
#[tokio::test]
async fn redirects_are_capped() {
    let nsqd = ferry_nsqd_double::NsqdDouble::start(Default::default())
        .await
        .unwrap();
    let ports = free_ports(4);
    let client = format!("127.0.0.1:{}", ports[0]);
    let ops = format!("127.0.0.1:{}", ports[1]);
    // Node 2 runs (so that the node list is confirmed) but the list says
    // its clients dial node 1.
    let nodes = format!("1@{client}@{ops},2@{client}@127.0.0.1:{}", ports[3]);
    let common = [
        format!("--cluster-nodes={nodes}"),
        format!("--cluster-nsqd-tcp-addresses={}", nsqd.addr()),
    ];
    let dir = tempfile::tempdir().unwrap();
    let node = ServerProcess::start_on(
        dir.path(),
        &client,
        &ops,
        &["--cluster-node-id=1", &common[0], &common[1]],
    )
    .await;
    let dir2 = tempfile::tempdir().unwrap();
    let _node2 = ServerProcess::start_on(
        dir2.path(),
        &format!("127.0.0.1:{}", ports[2]),
        &format!("127.0.0.1:{}", ports[3]),
        &["--cluster-node-id=2", &common[0], &common[1]],
    )
    .await;
    within(async {
        while http(node.http, "GET", "/readyz", &[], None).await.status != 200 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    let placement = Placement::new(
        1,
        (1..=2)
            .map(|id| Node {
                id: NodeId::new(id).unwrap(),
                client_address: "x:1".into(),
                ops_address: "x:2".into(),
            })
            .collect(),
    )
    .unwrap();
    let user = (0..)
        .map(|i| format!("user-{i}"))
        .find(|u| placement.home_of_user(u).get() == 2)
        .unwrap();
    let before = scrape_redirects(node.http, 2).await;
    let err = within(Client::connect_and_authenticate(
        &client,
        &token(&user),
        "phone",
        0,
    ))
    .await
    .err()
    .expect("a redirect loop");
    match err {
        ClientError::TooManyRedirects(r) => assert_eq!(r.node_id, "2"),
        other => panic!("expected TooManyRedirects, got {other}"),
    }
    // The first connection and MAX_REDIRECTS more, each redirected.
    assert_eq!(
        scrape_redirects(node.http, 2).await,
        before + MAX_REDIRECTS as u64 + 1
    );
}

#[tokio::test]
async fn ferry_chat_follows_the_redirect() {
    let cluster = TestCluster::start(3).await;
    let (home, user) = one_user_per_node(&cluster).remove(0);
    let wrong = *cluster.nodes.keys().find(|&&id| id != home).unwrap();
    let out = within(
        tokio::process::Command::new(ferry_binary())
            .arg("chat")
            .arg(format!("--server={}", cluster.nodes[&wrong].addr))
            .args(["--uid", &user, "--to", &user, "--send", "hello home"])
            .env("FERRY_JWT_SECRET", TEST_SECRET)
            .env_remove("FERRY_TOKEN")
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("sent msg_id="), "{stdout}");
    assert_eq!(scrape_redirects(cluster.nodes[&wrong].http, home).await, 1);
    // The message is in the user's inbox at home, and only there.
    let mut at_home = Client::connect(cluster.nodes[&home].addr).await.unwrap();
    let ok = within(at_home.authenticate(&token(&user), "phone", 0))
        .await
        .unwrap();
    assert!(ok.max_seq >= 1, "{ok:?}");
}

/// Runs `ferry serve` with `args` (and a fresh data dir), expecting it to
/// refuse to start; returns its stderr.
async fn refused(args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = within(
        tokio::process::Command::new(ferry_binary())
            .arg("serve")
            .args(["--listen=127.0.0.1:0", "--http-listen=127.0.0.1:0"])
            .arg(format!("--data-dir={}", dir.path().display()))
            .arg(format!("--jwt-secret={TEST_SECRET}"))
            .args(args)
            .env_remove("FERRY_CONFIG")
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .unwrap();
    assert!(!out.status.success(), "started with {args:?}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("ferry listening"),
        "listened with {args:?}"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn bad_cluster_configs_are_refused_at_start() {
    let nodes = "1@127.0.0.1:7600@127.0.0.1:7601,2@127.0.0.1:7610@127.0.0.1:7611";
    let nsqd = "--cluster-nsqd-tcp-addresses=127.0.0.1:4150";
    let cases: [(Vec<String>, &str); 5] = [
        (
            vec![
                "--cluster-node-id=3".into(),
                format!("--cluster-nodes={nodes}"),
                nsqd.into(),
            ],
            "cluster.node_id: this node's id 3 is not in the cluster node list",
        ),
        (
            vec![
                "--cluster-node-id=1".into(),
                "--cluster-nodes=1@a:1@a:2,1@b:1@b:2".into(),
                nsqd.into(),
            ],
            "node id 1 is listed twice",
        ),
        (
            vec![
                "--cluster-node-id=1".into(),
                "--cluster-nodes=1@a:1@a:2,2@b@b:2".into(),
                nsqd.into(),
            ],
            "node 2 client_address `b` is not host:port",
        ),
        (
            vec![
                "--cluster-node-id=1".into(),
                format!("--cluster-nodes={nodes}"),
            ],
            "cluster.nsqd_tcp_addresses: at least one",
        ),
        (
            vec![
                "--cluster-node-id=1024".into(),
                format!("--cluster-nodes={nodes}"),
                nsqd.into(),
            ],
            "node id 1024 is out of range",
        ),
    ];
    for (args, message) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let stderr = refused(&args).await;
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
    // The file form, the same checks.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ferry.toml");
    std::fs::write(
        &file,
        "[cluster]\nnode_id = 2\nnsqd_tcp_addresses = [\"127.0.0.1:4150\"]\n\n\
         [[cluster.nodes]]\nid = 1\nclient_address = \"127.0.0.1:7600\"\nops_address = \"127.0.0.1:7601\"\n",
    )
    .unwrap();
    let stderr = refused(&[&format!("--config={}", file.display())]).await;
    assert!(stderr.contains("this node's id 2 is not in"), "{stderr}");
}

/// `ferry-bench conns` pointed at one node of the cluster opens every
/// connection, following the redirects, and counts them.
#[tokio::test]
async fn the_bench_harness_follows_redirects_into_a_cluster() {
    let cluster = TestCluster::start(3).await;
    let entry = &cluster.nodes[&1];
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("conns.json");
    let out = within(
        tokio::process::Command::new(ferry_binary().with_file_name("ferry-bench"))
            .arg("conns")
            .arg(format!("--server={}", entry.addr))
            .arg(format!("--http={}", entry.http))
            .arg(format!("--jwt-secret={TEST_SECRET}"))
            .args(["--n=300", "--hold=1", "--ramp=2000"])
            .arg(format!("--json={}", json.display()))
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let conns = &report["results"][0];
    assert_eq!(conns["connected"], 300, "{conns}");
    assert_eq!(conns["connect_failures"], 0, "{conns}");
    let redirected = scrape_redirects(entry.http, 2).await + scrape_redirects(entry.http, 3).await;
    assert!(redirected > 0);
    assert_eq!(conns["redirects"], redirected, "{conns}");
}
