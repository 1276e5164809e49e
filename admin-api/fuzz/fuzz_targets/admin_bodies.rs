//! Fuzzes the admin API's request bodies: whatever an app backend (or
//! anyone holding the admin token) sends, every body parser answers without
//! panicking, and what it accepts is within the limits, checked again here
//! field by field. The first two bytes choose the server's frame size.
#![no_main]

use ferry_admin_api as bodies;
use ferry_protocol::limits::{
    self, MAX_CONTENT_TYPE_BYTES, MAX_GROUP_NAME_BYTES, MAX_ID_BYTES, MAX_KICK_MESSAGE_BYTES,
};
use libfuzzer_sys::fuzz_target;

fn id_ok(id: &str) -> bool {
    (1..=MAX_ID_BYTES).contains(&id.len())
}

fuzz_target!(|data: &[u8]| {
    let Some((size, body)) = data.split_first_chunk::<2>() else {
        return;
    };
    let max_frame_bytes = u16::from_le_bytes(*size) as usize * 4;
    if let Ok(g) = bodies::create_group(body) {
        assert!(g.group_id.as_deref().is_none_or(id_ok));
        assert!(id_ok(&g.owner));
        assert!(g.name.len() <= MAX_GROUP_NAME_BYTES);
        assert!(g.members.len() <= limits::MAX_USERS_PER_CHANGE);
        assert!(g.members.iter().all(|m| id_ok(m)));
    }
    if let Ok(members) = bodies::members(body) {
        assert!(!members.is_empty() && members.len() <= limits::MAX_USERS_PER_CHANGE);
        assert!(members.iter().all(|m| id_ok(m)));
    }
    if let Ok(m) = bodies::system_message(body, max_frame_bytes) {
        assert!(m.content_type.len() <= MAX_CONTENT_TYPE_BYTES);
        assert!(m.body.len() + m.content_type.len() <= limits::send_content_limit(max_frame_bytes));
    }
    if let Ok(r) = bodies::revoke(body) {
        assert!(r.device_id.as_deref().is_none_or(id_ok));
    }
    if let Ok(k) = bodies::kick(body) {
        assert!(k.device_id.as_deref().is_none_or(id_ok));
        assert!(k.message.is_none_or(|m| m.len() <= MAX_KICK_MESSAGE_BYTES));
    }
});
