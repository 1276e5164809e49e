//! Fuzzes the request checks: any frame a client sends, decoded as the
//! server decodes it, then checked as the router checks it, under a frame
//! size also chosen by the input. Nothing panics, and a request that passes
//! is within every limit, verified again field by field.
#![no_main]

use ferry_protocol::limits::{self, MAX_CONTENT_TYPE_BYTES, MAX_GROUP_NAME_BYTES, MAX_ID_BYTES};
use ferry_protocol::proto::{
    ConversationKind, Conversation, Frame, frame::Body, group_request::Op as GroupOp,
};
use ferry_protocol::requests;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fn conversation_ok(conv: &Option<Conversation>) {
    let conv = conv.as_ref().expect("a checked request has its conversation");
    assert!((1..=MAX_ID_BYTES).contains(&conv.id.len()));
    assert_ne!(conv.kind(), ConversationKind::Unspecified);
}

fn users_ok(users: &[String]) {
    assert!(users.len() <= limits::MAX_USERS_PER_CHANGE);
    assert!(users.iter().all(|u| (1..=MAX_ID_BYTES).contains(&u.len())));
}

fuzz_target!(|data: &[u8]| {
    let Some((size, frame)) = data.split_first_chunk::<2>() else {
        return;
    };
    let max_frame_bytes = u16::from_le_bytes(*size) as usize * 4;
    let Ok(Frame { body: Some(body) }) = Frame::decode(frame) else {
        return;
    };
    if requests::check(&body, max_frame_bytes).is_err() {
        return;
    }
    match &body {
        Body::Send(s) => {
            assert_ne!(s.client_msg_id, 0);
            conversation_ok(&s.to);
            assert!(s.content_type.len() <= MAX_CONTENT_TYPE_BYTES);
            assert!(
                s.body.len() + s.content_type.len() <= limits::send_content_limit(max_frame_bytes)
            );
        }
        Body::Recall(r) => {
            assert_ne!(r.msg_id, 0);
            conversation_ok(&r.conversation);
        }
        Body::Read(r) => conversation_ok(&r.conversation),
        Body::Typing(t) => conversation_ok(&t.conversation),
        Body::History(h) => conversation_ok(&h.conversation),
        Body::GroupRequest(g) => match g.op.as_ref().expect("a checked request has its op") {
            GroupOp::Create(c) => {
                assert!(c.group_id.len() <= MAX_ID_BYTES);
                assert!(c.name.len() <= MAX_GROUP_NAME_BYTES);
                users_ok(&c.members);
            }
            GroupOp::AddMembers(a) => {
                assert!((1..=MAX_ID_BYTES).contains(&a.group_id.len()));
                users_ok(&a.members);
            }
            GroupOp::RemoveMembers(r) => {
                assert!((1..=MAX_ID_BYTES).contains(&r.group_id.len()));
                users_ok(&r.members);
            }
            GroupOp::Leave(l) => assert!((1..=MAX_ID_BYTES).contains(&l.group_id.len())),
            GroupOp::Dissolve(d) => assert!((1..=MAX_ID_BYTES).contains(&d.group_id.len())),
            GroupOp::ListMembers(l) => {
                assert!((1..=MAX_ID_BYTES).contains(&l.group_id.len()));
                assert!(l.after_user_id.len() <= MAX_ID_BYTES);
            }
            GroupOp::SetRole(s) => {
                assert!((1..=MAX_ID_BYTES).contains(&s.group_id.len()));
                assert!((1..=MAX_ID_BYTES).contains(&s.user_id.len()));
            }
        },
        _ => {}
    }
});
