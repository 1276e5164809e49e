//! A small async ferry client over tokio: connect, authenticate, send and
//! receive frames. Used by the end-to-end tests, the bench harness and
//! `ferry chat`; an app would write the equivalent from `docs/PROTOCOL.md`.
//!
//! The client is deliberately thin: it does not retry, resync or ack on its
//! own. Callers see every frame the server sends. The one exception is the
//! handshake of [`Client::connect_and_authenticate`], which follows a
//! cluster's `Redirect`s (at most [`MAX_REDIRECTS`] in a row), as
//! `docs/PROTOCOL.md` section 4.7 says a client does.

use futures::{SinkExt, StreamExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::codec::{CodecError, FrameCodec};
use crate::proto::{self, Frame, frame::Body};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Framing or transport failure.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// Connecting failed.
    #[error("connect: {0}")]
    Connect(std::io::Error),
    /// The server closed the connection.
    #[error("connection closed by the server")]
    Closed,
    /// The server answered with an `Error` frame.
    #[error("server error {code:?}: {message}", code = .0.code(), message = .0.message)]
    Rejected(proto::Error),
    /// The server sent something other than what the call expected.
    #[error("unexpected {0} frame")]
    Unexpected(&'static str),
    /// The server answered `Auth` with `Redirect` (cluster mode: the user
    /// lives on another node) and closed the connection.
    #[error("redirected to node {} at {}", .0.node_id, .0.address)]
    Redirected(proto::Redirect),
    /// More than [`MAX_REDIRECTS`] redirects in a row: the cluster's
    /// configuration is inconsistent. Carries the last one.
    #[error("more than {MAX_REDIRECTS} redirects in a row (last: node {} at {})", .0.node_id, .0.address)]
    TooManyRedirects(proto::Redirect),
}

/// Most `Redirect`s followed in a row before giving up (docs/PROTOCOL.md
/// section 4.7); a client then falls back to its reconnect backoff.
pub const MAX_REDIRECTS: u32 = 3;

/// An authenticated connection, from [`Client::connect_and_authenticate`].
pub struct Login {
    /// The connection; the login sync's frames are still to be read.
    pub client: Client,
    /// The server's answer.
    pub auth_ok: proto::AuthOk,
    /// The address finally connected to (the user's home node in a cluster).
    pub address: String,
    /// Redirects followed to get there (0 when the first node was home).
    pub redirects: u32,
}

impl ClientError {
    /// The protocol error code, when the server rejected the call.
    pub fn code(&self) -> Option<proto::ErrorCode> {
        match self {
            ClientError::Rejected(e) => Some(e.code()),
            _ => None,
        }
    }
}

/// The receiving half of a connection.
pub struct FrameReader {
    inner: FramedRead<OwnedReadHalf, FrameCodec>,
}

/// The sending half of a connection.
pub struct FrameWriter {
    inner: FramedWrite<OwnedWriteHalf, FrameCodec>,
}

/// One connection to a ferry server.
pub struct Client {
    reader: FrameReader,
    writer: FrameWriter,
}

impl FrameReader {
    /// The next frame; `Ok(None)` when the server closed the connection cleanly.
    pub async fn recv(&mut self) -> Result<Option<Frame>, ClientError> {
        self.inner.next().await.transpose().map_err(Into::into)
    }
}

impl FrameWriter {
    /// Sends one frame and flushes it.
    pub async fn send(&mut self, frame: impl Into<Frame>) -> Result<(), ClientError> {
        Ok(self.inner.send(frame.into()).await?)
    }

    /// Buffers one frame without flushing (call [`FrameWriter::flush`]).
    pub async fn feed(&mut self, frame: impl Into<Frame>) -> Result<(), ClientError> {
        Ok(self.inner.feed(frame.into()).await?)
    }

    /// Flushes buffered frames.
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        Ok(SinkExt::<Frame>::flush(&mut self.inner).await?)
    }

    /// Writes raw bytes, bypassing the codec (for tests of bad input).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        use tokio::io::AsyncWriteExt;
        SinkExt::<Frame>::flush(&mut self.inner).await?;
        let io = self.inner.get_mut();
        io.write_all(bytes).await.map_err(CodecError::Io)?;
        io.flush().await.map_err(CodecError::Io)?;
        Ok(())
    }

    /// Half-closes the connection (sends FIN).
    pub async fn shutdown(&mut self) -> Result<(), ClientError> {
        use tokio::io::AsyncWriteExt;
        SinkExt::<Frame>::flush(&mut self.inner).await?;
        self.inner
            .get_mut()
            .shutdown()
            .await
            .map_err(CodecError::Io)?;
        Ok(())
    }
}

impl Client {
    /// Connects with the default maximum frame size.
    pub async fn connect(addr: impl ToSocketAddrs) -> Result<Client, ClientError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(ClientError::Connect)?;
        Ok(Client::from_stream(stream, FrameCodec::default()))
    }

    /// Wraps an already connected stream.
    pub fn from_stream(stream: TcpStream, codec: FrameCodec) -> Client {
        // Frames are small and latency matters more than packet count.
        let _ = stream.set_nodelay(true);
        let (read, write) = stream.into_split();
        Client {
            reader: FrameReader {
                inner: FramedRead::new(read, codec),
            },
            writer: FrameWriter {
                inner: FramedWrite::new(write, codec),
            },
        }
    }

    /// Sends `Auth` and waits for `AuthOk`. An `Error` answer becomes
    /// [`ClientError::Rejected`], a `Redirect` [`ClientError::Redirected`].
    /// SyncBatch frames that follow the AuthOk are left for the caller to read.
    pub async fn authenticate(
        &mut self,
        token: &str,
        device_id: &str,
        last_seq: u64,
    ) -> Result<proto::AuthOk, ClientError> {
        self.send_auth(auth_frame(token, device_id, last_seq)).await
    }

    /// Sends this `Auth` and waits for the answer, like [`Client::authenticate`].
    pub async fn send_auth(&mut self, auth: proto::Auth) -> Result<proto::AuthOk, ClientError> {
        self.send(auth).await?;
        match self.recv().await? {
            Some(Frame {
                body: Some(Body::AuthOk(ok)),
            }) => Ok(ok),
            Some(Frame {
                body: Some(Body::Error(e)),
            }) => Err(ClientError::Rejected(e)),
            Some(Frame {
                body: Some(Body::Redirect(r)),
            }) => Err(ClientError::Redirected(r)),
            Some(other) => Err(ClientError::Unexpected(other.kind_name())),
            None => Err(ClientError::Closed),
        }
    }

    /// Connects to `addr` (`host:port`) and authenticates, following
    /// `Redirect`s: each one closes the connection, and the same `Auth` goes
    /// to the redirect's address, at most [`MAX_REDIRECTS`] times in a row
    /// (then [`ClientError::TooManyRedirects`]).
    pub async fn connect_and_authenticate(
        addr: &str,
        token: &str,
        device_id: &str,
        last_seq: u64,
    ) -> Result<Login, ClientError> {
        Client::connect_with_auth(addr, auth_frame(token, device_id, last_seq)).await
    }

    /// [`Client::connect_and_authenticate`] with a whole `Auth` (e.g. with
    /// `skip_sync`).
    pub async fn connect_with_auth(addr: &str, auth: proto::Auth) -> Result<Login, ClientError> {
        let mut address = addr.to_owned();
        let mut redirects = 0;
        loop {
            let mut client = Client::connect(address.as_str()).await?;
            match client.send_auth(auth.clone()).await {
                Ok(auth_ok) => {
                    return Ok(Login {
                        client,
                        auth_ok,
                        address,
                        redirects,
                    });
                }
                Err(ClientError::Redirected(r)) if redirects < MAX_REDIRECTS => {
                    redirects += 1;
                    address = r.address;
                }
                Err(ClientError::Redirected(r)) => return Err(ClientError::TooManyRedirects(r)),
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends one frame and flushes it.
    pub async fn send(&mut self, frame: impl Into<Frame>) -> Result<(), ClientError> {
        self.writer.send(frame).await
    }

    /// Buffers one frame without flushing.
    pub async fn feed(&mut self, frame: impl Into<Frame>) -> Result<(), ClientError> {
        self.writer.feed(frame).await
    }

    /// Flushes buffered frames.
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        self.writer.flush().await
    }

    /// Writes raw bytes, bypassing the codec (for tests of bad input).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.writer.send_raw(bytes).await
    }

    /// The next frame; `Ok(None)` when the server closed the connection cleanly.
    pub async fn recv(&mut self) -> Result<Option<Frame>, ClientError> {
        self.reader.recv().await
    }

    /// The next frame, skipping `Pong`s; `Err(Closed)` at end of stream.
    pub async fn recv_frame(&mut self) -> Result<Body, ClientError> {
        loop {
            match self.recv().await? {
                None => return Err(ClientError::Closed),
                Some(Frame { body: None }) => return Err(ClientError::Unexpected("empty")),
                Some(Frame {
                    body: Some(Body::Pong(_)),
                }) => continue,
                Some(Frame { body: Some(body) }) => return Ok(body),
            }
        }
    }

    /// Splits into independently usable halves.
    pub fn split(self) -> (FrameReader, FrameWriter) {
        (self.reader, self.writer)
    }
}

/// An `Auth` of this protocol version, with the login sync.
fn auth_frame(token: &str, device_id: &str, last_seq: u64) -> proto::Auth {
    proto::Auth {
        token: token.to_owned(),
        device_id: device_id.to_owned(),
        protocol_version: crate::PROTOCOL_VERSION as i32,
        last_seq,
        skip_sync: false,
    }
}
