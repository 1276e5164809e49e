//! A reconnect storm against the `ferry` binary: many logins at once, each
//! with the login sync. The server's blocking pool (where the login's
//! storage reads run) must stay within its cap instead of growing a thread
//! per login in flight: every thread that ends leaves an allocator heap
//! behind, memory the idle connections then appear to hold
//! (docs/BENCHMARKS.md, `conns`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use ferry_e2e::*;
use ferry_protocol::client::Client;
use ferry_protocol::proto::frame::Body;

/// Logins in the storm (fewer if this process may not open that many
/// sockets).
const STORM: usize = 2000;

/// Logins under way at once: as many as the listen backlog surely takes
/// (more make connects fail on a loaded machine), and still far more than
/// the pool's cap.
const IN_FLIGHT: usize = 128;

/// Threads of process `pid`, from `/proc`.
fn threads(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("Threads line")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_storm_does_not_grow_the_blocking_pool_past_its_cap() {
    // The clients' sockets are this process's: raise its open-file limit
    // as the server does its own.
    let (_, soft) = ferry_gateway::rlimit::raise_nofile_to_hard().expect("RLIMIT_NOFILE");
    let storm = STORM.min((soft as usize).saturating_sub(200)).max(100);
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]).await;
    let pid = server.child.id().expect("running");
    let tokens = ferry_gateway::auth::TokenVerifier::new(TEST_SECRET.as_bytes());
    // One login first, so that whatever a first login starts lazily is
    // part of the baseline.
    let token = tokens.mint("warmup", None, 3600);
    let mut warm = Client::connect(server.addr).await.unwrap();
    within(warm.authenticate(&token, "phone", 0)).await.unwrap();
    let baseline = threads(pid);

    // Sample the thread count while the storm runs (an async task, so a
    // failing login cannot leave it running).
    let peak = Arc::new(AtomicUsize::new(baseline));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(threads(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let tokens: Vec<String> = (0..storm)
        .map(|i| tokens.mint(&format!("u{i}"), None, 3600))
        .collect();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let logins: Vec<_> = tokens
        .into_iter()
        .map(|token| {
            let addr = server.addr;
            let in_flight = in_flight.clone();
            tokio::spawn(async move {
                let _permit = in_flight.acquire_owned().await.unwrap();
                let mut c = Client::connect(addr).await.unwrap();
                within(c.authenticate(&token, "phone", 0)).await.unwrap();
                // The login sync to its last page.
                loop {
                    if let Body::SyncBatch(b) = within(c.recv_frame()).await.unwrap()
                        && !b.has_more
                    {
                        return c;
                    }
                }
            })
        })
        .collect();
    let mut clients = Vec::with_capacity(storm);
    for login in logins {
        clients.push(login.await.unwrap());
    }
    done.store(true, Ordering::Relaxed);
    sampler.await.unwrap();

    // The cap `ferry serve` sets: 4 per core, at least 8.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cap = (4 * cores).max(8);
    let peak = peak.load(Ordering::Relaxed);
    assert_eq!(clients.len(), storm);
    assert!(
        peak <= baseline + cap,
        "{storm} logins grew the server from {baseline} to {peak} threads \
         (blocking pool cap {cap})"
    );
}
