//! Client authentication: HS256 JWTs whose `sub` is the user id.
//!
//! The secret comes from the configuration, or from `<data_dir>/jwt.secret`,
//! which the first start creates (32 random bytes, hex, mode 0600) so that
//! `ferry serve` and `ferry token` agree on a fresh machine with no setup.
//! The admin API's bearer token comes from the same kind of file,
//! `<data_dir>/admin.token`, when it is not configured.
//!
//! # Secret rotation
//!
//! A verifier may hold two secrets: the current one, and the previous one
//! with its key id ([`TokenVerifier::with_previous`]). The JWT header's
//! `kid` chooses: a token whose `kid` is the previous key's id is checked
//! with the previous secret; any other token (no `kid`, or the current
//! key's id) with the current one, and a `kid` naming neither is refused.
//! Tokens minted here carry the current key's id when it has one. So an
//! operator rotates by giving the current secret a new id, moving the old
//! one to "previous", restarting, and dropping "previous" once the tokens
//! minted with it have expired (docs/OPERATIONS.md, "Rotating the secret").
#![warn(missing_docs)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use ferry_protocol::ErrorCode;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};

/// Longest user or device id, in bytes (the protocol's one limit on ids).
pub use ferry_protocol::limits::MAX_ID_BYTES;

/// Clock skew allowed between the token's minter and this server, on `exp`
/// and `nbf`.
pub const CLOCK_SKEW_SECS: u64 = 5;

/// File name of the generated secret inside the data dir.
pub const SECRET_FILE: &str = "jwt.secret";

/// File name of the generated admin API token inside the data dir.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// The claims ferry reads from a client token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issued at, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Not before, seconds since the Unix epoch: the token is refused
    /// until then (less the allowed clock skew).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// When present, the token is only valid for this device id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev: Option<String>,
}

/// Where the secret came from, for the start-up log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// `--jwt-secret` / `FERRY_JWT_SECRET` / the config file.
    Configured,
    /// An existing `<data_dir>/jwt.secret`.
    File(PathBuf),
    /// Created just now at this path.
    Created(PathBuf),
}

/// Errors loading or creating the secret.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// Reading or writing the secret file failed.
    #[error("{path}: {source}")]
    Io {
        /// The secret file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The secret file exists but is empty.
    #[error("{0} is empty")]
    Empty(PathBuf),
}

/// Verifies (and, for development, mints) client tokens.
#[derive(Clone)]
pub struct TokenVerifier {
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
    /// The current secret's key id (the `kid` of minted tokens).
    kid: Option<String>,
    /// The previous secret and its key id, still accepted by `kid`.
    previous: Option<(String, DecodingKey)>,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenVerifier(..)")
    }
}

/// Why a token was refused, with the protocol code for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AuthRejection {
    /// The code sent to the client.
    pub code: ErrorCode,
    /// Detail for the client and the log.
    pub message: String,
}

fn reject(code: ErrorCode, message: impl Into<String>) -> AuthRejection {
    AuthRejection {
        code,
        message: message.into(),
    }
}

impl TokenVerifier {
    /// A verifier for `secret`.
    pub fn new(secret: &[u8]) -> TokenVerifier {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        // Tokens are minted by app backends whose clocks are NTP-synced with
        // ours; a little leeway absorbs the rest without extending tokens much.
        // The same leeway applies to `exp` and, when present, `nbf`.
        validation.leeway = CLOCK_SKEW_SECS;
        validation.validate_nbf = true;
        TokenVerifier {
            decoding: DecodingKey::from_secret(secret),
            encoding: EncodingKey::from_secret(secret),
            validation,
            kid: None,
            previous: None,
        }
    }

    /// Names the current secret `kid`: minted tokens carry it in their
    /// header, and tokens whose header names it are checked with it.
    pub fn with_kid(mut self, kid: &str) -> TokenVerifier {
        self.kid = Some(kid.to_owned());
        self
    }

    /// Also accepts tokens signed with `secret` whose header `kid` is
    /// `kid` (the previous secret, during a rotation).
    pub fn with_previous(mut self, kid: &str, secret: &[u8]) -> TokenVerifier {
        self.previous = Some((kid.to_owned(), DecodingKey::from_secret(secret)));
        self
    }

    /// The key that checks `token`, chosen by its header's `kid`.
    fn key_for(&self, token: &str) -> Result<&DecodingKey, AuthRejection> {
        if self.kid.is_none() && self.previous.is_none() {
            return Ok(&self.decoding);
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| reject(ErrorCode::BadToken, format!("bad token: {e}")))?;
        match header.kid.as_deref() {
            None => Ok(&self.decoding),
            Some(kid) if self.kid.as_deref() == Some(kid) => Ok(&self.decoding),
            Some(kid) => match &self.previous {
                Some((previous, key)) if previous == kid => Ok(key),
                _ => Err(reject(
                    ErrorCode::BadToken,
                    "token signed with an unknown key id (kid)",
                )),
            },
        }
    }

    /// Checks `token` and returns its claims, or the code to reject it with.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthRejection> {
        let key = self.key_for(token)?;
        let data =
            jsonwebtoken::decode::<Claims>(token, key, &self.validation).map_err(|e| {
                match e.kind() {
                    ErrorKind::ExpiredSignature => reject(ErrorCode::TokenExpired, "token expired"),
                    ErrorKind::ImmatureSignature => {
                        reject(ErrorCode::BadToken, "token not valid yet (nbf)")
                    }
                    ErrorKind::InvalidSignature => {
                        reject(ErrorCode::BadToken, "bad token signature")
                    }
                    _ => reject(ErrorCode::BadToken, format!("bad token: {e}")),
                }
            })?;
        let claims = data.claims;
        if claims.sub.is_empty() || claims.sub.len() > MAX_ID_BYTES {
            return Err(reject(
                ErrorCode::BadAuth,
                format!("token sub must be 1..={MAX_ID_BYTES} bytes"),
            ));
        }
        Ok(claims)
    }

    /// Mints a token for `user` (and optionally one `device`) valid `ttl_secs`.
    pub fn mint(&self, user: &str, device: Option<&str>, ttl_secs: u64) -> String {
        let now = unix_now();
        let claims = Claims {
            sub: user.to_owned(),
            exp: now + ttl_secs,
            iat: Some(now),
            nbf: None,
            dev: device.map(str::to_owned),
        };
        self.mint_claims(&claims)
    }

    /// Mints a token with exactly these claims (tests use it for expired tokens).
    pub fn mint_claims(&self, claims: &Claims) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = self.kid.clone();
        jsonwebtoken::encode(&header, claims, &self.encoding)
            .expect("HS256 encoding of plain claims cannot fail")
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The configured secret, or the one in `data_dir` (created if missing).
pub fn load_or_create_secret(
    configured: Option<&str>,
    data_dir: &Path,
) -> Result<(Vec<u8>, SecretSource), SecretError> {
    if let Some(secret) = configured {
        return Ok((secret.as_bytes().to_vec(), SecretSource::Configured));
    }
    load_or_create_secret_file(data_dir, SECRET_FILE)
}

/// The configured admin token, or the one in `data_dir` (created if missing).
pub fn load_or_create_admin_token(
    configured: Option<&str>,
    data_dir: &Path,
) -> Result<(Vec<u8>, SecretSource), SecretError> {
    if let Some(token) = configured {
        return Ok((token.as_bytes().to_vec(), SecretSource::Configured));
    }
    load_or_create_secret_file(data_dir, ADMIN_TOKEN_FILE)
}

/// The configured secret, or the one in `data_dir`; `None` when neither
/// exists. For clients (`ferry chat --uid`), which must not invent a secret
/// the server does not know.
pub fn load_secret(
    configured: Option<&str>,
    data_dir: &Path,
) -> Result<Option<Vec<u8>>, SecretError> {
    if let Some(secret) = configured {
        return Ok(Some(secret.as_bytes().to_vec()));
    }
    read_secret_file(&data_dir.join(SECRET_FILE))
}

/// The trimmed contents of a secret file, `None` if it does not exist.
fn read_secret_file(path: &Path) -> Result<Option<Vec<u8>>, SecretError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let secret = text.trim();
            if secret.is_empty() {
                return Err(SecretError::Empty(path.to_path_buf()));
            }
            Ok(Some(secret.as_bytes().to_vec()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SecretError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Reads `<dir>/<name>`, or creates it with 32 random bytes in hex, mode 0600.
/// Shared by the JWT secret and the admin token.
pub fn load_or_create_secret_file(
    dir: &Path,
    name: &str,
) -> Result<(Vec<u8>, SecretSource), SecretError> {
    let path = dir.join(name);
    let io = |source| SecretError::Io {
        path: path.clone(),
        source,
    };
    match read_secret_file(&path)? {
        Some(secret) => Ok((secret, SecretSource::File(path))),
        None => {
            std::fs::create_dir_all(dir).map_err(io)?;
            let mut raw = [0u8; 32];
            rand::fill(&mut raw);
            let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
            match write_private(&path, hex.as_bytes()) {
                Ok(()) => Ok((hex.into_bytes(), SecretSource::Created(path))),
                // Another process created it first: use theirs.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let secret =
                        read_secret_file(&path)?.ok_or(SecretError::Empty(path.clone()))?;
                    Ok((secret, SecretSource::File(path)))
                }
                Err(e) => Err(io(e)),
            }
        }
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    // create_new: two processes starting at once must not overwrite each
    // other's secret; the loser reads the winner's.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mint_then_verify() {
        let v = TokenVerifier::new(b"0123456789abcdef0123456789abcdef");
        let claims = v.verify(&v.mint("alice", Some("phone"), 60)).unwrap();
        assert_eq!(claims.sub, "alice");
        assert_eq!(claims.dev.as_deref(), Some("phone"));
    }

    #[test]
    fn wrong_secret_and_expiry_have_their_codes() {
        let v = TokenVerifier::new(b"0123456789abcdef0123456789abcdef");
        let other = TokenVerifier::new(b"fedcba9876543210fedcba9876543210");
        assert_eq!(
            v.verify(&other.mint("alice", None, 60)).unwrap_err().code,
            ErrorCode::BadToken
        );
        let expired = v.mint_claims(&Claims {
            sub: "alice".into(),
            exp: unix_now() - 3600,
            iat: None,
            nbf: None,
            dev: None,
        });
        assert_eq!(
            v.verify(&expired).unwrap_err().code,
            ErrorCode::TokenExpired
        );
        assert_eq!(v.verify("not a jwt").unwrap_err().code, ErrorCode::BadToken);
    }

    #[test]
    fn the_kid_chooses_the_current_or_the_previous_secret() {
        let old = TokenVerifier::new(b"0123456789abcdef0123456789abcdef").with_kid("k1");
        let new = TokenVerifier::new(b"fedcba9876543210fedcba9876543210").with_kid("k2");
        let rotated = TokenVerifier::new(b"fedcba9876543210fedcba9876543210")
            .with_kid("k2")
            .with_previous("k1", b"0123456789abcdef0123456789abcdef");
        // Minted before and after the rotation: both accepted.
        assert_eq!(
            rotated.verify(&old.mint("alice", None, 60)).unwrap().sub,
            "alice"
        );
        assert_eq!(
            rotated.verify(&new.mint("bob", None, 60)).unwrap().sub,
            "bob"
        );
        // Without kid: the current secret.
        let plain_new = TokenVerifier::new(b"fedcba9876543210fedcba9876543210");
        let plain_old = TokenVerifier::new(b"0123456789abcdef0123456789abcdef");
        assert!(rotated.verify(&plain_new.mint("carol", None, 60)).is_ok());
        assert_eq!(
            rotated
                .verify(&plain_old.mint("carol", None, 60))
                .unwrap_err()
                .code,
            ErrorCode::BadToken
        );
        // A kid naming the previous key but signed with the current secret,
        // or a kid naming no key: refused.
        let mislabelled = TokenVerifier::new(b"fedcba9876543210fedcba9876543210").with_kid("k1");
        assert_eq!(
            rotated
                .verify(&mislabelled.mint("dave", None, 60))
                .unwrap_err()
                .code,
            ErrorCode::BadToken
        );
        let unknown = TokenVerifier::new(b"fedcba9876543210fedcba9876543210").with_kid("k9");
        let e = rotated.verify(&unknown.mint("erin", None, 60)).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadToken);
        assert!(e.message.contains("kid"), "{}", e.message);
        // After the previous secret is dropped, the old tokens stop working.
        assert!(new.verify(&old.mint("alice", None, 60)).is_err());
        // Minted tokens carry the current kid.
        let header = jsonwebtoken::decode_header(rotated.mint("x", None, 60)).unwrap();
        assert_eq!(header.kid.as_deref(), Some("k2"));
    }

    #[test]
    fn not_before_is_honoured_with_the_clock_skew() {
        let v = TokenVerifier::new(b"0123456789abcdef0123456789abcdef");
        let with_nbf = |nbf: u64| {
            v.mint_claims(&Claims {
                sub: "alice".into(),
                exp: unix_now() + 3600,
                iat: None,
                nbf: Some(nbf),
                dev: None,
            })
        };
        let early = v.verify(&with_nbf(unix_now() + 60)).unwrap_err();
        assert_eq!(early.code, ErrorCode::BadToken);
        assert!(early.message.contains("nbf"), "{}", early.message);
        // Within the skew, and in the past: accepted.
        assert!(
            v.verify(&with_nbf(unix_now() + CLOCK_SKEW_SECS - 2))
                .is_ok()
        );
        assert!(v.verify(&with_nbf(unix_now() - 60)).is_ok());
    }

    #[test]
    fn secret_file_is_created_once_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (a, source) = load_or_create_secret(None, dir.path()).unwrap();
        assert!(matches!(source, SecretSource::Created(_)));
        let (b, source) = load_or_create_secret(None, dir.path()).unwrap();
        assert!(matches!(source, SecretSource::File(_)));
        assert_eq!(a, b);
        let mode = std::fs::metadata(dir.path().join(SECRET_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn admin_token_file_is_separate_from_the_jwt_secret() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (jwt, _) = load_or_create_secret(None, dir.path()).unwrap();
        let (admin, source) = load_or_create_admin_token(None, dir.path()).unwrap();
        assert!(matches!(source, SecretSource::Created(_)));
        assert_ne!(jwt, admin);
        assert_eq!(admin.len(), 64, "32 random bytes in hex");
        let mode = std::fs::metadata(dir.path().join(ADMIN_TOKEN_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (again, source) = load_or_create_admin_token(None, dir.path()).unwrap();
        assert_eq!(again, admin);
        assert!(matches!(source, SecretSource::File(_)));
        let (configured, source) =
            load_or_create_admin_token(Some("configured-token-0123"), dir.path()).unwrap();
        assert_eq!(configured, b"configured-token-0123");
        assert_eq!(source, SecretSource::Configured);
    }

    #[test]
    fn load_secret_never_creates_one() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load_secret(None, dir.path()).unwrap(), None);
        assert!(!dir.path().join(SECRET_FILE).exists());
        let (created, _) = load_or_create_secret(None, dir.path()).unwrap();
        assert_eq!(load_secret(None, dir.path()).unwrap(), Some(created));
    }
}
