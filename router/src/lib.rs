//! ferry routing: who receives a message, where they are, and getting it
//! to them in order.
//!
//! - [`session`]: the online registry and the per-connection outbox.
//! - [`Router`]: login/logout and every client request: validation, then
//!   writes through the storage's group committer, reads straight from
//!   storage on blocking threads (never on a runtime thread: group lookups
//!   go through [`Router::lookup_group`]). Every client-supplied string is
//!   checked here against [`ferry_protocol::limits`] before anything else
//!   sees it ([`ferry_protocol::requests`], `target_of`).
//! - `delivery`: what happens after a batch is durable: acks, replies, and
//!   the fan-out of inbox entries to online connections.
//! - [`revocation`]: token revocations in memory, checked at every login.
//!
//! # Ordering
//!
//! Each connection tracks the highest inbox seq it was handed. A live push
//! goes out only if it is exactly the next seq; an older one is dropped as a
//! duplicate; a newer one means something was missed and starts a sync from
//! storage. While a sync runs, live pushes are skipped (and noted); the sync
//! reads storage again until nothing was skipped. Both paths decide under
//! the connection's outbox lock, so a device sees its inbox in seq order,
//! with no gap and no duplicate.
#![warn(missing_docs)]

pub mod bus;
mod delivery;
pub mod revocation;
pub mod session;

use std::sync::Arc;

use ferry_protocol::proto::{self, frame::Body, group_request::Op as GroupOp};
use ferry_protocol::requests;
use ferry_protocol::{ErrorCode, Frame};
use ferry_storage::{
    CommitOptions, Committer, Group, GroupChange, Op, Storage, StorageError, Target,
};
use prost::Message;
use session::{Conn, RequestSlot, Sessions};

pub use bus::{Bus, BusConfig, OutboundConfig};
pub use delivery::{LinkTag, Reply};

pub use ferry_cluster::{NodeId, Placement};

/// Milliseconds since the Unix epoch (storage's clock, the one every crate uses).
pub use ferry_storage::now_ms;

/// Router errors.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The router is shutting down.
    #[error("router is shutting down")]
    ShuttingDown,
    /// The cluster bus could not start.
    #[error("cluster bus: {0}")]
    Bus(String),
    /// The connection's token was revoked (answered `TOKEN_REVOKED`).
    #[error("token revoked")]
    TokenRevoked,
}

/// Router settings.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// This node's id (AuthOk.node_id): `"ferry-1"` for a single node, the
    /// decimal cluster id (e.g. `"2"`) in cluster mode.
    pub node_id: String,
    /// Which node owns each user and group ([`Placement::single`] outside a
    /// cluster: everything local).
    pub placement: Arc<Placement>,
    /// Largest frame; bounds message size and page sizes.
    pub max_frame_bytes: usize,
    /// How long a sender may recall a message.
    pub recall_window_ms: u64,
    /// Group commit settings.
    pub commit: CommitOptions,
    /// The cluster bus settings (cluster mode only; `None`: a single node).
    pub bus: Option<BusConfig>,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            node_id: "ferry-1".into(),
            placement: Arc::new(Placement::single()),
            max_frame_bytes: ferry_protocol::DEFAULT_MAX_FRAME_BYTES,
            recall_window_ms: 120_000,
            commit: CommitOptions::default(),
            bus: None,
        }
    }
}

/// The message of the `Error` or `Kick` a revoked token gets.
pub const TOKEN_REVOKED_MESSAGE: &str = "this token was revoked; get a new one";

/// Entries per login-sync page and default Sync page.
pub const SYNC_PAGE: usize = 200;
/// Largest Sync page a client may ask for.
pub const SYNC_PAGE_MAX: usize = 1000;
/// Default and largest History page.
pub const HISTORY_PAGE: usize = 50;
/// Largest History page.
pub const HISTORY_PAGE_MAX: usize = 200;
/// Default `list_members` page (`ListMembers.limit` = 0). About 20 KiB with
/// 16-byte user ids; with 64-byte ids the frame cut (see `members_page`)
/// shortens the page instead.
pub const MEMBERS_PAGE: usize = 1000;
/// Largest `list_members` page a client may ask for: a 10,000-member group
/// (the default member limit) is listed in 10 requests.
pub const MEMBERS_PAGE_MAX: usize = 1000;
/// Room in a frame for the `Frame` wrapper around a `GroupReply`.
const GROUP_REPLY_HEADROOM: usize = 64;

/// Routes the requests of authenticated connections.
pub struct Router {
    config: RouterConfig,
    shared: Arc<delivery::Hub>,
    committer: Committer<Reply>,
    /// The cluster bus, in cluster mode.
    bus: Option<Arc<Bus>>,
    /// Token revocations, loaded at start, checked at every login.
    revocations: revocation::Revocations,
}

fn invalid(message: impl Into<String>) -> (ErrorCode, String) {
    (ErrorCode::InvalidRequest, message.into())
}

/// The target of a request's `conversation`, checked by
/// [`requests::conversation`].
fn target_of(conv: Option<&proto::Conversation>) -> Result<Target, (ErrorCode, String)> {
    match requests::conversation(conv).map_err(|e| invalid(e.0))? {
        (proto::ConversationKind::Group, id) => Ok(Target::Group(id.into())),
        (_, id) => Ok(Target::Direct(id.into())),
    }
}

/// One page of a group's members, in bytewise ascending user id order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberPage {
    /// The members and their roles.
    pub members: Vec<(Arc<str>, proto::GroupRole)>,
    /// Members after the last one of the page remain.
    pub has_more: bool,
}

/// The members of `group` whose user id sorts (bytewise) after `after`,
/// ascending, at most `limit` of them (at least 1). The one member pager,
/// used by `ListMembers` (`members_page` cuts it further to a frame) and
/// by the admin API.
///
/// Members are kept in join order (fan-out iterates them), so the page is
/// picked in O(members) and only the page is sorted: a 10,000-member group
/// costs one pass per page. Paging by user id rather than by position keeps
/// a cursor valid while members join and leave between pages.
pub fn member_page(group: &Group, after: &str, limit: usize) -> MemberPage {
    let limit = limit.max(1);
    let mut rest: Vec<&Arc<str>> = group
        .members
        .iter()
        .filter(|m| m.as_ref() > after)
        .collect();
    let has_more = rest.len() > limit;
    if has_more {
        rest.select_nth_unstable(limit);
        rest.truncate(limit);
    }
    rest.sort_unstable();
    MemberPage {
        members: rest
            .into_iter()
            .map(|m| (m.clone(), group.role(m).unwrap_or(proto::GroupRole::Member)))
            .collect(),
        has_more,
    }
}

/// One `list_members` page of `group`: [`member_page`], cut further to fit
/// in one frame of `max_frame_bytes` with the `Frame` wrapper. `has_more`
/// says members remain after the page.
///
/// A page holds at least one member whenever one remains: a member is at
/// most 70 bytes encoded (user ids are 1..=64 bytes, checked when members
/// are added and at login), which always fits beside the reply's other
/// fields in the smallest allowed frame, except next to a group name long
/// enough to fill the frame; the name is then left out.
fn members_page(
    request_id: u64,
    group: &Group,
    after: &str,
    limit: usize,
    max_frame_bytes: usize,
) -> proto::GroupReply {
    let page = member_page(group, after, limit);
    let members: Vec<proto::GroupMember> = page
        .members
        .iter()
        .map(|(m, role)| proto::GroupMember {
            user_id: m.to_string(),
            role: *role as i32,
        })
        .collect();
    let mut reply = proto::GroupReply {
        request_id,
        group_id: group.id.to_string(),
        members: Vec::new(),
        name: group.meta.name.clone(),
        // Counted as set, so that the size below is never short.
        has_more: true,
    };
    let budget = max_frame_bytes.saturating_sub(GROUP_REPLY_HEADROOM);
    let member_len = |m: &proto::GroupMember| {
        let len = m.encoded_len();
        1 + prost::encoding::encoded_len_varint(len as u64) + len
    };
    if let Some(first) = members.first()
        && reply.encoded_len() + member_len(first) > budget
    {
        reply.name.clear();
    }
    let mut used = reply.encoded_len();
    let mut fit = 0;
    for m in members.iter() {
        let len = member_len(m);
        if fit > 0 && used + len > budget {
            break;
        }
        used += len;
        fit += 1;
    }
    reply.has_more = page.has_more || members.len() > fit;
    reply.members = members;
    reply.members.truncate(fit);
    reply
}

impl Router {
    /// A single-node router over `storage`. Must be called inside a tokio
    /// runtime (deliveries spawn sync tasks on it).
    pub fn new(config: RouterConfig, storage: Arc<Storage>) -> Result<Router, RouterError> {
        let shared = Arc::new(delivery::Hub::new(
            storage.clone(),
            config.max_frame_bytes,
            tokio::runtime::Handle::current(),
        ));
        let sink_shared = shared.clone();
        // Whatever the committer stores must fit in a frame of this size
        // (a lower explicit setting is kept).
        let mut commit = config.commit.clone();
        commit.max_entry_bytes = commit
            .max_entry_bytes
            .min(ferry_storage::max_entry_bytes_for(config.max_frame_bytes));
        let bus = match &config.bus {
            Some(bus_config) => {
                let bus = Arc::new(Bus::start(&config.placement, bus_config.clone(), &storage)?);
                commit.homes = Some(bus.homes().clone());
                commit.node_id = bus.this_node();
                let _ = shared.bus.set(bus.clone());
                Some(bus)
            }
            None => None,
        };
        // One record per revoked user or device (written by operators).
        let revocations = revocation::Revocations::new(storage.revocations()?);
        let committer = Committer::start(storage, commit, move |results, links| {
            sink_shared.committed(results, links)
        })?;
        Ok(Router {
            config,
            shared,
            committer,
            bus,
            revocations,
        })
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.config.node_id
    }

    /// Which node owns each user and group.
    pub fn placement(&self) -> &Arc<Placement> {
        &self.config.placement
    }

    /// The online-session registry.
    pub fn sessions(&self) -> &Sessions {
        &self.shared.sessions
    }

    /// The storage, for tests and diagnostics. Request paths and the admin
    /// API read through the router's async methods ([`Router::lookup_group`])
    /// so that no RocksDB read runs on a runtime thread.
    pub fn storage(&self) -> &Arc<Storage> {
        &self.shared.storage
    }

    /// The group `id`, or `None` if it does not exist. The one place the
    /// router and the admin API look a group up: the read (a DB read and a
    /// scan of up to the member limit's keys on a cache miss) runs on a
    /// blocking thread, never on a runtime thread. `id` must have passed
    /// [`ferry_protocol::limits::check_id`].
    ///
    /// A cached group (or an id cached as absent) is answered at once, on
    /// this thread; only a cache miss pays the blocking-thread hop.
    pub async fn lookup_group(&self, id: &str) -> Result<Option<Arc<Group>>, RouterError> {
        if let Some(cached) = self.shared.storage.group_if_cached(id) {
            return Ok(cached);
        }
        let storage = self.shared.storage.clone();
        let id = id.to_owned();
        tokio::task::spawn_blocking(move || storage.group(&id))
            .await
            .map_err(|_| RouterError::ShuttingDown)?
            .map_err(RouterError::from)
    }

    /// [`Router::lookup_group`], with a missing group as `NO_SUCH_GROUP`
    /// and a failed read as `INTERNAL`, for request paths.
    async fn existing_group(&self, id: &str) -> Result<Arc<Group>, (ErrorCode, String)> {
        match self.lookup_group(id).await {
            Ok(Some(group)) => Ok(group),
            Ok(None) => Err((ErrorCode::NoSuchGroup, format!("no group {id}"))),
            Err(e) => Err((ErrorCode::Internal, e.to_string())),
        }
    }

    /// Whether the last storage batch write failed (and none has succeeded
    /// since): every write is answered `UNAVAILABLE` meanwhile.
    pub fn writes_failing(&self) -> bool {
        self.shared.storage.writes_failing()
    }

    /// Whether the router can serve. Not ready while shutting down, or while storage writes fail (the
    /// last batch write failed and none has succeeded since): a load
    /// balancer should then send new clients elsewhere. In cluster mode,
    /// also not while the node list is not confirmed by the peers or no
    /// nsqd is reachable (see [`Router::not_ready_reason`]).
    pub fn is_ready(&self) -> bool {
        self.not_ready_reason().is_none()
    }

    /// Why the router is not ready, if it is not.
    pub fn not_ready_reason(&self) -> Option<String> {
        if self
            .shared
            .stopping
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Some("shutting down".into());
        }
        if self.shared.storage.writes_failing() {
            return Some("storage writes failing".into());
        }
        let bus = self.bus.as_ref()?;
        if !bus.nsqd_reachable() {
            return Some("no nsqd reachable".into());
        }
        if !bus.serving() {
            let disagreeing = bus.disagreeing_peers();
            return Some(if disagreeing.is_empty() {
                "the node list is not confirmed by a majority of the nodes yet".into()
            } else {
                format!("nodes {disagreeing:?} have a different node list")
            });
        }
        None
    }

    /// Whether clients may be served: always on a single node; in cluster
    /// mode once a majority of the nodes agree on the node list.
    pub fn serving(&self) -> bool {
        self.bus.as_ref().is_none_or(|bus| bus.serving())
    }

    /// Starts the cluster bus's consumer and timers (cluster mode; nothing
    /// on a single node). Call once, right after wrapping the router in an `Arc`.
    pub fn start_cluster(self: &Arc<Self>) -> Result<(), RouterError> {
        if let Some(bus) = &self.bus {
            bus.run(Arc::downgrade(self), self.shared.storage.clone())
                .map_err(|e| RouterError::Bus(e.to_string()))?;
        }
        Ok(())
    }

    /// Queues `auth_ok` (with the inbox's max seq filled in), registers
    /// `conn` (kicking the connection it replaces) and starts its sync from
    /// `last_seq` unless `skip_sync`.
    ///
    /// Refuses with [`RouterError::TokenRevoked`], before anything is
    /// queued, a connection whose token is revoked
    /// ([`Conn::token_issued_at`]); one revoked while it logs in is kicked
    /// with `TOKEN_REVOKED` right after it registers.
    pub async fn login(
        &self,
        conn: &Arc<Conn>,
        mut auth_ok: proto::AuthOk,
        last_seq: u64,
        skip_sync: bool,
    ) -> Result<(), RouterError> {
        if self.token_revoked(conn) {
            return Err(RouterError::TokenRevoked);
        }
        let storage = self.shared.storage.clone();
        let user = conn.user().clone();
        let max_seq = tokio::task::spawn_blocking(move || storage.max_seq(&user))
            .await
            .map_err(|_| RouterError::ShuttingDown)??;
        auth_ok.max_seq = max_seq;
        let _ = conn.push(Frame::from(auth_ok));
        if skip_sync {
            conn.start_at(max_seq, false);
        } else {
            // A device claiming more than the inbox holds (a wiped data dir)
            // resumes from what exists, so it never misses new entries.
            conn.start_at(last_seq.min(max_seq), true);
        }
        if let Some(old) = self.shared.sessions.register(conn.clone()) {
            old.kick(
                ErrorCode::LoggedInElsewhere,
                "this device logged in on another connection",
            );
        }
        // A revocation recorded since the check above kicked the registered
        // connections, which may not have included this one yet.
        if self.token_revoked(conn) {
            conn.kick(ErrorCode::TokenRevoked, TOKEN_REVOKED_MESSAGE);
        }
        if !skip_sync {
            delivery::spawn_sync(self.shared.clone(), conn.clone());
        }
        Ok(())
    }

    fn token_revoked(&self, conn: &Conn) -> bool {
        self.revocations
            .refuses(conn.user(), conn.device(), conn.token_issued_at())
    }

    /// Applies a committed revocation (`Op::Revoke`, durable before this
    /// is called): later logins with `user`'s tokens issued before
    /// `issued_before` (on `device`, or any device) are refused, and the
    /// online connections holding such tokens are kicked now with
    /// `TOKEN_REVOKED`. Returns the time now in force for those tokens (a
    /// later revocation recorded before wins) and the kicked devices, sorted.
    pub fn apply_revocation(
        &self,
        user: &str,
        device: Option<&str>,
        issued_before: u64,
    ) -> (u64, Vec<String>) {
        let in_force = self.revocations.record(user, device, issued_before);
        let mut kicked: Vec<String> = self
            .shared
            .sessions
            .connections(user)
            .into_iter()
            .filter(|c| device.is_none_or(|d| c.device().as_ref() == d))
            .filter(|c| self.token_revoked(c))
            .filter(|c| c.kick(ErrorCode::TokenRevoked, TOKEN_REVOKED_MESSAGE))
            .map(|c| c.device().to_string())
            .collect();
        kicked.sort();
        (in_force, kicked)
    }

    /// Users with a token revocation (the `/admin/stats` figure).
    pub fn revoked_users(&self) -> usize {
        self.revocations.users()
    }

    /// Forgets `conn` if it is still the registered connection of its device.
    pub fn logout(&self, conn: &Conn) {
        self.shared.sessions.unregister(conn);
    }

    /// Handles one request frame of `conn`. `slot` (from
    /// [`Conn::begin_request`]) is released once the reply is queued.
    pub async fn handle(&self, conn: &Arc<Conn>, body: Body, slot: Option<RequestSlot>) {
        // Errors echo the id of the request they answer.
        let (request_id, client_msg_id) = match &body {
            Body::Send(s) => (0, s.client_msg_id),
            Body::Sync(s) => (s.request_id, 0),
            Body::Recall(r) => (r.request_id, 0),
            Body::GroupRequest(g) => (g.request_id, 0),
            Body::History(h) => (h.request_id, 0),
            _ => (0, 0),
        };
        if let Some(bus) = &self.bus
            && let Some(owner) = bus::owner_elsewhere(bus.homes().as_ref(), &body)
        {
            if conn.is_remote() {
                // Forwarded by a node whose placement differs from ours.
                let _ = conn.push(error_frame(
                    ErrorCode::Unavailable,
                    format!("node {} does not own this group", bus.this_node()),
                    request_id,
                    client_msg_id,
                ));
                return;
            }
            if matches!(body, Body::Typing(_)) && !conn.typing_allowed() {
                return;
            }
            let waiter =
                (!matches!(body, Body::Read(_) | Body::Typing(_))).then_some(bus::Waiter {
                    slot,
                    request_id,
                    client_msg_id,
                });
            bus.call(owner, conn, body, waiter);
            return;
        }
        let result = match body {
            Body::Send(send) => self.send(conn, send, slot).await,
            Body::DeliverAck(ack) => {
                let op = Op::Ack {
                    user: conn.user().clone(),
                    device: conn.device().clone(),
                    seq: ack.up_to_seq,
                };
                self.submit(op, Reply::None).await
            }
            Body::Sync(sync) => self.sync(conn, sync).await,
            Body::Recall(recall) => self.recall(conn, recall, slot).await,
            Body::Read(read) => match target_of(read.conversation.as_ref()) {
                Ok(to) => {
                    let op = Op::Read {
                        from: conn.user().clone(),
                        to,
                        up_to_msg_id: read.up_to_msg_id,
                    };
                    self.submit(op, Reply::None).await
                }
                Err(e) => Err(e),
            },
            Body::Typing(typing) => self.typing(conn, typing).await,
            Body::GroupRequest(request) => self.group(conn, request, slot).await,
            Body::History(history) => self.history(conn, history).await,
            other => Err((
                ErrorCode::UnexpectedFrame,
                format!("{} is not a request", other.kind_name()),
            )),
        };
        if let Err((code, message)) = result {
            let _ = conn.push(error_frame(code, message, request_id, client_msg_id));
        }
    }

    /// Submits an op to the committer (the bus's link batches).
    pub(crate) async fn submit_op(&self, op: Op, reply: Reply) -> Result<(), RouterError> {
        self.committer
            .submit(op, reply)
            .await
            .map_err(|_| RouterError::ShuttingDown)
    }

    async fn submit(&self, op: Op, reply: Reply) -> Result<(), (ErrorCode, String)> {
        self.committer
            .submit(op, reply)
            .await
            .map_err(|_| (ErrorCode::Unavailable, "storage is shutting down".into()))
    }

    async fn send(
        &self,
        conn: &Arc<Conn>,
        send: proto::Send,
        slot: Option<RequestSlot>,
    ) -> Result<(), (ErrorCode, String)> {
        let fail = |code, message: String| {
            let _ = conn.push(error_frame(code, message, 0, send.client_msg_id));
            Ok(())
        };
        let to = match requests::send(&send, self.config.max_frame_bytes) {
            Ok((proto::ConversationKind::Group, id)) => Target::Group(id.into()),
            Ok((_, id)) => Target::Direct(id.into()),
            Err(e) => return fail(ErrorCode::InvalidRequest, e.0),
        };
        let op = Op::Send {
            from: conn.user().clone(),
            client_msg_id: send.client_msg_id,
            to,
            content_type: send.content_type,
            body: send.body,
            system: false,
        };
        let reply = Reply::Send {
            conn: conn.clone(),
            client_msg_id: send.client_msg_id,
            received: std::time::Instant::now(),
            slot,
        };
        match self.committer.submit(op, reply).await {
            Ok(()) => Ok(()),
            Err(_) => fail(ErrorCode::Unavailable, "storage is shutting down".into()),
        }
    }

    async fn sync(&self, conn: &Arc<Conn>, sync: proto::Sync) -> Result<(), (ErrorCode, String)> {
        let limit = match sync.limit as usize {
            0 => SYNC_PAGE,
            n => n.min(SYNC_PAGE_MAX),
        };
        let storage = self.shared.storage.clone();
        let user = conn.user().clone();
        let page =
            tokio::task::spawn_blocking(move || storage.read_inbox(&user, sync.after_seq, limit))
                .await
                .map_err(|_| (ErrorCode::Internal, "sync task failed".to_owned()))?
                .map_err(|e| (ErrorCode::Internal, e.to_string()))?;
        let max_seq = page.last_seq;
        let (entries, truncated, omissions) =
            delivery::fit_entries(page.entries, self.config.max_frame_bytes);
        self.shared.omitted.increment(omissions as u64);
        let batch = proto::SyncBatch {
            request_id: sync.request_id,
            entries,
            has_more: page.has_more || truncated,
            max_seq,
        };
        let _ = conn.push(Frame::from(batch));
        Ok(())
    }

    async fn recall(
        &self,
        conn: &Arc<Conn>,
        recall: proto::Recall,
        slot: Option<RequestSlot>,
    ) -> Result<(), (ErrorCode, String)> {
        let to = match requests::recall(&recall) {
            Ok((proto::ConversationKind::Group, id)) => Target::Group(id.into()),
            Ok((_, id)) => Target::Direct(id.into()),
            Err(e) => {
                let _ = conn.push(error_frame(
                    ErrorCode::InvalidRequest,
                    e.0,
                    recall.request_id,
                    0,
                ));
                return Ok(());
            }
        };
        let op = Op::Recall {
            from: conn.user().clone(),
            to,
            msg_id: recall.msg_id,
            window_ms: self.config.recall_window_ms,
        };
        let reply = Reply::Request {
            conn: conn.clone(),
            request_id: recall.request_id,
            slot,
        };
        self.submit(op, reply).await
    }

    async fn typing(
        &self,
        conn: &Arc<Conn>,
        typing: proto::Typing,
    ) -> Result<(), (ErrorCode, String)> {
        if !conn.typing_allowed() {
            return Ok(()); // Over the sender's Typing rate: dropped silently.
        }
        let to = target_of(typing.conversation.as_ref())?;
        let from = conn.user().to_string();
        match to {
            Target::Direct(peer) => {
                let frame = Frame::from(proto::Typing {
                    conversation: Some(proto::Conversation {
                        kind: proto::ConversationKind::Direct as i32,
                        id: from.clone(),
                    }),
                    typing: typing.typing,
                    from,
                });
                match self.remote_node_of(&peer) {
                    Some((bus, node)) => {
                        bus.ephemeral(vec![(node, vec![peer.to_string()])], &frame)
                    }
                    None => self.shared.sessions.for_each_connection(&peer, |c| {
                        c.try_push_best_effort(frame.clone());
                    }),
                }
            }
            Target::Group(group_id) => {
                let group = self.existing_group(&group_id).await?;
                if !group.is_member(&from) {
                    return Err((ErrorCode::NotAMember, format!("not a member of {group_id}")));
                }
                let frame = Frame::from(proto::Typing {
                    conversation: typing.conversation,
                    typing: typing.typing,
                    from: from.clone(),
                });
                let mut remote: Vec<(ferry_storage::NodeId, Vec<String>)> = Vec::new();
                for member in group.members.iter().filter(|m| m.as_ref() != from) {
                    match self.remote_node_of(member) {
                        Some((_, node)) => match remote.iter_mut().find(|(n, _)| *n == node) {
                            Some((_, users)) => users.push(member.to_string()),
                            None => remote.push((node, vec![member.to_string()])),
                        },
                        None => self.shared.sessions.for_each_connection(member, |c| {
                            c.try_push_best_effort(frame.clone());
                        }),
                    }
                }
                if let Some(bus) = &self.bus
                    && !remote.is_empty()
                {
                    bus.ephemeral(remote, &frame);
                }
            }
        }
        Ok(())
    }

    async fn group(
        &self,
        conn: &Arc<Conn>,
        request: proto::GroupRequest,
        slot: Option<RequestSlot>,
    ) -> Result<(), (ErrorCode, String)> {
        let request_id = request.request_id;
        let fail = |code, message: String| {
            let _ = conn.push(error_frame(code, message, request_id, 0));
            Ok(())
        };
        if let Err(e) = requests::group_request(&request) {
            return fail(ErrorCode::InvalidRequest, e.0);
        }
        let change = match request.op {
            None => return fail(ErrorCode::InvalidRequest, "group request has no op".into()),
            Some(GroupOp::ListMembers(list)) => {
                let group = match self.existing_group(&list.group_id).await {
                    Ok(group) => group,
                    Err((code, message)) => return fail(code, message),
                };
                if !group.is_member(conn.user()) {
                    return fail(
                        ErrorCode::NotAMember,
                        format!("not a member of {}", list.group_id),
                    );
                }
                let limit = match list.limit as usize {
                    0 => MEMBERS_PAGE,
                    n => n.min(MEMBERS_PAGE_MAX),
                };
                let reply = members_page(
                    request_id,
                    &group,
                    &list.after_user_id,
                    limit,
                    self.config.max_frame_bytes,
                );
                let _ = conn.push(Frame::from(reply));
                return Ok(());
            }
            Some(GroupOp::Create(c)) => GroupChange::Create {
                group_id: c.group_id,
                name: c.name,
                members: c.members,
            },
            Some(GroupOp::AddMembers(a)) => GroupChange::Add {
                group_id: a.group_id,
                members: a.members,
            },
            Some(GroupOp::RemoveMembers(r)) => GroupChange::Remove {
                group_id: r.group_id,
                members: r.members,
            },
            Some(GroupOp::Leave(l)) => GroupChange::Leave {
                group_id: l.group_id,
            },
            Some(GroupOp::Dissolve(d)) => GroupChange::Dissolve {
                group_id: d.group_id,
            },
            Some(GroupOp::SetRole(s)) => GroupChange::SetRole {
                role: s.role(),
                group_id: s.group_id,
                user: s.user_id,
            },
        };
        let op = Op::Group {
            actor: conn.user().clone(),
            change,
        };
        let reply = Reply::Request {
            conn: conn.clone(),
            request_id,
            slot,
        };
        self.submit(op, reply).await
    }

    async fn history(
        &self,
        conn: &Arc<Conn>,
        history: proto::History,
    ) -> Result<(), (ErrorCode, String)> {
        let request_id = history.request_id;
        let result = self.read_history(conn.user(), history).await;
        match result {
            Ok(page) => {
                let _ = conn.push(Frame::from(page));
            }
            Err((code, message)) => {
                let _ = conn.push(error_frame(code, message, request_id, 0));
            }
        }
        Ok(())
    }

    /// One page of a conversation's history as `user` sees it.
    pub async fn read_history(
        &self,
        user: &Arc<str>,
        history: proto::History,
    ) -> Result<proto::HistoryPage, (ErrorCode, String)> {
        let to = target_of(history.conversation.as_ref())?;
        let limit = match history.limit as usize {
            0 => HISTORY_PAGE,
            n => n.min(HISTORY_PAGE_MAX),
        };
        let conv = match &to {
            Target::Direct(peer) => ferry_storage::keys::ConvKey::direct(user, peer),
            Target::Group(g) => {
                if !self.existing_group(g).await?.is_member(user) {
                    return Err((ErrorCode::NotAMember, format!("not a member of {g}")));
                }
                ferry_storage::keys::ConvKey::Group(g.to_string())
            }
        };
        let storage = self.shared.storage.clone();
        let viewer = user.clone();
        let (entries, has_more) = tokio::task::spawn_blocking(move || {
            storage.history(&viewer, &conv, history.before_msg_id, limit)
        })
        .await
        .map_err(|_| (ErrorCode::Internal, "history task failed".to_owned()))?
        .map_err(|e| (ErrorCode::Internal, e.to_string()))?;
        let (entries, truncated, omissions) =
            delivery::fit_entries(entries, self.config.max_frame_bytes);
        self.shared.omitted.increment(omissions as u64);
        Ok(proto::HistoryPage {
            request_id: history.request_id,
            entries,
            has_more: has_more || truncated,
        })
    }

    /// Submits a write on behalf of the server itself (admin API); the
    /// outcome is sent to `reply`.
    pub async fn submit_admin(
        &self,
        op: Op,
        reply: tokio::sync::oneshot::Sender<ferry_storage::Outcome>,
    ) -> Result<(), RouterError> {
        self.committer
            .submit(op, Reply::Admin(reply))
            .await
            .map_err(|_| RouterError::ShuttingDown)
    }

    /// Backs up the database into `dir` while the node serves (RocksDB's
    /// BackupEngine, incremental; see [`ferry_storage::backup`]), on a
    /// blocking thread. Everything acknowledged before the call is in it.
    /// Then only the newest `keep` backups in `dir` are kept (0: all).
    pub async fn backup(
        &self,
        dir: std::path::PathBuf,
        keep: usize,
    ) -> Result<ferry_storage::BackupInfo, RouterError> {
        let storage = self.shared.storage.clone();
        tokio::task::spawn_blocking(move || storage.backup(&dir, keep))
            .await
            .map_err(|_| RouterError::ShuttingDown)?
            .map_err(RouterError::from)
    }

    /// The bus and the node `user` lives on, when that is another node.
    fn remote_node_of(&self, user: &str) -> Option<(&Arc<Bus>, ferry_storage::NodeId)> {
        let bus = self.bus.as_ref()?;
        let home = bus.homes().home_of_user(user);
        (home != bus.this_node()).then_some((bus, home))
    }

    /// Waits until everything submitted so far is committed and delivered
    /// to outboxes, then flushes and closes storage (see [`Storage::close`]):
    /// the process is about to exit.
    pub async fn shutdown(&self) {
        self.shared
            .stopping
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.committer.barrier().await;
        if let Some(bus) = &self.bus {
            bus.shutdown().await;
        }
        let storage = self.shared.storage.clone();
        let _ = tokio::task::spawn_blocking(move || storage.close()).await;
        // After this no thread of ours writes; the database itself closes
        // when the last handle to it goes, with the runtime's tasks.
        let _ = self.committer.stop().await;
    }
}

/// An `Error` frame for a failed request.
pub fn error_frame(code: ErrorCode, message: String, request_id: u64, client_msg_id: u64) -> Frame {
    Frame::from(proto::Error {
        code: code as i32,
        message,
        request_id,
        client_msg_id,
        closing: code.is_closing(),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use ferry_storage::Group;
    use ferry_storage::model::GroupMeta;

    use super::*;

    fn group(name: &str, members: &[String]) -> Group {
        let members: Vec<Arc<str>> = members.iter().map(|m| m.as_str().into()).collect();
        let roles: HashMap<Arc<str>, proto::GroupRole> = members
            .iter()
            .map(|m| (m.clone(), proto::GroupRole::Member))
            .collect();
        Group {
            id: "g".repeat(64).into(),
            meta: GroupMeta {
                name: name.into(),
                owner: members[0].to_string(),
                created_ms: 0,
            },
            members,
            roles,
        }
    }

    /// Pages through `group` and returns every page's user ids.
    fn pages(group: &Group, limit: usize, max_frame_bytes: usize) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        let mut after = String::new();
        loop {
            let reply = members_page(u64::MAX, group, &after, limit, max_frame_bytes);
            assert!(
                Frame::from(reply.clone()).encoded_len() <= max_frame_bytes,
                "page of {} members over {max_frame_bytes} bytes",
                reply.members.len()
            );
            let ids: Vec<String> = reply.members.iter().map(|m| m.user_id.clone()).collect();
            assert!(
                !(reply.has_more && ids.is_empty()),
                "has_more with an empty page"
            );
            if let Some(last) = ids.last() {
                after = last.clone();
            }
            out.push(ids);
            if !reply.has_more {
                return out;
            }
        }
    }

    #[test]
    fn pages_cover_every_member_once_in_order() {
        // Join order is not id order.
        let ids: Vec<String> = (0..2500)
            .rev()
            .map(|i| format!("u{:0>63}", i * 7 % 2500))
            .collect();
        let g = group("Team", &ids);
        let mut sorted = ids.clone();
        sorted.sort();
        for (limit, frame) in [(1000, 65_536), (7, 65_536), (1000, 256), (1000, 4096)] {
            let pages = pages(&g, limit, frame);
            assert!(pages.iter().all(|p| !p.is_empty() && p.len() <= limit));
            assert_eq!(pages.concat(), sorted, "limit {limit}, frame {frame}");
        }
        // 64-byte ids: 1,000 of them do not fit in 64 KiB, so the frame cuts.
        assert!(pages(&g, 1000, 65_536)[0].len() < 1000);
    }

    #[test]
    fn cursor_is_exclusive_and_past_the_end_is_empty() {
        let ids: Vec<String> = ["carol", "alice", "bob", "dave"].map(String::from).to_vec();
        let g = group("", &ids);
        let page = members_page(1, &g, "alice", 2, 65_536);
        let got: Vec<&str> = page.members.iter().map(|m| m.user_id.as_str()).collect();
        assert_eq!((got, page.has_more), (vec!["bob", "carol"], true));
        let page = members_page(1, &g, "bob", 2, 65_536);
        assert!(!page.has_more, "carol and dave were the last two");
        let page = members_page(1, &g, "dave", 2, 65_536);
        assert!(page.members.is_empty() && !page.has_more);
        let page = members_page(1, &g, "zzz", 0, 65_536);
        assert!(page.members.is_empty() && !page.has_more);
    }

    #[test]
    fn a_name_that_fills_the_frame_is_left_out_rather_than_every_member() {
        let ids = vec!["m".repeat(64), "n".repeat(64)];
        let g = group(&"x".repeat(300), &ids);
        let page = members_page(u64::MAX, &g, "", 1000, 256);
        assert_eq!(page.members.len(), 1);
        assert!(page.has_more && page.name.is_empty());
        let page = members_page(u64::MAX, &g, "", 1000, 65_536);
        assert_eq!((page.members.len(), page.name.len()), (2, 300));
    }
}
