//! Helpers for the end-to-end tests in `tests/tests/`: a real server on
//! port 0 (in this process, or the `ferry` binary as a child process), real
//! TCP clients, and assertions on the exact frames a client receives.

pub mod cluster;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use ferry_gateway::Server;
use ferry_gateway::auth::TokenVerifier;
use ferry_gateway::config::Config;
use ferry_protocol::ErrorCode;
use ferry_protocol::client::{Client, ClientError};
use ferry_protocol::proto::{self, frame::Body};
use ferry_router::Router;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The secret every test server uses.
pub const TEST_SECRET: &str = "test-secret-0123456789abcdef";

/// The admin API token every test server uses.
pub const TEST_ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// How long a test waits for an expected frame before failing.
pub const WAIT: Duration = Duration::from_secs(10);

/// A server running inside the test process.
pub struct TestServer {
    /// Client address.
    pub addr: SocketAddr,
    /// Ops HTTP address.
    pub http: SocketAddr,
    /// The server's router (to look at sessions).
    pub router: Arc<Router>,
    /// Mints tokens the server accepts.
    pub tokens: TokenVerifier,
    /// The data directory (kept alive with the server).
    pub dir: Arc<tempfile::TempDir>,
    stop: Option<oneshot::Sender<()>>,
    join: Option<JoinHandle<()>>,
}

/// A test configuration: loopback, port 0, a temp data dir.
pub fn test_config(dir: &std::path::Path) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        jwt_secret: Some(TEST_SECRET.into()),
        admin_token: Some(TEST_ADMIN_TOKEN.into()),
        ..Config::default()
    }
}

impl TestServer {
    /// Starts a server with the default test configuration.
    pub async fn start() -> TestServer {
        TestServer::start_with(|_| {}).await
    }

    /// Starts a server after `tweak` adjusts the configuration.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestServer {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        let mut config = test_config(dir.path());
        tweak(&mut config);
        TestServer::start_in(config, dir).await
    }

    /// Starts a server with exactly `config`, keeping `dir` alive.
    pub async fn start_in(config: Config, dir: Arc<tempfile::TempDir>) -> TestServer {
        let listen = config.listen.addr().expect("a plain client port");
        let listener = TcpListener::bind(listen).await.expect("bind");
        let http = TcpListener::bind(config.http_listen)
            .await
            .expect("bind http");
        let addr = listener.local_addr().unwrap();
        let http_addr = http.local_addr().unwrap();
        let secret = config.jwt_secret.clone().unwrap_or(TEST_SECRET.into());
        let tokens = config.token_verifier(secret.as_bytes());
        let router = ferry_gateway::open_router(&config).expect("open storage");
        let server = Server::new(config, router.clone(), tokens.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let join = tokio::spawn(async move {
            server
                .run(listener, http, async {
                    let _ = stopped.await;
                })
                .await
        });
        TestServer {
            addr,
            http: http_addr,
            router,
            tokens,
            dir,
            stop: Some(stop),
            join: Some(join),
        }
    }

    /// A valid token for `user`.
    pub fn token(&self, user: &str) -> String {
        self.tokens.mint(user, None, 3600)
    }

    /// A raw, unauthenticated connection.
    pub async fn connect(&self) -> Client {
        Client::connect(self.addr).await.expect("connect")
    }

    /// A connection authenticated as `user` on `device`.
    pub async fn login(&self, user: &str, device: &str) -> Client {
        let mut client = self.connect().await;
        let ok = within(client.authenticate(&self.token(user), device, 0))
            .await
            .expect("auth");
        assert_eq!(ok.user_id, user);
        client
    }

    /// A raw connection whose socket receive buffer is about `bytes`
    /// (the kernel may double it): a client that does not read then stops
    /// the server's writes after little data, instead of megabytes.
    pub async fn connect_small_window(&self, bytes: u32) -> Client {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(bytes).expect("SO_RCVBUF");
        let stream = within(socket.connect(self.addr)).await.expect("connect");
        Client::from_stream(stream, ferry_protocol::FrameCodec::default())
    }

    /// Logs `user` in, retrying while the server answers
    /// `TOO_MANY_CONNECTIONS` (a slot frees when a closed connection is
    /// cleaned up, which the test cannot observe directly).
    pub async fn login_once_a_slot_frees(&self, user: &str, device: &str) -> Client {
        within(async {
            loop {
                let mut c = self.connect().await;
                match c.authenticate(&self.token(user), device, 0).await {
                    Ok(_) => break c,
                    Err(e) => assert_eq!(e.code(), Some(ErrorCode::TooManyConnections)),
                }
            }
        })
        .await
    }

    /// Stops the server (graceful shutdown) and waits for it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(join) = self.join.take() {
            within(join).await.expect("server task");
        }
    }
}

/// Awaits `f`, failing the test after [`WAIT`].
pub async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(WAIT, f)
        .await
        .expect("timed out waiting")
}

/// Reads frames until an `Error` or `Kick` and returns its code; fails on
/// anything else except Pong and SyncBatch (which may precede it).
pub async fn next_error_code(client: &mut Client) -> ErrorCode {
    loop {
        match within(client.recv_frame()).await {
            Ok(Body::Error(e)) => return e.code(),
            Ok(Body::Kick(k)) => return k.reason(),
            Ok(Body::SyncBatch(_)) => continue,
            Ok(other) => panic!("expected an error, got {}", other.kind_name()),
            Err(e) => panic!("expected an error, got {e}"),
        }
    }
}

/// Asserts the server closes the connection (EOF or reset) without sending
/// anything but Pongs and (login) SyncBatches.
pub async fn expect_closed(client: &mut Client) {
    loop {
        match within(client.recv()).await {
            Ok(None) | Err(ClientError::Codec(_)) => return,
            Ok(Some(proto::Frame {
                body: Some(Body::Pong(_) | Body::SyncBatch(_)),
            })) => continue,
            Ok(Some(f)) => panic!("expected close, got {}", f.kind_name()),
            Err(e) => panic!("expected close, got {e}"),
        }
    }
}

/// Reads until the SendAck for `cid`, skipping other frames; fails the
/// test on an `Error`.
pub async fn await_ack(client: &mut Client, cid: u64) -> proto::SendAck {
    loop {
        match within(client.recv_frame()).await.expect("recv") {
            Body::SendAck(ack) if ack.client_msg_id == cid => return ack,
            Body::Error(e) => panic!("send {cid} failed: {:?} {}", e.code(), e.message),
            _ => continue,
        }
    }
}

/// Asserts the next frames are an `Error`/`Kick` with `code`, then a close.
pub async fn expect_error_then_close(client: &mut Client, code: ErrorCode) {
    assert_eq!(next_error_code(client).await, code);
    expect_closed(client).await;
}

/// Round-trips a Ping to prove the connection is alive and served.
pub async fn assert_alive(client: &mut Client) {
    let nonce = rand::random::<u64>();
    client.send(proto::Ping { nonce }).await.expect("send ping");
    loop {
        match within(client.recv()).await.expect("recv") {
            Some(proto::Frame {
                body: Some(Body::Pong(p)),
            }) if p.nonce == nonce => return,
            Some(_) => continue,
            None => panic!("connection closed"),
        }
    }
}

/// The `ferry` binary, built next to the test executable by `make test`
/// (`cargo build --bins` before `cargo test`).
pub fn ferry_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir");
    let bin = dir.join("ferry");
    assert!(
        bin.exists(),
        "{} not found: build it first (`make test` does, or `cargo build --release --bins`)",
        bin.display()
    );
    bin
}

/// A `ferry serve` child process on port 0.
pub struct ServerProcess {
    /// The child.
    pub child: tokio::process::Child,
    /// Client address (the TLS port's when the plain port is off).
    pub addr: SocketAddr,
    /// Ops HTTP address.
    pub http: SocketAddr,
    /// The TLS client port, if the node has one (`--tls-listen`).
    pub tls: Option<SocketAddr>,
}

impl ServerProcess {
    /// Starts `ferry serve` on `data_dir` with extra flags; waits for its
    /// "listening" line.
    pub async fn start(data_dir: &std::path::Path, extra: &[&str]) -> ServerProcess {
        ServerProcess::start_on(data_dir, "127.0.0.1:0", "127.0.0.1:0", extra).await
    }

    /// [`ServerProcess::start`] on the given client and ops listen
    /// addresses (a cluster's nodes must know each other's ports up front).
    pub async fn start_on(
        data_dir: &std::path::Path,
        listen: &str,
        http_listen: &str,
        extra: &[&str],
    ) -> ServerProcess {
        ServerProcess::spawn(
            data_dir,
            listen,
            http_listen,
            extra,
            Stdio::inherit(),
            "warn",
        )
        .await
    }

    /// [`ServerProcess::start`] with the server's log (stderr) written to
    /// `log` at the level `rust_log` (a `RUST_LOG` filter), as a service
    /// manager writes it to a file.
    pub async fn start_logging_to(
        data_dir: &std::path::Path,
        extra: &[&str],
        log: std::fs::File,
        rust_log: &str,
    ) -> ServerProcess {
        let (listen, http) = ("127.0.0.1:0", "127.0.0.1:0");
        ServerProcess::spawn(data_dir, listen, http, extra, Stdio::from(log), rust_log).await
    }

    async fn spawn(
        data_dir: &std::path::Path,
        listen: &str,
        http_listen: &str,
        extra: &[&str],
        stderr: Stdio,
        rust_log: &str,
    ) -> ServerProcess {
        let mut child = tokio::process::Command::new(ferry_binary())
            .arg("serve")
            .arg(format!("--listen={listen}"))
            .arg(format!("--http-listen={http_listen}"))
            .arg(format!("--data-dir={}", data_dir.display()))
            .arg(format!("--jwt-secret={TEST_SECRET}"))
            .arg(format!("--admin-token={TEST_ADMIN_TOKEN}"))
            .arg("--max-connections=10000")
            .args(extra)
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn ferry");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = within(lines.next_line())
            .await
            .expect("read stdout")
            .expect("ferry exited before listening");
        // "ferry listening: clients=127.0.0.1:X ops=http://127.0.0.1:Y[ tls=127.0.0.1:Z]"
        // (clients=off without a plain port)
        let field = |name: &str| -> Option<SocketAddr> {
            let start = line.find(name)? + name.len();
            let rest = &line[start..];
            let end = rest.find(' ').unwrap_or(rest.len());
            rest[..end].parse().ok()
        };
        let tls = field(" tls=");
        let addr = field("clients=")
            .or(tls)
            .expect("a client address in the listening line");
        let http = field("ops=http://").expect("ops address in the listening line");
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        ServerProcess {
            child,
            addr,
            http,
            tls,
        }
    }

    /// Sends a signal to the child.
    pub fn signal(&self, signal: i32) {
        let pid = self.child.id().expect("running") as i32;
        // SAFETY: kill(2) with a pid we own; no memory is involved.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

/// An HTTP response, read whole.
#[derive(Debug)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Header (lower-case name, value) pairs.
    pub headers: Vec<(String, String)>,
    /// The body as text.
    pub body: String,
}

impl HttpResponse {
    /// The body parsed as JSON (fails the test if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }

    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request over a fresh TCP connection (`Connection: close`),
/// with the raw `headers` given, read to the end. Deliberately minimal: the
/// ops server's answers have a Content-Length or are chunked.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> HttpResponse {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = within(tokio::net::TcpStream::connect(addr))
        .await
        .expect("connect to the ops port");
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || method == "POST" {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    within(stream.read_to_end(&mut raw)).await.expect("read");
    let text = String::from_utf8(raw).expect("UTF-8 response");
    let (head, rest) = text.split_once("\r\n\r\n").expect("header end");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        let mut out = String::new();
        let mut rest = rest;
        loop {
            let (size, after) = rest.split_once("\r\n").expect("chunk size");
            let size = usize::from_str_radix(size.trim(), 16).expect("chunk size hex");
            if size == 0 {
                break;
            }
            out.push_str(&after[..size]);
            rest = &after[size + 2..];
        }
        out
    } else {
        rest.to_owned()
    };
    HttpResponse {
        status,
        headers,
        body,
    }
}

/// An admin API call with the test admin token; `body` is sent as JSON.
pub async fn admin(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> HttpResponse {
    let auth = format!("Bearer {TEST_ADMIN_TOKEN}");
    http(
        addr,
        method,
        path,
        &[
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/json"),
        ],
        body,
    )
    .await
}
