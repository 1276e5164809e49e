//! Server configuration: defaults, then a TOML file, then `FERRY_*`
//! environment variables, then command-line flags (each overriding the last).
//!
//! [`ServeArgs`] is both the clap flag set and the serde file format: every
//! field is optional there, and [`ServeArgs::resolve`] layers them over
//! [`Config::default`]. `ferry serve --print-config` prints the result.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

/// Files RocksDB may hold open: they share the process's descriptor
/// budget with client connections, so the number is fixed and small.
pub const STORAGE_MAX_OPEN_FILES: i32 = 256;

/// How hard the storage works to keep acknowledged messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// The ack waits until the group commit's WAL is fsynced: survives power loss.
    Fsync,
    /// The ack waits until the WAL is written to the OS, not synced: survives
    /// a process crash (`kill -9`), not an OS crash or power loss.
    Wal,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A listen address that may be off: `""` (in the file, a flag or the
/// environment) turns the listener off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ListenAddr(pub Option<SocketAddr>);

impl ListenAddr {
    /// Listening on `addr`.
    pub fn on(addr: SocketAddr) -> ListenAddr {
        ListenAddr(Some(addr))
    }

    /// The address, if the listener is on.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.0
    }
}

impl std::str::FromStr for ListenAddr {
    type Err = std::net::AddrParseError;

    fn from_str(text: &str) -> Result<ListenAddr, Self::Err> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(ListenAddr(None));
        }
        text.parse().map(|a| ListenAddr(Some(a)))
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => write!(f, "{addr}"),
            None => Ok(()),
        }
    }
}

impl Serialize for ListenAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ListenAddr, D::Error> {
        let text = String::deserialize(d)?;
        text.parse()
            .map_err(|e| serde::de::Error::custom(format!("`{text}`: {e} (\"\" turns it off)")))
    }
}

/// The effective configuration of `ferry serve`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    /// Client (TCP, framed Protobuf) listen address; off (`""`) for a
    /// TLS-only node.
    pub listen: ListenAddr,
    /// Client listen address of the same protocol inside TLS; off (`""`,
    /// the default) for none. Needs `tls_cert` and `tls_key`.
    pub tls_listen: ListenAddr,
    /// PEM certificate chain of the TLS port, leaf first (reloaded on SIGHUP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of the TLS port (PKCS#8, PKCS#1 or SEC1; reloaded on
    /// SIGHUP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// Ops HTTP listen address (/healthz, /readyz, /metrics, admin API).
    /// Loopback by default: the admin API must not face the network.
    pub http_listen: SocketAddr,
    /// Where RocksDB, the JWT secret and the admin token live.
    pub data_dir: PathBuf,
    /// Client heartbeat interval; silence for 3 × this closes a connection.
    pub heartbeat_secs: u32,
    /// Time allowed between accept and a valid Auth frame.
    pub auth_timeout_secs: u32,
    /// Largest frame accepted or sent (bytes after the 4-byte prefix).
    pub max_frame_bytes: u32,
    /// Connections held at once; more get TOO_MANY_CONNECTIONS.
    pub max_connections: u32,
    /// Frames per second one connection may send; more gets RATE_LIMITED and a close.
    pub max_frames_per_sec: u32,
    /// Frames queued for one connection; more closes it with SLOW_CONSUMER.
    pub write_queue_frames: u32,
    /// Encoded bytes queued for one connection; more closes it with
    /// SLOW_CONSUMER. Half of it is the level above which the server stops
    /// reading the connection's requests (back-pressure).
    pub write_queue_bytes: u32,
    /// Seconds a write to a client may make no progress at all before the
    /// connection is dropped.
    pub write_timeout_secs: u32,
    /// Connections that may be between accept and a valid Auth at once;
    /// more are refused with TOO_MANY_CONNECTIONS, so unauthenticated
    /// sockets can never take every slot.
    pub max_pending_auth: u32,
    /// Connections one source address (an IPv6 /64) may hold; more get
    /// TOO_MANY_CONNECTIONS. 0: no limit.
    pub max_connections_per_ip: u32,
    /// New connections one source address may open per second; more get
    /// RATE_LIMITED. 0: no limit.
    pub max_connects_per_sec_per_ip: u32,
    /// Failed logins one source address may make per minute; then its new
    /// connections get RATE_LIMITED until the minute ends. 0: no limit.
    pub max_auth_failures_per_min_per_ip: u32,
    /// Apply the per-address limits to loopback clients too (off: a proxy
    /// or the bench on this host is not limited).
    pub limit_loopback: bool,
    /// Seconds a begun frame may take to arrive whole; then FRAME_TIMEOUT
    /// and a close (a client trickling a frame's body, "slowloris").
    pub frame_read_timeout_secs: u32,
    /// Largest admin API request body; more gets 413. Unset: twice
    /// `max_frame_bytes` (at least 64 KiB).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_max_body_bytes: Option<u32>,
    /// HS256 secret for client JWTs. When unset, `<data_dir>/jwt.secret`
    /// is used (and created on first start).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_secret: Option<String>,
    /// Key id of the JWT secret: tokens `ferry token` mints carry it as
    /// their header's `kid`, and tokens naming it are checked with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_kid: Option<String>,
    /// The previous JWT secret, during a rotation: still accepted for
    /// tokens whose header `kid` is `jwt_previous_kid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_previous_secret: Option<String>,
    /// Key id of `jwt_previous_secret` (required with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_previous_kid: Option<String>,
    /// Bearer token of the admin HTTP API. When unset,
    /// `<data_dir>/admin.token` is used (and created on first start).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<String>,
    /// Where `POST /admin/backup` writes backups (RocksDB BackupEngine,
    /// incremental). Unset: the call is refused. Best on another disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_dir: Option<PathBuf>,
    /// Backups kept in `backup_dir`: after each verified backup the older
    /// ones beyond this many are deleted (0: keep all).
    pub backup_keep: u32,
    /// Seconds a connection may take to flush its goodbye on shutdown.
    pub shutdown_timeout_secs: u32,
    /// Write durability of acknowledged messages.
    pub durability: Durability,
    /// Messages older than this are deleted in the background.
    pub retention_days: u32,
    /// RocksDB's memory budget in MiB: one block cache for every column
    /// family with the memtables charged into it (at most half), and the
    /// WAL size past which old memtables are flushed.
    pub storage_memory_mb: u32,
    /// How long after sending a message its sender may recall it.
    pub recall_window_secs: u32,
    /// Most members one group may have.
    pub max_group_members: u32,
    /// Log line format.
    pub log_format: LogFormat,
    /// Cluster mode; `None` (no `[cluster]` section): a single node.
    /// Last field: TOML renders tables after plain keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: ListenAddr::on("0.0.0.0:7600".parse().expect("valid literal")),
            tls_listen: ListenAddr(None),
            tls_cert: None,
            tls_key: None,
            http_listen: "127.0.0.1:7601".parse().expect("valid literal"),
            data_dir: PathBuf::from("./data"),
            heartbeat_secs: 30,
            auth_timeout_secs: 10,
            max_frame_bytes: 64 * 1024,
            max_connections: 100_000,
            max_frames_per_sec: 1000,
            write_queue_frames: 1024,
            write_queue_bytes: 1024 * 1024,
            write_timeout_secs: 10,
            max_pending_auth: 1024,
            max_connections_per_ip: 1000,
            max_connects_per_sec_per_ip: 100,
            max_auth_failures_per_min_per_ip: 60,
            limit_loopback: false,
            frame_read_timeout_secs: 30,
            admin_max_body_bytes: None,
            jwt_secret: None,
            jwt_kid: None,
            jwt_previous_secret: None,
            jwt_previous_kid: None,
            admin_token: None,
            backup_dir: None,
            backup_keep: 7,
            shutdown_timeout_secs: 10,
            durability: Durability::Fsync,
            retention_days: 30,
            storage_memory_mb: (ferry_storage::DEFAULT_MEMORY_BUDGET_BYTES >> 20) as u32,
            recall_window_secs: 120,
            max_group_members: 10_000,
            log_format: LogFormat::Text,
            cluster: None,
        }
    }
}

/// Flags of `ferry serve`; also the format of the `--config` TOML file
/// (same names with underscores). Flags override `FERRY_*` variables, which
/// override the file, which overrides the defaults.
#[derive(Debug, Clone, Default, Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeArgs {
    /// TOML config file (keys as the flags below, with underscores).
    #[arg(long, env = "FERRY_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    #[serde(skip)]
    pub print_config: bool,
    /// Client listen address; "" turns the plaintext port off (a TLS-only node) [default: 0.0.0.0:7600].
    #[arg(long, env = "FERRY_LISTEN")]
    pub listen: Option<ListenAddr>,
    /// TLS client listen address (same protocol inside TLS 1.2/1.3); needs --tls-cert and --tls-key [default: off].
    #[arg(long, env = "FERRY_TLS_LISTEN")]
    pub tls_listen: Option<ListenAddr>,
    /// PEM certificate chain for the TLS port, leaf first; re-read on SIGHUP.
    #[arg(long, env = "FERRY_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for the TLS port; re-read on SIGHUP.
    #[arg(long, env = "FERRY_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Ops HTTP listen address [default: 127.0.0.1:7601].
    #[arg(long, env = "FERRY_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Data directory [default: ./data].
    #[arg(long, env = "FERRY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Heartbeat interval in seconds; 3 × this of silence closes a connection [default: 30].
    #[arg(long, env = "FERRY_HEARTBEAT_SECS")]
    pub heartbeat_secs: Option<u32>,
    /// Seconds allowed from accept to a valid Auth [default: 10].
    #[arg(long, env = "FERRY_AUTH_TIMEOUT_SECS")]
    pub auth_timeout_secs: Option<u32>,
    /// Largest frame in bytes, not counting the 4-byte prefix [default: 65536].
    #[arg(long, env = "FERRY_MAX_FRAME_BYTES")]
    pub max_frame_bytes: Option<u32>,
    /// Most connections held at once [default: 100000].
    #[arg(long, env = "FERRY_MAX_CONNECTIONS")]
    pub max_connections: Option<u32>,
    /// Most frames per second per connection; more → RATE_LIMITED and close [default: 1000].
    #[arg(long, env = "FERRY_MAX_FRAMES_PER_SEC")]
    pub max_frames_per_sec: Option<u32>,
    /// Outgoing frames queued per connection; more → SLOW_CONSUMER and close [default: 1024].
    #[arg(long, env = "FERRY_WRITE_QUEUE_FRAMES")]
    pub write_queue_frames: Option<u32>,
    /// Outgoing bytes queued per connection; more → SLOW_CONSUMER and close; above half of it the server stops reading the connection's requests [default: 1048576].
    #[arg(long, env = "FERRY_WRITE_QUEUE_BYTES")]
    pub write_queue_bytes: Option<u32>,
    /// Seconds a write to a client may make no progress before the connection is dropped [default: 10].
    #[arg(long, env = "FERRY_WRITE_TIMEOUT_SECS")]
    pub write_timeout_secs: Option<u32>,
    /// Connections between accept and a valid Auth at once; more → TOO_MANY_CONNECTIONS [default: 1024].
    #[arg(long, env = "FERRY_MAX_PENDING_AUTH")]
    pub max_pending_auth: Option<u32>,
    /// Connections one source address (IPv6: its /64) may hold; more → TOO_MANY_CONNECTIONS; 0 = no limit [default: 1000].
    #[arg(long, env = "FERRY_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<u32>,
    /// New connections per second one source address may open; more → RATE_LIMITED; 0 = no limit [default: 100].
    #[arg(long, env = "FERRY_MAX_CONNECTS_PER_SEC_PER_IP")]
    pub max_connects_per_sec_per_ip: Option<u32>,
    /// Failed logins per minute one source address may make before its new connections get RATE_LIMITED for the rest of the minute; 0 = no limit [default: 60].
    #[arg(long, env = "FERRY_MAX_AUTH_FAILURES_PER_MIN_PER_IP")]
    pub max_auth_failures_per_min_per_ip: Option<u32>,
    /// Apply the per-address limits to loopback (127.0.0.0/8, ::1) clients too [default: false].
    #[arg(long, env = "FERRY_LIMIT_LOOPBACK", num_args = 0..=1, default_missing_value = "true")]
    pub limit_loopback: Option<bool>,
    /// Seconds a begun frame may take to arrive whole; then FRAME_TIMEOUT and close [default: 30].
    #[arg(long, env = "FERRY_FRAME_READ_TIMEOUT_SECS")]
    pub frame_read_timeout_secs: Option<u32>,
    /// Largest admin API request body in bytes; more → 413 [default: 2 × max_frame_bytes, at least 65536].
    #[arg(long, env = "FERRY_ADMIN_MAX_BODY_BYTES")]
    pub admin_max_body_bytes: Option<u32>,
    /// HS256 secret for client tokens [default: <data-dir>/jwt.secret, created on first start].
    #[arg(long, env = "FERRY_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Key id (JWT header `kid`) of the JWT secret [default: none].
    #[arg(long, env = "FERRY_JWT_KID")]
    pub jwt_kid: Option<String>,
    /// The previous JWT secret, accepted for tokens whose `kid` is --jwt-previous-kid (secret rotation) [default: none].
    #[arg(long, env = "FERRY_JWT_PREVIOUS_SECRET", hide_env_values = true)]
    pub jwt_previous_secret: Option<String>,
    /// Key id of --jwt-previous-secret [default: none].
    #[arg(long, env = "FERRY_JWT_PREVIOUS_KID")]
    pub jwt_previous_kid: Option<String>,
    /// Bearer token for the admin HTTP API [default: <data-dir>/admin.token, created on first start].
    #[arg(long, env = "FERRY_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Directory for backups made with `POST /admin/backup` (incremental; best on another disk) [default: none, the call is refused].
    #[arg(long, env = "FERRY_BACKUP_DIR")]
    pub backup_dir: Option<PathBuf>,
    /// Backups kept in the backup dir; older ones are deleted after each new one is verified (0: all) [default: 7].
    #[arg(long, env = "FERRY_BACKUP_KEEP")]
    pub backup_keep: Option<u32>,
    /// Seconds to drain connections on SIGTERM/SIGINT [default: 10].
    #[arg(long, env = "FERRY_SHUTDOWN_TIMEOUT_SECS")]
    pub shutdown_timeout_secs: Option<u32>,
    /// fsync: ack after the WAL is synced (survives power loss); wal: ack after the WAL write (survives kill -9) [default: fsync].
    #[arg(long, env = "FERRY_DURABILITY")]
    pub durability: Option<Durability>,
    /// Days messages are kept [default: 30].
    #[arg(long, env = "FERRY_RETENTION_DAYS")]
    pub retention_days: Option<u32>,
    /// RocksDB's memory budget in MiB: block cache and memtables together [default: 128].
    #[arg(long, env = "FERRY_STORAGE_MEMORY_MB")]
    pub storage_memory_mb: Option<u32>,
    /// Seconds after sending during which a message may be recalled [default: 120].
    #[arg(long, env = "FERRY_RECALL_WINDOW_SECS")]
    pub recall_window_secs: Option<u32>,
    /// Most members per group [default: 10000].
    #[arg(long, env = "FERRY_MAX_GROUP_MEMBERS")]
    pub max_group_members: Option<u32>,
    /// Log format [default: text]. Filter with RUST_LOG (e.g. RUST_LOG=ferry=debug).
    #[arg(long, env = "FERRY_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// The `[cluster]` section.
    #[command(
        flatten,
        next_help_heading = "Cluster mode (none of these: a single node)"
    )]
    #[serde(default)]
    pub cluster: ClusterArgs,
}

/// One node of the cluster as configured: `{ id, client_address,
/// ops_address }` in TOML, `ID@CLIENT_ADDRESS@OPS_ADDRESS` in a flag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The node's id, 1..=1023.
    pub id: u16,
    /// `host:port` clients dial to reach it (sent in `Redirect.address`).
    pub client_address: String,
    /// `host:port` of its ops HTTP port.
    pub ops_address: String,
}

/// The node list: a TOML array of tables, or for flags and environment one
/// string `ID@CLIENT_ADDRESS@OPS_ADDRESS,ID@...`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeList(pub Vec<NodeConfig>);

impl std::str::FromStr for NodeList {
    type Err = String;

    fn from_str(text: &str) -> Result<NodeList, String> {
        let mut nodes = Vec::new();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let parts: Vec<&str> = item.split('@').collect();
            let [id, client_address, ops_address] = parts[..] else {
                return Err(format!(
                    "node `{item}`: expected ID@CLIENT_ADDRESS@OPS_ADDRESS, e.g. \
                     2@10.0.0.2:7600@10.0.0.2:7601"
                ));
            };
            let id = id
                .trim()
                .parse()
                .map_err(|_| format!("node `{item}`: id `{id}` is not a number 1..=1023"))?;
            nodes.push(NodeConfig {
                id,
                client_address: client_address.trim().to_owned(),
                ops_address: ops_address.trim().to_owned(),
            });
        }
        Ok(NodeList(nodes))
    }
}

/// The `[cluster]` section as one layer gives it (file, or env/flags):
/// every key optional, so that e.g. one shared file lists the nodes and
/// `FERRY_CLUSTER_NODE_ID` tells each machine which one it is.
#[derive(Debug, Clone, Default, Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterArgs {
    /// This node's id, 1..=1023; setting any cluster key enables cluster mode.
    #[arg(long = "cluster-node-id", env = "FERRY_CLUSTER_NODE_ID")]
    pub node_id: Option<u16>,
    /// Every node of the cluster, the same list on every node: ID@CLIENT_ADDRESS@OPS_ADDRESS,... (e.g. 1@10.0.0.1:7600@10.0.0.1:7601,2@...).
    #[arg(long = "cluster-nodes", env = "FERRY_CLUSTER_NODES")]
    pub nodes: Option<NodeList>,
    /// nsqd TCP address(es) this node publishes to, host:port,... (at least one).
    #[arg(
        long = "cluster-nsqd-tcp-addresses",
        env = "FERRY_CLUSTER_NSQD_TCP_ADDRESSES",
        value_delimiter = ','
    )]
    pub nsqd_tcp_addresses: Option<Vec<String>>,
    /// nsqd TCP address(es) to consume this node's topic from, host:port,... [default: none; with no lookupd either, nsqd_tcp_addresses].
    #[arg(
        long = "cluster-consume-nsqd-tcp-addresses",
        env = "FERRY_CLUSTER_CONSUME_NSQD_TCP_ADDRESSES",
        value_delimiter = ','
    )]
    pub consume_nsqd_tcp_addresses: Option<Vec<String>>,
    /// nsqlookupd HTTP address(es) to discover the nsqd holding this node's topic, host:port,... [default: none].
    #[arg(
        long = "cluster-lookupd-http-addresses",
        env = "FERRY_CLUSTER_LOOKUPD_HTTP_ADDRESSES",
        value_delimiter = ','
    )]
    pub lookupd_http_addresses: Option<Vec<String>>,
    /// Publish a link to a peer again from its oldest unconfirmed batch after this many ms without a confirmation [default: 5000].
    #[arg(
        long = "cluster-resend-after-ms",
        env = "FERRY_CLUSTER_RESEND_AFTER_MS"
    )]
    pub resend_after_ms: Option<u64>,
    /// How long a request forwarded to a group's owner node waits for its answer, in ms, before the client gets UNAVAILABLE [default: 5000].
    #[arg(
        long = "cluster-call-timeout-ms",
        env = "FERRY_CLUSTER_CALL_TIMEOUT_MS"
    )]
    pub call_timeout_ms: Option<u64>,
}

impl ClusterArgs {
    fn is_empty(&self) -> bool {
        self.node_id.is_none()
            && self.nodes.is_none()
            && self.nsqd_tcp_addresses.is_none()
            && self.consume_nsqd_tcp_addresses.is_none()
            && self.lookupd_http_addresses.is_none()
    }

    /// `over`'s keys replace ours.
    fn layer(&mut self, over: &ClusterArgs) {
        let ClusterArgs {
            node_id,
            nodes,
            nsqd_tcp_addresses,
            consume_nsqd_tcp_addresses,
            lookupd_http_addresses,
            resend_after_ms,
            call_timeout_ms,
        } = over.clone();
        self.resend_after_ms = resend_after_ms.or(self.resend_after_ms);
        self.call_timeout_ms = call_timeout_ms.or(self.call_timeout_ms);
        self.node_id = node_id.or(self.node_id);
        self.nodes = nodes.or(self.nodes.take());
        self.nsqd_tcp_addresses = nsqd_tcp_addresses.or(self.nsqd_tcp_addresses.take());
        self.consume_nsqd_tcp_addresses =
            consume_nsqd_tcp_addresses.or(self.consume_nsqd_tcp_addresses.take());
        self.lookupd_http_addresses = lookupd_http_addresses.or(self.lookupd_http_addresses.take());
    }

    /// The merged section: `None` if no key is set anywhere.
    fn build(self) -> Result<Option<ClusterConfig>, ConfigError> {
        if self.is_empty() {
            return Ok(None);
        }
        let missing = |key: &str, flag: &str| {
            ConfigError::Invalid(format!(
                "cluster.{key} is required in cluster mode (a [cluster] key or a --cluster-* \
                 flag is set); give it in [cluster] or with --cluster-{flag}"
            ))
        };
        Ok(Some(ClusterConfig {
            node_id: self.node_id.ok_or_else(|| missing("node_id", "node-id"))?,
            nodes: self.nodes.ok_or_else(|| missing("nodes", "nodes"))?.0,
            nsqd_tcp_addresses: self.nsqd_tcp_addresses.unwrap_or_default(),
            consume_nsqd_tcp_addresses: self.consume_nsqd_tcp_addresses.unwrap_or_default(),
            lookupd_http_addresses: self.lookupd_http_addresses.unwrap_or_default(),
            resend_after_ms: self.resend_after_ms.unwrap_or(DEFAULT_RESEND_AFTER_MS),
            call_timeout_ms: self.call_timeout_ms.unwrap_or(DEFAULT_CALL_TIMEOUT_MS),
        }))
    }
}

/// Cluster mode: this node, its peers, and where the NSQ bus is. Validated
/// by [`Config::validate`]; [`ClusterConfig::placement`] is the placement
/// every node computes alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterConfig {
    /// This node's id, 1..=1023; must be in `nodes`.
    pub node_id: u16,
    /// Every node, the same list (in any order) on every node.
    pub nodes: Vec<NodeConfig>,
    /// nsqd TCP addresses (`host:port`) this node publishes to.
    pub nsqd_tcp_addresses: Vec<String>,
    /// nsqd TCP addresses to consume this node's topic from (may be empty).
    #[serde(default)]
    pub consume_nsqd_tcp_addresses: Vec<String>,
    /// nsqlookupd HTTP addresses (`host:port`) for discovery (may be empty).
    #[serde(default)]
    pub lookupd_http_addresses: Vec<String>,
    /// A link is published again from its oldest unconfirmed batch after
    /// this long without a confirmation (ms).
    #[serde(default = "default_resend_after_ms")]
    pub resend_after_ms: u64,
    /// How long a request forwarded to a group's owner waits (ms).
    #[serde(default = "default_call_timeout_ms")]
    pub call_timeout_ms: u64,
}

/// Default of `cluster.resend_after_ms`.
pub const DEFAULT_RESEND_AFTER_MS: u64 = 5000;
/// Default of `cluster.call_timeout_ms`.
pub const DEFAULT_CALL_TIMEOUT_MS: u64 = 5000;

fn default_resend_after_ms() -> u64 {
    DEFAULT_RESEND_AFTER_MS
}

fn default_call_timeout_ms() -> u64 {
    DEFAULT_CALL_TIMEOUT_MS
}

impl ClusterConfig {
    /// The placement of users and groups over `nodes`, seen from `node_id`.
    pub fn placement(&self) -> Result<ferry_cluster::Placement, ConfigError> {
        let mut nodes = Vec::with_capacity(self.nodes.len());
        for n in &self.nodes {
            let id = ferry_cluster::NodeId::try_from(n.id)
                .map_err(|e| ConfigError::Invalid(format!("cluster.nodes: {e}")))?;
            nodes.push(ferry_cluster::Node {
                id,
                client_address: n.client_address.clone(),
                ops_address: n.ops_address.clone(),
            });
        }
        ferry_cluster::Placement::new(self.node_id, nodes).map_err(|e| {
            let key = match e {
                ferry_cluster::ClusterError::SelfNotListed(_) => "cluster.node_id",
                ferry_cluster::ClusterError::IdOutOfRange(id) if id == self.node_id => {
                    "cluster.node_id"
                }
                _ => "cluster.nodes",
            };
            ConfigError::Invalid(format!("{key}: {e}"))
        })
    }

    /// The nsqd TCP addresses the consumer connects to directly: the
    /// configured consume list, or `nsqd_tcp_addresses` when neither a
    /// consume list nor a lookupd is given.
    pub fn consume_from_nsqd(&self) -> &[String] {
        if self.consume_nsqd_tcp_addresses.is_empty() && self.lookupd_http_addresses.is_empty() {
            &self.nsqd_tcp_addresses
        } else {
            &self.consume_nsqd_tcp_addresses
        }
    }

    /// Checks ids, the node list and every address.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        for n in &self.nodes {
            for (key, address) in [
                ("client_address", &n.client_address),
                ("ops_address", &n.ops_address),
            ] {
                if let Err(why) = check_host_port(address) {
                    return invalid(format!("cluster.nodes: node {} {key} {why}", n.id));
                }
            }
        }
        self.placement()?;
        if self.nsqd_tcp_addresses.is_empty() {
            return invalid(
                "cluster.nsqd_tcp_addresses: at least one nsqd TCP address (host:port) is \
                 needed: where this node publishes to its peers"
                    .into(),
            );
        }
        for (key, list) in [
            ("nsqd_tcp_addresses", &self.nsqd_tcp_addresses),
            (
                "consume_nsqd_tcp_addresses",
                &self.consume_nsqd_tcp_addresses,
            ),
            ("lookupd_http_addresses", &self.lookupd_http_addresses),
        ] {
            for address in list {
                if let Err(why) = check_host_port(address) {
                    return invalid(format!("cluster.{key}: {why}"));
                }
            }
        }
        Ok(())
    }
}

/// Whether `address` is `host:port` (a name, an IPv4 address, or `[IPv6]`,
/// and a port 1..=65535), or why not.
fn check_host_port(address: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("`{address}` is not host:port ({why})"));
    if address.is_empty() {
        return bad("empty");
    }
    if address.contains("://") || address.contains('/') {
        return bad("no scheme or path, just host:port");
    }
    if address
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '@' || c == ',')
    {
        return bad("spaces, `@` and `,` are not allowed");
    }
    let Some((host, port)) = address.rsplit_once(':') else {
        return bad("no port");
    };
    if host.is_empty() {
        return bad("no host");
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return bad("an IPv6 address goes in brackets: [::1]:7600");
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => bad("the port must be 1..=65535"),
    }
}

/// Configuration errors.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for this schema.
    #[error("parsing {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: Box<toml::de::Error>,
    },
    /// A value is out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

macro_rules! layer {
    ($config:ident, $src:expr, $($field:ident),*) => {
        $( if let Some(v) = $src.$field.clone() { $config.$field = v; } )*
    };
}

impl ServeArgs {
    /// Layers file < env/flags (clap already merged those two) over defaults,
    /// and validates the result.
    pub fn resolve(&self) -> Result<Config, ConfigError> {
        let mut config = Config::default();
        let mut cluster = ClusterArgs::default();
        if let Some(path) = &self.config {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            let file: ServeArgs = toml::from_str(&text).map_err(|source| ConfigError::Parse {
                path: path.clone(),
                source: Box::new(source),
            })?;
            file.apply(&mut config);
            cluster.layer(&file.cluster);
        }
        self.apply(&mut config);
        cluster.layer(&self.cluster);
        config.cluster = cluster.build()?;
        config.validate()?;
        Ok(config)
    }

    fn apply(&self, config: &mut Config) {
        layer!(
            config,
            self,
            listen,
            tls_listen,
            http_listen,
            data_dir,
            heartbeat_secs,
            auth_timeout_secs,
            max_frame_bytes,
            max_connections,
            max_frames_per_sec,
            write_queue_frames,
            write_queue_bytes,
            write_timeout_secs,
            max_pending_auth,
            max_connections_per_ip,
            max_connects_per_sec_per_ip,
            max_auth_failures_per_min_per_ip,
            limit_loopback,
            frame_read_timeout_secs,
            backup_keep,
            shutdown_timeout_secs,
            durability,
            retention_days,
            storage_memory_mb,
            recall_window_secs,
            max_group_members,
            log_format
        );
        if self.jwt_secret.is_some() {
            config.jwt_secret = self.jwt_secret.clone();
        }
        if self.jwt_kid.is_some() {
            config.jwt_kid = self.jwt_kid.clone();
        }
        if self.jwt_previous_secret.is_some() {
            config.jwt_previous_secret = self.jwt_previous_secret.clone();
        }
        if self.jwt_previous_kid.is_some() {
            config.jwt_previous_kid = self.jwt_previous_kid.clone();
        }
        if self.tls_cert.is_some() {
            config.tls_cert = self.tls_cert.clone();
        }
        if self.admin_max_body_bytes.is_some() {
            config.admin_max_body_bytes = self.admin_max_body_bytes;
        }
        if self.tls_key.is_some() {
            config.tls_key = self.tls_key.clone();
        }
        if self.admin_token.is_some() {
            config.admin_token = self.admin_token.clone();
        }
        if self.backup_dir.is_some() {
            config.backup_dir = self.backup_dir.clone();
        }
    }
}

impl Config {
    /// Where RocksDB lives inside the data dir.
    pub fn db_path(&self) -> PathBuf {
        ferry_storage::backup::db_path_of(&self.data_dir)
    }

    /// The client-token verifier for the current JWT `secret` (from the
    /// configuration or the data dir), with `jwt_kid` and, during a
    /// rotation, the previous secret.
    pub fn token_verifier(&self, secret: &[u8]) -> crate::auth::TokenVerifier {
        let mut verifier = crate::auth::TokenVerifier::new(secret);
        if let Some(kid) = &self.jwt_kid {
            verifier = verifier.with_kid(kid);
        }
        if let (Some(previous), Some(kid)) = (&self.jwt_previous_secret, &self.jwt_previous_kid) {
            verifier = verifier.with_previous(kid, previous.as_bytes());
        }
        verifier
    }

    /// The storage settings.
    pub fn storage_options(&self) -> ferry_storage::StorageOptions {
        ferry_storage::StorageOptions {
            retention_days: self.retention_days,
            max_open_files: STORAGE_MAX_OPEN_FILES,
            memory_budget_bytes: (self.storage_memory_mb as usize) << 20,
            ..Default::default()
        }
    }

    /// The per-address limits.
    pub fn ip_limits(&self) -> crate::ip_limits::IpLimitConfig {
        crate::ip_limits::IpLimitConfig {
            max_connections_per_ip: self.max_connections_per_ip,
            max_connects_per_sec_per_ip: self.max_connects_per_sec_per_ip,
            max_auth_failures_per_min_per_ip: self.max_auth_failures_per_min_per_ip,
            limit_loopback: self.limit_loopback,
        }
    }

    /// The admin API's request body cap.
    pub fn admin_body_limit(&self) -> usize {
        match self.admin_max_body_bytes {
            Some(bytes) => bytes as usize,
            None => (self.max_frame_bytes as usize * 2).max(64 * 1024),
        }
    }

    /// The bounds of one connection's outbox.
    pub fn outbox_limits(&self) -> ferry_router::session::OutboxLimits {
        ferry_router::session::OutboxLimits {
            frames: self.write_queue_frames as usize,
            bytes: self.write_queue_bytes as usize,
        }
    }

    /// The placement of users and groups: from `[cluster]`, or
    /// [`ferry_cluster::Placement::single`] without one.
    pub fn placement(&self) -> Result<ferry_cluster::Placement, ConfigError> {
        match &self.cluster {
            None => Ok(ferry_cluster::Placement::single()),
            Some(cluster) => cluster.placement(),
        }
    }

    /// The router settings (fails only on an invalid `[cluster]`).
    pub fn router_config(&self) -> Result<ferry_router::RouterConfig, ConfigError> {
        let placement = self.placement()?;
        Ok(ferry_router::RouterConfig {
            // A single node keeps the id it always reported.
            node_id: if placement.is_cluster() {
                placement.self_id().to_string()
            } else {
                "ferry-1".into()
            },
            placement: std::sync::Arc::new(placement),
            max_frame_bytes: self.max_frame_bytes as usize,
            recall_window_ms: self.recall_window_secs as u64 * 1000,
            commit: ferry_storage::CommitOptions {
                durability: match self.durability {
                    Durability::Fsync => ferry_storage::Durability::Fsync,
                    Durability::Wal => ferry_storage::Durability::Wal,
                },
                max_group_members: self.max_group_members as usize,
                ..Default::default()
            },
            bus: self.cluster.as_ref().map(|cluster| {
                let mut bus = ferry_router::BusConfig::new(cluster.nsqd_tcp_addresses.clone());
                // Consume where configured; with neither list, where we publish.
                if !cluster.consume_nsqd_tcp_addresses.is_empty()
                    || !cluster.lookupd_http_addresses.is_empty()
                {
                    bus.nsqd_consume = cluster.consume_nsqd_tcp_addresses.clone();
                }
                bus.lookupd = cluster.lookupd_http_addresses.clone();
                bus.outbound.resend_after =
                    std::time::Duration::from_millis(cluster.resend_after_ms.max(100));
                bus.call_timeout =
                    std::time::Duration::from_millis(cluster.call_timeout_ms.max(100));
                bus
            }),
        })
    }

    /// Checks ranges that would make the server misbehave.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let check = |ok: bool, what: &str| {
            if ok {
                Ok(())
            } else {
                Err(ConfigError::Invalid(what.to_owned()))
            }
        };
        check(
            self.listen.addr().is_some() || self.tls_listen.addr().is_some(),
            "no client port: set listen, tls_listen or both",
        )?;
        if self.tls_listen.addr().is_some() {
            check(
                self.tls_cert.is_some() && self.tls_key.is_some(),
                "tls_listen needs tls_cert and tls_key (PEM files)",
            )?;
            // Port 0 (any free port, as tests use) may appear on both.
            check(
                self.listen.addr() != self.tls_listen.addr()
                    || self.tls_listen.addr().is_some_and(|a| a.port() == 0),
                "listen and tls_listen must differ",
            )?;
        } else {
            check(
                self.tls_cert.is_none() && self.tls_key.is_none(),
                "tls_cert and tls_key are set but tls_listen is not",
            )?;
        }
        check(self.heartbeat_secs >= 1, "heartbeat_secs must be ≥ 1")?;
        check(self.heartbeat_secs <= 3600, "heartbeat_secs must be ≤ 3600")?;
        check(self.auth_timeout_secs >= 1, "auth_timeout_secs must be ≥ 1")?;
        let min_frame = ferry_protocol::limits::MIN_MAX_FRAME_BYTES;
        let frame_range = min_frame as u32..=16 * 1024 * 1024;
        check(
            frame_range.contains(&self.max_frame_bytes),
            &format!(
                "max_frame_bytes must be in {min_frame}..=16777216 (got {}): smaller frames \
                 leave no room for an Auth frame or a Send's content",
                self.max_frame_bytes
            ),
        )?;
        check(self.max_connections >= 1, "max_connections must be ≥ 1")?;
        check(
            self.max_frames_per_sec >= 1,
            "max_frames_per_sec must be ≥ 1",
        )?;
        check(
            self.write_queue_frames >= 16,
            "write_queue_frames must be ≥ 16",
        )?;
        check(
            self.write_queue_bytes as u64 >= 4 * self.max_frame_bytes as u64,
            &format!(
                "write_queue_bytes must be ≥ 4 × max_frame_bytes = {} (room for a request's \
                 replies above the back-pressure level, half of it)",
                4 * self.max_frame_bytes as u64
            ),
        )?;
        check(
            self.write_timeout_secs >= 1,
            "write_timeout_secs must be ≥ 1",
        )?;
        check(self.max_pending_auth >= 1, "max_pending_auth must be ≥ 1")?;
        check(
            self.frame_read_timeout_secs >= 1,
            "frame_read_timeout_secs must be ≥ 1",
        )?;
        if let Some(bytes) = self.admin_max_body_bytes {
            check(bytes >= 4096, "admin_max_body_bytes must be ≥ 4096")?;
        }
        check(self.retention_days >= 1, "retention_days must be ≥ 1")?;
        check(self.max_group_members >= 2, "max_group_members must be ≥ 2")?;
        check(
            (self.storage_memory_mb as usize) << 20 >= ferry_storage::MIN_MEMORY_BUDGET_BYTES,
            "storage_memory_mb must be ≥ 16",
        )?;
        if let Some(secret) = &self.jwt_previous_secret {
            check(
                secret.len() >= 16,
                "jwt_previous_secret must be at least 16 bytes",
            )?;
            check(
                self.jwt_previous_kid
                    .as_deref()
                    .is_some_and(|k| !k.is_empty()),
                "jwt_previous_secret needs jwt_previous_kid (the kid of the tokens it signed)",
            )?;
            check(
                self.jwt_previous_kid != self.jwt_kid,
                "jwt_previous_kid must differ from jwt_kid",
            )?;
        }
        if let Some(secret) = &self.jwt_secret {
            check(secret.len() >= 16, "jwt_secret must be at least 16 bytes")?;
        }
        if let Some(token) = &self.admin_token {
            check(token.len() >= 16, "admin_token must be at least 16 bytes")?;
        }
        if let Some(cluster) = &self.cluster {
            cluster.validate()?;
        }
        Ok(())
    }

    /// The effective configuration as TOML (secrets are redacted).
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        if shown.jwt_previous_secret.is_some() {
            shown.jwt_previous_secret = Some("<redacted>".into());
        }
        if shown.jwt_secret.is_some() {
            shown.jwt_secret = Some("<redacted>".into());
        }
        if shown.admin_token.is_some() {
            shown.admin_token = Some("<redacted>".into());
        }
        toml::to_string(&shown).unwrap_or_else(|e| format!("# cannot render: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ferry.toml");
        std::fs::write(&path, "heartbeat_secs = 5\nmax_connections = 77\n").unwrap();
        let args = ServeArgs {
            config: Some(path),
            max_connections: Some(9),
            ..Default::default()
        };
        let c = args.resolve().unwrap();
        assert_eq!(c.heartbeat_secs, 5, "from the file");
        assert_eq!(c.max_connections, 9, "flag beats file");
        assert_eq!(c.auth_timeout_secs, 10, "default");
    }

    #[test]
    fn unknown_keys_in_the_file_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ferry.toml");
        std::fs::write(&path, "heartbeat = 5\n").unwrap();
        let args = ServeArgs {
            config: Some(path),
            ..Default::default()
        };
        assert!(matches!(args.resolve(), Err(ConfigError::Parse { .. })));
    }

    #[test]
    fn admin_token_is_checked_and_never_printed() {
        let short = ServeArgs {
            admin_token: Some("short".into()),
            ..Default::default()
        };
        assert!(matches!(short.resolve(), Err(ConfigError::Invalid(_))));
        let args = ServeArgs {
            admin_token: Some("a-long-enough-admin-token".into()),
            ..Default::default()
        };
        let text = args.resolve().unwrap().to_toml();
        assert!(text.contains("admin_token = \"<redacted>\""), "{text}");
        assert!(!text.contains("a-long-enough-admin-token"));
    }

    #[test]
    fn a_previous_secret_needs_its_own_kid_and_is_never_printed() {
        let previous = "the-previous-secret-0123";
        for (kid, previous_kid) in [(Some("k2"), None), (Some("k2"), Some("k2"))] {
            let args = ServeArgs {
                jwt_kid: kid.map(Into::into),
                jwt_previous_secret: Some(previous.into()),
                jwt_previous_kid: previous_kid.map(Into::into),
                ..Default::default()
            };
            assert!(matches!(args.resolve(), Err(ConfigError::Invalid(_))));
        }
        let args = ServeArgs {
            jwt_kid: Some("k2".into()),
            jwt_previous_secret: Some(previous.into()),
            jwt_previous_kid: Some("k1".into()),
            ..Default::default()
        };
        let text = args.resolve().unwrap().to_toml();
        assert!(
            text.contains("jwt_previous_secret = \"<redacted>\""),
            "{text}"
        );
        assert!(!text.contains(previous));
        assert!(text.contains("jwt_previous_kid = \"k1\""), "{text}");
    }

    #[test]
    fn frames_too_small_for_a_send_are_refused_at_start() {
        for bytes in [256, 1023, 1024, 2047] {
            let args = ServeArgs {
                max_frame_bytes: Some(bytes),
                ..Default::default()
            };
            let err = args.resolve().unwrap_err().to_string();
            assert!(err.contains("max_frame_bytes must be in 2048..="), "{err}");
        }
        let args = ServeArgs {
            max_frame_bytes: Some(2048),
            ..Default::default()
        };
        assert_eq!(args.resolve().unwrap().max_frame_bytes, 2048);
    }

    #[test]
    fn the_byte_queue_must_hold_four_frames() {
        let args = ServeArgs {
            max_frame_bytes: Some(1024 * 1024),
            ..Default::default()
        };
        let err = args.resolve().unwrap_err().to_string();
        assert!(
            err.contains("write_queue_bytes must be ≥ 4 × max_frame_bytes"),
            "{err}"
        );
        let args = ServeArgs {
            max_frame_bytes: Some(1024 * 1024),
            write_queue_bytes: Some(4 * 1024 * 1024),
            ..Default::default()
        };
        assert!(args.resolve().is_ok());
    }

    const THREE_NODES: &str = r#"
[cluster]
node_id = 1
nsqd_tcp_addresses = ["127.0.0.1:4150"]

[[cluster.nodes]]
id = 3
client_address = "10.0.0.3:7600"
ops_address = "10.0.0.3:7601"

[[cluster.nodes]]
id = 1
client_address = "10.0.0.1:7600"
ops_address = "10.0.0.1:7601"

[[cluster.nodes]]
id = 2
client_address = "chat.example.com:7600"
ops_address = "[fd00::2]:7601"
"#;

    fn resolve_file(text: &str, args: ServeArgs) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ferry.toml");
        std::fs::write(&path, text).unwrap();
        ServeArgs {
            config: Some(path),
            ..args
        }
        .resolve()
    }

    fn invalid_message(result: Result<Config, ConfigError>) -> String {
        match result {
            Err(e @ ConfigError::Invalid(_)) => e.to_string(),
            other => panic!("expected an invalid configuration, got {other:?}"),
        }
    }

    #[test]
    fn no_cluster_section_is_a_single_node() {
        let c = ServeArgs::default().resolve().unwrap();
        assert!(c.cluster.is_none());
        let router = c.router_config().unwrap();
        assert_eq!(router.node_id, "ferry-1");
        assert!(!router.placement.is_cluster());
        assert!(!c.to_toml().contains("cluster"));
    }

    #[test]
    fn cluster_section_from_the_file_with_the_node_id_from_env_or_flags() {
        let c = resolve_file(THREE_NODES, ServeArgs::default()).unwrap();
        let cluster = c.cluster.as_ref().unwrap();
        assert_eq!(cluster.node_id, 1);
        assert_eq!(cluster.nodes.len(), 3);
        assert_eq!(cluster.consume_from_nsqd(), ["127.0.0.1:4150"]);
        let router = c.router_config().unwrap();
        assert_eq!(router.node_id, "1");
        assert!(router.placement.is_cluster());
        // One shared file, each machine says which node it is.
        let args = ServeArgs {
            cluster: ClusterArgs {
                node_id: Some(2),
                ..Default::default()
            },
            ..Default::default()
        };
        let c = resolve_file(THREE_NODES, args).unwrap();
        let placement = c.placement().unwrap();
        assert_eq!(placement.self_id().get(), 2);
        assert_eq!(c.router_config().unwrap().node_id, "2");
        let two = placement.node(placement.self_id()).unwrap();
        assert_eq!(two.client_address, "chat.example.com:7600");
        // The same list in another order is the same cluster.
        let flag_list: NodeList = "2@chat.example.com:7600@[fd00::2]:7601, \
                                   1@10.0.0.1:7600@10.0.0.1:7601,3@10.0.0.3:7600@10.0.0.3:7601"
            .parse()
            .unwrap();
        let args = ServeArgs {
            cluster: ClusterArgs {
                node_id: Some(3),
                nodes: Some(flag_list),
                nsqd_tcp_addresses: Some(vec!["nsqd:4150".into()]),
                ..Default::default()
            },
            ..Default::default()
        };
        let from_flags = args.resolve().unwrap().placement().unwrap();
        assert_eq!(from_flags.digest(), placement.digest());
    }

    #[test]
    fn consume_lists_fall_back_to_the_publish_list_only_when_both_are_empty() {
        let mut cluster = resolve_file(THREE_NODES, ServeArgs::default())
            .unwrap()
            .cluster
            .unwrap();
        cluster.lookupd_http_addresses = vec!["127.0.0.1:4161".into()];
        assert!(cluster.consume_from_nsqd().is_empty());
        cluster.consume_nsqd_tcp_addresses = vec!["127.0.0.1:4152".into()];
        assert_eq!(cluster.consume_from_nsqd(), ["127.0.0.1:4152"]);
    }

    #[test]
    fn printed_cluster_config_parses_back() {
        let c = resolve_file(THREE_NODES, ServeArgs::default()).unwrap();
        let text = c.to_toml();
        assert!(
            text.contains("[cluster]") && text.contains("[[cluster.nodes]]"),
            "{text}"
        );
        let back = resolve_file(&text, ServeArgs::default()).unwrap();
        assert_eq!(back.cluster, c.cluster);
    }

    #[test]
    fn bad_cluster_configs_are_refused_with_their_reason() {
        let with = |node_id: u16, extra: &str| {
            let text = THREE_NODES.replace("node_id = 1", &format!("node_id = {node_id}{extra}"));
            invalid_message(resolve_file(&text, ServeArgs::default()))
        };
        let m = with(4, "");
        assert!(
            m.contains("cluster.node_id") && m.contains("4 is not in"),
            "{m}"
        );
        let m = with(0, "");
        assert!(
            m.contains("cluster.node_id") && m.contains("out of range"),
            "{m}"
        );
        let m = invalid_message(resolve_file(
            &THREE_NODES.replace("id = 3", "id = 2"),
            ServeArgs::default(),
        ));
        assert!(m.contains("node id 2 is listed twice"), "{m}");
        let m = invalid_message(resolve_file(
            &THREE_NODES.replace("id = 3", "id = 1024"),
            ServeArgs::default(),
        ));
        assert!(m.contains("1024 is out of range"), "{m}");
        let m = invalid_message(resolve_file(
            &THREE_NODES.replace("10.0.0.3:7600", "10.0.0.3"),
            ServeArgs::default(),
        ));
        assert!(
            m.contains("node 3 client_address `10.0.0.3` is not host:port"),
            "{m}"
        );
        let m = invalid_message(resolve_file(
            &THREE_NODES.replace("10.0.0.1:7601", "http://10.0.0.1:7601"),
            ServeArgs::default(),
        ));
        assert!(m.contains("node 1 ops_address"), "{m}");
        let m = invalid_message(resolve_file(
            &THREE_NODES.replace("[\"127.0.0.1:4150\"]", "[]"),
            ServeArgs::default(),
        ));
        assert!(
            m.contains("cluster.nsqd_tcp_addresses: at least one"),
            "{m}"
        );
        let m = invalid_message(resolve_file(
            &THREE_NODES.replace("127.0.0.1:4150", "127.0.0.1:0"),
            ServeArgs::default(),
        ));
        assert!(
            m.contains("cluster.nsqd_tcp_addresses") && m.contains("port"),
            "{m}"
        );
        // A cluster key alone is not a cluster.
        let args = ServeArgs {
            cluster: ClusterArgs {
                node_id: Some(1),
                ..Default::default()
            },
            ..Default::default()
        };
        let m = invalid_message(args.resolve());
        assert!(m.contains("cluster.nodes is required"), "{m}");
        // Unknown keys in the section are parse errors, like at the top level.
        let text = THREE_NODES.replace("node_id = 1", "node_id = 1\nnode = 2");
        assert!(matches!(
            resolve_file(&text, ServeArgs::default()),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn node_lists_in_flag_form() {
        let list: NodeList = "1@a:1@b:2,2@[::1]:7600@[::1]:7601".parse().unwrap();
        assert_eq!(list.0.len(), 2);
        assert_eq!(list.0[1].client_address, "[::1]:7600");
        for bad in ["1@a:1", "x@a:1@b:2", "1@a:1@b:2@c:3"] {
            assert!(bad.parse::<NodeList>().is_err(), "{bad}");
        }
        assert!(check_host_port("host.example:7600").is_ok());
        assert!(check_host_port("[::1]:7600").is_ok());
        for bad in [
            "",
            ":7600",
            "host",
            "::1:7600",
            "h:0",
            "h:65536",
            "h :1",
            "tcp://h:1",
        ] {
            assert!(check_host_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_plain_port_can_be_turned_off_for_a_tls_only_node() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ferry.toml");
        std::fs::write(
            &path,
            "listen = \"\"\ntls_listen = \"0.0.0.0:7643\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            ..Default::default()
        };
        let c = args.resolve().unwrap();
        assert_eq!(c.listen.addr(), None);
        assert_eq!(c.tls_listen.addr().unwrap().port(), 7643);
        let text = c.to_toml();
        assert!(text.contains("listen = \"\""), "{text}");
        let back: ServeArgs = toml::from_str(&text).unwrap();
        assert_eq!(back.listen, Some(ListenAddr(None)));
        assert_eq!(back.tls_cert, Some(PathBuf::from("c.pem")));
        // The flag form.
        assert_eq!("".parse::<ListenAddr>().unwrap(), ListenAddr(None));
        // Neither port, TLS without its files, files without TLS.
        for args in [
            ServeArgs {
                listen: Some(ListenAddr(None)),
                ..Default::default()
            },
            ServeArgs {
                tls_listen: Some("127.0.0.1:7643".parse().unwrap()),
                tls_cert: Some("c.pem".into()),
                ..Default::default()
            },
            ServeArgs {
                tls_key: Some("k.pem".into()),
                ..Default::default()
            },
        ] {
            assert!(
                matches!(args.resolve(), Err(ConfigError::Invalid(_))),
                "{args:?}"
            );
        }
    }

    #[test]
    fn printed_config_parses_back() {
        let text = Config::default().to_toml();
        let back: ServeArgs = toml::from_str(&text).unwrap();
        assert_eq!(back.heartbeat_secs, Some(30));
    }
}
