//! The checks every client request passes before the server acts on it:
//! required fields and the limits of every client-supplied string, one
//! function per request body, each answered with `INVALID_REQUEST` and the
//! message here. They read nothing but the request (whether a group exists
//! or a user is a member is the server's business after them).
//!
//! The router applies them to every request; the `requests` fuzz target
//! and the property tests below run them on arbitrary frames, so what they
//! let through is known to be within [`crate::limits`].

use crate::limits::{self, MAX_CONTENT_TYPE_BYTES, MAX_GROUP_NAME_BYTES, MAX_ID_BYTES};
use crate::proto::{
    self, ConversationKind, Recall, Send, frame::Body, group_request::Op as GroupOp,
};

/// Why a request is refused; the server answers `INVALID_REQUEST` with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

impl From<limits::LimitError> for Invalid {
    fn from(e: limits::LimitError) -> Self {
        Invalid(e.to_string())
    }
}

/// A checked conversation: its kind (never unspecified) and its id
/// (1..=[`MAX_ID_BYTES`] bytes).
pub type Target<'a> = (ConversationKind, &'a str);

/// A request's `conversation`: required, with a kind and a valid id.
pub fn conversation(conv: Option<&proto::Conversation>) -> Result<Target<'_>, Invalid> {
    let conv = conv.ok_or_else(|| Invalid("conversation is required".into()))?;
    limits::check_id("conversation.id", &conv.id)?;
    match conv.kind() {
        ConversationKind::Unspecified => Err(Invalid("conversation kind is required".into())),
        kind => Ok((kind, conv.id.as_str())),
    }
}

/// A `Send` with frames of `max_frame_bytes`: a non-zero `client_msg_id`, a
/// valid `to`, a `content_type` of at most [`MAX_CONTENT_TYPE_BYTES`], and
/// body + content type within [`limits::send_content_limit`].
pub fn send(send: &Send, max_frame_bytes: usize) -> Result<Target<'_>, Invalid> {
    if send.client_msg_id == 0 {
        return Err(Invalid("client_msg_id must be non-zero".into()));
    }
    let to = conversation(send.to.as_ref())?;
    limits::check_len(
        "content_type",
        &send.content_type,
        0,
        MAX_CONTENT_TYPE_BYTES,
    )?;
    let size = send.body.len() + send.content_type.len();
    let max = limits::send_content_limit(max_frame_bytes);
    if size > max {
        return Err(Invalid(format!(
            "body + content_type must be at most {max} bytes (got {size})"
        )));
    }
    Ok(to)
}

/// A `Recall`: a valid conversation and a non-zero `msg_id`.
pub fn recall(recall: &Recall) -> Result<Target<'_>, Invalid> {
    let to = conversation(recall.conversation.as_ref())?;
    if recall.msg_id == 0 {
        return Err(Invalid("msg_id is required".into()));
    }
    Ok(to)
}

/// A group op: group ids and user ids 1..=64 bytes (a `create`'s
/// `group_id` may be empty: the server picks one), names up to
/// [`MAX_GROUP_NAME_BYTES`], user lists up to
/// [`limits::MAX_USERS_PER_CHANGE`]. The message names the field and the
/// limit.
pub fn group_op(op: &GroupOp) -> Result<(), Invalid> {
    let users = |field, users: &[String]| limits::check_user_list(field, users).map_err(Invalid);
    match op {
        GroupOp::Create(c) => {
            limits::check_len("group_id", &c.group_id, 0, MAX_ID_BYTES)?;
            limits::check_len("name", &c.name, 0, MAX_GROUP_NAME_BYTES)?;
            users("members", &c.members)
        }
        GroupOp::AddMembers(a) => {
            limits::check_id("group_id", &a.group_id)?;
            users("members", &a.members)
        }
        GroupOp::RemoveMembers(r) => {
            limits::check_id("group_id", &r.group_id)?;
            users("members", &r.members)
        }
        GroupOp::Leave(l) => Ok(limits::check_id("group_id", &l.group_id)?),
        GroupOp::Dissolve(d) => Ok(limits::check_id("group_id", &d.group_id)?),
        GroupOp::ListMembers(l) => {
            limits::check_id("group_id", &l.group_id)?;
            Ok(limits::check_len(
                "after_user_id",
                &l.after_user_id,
                0,
                MAX_ID_BYTES,
            )?)
        }
        GroupOp::SetRole(s) => {
            limits::check_id("group_id", &s.group_id)?;
            Ok(limits::check_id("user_id", &s.user_id)?)
        }
    }
}

/// A `GroupRequest`: it has an op, and the op passes [`group_op`].
pub fn group_request(request: &proto::GroupRequest) -> Result<&GroupOp, Invalid> {
    let op = request
        .op
        .as_ref()
        .ok_or_else(|| Invalid("group request has no op".into()))?;
    group_op(op)?;
    Ok(op)
}

/// Every check above that applies to `body`, as the router makes them
/// (bodies with no client-supplied strings pass). For the fuzz target and
/// tests; the router calls the function of each body where it handles it.
pub fn check(body: &Body, max_frame_bytes: usize) -> Result<(), Invalid> {
    match body {
        Body::Send(s) => send(s, max_frame_bytes).map(drop),
        Body::Recall(r) => recall(r).map(drop),
        Body::Read(r) => conversation(r.conversation.as_ref()).map(drop),
        Body::Typing(t) => conversation(t.conversation.as_ref()).map(drop),
        Body::History(h) => conversation(h.conversation.as_ref()).map(drop),
        Body::GroupRequest(g) => group_request(g).map(drop),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Frame;
    use proptest::prelude::*;
    use prost::Message;

    fn conv(kind: ConversationKind, id: &str) -> Option<proto::Conversation> {
        Some(proto::Conversation {
            kind: kind as i32,
            id: id.into(),
        })
    }

    #[test]
    fn a_send_needs_an_id_a_conversation_and_content_within_the_frame() {
        let ok = Send {
            client_msg_id: 1,
            to: conv(ConversationKind::Direct, "bob"),
            content_type: "text/plain".into(),
            body: vec![0; 100].into(),
        };
        assert_eq!(send(&ok, 65_536), Ok((ConversationKind::Direct, "bob")));
        let refused = [
            Send {
                client_msg_id: 0,
                ..ok.clone()
            },
            Send {
                to: None,
                ..ok.clone()
            },
            Send {
                to: conv(ConversationKind::Unspecified, "bob"),
                ..ok.clone()
            },
            Send {
                to: conv(ConversationKind::Group, &"g".repeat(65)),
                ..ok.clone()
            },
            Send {
                content_type: "t".repeat(129),
                ..ok.clone()
            },
            Send {
                body: vec![0; 65_536].into(),
                ..ok.clone()
            },
        ];
        for s in &refused {
            assert!(send(s, 65_536).is_err(), "{s:?}");
        }
        assert_eq!(
            send(&refused[0], 65_536).unwrap_err().0,
            "client_msg_id must be non-zero"
        );
    }

    #[test]
    fn a_recall_needs_a_msg_id() {
        let r = Recall {
            request_id: 1,
            msg_id: 0,
            conversation: conv(ConversationKind::Group, "g"),
        };
        assert_eq!(recall(&r).unwrap_err().0, "msg_id is required");
        assert!(recall(&Recall { msg_id: 9, ..r }).is_ok());
    }

    #[test]
    fn a_group_request_needs_an_op() {
        let request = proto::GroupRequest {
            request_id: 1,
            op: None,
        };
        assert_eq!(
            group_request(&request).unwrap_err().0,
            "group request has no op"
        );
    }

    #[test]
    fn every_group_op_checks_its_strings_at_the_edge() {
        let long = "x".repeat(65);
        let many: Vec<String> = (0..501).map(|i| format!("u{i}")).collect();
        let refused = [
            GroupOp::Create(proto::CreateGroup {
                group_id: long.clone(),
                ..Default::default()
            }),
            GroupOp::Create(proto::CreateGroup {
                name: "n".repeat(257),
                ..Default::default()
            }),
            GroupOp::Create(proto::CreateGroup {
                members: many.clone(),
                ..Default::default()
            }),
            GroupOp::AddMembers(proto::AddMembers {
                group_id: "g".into(),
                members: vec![long.clone()],
            }),
            GroupOp::RemoveMembers(proto::RemoveMembers {
                group_id: "g".into(),
                members: many,
            }),
            GroupOp::Leave(proto::LeaveGroup {
                group_id: "".into(),
            }),
            GroupOp::Dissolve(proto::DissolveGroup {
                group_id: long.clone(),
            }),
            GroupOp::ListMembers(proto::ListMembers {
                group_id: "g".repeat(300),
                ..Default::default()
            }),
            GroupOp::ListMembers(proto::ListMembers {
                group_id: "g".into(),
                after_user_id: long.clone(),
                limit: 0,
            }),
            GroupOp::SetRole(proto::SetRole {
                group_id: "g".into(),
                user_id: "".into(),
                role: 2,
            }),
        ];
        for op in &refused {
            assert!(group_op(op).is_err(), "{op:?}");
        }
        let fine = [
            GroupOp::Create(proto::CreateGroup {
                group_id: "".into(),
                name: "n".repeat(256),
                members: vec!["m".repeat(64)],
            }),
            GroupOp::ListMembers(proto::ListMembers {
                group_id: "g".repeat(64),
                after_user_id: "".into(),
                limit: 0,
            }),
        ];
        for op in &fine {
            assert_eq!(group_op(op), Ok(()), "{op:?}");
        }
    }

    /// What a request that passes [`check`] guarantees, checked again
    /// field by field, independently of how `check` is written.
    fn assert_within_limits(body: &Body, max_frame_bytes: usize) {
        let conv_ok = |c: &Option<proto::Conversation>| {
            let c = c.as_ref().expect("a conversation");
            assert!((1..=MAX_ID_BYTES).contains(&c.id.len()));
            assert_ne!(c.kind(), ConversationKind::Unspecified);
        };
        let ids_ok = |users: &[String]| {
            assert!(users.len() <= limits::MAX_USERS_PER_CHANGE);
            assert!(users.iter().all(|u| (1..=MAX_ID_BYTES).contains(&u.len())));
        };
        match body {
            Body::Send(s) => {
                assert_ne!(s.client_msg_id, 0);
                conv_ok(&s.to);
                assert!(s.content_type.len() <= MAX_CONTENT_TYPE_BYTES);
                assert!(
                    s.body.len() + s.content_type.len()
                        <= limits::send_content_limit(max_frame_bytes)
                );
            }
            Body::Recall(r) => {
                assert_ne!(r.msg_id, 0);
                conv_ok(&r.conversation);
            }
            Body::Read(r) => conv_ok(&r.conversation),
            Body::Typing(t) => conv_ok(&t.conversation),
            Body::History(h) => conv_ok(&h.conversation),
            Body::GroupRequest(g) => match g.op.as_ref().expect("an op") {
                GroupOp::Create(c) => {
                    assert!(c.group_id.len() <= MAX_ID_BYTES);
                    assert!(c.name.len() <= MAX_GROUP_NAME_BYTES);
                    ids_ok(&c.members);
                }
                GroupOp::AddMembers(a) => ids_ok(&a.members),
                GroupOp::RemoveMembers(r) => ids_ok(&r.members),
                _ => {}
            },
            _ => {}
        }
    }

    proptest! {
        #[test]
        fn arbitrary_frames_are_checked_without_panicking(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
            max_frame_bytes in 0usize..200_000,
        ) {
            if let Ok(Frame { body: Some(body) }) = Frame::decode(bytes.as_slice())
                && check(&body, max_frame_bytes).is_ok()
            {
                assert_within_limits(&body, max_frame_bytes);
            }
        }

        #[test]
        fn generated_sends_pass_exactly_when_within_limits(
            client_msg_id in 0u64..3,
            kind in 0i32..4,
            id_len in 0usize..70,
            content_type_len in 0usize..140,
            body_len in 0usize..4_000,
            max_frame_bytes in 0usize..5_000,
        ) {
            let s = Send {
                client_msg_id,
                to: Some(proto::Conversation { kind, id: "i".repeat(id_len) }),
                content_type: "t".repeat(content_type_len),
                body: vec![1; body_len].into(),
            };
            let within = client_msg_id != 0
                && (1..=2).contains(&kind)
                && (1..=MAX_ID_BYTES).contains(&id_len)
                && content_type_len <= MAX_CONTENT_TYPE_BYTES
                && body_len + content_type_len <= limits::send_content_limit(max_frame_bytes);
            prop_assert_eq!(send(&s, max_frame_bytes).is_ok(), within);
        }
    }
}
