//! Fuzzes token verification: the first thing the server does with the
//! bytes of a client it does not know yet. The first input byte picks how
//! the rest becomes a token: the bytes as they are (anything a client can
//! send), or arbitrary bytes as the claims of a correctly signed HS256 token
//! (so that the claims parser and every check after the signature run on
//! arbitrary JSON), or arbitrary header and claims, both signed. Verifying
//! never panics, a refusal carries one of the documented codes, and a token
//! that passes has a usable user id and has not expired. The verifier has
//! a current and a previous secret, chosen by the header's `kid`.
#![no_main]

use std::sync::LazyLock;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ferry_auth::{CLOCK_SKEW_SECS, MAX_ID_BYTES, TokenVerifier, unix_now};
use ferry_protocol::ErrorCode;
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;

const SECRET: &[u8] = b"fuzz-secret-0123456789abcdef-fuzz";

/// The current secret under kid `k2`, a previous one under `k1` (secret
/// rotation): arbitrary headers choose between them.
static VERIFIER: LazyLock<TokenVerifier> = LazyLock::new(|| {
    TokenVerifier::new(SECRET)
        .with_kid("k2")
        .with_previous("k1", b"previous-fuzz-secret-0123456789ab")
});

/// `header.claims.signature`, signed with [`SECRET`].
fn signed(header: &[u8], claims: &[u8]) -> String {
    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let key = EncodingKey::from_secret(SECRET);
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256)
        .expect("HMAC signing cannot fail");
    format!("{message}.{signature}")
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let token = match mode % 3 {
        0 => String::from_utf8_lossy(rest).into_owned(),
        1 => signed(br#"{"alg":"HS256","typ":"JWT"}"#, rest),
        _ => {
            let cut = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            let claims = rest.get(cut + 1..).unwrap_or_default();
            signed(&rest[..cut], claims)
        }
    };
    match VERIFIER.verify(&token) {
        Ok(claims) => {
            assert!(!claims.sub.is_empty() && claims.sub.len() <= MAX_ID_BYTES);
            assert!(claims.exp.saturating_add(CLOCK_SKEW_SECS) >= unix_now());
        }
        Err(rejection) => assert!(
            matches!(
                rejection.code,
                ErrorCode::BadToken | ErrorCode::TokenExpired | ErrorCode::BadAuth
            ),
            "undocumented code {:?}",
            rejection.code
        ),
    }
});
