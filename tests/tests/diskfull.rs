//! A full disk: a real `ferry` process whose data dir and log file are on a
//! small tmpfs that fills up, as in the first soak attempt (issue 15, part
//! 5), where `ferry_connections_open` climbed to 9,432 with ~1,900 sockets.
//!
//! Needs `mount -t tmpfs` (root). Without it the test says it is skipped,
//! and why, and passes.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_e2e::{ServerProcess, TEST_SECRET, admin, assert_alive, http, within};
use ferry_protocol::client::Client;
use ferry_protocol::proto::{self, frame::Body};

/// A tmpfs mounted on a fresh temporary directory, unmounted on drop (also
/// when the test fails).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `"24m"`), or says why it cannot.
    fn mount(size: &str) -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: the server may still hold files on it while it is killed.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Writes zeros to `path` until the file system is full; returns the bytes
/// written.
fn fill(path: &Path) -> u64 {
    let mut file = std::fs::File::create(path).expect("create the filler");
    let chunk = vec![0u8; 256 * 1024];
    let mut written = 0u64;
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling the disk: {e}"),
        }
    }
    top_up(&mut file) + written
}

/// Appends single bytes to `file` until not one more fits: the page a file
/// ends in has room the disk's free space does not show.
fn top_up(file: &mut std::fs::File) -> u64 {
    let mut written = 0;
    while let Ok(1..) = file.write(b"\n") {
        written += 1;
    }
    written
}

fn token(user: &str) -> String {
    ferry_gateway::auth::TokenVerifier::new(TEST_SECRET.as_bytes()).mint(user, None, 600)
}

async fn login(addr: SocketAddr, user: &str) -> Client {
    let mut client = within(Client::connect(addr)).await.expect("connect");
    let ok = within(client.authenticate(&token(user), "phone", 0))
        .await
        .expect("auth");
    assert_eq!(ok.user_id, user);
    client
}

/// The value of the unlabelled metric `name` on `/metrics`.
async fn metric(http_addr: SocketAddr, name: &str) -> f64 {
    let r = http(http_addr, "GET", "/metrics", &[], None).await;
    assert_eq!(r.status, 200);
    r.body
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not on /metrics"))
}

/// (`ferry_connections_open` on /metrics, `connections_open` of /admin/stats).
async fn connections_open(http_addr: SocketAddr) -> (u64, u64) {
    let gauge = metric(http_addr, "ferry_connections_open").await as u64;
    let stats = admin(http_addr, "GET", "/admin/stats", None).await.json();
    let held = stats["connections_open"]
        .as_u64()
        .expect("connections_open");
    (gauge, held)
}

/// Polls until both connection counts equal `live`, proving the live
/// clients alive (Ping/Pong, which also keeps their heartbeat) each round;
/// fails after `limit` with the last counts.
async fn await_connections(
    http_addr: SocketAddr,
    live: &mut [Client],
    limit: Duration,
) -> (u64, u64) {
    let want = live.len() as u64;
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        for client in live.iter_mut() {
            assert_alive(client).await;
        }
        let counts = connections_open(http_addr).await;
        if counts == (want, want) || tokio::time::Instant::now() >= deadline {
            return counts;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn direct(to: &str, cid: u64) -> proto::Send {
    proto::Send {
        client_msg_id: cid,
        to: Some(proto::Conversation {
            kind: proto::ConversationKind::Direct as i32,
            id: to.into(),
        }),
        content_type: "text/plain".into(),
        body: format!("message {cid} on a full disk").into_bytes().into(),
    }
}

/// Reads until the answer to Send `cid`: its ack or an error echoing it.
async fn send_answer(client: &mut Client, cid: u64) -> Body {
    loop {
        match within(client.recv_frame()).await.expect("recv") {
            Body::SendAck(ack) if ack.client_msg_id == cid => return Body::SendAck(ack),
            Body::Error(e) if e.client_msg_id == cid => return Body::Error(e),
            _ => continue,
        }
    }
}

/// With the data dir and the server's log on a full disk, connections that
/// leave (closed by the client, or by the heartbeat) are released, a Send
/// is answered (an error or an ack, never silence), and new clients are
/// still served.
///
/// Before the fix, a log line that failed to write (ENOSPC) panicked the
/// code that logged it: every connection task at "connection open" or
/// "connection closed" (the socket and slot freed by the unwinding, but
/// the gauge never decremented and the session left registered), and the
/// committer at "commit failed" (every later Send unanswered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_released_and_sends_answered_on_a_full_disk() {
    let disk = match Tmpfs::mount("24m") {
        Ok(disk) => disk,
        Err(why) => {
            eprintln!("SKIPPED connections_are_released_and_sends_answered_on_a_full_disk: {why}");
            return;
        }
    };
    let data: PathBuf = disk.path().join("data");
    let log_path = disk.path().join("server.log");
    // Appending, as the server's own writes do: what the test appends to
    // fill the log's last page is not overwritten.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .expect("log file");
    // Silence for 3 × 1 s closes a connection.
    let server = ServerProcess::start_logging_to(&data, &["--heartbeat-secs=1"], log, "info").await;

    let mut live = vec![
        login(server.addr, "alice").await,
        login(server.addr, "bob").await,
    ];
    let leavers = vec![
        login(server.addr, "carol").await,
        login(server.addr, "dave").await,
        login(server.addr, "erin").await,
    ];
    let silent = vec![
        login(server.addr, "frank").await,
        login(server.addr, "grace").await,
        login(server.addr, "heidi").await,
    ];
    assert_eq!(connections_open(server.http).await, (8, 8));

    let filled = fill(&disk.path().join("filler"));
    assert!(filled > 0, "the tmpfs was already full");
    // And the log's last page: the server's next log line fails.
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(&log_path)
        .expect("log file");
    top_up(&mut log);

    // A Send on the full disk is answered (stored in what RocksDB still
    // had room for, or refused), never left unanswered.
    let alice = &mut live[0];
    alice.send(direct("bob", 1)).await.expect("send");
    match send_answer(alice, 1).await {
        Body::SendAck(_) => {}
        Body::Error(e) => assert_eq!(
            e.code(),
            ferry_protocol::ErrorCode::Unavailable,
            "{}",
            e.message
        ),
        _ => unreachable!(),
    }

    // Three clients leave; three more go silent and are closed by the
    // heartbeat (their sockets are kept open, unread, by the test).
    drop(leavers);
    let (gauge, held) = await_connections(server.http, &mut live, Duration::from_secs(20)).await;
    assert_eq!(
        (gauge, held),
        (2, 2),
        "ferry_connections_open and /admin/stats connections_open must come back to the 2 \
         live clients once the others left or were closed by the heartbeat"
    );
    let online = admin(server.http, "GET", "/admin/stats", None).await.json();
    assert_eq!(online["sessions_online"], 2, "stale sessions: {online}");

    // A new client is served on the full disk, and released when it leaves.
    let mut late = login(server.addr, "ivan").await;
    assert_alive(&mut late).await;
    drop(late);
    assert_eq!(
        await_connections(server.http, &mut live, Duration::from_secs(10)).await,
        (2, 2)
    );

    // The server is still answering Sends after all that.
    let bob = &mut live[1];
    bob.send(direct("alice", 2)).await.expect("send");
    within(send_answer(bob, 2)).await;

    // The log did fail (the test made the condition it is about).
    assert!(
        metric(server.http, "ferry_log_lines_dropped_total").await > 0.0,
        "no log line was dropped: the disk did not fill"
    );
    drop(silent);
    drop(server);
    drop(disk);
}
