//! The ops HTTP endpoint: `/healthz` (the process is up) and `/readyz`
//! (storage open and the node accepting clients).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use ferry_router::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Serves ops HTTP on `listener` until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, router: Arc<Router>, shutdown: CancellationToken) {
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AppState {
            router,
            shutdown: shutdown.clone(),
        });
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "ops HTTP server failed");
    }
}

#[derive(Clone)]
struct AppState {
    router: Arc<Router>,
    shutdown: CancellationToken,
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, &'static str) {
    if state.shutdown.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
    } else if !state.router.is_ready() {
        (StatusCode::SERVICE_UNAVAILABLE, "storage not ready\n")
    } else {
        (StatusCode::OK, "ready\n")
    }
}
