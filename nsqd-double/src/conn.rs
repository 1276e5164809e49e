//! One client connection of the test double, shaped like nsqd's own (`nsqd/protocol_v2.go`):
//!
//! - the **reader** (nsqd's `IOLoop`) reads the magic, then command lines and their bodies,
//!   with a read deadline of 2 x the heartbeat interval set before each line; it answers
//!   with `OK` / JSON / `CLOSE_WAIT` / `E_*` frames, closing after fatal errors;
//! - the **pump** (nsqd's `messagePump`) writes `_heartbeat_` every interval (restarted by
//!   IDENTIFY) and message frames while the client has RDY room;
//! - the **writer** owns the socket's write half; both send it frames through a bounded
//!   queue, and it closes the socket (TCP FIN) when asked or when the double drops
//!   connections.
//!
//! Error texts, their order of checks and which are fatal are nsqd v1.3.0's, checked against
//! the transcripts.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ferry_nsq::codec::{
    self, CLOSE_WAIT, FRAME_TYPE_ERROR, FRAME_TYPE_RESPONSE, HEARTBEAT, IdentifyResponse, MAGIC_V2,
    Message, MessageId, OK,
};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::{DoubleConfig, Shared};

/// What the reader and the pump hand the writer.
enum Out {
    Bytes(Bytes),
    Close,
}

/// An error nsqd would send: `fatal` ones close the connection.
struct ClientErr {
    fatal: bool,
    text: String,
}

fn fatal(code: &str, desc: impl AsRef<str>) -> ClientErr {
    ClientErr {
        fatal: true,
        text: format!("{code} {}", desc.as_ref()),
    }
}

fn non_fatal(code: &str, desc: impl AsRef<str>) -> ClientErr {
    ClientErr {
        fatal: false,
        text: format!("{code} {}", desc.as_ref()),
    }
}

fn frame(frame_type: u32, data: &[u8]) -> Out {
    let mut buf = BytesMut::new();
    codec::encode_frame(frame_type, data, &mut buf);
    Out::Bytes(buf.freeze())
}

/// Go's `%q` for the names nsqd quotes (printable ASCII in practice).
fn quote(b: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(b))
}

/// nsqd's `ByteToBase10`: digits only, anything else is an error (an empty string is 0).
fn base10(b: &[u8]) -> Option<u64> {
    b.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit()
            .then(|| n.wrapping_mul(10).wrapping_add((d - b'0') as u64))
    })
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct IdentifyIn {
    heartbeat_interval: i64,
    output_buffer_size: i64,
    output_buffer_timeout: i64,
    feature_negotiation: bool,
    sample_rate: i64,
    msg_timeout: i64,
}

#[derive(PartialEq, Eq, Clone, Copy)]
enum State {
    Init,
    Subscribed,
    Closing,
}

struct Client {
    id: u64,
    state: State,
    heartbeat: Duration,
    msg_timeout: Duration,
    output_buffer_size: i64,
    output_buffer_timeout: Duration,
    sample_rate: i64,
}

/// Serves one accepted connection until it closes.
pub(crate) async fn serve(stream: TcpStream, shared: Arc<Shared>, dropped: CancellationToken) {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let _ = stream.set_nodelay(true);
    let config = shared.config.clone();
    let (read, mut write) = stream.into_split();
    let (out_tx, mut out_rx) = mpsc::channel::<Out>(1024);
    let done = CancellationToken::new();
    let default_hb = config.client_timeout / 2;
    let (client_id, wake) = shared.with(|b| {
        b.stats.connections += 1;
        b.stats.open_connections += 1;
        b.add_client(config.msg_timeout)
    });
    info!(%peer, client_id, "nsqd test double: new client");
    let (hb_tx, hb_rx) = watch::channel(default_hb);

    let writer = {
        let done = done.clone();
        let dropped = dropped.clone();
        tokio::spawn(async move {
            loop {
                let out = tokio::select! {
                    out = out_rx.recv() => out,
                    _ = dropped.cancelled() => None,
                    _ = done.cancelled() => None,
                };
                // Everything ready goes out in one write.
                let mut batch = BytesMut::new();
                let mut close = false;
                let mut next = out;
                loop {
                    match next {
                        Some(Out::Bytes(b)) => batch.extend_from_slice(&b),
                        Some(Out::Close) | None => {
                            close = true;
                            break;
                        }
                    }
                    if batch.len() >= 64 * 1024 {
                        break;
                    }
                    match out_rx.try_recv() {
                        Ok(more) => next = Some(more),
                        Err(_) => break,
                    }
                }
                if !batch.is_empty() && write.write_all(&batch).await.is_err() {
                    break;
                }
                if close {
                    break;
                }
            }
            let _ = write.shutdown().await;
            done.cancel();
        })
    };

    let pump = tokio::spawn(pump(
        client_id,
        shared.clone(),
        wake,
        hb_rx,
        out_tx.clone(),
        done.clone(),
    ));

    let client = Client {
        id: client_id,
        state: State::Init,
        heartbeat: default_hb,
        msg_timeout: config.msg_timeout,
        output_buffer_size: 16 * 1024,
        output_buffer_timeout: config.output_buffer_timeout,
        sample_rate: 0,
    };
    tokio::select! {
        reason = io_loop(read, client, &shared, &config, &out_tx, &hb_tx) => {
            debug!(%peer, client_id, reason, "nsqd test double: closing client");
            let _ = out_tx.send(Out::Close).await;
        }
        _ = done.cancelled() => {}
    }
    let _ = writer.await;
    done.cancel();
    let _ = pump.await;
    shared.with(|b| {
        b.remove_client(client_id);
        b.stats.open_connections -= 1;
    });
    info!(%peer, client_id, "nsqd test double: client gone");
}

/// nsqd's messagePump: heartbeats and messages.
async fn pump(
    client_id: u64,
    shared: Arc<Shared>,
    wake: Arc<tokio::sync::Notify>,
    mut hb_rx: watch::Receiver<Duration>,
    out: mpsc::Sender<Out>,
    done: CancellationToken,
) {
    let ticker =
        |d: Duration| (!d.is_zero()).then(|| tokio::time::interval_at(Instant::now() + d, d));
    let mut heartbeat = ticker(*hb_rx.borrow_and_update());
    loop {
        let msgs = shared.with(|b| b.take_ready(client_id));
        for msg in msgs {
            let mut buf = BytesMut::new();
            codec::Frame::Message(Message {
                timestamp_ns: msg.timestamp_ns,
                attempts: msg.attempts,
                id: msg.id,
                body: msg.body,
            })
            .encode(&mut buf);
            if out.send(Out::Bytes(buf.freeze())).await.is_err() {
                return;
            }
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = async { heartbeat.as_mut().expect("guarded").tick().await }, if heartbeat.is_some() => {
                shared.with(|b| b.stats.heartbeats += 1);
                if out.send(frame(FRAME_TYPE_RESPONSE, HEARTBEAT)).await.is_err() {
                    return;
                }
            }
            changed = hb_rx.changed() => {
                if changed.is_err() {
                    return;
                }
                heartbeat = ticker(*hb_rx.borrow_and_update());
            }
            _ = done.cancelled() => return,
        }
    }
}

type Reader = BufReader<OwnedReadHalf>;

/// Reads exactly `n` bytes before the deadline.
async fn read_exact_by(r: &mut Reader, n: usize, deadline: Option<Instant>) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; n];
    let read = r.read_exact(&mut buf);
    let ok = match deadline {
        Some(d) => tokio::time::timeout_at(d, read).await.ok()?.is_ok(),
        None => read.await.is_ok(),
    };
    ok.then_some(buf)
}

/// nsqd's `readLen`: a 4-byte big-endian *signed* size.
async fn read_len(r: &mut Reader, deadline: Option<Instant>) -> Option<i32> {
    let b = read_exact_by(r, 4, deadline).await?;
    Some(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// nsqd's IOLoop. Returns why the connection ends.
async fn io_loop(
    read: OwnedReadHalf,
    mut client: Client,
    shared: &Shared,
    config: &DoubleConfig,
    out: &mpsc::Sender<Out>,
    hb_tx: &watch::Sender<Duration>,
) -> &'static str {
    let mut r = BufReader::with_capacity(16 * 1024, read);
    let magic_deadline = Some(Instant::now() + config.client_timeout);
    let Some(magic) = read_exact_by(&mut r, 4, magic_deadline).await else {
        return "no magic";
    };
    if magic.as_slice() != MAGIC_V2 {
        let _ = out.send(frame(FRAME_TYPE_ERROR, b"E_BAD_PROTOCOL")).await;
        return "bad protocol magic";
    }
    let mut line = Vec::with_capacity(64);
    loop {
        let deadline = (!client.heartbeat.is_zero()).then(|| Instant::now() + client.heartbeat * 2);
        line.clear();
        let read = async {
            // nsqd reads lines through a 16 KiB bufio.Reader: a longer line is an error.
            loop {
                let available = r.fill_buf().await?;
                if available.is_empty() {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                if let Some(pos) = available.iter().position(|&b| b == b'\n') {
                    line.extend_from_slice(&available[..pos]);
                    r.consume(pos + 1);
                    return Ok(());
                }
                let n = available.len();
                line.extend_from_slice(available);
                r.consume(n);
                if line.len() >= 16 * 1024 {
                    return Err(std::io::Error::other("line too long"));
                }
            }
        };
        let result: std::io::Result<()> = match deadline {
            Some(d) => match tokio::time::timeout_at(d, read).await {
                Ok(r) => r,
                Err(_) => return "read deadline (2 x heartbeat interval) passed",
            },
            None => read.await,
        };
        if result.is_err() {
            return "client closed or read failed";
        }
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        let params: Vec<Vec<u8>> = line.split(|&b| b == b' ').map(<[u8]>::to_vec).collect();
        let name = String::from_utf8_lossy(&params[0]).into_owned();
        shared.with(|b| *b.stats.commands.entry(name).or_default() += 1);
        match exec(
            &params,
            &mut client,
            &mut r,
            deadline,
            shared,
            config,
            hb_tx,
            out,
        )
        .await
        {
            Ok(Some(resp)) => {
                if out.send(frame(FRAME_TYPE_RESPONSE, &resp)).await.is_err() {
                    return "writer gone";
                }
            }
            Ok(None) => {}
            Err(e) => {
                info!(client_id = client.id, error = %e.text, "nsqd test double: client error");
                if out
                    .send(frame(FRAME_TYPE_ERROR, e.text.as_bytes()))
                    .await
                    .is_err()
                {
                    return "writer gone";
                }
                if e.fatal {
                    return "fatal error";
                }
            }
        }
    }
}

fn message_id(p: &[u8]) -> Result<MessageId, ClientErr> {
    let id: [u8; 16] = p
        .try_into()
        .map_err(|_| fatal("E_INVALID", "invalid message ID"))?;
    Ok(MessageId(id))
}

#[allow(clippy::too_many_arguments)]
async fn exec(
    params: &[Vec<u8>],
    client: &mut Client,
    r: &mut Reader,
    deadline: Option<Instant>,
    shared: &Shared,
    config: &DoubleConfig,
    hb_tx: &watch::Sender<Duration>,
    _out: &mpsc::Sender<Out>,
) -> Result<Option<Vec<u8>>, ClientErr> {
    let cmd = params[0].as_slice();
    let in_sub = matches!(client.state, State::Subscribed | State::Closing);
    match cmd {
        b"IDENTIFY" => {
            if client.state != State::Init {
                return Err(fatal("E_INVALID", "cannot IDENTIFY in current state"));
            }
            let len = read_len(r, deadline)
                .await
                .ok_or_else(|| fatal("E_BAD_BODY", "IDENTIFY failed to read body size"))?;
            if len as i64 > config.max_body_size as i64 {
                return Err(fatal(
                    "E_BAD_BODY",
                    format!("IDENTIFY body too big {len} > {}", config.max_body_size),
                ));
            }
            if len <= 0 {
                return Err(fatal(
                    "E_BAD_BODY",
                    format!("IDENTIFY invalid body size {len}"),
                ));
            }
            let body = read_exact_by(r, len as usize, deadline)
                .await
                .ok_or_else(|| fatal("E_BAD_BODY", "IDENTIFY failed to read body"))?;
            let data: IdentifyIn = serde_json::from_slice(&body)
                .map_err(|_| fatal("E_BAD_BODY", "IDENTIFY failed to decode JSON body"))?;
            identify(client, &data, config)?;
            shared.with(|b| {
                if let Some(info) = b.clients.get_mut(&client.id) {
                    info.msg_timeout = client.msg_timeout;
                }
            });
            hb_tx.send_replace(client.heartbeat);
            if !data.feature_negotiation {
                return Ok(Some(OK.to_vec()));
            }
            let reply = IdentifyResponse {
                max_rdy_count: config.max_rdy_count,
                version: config.version.clone(),
                max_msg_timeout: config.max_msg_timeout.as_millis() as u64,
                msg_timeout: client.msg_timeout.as_millis() as u64,
                tls_v1: false,
                deflate: false,
                deflate_level: 6,
                max_deflate_level: 6,
                snappy: false,
                sample_rate: client.sample_rate,
                auth_required: false,
                output_buffer_size: client.output_buffer_size,
                output_buffer_timeout: client.output_buffer_timeout.as_millis() as i64,
            };
            Ok(Some(serde_json::to_vec(&reply).expect("serialisable")))
        }
        b"SUB" => {
            if client.state != State::Init {
                return Err(fatal("E_INVALID", "cannot SUB in current state"));
            }
            if client.heartbeat.is_zero() {
                return Err(fatal("E_INVALID", "cannot SUB with heartbeats disabled"));
            }
            if params.len() < 3 {
                return Err(fatal("E_INVALID", "SUB insufficient number of parameters"));
            }
            let topic = String::from_utf8_lossy(&params[1]).into_owned();
            if !codec::is_valid_name(&topic) {
                return Err(fatal(
                    "E_BAD_TOPIC",
                    format!("SUB topic name {} is not valid", quote(&params[1])),
                ));
            }
            let channel = String::from_utf8_lossy(&params[2]).into_owned();
            if !codec::is_valid_name(&channel) {
                return Err(fatal(
                    "E_BAD_CHANNEL",
                    format!("SUB channel name {} is not valid", quote(&params[2])),
                ));
            }
            shared.with(|b| b.subscribe(client.id, &topic, &channel));
            client.state = State::Subscribed;
            Ok(Some(OK.to_vec()))
        }
        b"RDY" => {
            if client.state == State::Closing {
                return Ok(None);
            }
            if client.state != State::Subscribed {
                return Err(fatal("E_INVALID", "cannot RDY in current state"));
            }
            let count = match params.get(1) {
                Some(p) => base10(p).ok_or_else(|| {
                    fatal(
                        "E_INVALID",
                        format!("RDY could not parse count {}", String::from_utf8_lossy(p)),
                    )
                })? as i64,
                None => 1,
            };
            if count < 0 || count as u64 > config.max_rdy_count {
                return Err(fatal(
                    "E_INVALID",
                    format!("RDY count {count} out of range 0-{}", config.max_rdy_count),
                ));
            }
            shared.with(|b| {
                if let Some(info) = b.clients.get_mut(&client.id) {
                    info.rdy = count as u64;
                    info.wake.notify_one();
                }
            });
            Ok(None)
        }
        b"FIN" => {
            if !in_sub {
                return Err(fatal("E_INVALID", "cannot FIN in current state"));
            }
            if params.len() < 2 {
                return Err(fatal("E_INVALID", "FIN insufficient number of params"));
            }
            let id = message_id(&params[1])?;
            shared
                .with(|b| b.finish(client.id, &id))
                .map_err(|e| non_fatal("E_FIN_FAILED", format!("FIN {id} failed {}", e.text())))?;
            Ok(None)
        }
        b"REQ" => {
            if !in_sub {
                return Err(fatal("E_INVALID", "cannot REQ in current state"));
            }
            if params.len() < 3 {
                return Err(fatal("E_INVALID", "REQ insufficient number of params"));
            }
            let id = message_id(&params[1])?;
            let ms = base10(&params[2]).ok_or_else(|| {
                fatal(
                    "E_INVALID",
                    format!(
                        "REQ could not parse timeout {}",
                        String::from_utf8_lossy(&params[2])
                    ),
                )
            })?;
            let delay = Duration::from_millis(ms).min(config.max_req_timeout);
            shared
                .with(|b| b.requeue(client.id, &id, delay))
                .map_err(|e| non_fatal("E_REQ_FAILED", format!("REQ {id} failed {}", e.text())))?;
            Ok(None)
        }
        b"TOUCH" => {
            if !in_sub {
                return Err(fatal("E_INVALID", "cannot TOUCH in current state"));
            }
            if params.len() < 2 {
                return Err(fatal("E_INVALID", "TOUCH insufficient number of params"));
            }
            let id = message_id(&params[1])?;
            shared
                .with(|b| b.touch(client.id, &id, config.max_msg_timeout))
                .map_err(|e| {
                    non_fatal("E_TOUCH_FAILED", format!("TOUCH {id} failed {}", e.text()))
                })?;
            Ok(None)
        }
        b"CLS" => {
            if client.state != State::Subscribed {
                return Err(fatal("E_INVALID", "cannot CLS in current state"));
            }
            client.state = State::Closing;
            shared.with(|b| {
                if let Some(info) = b.clients.get_mut(&client.id) {
                    info.rdy = 0;
                    info.closing = true;
                }
            });
            Ok(Some(CLOSE_WAIT.to_vec()))
        }
        b"NOP" => Ok(None),
        b"PUB" | b"DPUB" => {
            let name = String::from_utf8_lossy(cmd).into_owned();
            let dpub = cmd == b"DPUB";
            if params.len() < if dpub { 3 } else { 2 } {
                return Err(fatal(
                    "E_INVALID",
                    format!("{name} insufficient number of parameters"),
                ));
            }
            let topic = String::from_utf8_lossy(&params[1]).into_owned();
            if !codec::is_valid_name(&topic) {
                return Err(fatal(
                    "E_BAD_TOPIC",
                    format!("{name} topic name {} is not valid", quote(&params[1])),
                ));
            }
            let mut defer = Duration::ZERO;
            if dpub {
                let ms = base10(&params[2]).ok_or_else(|| {
                    fatal(
                        "E_INVALID",
                        format!(
                            "DPUB could not parse timeout {}",
                            String::from_utf8_lossy(&params[2])
                        ),
                    )
                })?;
                let max = config.max_req_timeout.as_millis() as u64;
                if ms > max {
                    return Err(fatal(
                        "E_INVALID",
                        format!("DPUB timeout {ms} out of range 0-{max}"),
                    ));
                }
                defer = Duration::from_millis(ms);
            }
            let len = read_len(r, deadline).await.ok_or_else(|| {
                fatal(
                    "E_BAD_MESSAGE",
                    format!("{name} failed to read message body size"),
                )
            })?;
            if len <= 0 {
                return Err(fatal(
                    "E_BAD_MESSAGE",
                    format!("{name} invalid message body size {len}"),
                ));
            }
            if len as usize > config.max_msg_size {
                return Err(fatal(
                    "E_BAD_MESSAGE",
                    format!("{name} message too big {len} > {}", config.max_msg_size),
                ));
            }
            let body = read_exact_by(r, len as usize, deadline)
                .await
                .ok_or_else(|| {
                    fatal(
                        "E_BAD_MESSAGE",
                        format!("{name} failed to read message body"),
                    )
                })?;
            shared.with(|b| b.publish(&topic, vec![Bytes::from(body)], defer));
            Ok(Some(OK.to_vec()))
        }
        b"MPUB" => {
            if params.len() < 2 {
                return Err(fatal("E_INVALID", "MPUB insufficient number of parameters"));
            }
            let topic = String::from_utf8_lossy(&params[1]).into_owned();
            if !codec::is_valid_name(&topic) {
                // nsqd v1.3.0 really repeats the code here (publish.json: mpub_bad_topic).
                return Err(fatal(
                    "E_BAD_TOPIC",
                    format!(
                        "E_BAD_TOPIC MPUB topic name {} is not valid",
                        quote(&params[1])
                    ),
                ));
            }
            let len = read_len(r, deadline)
                .await
                .ok_or_else(|| fatal("E_BAD_BODY", "MPUB failed to read body size"))?;
            if len <= 0 {
                return Err(fatal("E_BAD_BODY", format!("MPUB invalid body size {len}")));
            }
            if len as usize > config.max_body_size {
                return Err(fatal(
                    "E_BAD_BODY",
                    format!("MPUB body too big {len} > {}", config.max_body_size),
                ));
            }
            let count = read_len(r, deadline)
                .await
                .ok_or_else(|| fatal("E_BAD_BODY", "MPUB failed to read message count"))?;
            let max_messages = (config.max_body_size as i64 - 4) / 5;
            if count <= 0 || count as i64 > max_messages {
                return Err(fatal(
                    "E_BAD_BODY",
                    format!("MPUB invalid message count {count}"),
                ));
            }
            let mut bodies = Vec::with_capacity(count as usize);
            for i in 0..count {
                let size = read_len(r, deadline).await.ok_or_else(|| {
                    fatal(
                        "E_BAD_MESSAGE",
                        format!("MPUB failed to read message({i}) body size"),
                    )
                })?;
                if size <= 0 {
                    return Err(fatal(
                        "E_BAD_MESSAGE",
                        format!("MPUB invalid message({i}) body size {size}"),
                    ));
                }
                if size as usize > config.max_msg_size {
                    return Err(fatal(
                        "E_BAD_MESSAGE",
                        format!("MPUB message too big {size} > {}", config.max_msg_size),
                    ));
                }
                let body = read_exact_by(r, size as usize, deadline)
                    .await
                    .ok_or_else(|| fatal("E_BAD_MESSAGE", "MPUB failed to read message body"))?;
                bodies.push(Bytes::from(body));
            }
            shared.with(|b| b.publish(&topic, bodies, Duration::ZERO));
            Ok(Some(OK.to_vec()))
        }
        b"AUTH" => {
            if client.state != State::Init {
                return Err(fatal("E_INVALID", "cannot AUTH in current state"));
            }
            if params.len() != 1 {
                return Err(fatal("E_INVALID", "AUTH invalid number of parameters"));
            }
            let len = read_len(r, deadline)
                .await
                .ok_or_else(|| fatal("E_BAD_BODY", "AUTH failed to read body size"))?;
            if len <= 0 {
                return Err(fatal("E_BAD_BODY", format!("AUTH invalid body size {len}")));
            }
            read_exact_by(r, len as usize, deadline)
                .await
                .ok_or_else(|| fatal("E_BAD_BODY", "AUTH failed to read body"))?;
            Err(fatal("E_AUTH_DISABLED", "AUTH disabled"))
        }
        other => Err(fatal(
            "E_INVALID",
            format!("invalid command {}", String::from_utf8_lossy(other)),
        )),
    }
}

/// nsqd's `clientV2.Identify`: validates and applies the settings, in nsqd's order.
fn identify(client: &mut Client, d: &IdentifyIn, config: &DoubleConfig) -> Result<(), ClientErr> {
    let bad = |what: String| fatal("E_BAD_BODY", format!("IDENTIFY {what}"));
    let max_hb = config.max_heartbeat_interval.as_millis() as i64;
    match d.heartbeat_interval {
        -1 => client.heartbeat = Duration::ZERO,
        0 => {}
        ms if (1000..=max_hb).contains(&ms) => client.heartbeat = Duration::from_millis(ms as u64),
        ms => return Err(bad(format!("heartbeat interval ({ms}) is invalid"))),
    }
    match d.output_buffer_timeout {
        -1 => client.output_buffer_timeout = Duration::ZERO,
        0 => {}
        ms if (25..=30_000).contains(&ms) => {
            client.output_buffer_timeout = Duration::from_millis(ms as u64)
        }
        ms => return Err(bad(format!("output buffer timeout ({ms}) is invalid"))),
    }
    match d.output_buffer_size {
        -1 => {
            client.output_buffer_size = 1;
            client.output_buffer_timeout = Duration::ZERO;
        }
        0 => {}
        n if (64..=65_536).contains(&n) => client.output_buffer_size = n,
        n => return Err(bad(format!("output buffer size ({n}) is invalid"))),
    }
    if !(0..=99).contains(&d.sample_rate) {
        return Err(bad(format!("sample rate ({}) is invalid", d.sample_rate)));
    }
    client.sample_rate = d.sample_rate;
    let max_mt = config.max_msg_timeout.as_millis() as i64;
    match d.msg_timeout {
        0 => {}
        ms if (1000..=max_mt).contains(&ms) => {
            client.msg_timeout = Duration::from_millis(ms as u64)
        }
        ms => return Err(bad(format!("msg timeout ({ms}) is invalid"))),
    }
    Ok(())
}
