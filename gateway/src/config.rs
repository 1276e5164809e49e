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

/// The effective configuration of `ferry serve`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    /// Client (TCP, framed Protobuf) listen address.
    pub listen: SocketAddr,
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
    /// HS256 secret for client JWTs. When unset, `<data_dir>/jwt.secret`
    /// is used (and created on first start).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_secret: Option<String>,
    /// Bearer token of the admin HTTP API. When unset,
    /// `<data_dir>/admin.token` is used (and created on first start).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<String>,
    /// Seconds a connection may take to flush its goodbye on shutdown.
    pub shutdown_timeout_secs: u32,
    /// Write durability of acknowledged messages.
    pub durability: Durability,
    /// Messages older than this are deleted in the background.
    pub retention_days: u32,
    /// How long after sending a message its sender may recall it.
    pub recall_window_secs: u32,
    /// Most members one group may have.
    pub max_group_members: u32,
    /// Log line format.
    pub log_format: LogFormat,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "0.0.0.0:7600".parse().expect("valid literal"),
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
            jwt_secret: None,
            admin_token: None,
            shutdown_timeout_secs: 10,
            durability: Durability::Fsync,
            retention_days: 30,
            recall_window_secs: 120,
            max_group_members: 10_000,
            log_format: LogFormat::Text,
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
    /// Client listen address [default: 0.0.0.0:7600].
    #[arg(long, env = "FERRY_LISTEN")]
    pub listen: Option<SocketAddr>,
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
    /// HS256 secret for client tokens [default: <data-dir>/jwt.secret, created on first start].
    #[arg(long, env = "FERRY_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Bearer token for the admin HTTP API [default: <data-dir>/admin.token, created on first start].
    #[arg(long, env = "FERRY_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Seconds to drain connections on SIGTERM/SIGINT [default: 10].
    #[arg(long, env = "FERRY_SHUTDOWN_TIMEOUT_SECS")]
    pub shutdown_timeout_secs: Option<u32>,
    /// fsync: ack after the WAL is synced (survives power loss); wal: ack after the WAL write (survives kill -9) [default: fsync].
    #[arg(long, env = "FERRY_DURABILITY")]
    pub durability: Option<Durability>,
    /// Days messages are kept [default: 30].
    #[arg(long, env = "FERRY_RETENTION_DAYS")]
    pub retention_days: Option<u32>,
    /// Seconds after sending during which a message may be recalled [default: 120].
    #[arg(long, env = "FERRY_RECALL_WINDOW_SECS")]
    pub recall_window_secs: Option<u32>,
    /// Most members per group [default: 10000].
    #[arg(long, env = "FERRY_MAX_GROUP_MEMBERS")]
    pub max_group_members: Option<u32>,
    /// Log format [default: text]. Filter with RUST_LOG (e.g. RUST_LOG=ferry=debug).
    #[arg(long, env = "FERRY_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
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
        }
        self.apply(&mut config);
        config.validate()?;
        Ok(config)
    }

    fn apply(&self, config: &mut Config) {
        layer!(
            config,
            self,
            listen,
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
            shutdown_timeout_secs,
            durability,
            retention_days,
            recall_window_secs,
            max_group_members,
            log_format
        );
        if self.jwt_secret.is_some() {
            config.jwt_secret = self.jwt_secret.clone();
        }
        if self.admin_token.is_some() {
            config.admin_token = self.admin_token.clone();
        }
    }
}

impl Config {
    /// Where RocksDB lives inside the data dir.
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("db")
    }

    /// The storage settings.
    pub fn storage_options(&self) -> ferry_storage::StorageOptions {
        ferry_storage::StorageOptions {
            retention_days: self.retention_days,
            max_open_files: STORAGE_MAX_OPEN_FILES,
            ..Default::default()
        }
    }

    /// The bounds of one connection's outbox.
    pub fn outbox_limits(&self) -> ferry_router::session::OutboxLimits {
        ferry_router::session::OutboxLimits {
            frames: self.write_queue_frames as usize,
            bytes: self.write_queue_bytes as usize,
        }
    }

    /// The router settings.
    pub fn router_config(&self) -> ferry_router::RouterConfig {
        ferry_router::RouterConfig {
            node_id: "ferry-1".into(),
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
        }
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
        check(self.retention_days >= 1, "retention_days must be ≥ 1")?;
        check(self.max_group_members >= 2, "max_group_members must be ≥ 2")?;
        if let Some(secret) = &self.jwt_secret {
            check(secret.len() >= 16, "jwt_secret must be at least 16 bytes")?;
        }
        if let Some(token) = &self.admin_token {
            check(token.len() >= 16, "admin_token must be at least 16 bytes")?;
        }
        Ok(())
    }

    /// The effective configuration as TOML (secrets are redacted).
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
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

    #[test]
    fn printed_config_parses_back() {
        let text = Config::default().to_toml();
        let back: ServeArgs = toml::from_str(&text).unwrap();
        assert_eq!(back.heartbeat_secs, Some(30));
    }
}
