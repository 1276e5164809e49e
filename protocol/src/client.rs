//! A small async ferry client over tokio: connect, authenticate, send and
//! receive frames. Used by the end-to-end tests, the bench harness and
//! `ferry chat`; an app would write the equivalent from `docs/PROTOCOL.md`.
//!
//! The client is deliberately thin: it does not retry, resync or ack on its
//! own. Callers see every frame the server sends.

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
    /// [`ClientError::Rejected`]. SyncBatch frames that follow the AuthOk are
    /// left for the caller to read.
    pub async fn authenticate(
        &mut self,
        token: &str,
        device_id: &str,
        last_seq: u64,
    ) -> Result<proto::AuthOk, ClientError> {
        self.send(proto::Auth {
            token: token.to_owned(),
            device_id: device_id.to_owned(),
            protocol_version: crate::PROTOCOL_VERSION as i32,
            last_seq,
            skip_sync: false,
        })
        .await?;
        match self.recv().await? {
            Some(Frame {
                body: Some(Body::AuthOk(ok)),
            }) => Ok(ok),
            Some(Frame {
                body: Some(Body::Error(e)),
            }) => Err(ClientError::Rejected(e)),
            Some(other) => Err(ClientError::Unexpected(other.kind_name())),
            None => Err(ClientError::Closed),
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
