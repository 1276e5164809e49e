//! Where the server under test is: a `ferry serve` child started for the
//! run (`--spawn`), a local cluster of N nodes and an nsqd started for the
//! run (`--spawn-cluster N`, see [`crate::cluster`]), or a running server
//! (`--server`, with `--http` for its ops port). Also the options every
//! scenario shares, the token secret, and scraping the server's (every
//! node's) `/metrics`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use serde_json::json;

use crate::cluster::{ClusterMap, Entry, LocalCluster, NsqdKind, fmt_spread};
use crate::procfs::{ProcessFigures, Role, Sampler, Watched};
use crate::server_metrics::{self, Snapshot};
use crate::spawn::{FerryServer, default_ferry_bin};

/// Options of every scenario.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Target a running server at HOST:PORT (its client listener).
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "spawn")]
    pub server: Option<String>,
    /// Start `ferry serve` as a child on a temporary data dir (ports 0, random JWT secret).
    #[arg(long)]
    pub spawn: bool,
    /// Start a local cluster of N `ferry serve` nodes and an nsqd instead (see --nsqd-bin).
    #[arg(long, value_name = "N", conflicts_with_all = ["spawn", "server", "http"])]
    pub spawn_cluster: Option<u16>,
    /// With --spawn-cluster: the nsqd binary [default: `nsqd` on PATH, else the in-repo
    /// NSQ-protocol test double `ferry-nsqd-double` next to this executable].
    #[arg(long, value_name = "PATH")]
    pub nsqd_bin: Option<PathBuf>,
    /// With --spawn-cluster: use the test double `ferry-nsqd-double` even when nsqd is on PATH.
    #[arg(long, conflicts_with = "nsqd_bin")]
    pub nsqd_double: bool,
    /// With --spawn-cluster: the node each client dials first (`home`: its home node, as an
    /// app that asked /v1/route; `spread`: node 1 + index % N, so most logins are redirected).
    #[arg(long, value_enum, default_value = "home")]
    pub entry: Entry,
    /// The ferry binary for --spawn and --spawn-cluster [default: `ferry` next to this executable].
    #[arg(long, value_name = "PATH")]
    pub ferry_bin: Option<PathBuf>,
    /// Directory in which --spawn (--spawn-cluster) creates the server's (nodes') temporary data dir [default: system temp dir].
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// Extra flag for the spawned server (every node), repeatable: --server-arg=--durability=wal.
    #[arg(long = "server-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub server_args: Vec<String>,
    /// With --server: data dir holding jwt.secret (as `ferry token` reads it).
    #[arg(long, value_name = "DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// With --server: the server's JWT secret (instead of --data-dir).
    #[arg(
        long,
        value_name = "S",
        env = "FERRY_JWT_SECRET",
        hide_env_values = true
    )]
    pub jwt_secret: Option<String>,
    /// With --server: pid of the server process, for its CPU and memory figures.
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,
    /// With --server: the server's ops HTTP address (loopback), for its /metrics figures.
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "spawn")]
    pub http: Option<String>,
    /// With --server: allow a server that is not on loopback. Load is traffic:
    /// aim it at another host only when that host is yours to load.
    #[arg(long, conflicts_with = "spawn")]
    pub allow_remote: bool,
    #[command(flatten)]
    pub harness: HarnessArgs,
}

/// Options of the client side, shared by every scenario including `floor`.
#[derive(Debug, Clone, Args)]
pub struct HarnessArgs {
    /// Write every figure as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Spread client sockets over the source addresses 127.0.0.2..=127.0.0.(1+N) (loopback targets only).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub source_ips: u32,
    /// New connections per second while connecting.
    #[arg(long, value_name = "R", default_value_t = 5000.0)]
    pub ramp: f64,
    /// Client connections per harness process; more are spread over worker processes.
    #[arg(long, value_name = "N", default_value_t = 9000)]
    pub per_process: u32,
    /// Each connection sends Ping after this many idle seconds.
    #[arg(long, value_name = "S", default_value_t = 25)]
    pub ping_secs: u64,
    /// Connect with TLS. With --spawn the harness makes a throwaway CA and a
    /// certificate for localhost/127.0.0.1 (rcgen) and starts the server with a
    /// TLS port; with --spawn-cluster every node serves clients on TLS only, at
    /// its client address; with --server give --ca (and --server-name if needed).
    #[arg(long)]
    pub tls: bool,
    /// With --tls --server: PEM file of the CA(s) to trust.
    #[arg(long, value_name = "PEM", requires = "tls")]
    pub ca: Option<PathBuf>,
    /// With --tls: the name to verify in the server's certificate [default: the host dialled].
    #[arg(long, value_name = "NAME", requires = "tls")]
    pub server_name: Option<String>,
}

/// Server flags every spawned server gets unless `--server-arg` sets them.
/// The harness paces every connection far below this frame rate; the
/// default (200/s) would still be tight for short bursts of DeliverAcks.
const SPAWN_DEFAULTS: &[(&str, &str)] = &[("--max-frames-per-sec", "1000")];

/// The server under test, the token secret and the sampler watching both.
pub struct Target {
    /// Client listener address.
    pub addr: SocketAddr,
    /// Ops HTTP address, for `/metrics` (`None`: no server figures).
    pub ops: Option<SocketAddr>,
    /// JWT secret for minting client tokens.
    pub secret: Vec<u8>,
    /// The spawned server, if any.
    pub server: Option<FerryServer>,
    /// The spawned cluster, if any.
    pub cluster: Option<LocalCluster>,
    /// Samples the server and the harness.
    pub sampler: Sampler,
    /// Prefix of every user id of this run, so runs never share inboxes.
    pub run_id: String,
    /// With --tls: what clients trust.
    pub tls: Option<crate::clients::FleetTls>,
    /// With --spawn(-cluster) --tls: the throwaway certificate.
    _tls_certificate: Option<crate::spawn::ThrowawayTls>,
}

impl Target {
    /// Spawns or locates the server and starts sampling.
    pub async fn open(common: &CommonArgs) -> anyhow::Result<Target> {
        let run_id = format!("b{}", &crate::spawn::random_secret()[..8]);
        if let Some(n) = common.spawn_cluster {
            return Target::open_cluster(common, n, run_id).await;
        }
        let mut tls = None;
        let mut tls_certificate = None;
        if common.harness.tls && !common.spawn {
            let path = common
                .harness
                .ca
                .as_ref()
                .context("--tls with --server needs --ca PEM")?;
            let ca_pem = std::fs::read_to_string(path)
                .with_context(|| format!("reading the CA file {}", path.display()))?;
            tls = Some(crate::clients::FleetTls {
                ca_pem,
                server_name: common.harness.server_name.clone(),
            });
        }
        let (addr, ops, secret, server, pid) = if common.spawn {
            let bin = match &common.ferry_bin {
                Some(b) => b.clone(),
                None => default_ferry_bin()?,
            };
            let mut args = spawn_args(common);
            if common.harness.tls {
                let throwaway = crate::spawn::ThrowawayTls::new()?;
                args.extend(throwaway.server_flags());
                tls = Some(crate::clients::FleetTls {
                    ca_pem: throwaway.ca_pem.clone(),
                    server_name: common.harness.server_name.clone(),
                });
                tls_certificate = Some(throwaway);
            }
            let server = FerryServer::spawn(&bin, common.work_dir.as_deref(), &args).await?;
            eprintln!(
                "spawned ferry (pid {}) on {}, data in {}",
                server.pid,
                server.client_addr,
                server.data_dir().display()
            );
            let secret = server.secret().as_bytes().to_vec();
            let (addr, ops, pid) = (server.client_addr, server.ops_addr, server.pid);
            (addr, Some(ops), secret, Some(server), Some(pid))
        } else if let Some(server) = &common.server {
            let addr = resolve(server).await?;
            anyhow::ensure!(
                addr.ip().is_loopback() || common.allow_remote,
                "--server {addr} is not a loopback address; add --allow-remote to load another host"
            );
            let ops = match &common.http {
                Some(http) => {
                    let ops = resolve(http).await?;
                    // The ops port also serves the admin API: the harness
                    // only talks to one on this host.
                    anyhow::ensure!(
                        ops.ip().is_loopback(),
                        "--http must be a loopback address, not {ops}"
                    );
                    Some(ops)
                }
                None => None,
            };
            let (secret, _) = ferry_gateway::auth::load_or_create_secret(
                common.jwt_secret.as_deref(),
                &common.data_dir,
            )
            .context("loading the JWT secret (give --jwt-secret or --data-dir)")?;
            (addr, ops, secret, None, common.server_pid)
        } else {
            bail!("give --spawn, --spawn-cluster N or --server HOST:PORT");
        };
        check_source_ips(common, addr)?;
        if let Some(tls) = &tls {
            crate::clients::use_tls(tls)?;
        }
        let sampler = Sampler::start(Watched {
            server: pid,
            harness: vec![std::process::id()],
        });
        Ok(Target {
            addr,
            ops,
            secret,
            server,
            cluster: None,
            sampler,
            run_id,
            tls,
            _tls_certificate: tls_certificate,
        })
    }

    /// `--spawn-cluster n`: nsqd and n nodes, every one watched.
    async fn open_cluster(common: &CommonArgs, n: u16, run_id: String) -> anyhow::Result<Target> {
        let bin = match &common.ferry_bin {
            Some(b) => b.clone(),
            None => default_ferry_bin()?,
        };
        let nsqd = NsqdKind::choose(common.nsqd_bin.as_deref(), common.nsqd_double)?;
        eprintln!("cluster: the bus runs on {}", nsqd.describe());
        let args = spawn_args(common);
        // With --tls every node serves clients on TLS only, at the client
        // address the node map (and so every redirect) gives.
        let throwaway = if common.harness.tls {
            Some(crate::spawn::ThrowawayTls::new()?)
        } else {
            None
        };
        let cluster = LocalCluster::spawn(
            n,
            &bin,
            common.work_dir.as_deref(),
            &args,
            nsqd,
            common.entry,
            throwaway.as_ref(),
        )
        .await?;
        let tls = throwaway.as_ref().map(|t| crate::clients::FleetTls {
            ca_pem: t.ca_pem.clone(),
            server_name: common.harness.server_name.clone(),
        });
        let first = &cluster.map.nodes()[0];
        let (addr, ops) = (first.client, first.ops);
        eprintln!(
            "spawned a cluster of {n} ferry nodes (nsqd pid {} on {}), in {}:",
            cluster.nsqd.pid,
            cluster.nsqd.tcp,
            cluster.dir().display()
        );
        for node in cluster.map.nodes() {
            eprintln!(
                "  node {}: pid {}, clients {}, ops http://{}",
                node.id, cluster.nodes[&node.id].pid, node.client, node.ops
            );
        }
        check_source_ips(common, addr)?;
        if let Some(tls) = &tls {
            crate::clients::use_tls(tls)?;
        }
        let sampler = Sampler::start(Watched {
            server: None,
            harness: vec![std::process::id()],
        });
        for (id, node) in &cluster.nodes {
            sampler.watch(format!("node {id}"), Role::Server, node.pid);
        }
        sampler.watch(cluster.nsqd.kind.label(), Role::Nsqd, cluster.nsqd.pid);
        Ok(Target {
            addr,
            ops: Some(ops),
            secret: cluster.secret().as_bytes().to_vec(),
            server: None,
            cluster: Some(cluster),
            sampler,
            run_id,
            tls,
            _tls_certificate: throwaway,
        })
    }

    /// The cluster's node map (`--spawn-cluster`), for the clients.
    pub fn map(&self) -> Option<&ClusterMap> {
        self.cluster.as_ref().map(|c| &c.map)
    }

    /// How users `0..n` of this run spread over the nodes (`None` without a
    /// spawned cluster); printed on stderr.
    pub fn spread(&self, what: &str, n: u32) -> Option<BTreeMap<u16, u32>> {
        let map = self.map()?;
        let by = map.spread((0..n).map(|i| crate::clients::user_id(&self.run_id, i)));
        eprintln!("cluster: {what} by home node: {}", fmt_spread(&by));
        Some(by)
    }

    /// Whether the server (or cluster) was started by the harness.
    pub fn spawned(&self) -> bool {
        self.server.is_some() || self.cluster.is_some()
    }

    /// What was measured, for the JSON output.
    pub fn describe(&self) -> serde_json::Value {
        json!({
            "address": self.addr.to_string(),
            "tls": self.tls.is_some(),
            "ops_address": self.ops.map(|a| a.to_string()),
            "spawned": self.spawned(),
            "server_pid": self.server.as_ref().map(|s| s.pid),
            "cluster": self.cluster.as_ref().map(|c| c.describe()),
        })
    }

    /// Fails when a spawned server has died, with the end of its log.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(cluster) = &mut self.cluster
            && let Some(why) = cluster.exited()
        {
            bail!("during the run: {why}");
        }
        if let Some(server) = &mut self.server
            && let Some(status) = server.exited()
        {
            bail!(
                "the server exited during the run ({status}); its log: {}",
                server.log_tail(30)
            );
        }
        Ok(())
    }

    /// The server's `/metrics` now; `None` without an ops address or when
    /// the scrape fails (never an error: the figures are then "n/a").
    /// In a spawned cluster every node's, as one [`Snapshot::of_nodes`]
    /// (`None` when any node's scrape fails).
    pub async fn scrape(&self) -> Option<Snapshot> {
        let Some(cluster) = &self.cluster else {
            return server_metrics::scrape(self.ops?).await;
        };
        let scrapes = cluster
            .map
            .nodes()
            .iter()
            .map(|n| async move { server_metrics::scrape(n.ops).await.map(|s| (n.id, s)) });
        let nodes: Option<Vec<(u16, Snapshot)>> = futures::future::join_all(scrapes)
            .await
            .into_iter()
            .collect();
        nodes.map(Snapshot::of_nodes)
    }

    /// Reads every watched process's CPU time and memory, stops a spawned
    /// server or cluster, and returns the figures (see
    /// [`crate::report::process_table`]).
    pub async fn close(mut self) -> Vec<ProcessFigures> {
        let processes = self.sampler.processes();
        if let Some(server) = &mut self.server {
            server.stop().await;
        }
        if let Some(cluster) = &mut self.cluster {
            cluster.stop().await;
        }
        processes
    }
}

/// `--server-arg`s, and [`SPAWN_DEFAULTS`] where they do not set them.
fn spawn_args(common: &CommonArgs) -> Vec<String> {
    let mut args = common.server_args.clone();
    for (flag, value) in SPAWN_DEFAULTS {
        if !args.iter().any(|a| a.starts_with(flag)) {
            args.push(format!("{flag}={value}"));
        }
    }
    args
}

fn check_source_ips(common: &CommonArgs, addr: SocketAddr) -> anyhow::Result<()> {
    if common.harness.source_ips > 0 {
        anyhow::ensure!(
            addr.ip().is_loopback() && addr.is_ipv4(),
            "--source-ips needs an IPv4 loopback server address, not {addr}"
        );
        anyhow::ensure!(
            common.harness.source_ips <= 250,
            "--source-ips is at most 250"
        );
    }
    Ok(())
}

/// The first address `host_port` resolves to.
async fn resolve(host_port: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(host_port)
        .await
        .with_context(|| format!("resolving {host_port}"))?
        .next()
        .with_context(|| format!("{host_port} resolves to no address"))
}

impl Target {
    /// The [`Fleet`](crate::clients::Fleet) for one worker's slice of `total` users.
    pub fn fleet(
        &self,
        common: &CommonArgs,
        users: std::ops::Range<u32>,
        total: u32,
        workers: usize,
    ) -> crate::clients::Fleet {
        crate::clients::Fleet {
            addr: self.addr,
            cluster: self.map().cloned(),
            secret: self.secret.clone(),
            run_id: self.run_id.clone(),
            users,
            total_users: total,
            source_ips: common.harness.source_ips,
            ramp_per_sec: common.harness.ramp / workers as f64,
            ping_secs: common.harness.ping_secs,
            tls: self.tls.clone(),
        }
    }
}
