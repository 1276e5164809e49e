//! The admin API's request bodies (docs/ADMIN_API.md): each parsed from
//! JSON and checked against [`ferry_protocol::limits`] in one function, so
//! that what reaches the server's handlers is known to be within limits.
//! No server or storage dependency: the `admin_bodies` fuzz target
//! (`admin-api/fuzz`) runs these functions on arbitrary bytes.
#![warn(missing_docs)]

use base64::Engine;
use bytes::Bytes;
use ferry_protocol::limits::{
    self, MAX_CONTENT_TYPE_BYTES, MAX_GROUP_NAME_BYTES, MAX_KICK_MESSAGE_BYTES,
};
use serde::Deserialize;

/// Why a body is refused; the API answers with the status and code named
/// on each variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Not JSON, or not the body's shape (unknown fields are refused):
    /// 400 `bad_json`.
    #[error("bad JSON: {0}")]
    BadJson(String),
    /// A field outside its limits or a missing choice: 400
    /// `invalid_request`.
    #[error("{0}")]
    Invalid(String),
    /// A message's content over the frame's limit: 413 `too_large`.
    #[error("{0}")]
    TooLarge(String),
}

/// Parses a JSON body, whatever the request's content type said (`curl -d`
/// sends a form type by default).
fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, BodyError> {
    serde_json::from_slice(body).map_err(|e| BodyError::BadJson(e.to_string()))
}

fn invalid(e: limits::LimitError) -> BodyError {
    BodyError::Invalid(e.to_string())
}

/// `POST /admin/groups`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateGroup {
    /// Omit to have the server pick one; else 1..=64 bytes.
    pub group_id: Option<String>,
    /// Display name, at most [`MAX_GROUP_NAME_BYTES`].
    #[serde(default)]
    pub name: String,
    /// Becomes the owner; group changes through this API act as them.
    pub owner: String,
    /// Initial members besides the owner: at most
    /// [`limits::MAX_USERS_PER_CHANGE`] ids.
    #[serde(default)]
    pub members: Vec<String>,
}

/// Parses and checks a [`CreateGroup`] body.
pub fn create_group(body: &[u8]) -> Result<CreateGroup, BodyError> {
    let req: CreateGroup = parse(body)?;
    if let Some(id) = &req.group_id {
        limits::check_id("group_id", id).map_err(invalid)?;
    }
    limits::check_id("owner", &req.owner).map_err(invalid)?;
    limits::check_len("name", &req.name, 0, MAX_GROUP_NAME_BYTES).map_err(invalid)?;
    limits::check_user_list("members", &req.members).map_err(BodyError::Invalid)?;
    Ok(req)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Members {
    members: Vec<String>,
}

/// The body of `POST /admin/groups/{id}/members` and `…/members/remove`:
/// `{"members": [...]}`, 1..=[`limits::MAX_USERS_PER_CHANGE`] valid ids.
pub fn members(body: &[u8]) -> Result<Vec<String>, BodyError> {
    let req: Members = parse(body)?;
    if req.members.is_empty() {
        return Err(BodyError::Invalid("members must not be empty".into()));
    }
    limits::check_user_list("members", &req.members).map_err(BodyError::Invalid)?;
    Ok(req.members)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SystemMessageBody {
    #[serde(default = "text_plain")]
    content_type: String,
    text: Option<String>,
    body_base64: Option<String>,
}

fn text_plain() -> String {
    "text/plain".into()
}

/// A system message (`POST /admin/users/{id}/messages`,
/// `/groups/{id}/messages`), checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemMessage {
    /// At most [`MAX_CONTENT_TYPE_BYTES`]; `text/plain` when omitted.
    pub content_type: String,
    /// The body: the `text` as UTF-8, or `body_base64` decoded.
    pub body: Bytes,
}

/// Parses and checks a system message for a server whose frames are
/// `max_frame_bytes`: exactly one of `text` and `body_base64` (standard
/// alphabet, padded), and body + content type within
/// [`limits::send_content_limit`].
pub fn system_message(body: &[u8], max_frame_bytes: usize) -> Result<SystemMessage, BodyError> {
    let req: SystemMessageBody = parse(body)?;
    let content = match (req.text, req.body_base64) {
        (Some(text), None) => Bytes::from(text),
        (None, Some(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64.as_bytes())
            .map(Bytes::from)
            .map_err(|e| BodyError::Invalid(format!("body_base64: {e}")))?,
        _ => {
            return Err(BodyError::Invalid(
                "give exactly one of text and body_base64".into(),
            ));
        }
    };
    limits::check_len("content_type", &req.content_type, 0, MAX_CONTENT_TYPE_BYTES)
        .map_err(invalid)?;
    let max = limits::send_content_limit(max_frame_bytes);
    if content.len() + req.content_type.len() > max {
        return Err(BodyError::TooLarge(format!(
            "body + content_type must be at most {max} bytes"
        )));
    }
    Ok(SystemMessage {
        content_type: req.content_type,
        body: content,
    })
}

/// `POST /admin/users/{id}/kick`, checked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kick {
    /// Only this device (1..=64 bytes); all of the user's devices when absent.
    pub device_id: Option<String>,
    /// Shown to the client in the Kick frame, at most
    /// [`MAX_KICK_MESSAGE_BYTES`].
    pub message: Option<String>,
}

/// Parses and checks a [`Kick`] body; an empty (or all-whitespace) body
/// kicks every device.
pub fn kick(body: &[u8]) -> Result<Kick, BodyError> {
    let req: Kick = if body.iter().all(u8::is_ascii_whitespace) {
        Kick::default()
    } else {
        parse(body)?
    };
    if let Some(device) = &req.device_id {
        limits::check_id("device_id", device).map_err(invalid)?;
    }
    if let Some(message) = &req.message {
        limits::check_len("message", message, 0, MAX_KICK_MESSAGE_BYTES).map_err(invalid)?;
    }
    Ok(req)
}

/// `POST /admin/users/{id}/revoke`, checked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revoke {
    /// Only this device's tokens (1..=64 bytes); every device's when absent.
    pub device_id: Option<String>,
    /// Tokens whose `iat` (Unix seconds) is before this are refused; the
    /// server's default is the second after now, and it refuses a value
    /// too far ahead of its clock.
    pub issued_before: Option<u64>,
}

/// Parses and checks a [`Revoke`] body; an empty (or all-whitespace) body
/// revokes every token issued so far.
pub fn revoke(body: &[u8]) -> Result<Revoke, BodyError> {
    let req: Revoke = if body.iter().all(u8::is_ascii_whitespace) {
        Revoke::default()
    } else {
        parse(body)?
    };
    if let Some(device) = &req.device_id {
        limits::check_id("device_id", device).map_err(invalid)?;
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn create_group_checks_every_field() {
        let ok = create_group(br#"{"owner":"alice","name":"n","members":["bob"]}"#).unwrap();
        assert_eq!(ok.group_id, None);
        assert_eq!(ok.members, ["bob"]);
        for bad in [
            &br#"{"owner":""}"#[..],
            br#"{"owner":"a","group_id":""}"#,
            br#"{"owner":"a","members":[""]}"#,
            br#"{"owner":"a","colour":"red"}"#,
            b"not json",
        ] {
            assert!(
                create_group(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let long_name = format!(r#"{{"owner":"a","name":"{}"}}"#, "n".repeat(257));
        assert!(matches!(
            create_group(long_name.as_bytes()),
            Err(BodyError::Invalid(_))
        ));
    }

    #[test]
    fn a_system_message_has_one_body_within_the_frame() {
        let m = system_message(br#"{"text":"hi"}"#, 65_536).unwrap();
        assert_eq!(
            (m.content_type.as_str(), &m.body[..]),
            ("text/plain", &b"hi"[..])
        );
        let m = system_message(br#"{"body_base64":"AAE=","content_type":"x"}"#, 65_536).unwrap();
        assert_eq!(&m.body[..], [0, 1]);
        assert!(matches!(
            system_message(br#"{"text":"a","body_base64":"AA=="}"#, 65_536),
            Err(BodyError::Invalid(_))
        ));
        assert!(matches!(
            system_message(br#"{"body_base64":"***"}"#, 65_536),
            Err(BodyError::Invalid(_))
        ));
        let big = format!(r#"{{"text":"{}"}}"#, "x".repeat(70_000));
        assert!(matches!(
            system_message(big.as_bytes(), 65_536),
            Err(BodyError::TooLarge(_))
        ));
    }

    #[test]
    fn kick_and_members_bodies() {
        assert_eq!(kick(b" \n").unwrap(), Kick::default());
        assert_eq!(
            kick(br#"{"device_id":"phone"}"#)
                .unwrap()
                .device_id
                .as_deref(),
            Some("phone")
        );
        assert!(kick(br#"{"device_id":""}"#).is_err());
        assert!(members(br#"{"members":[]}"#).is_err());
        assert_eq!(members(br#"{"members":["a","b"]}"#).unwrap(), ["a", "b"]);
    }

    proptest! {
        /// Whatever the bytes, every parser answers, and what it accepts
        /// is within the limits.
        #[test]
        fn arbitrary_bodies_are_answered_and_accepted_ones_are_within_limits(
            body in proptest::collection::vec(any::<u8>(), 0..300),
            max_frame_bytes in 0usize..100_000,
        ) {
            if let Ok(g) = create_group(&body) {
                prop_assert!(g.owner.len() <= limits::MAX_ID_BYTES && !g.owner.is_empty());
                prop_assert!(g.members.len() <= limits::MAX_USERS_PER_CHANGE);
            }
            if let Ok(m) = members(&body) {
                prop_assert!(!m.is_empty() && m.len() <= limits::MAX_USERS_PER_CHANGE);
            }
            if let Ok(m) = system_message(&body, max_frame_bytes) {
                prop_assert!(m.body.len() + m.content_type.len() <= limits::send_content_limit(max_frame_bytes));
            }
            if let Ok(r) = revoke(&body) {
                prop_assert!(r.device_id.is_none_or(|d| !d.is_empty() && d.len() <= limits::MAX_ID_BYTES));
            }
            if let Ok(k) = kick(&body) {
                prop_assert!(k.message.is_none_or(|m| m.len() <= MAX_KICK_MESSAGE_BYTES));
            }
        }
    }
}
