//! Child processes that serve: `ferry serve` on a temporary data dir, and
//! the harness's own bare `floor-server`.
//!
//! Both print one line on stdout when their listeners are bound
//! (`ferry listening: clients=ADDR ops=http://ADDR`,
//! `floor listening: idle=ADDR relay=ADDR fanout=ADDR`); [`spawn_listening`]
//! waits for it and parses its `key=value` words. The children bind port 0,
//! so a restart gets new ports and the line is read again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long a child may take to print its listening line.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A started child and its listening line.
pub(crate) struct Listening {
    pub(crate) child: Child,
    pub(crate) pid: u32,
    /// The `key=value` words after the prefix.
    pub(crate) words: HashMap<String, String>,
    /// The line after the prefix.
    pub(crate) rest: String,
}

/// Starts `cmd` and waits for a stdout line beginning with `prefix`.
pub(crate) async fn spawn_listening(
    mut cmd: Command,
    prefix: &str,
    what: &str,
) -> anyhow::Result<Listening> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    let pid = child.id().context("child pid")?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(START_TIMEOUT, async {
        while let Some(line) = lines.next_line().await? {
            if line.starts_with(prefix) {
                return Ok(Some(line));
            }
        }
        Ok::<_, std::io::Error>(None)
    })
    .await;
    let line = match line {
        Ok(Ok(Some(line))) => line,
        Ok(Ok(None)) => {
            let status = child.wait().await.ok();
            bail!("{what} exited before listening (status {status:?})");
        }
        Ok(Err(e)) => bail!("reading the stdout of {what}: {e}"),
        Err(_) => bail!("{what} did not print its listening line within {START_TIMEOUT:?}"),
    };
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let rest = line[prefix.len()..].trim().to_owned();
    let words = rest
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    Ok(Listening {
        child,
        pid,
        words,
        rest,
    })
}

pub(crate) fn addr_word(words: &HashMap<String, String>, key: &str) -> anyhow::Result<SocketAddr> {
    let raw = words
        .get(key)
        .with_context(|| format!("no {key}= in the listening line"))?;
    let raw = raw.strip_prefix("http://").unwrap_or(raw);
    raw.parse()
        .with_context(|| format!("bad address {key}={raw}"))
}

/// Sends SIGTERM and waits up to `grace`, then SIGKILL.
pub(crate) async fn stop_child(child: &mut Child, pid: u32, grace: Duration) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    // SAFETY: kill(2) on the pid of a child we have not reaped yet.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

/// A random secret of 32 hex characters.
pub fn random_secret() -> String {
    let raw: [u8; 16] = rand::random();
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

/// The `ferry` binary next to this executable.
pub fn default_ferry_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the ferry-bench executable")?;
    let bin = exe.with_file_name("ferry");
    anyhow::ensure!(
        bin.exists(),
        "{} not found: build it with `cargo build --release -p ferry-gateway` or pass --ferry-bin",
        bin.display()
    );
    Ok(bin)
}

/// A `ferry serve` child on a temporary data dir (removed on drop).
pub struct FerryServer {
    bin: PathBuf,
    dir: tempfile::TempDir,
    secret: String,
    extra_args: Vec<String>,
    child: Child,
    /// Process id of the running server.
    pub pid: u32,
    /// Client listener.
    pub client_addr: SocketAddr,
    /// Ops HTTP listener.
    pub ops_addr: SocketAddr,
    /// Times the server has been started.
    pub starts: u32,
}

impl FerryServer {
    /// Starts `bin serve` with a fresh data dir under `parent` (the system
    /// temp dir when `None`), a random JWT secret, ports 0 and `extra_args`.
    pub async fn spawn(
        bin: &Path,
        parent: Option<&Path>,
        extra_args: &[String],
    ) -> anyhow::Result<FerryServer> {
        // Write out what earlier runs left behind, above all the deletion of
        // their data dirs: on a filesystem mounted with `discard` the next
        // journal commit performs those discards, and the new server's
        // first fsyncs would wait hundreds of ms for them, inside the
        // measured window.
        // SAFETY: sync(2) takes no arguments and cannot fail.
        unsafe { libc::sync() };
        let builder = {
            let mut b = tempfile::Builder::new();
            b.prefix("ferry-bench-");
            b
        };
        let dir = match parent {
            Some(p) => builder.tempdir_in(p),
            None => builder.tempdir(),
        }
        .context("creating the server's temporary directory")?;
        let secret = random_secret();
        let (child, pid, client_addr, ops_addr) =
            Self::start(bin, dir.path(), &secret, extra_args).await?;
        Ok(FerryServer {
            bin: bin.to_owned(),
            dir,
            secret,
            extra_args: extra_args.to_vec(),
            child,
            pid,
            client_addr,
            ops_addr,
            starts: 1,
        })
    }

    async fn start(
        bin: &Path,
        dir: &Path,
        secret: &str,
        extra_args: &[String],
    ) -> anyhow::Result<(Child, u32, SocketAddr, SocketAddr)> {
        let log_path = dir.join("server.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--listen=127.0.0.1:0")
            .arg("--http-listen=127.0.0.1:0")
            .arg(format!("--data-dir={}", dir.join("data").display()))
            .arg(format!("--jwt-secret={secret}"))
            .args(extra_args)
            .stderr(Stdio::from(log));
        let started = spawn_listening(cmd, "ferry listening:", "ferry serve")
            .await
            .with_context(|| format!("server log: {}", tail(&log_path, 20)))?;
        // With a TLS port (--tls-listen), the harness dials that one.
        let clients = match started.words.get("tls") {
            Some(_) => addr_word(&started.words, "tls")?,
            None => addr_word(&started.words, "clients")?,
        };
        let ops = addr_word(&started.words, "ops")?;
        Ok((started.child, started.pid, clients, ops))
    }

    /// The JWT secret the server verifies tokens with.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// The server's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The last lines of the server's log (stderr).
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.dir.path().join("server.log"), lines)
    }

    /// Whether the process has exited (and how).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// `kill -9`: no shutdown, no flush.
    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        self.child.kill().await.context("kill -9 of the server")
    }

    /// Starts the server again on the same data dir and secret; the ports change.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        let (child, pid, clients, ops) =
            Self::start(&self.bin, self.dir.path(), &self.secret, &self.extra_args).await?;
        self.child = child;
        self.pid = pid;
        self.client_addr = clients;
        self.ops_addr = ops;
        self.starts += 1;
        Ok(())
    }

    /// SIGTERM, then SIGKILL after the server's own shutdown grace.
    pub async fn stop(&mut self) {
        stop_child(&mut self.child, self.pid, Duration::from_secs(15)).await;
    }
}

/// A throwaway CA and a server certificate it signs for `localhost` and
/// `127.0.0.1` (rcgen, made now; the key never leaves the temp dir, which
/// is removed on drop).
pub struct ThrowawayTls {
    dir: tempfile::TempDir,
    /// The CA's PEM, for the clients to trust.
    pub ca_pem: String,
}

impl ThrowawayTls {
    /// Makes the CA and the certificate.
    pub fn new() -> anyhow::Result<ThrowawayTls> {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "ferry-bench throwaway CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
        let leaf_key = KeyPair::generate()?;
        let leaf = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?
            .signed_by(&leaf_key, &ca)?;
        let dir = tempfile::Builder::new()
            .prefix("ferry-bench-tls-")
            .tempdir()
            .context("creating the certificate's temporary directory")?;
        let tls = ThrowawayTls {
            dir,
            ca_pem: ca.pem(),
        };
        std::fs::write(tls.cert_path(), leaf.pem())?;
        std::fs::write(tls.key_path(), leaf_key.serialize_pem())?;
        Ok(tls)
    }

    /// The server's certificate chain (PEM).
    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    /// The server's private key (PEM).
    pub fn key_path(&self) -> PathBuf {
        self.dir.path().join("key.pem")
    }

    /// The `ferry serve` flags for a TLS listener on a free loopback port,
    /// beside the plain one.
    pub fn server_flags(&self) -> Vec<String> {
        vec![
            "--tls-listen=127.0.0.1:0".to_owned(),
            format!("--tls-cert={}", self.cert_path().display()),
            format!("--tls-key={}", self.key_path().display()),
        ]
    }
}

/// The last `n` lines of a file, for error messages.
pub(crate) fn tail(path: &Path, n: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(n);
            format!("{}\n{}", path.display(), lines[start..].join("\n"))
        }
        Err(e) => format!("{}: {e}", path.display()),
    }
}

/// The bare-socket servers of the `floor` scenario, in a child process.
pub struct FloorServer {
    child: Child,
    /// Process id.
    pub pid: u32,
    /// Accepts and holds connections (echoes what it reads).
    pub idle: SocketAddr,
    /// Forwards each frame to a random other connection.
    pub relay: SocketAddr,
    /// Writes each frame to every other connection.
    pub fanout: SocketAddr,
}

impl FloorServer {
    /// Re-executes this binary as `ferry-bench floor-server`.
    pub async fn spawn() -> anyhow::Result<FloorServer> {
        let exe = std::env::current_exe().context("locating the ferry-bench executable")?;
        let mut cmd = Command::new(exe);
        cmd.arg("floor-server").stderr(Stdio::inherit());
        let started = spawn_listening(cmd, "floor listening:", "ferry-bench floor-server").await?;
        Ok(FloorServer {
            idle: addr_word(&started.words, "idle")?,
            relay: addr_word(&started.words, "relay")?,
            fanout: addr_word(&started.words, "fanout")?,
            pid: started.pid,
            child: started.child,
        })
    }

    /// Stops the child.
    pub async fn stop(&mut self) {
        stop_child(&mut self.child, self.pid, Duration::from_secs(5)).await;
    }
}
