//! The NSQ TCP protocol (V2) as bytes: the commands we send, the frames nsqd sends back,
//! and a tokio-util [`Decoder`]/[`Encoder`] over `BytesMut`. No I/O here.
//!
//! Client -> server: the 4-byte magic [`MAGIC_V2`] once, then command lines. Commands with a
//! body (IDENTIFY, PUB, DPUB, MPUB) add a 4-byte big-endian size and the body:
//!
//! ```text
//!  "PUB <topic>\n" | size (u32 BE) | body
//!  "MPUB <topic>\n" | size (u32 BE) | count (u32 BE) | { len (u32 BE) | bytes } x count
//! ```
//!
//! Server -> client frames (size counts the type and the data):
//!
//! ```text
//!  0        4        8
//!  +--------+--------+-----------------------------------------------+
//!  | size   | type   | data (size - 4 bytes)                         |
//!  +--------+--------+-----------------------------------------------+
//!  type 0 response ("OK", "_heartbeat_", "CLOSE_WAIT", IDENTIFY JSON)
//!  type 1 error    ("<CODE> <description>")
//!  type 2 message: timestamp ns (i64 BE) | attempts (u16 BE) | id (16 bytes) | body
//! ```
//!
//! The decoder checks the announced size against the maximum before buffering a byte of the
//! frame, reserves exactly what the frame needs, and hands out zero-copy [`Bytes`]. "Need more
//! bytes" is `Ok(None)`. Byte-for-byte agreement with a real nsqd v1.3.0 is tested against the
//! captures in `../shared/nsq-transcripts/` (`tests/transcripts.rs`).

use std::fmt;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio_util::codec::{Decoder, Encoder};

/// The protocol magic a client writes first (`"  V2"`, no newline, no reply).
pub const MAGIC_V2: &[u8; 4] = b"  V2";

/// Frame type of a response (`OK`, `_heartbeat_`, `CLOSE_WAIT`, IDENTIFY JSON).
pub const FRAME_TYPE_RESPONSE: u32 = 0;
/// Frame type of an error (`E_* description`).
pub const FRAME_TYPE_ERROR: u32 = 1;
/// Frame type of a message.
pub const FRAME_TYPE_MESSAGE: u32 = 2;

/// Length of an NSQ message id (16 ASCII hex characters as nsqd makes them).
pub const MESSAGE_ID_LEN: usize = 16;
/// Bytes of a message frame's data before the body: timestamp, attempts, id.
pub const MESSAGE_HEADER_LEN: usize = 8 + 2 + MESSAGE_ID_LEN;

/// nsqd's default `--max-msg-size` (1 MiB): the largest single message body.
pub const DEFAULT_MAX_MSG_SIZE: usize = 1024 * 1024;
/// nsqd's default `--max-body-size` (5 MiB): the largest MPUB body.
pub const DEFAULT_MAX_BODY_SIZE: usize = 5 * 1024 * 1024;

/// The response data of a heartbeat.
pub const HEARTBEAT: &[u8] = b"_heartbeat_";
/// The response data of a successful command.
pub const OK: &[u8] = b"OK";
/// The response data of `CLS`.
pub const CLOSE_WAIT: &[u8] = b"CLOSE_WAIT";

/// What can go wrong encoding or decoding NSQ bytes.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// A frame announced more bytes than the configured maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    FrameTooLarge {
        /// The announced size.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// A frame's size field is below the 4 bytes of its type.
    #[error("frame size {0} is below the minimum of 4")]
    FrameTooSmall(usize),
    /// A frame type other than 0, 1, 2.
    #[error("unknown frame type {0}")]
    UnknownFrameType(u32),
    /// A message frame shorter than its 26-byte header.
    #[error("message frame of {0} bytes is shorter than its header")]
    ShortMessage(usize),
    /// A topic or channel name nsqd would reject.
    #[error("invalid topic or channel name {0:?}")]
    BadName(String),
    /// PUB/DPUB with an empty body, or MPUB with an empty message or no message.
    #[error("empty message body")]
    EmptyBody,
    /// A body too large for the 4-byte size field.
    #[error("body of {0} bytes does not fit a 4-byte size")]
    BodyTooLarge(usize),
    /// The transport failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A 16-byte NSQ message id, as nsqd sends it (ASCII hex).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub [u8; MESSAGE_ID_LEN]);

impl MessageId {
    /// The raw 16 bytes.
    pub fn as_bytes(&self) -> &[u8; MESSAGE_ID_LEN] {
        &self.0
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in &self.0 {
            if b.is_ascii_graphic() {
                write!(f, "{}", b as char)?;
            } else {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

/// Checks a topic or channel name the way nsqd does: 1 to 64 characters of
/// `[.a-zA-Z0-9_-]`, optionally ending in `#ephemeral`.
pub fn is_valid_name(name: &str) -> bool {
    if name.is_empty() || name.len() > 64 {
        return false;
    }
    let stem = name.strip_suffix("#ephemeral").unwrap_or(name);
    !stem.is_empty()
        && stem
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

fn check_name(name: &str) -> Result<(), CodecError> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(CodecError::BadName(name.to_owned()))
    }
}

/// The IDENTIFY body we send. Field order is the order of the captured client, so the
/// encoded JSON of the same values is byte-identical; `None` fields are left out (nsqd
/// then keeps its default).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Identify {
    /// Free-form client id shown in nsqd's stats.
    pub client_id: String,
    /// Host name shown in nsqd's stats.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub hostname: Option<String>,
    /// `name/version` of the client library.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub user_agent: Option<String>,
    /// Always true from our client: nsqd then answers with its settings as JSON.
    pub feature_negotiation: bool,
    /// Milliseconds between heartbeats (nsqd accepts -1, 0, or 1000..=max-heartbeat-interval);
    /// nsqd drops a connection that sends nothing for twice this.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub heartbeat_interval: Option<i64>,
    /// Milliseconds nsqd may buffer messages before flushing.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub output_buffer_timeout: Option<i64>,
    /// Milliseconds a delivered message may stay un-FINed before nsqd redelivers it.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub msg_timeout: Option<i64>,
}

/// nsqd's reply to IDENTIFY with `feature_negotiation: true` (the fields of v1.3.0, in its order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentifyResponse {
    /// Highest RDY count nsqd accepts (`--max-rdy-count`).
    pub max_rdy_count: u64,
    /// nsqd's version.
    pub version: String,
    /// Longest msg timeout TOUCH can stretch a message to, in ms (`--max-msg-timeout`).
    pub max_msg_timeout: u64,
    /// This connection's msg timeout in ms (ours if we asked, else `--msg-timeout`).
    pub msg_timeout: u64,
    /// TLS negotiated.
    pub tls_v1: bool,
    /// Deflate negotiated.
    pub deflate: bool,
    /// Deflate level.
    pub deflate_level: i64,
    /// Highest deflate level.
    pub max_deflate_level: i64,
    /// Snappy negotiated.
    pub snappy: bool,
    /// Sample rate (0 = every message).
    pub sample_rate: i64,
    /// AUTH required before SUB/PUB.
    pub auth_required: bool,
    /// nsqd's output buffer size for this connection.
    pub output_buffer_size: i64,
    /// nsqd's output buffer timeout for this connection, in ms.
    pub output_buffer_timeout: i64,
}

/// A command we send to nsqd. Names are validated on encode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `IDENTIFY` with a JSON body.
    Identify(Identify),
    /// `SUB <topic> <channel>`.
    Sub {
        /// Topic name.
        topic: String,
        /// Channel name.
        channel: String,
    },
    /// `RDY <count>`: at most `count` messages in flight on this connection.
    Rdy(u64),
    /// `FIN <id>`: the message is done.
    Fin(MessageId),
    /// `REQ <id> <timeout_ms>`: redeliver after the timeout (0 = at once).
    Req(MessageId, u64),
    /// `TOUCH <id>`: restart the message's msg timeout.
    Touch(MessageId),
    /// `NOP`: the answer to a heartbeat.
    Nop,
    /// `CLS`: stop sending messages (nsqd answers `CLOSE_WAIT`).
    Cls,
    /// `PUB <topic>` + body.
    Pub {
        /// Topic name.
        topic: String,
        /// The message body (not empty).
        body: Bytes,
    },
    /// `MPUB <topic>` + count + bodies.
    Mpub {
        /// Topic name.
        topic: String,
        /// The message bodies (at least one, none empty).
        bodies: Vec<Bytes>,
    },
    /// `DPUB <topic> <delay_ms>` + body.
    Dpub {
        /// Topic name.
        topic: String,
        /// Delay before delivery, in ms.
        delay_ms: u64,
        /// The message body (not empty).
        body: Bytes,
    },
}

fn body_len(len: usize) -> Result<u32, CodecError> {
    u32::try_from(len).map_err(|_| CodecError::BodyTooLarge(len))
}

/// The MPUB body size for `bodies`: count, then a size and the bytes of each.
pub fn mpub_body_len<B: AsRef<[u8]>>(bodies: &[B]) -> usize {
    4 + bodies.iter().map(|b| 4 + b.as_ref().len()).sum::<usize>()
}

impl Command {
    /// Appends this command's exact bytes to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), CodecError> {
        match self {
            Command::Identify(identify) => {
                let json = serde_json::to_vec(identify).map_err(std::io::Error::other)?;
                let len = body_len(json.len())?;
                dst.reserve(9 + 4 + json.len());
                dst.put_slice(b"IDENTIFY\n");
                dst.put_u32(len);
                dst.put_slice(&json);
            }
            Command::Sub { topic, channel } => {
                check_name(topic)?;
                check_name(channel)?;
                line(dst, &[b"SUB", topic.as_bytes(), channel.as_bytes()]);
            }
            Command::Rdy(n) => line(dst, &[b"RDY", n.to_string().as_bytes()]),
            Command::Fin(id) => line(dst, &[b"FIN", id.as_bytes()]),
            Command::Req(id, ms) => line(dst, &[b"REQ", id.as_bytes(), ms.to_string().as_bytes()]),
            Command::Touch(id) => line(dst, &[b"TOUCH", id.as_bytes()]),
            Command::Nop => dst.put_slice(b"NOP\n"),
            Command::Cls => dst.put_slice(b"CLS\n"),
            Command::Pub { topic, body } => {
                check_name(topic)?;
                if body.is_empty() {
                    return Err(CodecError::EmptyBody);
                }
                let len = body_len(body.len())?;
                line(dst, &[b"PUB", topic.as_bytes()]);
                dst.reserve(4 + body.len());
                dst.put_u32(len);
                dst.put_slice(body);
            }
            Command::Dpub {
                topic,
                delay_ms,
                body,
            } => {
                check_name(topic)?;
                if body.is_empty() {
                    return Err(CodecError::EmptyBody);
                }
                let len = body_len(body.len())?;
                line(
                    dst,
                    &[b"DPUB", topic.as_bytes(), delay_ms.to_string().as_bytes()],
                );
                dst.reserve(4 + body.len());
                dst.put_u32(len);
                dst.put_slice(body);
            }
            Command::Mpub { topic, bodies } => encode_mpub(topic, bodies, dst)?,
        }
        Ok(())
    }
}

/// Appends `MPUB <topic>` and its body for `bodies` to `dst` (used by the producer without
/// building a [`Command`]).
pub fn encode_mpub<B: AsRef<[u8]>>(
    topic: &str,
    bodies: &[B],
    dst: &mut BytesMut,
) -> Result<(), CodecError> {
    check_name(topic)?;
    if bodies.is_empty() || bodies.iter().any(|b| b.as_ref().is_empty()) {
        return Err(CodecError::EmptyBody);
    }
    let total = mpub_body_len(bodies);
    let len = body_len(total)?;
    let count = body_len(bodies.len())?;
    line(dst, &[b"MPUB", topic.as_bytes()]);
    dst.reserve(4 + total);
    dst.put_u32(len);
    dst.put_u32(count);
    for body in bodies {
        let body = body.as_ref();
        dst.put_u32(body.len() as u32);
        dst.put_slice(body);
    }
    Ok(())
}

fn line(dst: &mut BytesMut, parts: &[&[u8]]) {
    let len = parts.iter().map(|p| p.len() + 1).sum::<usize>();
    dst.reserve(len);
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            dst.put_u8(b' ');
        }
        dst.put_slice(part);
    }
    dst.put_u8(b'\n');
}

/// A message frame's data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// When nsqd accepted the message (Unix time, ns); not the delivery time.
    pub timestamp_ns: i64,
    /// Deliveries so far, this one included (1 on the first delivery).
    pub attempts: u16,
    /// The id to FIN/REQ/TOUCH.
    pub id: MessageId,
    /// The body as published.
    pub body: Bytes,
}

/// An error frame's text: `<CODE> <description>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError(pub Bytes);

impl ServerError {
    /// The code (`E_INVALID`, `E_BAD_TOPIC`, ...): the text up to the first space.
    pub fn code(&self) -> &str {
        let text = std::str::from_utf8(&self.0).unwrap_or("");
        text.split(' ').next().unwrap_or("")
    }

    /// The whole text, lossily decoded.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }

    /// Whether nsqd closes the connection after this error. Only `E_FIN_FAILED`,
    /// `E_REQ_FAILED` and `E_TOUCH_FAILED` leave it open (errors.json).
    pub fn is_fatal(&self) -> bool {
        !matches!(
            self.code(),
            "E_FIN_FAILED" | "E_REQ_FAILED" | "E_TOUCH_FAILED"
        )
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

/// A frame from nsqd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Type 0.
    Response(Bytes),
    /// Type 1.
    Error(ServerError),
    /// Type 2.
    Message(Message),
}

impl Frame {
    /// Whether this is the `_heartbeat_` response.
    pub fn is_heartbeat(&self) -> bool {
        matches!(self, Frame::Response(data) if data.as_ref() == HEARTBEAT)
    }

    /// Appends this frame's exact bytes (size, type, data) to `dst`: what nsqd writes.
    pub fn encode(&self, dst: &mut BytesMut) {
        match self {
            Frame::Response(data) => encode_frame(FRAME_TYPE_RESPONSE, data, dst),
            Frame::Error(err) => encode_frame(FRAME_TYPE_ERROR, &err.0, dst),
            Frame::Message(msg) => {
                let size = 4 + MESSAGE_HEADER_LEN + msg.body.len();
                dst.reserve(4 + size);
                dst.put_u32(size as u32);
                dst.put_u32(FRAME_TYPE_MESSAGE);
                dst.put_i64(msg.timestamp_ns);
                dst.put_u16(msg.attempts);
                dst.put_slice(msg.id.as_bytes());
                dst.put_slice(&msg.body);
            }
        }
    }
}

/// Appends a frame of `frame_type` with `data` to `dst`.
pub fn encode_frame(frame_type: u32, data: &[u8], dst: &mut BytesMut) {
    dst.reserve(8 + data.len());
    dst.put_u32(4 + data.len() as u32);
    dst.put_u32(frame_type);
    dst.put_slice(data);
}

/// The client side codec: decodes [`Frame`]s, encodes [`Command`]s.
#[derive(Debug, Clone, Copy)]
pub struct NsqCodec {
    max_frame_size: usize,
}

impl Default for NsqCodec {
    fn default() -> Self {
        NsqCodec::for_max_msg_size(DEFAULT_MAX_MSG_SIZE)
    }
}

impl NsqCodec {
    /// A codec accepting frames whose size field is at most `max_frame_size`.
    pub fn new(max_frame_size: usize) -> Self {
        NsqCodec { max_frame_size }
    }

    /// A codec sized for messages of up to `max_msg_size` body bytes (nsqd's
    /// `--max-msg-size`; IDENTIFY does not report it, so it is configured).
    pub fn for_max_msg_size(max_msg_size: usize) -> Self {
        NsqCodec::new(max_msg_size.max(1024) + 4 + MESSAGE_HEADER_LEN)
    }

    /// The largest accepted size field.
    pub fn max_frame_size(&self) -> usize {
        self.max_frame_size
    }
}

/// Grows `src` to hold `needed` bytes without the doubling `reserve` may do: a peer
/// announcing a size makes us allocate that size, never more.
fn reserve_exact(src: &mut BytesMut, needed: usize) {
    if src.capacity() >= needed {
        return;
    }
    let mut grown = BytesMut::with_capacity(needed);
    grown.extend_from_slice(src);
    *src = grown;
}

impl Decoder for NsqCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        if src.len() < 4 {
            return Ok(None);
        }
        let size = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if size > self.max_frame_size {
            return Err(CodecError::FrameTooLarge {
                len: size,
                max: self.max_frame_size,
            });
        }
        if size < 4 {
            return Err(CodecError::FrameTooSmall(size));
        }
        let frame_type = if src.len() >= 8 {
            u32::from_be_bytes([src[4], src[5], src[6], src[7]])
        } else {
            reserve_exact(src, 4 + size);
            return Ok(None);
        };
        match frame_type {
            FRAME_TYPE_RESPONSE | FRAME_TYPE_ERROR => {}
            FRAME_TYPE_MESSAGE if size - 4 < MESSAGE_HEADER_LEN => {
                return Err(CodecError::ShortMessage(size - 4));
            }
            FRAME_TYPE_MESSAGE => {}
            other => return Err(CodecError::UnknownFrameType(other)),
        }
        if src.len() < 4 + size {
            reserve_exact(src, 4 + size);
            return Ok(None);
        }
        src.advance(8);
        let mut data = src.split_to(size - 4).freeze();
        Ok(Some(match frame_type {
            FRAME_TYPE_RESPONSE => Frame::Response(data),
            FRAME_TYPE_ERROR => Frame::Error(ServerError(data)),
            _ => {
                let timestamp_ns = data.get_i64();
                let attempts = data.get_u16();
                let mut id = [0u8; MESSAGE_ID_LEN];
                data.copy_to_slice(&mut id);
                Frame::Message(Message {
                    timestamp_ns,
                    attempts,
                    id: MessageId(id),
                    body: data,
                })
            }
        }))
    }
}

impl Encoder<Command> for NsqCodec {
    type Error = CodecError;

    fn encode(&mut self, cmd: Command, dst: &mut BytesMut) -> Result<(), CodecError> {
        cmd.encode(dst)
    }
}

impl Encoder<&Command> for NsqCodec {
    type Error = CodecError;

    fn encode(&mut self, cmd: &Command, dst: &mut BytesMut) -> Result<(), CodecError> {
        cmd.encode(dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(
        codec: &mut NsqCodec,
        bytes: &[u8],
        chunk: usize,
    ) -> Result<Vec<Frame>, CodecError> {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in bytes.chunks(chunk.max(1)) {
            buf.extend_from_slice(piece);
            while let Some(frame) = codec.decode(&mut buf)? {
                out.push(frame);
            }
        }
        Ok(out)
    }

    #[test]
    fn rejects_oversized_frame_before_buffering() {
        let mut codec = NsqCodec::new(100);
        let mut buf = BytesMut::from(&[0u8, 0, 0, 101][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(CodecError::FrameTooLarge { len: 101, max: 100 })
        ));
        assert!(buf.capacity() < 101);
    }

    #[test]
    fn rejects_bad_frames() {
        let mut codec = NsqCodec::new(100);
        let mut buf = BytesMut::from(&[0u8, 0, 0, 3][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(CodecError::FrameTooSmall(3))
        ));
        let mut buf = BytesMut::from(&[0u8, 0, 0, 4, 0, 0, 0, 9][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(CodecError::UnknownFrameType(9))
        ));
        let mut buf = BytesMut::from(&[0u8, 0, 0, 5, 0, 0, 0, 2, 1][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(CodecError::ShortMessage(1))
        ));
    }

    #[test]
    fn names() {
        assert!(is_valid_name("ferry.node.1"));
        assert!(is_valid_name("ch#ephemeral"));
        assert!(!is_valid_name("bad!topic"));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name("#ephemeral"));
        assert!(!is_valid_name(&"a".repeat(65)));
        let err = Command::Pub {
            topic: "bad!topic".into(),
            body: Bytes::from_static(b"x"),
        }
        .encode(&mut BytesMut::new());
        assert!(matches!(err, Err(CodecError::BadName(_))));
    }

    #[test]
    fn refuses_empty_bodies() {
        let mut dst = BytesMut::new();
        let empty = Command::Pub {
            topic: "t".into(),
            body: Bytes::new(),
        };
        assert!(matches!(empty.encode(&mut dst), Err(CodecError::EmptyBody)));
        let none: Vec<Bytes> = vec![];
        assert!(matches!(
            encode_mpub("t", &none, &mut dst),
            Err(CodecError::EmptyBody)
        ));
        assert!(dst.is_empty());
    }

    fn frame_strategy() -> impl Strategy<Value = Frame> {
        let data = proptest::collection::vec(any::<u8>(), 0..64).prop_map(Bytes::from);
        prop_oneof![
            data.clone().prop_map(Frame::Response),
            data.clone().prop_map(|d| Frame::Error(ServerError(d))),
            (any::<i64>(), any::<u16>(), any::<[u8; 16]>(), data).prop_map(|(t, a, id, body)| {
                Frame::Message(Message {
                    timestamp_ns: t,
                    attempts: a,
                    id: MessageId(id),
                    body,
                })
            }),
        ]
    }

    proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512), chunk in 1usize..64, max in 0usize..300) {
            let mut codec = NsqCodec::new(max);
            let _ = decode_all(&mut codec, &bytes, chunk);
        }

        #[test]
        fn frames_round_trip(frames in proptest::collection::vec(frame_strategy(), 0..8), chunk in 1usize..40) {
            let mut bytes = BytesMut::new();
            for f in &frames {
                f.encode(&mut bytes);
            }
            let mut codec = NsqCodec::new(1024);
            let decoded = decode_all(&mut codec, &bytes, chunk).unwrap();
            prop_assert_eq!(decoded, frames);
        }

        #[test]
        fn mpub_layout(bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..20), 1..6)) {
            let mut dst = BytesMut::new();
            encode_mpub("t", &bodies, &mut dst).unwrap();
            prop_assert!(dst.starts_with(b"MPUB t\n"));
            let mut rest = dst.split_off(7);
            let size = rest.get_u32() as usize;
            prop_assert_eq!(size, rest.len());
            prop_assert_eq!(rest.get_u32() as usize, bodies.len());
            for b in &bodies {
                let n = rest.get_u32() as usize;
                prop_assert_eq!(&rest.split_to(n)[..], &b[..]);
            }
            prop_assert!(rest.is_empty());
        }
    }
}
