//! Admin calls on any node of a cluster (docs/CLUSTER.md §2.2): a call
//! about a user or a group that lives on another node is forwarded, as it
//! came, to that node's ops address, and its answer is returned as it is.
//!
//! The token is checked here first (this layer runs inside
//! `require_token`); the owner checks it again, which is why every node of
//! a cluster has the same admin tokens. A forwarded call carries
//! [`FORWARDED_BY`], and a call carrying it is never forwarded again, so a
//! node list that differs between two nodes cannot bounce a call forever:
//! the second node answers it itself.
//!
//! Which node a call belongs to:
//!
//! | call | node |
//! | --- | --- |
//! | `/users/{id}/…` | the user's home |
//! | `/groups/{id}…` | the group's owner |
//! | `POST /groups` with a `group_id` | that group's owner |
//! | `POST /groups` without one, `/stats`, anything else | this node |

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{OriginalUri, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ferry_cluster::{NodeId, Placement};
use http_body_util::BodyExt;

use crate::admin::AdminState;

/// The header a forwarded admin call carries: the id of the node that
/// forwarded it.
pub const FORWARDED_BY: &str = "x-ferry-forwarded-by";

/// How long a forwarded call may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// The node an admin call belongs to, from its path (relative to `/admin`)
/// and, for a group create, its body. `None`: this node.
fn owner_of_call(placement: &Placement, path: &str, body: Option<&[u8]>) -> Option<NodeId> {
    let mut parts = path.trim_start_matches('/').split('/');
    let owner = match (parts.next(), parts.next()) {
        (Some("users"), Some(id)) if !id.is_empty() => placement.home_of_user(&decode(id)),
        (Some("groups"), Some(id)) if !id.is_empty() => placement.owner_of_group(&decode(id)),
        (Some("groups"), None) => {
            #[derive(serde::Deserialize)]
            struct Create {
                #[serde(default)]
                group_id: String,
            }
            let create: Create = serde_json::from_slice(body?).ok()?;
            if create.group_id.is_empty() {
                return None;
            }
            placement.owner_of_group(&create.group_id)
        }
        _ => return None,
    };
    (owner != placement.self_id()).then_some(owner)
}

/// A percent-decoded path segment (ids may hold any characters).
fn decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(high), Some(low)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push(high << 4 | low);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn json_error(status: StatusCode, code: &str, message: String) -> Response {
    (
        status,
        axum::Json(serde_json::json!({ "error": message, "code": code })),
    )
        .into_response()
}

/// The middleware: forwards calls that belong to another node.
pub(crate) async fn forward_to_owner(
    State(state): State<AdminState>,
    request: Request,
    next: Next,
) -> Response {
    let placement = state.shared.router.placement().clone();
    if !placement.is_cluster() || request.headers().contains_key(FORWARDED_BY) {
        return next.run(request).await;
    }
    let path = request.uri().path().to_owned();
    let is_create = path.trim_end_matches('/') == "/groups";
    // Only a group create needs its body to be placed; it is small (the
    // body limit bounds it) and is put back as it was.
    let (request, body) = if is_create {
        let (parts, body) = request.into_parts();
        let bytes = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) => {
                return json_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!("request body: {e}"),
                );
            }
        };
        (
            Request::from_parts(parts, Body::from(bytes.clone())),
            Some(bytes),
        )
    } else {
        (request, None)
    };
    let Some(owner) = owner_of_call(&placement, &path, body.as_deref()) else {
        return next.run(request).await;
    };
    let Some(node) = placement.node(owner) else {
        return next.run(request).await;
    };
    forward(&placement, node.ops_address.clone(), owner, request, body).await
}

async fn forward(
    placement: &Placement,
    ops_address: String,
    owner: NodeId,
    request: Request,
    body: Option<Bytes>,
) -> Response {
    let (mut parts, original_body) = request.into_parts();
    let path_and_query = parts
        .extensions
        .get::<OriginalUri>()
        .map(|u| u.0.clone())
        .unwrap_or_else(|| parts.uri.clone());
    let path_and_query = path_and_query
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let body = match body {
        Some(b) => b,
        None => match original_body.collect().await {
            Ok(c) => c.to_bytes(),
            Err(e) => {
                return json_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!("request body: {e}"),
                );
            }
        },
    };
    let uri = match format!("http://{ops_address}{path_and_query}").parse() {
        Ok(uri) => uri,
        Err(e) => {
            return json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "bad_node_address",
                format!("node {owner}'s ops address {ops_address:?}: {e}"),
            );
        }
    };
    parts.uri = uri;
    parts.headers.remove(axum::http::header::HOST);
    parts.headers.insert(
        FORWARDED_BY,
        HeaderValue::from_str(&placement.self_id().to_string()).expect("digits"),
    );
    let outgoing = hyper::Request::from_parts(parts, http_body_util::Full::new(body));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<Bytes>>();
    metrics::counter!("ferry_admin_forwarded_total", "peer" => owner.to_string()).increment(1);
    match tokio::time::timeout(FORWARD_TIMEOUT, client.request(outgoing)).await {
        Ok(Ok(response)) => {
            let (parts, body) = response.into_parts();
            match body.collect().await {
                Ok(c) => Response::from_parts(parts, Body::from(c.to_bytes())),
                Err(e) => json_error(
                    StatusCode::BAD_GATEWAY,
                    "node_unreachable",
                    format!("node {owner} ({ops_address}) broke off its answer: {e}"),
                ),
            }
        }
        Ok(Err(e)) => json_error(
            StatusCode::BAD_GATEWAY,
            "node_unreachable",
            format!(
                "node {owner} ({ops_address}), which owns this user or group, did not answer: {e}"
            ),
        ),
        Err(_) => json_error(
            StatusCode::GATEWAY_TIMEOUT,
            "node_unreachable",
            format!(
                "node {owner} ({ops_address}), which owns this user or group, did not answer within {} s",
                FORWARD_TIMEOUT.as_secs()
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_cluster::Node;

    fn placement(this: u16) -> Placement {
        let nodes = (1..=3)
            .map(|id| Node {
                id: NodeId::new(id).unwrap(),
                client_address: format!("127.0.0.1:{}", 7000 + id),
                ops_address: format!("127.0.0.1:{}", 8000 + id),
            })
            .collect();
        Placement::new(this, nodes).unwrap()
    }

    #[test]
    fn calls_go_to_the_home_of_their_user_or_the_owner_of_their_group() {
        let p = placement(1);
        for user in ["alice", "bob", "carol", "dave", "erin"] {
            let home = p.home_of_user(user);
            let expected = (home != p.self_id()).then_some(home);
            assert_eq!(
                owner_of_call(&p, &format!("/users/{user}/kick"), None),
                expected
            );
            assert_eq!(
                owner_of_call(&p, &format!("/users/{user}/presence"), None),
                expected
            );
        }
        for group in ["g1", "g2", "g3", "g4"] {
            let owner = p.owner_of_group(group);
            let expected = (owner != p.self_id()).then_some(owner);
            assert_eq!(
                owner_of_call(&p, &format!("/groups/{group}/members"), None),
                expected
            );
            let body = format!(r#"{{"group_id":"{group}","name":"n","owner":"o"}}"#);
            assert_eq!(
                owner_of_call(&p, "/groups", Some(body.as_bytes())),
                expected
            );
        }
        assert_eq!(owner_of_call(&p, "/groups", Some(br#"{"name":"n"}"#)), None);
        assert_eq!(owner_of_call(&p, "/stats", None), None);
    }

    #[test]
    fn path_segments_are_percent_decoded() {
        assert_eq!(decode("a%20b"), "a b");
        assert_eq!(decode("%E2%82%AC"), "€");
        assert_eq!(decode("100%"), "100%");
        assert_eq!(decode("%zz"), "%zz");
    }
}
