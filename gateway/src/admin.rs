//! The admin HTTP API: JSON over the ops port, for app backends and
//! operators. `docs/ADMIN_API.md` is its reference, with a `curl` example
//! per call.
//!
//! ```text
//!  POST   /admin/groups                          create a group (as its owner)
//!  GET    /admin/groups/{id}                     a group's facts
//!  DELETE /admin/groups/{id}                     dissolve
//!  GET    /admin/groups/{id}/members?after=&limit=   members, paged by user id
//!  POST   /admin/groups/{id}/members             add members
//!  POST   /admin/groups/{id}/members/remove      remove members
//!  DELETE /admin/groups/{id}/members/{user}      remove one member
//!  POST   /admin/groups/{id}/messages            system message to a group
//!  POST   /admin/users/{id}/messages             system message to a user
//!  POST   /admin/users/{id}/kick                 kick all devices, or one
//!  POST   /admin/users/{id}/revoke               revoke tokens issued before a time
//!  GET    /admin/users/{id}/presence             devices online, last seen
//!  GET    /admin/stats                           server stats
//!  POST   /admin/backup                          back up this node's database
//! ```
//!
//! Every call needs `Authorization: Bearer <admin token>`, checked before
//! anything else (also for unknown paths) by comparing SHA-256 digests in
//! constant time, so neither the token's bytes nor its length leak through
//! timing. Every error is `{"error": "...", "code": "..."}`.
//!
//! Writes go through the router's group committer like a client's
//! ([`ferry_router::Router::submit_admin`]): a system message is stored,
//! sequenced and delivered exactly like any other message, with
//! `kind = SYSTEM` and an empty sender. Group changes act as the group's
//! owner (the storage's permission rules apply as to them), so the
//! membership events members see name the owner as `from`.
//!
//! Reads go through the router too ([`ferry_router::Router::lookup_group`],
//! [`ferry_router::member_page`]): the gateway never touches storage, and
//! no RocksDB read runs on a runtime thread. Every string a caller gives is
//! checked against [`ferry_protocol::limits`], like a client's.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use bytes::Bytes;
use ferry_admin_api as bodies;
use ferry_protocol::ErrorCode;
use ferry_protocol::limits;
use ferry_protocol::proto::GroupRole;
use ferry_storage::{Group, GroupChange, Op, Outcome, Refusal, Target};
use serde::{Deserialize, Serialize};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tracing::{debug, info};

use crate::metrics as m;
use crate::server::ServerState;

/// Default page of the member list.
pub const MEMBERS_PAGE: usize = 100;
/// Largest page of the member list.
pub const MEMBERS_PAGE_MAX: usize = 1000;
/// How long a write may wait for its commit before the call answers 503.
const COMMIT_WAIT: Duration = Duration::from_secs(10);

/// The admin bearer token, kept only as its SHA-256 digest.
pub struct AdminToken {
    digest: [u8; 32],
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

impl AdminToken {
    /// The token `token`.
    pub fn new(token: &[u8]) -> AdminToken {
        AdminToken {
            digest: Sha256::digest(token).into(),
        }
    }

    /// Whether `presented` is the token, in time independent of both.
    pub fn verify(&self, presented: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        digest.ct_eq(&self.digest).into()
    }
}

/// What the admin handlers work with.
#[derive(Clone)]
pub(crate) struct AdminState {
    pub shared: Arc<ServerState>,
    /// `None`: no token configured, every call is refused.
    pub token: Option<Arc<AdminToken>>,
}

/// The admin routes, to nest under `/admin`.
pub(crate) fn routes(state: AdminState) -> axum::Router {
    let body_limit = state.shared.config.admin_body_limit();
    axum::Router::new()
        .route("/groups", post(create_group))
        .route("/groups/{id}", get(get_group).delete(dissolve_group))
        .route("/groups/{id}/members", get(list_members).post(add_members))
        .route("/groups/{id}/members/remove", post(remove_members))
        .route("/groups/{id}/members/{user}", delete(remove_member))
        .route("/groups/{id}/messages", post(message_group))
        .route("/users/{id}/messages", post(message_user))
        .route("/users/{id}/kick", post(kick_user))
        .route("/users/{id}/revoke", post(revoke_tokens))
        .route("/users/{id}/presence", get(presence))
        .route("/stats", get(stats))
        .route("/backup", post(backup))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Inside the token check: a call is forwarded only once it is
        // authorised here.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::admin_forward::forward_to_owner,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(body_limit))
        // Outermost: every reader of the body (the extractors, and the
        // cluster forwarding that buffers a group create) sees at most
        // `body_limit` bytes; a larger declared length is refused unread.
        .layer(axum::middleware::from_fn_with_state(body_limit, cap_body))
        .with_state(state)
}

/// Refuses a body declared larger than `limit` with 413 before reading it,
/// and caps what any later reader can take from the rest at `limit`.
async fn cap_body(State(limit): State<usize>, request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        m::admin_request(413);
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("request body larger than {limit} bytes"),
        )
        .into_response();
    }
    let request =
        request.map(|body| axum::body::Body::new(http_body_util::Limited::new(body, limit)));
    next.run(request).await
}

// ------------------------------------------------------------------ errors

/// An admin API error: a status and `{"error": message, "code": code}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: String,
    message: String,
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
    ApiError {
        status,
        code: code.to_owned(),
        message: message.into(),
    }
}

pub(crate) fn bad_request(message: impl Into<String>) -> ApiError {
    error(StatusCode::BAD_REQUEST, "invalid_request", message)
}

impl From<bodies::BodyError> for ApiError {
    fn from(e: bodies::BodyError) -> Self {
        match e {
            bodies::BodyError::BadJson(_) => {
                error(StatusCode::BAD_REQUEST, "bad_json", e.to_string())
            }
            bodies::BodyError::Invalid(message) => bad_request(message),
            bodies::BodyError::TooLarge(message) => {
                error(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
            }
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    code: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: &self.message,
            code: &self.code,
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"ferry-admin\""),
            );
        }
        response
    }
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> ApiError {
        let status = match r.code {
            ErrorCode::NoSuchGroup | ErrorCode::NotAMember => StatusCode::NOT_FOUND,
            ErrorCode::GroupExists | ErrorCode::GroupFull => StatusCode::CONFLICT,
            ErrorCode::PermissionDenied => StatusCode::FORBIDDEN,
            ErrorCode::InvalidRequest => StatusCode::BAD_REQUEST,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        error(status, &m::code_label(r.code), r.message)
    }
}

impl From<PathRejection> for ApiError {
    fn from(e: PathRejection) -> ApiError {
        bad_request(e.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> ApiError {
        bad_request(e.body_text())
    }
}

impl From<BytesRejection> for ApiError {
    fn from(e: BytesRejection) -> ApiError {
        let status = e.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "too_large"
        } else {
            "bad_request"
        };
        error(status, code, e.body_text())
    }
}

type ApiResult = Result<Response, ApiError>;

// --------------------------------------------------------- authentication

/// Refuses any request without the admin token; counts every answer.
async fn require_token(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| bearer(v.as_bytes()));
    let allowed = match (&state.token, presented) {
        (Some(token), Some(presented)) => token.verify(presented),
        _ => false,
    };
    let response = if allowed {
        next.run(request).await
    } else {
        error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or invalid admin token",
        )
        .into_response()
    };
    m::admin_request(response.status().as_u16());
    response
}

/// The credentials of a `Bearer` authorization (the scheme is
/// case-insensitive, RFC 7235).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = value.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| token.trim_ascii())
}

async fn not_found() -> ApiError {
    error(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint")
}

async fn method_not_allowed() -> ApiError {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this endpoint",
    )
}

// ----------------------------------------------------------------- helpers

/// An id of 1..=64 bytes ([`limits::check_id`]), or 400.
fn check_id(what: &'static str, id: &str) -> Result<(), ApiError> {
    limits::check_id(what, id).map_err(|e| bad_request(e.to_string()))
}

/// A string of `min..=max` bytes ([`limits::check_len`]), or 400.
fn check_len(what: &'static str, value: &str, min: usize, max: usize) -> Result<(), ApiError> {
    limits::check_len(what, value, min, max).map_err(|e| bad_request(e.to_string()))
}

/// Submits `op` to the committer and waits for its outcome; a refusal or
/// failure becomes the matching error.
async fn commit(state: &AdminState, op: Op) -> Result<Outcome, ApiError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let unavailable = || {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "storage is not accepting writes, retry later",
        )
    };
    state
        .shared
        .router
        .submit_admin(op, tx)
        .await
        .map_err(|_| unavailable())?;
    let outcome = match tokio::time::timeout(COMMIT_WAIT, rx).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(_)) | Err(_) => return Err(unavailable()),
    };
    match outcome {
        Outcome::Refused(refusal) => Err(refusal.into()),
        Outcome::Failed(message) => {
            tracing::warn!(%message, "admin write failed");
            Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "storage write failed, retry",
            ))
        }
        outcome => Ok(outcome),
    }
}

/// The group `id`, read through the router (on a blocking thread), or 404.
async fn group_of(state: &AdminState, id: &str) -> Result<Arc<Group>, ApiError> {
    check_id("group id", id)?;
    state
        .shared
        .router
        .lookup_group(id)
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .ok_or_else(|| {
            error(
                StatusCode::NOT_FOUND,
                "no_such_group",
                format!("no group {id}"),
            )
        })
}

fn role_name(role: GroupRole) -> &'static str {
    match role {
        GroupRole::Owner => "owner",
        GroupRole::Admin => "admin",
        GroupRole::Member | GroupRole::Unspecified => "member",
    }
}

#[derive(Serialize)]
struct GroupInfo {
    group_id: String,
    name: String,
    owner: String,
    created_ms: u64,
    member_count: usize,
}

fn group_info(group: &Group) -> GroupInfo {
    GroupInfo {
        group_id: group.id.to_string(),
        name: group.meta.name.clone(),
        owner: group.meta.owner.clone(),
        created_ms: group.meta.created_ms,
        member_count: group.members.len(),
    }
}

/// The group after a change, and the users named in its event.
fn changed(outcome: Outcome) -> (Option<Arc<Group>>, Vec<String>) {
    match outcome {
        Outcome::GroupChanged { group, fanouts, .. } => {
            let users = fanouts
                .into_iter()
                .next()
                .and_then(|f| f.entry.group_event)
                .map(|e| e.users)
                .unwrap_or_default();
            (group, users)
        }
        _ => (None, Vec::new()),
    }
}

fn ok(value: impl Serialize) -> ApiResult {
    Ok((StatusCode::OK, axum::Json(value)).into_response())
}

// ------------------------------------------------------------------ groups

async fn create_group(
    State(state): State<AdminState>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let req = bodies::create_group(&body?)?;
    let op = Op::Group {
        actor: req.owner.as_str().into(),
        change: GroupChange::Create {
            group_id: req.group_id.unwrap_or_default(),
            name: req.name,
            members: req.members,
        },
    };
    let (group, _) = changed(commit(&state, op).await?);
    let group = group.ok_or_else(|| {
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "no group after create",
        )
    })?;
    info!(group = %group.id, owner = %group.meta.owner, members = group.members.len(), "admin: group created");
    Ok((StatusCode::CREATED, axum::Json(group_info(&group))).into_response())
}

async fn get_group(
    State(state): State<AdminState>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let Path(id) = id?;
    let group = group_of(&state, &id).await?;
    Ok(axum::Json(group_info(&group)).into_response())
}

async fn dissolve_group(
    State(state): State<AdminState>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let Path(id) = id?;
    let group = group_of(&state, &id).await?;
    let op = Op::Group {
        actor: group.meta.owner.as_str().into(),
        change: GroupChange::Dissolve {
            group_id: id.clone(),
        },
    };
    commit(&state, op).await?;
    info!(group = %id, "admin: group dissolved");
    #[derive(Serialize)]
    struct Dissolved {
        group_id: String,
        dissolved: bool,
    }
    ok(Dissolved {
        group_id: id,
        dissolved: true,
    })
}

#[derive(Deserialize)]
struct MembersQuery {
    /// Members with user ids after this one (exclusive).
    after: Option<String>,
    limit: Option<String>,
}

async fn list_members(
    State(state): State<AdminState>,
    id: Result<Path<String>, PathRejection>,
    page: Result<Query<MembersQuery>, QueryRejection>,
) -> ApiResult {
    let Path(id) = id?;
    let Query(page) = page?;
    let limit = match page.limit.as_deref() {
        None | Some("") => MEMBERS_PAGE,
        Some(text) => match text.parse::<usize>() {
            Ok(n) if (1..=MEMBERS_PAGE_MAX).contains(&n) => n,
            _ => {
                return Err(bad_request(format!(
                    "limit must be an integer in 1..={MEMBERS_PAGE_MAX}"
                )));
            }
        },
    };
    let after = page.after.unwrap_or_default();
    check_len("after", &after, 0, limits::MAX_ID_BYTES)?;
    let group = group_of(&state, &id).await?;
    // The router's pager (the one `ListMembers` uses): by user id, so a
    // cursor stays valid while members join and leave between pages.
    let page = ferry_router::member_page(&group, &after, limit);
    let next_after = if page.has_more {
        page.members.last().map(|(m, _)| m.to_string())
    } else {
        None
    };
    #[derive(Serialize)]
    struct Member<'a> {
        user_id: &'a str,
        role: &'static str,
    }
    #[derive(Serialize)]
    struct Page<'a> {
        group_id: String,
        member_count: usize,
        members: Vec<Member<'a>>,
        next_after: Option<String>,
    }
    let members = page
        .members
        .iter()
        .map(|(m, role)| Member {
            user_id: m,
            role: role_name(*role),
        })
        .collect();
    ok(Page {
        group_id: id,
        member_count: group.members.len(),
        members,
        next_after,
    })
}

/// The answer to adding or removing members.
#[derive(Serialize)]
struct MembersChanged {
    group_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    added: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    removed: Option<Vec<String>>,
    member_count: usize,
}

async fn add_members(
    State(state): State<AdminState>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let Path(id) = id?;
    let members = bodies::members(&body?)?;
    let group = group_of(&state, &id).await?;
    let op = Op::Group {
        actor: group.meta.owner.as_str().into(),
        change: GroupChange::Add {
            group_id: id.clone(),
            members,
        },
    };
    let (group, added) = changed(commit(&state, op).await?);
    info!(group = %id, added = added.len(), "admin: members added");
    ok(MembersChanged {
        group_id: id,
        added: Some(added),
        removed: None,
        member_count: group.map_or(0, |g| g.members.len()),
    })
}

async fn remove(state: &AdminState, id: String, members: Vec<String>) -> ApiResult {
    let group = group_of(state, &id).await?;
    let op = Op::Group {
        actor: group.meta.owner.as_str().into(),
        change: GroupChange::Remove {
            group_id: id.clone(),
            members,
        },
    };
    let (group, removed) = changed(commit(state, op).await?);
    info!(group = %id, removed = removed.len(), "admin: members removed");
    ok(MembersChanged {
        group_id: id,
        added: None,
        removed: Some(removed),
        member_count: group.map_or(0, |g| g.members.len()),
    })
}

async fn remove_members(
    State(state): State<AdminState>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let Path(id) = id?;
    let members = bodies::members(&body?)?;
    remove(&state, id, members).await
}

async fn remove_member(
    State(state): State<AdminState>,
    ids: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult {
    let Path((id, user)) = ids?;
    check_id("user id", &user)?;
    if !group_of(&state, &id).await?.is_member(&user) {
        return Err(error(
            StatusCode::NOT_FOUND,
            "not_a_member",
            format!("{user} is not a member of {id}"),
        ));
    }
    remove(&state, id, vec![user]).await
}

// ---------------------------------------------------------------- messages

async fn message_user(
    State(state): State<AdminState>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let Path(user) = id?;
    check_id("user id", &user)?;
    system_message(&state, Target::Direct(user.as_str().into()), &body?).await
}

async fn message_group(
    State(state): State<AdminState>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let Path(group) = id?;
    check_id("group id", &group)?;
    system_message(&state, Target::Group(group.as_str().into()), &body?).await
}

async fn system_message(state: &AdminState, to: Target, body: &[u8]) -> ApiResult {
    let req = bodies::system_message(body, state.shared.config.max_frame_bytes as usize)?;
    let op = Op::Send {
        from: "".into(),
        client_msg_id: 0,
        to: to.clone(),
        content_type: req.content_type,
        body: req.body,
        system: true,
    };
    match commit(state, op).await? {
        Outcome::Sent {
            ack, recipients, ..
        } => {
            debug!(
                ?to,
                msg_id = ack.msg_id,
                recipients,
                "admin: system message"
            );
            #[derive(Serialize)]
            struct Sent {
                /// A string: message ids exceed 2^53, which JSON numbers
                /// lose in JavaScript.
                msg_id: String,
                server_time_ms: u64,
                recipients: usize,
            }
            ok(Sent {
                msg_id: ack.msg_id.to_string(),
                server_time_ms: ack.server_time_ms,
                recipients,
            })
        }
        _ => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "unexpected outcome",
        )),
    }
}

// ------------------------------------------------------------------- users

async fn kick_user(
    State(state): State<AdminState>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let Path(user) = id?;
    check_id("user id", &user)?;
    let req = bodies::kick(&body?)?;
    let message = req
        .message
        .unwrap_or_else(|| "disconnected by an operator".into());
    let mut kicked: Vec<String> = state
        .shared
        .router
        .sessions()
        .connections(&user)
        .into_iter()
        .filter(|c| {
            req.device_id
                .as_deref()
                .is_none_or(|d| c.device().as_ref() == d)
        })
        .filter(|c| c.kick(ErrorCode::Kicked, &message))
        .map(|c| c.device().to_string())
        .collect();
    if kicked.is_empty() {
        let what = match &req.device_id {
            Some(device) => format!("{user} has no online connection on device {device}"),
            None => format!("{user} has no online connection"),
        };
        return Err(error(StatusCode::NOT_FOUND, "not_online", what));
    }
    kicked.sort();
    info!(%user, devices = ?kicked, "admin: kicked");
    #[derive(Serialize)]
    struct Kicked {
        user_id: String,
        kicked: Vec<String>,
    }
    ok(Kicked {
        user_id: user,
        kicked,
    })
}

/// How far ahead of now `issued_before` may be: a revocation is about
/// tokens already issued, and a value in milliseconds (a common mistake)
/// would lock the user out for ever.
const MAX_REVOKE_AHEAD_SECS: u64 = 86_400;

async fn revoke_tokens(
    State(state): State<AdminState>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let Path(user) = id?;
    check_id("user id", &user)?;
    let req = bodies::revoke(&body?)?;
    let now = crate::auth::unix_now();
    let issued_before = req.issued_before.unwrap_or(now + 1);
    if issued_before > now + MAX_REVOKE_AHEAD_SECS {
        return Err(bad_request(format!(
            "issued_before is Unix seconds, at most {MAX_REVOKE_AHEAD_SECS} s ahead of now ({now})"
        )));
    }
    // Durable first (like every write), then in force and kicked: an
    // answered revocation survives a crash.
    commit(
        &state,
        Op::Revoke {
            user: user.as_str().into(),
            device: req.device_id.as_deref().map(Into::into),
            issued_before,
        },
    )
    .await?;
    let (in_force, kicked) =
        state
            .shared
            .router
            .apply_revocation(&user, req.device_id.as_deref(), issued_before);
    info!(%user, device = ?req.device_id, issued_before = in_force, ?kicked, "admin: tokens revoked");
    #[derive(Serialize)]
    struct Revoked {
        user_id: String,
        device_id: Option<String>,
        issued_before: u64,
        kicked: Vec<String>,
    }
    ok(Revoked {
        user_id: user,
        device_id: req.device_id,
        issued_before: in_force,
        kicked,
    })
}

async fn presence(
    State(state): State<AdminState>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let Path(user) = id?;
    check_id("user id", &user)?;
    let shared = &state.shared;
    let mut conns = shared.router.sessions().connections(&user);
    conns.sort_by(|a, b| a.device().cmp(b.device()));
    #[derive(Serialize)]
    struct Device<'a> {
        device_id: &'a str,
        connection_id: u64,
        /// Whole seconds of the server's coarse clock.
        last_active_ms: u64,
    }
    #[derive(Serialize)]
    struct Presence<'a> {
        user_id: String,
        online: bool,
        devices: Vec<Device<'a>>,
        last_seen_ms: Option<u64>,
    }
    let devices = conns
        .iter()
        .map(|c| Device {
            device_id: c.device(),
            connection_id: c.id(),
            last_active_ms: shared.clock.unix_ms_at(c.last_seen()),
        })
        .collect();
    let last_seen_ms = if conns.is_empty() {
        shared.last_seen.get(&user)
    } else {
        conns
            .iter()
            .map(|c| shared.clock.unix_ms_at(c.last_seen()))
            .max()
    };
    ok(Presence {
        user_id: user,
        online: !conns.is_empty(),
        devices,
        last_seen_ms,
    })
}

// ------------------------------------------------------------------ backup

/// Backs up this node's database into the configured `backup_dir` while it
/// serves (docs/OPERATIONS.md, "Backups and restore"), with the data dir's
/// secret files beside it.
async fn backup(State(state): State<AdminState>) -> ApiResult {
    let shared = &state.shared;
    let Some(dir) = shared.config.backup_dir.clone() else {
        return Err(error(
            StatusCode::CONFLICT,
            "no_backup_dir",
            "no backup_dir is configured on this node (--backup-dir, FERRY_BACKUP_DIR)",
        ));
    };
    let started = std::time::Instant::now();
    let keep = shared.config.backup_keep as usize;
    let made = shared.router.backup(dir.clone(), keep).await;
    let info = match made {
        Ok(info) => info,
        Err(e) => {
            metrics::counter!("ferry_backups_total", "result" => "failed").increment(1);
            tracing::error!(error = %e, dir = %dir.display(), "admin: backup failed");
            return Err(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "backup_failed",
                format!("backup into {} failed: {e}", dir.display()),
            ));
        }
    };
    let data_dir = shared.config.data_dir.clone();
    let secrets_dir = dir.clone();
    let copied = tokio::task::spawn_blocking(move || {
        crate::backup_files::copy_secret_files(&data_dir, &secrets_dir, true)
    })
    .await
    .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
    .map_err(|e| {
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "backup_failed",
            format!("copying the secret files into {}: {e}", dir.display()),
        )
    })?;
    let took = started.elapsed();
    metrics::counter!("ferry_backups_total", "result" => "ok").increment(1);
    metrics::gauge!("ferry_backup_last_success_timestamp_seconds")
        .set(crate::auth::unix_now() as f64);
    info!(
        backup_id = info.id,
        size = info.size,
        files = info.files,
        took_ms = took.as_millis() as u64,
        dir = %dir.display(),
        "admin: backup made"
    );
    #[derive(Serialize)]
    struct Made {
        backup_id: u32,
        timestamp: i64,
        size_bytes: u64,
        files: u32,
        backup_dir: String,
        secret_files: Vec<&'static str>,
        took_ms: u64,
    }
    ok(Made {
        backup_id: info.id,
        timestamp: info.timestamp,
        size_bytes: info.size,
        files: info.files,
        backup_dir: dir.display().to_string(),
        secret_files: copied,
        took_ms: took.as_millis() as u64,
    })
}

async fn stats(State(state): State<AdminState>) -> ApiResult {
    let shared = &state.shared;
    #[derive(Serialize)]
    struct Stats<'a> {
        node_id: &'a str,
        version: &'static str,
        uptime_secs: u64,
        ready: bool,
        connections_open: usize,
        max_connections: u32,
        sessions_online: u64,
        last_seen_users: usize,
        revoked_users: usize,
    }
    ok(Stats {
        node_id: shared.router.node_id(),
        version: env!("CARGO_PKG_VERSION"),
        uptime_secs: shared.clock.uptime().as_secs(),
        ready: shared.router.is_ready() && !shared.shutdown.is_cancelled(),
        connections_open: shared.connections_open(),
        max_connections: shared.config.max_connections,
        sessions_online: shared.router.sessions().online(),
        last_seen_users: shared.last_seen.len(),
        revoked_users: shared.router.revoked_users(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer"), None);
    }

    #[test]
    fn token_verification_is_exact() {
        let token = AdminToken::new(b"0123456789abcdef");
        assert!(token.verify(b"0123456789abcdef"));
        assert!(!token.verify(b"0123456789abcdeF"));
        assert!(!token.verify(b"0123456789abcdef0"));
        assert!(!token.verify(b""));
    }

    #[test]
    fn refusals_map_to_statuses() {
        let e: ApiError = ferry_storage::Refusal {
            code: ErrorCode::NoSuchGroup,
            message: "no group g".into(),
        }
        .into();
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert_eq!(e.code, "no_such_group");
        let e: ApiError = ferry_storage::Refusal {
            code: ErrorCode::GroupExists,
            message: "exists".into(),
        }
        .into();
        assert_eq!(e.status, StatusCode::CONFLICT);
    }
}
