//! A local cluster for `--spawn-cluster N`: an nsqd (a real `nsqd` from
//! `PATH` when there is one, else the in-repo NSQ-protocol TEST DOUBLE
//! `ferry-nsqd-double`) and N `ferry serve` nodes with one generated
//! `[cluster]` configuration; and [`ClusterMap`], which tells the harness
//! (and its worker processes) every user's home node.
//!
//! The nodes must know each other's addresses before any of them starts,
//! so their ports are chosen up front: free ports *below* the kernel's
//! ephemeral range (`net.ipv4.ip_local_port_range`). A port inside it could
//! be taken as the local port of one of the harness's own outgoing
//! connections while a killed node is down, and its restart on the same
//! port would then fail.
//!
//! ```text
//! <work dir>/ferry-bench-cluster-XXXX/
//!     nsqd/            data path of a real nsqd; nsqd.log (stderr of either)
//!     node-1/ferry.toml, node-1/data/, node-1/server.log
//!     node-2/…
//! ```

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use ferry_cluster::{Node, NodeId, Placement};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::process::{Child, Command};

use crate::server_metrics::get_any;
use crate::spawn::{random_secret, spawn_listening, stop_child, tail};

/// How long a node may take to answer `/readyz` with 200 after it started
/// (RocksDB open, the bus connected, the node list confirmed by a majority).
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long nsqd may take to accept connections.
const NSQD_TIMEOUT: Duration = Duration::from_secs(30);

/// Which node a client dials first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Entry {
    /// The user's home node, as an app that asked `/v1/route` first: no redirect.
    Home,
    /// Node `1 + index % N`: about (N-1)/N of the logins are redirected.
    Spread,
}

/// One node's addresses.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeAddr {
    /// Node id.
    pub id: u16,
    /// Client listener.
    pub client: SocketAddr,
    /// Ops HTTP listener.
    pub ops: SocketAddr,
}

/// The cluster as the harness sees it: the nodes, the placement every node
/// computes (so the harness knows each user's home), and which node a
/// client dials first. Sent to worker processes as its node list.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "MapSpec", into = "MapSpec")]
pub struct ClusterMap {
    nodes: Vec<NodeAddr>,
    entry: Entry,
    placement: Placement,
}

/// [`ClusterMap`] on the wire: the placement is computed again from the nodes.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct MapSpec {
    nodes: Vec<NodeAddr>,
    entry: Entry,
}

impl TryFrom<MapSpec> for ClusterMap {
    type Error = String;

    fn try_from(spec: MapSpec) -> Result<ClusterMap, String> {
        ClusterMap::new(spec.nodes, spec.entry).map_err(|e| format!("{e:#}"))
    }
}

impl From<ClusterMap> for MapSpec {
    fn from(map: ClusterMap) -> MapSpec {
        MapSpec {
            nodes: map.nodes,
            entry: map.entry,
        }
    }
}

impl ClusterMap {
    /// The map of `nodes` (sorted by id).
    pub fn new(mut nodes: Vec<NodeAddr>, entry: Entry) -> anyhow::Result<ClusterMap> {
        nodes.sort_by_key(|n| n.id);
        let list = nodes
            .iter()
            .map(|n| {
                Ok(Node {
                    id: NodeId::new(n.id).with_context(|| format!("node id {}", n.id))?,
                    client_address: n.client.to_string(),
                    ops_address: n.ops.to_string(),
                })
            })
            .collect::<anyhow::Result<Vec<Node>>>()?;
        let first = nodes.first().context("a cluster needs a node")?.id;
        let placement = Placement::new(first, list).context("the cluster's node list")?;
        Ok(ClusterMap {
            nodes,
            entry,
            placement,
        })
    }

    /// The nodes, by id.
    pub fn nodes(&self) -> &[NodeAddr] {
        &self.nodes
    }

    /// The home node of `user_id` (as every node computes it).
    pub fn home(&self, user_id: &str) -> u16 {
        self.placement.home_of_user(user_id).get()
    }

    /// The owner node of `group_id`.
    pub fn owner(&self, group_id: &str) -> u16 {
        self.placement.owner_of_group(group_id).get()
    }

    /// The address user `user_id` (global index `index`) dials first.
    pub fn dial(&self, user_id: &str, index: u32) -> SocketAddr {
        let id = match self.entry {
            Entry::Home => self.home(user_id),
            Entry::Spread => self.nodes[index as usize % self.nodes.len()].id,
        };
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .map_or(self.nodes[0].client, |n| n.client)
    }

    /// How many of `users` are homed on each node.
    pub fn spread(&self, users: impl Iterator<Item = String>) -> BTreeMap<u16, u32> {
        let mut by: BTreeMap<u16, u32> = self.nodes.iter().map(|n| (n.id, 0)).collect();
        for u in users {
            *by.entry(self.home(&u)).or_default() += 1;
        }
        by
    }
}

/// `1: 3,340 · 2: 3,301 · 3: 3,359` for the reports.
pub fn fmt_spread(by: &BTreeMap<u16, u32>) -> String {
    by.iter()
        .map(|(id, n)| format!("node {id}: {}", crate::report::count(*n as u64)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Which nsqd runs the bus.
#[derive(Debug, Clone)]
pub enum NsqdKind {
    /// A real nsqd binary.
    Real(PathBuf),
    /// The in-repo NSQ-protocol TEST DOUBLE (`ferry-nsqd-double`).
    Double(PathBuf),
}

impl NsqdKind {
    /// The nsqd to use: `explicit` if given, else `nsqd` from `PATH`
    /// (unless `force_double`), else `ferry-nsqd-double` next to this executable.
    pub fn choose(explicit: Option<&Path>, force_double: bool) -> anyhow::Result<NsqdKind> {
        if let Some(bin) = explicit {
            return Ok(NsqdKind::Real(bin.to_owned()));
        }
        if !force_double && let Some(bin) = find_in_path("nsqd") {
            return Ok(NsqdKind::Real(bin));
        }
        let exe = std::env::current_exe().context("locating the ferry-bench executable")?;
        let bin = exe.with_file_name("ferry-nsqd-double");
        anyhow::ensure!(
            bin.exists(),
            "no nsqd on PATH and {} not found: build it with `cargo build --release --workspace` \
             or give --nsqd-bin",
            bin.display()
        );
        Ok(NsqdKind::Double(bin))
    }

    /// For the reports.
    pub fn describe(&self) -> String {
        match self {
            NsqdKind::Real(bin) => format!("nsqd ({})", bin.display()),
            NsqdKind::Double(bin) => format!(
                "ferry-nsqd-double, the in-repo NSQ-protocol TEST DOUBLE ({}), not a real nsqd",
                bin.display()
            ),
        }
    }

    /// `nsqd` or `nsqd-double`, for the JSON.
    pub fn label(&self) -> &'static str {
        match self {
            NsqdKind::Real(_) => "nsqd",
            NsqdKind::Double(_) => "nsqd-double",
        }
    }
}

/// `name` in a directory of `PATH`, if there.
fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// The running nsqd.
pub struct Nsqd {
    child: Child,
    /// Process id.
    pub pid: u32,
    /// TCP address (what the nodes publish to and consume from).
    pub tcp: SocketAddr,
    /// Real or double.
    pub kind: NsqdKind,
}

/// One running node.
pub struct NodeProc {
    child: Child,
    /// Process id of the current incarnation.
    pub pid: u32,
    /// Times started.
    pub starts: u32,
}

/// `n` free loopback ports below the ephemeral range (see the module docs);
/// from the ephemeral range itself if the range cannot be read.
pub fn pick_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok());
    let mut held = Vec::with_capacity(n);
    let mut ports = Vec::with_capacity(n);
    if let Some(low) = low.filter(|&l| l > 2048) {
        let floor = low.saturating_sub(20_000).max(1024);
        for _ in 0..20 * n {
            if ports.len() == n {
                break;
            }
            let port = rand::random_range(floor..low);
            if ports.contains(&port) {
                continue;
            }
            if let Ok(l) = TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
                held.push(l);
                ports.push(port);
            }
        }
    }
    while ports.len() < n {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding a free port")?;
        let port = l.local_addr()?.port();
        if !ports.contains(&port) {
            ports.push(port);
        }
        held.push(l);
    }
    Ok(ports)
}

/// nsqd, then N nodes; stopped (and the directory removed) on drop.
pub struct LocalCluster {
    // Fields drop in this order: the processes (killed) before the
    // directory holding their data is removed.
    /// Node id → process.
    pub nodes: BTreeMap<u16, NodeProc>,
    /// The bus.
    pub nsqd: Nsqd,
    /// The nodes' addresses and the placement.
    pub map: ClusterMap,
    bin: PathBuf,
    secret: String,
    extra_args: Vec<String>,
    dir: tempfile::TempDir,
}

impl LocalCluster {
    /// Starts nsqd and nodes `1..=n` under a new temporary directory in
    /// `parent`, and waits until every node's `/readyz` answers 200.
    pub async fn spawn(
        n: u16,
        bin: &Path,
        parent: Option<&Path>,
        extra_args: &[String],
        nsqd: NsqdKind,
        entry: Entry,
        tls: Option<&crate::spawn::ThrowawayTls>,
    ) -> anyhow::Result<LocalCluster> {
        anyhow::ensure!((1..=64).contains(&n), "--spawn-cluster is 1..=64 nodes");
        // As for one server (spawn.rs): write out what earlier runs left.
        // SAFETY: sync(2) takes no arguments and cannot fail.
        unsafe { libc::sync() };
        let dir = {
            let mut b = tempfile::Builder::new();
            b.prefix("ferry-bench-cluster-");
            match parent {
                Some(p) => b.tempdir_in(p),
                None => b.tempdir(),
            }
        }
        .context("creating the cluster's temporary directory")?;
        let ports = pick_ports(2 + 2 * n as usize)?;
        let at = |p: u16| SocketAddr::from((Ipv4Addr::LOCALHOST, p));
        let nsqd = start_nsqd(nsqd, dir.path(), at(ports[0]), at(ports[1])).await?;
        let nodes: Vec<NodeAddr> = (1..=n)
            .map(|id| {
                let i = 2 * id as usize;
                NodeAddr {
                    id,
                    client: at(ports[i]),
                    ops: at(ports[i + 1]),
                }
            })
            .collect();
        let map = ClusterMap::new(nodes, entry)?;
        let secret = random_secret();
        let admin_token = random_secret();
        for node in map.nodes() {
            let node_dir = dir.path().join(format!("node-{}", node.id));
            std::fs::create_dir_all(&node_dir)
                .with_context(|| format!("creating {}", node_dir.display()))?;
            let toml = node_toml(&map, node, &node_dir, nsqd.tcp, &admin_token, tls);
            std::fs::write(node_dir.join("ferry.toml"), toml).context("writing ferry.toml")?;
        }
        let mut cluster = LocalCluster {
            dir,
            bin: bin.to_owned(),
            secret,
            extra_args: extra_args.to_vec(),
            nsqd,
            nodes: BTreeMap::new(),
            map,
        };
        let ids: Vec<u16> = cluster.map.nodes().iter().map(|n| n.id).collect();
        for &id in &ids {
            let node = cluster.start_node(id).await?;
            cluster.nodes.insert(id, node);
        }
        let ready = futures::future::try_join_all(ids.iter().map(|&id| cluster.wait_ready(id)));
        ready.await?;
        Ok(cluster)
    }

    /// The directory holding every node's config, data and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The JWT secret every node verifies tokens with.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    fn node_dir(&self, id: u16) -> PathBuf {
        self.dir.path().join(format!("node-{id}"))
    }

    /// The last lines of node `id`'s log.
    pub fn log_tail(&self, id: u16, lines: usize) -> String {
        tail(&self.node_dir(id).join("server.log"), lines)
    }

    async fn start_node(&self, id: u16) -> anyhow::Result<NodeProc> {
        let dir = self.node_dir(id);
        let log_path = dir.join("server.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("serve")
            .arg(format!("--config={}", dir.join("ferry.toml").display()))
            .arg(format!("--jwt-secret={}", self.secret))
            .args(&self.extra_args)
            .stderr(Stdio::from(log));
        let what = format!("ferry serve (node {id})");
        let started = spawn_listening(cmd, "ferry listening:", &what)
            .await
            .with_context(|| format!("node {id} log: {}", tail(&log_path, 20)))?;
        Ok(NodeProc {
            child: started.child,
            pid: started.pid,
            starts: 1,
        })
    }

    /// Polls node `id`'s `/readyz` until it answers 200 (a node becomes
    /// ready when a majority of the nodes confirm its node list: there is
    /// no signal to wait for across processes).
    pub async fn wait_ready(&self, id: u16) -> anyhow::Result<()> {
        let ops = self.ops(id);
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            let last = match get_any(ops, "/readyz").await {
                Ok((200, _)) => return Ok(()),
                Ok((status, body)) => format!("{status} {}", body.trim()),
                Err(e) => format!("{e:#}"),
            };
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "node {id} not ready within {READY_TIMEOUT:?} (/readyz: {last}); its log: {}",
                    self.log_tail(id, 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Node `id`'s ops address.
    pub fn ops(&self, id: u16) -> SocketAddr {
        self.map
            .nodes()
            .iter()
            .find(|n| n.id == id)
            .map(|n| n.ops)
            .expect("a node of the cluster")
    }

    /// `kill -9` of node `id`: no shutdown, no flush.
    pub async fn kill9(&mut self, id: u16) -> anyhow::Result<()> {
        let node = self.nodes.get_mut(&id).context("no such node")?;
        node.child
            .kill()
            .await
            .with_context(|| format!("kill -9 of node {id}"))
    }

    /// Starts node `id` again on its data dir and ports, and waits until
    /// it is ready.
    pub async fn restart(&mut self, id: u16) -> anyhow::Result<()> {
        let fresh = self.start_node(id).await?;
        let node = self.nodes.get_mut(&id).context("no such node")?;
        node.child = fresh.child;
        node.pid = fresh.pid;
        node.starts += 1;
        self.wait_ready(id).await
    }

    /// The first node or nsqd found to have exited, with its log.
    pub fn exited(&mut self) -> Option<String> {
        if let Ok(Some(status)) = self.nsqd.child.try_wait() {
            return Some(format!(
                "nsqd exited ({status}); its log: {}",
                tail(&self.dir.path().join("nsqd").join("nsqd.log"), 20)
            ));
        }
        let ids: Vec<u16> = self.nodes.keys().copied().collect();
        for id in ids {
            let node = self.nodes.get_mut(&id).expect("listed");
            if let Ok(Some(status)) = node.child.try_wait() {
                return Some(format!(
                    "node {id} exited ({status}); its log: {}",
                    self.log_tail(id, 30)
                ));
            }
        }
        None
    }

    /// Stops every node (SIGTERM, then SIGKILL after 15 s), then nsqd.
    pub async fn stop(&mut self) {
        let stops = self
            .nodes
            .values_mut()
            .map(|n| stop_child(&mut n.child, n.pid, Duration::from_secs(15)));
        futures::future::join_all(stops).await;
        stop_child(&mut self.nsqd.child, self.nsqd.pid, Duration::from_secs(5)).await;
    }

    /// What was spawned, for the JSON.
    pub fn describe(&self) -> serde_json::Value {
        json!({
            "nodes": self.map.nodes().iter().map(|n| json!({
                "id": n.id,
                "client": n.client.to_string(),
                "ops": n.ops.to_string(),
                "pid": self.nodes.get(&n.id).map(|p| p.pid),
                "starts": self.nodes.get(&n.id).map(|p| p.starts),
            })).collect::<Vec<_>>(),
            "nsqd": self.nsqd.kind.label(),
            "nsqd_tcp": self.nsqd.tcp.to_string(),
            "dir": self.dir.path().display().to_string(),
        })
    }
}

/// Node `node`'s configuration file.
fn node_toml(
    map: &ClusterMap,
    node: &NodeAddr,
    dir: &Path,
    nsqd: SocketAddr,
    admin_token: &str,
    tls: Option<&crate::spawn::ThrowawayTls>,
) -> String {
    // With TLS the client address is the TLS listener's, and there is no
    // plain one: what the node map advertises is what clients must speak.
    let listeners = match tls {
        None => format!("listen = \"{}\"\n", node.client),
        Some(tls) => format!(
            "listen = \"\"\n\
             tls_listen = \"{}\"\n\
             tls_cert = \"{}\"\n\
             tls_key = \"{}\"\n",
            node.client,
            tls.cert_path().display(),
            tls.key_path().display()
        ),
    };
    let mut text = format!(
        "# Generated by ferry-bench --spawn-cluster.\n\
         {listeners}\
         http_listen = \"{}\"\n\
         data_dir = \"{}\"\n\
         admin_token = \"{admin_token}\"\n\
         \n\
         [cluster]\n\
         node_id = {}\n\
         nsqd_tcp_addresses = [\"{nsqd}\"]\n",
        node.ops,
        dir.join("data").display(),
        node.id,
    );
    for n in map.nodes() {
        text.push_str(&format!(
            "\n[[cluster.nodes]]\nid = {}\nclient_address = \"{}\"\nops_address = \"{}\"\n",
            n.id, n.client, n.ops
        ));
    }
    text
}

/// Starts nsqd (real or double) and waits until it accepts connections.
async fn start_nsqd(
    kind: NsqdKind,
    dir: &Path,
    tcp: SocketAddr,
    http: SocketAddr,
) -> anyhow::Result<Nsqd> {
    let nsqd_dir = dir.join("nsqd");
    std::fs::create_dir_all(&nsqd_dir).context("creating the nsqd directory")?;
    let log_path = nsqd_dir.join("nsqd.log");
    let log = std::fs::File::create(&log_path).context("creating nsqd.log")?;
    match &kind {
        NsqdKind::Real(bin) => {
            let mut child = Command::new(bin)
                .arg(format!("--tcp-address={tcp}"))
                .arg(format!("--http-address={http}"))
                .arg(format!("--data-path={}", nsqd_dir.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            let pid = child.id().context("nsqd pid")?;
            // nsqd prints nothing on stdout: poll its HTTP `/ping`.
            let deadline = tokio::time::Instant::now() + NSQD_TIMEOUT;
            loop {
                if let Ok((200, _)) = get_any(http, "/ping").await {
                    break;
                }
                if let Ok(Some(status)) = child.try_wait() {
                    bail!("nsqd exited at start ({status}): {}", tail(&log_path, 20));
                }
                if tokio::time::Instant::now() >= deadline {
                    bail!(
                        "nsqd did not answer /ping within {NSQD_TIMEOUT:?}: {}",
                        tail(&log_path, 20)
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(Nsqd {
                child,
                pid,
                tcp,
                kind,
            })
        }
        NsqdKind::Double(bin) => {
            let mut cmd = Command::new(bin);
            cmd.arg("--tcp-address")
                .arg(tcp.to_string())
                .stderr(Stdio::from(log));
            let started = spawn_listening(
                cmd,
                "ferry-nsqd-double (TEST DOUBLE) listening on",
                "ferry-nsqd-double",
            )
            .await
            .with_context(|| format!("nsqd double log: {}", tail(&log_path, 20)))?;
            let tcp = started
                .rest
                .parse()
                .with_context(|| format!("bad address in `{}`", started.rest))?;
            Ok(Nsqd {
                child: started.child,
                pid: started.pid,
                tcp,
                kind,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entry: Entry) -> ClusterMap {
        let nodes = (1..=3)
            .rev()
            .map(|id| NodeAddr {
                id,
                client: SocketAddr::from(([127, 0, 0, 1], 20_000 + id)),
                ops: SocketAddr::from(([127, 0, 0, 1], 21_000 + id)),
            })
            .collect();
        ClusterMap::new(nodes, entry).unwrap()
    }

    #[test]
    fn homes_match_the_placement_and_survive_serde() {
        let m = map(Entry::Home);
        // Golden vectors of cluster/src/lib.rs for nodes 1, 2, 3.
        assert_eq!(m.home("alice"), 1);
        assert_eq!(m.home("carol"), 2);
        assert_eq!(m.home("dave"), 3);
        assert_eq!(m.dial("dave", 0).port(), 20_003);
        let back: ClusterMap = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(back.home("carol"), 2);
        assert_eq!(back.nodes().len(), 3);
        let spread = m.spread((0..3000).map(|i| format!("u{i}")));
        assert_eq!(spread.values().sum::<u32>(), 3000);
        assert!(spread.values().all(|&n| n > 800), "{spread:?}");
    }

    #[test]
    fn spread_entry_round_robins() {
        let m = map(Entry::Spread);
        let ports: Vec<u16> = (0..3).map(|i| m.dial("alice", i).port()).collect();
        assert_eq!(ports, [20_001, 20_002, 20_003]);
    }

    #[test]
    fn ports_below_the_ephemeral_range() {
        let ports = pick_ports(6).unwrap();
        assert_eq!(ports.len(), 6);
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), 6);
    }

    /// Node 2's generated config, written to `dir` and resolved as
    /// `ferry serve --config` would.
    fn node_config(
        dir: &Path,
        tls: Option<&crate::spawn::ThrowawayTls>,
    ) -> ferry_gateway::config::Config {
        let m = map(Entry::Home);
        let path = dir.join("ferry.toml");
        let text = node_toml(
            &m,
            &m.nodes()[1],
            dir,
            "127.0.0.1:4150".parse().unwrap(),
            "0123456789abcdef0123456789abcdef",
            tls,
        );
        std::fs::write(&path, text).unwrap();
        ferry_gateway::config::ServeArgs {
            config: Some(path),
            ..Default::default()
        }
        .resolve()
        .unwrap()
    }

    #[test]
    fn node_config_is_a_valid_ferry_config() {
        let dir = tempfile::tempdir().unwrap();
        let config = node_config(dir.path(), None);
        assert_eq!(config.listen.addr().map(|a| a.port()), Some(20_002));
        assert_eq!(config.http_listen.port(), 21_002);
        assert_eq!(config.data_dir, dir.path().join("data"));
        let cluster = config.cluster.unwrap();
        assert_eq!(cluster.node_id, 2);
        assert_eq!(cluster.nodes.len(), 3);
        assert_eq!(cluster.nsqd_tcp_addresses, ["127.0.0.1:4150"]);
    }

    #[test]
    fn with_tls_a_node_serves_clients_on_tls_only_at_its_client_address() {
        let dir = tempfile::tempdir().unwrap();
        let tls = crate::spawn::ThrowawayTls::new().unwrap();
        let config = node_config(dir.path(), Some(&tls));
        assert_eq!(config.listen.addr(), None, "a plain listener is left");
        assert_eq!(config.tls_listen.addr().map(|a| a.port()), Some(20_002));
        assert_eq!(config.tls_cert, Some(tls.cert_path()));
        assert_eq!(config.tls_key, Some(tls.key_path()));
    }
}
