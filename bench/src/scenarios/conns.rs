//! `conns`: N authenticated idle connections held for T seconds with
//! heartbeats flowing. Measures the connect+auth rate and the server's
//! memory per connection; every connection must survive and every Ping
//! must be answered. With `--login-sync` each client logs in as a real one
//! does (the login sync on) and counts as connected once it has read the
//! sync's last page; `--in-flight` bounds the handshakes at once, so a
//! reconnect storm can be reproduced.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::bail;
use ferry_protocol::client::FrameReader;
use ferry_protocol::proto::{Frame, frame::Body};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::mpsc;

use crate::clients::{
    Conn, Drops, Fleet, Tokens, WriterStats, describe_end, open_all_limited, read_login_sync,
    spawn_writer, wait_until,
};
use crate::hist::Hist;
use crate::payload::now_ns;
use crate::report::{Outcome, Table, count, latency_cell, mib, usage_rows};
use crate::server_metrics::ServerFigures;
use crate::target::{CommonArgs, Target};
use crate::worker::{self, Io, Pool};

/// Options of `conns`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnsArgs {
    /// Connections (users) to open.
    #[arg(long, default_value_t = 18_000)]
    pub n: u32,
    /// Seconds to hold them once all are open.
    #[arg(long, default_value_t = 60)]
    pub hold: u64,
    /// Log in with the login sync on (no `skip_sync`), as a reconnecting
    /// client does, and read the sync before counting as connected.
    #[arg(long)]
    pub login_sync: bool,
    /// Handshakes (connect + login) in flight at once, over all processes.
    #[arg(long, default_value_t = 512)]
    pub in_flight: u32,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// One worker's part.
#[derive(Debug, Serialize, Deserialize)]
pub struct Job {
    fleet: Fleet,
    hold_secs: u64,
    login_sync: bool,
    in_flight: u32,
}

#[derive(Debug, Serialize, Deserialize)]
enum Cmd {
    Connect,
    Hold,
    Close,
}

#[derive(Debug, Serialize, Deserialize)]
struct Connected {
    ok: u32,
    failed: u32,
    retries: u32,
    /// Redirects followed to the users' home nodes (cluster mode).
    redirects: u64,
    first_error: Option<String>,
    setup_hist: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Held {
    drops: u64,
    first_drop: Option<String>,
    pings: u64,
    pongs: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Closed;

/// Shared by a worker's connections.
#[derive(Default)]
struct State {
    drops: Drops,
    pongs: AtomicU64,
    writer: Arc<WriterStats>,
}

async fn read_loop(mut reader: FrameReader, state: Arc<State>) {
    loop {
        let frame = reader.recv().await;
        match &frame {
            Ok(Some(Frame {
                body: Some(Body::Pong(_)),
            })) => {
                state.pongs.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Ok(Some(Frame {
                body: Some(Body::Error(e)),
            })) if !e.closing => continue,
            Ok(Some(Frame {
                body: Some(Body::Kick(_) | Body::Error(_)),
            }))
            | Ok(None)
            | Err(_) => {}
            Ok(Some(_)) => continue,
        }
        state.drops.record(describe_end(frame));
        return;
    }
}

/// The worker side.
pub async fn worker(job: Job, io: &mut Io) -> anyhow::Result<()> {
    let tokens = Arc::new(Tokens::mint(&job.fleet));
    let Cmd::Connect = io.recv().await? else {
        bail!("expected Connect")
    };
    let state = Arc::new(State::default());
    let fleet = Arc::new(job.fleet);
    let ping = Duration::from_secs(fleet.ping_secs);
    let login_sync = job.login_sync;
    let opened = {
        let (state, fleet) = (state.clone(), fleet.clone());
        let users = fleet.users.clone();
        let ramp = fleet.ramp_per_sec;
        open_all_limited(users, ramp, job.in_flight as usize, move |i| {
            let (state, fleet, tokens) = (state.clone(), fleet.clone(), tokens.clone());
            async move {
                let (mut reader, writer, _ok) = fleet.login(&tokens, i, 0, !login_sync).await?;
                if login_sync {
                    read_login_sync(&mut reader).await?;
                }
                let (tx, rx) = mpsc::channel(8);
                let w = spawn_writer(writer, i, rx, ping, state.writer.clone());
                let r = tokio::spawn(read_loop(reader, state));
                Ok(Conn::new(tx, w, r))
            }
        })
        .await
    };
    io.reply(&Connected {
        ok: opened.conns.len() as u32,
        failed: opened.failed,
        retries: opened.retries,
        redirects: crate::clients::redirects_followed(),
        first_error: opened.first_error.clone(),
        setup_hist: opened.setup_hist.to_hex(),
    })
    .await?;

    let Cmd::Hold = io.recv().await? else {
        bail!("expected Hold")
    };
    tokio::time::sleep(Duration::from_secs(job.hold_secs)).await;
    // Pings still in flight get the recommended 10 s to be answered.
    wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        state.pongs.load(Ordering::Relaxed) >= state.writer.pings.load(Ordering::Relaxed)
    })
    .await;
    io.reply(&Held {
        drops: state.drops.count(),
        first_drop: state.drops.first(),
        pings: state.writer.pings.load(Ordering::Relaxed),
        pongs: state.pongs.load(Ordering::Relaxed),
    })
    .await?;

    let Cmd::Close = io.recv().await? else {
        bail!("expected Close")
    };
    state.drops.closing.store(true, Ordering::Relaxed);
    drop(opened);
    io.reply(&Closed).await
}

/// Runs `conns` and prints its table.
pub async fn run(args: &ConnsArgs) -> anyhow::Result<Outcome> {
    let common = &args.common;
    anyhow::ensure!(args.n >= 1, "--n must be at least 1");
    anyhow::ensure!(args.in_flight >= 1, "--in-flight must be at least 1");
    if common.harness.ping_secs >= args.hold {
        eprintln!(
            "conns: note: --ping-secs {} ≥ --hold {}: no heartbeat will be sent while holding",
            common.harness.ping_secs, args.hold
        );
    }
    let mut target = Target::open(common).await?;
    let spread = target.spread("connections", args.n);
    // Let the freshly started server settle before measuring its baseline.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = target.sampler.server_rss_now();

    let slices = worker::slices(args.n, common.harness.per_process);
    let workers = slices.len();
    let jobs = slices
        .into_iter()
        .map(|users| {
            worker::Job::Conns(Job {
                fleet: target.fleet(common, users, args.n, workers),
                hold_secs: args.hold,
                login_sync: args.login_sync,
                // Split like the ramp; every process keeps at least one.
                in_flight: args.in_flight.div_ceil(workers as u32),
            })
        })
        .collect();
    let mut pool = Pool::start(jobs).await?;
    target.sampler.add_harness(pool.pids());
    eprintln!(
        "conns: opening {} connections at {}/s ({} in flight, login sync {}) over {} process(es)…",
        args.n,
        common.harness.ramp,
        args.in_flight,
        if args.login_sync { "on" } else { "off" },
        workers
    );

    let t0 = now_ns();
    let connected: Vec<Connected> = pool.ask(&Cmd::Connect).await?;
    let t1 = now_ns();
    let rss_connected = target.sampler.server_rss_now();
    target.check_alive()?;
    eprintln!("conns: holding for {} s…", args.hold);
    let metrics_before = target.scrape().await;
    let held: Vec<Held> = pool.ask(&Cmd::Hold).await?;
    let t2 = now_ns();
    // Before the scrape: serving `/metrics` wakes a blocking-pool thread,
    // whose allocator heap may then reclaim and free memory that idle
    // connections alone would keep holding.
    let rss_after = target.sampler.server_rss_now();
    let server = ServerFigures::between(metrics_before.as_ref(), target.scrape().await.as_ref());
    target.check_alive()?;
    let _: Vec<Closed> = pool.ask(&Cmd::Close).await?;
    pool.finish().await?;
    let connect_usage = target.sampler.usage(t0, t1).await;
    let hold_usage = target.sampler.usage(t1, t2).await;
    let describe = target.describe();
    let processes = target.close().await;

    let ok: u32 = connected.iter().map(|c| c.ok).sum();
    let failed: u32 = connected.iter().map(|c| c.failed).sum();
    let retries: u32 = connected.iter().map(|c| c.retries).sum();
    let redirects: u64 = connected.iter().map(|c| c.redirects).sum();
    let mut setup = Hist::new();
    for c in &connected {
        setup.merge(&Hist::from_hex(&c.setup_hist)?);
    }
    let connect_secs = (t1 - t0) as f64 / 1e9;
    let rate = ok as f64 / connect_secs;
    let drops: u64 = held.iter().map(|h| h.drops).sum();
    let pings: u64 = held.iter().map(|h| h.pings).sum();
    let pongs: u64 = held.iter().map(|h| h.pongs).sum();
    let failed_pings = pings.saturating_sub(pongs);
    let per_conn_at = |after: Option<u64>| match (rss_before, after) {
        (Some(b), Some(a)) if ok > 0 => Some((a as f64 - b as f64) * 1024.0 / ok as f64),
        _ => None,
    };
    // The figure: what the idle connections hold once the storm is over
    // (idle blocking threads have ended by then, after 10 s).
    let per_conn = per_conn_at(rss_after);
    let per_conn_connected = per_conn_at(rss_connected);
    let per_conn_cell = |b: Option<f64>| {
        b.map(|b| format!("{:.1} KiB ({b:.0} bytes)", b / 1024.0))
            .unwrap_or_else(|| "n/a".into())
    };
    let to_mib = |k: Option<u64>| k.map(|k| k as f64 / 1024.0);

    let mut t = Table::new(format!(
        "conns: {} connections held {} s",
        args.n, args.hold
    ));
    t.row(
        "connected",
        format!("{} of {}", count(ok as u64), count(args.n as u64)),
    )
    .row("connect failures", failed)
    .row("connect retries", retries)
    .row("redirects followed (cluster)", redirects)
    .row("processes", workers)
    .row(
        "login",
        if args.login_sync {
            "with the login sync"
        } else {
            "skip_sync"
        },
    )
    .row("handshakes in flight (max)", args.in_flight)
    .row(
        "connect+auth rate",
        format!(
            "{rate:.0} conns/s (ramp {}/s, {connect_secs:.2} s)",
            common.harness.ramp
        ),
    )
    .row(
        "connect+auth latency p50/p99/p99.9/max",
        latency_cell(&setup.summary()),
    )
    .row("server RSS before", mib(to_mib(rss_before)))
    .row("server RSS just connected", mib(to_mib(rss_connected)))
    .row("server RSS after the hold", mib(to_mib(rss_after)))
    .row(
        "server memory per connection just connected",
        per_conn_cell(per_conn_connected),
    )
    .row(
        "server memory per connection (after the hold)",
        per_conn_cell(per_conn),
    )
    .row("pings sent / pongs received", format!("{pings} / {pongs}"))
    .row("drops (closed by server)", drops)
    .row("failed pings", failed_pings);
    usage_rows(&mut t, "connecting", &connect_usage);
    usage_rows(&mut t, "holding", &hold_usage);
    server.add_rows(&mut t);
    t.print();
    crate::report::process_table(&processes).print();

    let mut failures = Vec::new();
    if failed > 0 {
        failures.push(format!(
            "{failed} connections failed: {}",
            connected
                .iter()
                .find_map(|c| c.first_error.clone())
                .unwrap_or_default()
        ));
    }
    if drops > 0 {
        failures.push(format!(
            "{drops} connections dropped: {}",
            held.iter()
                .find_map(|h| h.first_drop.clone())
                .unwrap_or_default()
        ));
    }
    if failed_pings > 0 {
        failures.push(format!("{failed_pings} pings got no pong"));
    }
    let json = json!({
        "target": describe,
        "n": args.n,
        "hold_secs": args.hold,
        "ping_secs": common.harness.ping_secs,
        "ramp_per_sec": common.harness.ramp,
        "login_sync": args.login_sync,
        "in_flight": args.in_flight,
        "processes": workers,
        "connected": ok,
        "connect_failures": failed,
        "connect_retries": retries,
        "redirects": redirects,
        "connect_secs": connect_secs,
        "connect_rate_per_sec": rate,
        "connect_latency": setup.summary(),
        "server_rss_before_mib": to_mib(rss_before),
        "server_rss_connected_mib": to_mib(rss_connected),
        "server_rss_after_mib": to_mib(rss_after),
        "server_bytes_per_connection_connected": per_conn_connected,
        "server_bytes_per_connection": per_conn,
        "pings_sent": pings,
        "pongs_received": pongs,
        "failed_pings": failed_pings,
        "drops": drops,
        "usage_connecting": connect_usage,
        "usage_holding": hold_usage,
        "server_metrics_holding": server,
        "spread_by_node": spread,
        "processes": processes,
    });
    Ok(Outcome {
        name: "conns",
        json,
        failures,
    })
}
