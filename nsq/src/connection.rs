//! One TCP connection to one nsqd: the handshake (magic, IDENTIFY with feature negotiation),
//! command writes batched into one flush, frame reads that answer `_heartbeat_` with `NOP`,
//! typed errors (a fatal `E_*` frame, the server's close), and the reconnect back-off that the
//! producer and consumer share.
//!
//! nsqd drops a connection that sends nothing for 2 x its heartbeat interval, without an error
//! frame (`heartbeat-timeout.json`); answering every heartbeat keeps an idle connection alive.

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures::{Sink, StreamExt};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;
use tracing::{debug, trace};

use crate::codec::{
    CodecError, Command, DEFAULT_MAX_MSG_SIZE, Frame, Identify, IdentifyResponse, MAGIC_V2,
    Message, NsqCodec, OK, ServerError,
};

/// Settings of one connection: what we tell nsqd in IDENTIFY and our own limits.
#[derive(Debug, Clone)]
pub struct ConnectionConfig {
    /// `client_id` in IDENTIFY (shown in nsqd's stats).
    pub client_id: String,
    /// `hostname` in IDENTIFY.
    pub hostname: Option<String>,
    /// Heartbeat interval asked of nsqd (it accepts 1 s to `--max-heartbeat-interval`, 60 s
    /// by default). nsqd closes the connection after 2 intervals of silence from us.
    pub heartbeat_interval: Duration,
    /// Message timeout asked of nsqd (None: nsqd's `--msg-timeout`, 60 s by default): how long
    /// a delivered message may stay un-FINed before nsqd redelivers it.
    pub msg_timeout: Option<Duration>,
    /// nsqd's `--max-msg-size`. IDENTIFY does not report it, so it is configured; it bounds
    /// both what the producer sends and the frames the decoder accepts.
    pub max_msg_size: usize,
    /// Time allowed for TCP connect plus the IDENTIFY exchange.
    pub connect_timeout: Duration,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        ConnectionConfig {
            client_id: "ferry".into(),
            hostname: None,
            heartbeat_interval: Duration::from_secs(30),
            msg_timeout: None,
            max_msg_size: DEFAULT_MAX_MSG_SIZE,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

impl ConnectionConfig {
    /// The IDENTIFY body for this configuration.
    pub fn identify(&self) -> Identify {
        Identify {
            client_id: self.client_id.clone(),
            hostname: self.hostname.clone(),
            user_agent: Some(concat!("ferry-nsq/", env!("CARGO_PKG_VERSION")).into()),
            feature_negotiation: true,
            heartbeat_interval: Some(self.heartbeat_interval.as_millis() as i64),
            output_buffer_timeout: None,
            msg_timeout: self.msg_timeout.map(|d| d.as_millis() as i64),
        }
    }
}

/// What can end or fail a connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// Bytes that are not NSQ, or a frame over the maximum.
    #[error("codec: {0}")]
    Codec(#[from] CodecError),
    /// nsqd sent a fatal error frame (it closes the connection next).
    #[error("nsqd error: {0}")]
    Server(ServerError),
    /// nsqd closed the connection (TCP FIN): e.g. after 2 missed heartbeats.
    #[error("nsqd closed the connection")]
    Closed,
    /// Connect or handshake took longer than `connect_timeout`.
    #[error("timed out {0}")]
    Timeout(&'static str),
    /// nsqd answered something the protocol does not allow here.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

impl From<std::io::Error> for ConnectionError {
    fn from(e: std::io::Error) -> Self {
        ConnectionError::Codec(CodecError::Io(e))
    }
}

/// A frame, after heartbeats and fatal errors have been dealt with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A type 0 response other than `_heartbeat_` (`OK`, `CLOSE_WAIT`, ...).
    Response(Bytes),
    /// A delivered message.
    Message(Message),
    /// A non-fatal error (`E_FIN_FAILED`, `E_REQ_FAILED`, `E_TOUCH_FAILED`).
    Error(ServerError),
}

/// One connection to one nsqd, after the handshake.
#[derive(Debug)]
pub struct Connection {
    framed: Framed<TcpStream, NsqCodec>,
    addr: SocketAddr,
    settings: IdentifyResponse,
    heartbeats: u64,
}

impl Connection {
    /// Connects to `addr`, writes the magic and IDENTIFY, and reads nsqd's settings.
    pub async fn connect(addr: &str, config: &ConnectionConfig) -> Result<Self, ConnectionError> {
        tokio::time::timeout(config.connect_timeout, Self::handshake(addr, config))
            .await
            .map_err(|_| ConnectionError::Timeout("connecting and identifying"))?
    }

    async fn handshake(addr: &str, config: &ConnectionConfig) -> Result<Self, ConnectionError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let peer = stream.peer_addr()?;
        let mut framed = Framed::new(stream, NsqCodec::for_max_msg_size(config.max_msg_size));
        framed.write_buffer_mut().extend_from_slice(MAGIC_V2);
        Command::Identify(config.identify()).encode(framed.write_buffer_mut())?;
        let mut conn = Connection {
            framed,
            addr: peer,
            settings: IdentifyResponse {
                max_rdy_count: 0,
                version: String::new(),
                max_msg_timeout: 0,
                msg_timeout: 0,
                tls_v1: false,
                deflate: false,
                deflate_level: 0,
                max_deflate_level: 0,
                snappy: false,
                sample_rate: 0,
                auth_required: false,
                output_buffer_size: 0,
                output_buffer_timeout: 0,
            },
            heartbeats: 0,
        };
        conn.flush().await?;
        let reply = conn.expect_response().await?;
        let settings: IdentifyResponse = serde_json::from_slice(&reply).map_err(|e| {
            ConnectionError::Protocol(format!(
                "IDENTIFY reply is not the feature-negotiation JSON ({e}): {:?}",
                String::from_utf8_lossy(&reply)
            ))
        })?;
        if settings.tls_v1 || settings.snappy || settings.deflate || settings.auth_required {
            return Err(ConnectionError::Protocol(format!(
                "nsqd wants TLS/compression/AUTH, which this client does not speak: {settings:?}"
            )));
        }
        debug!(nsqd = %peer, version = %settings.version, max_rdy_count = settings.max_rdy_count,
            msg_timeout = settings.msg_timeout, "nsq connection identified");
        conn.settings = settings;
        Ok(conn)
    }

    /// nsqd's address.
    pub fn peer(&self) -> SocketAddr {
        self.addr
    }

    /// nsqd's IDENTIFY reply (`max_rdy_count`, `msg_timeout`, `max_msg_timeout`, ...).
    pub fn settings(&self) -> &IdentifyResponse {
        &self.settings
    }

    /// Heartbeats answered so far.
    pub fn heartbeats(&self) -> u64 {
        self.heartbeats
    }

    /// Encodes `cmd` into the write buffer; nothing is written until [`Connection::flush`].
    pub fn queue(&mut self, cmd: &Command) -> Result<(), ConnectionError> {
        cmd.encode(self.framed.write_buffer_mut())?;
        Ok(())
    }

    /// Direct access to the write buffer, for encoders that avoid building a [`Command`].
    pub fn write_buffer(&mut self) -> &mut bytes::BytesMut {
        self.framed.write_buffer_mut()
    }

    /// Writes everything queued in one go.
    pub async fn flush(&mut self) -> Result<(), ConnectionError> {
        futures::future::poll_fn(|cx| {
            <Framed<TcpStream, NsqCodec> as Sink<&Command>>::poll_flush(
                Pin::new(&mut self.framed),
                cx,
            )
        })
        .await?;
        Ok(())
    }

    /// Queues and flushes one command.
    pub async fn send(&mut self, cmd: &Command) -> Result<(), ConnectionError> {
        self.queue(cmd)?;
        self.flush().await
    }

    /// Reads the next frame. Cancel-safe (use it in `select!`), then pass the frame to
    /// [`Connection::on_frame`] outside the `select!`.
    pub async fn read_frame(&mut self) -> Result<Frame, ConnectionError> {
        match self.framed.next().await {
            Some(frame) => Ok(frame?),
            None => Err(ConnectionError::Closed),
        }
    }

    /// Handles what every connection handles the same way: a heartbeat is answered with
    /// `NOP` (`Ok(None)`), a fatal error frame ends the connection (`Err`).
    pub async fn on_frame(&mut self, frame: Frame) -> Result<Option<Event>, ConnectionError> {
        match frame {
            f if f.is_heartbeat() => {
                self.heartbeats += 1;
                trace!(nsqd = %self.addr, "heartbeat, answering NOP");
                self.send(&Command::Nop).await?;
                Ok(None)
            }
            Frame::Response(data) => Ok(Some(Event::Response(data))),
            Frame::Message(msg) => Ok(Some(Event::Message(msg))),
            Frame::Error(err) if err.is_fatal() => Err(ConnectionError::Server(err)),
            Frame::Error(err) => Ok(Some(Event::Error(err))),
        }
    }

    /// Reads until an event (answering heartbeats). Not cancel-safe.
    pub async fn recv(&mut self) -> Result<Event, ConnectionError> {
        loop {
            let frame = self.read_frame().await?;
            if let Some(event) = self.on_frame(frame).await? {
                return Ok(event);
            }
        }
    }

    /// Reads until a response, which it returns; any other event is a protocol violation.
    async fn expect_response(&mut self) -> Result<Bytes, ConnectionError> {
        match self.recv().await? {
            Event::Response(data) => Ok(data),
            other => Err(ConnectionError::Protocol(format!(
                "expected a response, got {other:?}"
            ))),
        }
    }

    /// `SUB topic channel` and its `OK`.
    pub async fn subscribe(&mut self, topic: &str, channel: &str) -> Result<(), ConnectionError> {
        self.send(&Command::Sub {
            topic: topic.into(),
            channel: channel.into(),
        })
        .await?;
        let reply = self.expect_response().await?;
        if reply.as_ref() != OK {
            return Err(ConnectionError::Protocol(format!(
                "SUB answered {:?}",
                String::from_utf8_lossy(&reply)
            )));
        }
        Ok(())
    }
}

/// A connection that lived this long counts as healthy: losing it resets the back-off.
pub const STABLE_SESSION: Duration = Duration::from_secs(10);

/// Exponential reconnect back-off with jitter: `initial`, doubling up to `max`, each delay
/// drawn uniformly from its upper half so that nodes restarted together do not reconnect in
/// lock-step.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// First delay.
    pub initial: Duration,
    /// Largest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(5),
        }
    }
}

impl Backoff {
    /// What to do after a session that lasted `lived` ended: one that lived at least
    /// [`STABLE_SESSION`] reconnects at once and resets the count; one that died young waits
    /// `delay(attempt)` and counts, so a flapping nsqd is not hammered.
    pub fn after_session(&self, lived: Duration, attempt: &mut u32) -> Option<Duration> {
        if lived >= STABLE_SESSION {
            *attempt = 0;
            None
        } else {
            let delay = self.delay(*attempt);
            *attempt = attempt.saturating_add(1);
            Some(delay)
        }
    }

    /// The delay before reconnect attempt `attempt` (0-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let base = self
            .initial
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.max);
        let half = base / 2;
        let jitter = rand::random_range(0..=half.as_micros() as u64);
        half + Duration::from_micros(jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        for attempt in 0..30 {
            let d = b.delay(attempt);
            let base = (Duration::from_millis(100) * 2u32.pow(attempt.min(4))).min(b.max);
            assert!(d >= base / 2 && d <= base, "{attempt}: {d:?}");
        }
    }
}
