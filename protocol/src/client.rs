//! A small async ferry client over tokio: connect, authenticate, send and
//! receive frames. Used by the end-to-end tests, the bench harness and
//! `ferry chat`; an app would write the equivalent from `docs/PROTOCOL.md`.
//!
//! The client is deliberately thin: it does not retry, resync or ack on its
//! own. Callers see every frame the server sends. The one exception is the
//! handshake of [`Client::connect_and_authenticate`], which follows a
//! cluster's `Redirect`s (at most [`MAX_REDIRECTS`] in a row), as
//! `docs/PROTOCOL.md` section 4.7 says a client does.
//!
//! With the `tls` feature a connection can be TLS ([`Transport::Tls`], a
//! [`TlsConnector`] trusting the given CA): the frames are the same inside.

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
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
    /// TLS could not be set up (a bad CA file or server name) or its
    /// handshake failed (e.g. the certificate is not trusted).
    #[error("TLS: {0}")]
    Tls(String),
}

/// How a client reaches the server.
#[derive(Clone, Default)]
pub enum Transport {
    /// Plaintext TCP.
    #[default]
    Plain,
    /// TLS over TCP.
    #[cfg(feature = "tls")]
    Tls(TlsConnector),
}

#[cfg(feature = "tls")]
pub use tls::TlsConnector;

#[cfg(feature = "tls")]
mod tls {
    use std::sync::Arc;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    use tokio::net::TcpStream;

    use super::ClientError;

    /// Connects with TLS 1.2 or 1.3 (rustls, the `ring` provider), trusting
    /// only the given CA certificates.
    #[derive(Clone)]
    pub struct TlsConnector {
        inner: tokio_rustls::TlsConnector,
        server_name: Option<ServerName<'static>>,
    }

    impl TlsConnector {
        /// Trusts the CA certificates in `pem` (one or more `CERTIFICATE`
        /// blocks). The name verified is the host of the address dialled,
        /// unless [`TlsConnector::with_server_name`] fixes one.
        pub fn from_ca_pem(pem: &[u8]) -> Result<TlsConnector, ClientError> {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| ClientError::Tls(format!("CA file: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| ClientError::Tls(format!("CA certificate: {e}")))?;
            }
            if roots.is_empty() {
                return Err(ClientError::Tls("CA file: no CERTIFICATE block".into()));
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                .map_err(|e| ClientError::Tls(e.to_string()))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Ok(TlsConnector {
                inner: tokio_rustls::TlsConnector::from(Arc::new(config)),
                server_name: None,
            })
        }

        /// Verifies (and sends as SNI) `name` whatever address is dialled.
        pub fn with_server_name(mut self, name: &str) -> Result<TlsConnector, ClientError> {
            let name = ServerName::try_from(name.to_owned())
                .map_err(|e| ClientError::Tls(format!("server name `{name}`: {e}")))?;
            self.server_name = Some(name);
            Ok(self)
        }

        /// The TLS handshake over `stream`, connected to `addr`
        /// (`host:port`, whose host is the name verified unless one is fixed).
        pub async fn handshake(
            &self,
            stream: TcpStream,
            addr: &str,
        ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ClientError> {
            let name = match &self.server_name {
                Some(name) => name.clone(),
                None => {
                    let host = super::host_of(addr);
                    ServerName::try_from(host.to_owned()).map_err(|e| {
                        ClientError::Tls(format!("server name `{host}` of `{addr}`: {e}"))
                    })?
                }
            };
            self.inner
                .connect(name, stream)
                .await
                .map_err(|e| ClientError::Tls(format!("handshake with {addr}: {e}")))
        }
    }
}

/// The host of `host:port` (`[v6]:port` gives `v6`); the whole string if
/// there is no port.
pub fn host_of(addr: &str) -> &str {
    let host = match addr.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => addr,
    };
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

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
    inner: FramedRead<BoxRead, FrameCodec>,
}

/// The sending half of a connection.
pub struct FrameWriter {
    inner: FramedWrite<BoxWrite, FrameCodec>,
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

    /// Connects to `addr` (`host:port`) over `transport`, with the default
    /// maximum frame size.
    pub async fn connect_via(addr: &str, transport: &Transport) -> Result<Client, ClientError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(ClientError::Connect)?;
        Client::over(stream, addr, transport, FrameCodec::default()).await
    }

    /// A client over an already connected `stream` to `addr`: as is, or
    /// after the TLS handshake.
    pub async fn over(
        stream: TcpStream,
        addr: &str,
        transport: &Transport,
        codec: FrameCodec,
    ) -> Result<Client, ClientError> {
        match transport {
            Transport::Plain => {
                let _ = addr;
                Ok(Client::from_stream(stream, codec))
            }
            #[cfg(feature = "tls")]
            Transport::Tls(tls) => {
                let _ = stream.set_nodelay(true);
                let stream = tls.handshake(stream, addr).await?;
                Ok(Client::from_io(stream, codec))
            }
        }
    }

    /// Wraps an already connected stream.
    pub fn from_stream(stream: TcpStream, codec: FrameCodec) -> Client {
        // Frames are small and latency matters more than packet count.
        let _ = stream.set_nodelay(true);
        let (read, write) = stream.into_split();
        Client::from_halves(Box::new(read), Box::new(write), codec)
    }

    /// Wraps any connected byte stream (e.g. a TLS stream).
    pub fn from_io<S>(io: S, codec: FrameCodec) -> Client
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (read, write) = tokio::io::split(io);
        Client::from_halves(Box::new(read), Box::new(write), codec)
    }

    fn from_halves(read: BoxRead, write: BoxWrite, codec: FrameCodec) -> Client {
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
        Client::connect_with_auth_via(addr, auth, &Transport::Plain).await
    }

    /// [`Client::connect_with_auth`] over `transport`: with TLS, every
    /// redirect target is dialled with TLS too (its host name verified).
    pub async fn connect_with_auth_via(
        addr: &str,
        auth: proto::Auth,
        transport: &Transport,
    ) -> Result<Login, ClientError> {
        let mut address = addr.to_owned();
        let mut redirects = 0;
        loop {
            let mut client = Client::connect_via(address.as_str(), transport).await?;
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

#[cfg(test)]
mod tests {
    #[test]
    fn host_of_strips_the_port_and_brackets() {
        assert_eq!(super::host_of("chat.example.com:7643"), "chat.example.com");
        assert_eq!(super::host_of("[::1]:7643"), "::1");
        assert_eq!(super::host_of("10.0.0.1:1"), "10.0.0.1");
        assert_eq!(super::host_of("localhost"), "localhost");
    }
}
