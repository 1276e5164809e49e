//! Every size limit on what a client (or an app backend through the admin
//! API) may hand the server, in one place.
//!
//! The gateway, the router, the committer and the admin API check
//! user-supplied strings here, at the edge, once: what gets past these
//! checks is safe to put in a storage key (ids are at most
//! [`MAX_ID_BYTES`], well under the 255 a key's length byte can hold) and
//! small enough that the entry built from it fits in a frame.
//!
//! Limits that depend on the configured frame size are functions of it
//! ([`send_content_limit`]); the configuration refuses a frame size below
//! [`MIN_MAX_FRAME_BYTES`], so none of them can underflow.

/// Longest user id (`sub`), device id, conversation id or group id, in bytes.
pub const MAX_ID_BYTES: usize = 64;

/// Longest group name, in bytes.
pub const MAX_GROUP_NAME_BYTES: usize = 256;

/// Longest `Send.content_type`, in bytes (an empty one is allowed).
pub const MAX_CONTENT_TYPE_BYTES: usize = 128;

/// Longest free-text message the admin API puts in a `Kick`, in bytes.
pub const MAX_KICK_MESSAGE_BYTES: usize = 256;

/// Most user ids in one group change (`create`'s initial members,
/// `add_members`, `remove_members`): one request costs at most this many
/// membership writes on the single committer thread.
pub const MAX_USERS_PER_CHANGE: usize = 500;

/// Largest `Auth` frame (the first frame of a connection), whatever the
/// configured frame size: an unauthenticated peer may make the server buffer
/// no more than this.
pub const MAX_AUTH_FRAME_BYTES: usize = 4096;

/// Smallest frame size a server may be configured with: room for an `Auth`
/// frame and for a `Send` with [`MIN_SEND_CONTENT_BYTES`] of content.
pub const MIN_MAX_FRAME_BYTES: usize = 2048;

/// Room in a frame for everything of a `Deliver` (or a page around it) but
/// the app's content: ids, times, the conversation, the frame wrapper.
pub const FRAME_HEADROOM: usize = 1024;

/// Content a `Send` may always carry, at the smallest frame size.
pub const MIN_SEND_CONTENT_BYTES: usize = MIN_MAX_FRAME_BYTES - FRAME_HEADROOM;

/// Most bytes of `Send.body` + `Send.content_type` with frames of
/// `max_frame_bytes`. Never underflows: frames below [`MIN_MAX_FRAME_BYTES`]
/// allow [`MIN_SEND_CONTENT_BYTES`] (the configuration refuses them anyway).
pub fn send_content_limit(max_frame_bytes: usize) -> usize {
    max_frame_bytes
        .max(MIN_MAX_FRAME_BYTES)
        .saturating_sub(FRAME_HEADROOM)
}

/// A user-supplied string outside its limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} must be {min}..={max} bytes (got {len})")]
pub struct LimitError {
    /// The field, as a client author knows it (`group_id`, `name`, …).
    pub field: &'static str,
    /// Shortest allowed.
    pub min: usize,
    /// Longest allowed.
    pub max: usize,
    /// What was given.
    pub len: usize,
}

/// Checks an id: 1..=[`MAX_ID_BYTES`] bytes.
pub fn check_id(field: &'static str, id: &str) -> Result<(), LimitError> {
    check_len(field, id, 1, MAX_ID_BYTES)
}

/// Checks a string of `min..=max` bytes.
pub fn check_len(
    field: &'static str,
    value: &str,
    min: usize,
    max: usize,
) -> Result<(), LimitError> {
    let len = value.len();
    if (min..=max).contains(&len) {
        Ok(())
    } else {
        Err(LimitError {
            field,
            min,
            max,
            len,
        })
    }
}

/// Checks a list of user ids for a group change: at most
/// [`MAX_USERS_PER_CHANGE`] of them, each a valid id.
pub fn check_user_list(field: &'static str, users: &[String]) -> Result<(), String> {
    if users.len() > MAX_USERS_PER_CHANGE {
        return Err(format!(
            "{field} may name at most {MAX_USERS_PER_CHANGE} users per request (got {})",
            users.len()
        ));
    }
    for user in users {
        check_id(field, user).map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_one_to_sixty_four_bytes() {
        assert!(check_id("group_id", "").is_err());
        assert!(check_id("group_id", "g").is_ok());
        assert!(check_id("group_id", &"g".repeat(64)).is_ok());
        let e = check_id("group_id", &"g".repeat(65)).unwrap_err();
        assert_eq!(e.to_string(), "group_id must be 1..=64 bytes (got 65)");
    }

    #[test]
    fn send_limit_never_underflows() {
        assert_eq!(send_content_limit(65_536), 64_512);
        assert_eq!(send_content_limit(2048), 1024);
        assert_eq!(send_content_limit(256), MIN_SEND_CONTENT_BYTES);
        assert_eq!(send_content_limit(0), MIN_SEND_CONTENT_BYTES);
    }

    #[test]
    fn user_lists_are_capped_in_count_and_id_length() {
        let ok: Vec<String> = (0..MAX_USERS_PER_CHANGE).map(|i| format!("u{i}")).collect();
        assert!(check_user_list("members", &ok).is_ok());
        let mut too_many = ok.clone();
        too_many.push("x".into());
        assert!(check_user_list("members", &too_many).is_err());
        assert!(check_user_list("members", &["".to_string()]).is_err());
        assert!(check_user_list("members", &["x".repeat(65)]).is_err());
    }
}
