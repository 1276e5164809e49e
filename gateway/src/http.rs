//! The ops HTTP endpoint: `/healthz` (the process is up), `/readyz`
//! (storage open and writable, and the node accepting clients), `/metrics` (Prometheus
//! text format) and the admin API under `/admin` (see [`crate::admin`]).
//!
//! One listener for all of it, loopback by default: the admin API must not
//! be reachable from the client network.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;

use crate::admin::{self, AdminState, AdminToken};
use crate::server::ServerState;

/// The Prometheus text exposition format, version 0.0.4.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves ops HTTP on `listener` until the server shuts down.
pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<ServerState>,
    admin_token: Option<Arc<AdminToken>>,
) {
    let shutdown = shared.shutdown.clone();
    let admin = admin::routes(AdminState {
        shared: shared.clone(),
        token: admin_token,
    });
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(shared)
        .nest("/admin", admin);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "ops HTTP server failed");
    }
}

async fn readyz(State(shared): State<Arc<ServerState>>) -> (StatusCode, &'static str) {
    if shared.shutdown.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
    } else if shared.router.writes_failing() {
        (StatusCode::SERVICE_UNAVAILABLE, "storage writes failing\n")
    } else if !shared.router.is_ready() {
        (StatusCode::SERVICE_UNAVAILABLE, "storage not ready\n")
    } else {
        (StatusCode::OK, "ready\n")
    }
}

async fn metrics(State(shared): State<Arc<ServerState>>) -> Response {
    let online = shared.router.sessions().online();
    // Rendering reads /proc (one directory entry per open descriptor):
    // keep it off the reactor threads.
    match tokio::task::spawn_blocking(move || crate::metrics::render(online)).await {
        Ok(Some(text)) => ([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], text).into_response(),
        Ok(None) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder not installed (another recorder owns this process)\n",
        )
            .into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "rendering failed\n").into_response(),
    }
}
