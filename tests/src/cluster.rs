//! A local cluster for end-to-end tests: N real `ferry serve` processes
//! with one `[cluster]` configuration, and the NSQ-protocol **test double**
//! (`ferry-nsqd-double`, in this process) as their nsqd, so that tests can
//! inject bus faults (drop connections, lose in-flight messages, deliver
//! twice) while the nodes speak the real NSQ protocol to it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ferry_cluster::{Node, NodeId, Placement};
use ferry_nsqd_double::{DoubleConfig, NsqdDouble};

use ferry_protocol::client::Client;

use crate::{ServerProcess, TEST_SECRET, http, within};

/// Ports free right now, never handed out before in this process. The
/// nodes must know each other's addresses before any of them starts, so
/// port 0 cannot be used. Tests run in parallel: without the registry, one
/// test could be given a port another test just picked and released.
/// Another process could still take one before our node binds it, which
/// within that short window is very unlikely.
pub fn free_ports(n: usize) -> Vec<u16> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap();
    let mut held = Vec::new();
    let mut ports = Vec::new();
    while ports.len() < n {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().unwrap().port();
        // Keep every listener until the end, so the OS never repeats a port.
        held.push(listener);
        if !given.contains(&port) {
            given.push(port);
            ports.push(port);
        }
    }
    ports
}

/// The `[cluster]` section of nodes `layout` (id → client, ops address)
/// publishing to and consuming from `nsqd`; no `node_id`: each node gets
/// `--cluster-node-id`, the way one shared file serves every machine.
pub fn cluster_toml(layout: &BTreeMap<u16, (SocketAddr, SocketAddr)>, nsqd: &str) -> String {
    let mut text = format!("[cluster]\nnsqd_tcp_addresses = [\"{nsqd}\"]\n");
    for (id, (client, ops)) in layout {
        text.push_str(&format!(
            "\n[[cluster.nodes]]\nid = {id}\nclient_address = \"{client}\"\nops_address = \"{ops}\"\n"
        ));
    }
    text
}

/// A running local cluster.
pub struct TestCluster {
    /// The nodes by id.
    pub nodes: BTreeMap<u16, ServerProcess>,
    /// The placement every node computes.
    pub placement: Placement,
    /// The nsqd test double every node publishes to and consumes from.
    pub nsqd: NsqdDouble,
    /// id → (client, ops) addresses.
    pub layout: BTreeMap<u16, (SocketAddr, SocketAddr)>,
    config: PathBuf,
    extra: Vec<String>,
    data: BTreeMap<u16, tempfile::TempDir>,
    _config_dir: tempfile::TempDir,
}

impl TestCluster {
    /// Starts nodes 1..=n with the double as nsqd, and waits until every
    /// node is ready (its node list confirmed by the others).
    pub async fn start(n: u16) -> TestCluster {
        TestCluster::start_with(n, &[]).await
    }

    /// [`TestCluster::start`] with extra `ferry serve` flags for every node.
    pub async fn start_with(n: u16, extra: &[&str]) -> TestCluster {
        let nsqd = NsqdDouble::start(DoubleConfig::default())
            .await
            .expect("start the nsqd test double");
        let ports = free_ports(2 * n as usize);
        let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let layout: BTreeMap<u16, (SocketAddr, SocketAddr)> = (1..=n)
            .map(|id| {
                let i = (id as usize - 1) * 2;
                (id, (addr(ports[i]), addr(ports[i + 1])))
            })
            .collect();
        let config_dir = tempfile::tempdir().unwrap();
        let config = config_dir.path().join("cluster.toml");
        std::fs::write(&config, cluster_toml(&layout, &nsqd.addr().to_string())).unwrap();
        let placement = Placement::new(
            1,
            layout
                .iter()
                .map(|(&id, (client, ops))| Node {
                    id: NodeId::new(id).unwrap(),
                    client_address: client.to_string(),
                    ops_address: ops.to_string(),
                })
                .collect(),
        )
        .unwrap();
        let mut cluster = TestCluster {
            nodes: BTreeMap::new(),
            placement,
            nsqd,
            layout,
            config,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            data: BTreeMap::new(),
            _config_dir: config_dir,
        };
        for id in 1..=n {
            cluster.data.insert(id, tempfile::tempdir().unwrap());
            cluster.spawn(id).await;
        }
        for id in 1..=n {
            cluster.wait_ready(id).await;
        }
        cluster
    }

    /// Starts node `id` (again) on its data dir and addresses.
    pub async fn spawn(&mut self, id: u16) {
        let (client, ops) = self.layout[&id];
        let mut flags = vec![
            format!("--config={}", self.config.display()),
            format!("--cluster-node-id={id}"),
        ];
        flags.extend(self.extra.iter().cloned());
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let node = ServerProcess::start_on(
            self.data[&id].path(),
            &client.to_string(),
            &ops.to_string(),
            &flags,
        )
        .await;
        self.nodes.insert(id, node);
    }

    /// `kill -9` node `id` and waits for it to be gone.
    pub async fn kill(&mut self, id: u16) {
        let mut node = self.nodes.remove(&id).expect("running node");
        node.child.start_kill().expect("SIGKILL");
        let _ = node.child.wait().await;
    }

    /// Restarts a killed node on the same data dir and waits until it is ready.
    pub async fn restart(&mut self, id: u16) {
        self.spawn(id).await;
        self.wait_ready(id).await;
    }

    /// Waits until node `id`'s `/readyz` answers 200 (there is no signal
    /// across processes: it is polled, within the test bound).
    pub async fn wait_ready(&self, id: u16) {
        let ops = self.nodes[&id].http;
        within(async {
            loop {
                if http(ops, "GET", "/readyz", &[], None).await.status == 200 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
    }

    /// The home node of `user`.
    pub fn home(&self, user: &str) -> u16 {
        self.placement.home_of_user(user).get()
    }

    /// The owner node of `group`.
    pub fn owner(&self, group: &str) -> u16 {
        self.placement.owner_of_group(group).get()
    }

    /// The first id `{prefix}-{i}` homed on `node`.
    pub fn user_on(&self, node: u16, prefix: &str) -> String {
        (0..)
            .map(|i| format!("{prefix}-{i}"))
            .find(|u| self.home(u) == node)
            .expect("some id lands on every node")
    }

    /// The first group id `{prefix}-{i}` owned by `node`.
    pub fn group_on(&self, node: u16, prefix: &str) -> String {
        (0..)
            .map(|i| format!("{prefix}-{i}"))
            .find(|g| self.owner(g) == node)
            .expect("some id lands on every node")
    }

    /// A token for `user`, signed with the secret every node verifies.
    pub fn token(&self, user: &str) -> String {
        ferry_gateway::auth::TokenVerifier::new(TEST_SECRET.as_bytes()).mint(user, None, 3600)
    }

    /// A connection to `user`'s home node (dialled directly), logged in as
    /// `device` from `last_seq`; checks that the home node answered.
    pub async fn login_home(&self, user: &str, device: &str, last_seq: u64) -> Client {
        let home = self.home(user);
        let mut client = Client::connect(self.addr(home)).await.expect("connect");
        let ok = within(client.authenticate(&self.token(user), device, last_seq))
            .await
            .expect("auth at home");
        assert_eq!(ok.node_id, home.to_string(), "not logged in at home");
        client
    }

    /// Node `id`'s client address.
    pub fn addr(&self, id: u16) -> SocketAddr {
        self.layout[&id].0
    }

    /// Node `id`'s ops address.
    pub fn ops(&self, id: u16) -> SocketAddr {
        self.layout[&id].1
    }

    /// Node `id`'s data dir (to wipe and restore it while it is down).
    pub fn data_dir(&self, id: u16) -> &std::path::Path {
        self.data[&id].path()
    }
}
