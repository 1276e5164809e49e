//! `Op::Read`: read receipts, only into conversations the reader is part of.

use super::*;

impl Worker {
    /// A read receipt. It goes only into conversations the reader is part
    /// of: for DIRECT, `up_to_msg_id` must be a message the peer sent in
    /// this conversation (one point read), so a receipt reaches only a user
    /// who wrote to the reader; for GROUP, the reader must be a member (and
    /// only the reader's own inbox gets the entry).
    pub(super) fn read(
        &mut self,
        from: Arc<str>,
        to: Target,
        up_to_msg_id: u64,
        state: &mut BatchState,
    ) -> Result<Outcome, StorageError> {
        let conv = to.conv(&from);
        let users: Vec<Arc<str>> = match &to {
            Target::Direct(peer) => {
                let from_peer = self
                    .storage
                    .message(&conv, up_to_msg_id)?
                    .is_some_and(|msg| msg.from == **peer);
                if !from_peer {
                    return Ok(Outcome::Refused(refuse(
                        ErrorCode::NoSuchMessage,
                        format!("up_to_msg_id is not a message {peer} sent in this conversation"),
                    )));
                }
                if *peer != from {
                    vec![peer.clone(), from.clone()]
                } else {
                    vec![from.clone()]
                }
            }
            Target::Group(g) => {
                match self.group_in_batch(g, state)? {
                    None => {
                        return Ok(Outcome::Refused(refuse(
                            ErrorCode::NoSuchGroup,
                            format!("no group {g}"),
                        )));
                    }
                    Some(group) if !group.is_member(&from) => {
                        return Ok(Outcome::Refused(refuse(
                            ErrorCode::NotAMember,
                            format!("not a member of {g}"),
                        )));
                    }
                    Some(_) => {}
                }
                vec![from.clone()]
            }
        };
        let entry = self.notice(&from, &conv, EntryKind::Read, up_to_msg_id);
        if let Some(refusal) = self.refuse_unfit("the read receipt", inline_len_bound(&entry)) {
            return Ok(Outcome::Refused(refusal));
        }
        let fanouts = self.put_inline(&users, &conv, entry, state)?;
        Ok(Outcome::Applied { fanouts })
    }
}
