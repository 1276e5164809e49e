//! `ferry chat` as a user runs it: child processes of the release binary
//! against a spawned `ferry serve`, non-interactive (`--send`, `--recv`) and
//! interactive (lines written to its stdin, its stdout read line by line).

use std::process::{Output, Stdio};

use ferry_e2e::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{ChildStdout, Command};

fn chat(server: &ServerProcess) -> Command {
    let mut cmd = Command::new(ferry_binary());
    cmd.arg("chat")
        .arg(format!("--server={}", server.addr))
        .env("FERRY_JWT_SECRET", TEST_SECRET)
        .env_remove("FERRY_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

async fn run(mut cmd: Command) -> Output {
    within(cmd.output()).await.expect("run ferry chat")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Reads stdout lines until one contains `needle`; returns it.
async fn line_with(lines: &mut Lines<BufReader<ChildStdout>>, needle: &str) -> String {
    loop {
        let line = within(lines.next_line())
            .await
            .expect("read chat stdout")
            .unwrap_or_else(|| panic!("chat exited before printing {needle:?}"));
        if line.contains(needle) {
            return line;
        }
    }
}

#[tokio::test]
async fn send_and_recv_between_two_chat_processes() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]).await;
    let bob_token =
        ferry_gateway::auth::TokenVerifier::new(TEST_SECRET.as_bytes()).mint("bob", None, 600);

    // bob waits for three messages (two from alice, one from the system);
    // what arrives before he connects comes with his login sync.
    let mut recv = chat(&server);
    recv.args(["--token", &bob_token, "--recv", "3", "--timeout-secs", "20"]);
    let bob = recv.spawn().expect("spawn bob");

    for (i, body) in ["hello bob", "second line"].iter().enumerate() {
        let mut send = chat(&server);
        send.args(["--uid", "alice", "--to", "bob", "--send", body]);
        let out = run(send).await;
        assert!(out.status.success(), "send failed: {}", text(&out.stderr));
        let stdout = text(&out.stdout);
        // alice's own copy is the i-th entry of her inbox.
        assert!(
            stdout.starts_with("sent msg_id=")
                && stdout.contains(&format!(" seq={} to @bob", i + 1)),
            "{stdout}"
        );
    }
    let r = admin(
        server.http,
        "POST",
        "/admin/users/bob/messages",
        Some(r#"{"text": "welcome aboard"}"#),
    )
    .await;
    assert_eq!(r.status, 200);

    let out = within(bob.wait_with_output()).await.unwrap();
    assert!(out.status.success(), "recv failed: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "[1] @alice alice: hello bob\n[2] @alice alice: second line\n[3] @system system: welcome aboard\n"
    );
}

#[tokio::test]
async fn chat_exits_non_zero_on_errors_and_timeouts() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]).await;

    let mut send = chat(&server);
    send.args(["--uid", "alice", "--group", "nope", "--send", "hi"]);
    let out = run(send).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("server refused: NO_SUCH_GROUP: no group nope"),
        "{}",
        text(&out.stderr)
    );

    let mut bad = chat(&server);
    bad.args(["--token", "not-a-token", "--recv", "1"]);
    let out = run(bad).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("BAD_TOKEN"),
        "{}",
        text(&out.stderr)
    );

    let mut idle = chat(&server);
    idle.args(["--uid", "carol", "--recv", "1", "--timeout-secs", "1"]);
    let out = run(idle).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("timed out after 1 s with 0 of 1 messages received"),
        "{}",
        text(&out.stderr)
    );

    // --uid with neither a secret nor a data dir that has one.
    let empty = tempfile::tempdir().unwrap();
    let mut nosecret = chat(&server);
    nosecret
        .env_remove("FERRY_JWT_SECRET")
        .arg(format!("--data-dir={}", empty.path().display()))
        .args(["--uid", "alice", "--recv", "1"]);
    let out = run(nosecret).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no JWT secret"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        !empty.path().join("jwt.secret").exists(),
        "chat must not create a secret"
    );
}

#[tokio::test]
async fn interactive_chat_sends_syncs_and_shows_history() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]).await;

    // bob, listening for two messages.
    let mut recv = chat(&server);
    recv.args(["--uid", "bob", "--recv", "2", "--timeout-secs", "20"]);
    let bob = recv.spawn().expect("spawn bob");

    let mut alice = chat(&server);
    alice.args(["--uid", "alice"]).stdin(Stdio::piped());
    let mut alice = alice.spawn().expect("spawn alice");
    let mut stdin = alice.stdin.take().unwrap();
    let mut out = BufReader::new(alice.stdout.take().unwrap()).lines();
    let mut say = async |line: &str| {
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("write to chat");
    };

    say("hello without a conversation").await;
    say("/to bob").await;
    say("hi bob, from a terminal").await;
    let sent = line_with(&mut out, "sent msg_id=").await;
    assert!(sent.ends_with(" seq=1 to @bob"), "{sent}");

    say("/history").await;
    assert_eq!(
        line_with(&mut out, "[--]").await,
        "[--] @bob you: hi bob, from a terminal"
    );

    say("/create team bob").await;
    assert_eq!(
        line_with(&mut out, "group team").await,
        "group team: created: alice (owner), bob"
    );
    say("/members").await;
    assert_eq!(
        line_with(&mut out, "group team: members").await,
        "group team: members: alice (owner), bob"
    );
    say("welcome to the team").await;
    line_with(&mut out, "to #team").await;

    // The inbox, replayed: own copy, group creation, own group message.
    say("/sync").await;
    assert_eq!(
        line_with(&mut out, "[1]").await,
        "[1] @bob you: hi bob, from a terminal"
    );
    assert_eq!(
        line_with(&mut out, "[2]").await,
        "[2] #team you created the group"
    );
    assert_eq!(
        line_with(&mut out, "[3]").await,
        "[3] #team you: welcome to the team"
    );
    line_with(&mut out, "sync done: inbox max seq 3").await;

    say("/quit").await;
    let status = within(alice.wait()).await.unwrap();
    assert!(status.success());

    let out = within(bob.wait_with_output()).await.unwrap();
    assert!(out.status.success(), "bob: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "[1] @alice alice: hi bob, from a terminal\n\
         [2] #team alice created the group\n\
         [3] #team alice: welcome to the team\n"
    );
}

#[tokio::test]
async fn piped_input_is_sent_before_chat_exits() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]).await;
    let mut alice = chat(&server);
    alice
        .args(["--uid", "alice", "--to", "bob"])
        .stdin(Stdio::piped());
    let mut alice = alice.spawn().unwrap();
    let mut stdin = alice.stdin.take().unwrap();
    stdin.write_all(b"one\ntwo\nthree\n").await.unwrap();
    drop(stdin); // end of input: chat waits for the acks, then exits
    let out = within(alice.wait_with_output()).await.unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).matches("sent msg_id=").count(), 3);

    let mut bob = chat(&server);
    bob.args(["--uid", "bob", "--recv", "3"]);
    let out = run(bob).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "[1] @alice alice: one\n[2] @alice alice: two\n[3] @alice alice: three\n"
    );
}
