//! ferry routing: who receives a message and where they are.
//!
//! - [`session`]: the online registry and the per-connection outbox.
//! - [`Router`]: login/logout and the handling of every client request.
#![warn(missing_docs)]

pub mod session;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use ferry_protocol::proto::{self, frame::Body};
use ferry_protocol::{ErrorCode, Frame};
use session::{Conn, Sessions};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Router errors.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// The router is shutting down.
    #[error("router is shutting down")]
    ShuttingDown,
}

/// Routes requests of authenticated connections.
pub struct Router {
    node_id: String,
    sessions: Sessions,
}

impl Router {
    /// A single-node router.
    pub fn new(node_id: impl Into<String>) -> Router {
        Router {
            node_id: node_id.into(),
            sessions: Sessions::new(),
        }
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The online-session registry.
    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// Whether storage is open and the router can serve.
    pub fn is_ready(&self) -> bool {
        true
    }

    /// Queues `auth_ok`, registers `conn` (kicking the connection it
    /// replaces), and starts its sync.
    pub async fn login(
        &self,
        conn: &Arc<Conn>,
        auth_ok: proto::AuthOk,
        _last_seq: u64,
        _skip_sync: bool,
    ) -> Result<(), RouterError> {
        let _ = conn.push(Frame::from(auth_ok));
        if let Some(old) = self.sessions.register(conn.clone()) {
            old.kick(
                ErrorCode::LoggedInElsewhere,
                "logged in on another connection",
            );
        }
        Ok(())
    }

    /// Forgets `conn` if it is still the registered connection of its device.
    pub fn logout(&self, conn: &Conn) {
        self.sessions.unregister(conn);
    }

    /// Handles one request frame of `conn`.
    pub async fn handle(&self, conn: &Arc<Conn>, body: Body) {
        let _ = conn.push(Frame::error(
            ErrorCode::Unavailable,
            format!("{} is not available on this node yet", body.kind_name()),
        ));
    }

    /// Flushes and closes storage.
    pub async fn shutdown(&self) {}
}
