//! TLS on the client port: rustls (the `ring` provider), TLS 1.2 and 1.3
//! only, no client certificates (the JWT in `Auth` stays the identity).
//!
//! The certificate chain and key come from PEM files. [`TlsAcceptor::reload`]
//! reads them again (the binary calls it on SIGHUP): the new key is swapped
//! into the resolver, new handshakes present it, and connections already
//! established are not touched (a TLS session never looks at the
//! certificate again after its handshake). A reload that fails keeps the
//! old certificate.
//!
//! A failed handshake is counted (`ferry_tls_handshake_failures_total` by
//! reason, see [`HandshakeFailure`]), never logged per attempt: a scanner
//! would otherwise write the log.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Why a certificate or key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no PEM item of the expected kind.
    #[error("{what} {path}: {why}")]
    Pem {
        /// "certificate chain" or "private key".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// rustls refused the key or the configuration.
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The key the server presents, swappable while handshakes read it.
#[derive(Debug)]
struct SwappableCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for SwappableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// The client port's TLS: a rustls server configuration whose certificate
/// can be reloaded from its files.
pub struct TlsAcceptor {
    acceptor: tokio_rustls::TlsAcceptor,
    cert: Arc<SwappableCert>,
    provider: Arc<CryptoProvider>,
    cert_path: PathBuf,
    key_path: PathBuf,
}

impl std::fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsAcceptor")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish()
    }
}

impl TlsAcceptor {
    /// Loads the PEM certificate chain (leaf first) and private key (PKCS#8,
    /// PKCS#1 or SEC1) and builds the server configuration.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<TlsAcceptor, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = certified_key(&provider, cert_path, key_path)?;
        let cert = Arc::new(SwappableCert {
            current: RwLock::new(Arc::new(key)),
        });
        let config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(cert.clone());
        Ok(TlsAcceptor {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            cert,
            provider,
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
        })
    }

    /// Reads the certificate and key files again and presents them from the
    /// next handshake on. On error the current certificate stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let key = certified_key(&self.provider, &self.cert_path, &self.key_path)?;
        *self.cert.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
        Ok(())
    }

    /// The certificate file.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    pub(crate) fn acceptor(&self) -> &tokio_rustls::TlsAcceptor {
        &self.acceptor
    }
}

fn certified_key(
    provider: &CryptoProvider,
    cert_path: &Path,
    key_path: &Path,
) -> Result<CertifiedKey, TlsError> {
    let pem_error = |what, path: &Path, why: String| TlsError::Pem {
        what,
        path: path.to_owned(),
        why,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| pem_error("certificate chain", cert_path, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem_error("certificate chain", cert_path, e.to_string()))?;
    if chain.is_empty() {
        return Err(pem_error(
            "certificate chain",
            cert_path,
            "no CERTIFICATE block".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| pem_error("private key", key_path, e.to_string()))?;
    let key = CertifiedKey::from_der(chain, key, provider)?;
    Ok(key)
}

/// Why a TLS handshake failed: the `reason` label of
/// `ferry_tls_handshake_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The first byte was not a TLS handshake record: a plaintext client
    /// on the TLS port (it gets one plaintext Error frame saying so).
    NotTls,
    /// No handshake within the auth timeout.
    Timeout,
    /// The client sent a TLS alert: typically it does not trust the
    /// certificate, or the name does not match.
    Alert,
    /// No common protocol version or cipher suite (e.g. a TLS 1.0 client).
    Incompatible,
    /// Malformed or unexpected TLS messages.
    Protocol,
    /// The peer closed or reset the connection mid-handshake.
    Closed,
}

impl HandshakeFailure {
    /// Every reason, for registering the counters up front.
    pub const ALL: [HandshakeFailure; 6] = [
        HandshakeFailure::NotTls,
        HandshakeFailure::Timeout,
        HandshakeFailure::Alert,
        HandshakeFailure::Incompatible,
        HandshakeFailure::Protocol,
        HandshakeFailure::Closed,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            HandshakeFailure::NotTls => "not_tls",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Alert => "alert",
            HandshakeFailure::Incompatible => "incompatible",
            HandshakeFailure::Protocol => "protocol",
            HandshakeFailure::Closed => "closed",
        }
    }

    /// Classifies the error of a failed `accept`.
    pub(crate) fn of(error: &std::io::Error) -> HandshakeFailure {
        let rustls_error = error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        match rustls_error {
            Some(rustls::Error::AlertReceived(_)) => HandshakeFailure::Alert,
            Some(rustls::Error::PeerIncompatible(_)) => HandshakeFailure::Incompatible,
            Some(_) => HandshakeFailure::Protocol,
            None => HandshakeFailure::Closed,
        }
    }
}

/// The first byte of a TLS handshake record (a ClientHello starts with it).
pub(crate) const TLS_HANDSHAKE_RECORD: u8 = 0x16;
