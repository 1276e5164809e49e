//! `ferry`: the server binary and its tools.
//!
//! - `ferry serve`: run a node (see `ferry serve --help` for every setting).
//! - `ferry token --uid U`: mint a client token with the node's secret.
//! - `ferry chat`: a terminal client (see `ferry chat --help`).
//! - `ferry backup` / `ferry restore`: back up a stopped node's data dir,
//!   restore one (a running node is backed up with `POST /admin/backup`).

mod allocator;
mod chat;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferry_gateway::auth::{
    SecretSource, TokenVerifier, load_or_create_admin_token, load_or_create_secret,
};
use ferry_gateway::config::{LogFormat, ServeArgs};
use ferry_gateway::server::Listeners;
use ferry_gateway::tls::TlsAcceptor;
use ferry_gateway::{Server, rlimit, server};
use std::net::SocketAddr;
use std::sync::Arc;
use tracing::{error, info, warn};

// With the crate's `override` feature (cli/Cargo.toml) the same allocator
// also serves every malloc/new in the process, RocksDB's included.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "ferry: an instant-messaging gateway engine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a ferry node.
    Serve(Box<ServeArgs>),
    /// Mint a client token (JWT, HS256) with this node's secret.
    Token(TokenArgs),
    /// Chat in the terminal: send to a user or group, see deliveries and acks.
    ///
    /// Interactive by default (type /help). For scripts: --send TEXT (with
    /// --to or --group) waits for the ack; --recv N prints N messages.
    Chat(chat::ChatArgs),
    /// Back up a stopped node's database (and secret files) into a backup
    /// dir; incremental. For a running node use `POST /admin/backup`.
    Backup(BackupArgs),
    /// Restore a backup into a data dir that holds no database; the node
    /// restored hands out seqs and message ids past any it handed out
    /// before (docs/OPERATIONS.md, "Backups and restore").
    Restore(RestoreArgs),
}

#[derive(clap::Args)]
struct BackupArgs {
    /// The stopped node's data directory.
    #[arg(long, env = "FERRY_DATA_DIR", default_value = "./data")]
    data_dir: std::path::PathBuf,
    /// The backup directory (created if missing; earlier backups in it
    /// share unchanged files with the new one).
    #[arg(long)]
    to: std::path::PathBuf,
    /// Keep only this many newest backups in the backup directory once the
    /// new one is verified (0: keep all); the server's `backup_keep`.
    #[arg(long, default_value_t = 7)]
    keep: u32,
}

#[derive(clap::Args)]
struct RestoreArgs {
    /// The backup directory.
    #[arg(long)]
    from: std::path::PathBuf,
    /// The data directory to restore into (must hold no database).
    #[arg(long, env = "FERRY_DATA_DIR", default_value = "./data")]
    data_dir: std::path::PathBuf,
    /// The backup to restore [default: the newest].
    #[arg(long)]
    backup_id: Option<u32>,
    /// Only list the backups in --from.
    #[arg(long)]
    list: bool,
}

#[derive(clap::Args)]
struct TokenArgs {
    /// User id (the token's `sub`).
    #[arg(long)]
    uid: String,
    /// Bind the token to this device id.
    #[arg(long)]
    device: Option<String>,
    /// Validity in seconds.
    #[arg(long, default_value_t = 86_400)]
    ttl_secs: u64,
    /// Data directory holding jwt.secret (created if missing).
    #[arg(long, env = "FERRY_DATA_DIR", default_value = "./data")]
    data_dir: std::path::PathBuf,
    /// Use this secret instead of the data dir's.
    #[arg(long, env = "FERRY_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// Put this key id in the token's header (`kid`): the server's `jwt_kid`.
    #[arg(long, env = "FERRY_JWT_KID")]
    jwt_kid: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Token(args) => token(args),
        Command::Chat(args) => chat(args),
        Command::Backup(args) => backup(args),
        Command::Restore(args) => restore(args),
    }
}

fn backup(args: BackupArgs) -> anyhow::Result<()> {
    let (info, secrets) =
        ferry_gateway::backup_files::backup_stopped(&args.data_dir, &args.to, args.keep as usize)
            .with_context(|| {
            format!(
                "backing up {} into {} (is the node stopped? a running node is backed up with \
                 POST /admin/backup)",
                args.data_dir.display(),
                args.to.display()
            )
        })?;
    println!(
        "backup {} made in {}: {} files, {} bytes; secret files: {}",
        info.id,
        args.to.display(),
        info.files,
        info.size,
        if secrets.is_empty() {
            "none".to_string()
        } else {
            secrets.join(", ")
        }
    );
    Ok(())
}

fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    if args.list {
        let backups = ferry_gateway::backup_files::list(&args.from)
            .with_context(|| format!("listing the backups in {}", args.from.display()))?;
        for b in backups {
            println!(
                "backup {}: made at {} (Unix s), {} files, {} bytes",
                b.id, b.timestamp, b.files, b.size
            );
        }
        return Ok(());
    }
    let (restored, secrets) =
        ferry_gateway::backup_files::restore(&args.from, &args.data_dir, args.backup_id)
            .with_context(|| {
                format!(
                    "restoring {} into {}",
                    args.from.display(),
                    args.data_dir.display()
                )
            })?;
    println!(
        "backup {} (made at {} Unix s) restored into {}; next seqs start at {} or above, \
         message ids above {}; secret files: {}",
        restored.backup.id,
        restored.backup.timestamp,
        args.data_dir.display(),
        restored.seq_floor,
        restored.msg_id_high_water,
        if secrets.is_empty() {
            "none".to_string()
        } else {
            secrets.join(", ")
        }
    );
    Ok(())
}

fn chat(args: chat::ChatArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let result = runtime.block_on(chat::run(args));
    // A blocking read of stdin may still be pending: do not wait for it.
    runtime.shutdown_background();
    if let Err(e) = result {
        // A one-line reason for the person or script, never a backtrace.
        eprintln!("ferry chat: {e}");
        std::process::exit(1);
    }
    Ok(())
}

fn token(args: TokenArgs) -> anyhow::Result<()> {
    let (secret, _) = load_or_create_secret(args.jwt_secret.as_deref(), &args.data_dir)
        .context("loading the JWT secret")?;
    let mut verifier = TokenVerifier::new(&secret);
    if let Some(kid) = &args.jwt_kid {
        verifier = verifier.with_kid(kid);
    }
    println!(
        "{}",
        verifier.mint(&args.uid, args.device.as_deref(), args.ttl_secs)
    );
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Never fails: a log line that cannot be written (stderr on a full
        // disk) is dropped and counted instead of panicking whatever logged.
        .with_writer(|| ferry_gateway::log_output::Stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.resolve()?;
    if args.print_config {
        print!("{}", config.to_toml());
        return Ok(());
    }
    init_logging(config.log_format);

    match rlimit::raise_nofile_to_hard() {
        Ok((before, after)) => {
            info!(before, after, "open-file limit raised to the hard limit");
            // Each connection is one descriptor; keep some for storage and ops.
            let reserve = ferry_gateway::config::STORAGE_MAX_OPEN_FILES as u64 + 256;
            if after < config.max_connections as u64 + reserve {
                warn!(
                    open_files = after,
                    max_connections = config.max_connections,
                    "open-file limit is below max_connections: the OS will refuse \
                     connections first (raise LimitNOFILE / ulimit -n, see docs/OPERATIONS.md)"
                );
            }
        }
        Err(e) => warn!(error = %e, "cannot read or raise the open-file limit"),
    }

    allocator::tune_for_a_server();
    match ferry_gateway::huge_pages::disable() {
        Ok(true) => info!("transparent huge pages turned off for this process"),
        Ok(false) => {}
        Err(e) => warn!(error = %e, "cannot turn transparent huge pages off"),
    }

    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let (secret, source) = load_or_create_secret(config.jwt_secret.as_deref(), &config.data_dir)
        .context("loading the JWT secret")?;
    match &source {
        SecretSource::Configured => info!("JWT secret: from configuration"),
        SecretSource::File(path) => info!(path = %path.display(), "JWT secret: from file"),
        SecretSource::Created(path) => info!(
            path = %path.display(),
            "JWT secret: none configured, created a random one (mode 0600); \
             mint dev tokens with `ferry token --uid <user>`"
        ),
    }
    let (admin_token, source) =
        load_or_create_admin_token(config.admin_token.as_deref(), &config.data_dir)
            .context("loading the admin token")?;
    match &source {
        SecretSource::Configured => info!("admin token: from configuration"),
        SecretSource::File(path) => info!(path = %path.display(), "admin token: from file"),
        SecretSource::Created(path) => info!(
            path = %path.display(),
            "admin token: none configured, created a random one (mode 0600)"
        ),
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(max_blocking_threads())
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async move {
        let bind = |addr: SocketAddr, what: &str| {
            let listener = server::bind_client_listener(addr)
                .with_context(|| format!("binding the {what} listener on {addr}"))?;
            anyhow::Ok(tokio::net::TcpListener::from_std(listener)?)
        };
        let mut listeners = Listeners::default();
        if let Some(addr) = config.listen.addr() {
            listeners.plain = Some(bind(addr, "client")?);
        }
        if let Some(addr) = config.tls_listen.addr() {
            // validate() made sure both files are configured.
            let (cert, key) = (
                config.tls_cert.clone().unwrap_or_default(),
                config.tls_key.clone().unwrap_or_default(),
            );
            let tls = TlsAcceptor::load(&cert, &key).context("loading the TLS certificate")?;
            listeners.tls = Some((bind(addr, "TLS client")?, Arc::new(tls)));
        }
        let http = tokio::net::TcpListener::bind(config.http_listen)
            .await
            .with_context(|| format!("binding the ops listener on {}", config.http_listen))?;
        let router = ferry_gateway::open_router(&config)?;
        let http_addr = http.local_addr()?;
        // Before the "listening" line: a script may signal as soon as it
        // reads it, and a signal that arrives before the handlers exist is lost.
        let shutdown = shutdown_signal().context("installing signal handlers")?;
        // Always: SIGHUP's default action would end the process.
        reload_on_sighup(listeners.tls.as_ref().map(|(_, tls)| tls.clone()))
            .context("installing the SIGHUP handler")?;
        let client_addr = match &listeners.plain {
            Some(l) => l.local_addr()?.to_string(),
            None => "off".to_owned(),
        };
        let tls_addr = match &listeners.tls {
            Some((l, _)) => format!(" tls={}", l.local_addr()?),
            None => String::new(),
        };
        // Tests and scripts read this line to learn the ports (with port 0).
        println!("ferry listening: clients={client_addr} ops=http://{http_addr}{tls_addr}");
        info!(%client_addr, tls = %tls_addr.trim(), %http_addr, data_dir = %config.data_dir.display(), "ferry started");
        let tokens = config.token_verifier(&secret);
        let server = Server::new(config, router, tokens).with_admin_token(&admin_token);
        server.run_on(listeners, http, shutdown).await;
        anyhow::Ok(())
    })?;
    Ok(())
}

/// Reloads the TLS certificate and key on every SIGHUP: new handshakes get
/// the new certificate, open connections keep theirs. A failed reload is
/// logged and keeps the old certificate. Without TLS, SIGHUP is ignored.
fn reload_on_sighup(tls: Option<Arc<TlsAcceptor>>) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let Some(tls) = &tls else {
                info!("SIGHUP: no TLS port, nothing to reload");
                continue;
            };
            match tls.reload() {
                Ok(()) => {
                    ferry_gateway::metrics::tls_cert_reloaded(true);
                    info!(cert = %tls.cert_path().display(), "SIGHUP: TLS certificate reloaded");
                }
                Err(e) => {
                    ferry_gateway::metrics::tls_cert_reloaded(false);
                    error!(error = %e, "SIGHUP: TLS certificate reload failed; keeping the old one");
                }
            }
        }
    });
    Ok(())
}

/// The server's blocking-pool threads: 4 per core, at least 8.
///
/// Only short storage reads run there (the login's `max_seq`, sync and
/// history pages, group lookups, the metrics page), so a few threads per
/// core keep the cores busy. Tokio's default of 512 lets a reconnect storm
/// grow the pool to one thread per login in flight; each thread leaves an
/// allocator heap behind when it ends, which measurably raised the memory
/// every idle connection holds afterwards (docs/BENCHMARKS.md, `conns`).
fn max_blocking_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (4 * cores).max(8)
}

/// Installs the SIGTERM and SIGINT handlers now; the future completes on
/// the first of them.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received"),
            _ = int.recv() => info!("SIGINT received"),
        }
    })
}

#[cfg(test)]
mod allocator_tests {
    /// RocksDB's C++ code allocates through malloc and operator new: with
    /// mimalloc's `override` feature those are mimalloc's (its malloc is an
    /// alias of `mi_malloc`), not glibc's.
    #[test]
    fn malloc_is_mimalloc() {
        let malloc = libc::malloc as *const () as usize;
        let mi_malloc = libmimalloc_sys::mi_malloc as *const () as usize;
        assert_eq!(malloc, mi_malloc, "malloc is not mimalloc's");
        // And it works: a block from malloc is freed by mimalloc.
        unsafe {
            let p = libc::malloc(100);
            assert!(!p.is_null());
            libmimalloc_sys::mi_free(p);
        }
    }
}
