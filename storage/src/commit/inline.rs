//! Inline entries, the notices of recalls and read receipts: one small
//! entry put in several inboxes, the conversation named as each recipient
//! sees it.

use super::*;

impl Worker {
    /// Puts the same inline entry in each user's inbox, with the
    /// conversation named as each of them sees it. The caller has checked
    /// its size ([`inline_len_bound`]).
    pub(super) fn put_inline(
        &mut self,
        users: &[Arc<str>],
        conv: &ConvKey,
        entry: proto::Deliver,
        state: &mut BatchState,
    ) -> Result<Vec<Fanout>, StorageError> {
        let conv_bytes = conv.encode();
        let mut fanouts: Vec<Fanout> = Vec::new();
        for user in users {
            let mut view = entry.clone();
            if let (ConvKey::Direct(..), Some(c)) = (conv, view.conversation.as_mut()) {
                c.id = conv.peer_of(user).to_owned();
            }
            let value = InboxValue {
                conv: conv_bytes.clone(),
                msg_id: entry.msg_id,
                inline: Some(view.clone()),
            };
            let Some(seq) = self.put_entry(user, &value, state)? else {
                continue;
            };
            match fanouts.iter_mut().find(|f| f.entry == view) {
                Some(f) => f.targets.push((user.clone(), seq)),
                None => fanouts.push(Fanout {
                    entry: view,
                    targets: vec![(user.clone(), seq)],
                }),
            }
        }
        Ok(fanouts)
    }

    pub(super) fn notice(
        &mut self,
        from: &str,
        conv: &ConvKey,
        kind: EntryKind,
        ref_msg_id: u64,
    ) -> proto::Deliver {
        let msg_id = self.next_msg_id();
        let (ckind, id) = match conv {
            ConvKey::Direct(..) => (proto::ConversationKind::Direct, String::new()),
            ConvKey::Group(g) => (proto::ConversationKind::Group, g.clone()),
        };
        proto::Deliver {
            msg_id,
            from: from.to_owned(),
            conversation: Some(proto::Conversation {
                kind: ckind as i32,
                id,
            }),
            server_time_ms: msg_id >> MSG_ID_TIME_SHIFT,
            kind: kind as i32,
            ref_msg_id,
            ..Default::default()
        }
    }
}
