//! The ops HTTP endpoint: `/healthz` (the process is up), `/readyz`
//! (storage open and writable, and the node accepting clients), `/metrics` (Prometheus
//! text format), `/v1/route` (which node a user or group lives on) and the
//! admin API under `/admin` (see [`crate::admin`]).
//!
//! `/v1/route` needs no token, like `/healthz`: an app backend calls it to
//! dial a user's home node first, and it reveals only placement, which any
//! client learns from a `Redirect` anyway.
//!
//! One listener for all of it, loopback by default: the admin API must not
//! be reachable from the client network.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
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
        .route("/v1/route", get(route))
        .with_state(shared)
        .nest("/admin", admin);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "ops HTTP server failed");
    }
}

async fn readyz(State(shared): State<Arc<ServerState>>) -> (StatusCode, String) {
    if shared.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into());
    }
    match shared.router.not_ready_reason() {
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
        None => (StatusCode::OK, "ready\n".into()),
    }
}

async fn metrics(State(shared): State<Arc<ServerState>>) -> Response {
    let online = shared.router.sessions().online();
    // Rendering reads /proc (one directory entry per open descriptor) and
    // lists the data dir: keep it off the reactor threads.
    let storage = shared.router.storage().clone();
    match tokio::task::spawn_blocking(move || crate::metrics::render(online, &storage)).await {
        Ok(Some(text)) => ([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], text).into_response(),
        Ok(None) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder not installed (another recorder owns this process)\n",
        )
            .into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "rendering failed\n").into_response(),
    }
}

/// `GET /v1/route?uid=U` or `?gid=G`.
#[derive(serde::Deserialize)]
struct RouteQuery {
    uid: Option<String>,
    gid: Option<String>,
}

/// The answer: the id asked about, under its own key, and where it lives.
#[derive(serde::Serialize)]
struct Route {
    #[serde(skip_serializing_if = "Option::is_none")]
    uid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gid: Option<String>,
    node_id: String,
    address: String,
    ops_address: String,
}

/// Which node is the home of a user (`uid`) or the owner of a group (`gid`):
/// the same answer on every node. Outside a cluster, this node (its bound
/// client and ops addresses).
async fn route(
    State(shared): State<Arc<ServerState>>,
    query: Result<Query<RouteQuery>, QueryRejection>,
) -> Result<axum::Json<Route>, admin::ApiError> {
    let Query(query) = query?;
    let (uid, gid, id) = match (query.uid, query.gid) {
        (Some(uid), None) => {
            ferry_protocol::limits::check_id("uid", &uid)
                .map_err(|e| admin::bad_request(e.to_string()))?;
            let id = uid.clone();
            (Some(uid), None, id)
        }
        (None, Some(gid)) => {
            ferry_protocol::limits::check_id("gid", &gid)
                .map_err(|e| admin::bad_request(e.to_string()))?;
            let id = gid.clone();
            (None, Some(gid), id)
        }
        _ => return Err(admin::bad_request("give exactly one of uid and gid")),
    };
    let placement = shared.router.placement();
    let (node_id, address, ops_address) = if placement.is_cluster() {
        let owner = if uid.is_some() {
            placement.home_of_user(&id)
        } else {
            placement.owner_of_group(&id)
        };
        let node = placement.node(owner);
        (
            owner.to_string(),
            node.map(|n| n.client_address.clone()).unwrap_or_default(),
            node.map(|n| n.ops_address.clone()).unwrap_or_default(),
        )
    } else {
        let (client, ops) = shared.bound.get().copied().unwrap_or_else(|| {
            let client = (shared.config.listen.addr())
                .or(shared.config.tls_listen.addr())
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
            (client, shared.config.http_listen)
        });
        (
            shared.router.node_id().to_owned(),
            client.to_string(),
            ops.to_string(),
        )
    };
    Ok(axum::Json(Route {
        uid,
        gid,
        node_id,
        address,
        ops_address,
    }))
}
