//! The ferry gateway: everything between a TCP socket and the router.
//!
//! - [`server`]: listeners, accept loop, connection limit, heartbeat task,
//!   graceful shutdown.
//! - `connection`: one connection's auth handshake, read loop, writer task
//!   and lingering close.
//! - [`wheel`]: the hashed timing wheel behind the heartbeat.
//! - [`auth`]: JWT verification and the secret's source.
//! - [`config`]: defaults < TOML file < environment < flags.
//! - [`rlimit`]: the open-file limit.
//! - `http`: the ops HTTP port.
#![warn(missing_docs)]

pub mod auth;
pub mod config;
mod connection;
mod http;
pub mod metrics;
pub mod rlimit;
pub mod server;
pub mod wheel;

pub use server::Server;
