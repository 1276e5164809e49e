//! What the committer refuses before it stages anything: client strings
//! over `ferry_protocol::limits` ([`check_op`]) and entries that would not
//! fit a frame ([`Worker::refuse_unfit`]), with the size bounds they use.

use super::*;

/// Bytes a `Deliver` built from a [`StoredMessage`] can have beyond the
/// stored message's own encoding: `seq`, `msg_id` and `ref_msg_id` (at most
/// 11 bytes each), the conversation (tag, length, kind, and an id of at
/// most [`MAX_ID_BYTES`] with its tag and length) and a kind that differs
/// from the stored one (2).
pub(super) const DELIVER_EXTRA_BYTES: usize = 3 * 11 + (2 + 2 + 2 + MAX_ID_BYTES) + 2;

/// An upper bound of the encoded size of the `Deliver` any viewer gets for
/// `msg` (whatever its seq, whatever the conversation is called for them).
pub(super) fn entry_len_bound(msg: &StoredMessage) -> usize {
    msg.encoded_len() + DELIVER_EXTRA_BYTES
}

/// An upper bound of the encoded size of an inline entry as any viewer of
/// it sees it: its seq is filled in and, for a direct conversation, the
/// conversation id becomes the viewer's peer.
pub(super) fn inline_len_bound(entry: &proto::Deliver) -> usize {
    entry.encoded_len() + 11 + (2 + MAX_ID_BYTES)
}

/// Checks every client-supplied string of `op` against
/// `ferry_protocol::limits` (ids, names, content types, user lists), before
/// anything is read or staged. The router and the admin API check first;
/// this is the committer's own defence: nothing longer ever reaches a key
/// or an entry.
pub(super) fn check_op(op: &Op, options: &CommitOptions) -> Result<(), Refusal> {
    let invalid = |e: limits::LimitError| refuse(ErrorCode::InvalidRequest, e.to_string());
    let check_target = |to: &Target| match to {
        Target::Direct(id) | Target::Group(id) => limits::check_id("conversation.id", id),
    };
    let check_users = |field: &'static str, users: &[String]| {
        if users.len() > options.max_users_per_change {
            return Err(refuse(
                ErrorCode::InvalidRequest,
                format!(
                    "{field} may name at most {} users per request (got {})",
                    options.max_users_per_change,
                    users.len()
                ),
            ));
        }
        users
            .iter()
            .try_for_each(|u| limits::check_id(field, u))
            .map_err(invalid)
    };
    match op {
        Op::Send {
            from,
            to,
            content_type,
            system,
            ..
        } => {
            if !system {
                limits::check_id("from", from).map_err(invalid)?;
            }
            check_target(to).map_err(invalid)?;
            limits::check_len("content_type", content_type, 0, MAX_CONTENT_TYPE_BYTES)
                .map_err(invalid)
        }
        Op::Recall { from, to, .. } | Op::Read { from, to, .. } => {
            limits::check_id("from", from).map_err(invalid)?;
            check_target(to).map_err(invalid)
        }
        Op::Ack { user, device, .. } => {
            limits::check_id("user", user).map_err(invalid)?;
            limits::check_id("device_id", device).map_err(invalid)
        }
        Op::Group { actor, change } => {
            limits::check_id("actor", actor).map_err(invalid)?;
            match change {
                GroupChange::Create {
                    group_id,
                    name,
                    members,
                } => {
                    if !group_id.is_empty() {
                        limits::check_id("group_id", group_id).map_err(invalid)?;
                    }
                    limits::check_len("name", name, 0, MAX_GROUP_NAME_BYTES).map_err(invalid)?;
                    check_users("members", members)
                }
                GroupChange::Add { group_id, members }
                | GroupChange::Remove { group_id, members } => {
                    limits::check_id("group_id", group_id).map_err(invalid)?;
                    check_users("members", members)
                }
                GroupChange::Leave { group_id } | GroupChange::Dissolve { group_id } => {
                    limits::check_id("group_id", group_id).map_err(invalid)
                }
                GroupChange::SetRole { group_id, user, .. } => {
                    limits::check_id("group_id", group_id).map_err(invalid)?;
                    limits::check_id("user_id", user).map_err(invalid)
                }
            }
        }
        // Checked entry by entry as it is applied (`link::decode_link_batch`).
        Op::ApplyLink { .. } => Ok(()),
        Op::Revoke { user, device, .. } => {
            limits::check_id("user_id", user).map_err(invalid)?;
            device
                .as_deref()
                .map_or(Ok(()), |d| limits::check_id("device_id", d))
                .map_err(invalid)
        }
    }
}

impl Worker {
    /// Refuses an entry whose size bound exceeds `max_entry_bytes`.
    pub(super) fn refuse_unfit(&self, what: &str, len_bound: usize) -> Option<Refusal> {
        let max = self.options.max_entry_bytes;
        (len_bound > max).then(|| {
            refuse(
                ErrorCode::InvalidRequest,
                format!(
                    "{what} would not fit in a frame: its entry takes up to {len_bound} bytes, \
                     at most {max} can be delivered"
                ),
            )
        })
    }

    /// [`Worker::refuse_unfit`] for the entry a group event becomes.
    pub(super) fn refuse_unfit_event(
        &self,
        actor: &str,
        event: &proto::GroupEvent,
    ) -> Option<Refusal> {
        let without_event = StoredMessage {
            from: actor.to_owned(),
            kind: EntryKind::GroupEvent as i32,
            server_time_ms: u64::MAX,
            ..Default::default()
        };
        let bound =
            entry_len_bound(&without_event) + prost::encoding::message::encoded_len(8, event);
        self.refuse_unfit("the group event", bound)
    }
}
