//! The ferry gateway: everything between a TCP socket and the router.
//!
//! - [`server`]: listeners, accept loop, connection limit, heartbeat task,
//!   graceful shutdown.
//! - `connection`: one connection's auth handshake, read loop, writer task
//!   and lingering close.
//! - [`tls`]: the TLS port's rustls configuration and its certificate
//!   reload.
//! - [`wheel`]: the hashed timing wheel behind the heartbeat.
//! - [`auth`]: JWT verification and the secret's source (the `ferry-auth`
//!   crate, re-exported).
//! - [`config`]: defaults < TOML file < environment < flags.
//! - [`ip_limits`]: connections, connects per second and failed logins
//!   per source address.
//! - [`rlimit`]: the open-file limit.
//! - `http`: the ops HTTP port: health, readiness, `/metrics`, and the
//!   [`admin`] API.
//! - [`metrics`]: the Prometheus recorder and the gateway's counters.
//! - [`presence`]: when offline users were last connected.
//! - [`backup_files`]: backups and restore of a data dir (database and
//!   secret files).
//!
//! The `ferry` binary (serve, token, chat) lives in the `cli/` crate.
#![warn(missing_docs)]

pub mod admin;
mod admin_forward;
pub mod backup_files;
pub mod config;
mod connection;
mod http;
pub mod huge_pages;
pub mod ip_limits;
pub mod log_output;
pub mod metrics;
pub mod presence;
pub mod rlimit;
pub mod server;
pub mod tls;
pub mod wheel;

pub use ferry_auth as auth;
pub use server::Server;

use std::sync::Arc;

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The database could not be opened.
    #[error("opening storage in {path}: {source}")]
    Storage {
        /// The database directory.
        path: std::path::PathBuf,
        /// Why.
        source: ferry_storage::StorageError,
    },
    /// A background thread could not start.
    #[error("starting the retention sweeper: {0}")]
    Sweeper(std::io::Error),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The router could not start.
    #[error("starting the router: {0}")]
    Router(#[from] ferry_router::RouterError),
}

/// Opens storage for `config`, starts its retention sweeper and its group
/// committer, and returns the router over it. Call inside a tokio runtime.
pub fn open_router(config: &config::Config) -> Result<Arc<ferry_router::Router>, StartError> {
    let router_config = config.router_config()?;
    // Before anything records: handles resolved earlier would stay no-ops.
    metrics::install();
    let path = config.db_path();
    let storage = ferry_storage::Storage::open(&path, config.storage_options())
        .map_err(|source| StartError::Storage { path, source })?;
    ferry_storage::retention::spawn_sweeper(storage.clone(), std::time::Duration::from_secs(3600))
        .map_err(StartError::Sweeper)?;
    let router = ferry_router::Router::new(router_config, storage)?;
    let router = Arc::new(router);
    router.start_cluster()?;
    Ok(router)
}
