//! `ferry chat`: a line-based terminal client, to see ferry work in a
//! minute and to script it.
//!
//! Interactive (the default): lines typed on stdin are messages to the
//! current conversation, or commands (`/to`, `/group`, `/sync`, `/history`,
//! `/create`, `/add`, `/members`, `/help`, `/quit`). Inbox entries, acks and
//! replies are printed as they arrive, on stdout; errors on stderr.
//!
//! Non-interactive, for scripts and tests:
//! - `--send TEXT` (with `--to USER` or `--group GROUP`) sends one message,
//!   waits for its `SendAck`, prints `sent msg_id=… seq=…`, and exits 0; an
//!   `Error` answer, a close or the timeout exits non-zero.
//! - `--recv N` prints inbox entries (the login sync, then live ones) until
//!   N messages from others (or system messages) have arrived, then exits 0;
//!   the timeout exits non-zero.
//!
//! In a cluster, any node's address works: the login follows `Redirect`s to
//! the user's home node (at most 3 in a row, docs/PROTOCOL.md section 4.7).
//!
//! It is a plain protocol client ([`ferry_protocol::client`]): it acks what
//! it prints (interactive mode only), pings when idle, and keeps no state
//! between runs (`--last-seq` resumes from a position).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use ferry_protocol::client::{
    Client, ClientError, FrameReader, FrameWriter, TlsConnector, Transport,
};
use ferry_protocol::proto::{
    self, ConversationKind, EntryKind, GroupEventKind, frame::Body, group_request::Op as GroupOp,
};
use ferry_protocol::{ErrorCode, Frame};
use tokio::io::{AsyncBufReadExt, BufReader};

use ferry_gateway::auth::{SecretError, TokenVerifier, load_secret};

/// Flags of `ferry chat`.
#[derive(Debug, Clone, clap::Args)]
pub struct ChatArgs {
    /// The server's client address (in a cluster, any node's: redirects are followed).
    #[arg(long, env = "FERRY_SERVER", default_value = "127.0.0.1:7600")]
    pub server: String,
    /// Client token (JWT) to authenticate with.
    #[arg(
        long,
        env = "FERRY_TOKEN",
        hide_env_values = true,
        conflicts_with = "uid"
    )]
    pub token: Option<String>,
    /// Or: mint a token for this user id with the local secret (development).
    #[arg(long, value_name = "USER", required_unless_present = "token")]
    pub uid: Option<String>,
    /// With --uid: the server's data directory, holding jwt.secret.
    #[arg(long, env = "FERRY_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// With --uid: the server's secret, instead of the data dir's.
    #[arg(long, env = "FERRY_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Device id [default: "chat"; "chat-<pid>" with --send or --recv, so a
    /// script does not kick an interactive session of the same user].
    #[arg(long)]
    pub device: Option<String>,
    /// Talk to this user.
    #[arg(long, value_name = "USER", conflicts_with = "group")]
    pub to: Option<String>,
    /// Talk in this group.
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,
    /// Send this text to --to or --group, wait for the SendAck, and exit.
    #[arg(long, value_name = "TEXT")]
    pub send: Option<String>,
    /// Print entries until N messages from others (or system messages)
    /// have arrived, then exit.
    #[arg(long, value_name = "N")]
    pub recv: Option<usize>,
    /// Seconds --send and --recv wait before failing (and /quit waits for
    /// outstanding acks).
    #[arg(long, default_value_t = 10)]
    pub timeout_secs: u64,
    /// Resume after this inbox seq: the login sync replays entries after it.
    #[arg(long, default_value_t = 0)]
    pub last_seq: u64,
    /// Skip the login sync: show only entries that arrive from now on.
    #[arg(long)]
    pub skip_sync: bool,
    /// Connect with TLS (to the server's --tls-listen port); needs --ca.
    #[arg(long, env = "FERRY_TLS", requires = "ca")]
    pub tls: bool,
    /// With --tls: the PEM file of the CA(s) to trust.
    #[arg(long, env = "FERRY_CA", value_name = "PEM")]
    pub ca: Option<PathBuf>,
    /// With --tls: the name to verify in the server's certificate (and
    /// send as SNI) [default: the host of --server, and of each redirect].
    #[arg(long, value_name = "NAME")]
    pub server_name: Option<String>,
}

/// The transport `args` ask for: plain, or TLS trusting `--ca`.
fn transport(args: &ChatArgs) -> Result<Transport, ChatError> {
    if !args.tls {
        if args.ca.is_some() || args.server_name.is_some() {
            return Err(ChatError::Usage("--ca and --server-name need --tls".into()));
        }
        return Ok(Transport::Plain);
    }
    let path = args
        .ca
        .as_ref()
        .ok_or_else(|| ChatError::Usage("--tls needs --ca".into()))?;
    let pem = std::fs::read(path)
        .map_err(|e| ChatError::Usage(format!("reading the CA file {}: {e}", path.display())))?;
    let mut tls = TlsConnector::from_ca_pem(&pem)?;
    if let Some(name) = &args.server_name {
        tls = tls.with_server_name(name)?;
    }
    Ok(Transport::Tls(tls))
}

/// Why `ferry chat` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The arguments do not make sense together.
    #[error("{0}")]
    Usage(String),
    /// No secret to mint a token with.
    #[error(
        "no JWT secret: {0} does not exist (start the server first, or pass --jwt-secret or --token)"
    )]
    NoSecret(PathBuf),
    /// The secret could not be read.
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// Connection or protocol failure.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The server answered a request with an error.
    #[error("server refused: {code}: {message}")]
    Refused {
        /// The code's protocol name.
        code: String,
        /// The server's detail.
        message: String,
    },
    /// The server kicked this connection.
    #[error("kicked by the server: {code}: {message}")]
    Kicked {
        /// The reason's protocol name.
        code: String,
        /// The server's detail.
        message: String,
    },
    /// Waited too long.
    #[error("timed out after {0} s {1}")]
    Timeout(u64, String),
    /// Reading stdin failed.
    #[error("stdin: {0}")]
    Stdin(std::io::Error),
}

fn code_name(code: i32) -> String {
    ErrorCode::try_from(code)
        .map(|c| c.as_str_name().trim_start_matches("ERROR_CODE_").to_owned())
        .unwrap_or_else(|_| format!("code {code}"))
}

/// Runs `ferry chat` to completion.
pub async fn run(args: ChatArgs) -> Result<(), ChatError> {
    let one_shot = args.send.is_some() || args.recv.is_some();
    let target = match (&args.to, &args.group) {
        (Some(user), None) => Some(conversation(ConversationKind::Direct, user)),
        (None, Some(group)) => Some(conversation(ConversationKind::Group, group)),
        _ => None,
    };
    if args.send.is_some() && target.is_none() {
        return Err(ChatError::Usage(
            "--send needs --to USER or --group GROUP".into(),
        ));
    }
    let token = match (&args.token, &args.uid) {
        (Some(token), _) => token.clone(),
        (None, Some(uid)) => {
            let secret =
                load_secret(args.jwt_secret.as_deref(), &args.data_dir)?.ok_or_else(|| {
                    ChatError::NoSecret(args.data_dir.join(ferry_gateway::auth::SECRET_FILE))
                })?;
            TokenVerifier::new(&secret).mint(uid, None, 86_400)
        }
        (None, None) => return Err(ChatError::Usage("give --token or --uid".into())),
    };
    let device = args.device.clone().unwrap_or_else(|| {
        if one_shot {
            format!("chat-{}", std::process::id())
        } else {
            "chat".into()
        }
    });
    // A --send alone needs no history; everything else shows the inbox.
    let skip_sync = args.skip_sync || (args.send.is_some() && args.recv.is_none());

    // Follows a cluster's Redirects to the user's home node (at most 3).
    let auth = proto::Auth {
        token,
        device_id: device.clone(),
        protocol_version: ferry_protocol::PROTOCOL_VERSION as i32,
        last_seq: args.last_seq,
        skip_sync,
    };
    let transport = transport(&args)?;
    let login = match Client::connect_with_auth_via(args.server.as_str(), auth, &transport).await {
        Ok(login) => login,
        Err(ClientError::Rejected(e)) => {
            return Err(ChatError::Refused {
                code: code_name(e.code),
                message: e.message,
            });
        }
        Err(e) => return Err(e.into()),
    };
    let (client, auth_ok) = (login.client, login.auth_ok);
    let server = if login.redirects == 0 {
        login.address
    } else {
        format!(
            "{} (node {}, redirected from {})",
            login.address, auth_ok.node_id, args.server
        )
    };
    let (reader, writer) = client.split();
    let mut chat = Chat {
        me: auth_ok.user_id.clone(),
        reader,
        writer,
        target,
        last_seq: args.last_seq,
        next_id: 1,
        pending_sends: HashMap::new(),
        requests: HashMap::new(),
        interactive: !one_shot,
        received: 0,
        heartbeat: Duration::from_secs(auth_ok.heartbeat_secs.max(1) as u64),
    };
    if one_shot {
        let timeout = Duration::from_secs(args.timeout_secs);
        tokio::time::timeout(timeout, chat.one_shot(&args))
            .await
            .unwrap_or_else(|_| {
                let what = match args.recv {
                    Some(n) => format!("with {} of {n} messages received", chat.received),
                    None => "waiting for the SendAck".into(),
                };
                Err(ChatError::Timeout(args.timeout_secs, what))
            })
    } else {
        eprintln!(
            "connected to {server} as {} (device {device}); inbox max seq {}. /help for commands.",
            auth_ok.user_id, auth_ok.max_seq
        );
        chat.interactive(Duration::from_secs(args.timeout_secs))
            .await
    }
}

fn conversation(kind: ConversationKind, id: &str) -> proto::Conversation {
    proto::Conversation {
        kind: kind as i32,
        id: id.to_owned(),
    }
}

/// What a request id was for, to word its reply.
enum Request {
    Sync,
    History,
    Group(&'static str),
    /// `/members`: pages through the list under one request id, asking
    /// for the next page while the reply says `has_more`.
    Members {
        /// Members printed so far.
        listed: usize,
        /// Pages printed so far.
        pages: usize,
    },
}

struct Chat {
    me: String,
    reader: FrameReader,
    writer: FrameWriter,
    /// Where plain lines go.
    target: Option<proto::Conversation>,
    /// Highest inbox seq seen.
    last_seq: u64,
    next_id: u64,
    /// Sends waiting for their ack: client msg id → where to.
    pending_sends: HashMap<u64, String>,
    requests: HashMap<u64, Request>,
    /// Interactive: ack what was printed, and report failed sends
    /// instead of stopping.
    interactive: bool,
    /// Messages from others (and system messages) printed so far.
    received: usize,
    heartbeat: Duration,
}

/// What a frame meant for the caller's loop.
enum Event {
    Nothing,
    /// The SendAck of this client msg id.
    Acked(u64),
}

impl Chat {
    fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    async fn send_text(&mut self, to: proto::Conversation, text: &str) -> Result<u64, ChatError> {
        // Random, so a restarted chat never collides with its earlier ids in
        // the server's dedup records.
        let cid = rand::random::<u64>() | 1;
        self.pending_sends.insert(cid, label(&to));
        self.writer
            .send(proto::Send {
                client_msg_id: cid,
                to: Some(to),
                content_type: "text/plain".into(),
                body: Bytes::copy_from_slice(text.as_bytes()),
            })
            .await?;
        Ok(cid)
    }

    async fn one_shot(&mut self, args: &ChatArgs) -> Result<(), ChatError> {
        if let (Some(text), Some(to)) = (&args.send, self.target.clone()) {
            let cid = self.send_text(to, text).await?;
            loop {
                if let Event::Acked(acked) = self.next_event().await?
                    && acked == cid
                {
                    break;
                }
            }
        }
        if let Some(n) = args.recv {
            while self.received < n {
                self.next_event().await?;
            }
        }
        Ok(())
    }

    async fn interactive(&mut self, quit_wait: Duration) -> Result<(), ChatError> {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        let mut stdin_open = true;
        let mut ticks = tokio::time::interval(self.heartbeat);
        ticks.tick().await;
        let mut sent_since_tick = false;
        loop {
            tokio::select! {
                line = lines.next_line(), if stdin_open => {
                    match line.map_err(ChatError::Stdin)? {
                        Some(line) => {
                            sent_since_tick = true;
                            if !self.command(line.trim()).await? {
                                break;
                            }
                        }
                        None => stdin_open = false,
                    }
                    if !stdin_open {
                        break;
                    }
                }
                event = self.next_event() => { event?; }
                _ = ticks.tick() => {
                    if !sent_since_tick {
                        self.writer.send(proto::Ping { nonce: 0 }).await?;
                    }
                    sent_since_tick = false;
                }
            }
        }
        // Quitting (or end of input): wait for the acks still due, so piped
        // input is sent for sure before the process exits.
        let waiting = self.pending_sends.len();
        tokio::time::timeout(quit_wait, async {
            while !self.pending_sends.is_empty() {
                self.next_event().await?;
            }
            Ok::<_, ChatError>(())
        })
        .await
        .map_err(|_| {
            ChatError::Timeout(
                quit_wait.as_secs(),
                format!("waiting for {waiting} acks before quitting"),
            )
        })??;
        let _ = self.writer.shutdown().await;
        Ok(())
    }

    /// Acts on one input line; `false` means quit.
    async fn command(&mut self, line: &str) -> Result<bool, ChatError> {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else {
            return Ok(true);
        };
        if !first.starts_with('/') {
            let Some(to) = self.target.clone() else {
                eprintln!("pick a conversation first: /to USER or /group GROUP");
                return Ok(true);
            };
            self.send_text(to, line).await?;
            return Ok(true);
        }
        let rest: Vec<&str> = words.collect();
        match (first, rest.as_slice()) {
            ("/quit" | "/exit", _) => return Ok(false),
            ("/help", _) => eprintln!("{HELP}"),
            ("/to", [user]) => {
                self.target = Some(conversation(ConversationKind::Direct, user));
                eprintln!("talking to {user}");
            }
            ("/group", [group]) => {
                self.target = Some(conversation(ConversationKind::Group, group));
                eprintln!("talking in group {group}");
            }
            ("/sync", args @ ([] | [_])) => {
                let after = match args.first().map(|a| a.parse::<u64>()) {
                    None => 0,
                    Some(Ok(n)) => n,
                    Some(Err(_)) => {
                        eprintln!("usage: /sync [AFTER_SEQ]");
                        return Ok(true);
                    }
                };
                let request_id = self.next_id();
                self.requests.insert(request_id, Request::Sync);
                self.writer
                    .send(proto::Sync {
                        request_id,
                        after_seq: after,
                        limit: 0,
                    })
                    .await?;
            }
            ("/history", args @ ([] | [_])) => {
                let Some(conversation) = self.target.clone() else {
                    eprintln!("pick a conversation first: /to USER or /group GROUP");
                    return Ok(true);
                };
                let Ok(limit) = args.first().map_or(Ok(20), |a| a.parse::<u32>()) else {
                    eprintln!("usage: /history [COUNT]");
                    return Ok(true);
                };
                let request_id = self.next_id();
                self.requests.insert(request_id, Request::History);
                self.writer
                    .send(proto::History {
                        request_id,
                        conversation: Some(conversation),
                        before_msg_id: 0,
                        limit,
                    })
                    .await?;
            }
            ("/create", [group, members @ ..]) => {
                let op = GroupOp::Create(proto::CreateGroup {
                    group_id: group.to_string(),
                    name: group.to_string(),
                    members: members.iter().map(|m| m.to_string()).collect(),
                });
                self.group_request(op, "created").await?;
                self.target = Some(conversation(ConversationKind::Group, group));
            }
            ("/add", members @ [_, ..]) => {
                let Some(group_id) = self.current_group() else {
                    return Ok(true);
                };
                let op = GroupOp::AddMembers(proto::AddMembers {
                    group_id,
                    members: members.iter().map(|m| m.to_string()).collect(),
                });
                self.group_request(op, "members added").await?;
            }
            ("/members", []) => {
                let Some(group_id) = self.current_group() else {
                    return Ok(true);
                };
                let request_id = self.next_id();
                self.requests.insert(
                    request_id,
                    Request::Members {
                        listed: 0,
                        pages: 0,
                    },
                );
                self.list_members(request_id, group_id, String::new())
                    .await?;
            }
            _ => eprintln!("unknown command or wrong arguments: {line} (/help lists commands)"),
        }
        Ok(true)
    }

    fn current_group(&self) -> Option<String> {
        match &self.target {
            Some(c) if c.kind() == ConversationKind::Group => Some(c.id.clone()),
            _ => {
                eprintln!("pick a group first: /group GROUP");
                None
            }
        }
    }

    async fn group_request(&mut self, op: GroupOp, what: &'static str) -> Result<(), ChatError> {
        let request_id = self.next_id();
        self.requests.insert(request_id, Request::Group(what));
        self.send_group_request(request_id, op).await
    }

    /// Sends `op` as a `GroupRequest` with `request_id`.
    async fn send_group_request(&mut self, request_id: u64, op: GroupOp) -> Result<(), ChatError> {
        self.writer
            .send(proto::GroupRequest {
                request_id,
                op: Some(op),
            })
            .await?;
        Ok(())
    }

    /// Asks for the page of members after `after_user_id` (server default
    /// page size).
    async fn list_members(
        &mut self,
        request_id: u64,
        group_id: String,
        after_user_id: String,
    ) -> Result<(), ChatError> {
        let op = GroupOp::ListMembers(proto::ListMembers {
            group_id,
            after_user_id,
            limit: 0,
        });
        self.send_group_request(request_id, op).await
    }

    /// Prints one page of a `/members` listing and asks for the next.
    async fn members_page(
        &mut self,
        reply: proto::GroupReply,
        listed: usize,
        pages: usize,
    ) -> Result<(), ChatError> {
        println!(
            "group {}: members: {}",
            reply.group_id,
            describe_members(&reply.members)
        );
        let (listed, pages) = (listed + reply.members.len(), pages + 1);
        match (reply.has_more, reply.members.last()) {
            (true, Some(last)) => {
                let after = last.user_id.clone();
                self.requests
                    .insert(reply.request_id, Request::Members { listed, pages });
                self.list_members(reply.request_id, reply.group_id, after)
                    .await
            }
            _ => {
                if pages > 1 {
                    println!("group {}: {listed} members", reply.group_id);
                }
                Ok(())
            }
        }
    }

    /// Reads and prints one frame.
    async fn next_event(&mut self) -> Result<Event, ChatError> {
        let frame = match self.reader.recv().await? {
            Some(Frame { body: Some(body) }) => body,
            Some(Frame { body: None }) => return Ok(Event::Nothing),
            None => return Err(ClientError::Closed.into()),
        };
        match frame {
            Body::Deliver(entry) => {
                self.print_entry(&entry);
                self.ack_up_to(entry.seq).await?;
            }
            Body::SyncBatch(batch) => {
                let last = batch.entries.last().map(|e| e.seq);
                for entry in &batch.entries {
                    self.print_entry(entry);
                }
                if let Some(seq) = last {
                    self.ack_up_to(seq).await?;
                }
                if batch.request_id != 0 {
                    match (batch.has_more, last) {
                        (true, Some(after_seq)) => {
                            self.writer
                                .send(proto::Sync {
                                    request_id: batch.request_id,
                                    after_seq,
                                    limit: 0,
                                })
                                .await?
                        }
                        _ => {
                            self.requests.remove(&batch.request_id);
                            println!("sync done: inbox max seq {}", batch.max_seq);
                        }
                    }
                }
            }
            Body::HistoryPage(page) => {
                self.requests.remove(&page.request_id);
                if page.entries.is_empty() {
                    println!("history: nothing yet");
                }
                for entry in page.entries.iter().rev() {
                    println!("{}", describe(entry, &self.me));
                }
                if page.has_more {
                    println!("history: older messages exist (/history COUNT for more)");
                }
            }
            Body::SendAck(ack) => {
                let to = self.pending_sends.remove(&ack.client_msg_id);
                println!(
                    "sent msg_id={} seq={}{}",
                    ack.msg_id,
                    ack.seq,
                    to.map(|t| format!(" to {t}")).unwrap_or_default()
                );
                return Ok(Event::Acked(ack.client_msg_id));
            }
            Body::GroupReply(reply) => {
                let what = match self.requests.remove(&reply.request_id) {
                    Some(Request::Group(what)) => what,
                    Some(Request::Members { listed, pages }) => {
                        self.members_page(reply, listed, pages).await?;
                        return Ok(Event::Nothing);
                    }
                    _ => "reply",
                };
                println!(
                    "group {}: {what}: {}",
                    reply.group_id,
                    describe_members(&reply.members)
                );
            }
            Body::Error(e) => {
                let code = code_name(e.code);
                if e.client_msg_id != 0 && self.pending_sends.remove(&e.client_msg_id).is_some() {
                    if self.interactive {
                        eprintln!("send failed: {code}: {}", e.message);
                        return Ok(Event::Nothing);
                    }
                    return Err(ChatError::Refused {
                        code,
                        message: e.message,
                    });
                }
                self.requests.remove(&e.request_id);
                eprintln!("error: {code}: {}", e.message);
                if e.closing {
                    return Err(ChatError::Refused {
                        code,
                        message: e.message,
                    });
                }
            }
            Body::Kick(k) => {
                return Err(ChatError::Kicked {
                    code: code_name(k.reason),
                    message: k.message,
                });
            }
            Body::Typing(t) if t.typing => {
                println!(
                    "{} {} is typing…",
                    label_of(t.conversation.as_ref()),
                    t.from
                );
            }
            Body::RecallAck(r) => println!("recalled msg_id={}", r.msg_id),
            _ => {}
        }
        Ok(Event::Nothing)
    }

    fn print_entry(&mut self, entry: &proto::Deliver) {
        println!("{}", describe(entry, &self.me));
        self.last_seq = self.last_seq.max(entry.seq);
        let kind = entry.kind();
        if (kind == EntryKind::Message && entry.from != self.me) || kind == EntryKind::System {
            self.received += 1;
        }
    }

    async fn ack_up_to(&mut self, seq: u64) -> Result<(), ChatError> {
        if self.interactive && seq > 0 {
            self.writer
                .send(proto::DeliverAck { up_to_seq: seq })
                .await?;
        }
        Ok(())
    }
}

const HELP: &str = "\
commands:
  /to USER                 talk to USER (plain lines are sent there)
  /group GROUP             talk in GROUP
  /create GROUP [USER...]  create GROUP with you as owner, then talk in it
  /add USER...             add members to the current group
  /members                 list the current group's members
  /sync [AFTER_SEQ]        replay your inbox after AFTER_SEQ (default 0)
  /history [COUNT]         the current conversation's last COUNT messages
  /quit                    wait for outstanding acks, then leave";

/// `alice (owner), bob (admin), carol`.
fn describe_members(members: &[proto::GroupMember]) -> String {
    let members: Vec<String> = members
        .iter()
        .map(|m| match m.role() {
            proto::GroupRole::Owner => format!("{} (owner)", m.user_id),
            proto::GroupRole::Admin => format!("{} (admin)", m.user_id),
            _ => m.user_id.clone(),
        })
        .collect();
    members.join(", ")
}

fn label(conv: &proto::Conversation) -> String {
    label_of(Some(conv))
}

fn label_of(conv: Option<&proto::Conversation>) -> String {
    match conv {
        Some(c) if c.kind() == ConversationKind::Group => format!("#{}", c.id),
        Some(c) if c.id.is_empty() => "@system".into(),
        Some(c) => format!("@{}", c.id),
        None => "@?".into(),
    }
}

fn content(entry: &proto::Deliver) -> String {
    match std::str::from_utf8(&entry.body) {
        Ok(text) if entry.content_type.starts_with("text/") || entry.content_type.is_empty() => {
            text.to_owned()
        }
        _ => format!("<{}, {} bytes>", entry.content_type, entry.body.len()),
    }
}

/// One line for an inbox entry, as `me` sees it.
pub fn describe(entry: &proto::Deliver, me: &str) -> String {
    let position = if entry.seq > 0 {
        format!("[{}]", entry.seq)
    } else {
        "[--]".to_owned()
    };
    let conv = label_of(entry.conversation.as_ref());
    let who = if entry.from.is_empty() {
        "system"
    } else if entry.from == me {
        "you"
    } else {
        entry.from.as_str()
    };
    let what = match entry.kind() {
        EntryKind::Message | EntryKind::System => format!("{who}: {}", content(entry)),
        EntryKind::Recall => format!("{who} recalled message {}", entry.ref_msg_id),
        EntryKind::Read => format!("{who} read up to message {}", entry.ref_msg_id),
        EntryKind::GroupEvent => {
            let event = entry.group_event.clone().unwrap_or_default();
            let users = event.users.join(", ");
            match event.kind() {
                GroupEventKind::Created => format!("{who} created the group"),
                GroupEventKind::MembersAdded => format!("{who} added {users}"),
                GroupEventKind::MembersRemoved => format!("{who} removed {users}"),
                GroupEventKind::MemberLeft => format!("{users} left"),
                GroupEventKind::Dissolved => format!("{who} dissolved the group"),
                GroupEventKind::RoleChanged => format!(
                    "{who} made {users} {}",
                    event
                        .role()
                        .as_str_name()
                        .trim_start_matches("GROUP_ROLE_")
                        .to_lowercase()
                ),
                GroupEventKind::Unspecified => format!("{who} changed the group"),
            }
        }
        EntryKind::Omitted => format!("(message {} from {who} unavailable)", entry.msg_id),
        EntryKind::Unspecified => format!("(entry of an unknown kind from {who})"),
    };
    format!("{position} {conv} {what}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: EntryKind, from: &str, conv: proto::Conversation, body: &str) -> proto::Deliver {
        proto::Deliver {
            seq: 7,
            from: from.into(),
            conversation: Some(conv),
            content_type: "text/plain".into(),
            body: Bytes::copy_from_slice(body.as_bytes()),
            kind: kind as i32,
            ..Default::default()
        }
    }

    #[test]
    fn entries_read_naturally() {
        let direct = conversation(ConversationKind::Direct, "alice");
        assert_eq!(
            describe(
                &entry(EntryKind::Message, "alice", direct.clone(), "hi"),
                "bob"
            ),
            "[7] @alice alice: hi"
        );
        assert_eq!(
            describe(&entry(EntryKind::Message, "bob", direct, "yo"), "bob"),
            "[7] @alice you: yo"
        );
        let system = conversation(ConversationKind::Direct, "");
        assert_eq!(
            describe(&entry(EntryKind::System, "", system, "maintenance"), "bob"),
            "[7] @system system: maintenance"
        );
        let mut binary = entry(
            EntryKind::Message,
            "carol",
            conversation(ConversationKind::Group, "g1"),
            "",
        );
        binary.content_type = "image/png".into();
        binary.body = Bytes::from_static(&[0xff, 0, 1]);
        binary.seq = 0;
        assert_eq!(
            describe(&binary, "bob"),
            "[--] #g1 carol: <image/png, 3 bytes>"
        );
    }
}
