//! Backups and restore (issue 15 part 2, docs/OPERATIONS.md "Backups and
//! restore"), with real `ferry` processes: messages are sent, the node is
//! backed up through `POST /admin/backup` while it serves, more messages
//! are sent, the node is killed with SIGKILL, its data dir wiped and
//! restored with `ferry restore`; every message acknowledged before the
//! backup is there, and the restored node never hands out a seq or a
//! message id it (or the lost tail) handed out before.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;

use ferry_e2e::*;
use ferry_protocol::client::Client;
use ferry_protocol::proto::{self, frame::Body};

fn token(user: &str) -> String {
    ferry_gateway::auth::TokenVerifier::new(TEST_SECRET.as_bytes()).mint(user, None, 600)
}

async fn login(addr: SocketAddr, user: &str) -> (Client, proto::AuthOk) {
    let mut client = Client::connect(addr).await.expect("connect");
    let ok = within(client.authenticate(&token(user), "phone", 0))
        .await
        .expect("auth");
    (client, ok)
}

/// Sends `n` messages from `client` to `to`, each acknowledged, with
/// client ids from `first_cid`; returns the acks.
async fn send_acked(client: &mut Client, to: &str, first_cid: u64, n: u64) -> Vec<proto::SendAck> {
    let mut acks = Vec::new();
    for cid in first_cid..first_cid + n {
        client
            .send(proto::Send {
                client_msg_id: cid,
                to: Some(proto::Conversation {
                    kind: proto::ConversationKind::Direct as i32,
                    id: to.into(),
                }),
                content_type: "text/plain".into(),
                body: format!("m{cid}").into_bytes().into(),
            })
            .await
            .expect("send");
        acks.push(await_ack(client, cid).await);
    }
    acks
}

/// The whole login sync of a fresh login (last_seq 0).
async fn login_sync(client: &mut Client) -> Vec<proto::Deliver> {
    let mut entries = Vec::new();
    loop {
        match within(client.recv_frame()).await.expect("recv") {
            Body::SyncBatch(b) if b.request_id == 0 => {
                entries.extend(b.entries);
                if !b.has_more {
                    return entries;
                }
            }
            Body::Pong(_) => {}
            other => panic!("expected the login sync, got {}", other.kind_name()),
        }
    }
}

/// Runs `ferry` with `args` to completion and returns its stdout.
async fn ferry(args: &[&str]) -> String {
    let out = tokio::process::Command::new(ferry_binary())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("run ferry");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "ferry {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Bytes of the files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| {
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                dir_bytes(&e.path())
            } else {
                meta.len()
            }
        })
        .sum()
}

fn wipe(dir: &Path) {
    std::fs::remove_dir_all(dir).expect("wipe the data dir");
    std::fs::create_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_restored_node_keeps_what_was_acked_before_the_backup_and_reuses_no_seq_or_id() {
    let data = tempfile::tempdir().unwrap();
    let backups = tempfile::tempdir().unwrap();
    let backup_flag = format!("--backup-dir={}", backups.path().display());
    let flags = [backup_flag.as_str()];
    let mut server = ServerProcess::start(data.path(), &flags).await;

    let (mut alice, _) = login(server.addr, "alice").await;
    let before = send_acked(&mut alice, "bob", 1, 5).await;
    let r = admin(server.http, "POST", "/admin/backup", None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["backup_id"], 1);
    // Acked after the backup: lost by the restore, but their seqs and ids
    // were handed out.
    let after = send_acked(&mut alice, "bob", 6, 5).await;
    // A second backup would be incremental; this one only proves the ids go on.
    let (mut bob, _) = login(server.addr, "bob").await;
    let bob_before_crash = login_sync(&mut bob).await;
    assert_eq!(bob_before_crash.len(), 10);
    let bob_max = bob_before_crash.iter().map(|e| e.seq).max().unwrap();
    let alice_max = after.iter().map(|a| a.seq).max().unwrap();
    let ids_before_crash: HashSet<u64> = before.iter().chain(&after).map(|a| a.msg_id).collect();
    let max_id = *ids_before_crash.iter().max().unwrap();

    server.child.start_kill().expect("SIGKILL");
    let _ = server.child.wait().await;
    drop((alice, bob));
    wipe(data.path());
    let out = ferry(&[
        "restore",
        &format!("--from={}", backups.path().display()),
        &format!("--data-dir={}", data.path().display()),
    ])
    .await;
    assert!(out.contains("backup 1"), "{out}");

    let server = ServerProcess::start(data.path(), &flags).await;
    // Everything acked before the backup is there, in bob's inbox and in
    // the conversation; nothing after it.
    let (mut bob, ok) = login(server.addr, "bob").await;
    let restored = login_sync(&mut bob).await;
    let restored_ids: Vec<u64> = restored.iter().map(|e| e.msg_id).collect();
    let expected: Vec<u64> = before.iter().map(|a| a.msg_id).collect();
    assert_eq!(restored_ids, expected, "bob's inbox as backed up");
    assert_eq!(ok.max_seq, 5);

    // New messages: seqs past anything handed out before the crash (for
    // both inboxes), ids never seen and greater than all of them.
    let (mut alice, _) = login(server.addr, "alice").await;
    login_sync(&mut alice).await;
    let new = send_acked(&mut alice, "bob", 100, 3).await;
    for ack in &new {
        assert!(
            ack.seq > alice_max,
            "alice's seq {} reused (max {alice_max})",
            ack.seq
        );
        assert!(
            !ids_before_crash.contains(&ack.msg_id),
            "msg id {} reused",
            ack.msg_id
        );
        assert!(ack.msg_id > max_id);
    }
    assert!(
        new.windows(2)
            .all(|w| w[1].seq == w[0].seq + 1 && w[1].msg_id > w[0].msg_id)
    );
    let mut seen = 0;
    while seen < new.len() {
        match within(bob.recv_frame()).await.expect("recv") {
            Body::Deliver(d) => {
                assert!(
                    d.seq > bob_max,
                    "bob's seq {} reused (max {bob_max})",
                    d.seq
                );
                assert_eq!(d.msg_id, new[seen].msg_id);
                seen += 1;
            }
            // The jump is a gap to the connection: the server fills it with a sync.
            Body::SyncBatch(b) => {
                for d in b.entries {
                    assert!(
                        d.seq > bob_max,
                        "bob's seq {} reused (max {bob_max})",
                        d.seq
                    );
                    assert_eq!(d.msg_id, new[seen].msg_id);
                    seen += 1;
                }
            }
            Body::Pong(_) => {}
            other => panic!("unexpected {}", other.kind_name()),
        }
    }
}

#[tokio::test]
async fn a_stopped_node_is_backed_up_by_the_command_and_backups_are_incremental() {
    let data = tempfile::tempdir().unwrap();
    let backups = tempfile::tempdir().unwrap();
    let backup_flag = format!("--backup-dir={}", backups.path().display());
    let mut server = ServerProcess::start(data.path(), &[backup_flag.as_str()]).await;
    let (mut alice, _) = login(server.addr, "alice").await;
    let first = send_acked(&mut alice, "bob", 1, 3).await;
    let r = admin(server.http, "POST", "/admin/backup", None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let second = send_acked(&mut alice, "bob", 4, 3).await;
    drop(alice);
    // A graceful stop, then the command on the stopped node's data dir.
    server.signal(libc::SIGTERM);
    let status = within(server.child.wait()).await.expect("wait");
    assert!(status.success(), "{status:?}");
    let out = ferry(&[
        "backup",
        &format!("--data-dir={}", data.path().display()),
        &format!("--to={}", backups.path().display()),
    ])
    .await;
    assert!(out.contains("backup 2"), "{out}");
    let listed = ferry(&[
        "restore",
        "--list",
        &format!("--from={}", backups.path().display()),
    ])
    .await;
    assert_eq!(listed.lines().count(), 2, "{listed}");
    // Incremental: the second backup shares the first one's table files,
    // so the dir holds less than the two backups' sizes added up.
    let sizes: u64 = listed
        .lines()
        .map(|l| {
            let bytes = l.rsplit(", ").next().unwrap();
            bytes.trim_end_matches(" bytes").parse::<u64>().unwrap()
        })
        .sum();
    assert!(
        dir_bytes(backups.path()) < sizes,
        "{} bytes on disk for backups of {sizes} bytes",
        dir_bytes(backups.path())
    );

    // Restore the newest into a fresh data dir: everything is there.
    let fresh = tempfile::tempdir().unwrap();
    ferry(&[
        "restore",
        &format!("--from={}", backups.path().display()),
        &format!("--data-dir={}", fresh.path().display()),
    ])
    .await;
    // Restoring over a database is refused.
    let over = tokio::process::Command::new(ferry_binary())
        .args([
            "restore",
            &format!("--from={}", backups.path().display()),
            &format!("--data-dir={}", fresh.path().display()),
        ])
        .output()
        .await
        .unwrap();
    assert!(!over.status.success());
    let server = ServerProcess::start(fresh.path(), &[]).await;
    let (mut bob, _) = login(server.addr, "bob").await;
    let entries = login_sync(&mut bob).await;
    let ids: Vec<u64> = entries.iter().map(|e| e.msg_id).collect();
    let expected: Vec<u64> = first.iter().chain(&second).map(|a| a.msg_id).collect();
    assert_eq!(ids, expected);
    // Without a backup_dir the admin call says so.
    let r = admin(server.http, "POST", "/admin/backup", None).await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.json()["code"], "no_backup_dir");

    // Pruning: a third backup keeping one leaves only itself.
    let out = ferry(&[
        "backup",
        &format!("--data-dir={}", data.path().display()),
        &format!("--to={}", backups.path().display()),
        "--keep=1",
    ])
    .await;
    assert!(out.contains("backup 3"), "{out}");
    let listed = ferry(&[
        "restore",
        "--list",
        &format!("--from={}", backups.path().display()),
    ])
    .await;
    assert_eq!(listed.lines().count(), 1, "{listed}");
    assert!(listed.starts_with("backup 3:"), "{listed}");
}

/// Sends `n` direct messages from `client` to `to`, each acknowledged;
/// returns their msg ids.
async fn send_direct(client: &mut Client, to: &str, first_cid: u64, n: u64) -> Vec<u64> {
    send_acked(client, to, first_cid, n)
        .await
        .iter()
        .map(|a| a.msg_id)
        .collect()
}

/// Reads a connection's entries (login sync, live pushes, gap syncs) until
/// every id of `want` has come; fails on a message entry seen twice, on a
/// seq that does not increase, and on a message of `gone`. Other messages
/// (the user's own sent copies) are let through. Returns the last seq seen.
async fn receive_exactly(
    client: &mut Client,
    mut last_seq: u64,
    want: &[u64],
    gone: &[u64],
) -> u64 {
    let mut seen = HashSet::new();
    let mut wanted = 0;
    let mut take = |d: proto::Deliver, seen: &mut HashSet<u64>, wanted: &mut usize| {
        assert!(d.seq > last_seq, "seq {} after {last_seq}", d.seq);
        last_seq = d.seq;
        if d.kind() == proto::EntryKind::Message {
            assert!(!gone.contains(&d.msg_id), "message {} is back", d.msg_id);
            assert!(
                seen.insert(d.msg_id),
                "message {} delivered twice",
                d.msg_id
            );
            *wanted += usize::from(want.contains(&d.msg_id));
        }
    };
    while wanted < want.len() {
        match within(client.recv_frame()).await.expect("recv") {
            Body::Deliver(d) => take(d, &mut seen, &mut wanted),
            Body::SyncBatch(b) => b
                .entries
                .into_iter()
                .for_each(|d| take(d, &mut seen, &mut wanted)),
            Body::Error(e) => panic!("error {:?}: {}", e.code(), e.message),
            _ => {}
        }
    }
    last_seq
}

/// Restoring one node of a cluster (docs/OPERATIONS.md "Backups and
/// restore", docs/CLUSTER.md §2.6): node 1 is backed up, more messages
/// cross in both directions (its peers then hold nothing it confirmed),
/// it is killed, wiped and restored. Links both ways must flow again:
/// the peers' links into it skip the gap it lost with its tail, its own
/// links start a new epoch the peers take, and no device gets a message
/// twice.
#[tokio::test]
async fn a_restored_cluster_node_links_with_its_peers_again_both_ways() {
    let backups = tempfile::tempdir().unwrap();
    let backup_flag = format!("--backup-dir={}", backups.path().display());
    let mut cluster = ferry_e2e::cluster::TestCluster::start_with(3, &[backup_flag.as_str()]).await;
    let r_user = cluster.user_on(1, "rita");
    let x_user = cluster.user_on(2, "xavi");
    let y_user = cluster.user_on(3, "yuki");
    let mut r = cluster.login_home(&r_user, "phone", 0).await;
    let mut x = cluster.login_home(&x_user, "phone", 0).await;
    let mut y = cluster.login_home(&y_user, "phone", 0).await;
    let (mut r_seq, mut x_seq, mut y_seq) = (0, 0, 0);

    // Before the backup: both ways, delivered live.
    // (A sender reads its acks before its deliveries: receive first.)
    let x_to_r = send_direct(&mut x, &r_user, 1, 3).await;
    let y_to_r = send_direct(&mut y, &r_user, 1, 2).await;
    let before_r: Vec<u64> = x_to_r.iter().chain(&y_to_r).copied().collect();
    r_seq = receive_exactly(&mut r, r_seq, &before_r, &[]).await;
    let r_to_x = send_direct(&mut r, &x_user, 1, 3).await;
    let r_to_y = send_direct(&mut r, &y_user, 101, 2).await;
    x_seq = receive_exactly(&mut x, x_seq, &r_to_x, &[]).await;
    y_seq = receive_exactly(&mut y, y_seq, &r_to_y, &[]).await;

    let ops = cluster.ops(1);
    let b = admin(ops, "POST", "/admin/backup", None).await;
    assert_eq!(b.status, 200, "{}", b.body);

    // After the backup: applied and confirmed both ways, then lost by the
    // restore on node 1 (its peers have trimmed what it confirmed).
    let lost_x_to_r = send_direct(&mut x, &r_user, 10, 4).await;
    let lost_y_to_r = send_direct(&mut y, &r_user, 10, 2).await;
    let lost_r: Vec<u64> = lost_x_to_r.iter().chain(&lost_y_to_r).copied().collect();
    receive_exactly(&mut r, r_seq, &lost_r, &[]).await;
    let lost_r_to_x = send_direct(&mut r, &x_user, 10, 4).await;
    let lost_r_to_y = send_direct(&mut r, &y_user, 110, 2).await;
    x_seq = receive_exactly(&mut x, x_seq, &lost_r_to_x, &[]).await;
    y_seq = receive_exactly(&mut y, y_seq, &lost_r_to_y, &[]).await;
    // Wait until the peers' outboxes toward node 1 are confirmed (empty).
    for peer in [2u16, 3] {
        within(async {
            loop {
                let m = http(cluster.ops(peer), "GET", "/metrics", &[], None).await;
                if m.body
                    .lines()
                    .any(|l| l == "ferry_bus_outbox_entries{peer=\"1\"} 0")
                {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        })
        .await;
    }

    cluster.kill(1).await;
    drop(r);
    let db = cluster.data_dir(1).to_path_buf();
    wipe(&db);
    ferry(&[
        "restore",
        &format!("--from={}", backups.path().display()),
        &format!("--data-dir={}", db.display()),
    ])
    .await;
    cluster.restart(1).await;

    // Everything acked before the backup is readable on the restored node,
    // once; what came after it is gone.
    let mut r = cluster.login_home(&r_user, "tablet", 0).await;
    let r_seq = receive_exactly(&mut r, 0, &before_r, &lost_r).await;

    // Into the restored node, live, from both peers.
    let new_x_to_r = send_direct(&mut x, &r_user, 20, 3).await;
    let new_y_to_r = send_direct(&mut y, &r_user, 20, 2).await;
    let new_r: Vec<u64> = new_x_to_r.iter().chain(&new_y_to_r).copied().collect();
    receive_exactly(&mut r, r_seq, &new_r, &lost_r).await;
    // Out of it, live, to both peers: nothing twice on their devices.
    let new_r_to_x = send_direct(&mut r, &x_user, 30, 3).await;
    let new_r_to_y = send_direct(&mut r, &y_user, 130, 2).await;
    receive_exactly(&mut x, x_seq, &new_r_to_x, &[]).await;
    receive_exactly(&mut y, y_seq, &new_r_to_y, &[]).await;

    // And by sync: fresh devices read every inbox whole, each message once.
    let mut x2 = cluster.login_home(&x_user, "tablet", 0).await;
    let all_x: Vec<u64> = [&r_to_x, &lost_r_to_x, &new_r_to_x]
        .into_iter()
        .flatten()
        .copied()
        .collect();
    receive_exactly(&mut x2, 0, &all_x, &[]).await;
    let mut y2 = cluster.login_home(&y_user, "tablet", 0).await;
    let all_y: Vec<u64> = [&r_to_y, &lost_r_to_y, &new_r_to_y]
        .into_iter()
        .flatten()
        .copied()
        .collect();
    receive_exactly(&mut y2, 0, &all_y, &[]).await;
    let mut r2 = cluster.login_home(&r_user, "laptop", 0).await;
    let all_r: Vec<u64> = before_r.iter().chain(&new_r).copied().collect();
    receive_exactly(&mut r2, 0, &all_r, &lost_r).await;
}
