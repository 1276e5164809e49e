//! `Op::Recall`: the sender takes a message back within the window; a
//! notice goes to everyone in the conversation.

use super::*;

impl Worker {
    pub(super) fn recall(
        &mut self,
        from: Arc<str>,
        to: Target,
        msg_id: u64,
        window_ms: u64,
        state: &mut BatchState,
    ) -> Result<Outcome, StorageError> {
        let conv = to.conv(&from);
        let Some(mut msg) = self.storage.message(&conv, msg_id)? else {
            return Ok(Outcome::Refused(refuse(
                ErrorCode::NoSuchMessage,
                "no such message in this conversation",
            )));
        };
        if msg.from != *from {
            return Ok(Outcome::Refused(refuse(
                ErrorCode::NoSuchMessage,
                "only the sender may recall a message",
            )));
        }
        if msg.recalled {
            return Ok(Outcome::Recalled {
                msg_id,
                fanouts: Vec::new(),
            });
        }
        if now_ms().saturating_sub(msg.server_time_ms) > window_ms {
            return Ok(Outcome::Refused(refuse(
                ErrorCode::RecallWindowExpired,
                format!("recall window of {} s has passed", window_ms / 1000),
            )));
        }
        let users: Vec<Arc<str>> = match &to {
            Target::Direct(peer) if *peer != from => vec![peer.clone(), from.clone()],
            Target::Direct(_) => vec![from.clone()],
            Target::Group(g) => {
                let mut users = match self.group_in_batch(g, state)? {
                    Some(group) => group.members.clone(),
                    None => Vec::new(),
                };
                // A sender who has left still sees their own recall.
                if !users.contains(&from) {
                    users.push(from.clone());
                }
                users
            }
        };
        let entry = self.notice(&from, &conv, EntryKind::Recall, msg_id);
        if let Some(refusal) = self.refuse_unfit("the recall", inline_len_bound(&entry)) {
            return Ok(Outcome::Refused(refusal));
        }
        msg.recalled = true;
        msg.body = Bytes::new();
        msg.content_type.clear();
        self.put_message_row(&conv.encode(), msg_id, &msg, state);
        let fanouts = self.put_inline(&users, &conv, entry, state)?;
        Ok(Outcome::Recalled { msg_id, fanouts })
    }
}
