//! `Op::Send`: a message to a user or a group (also a system message from
//! the admin API): dedup by (sender, client msg id), membership, size,
//! then the message row once and one inbox entry per recipient.

use super::*;

impl Worker {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn send(
        &mut self,
        from: Arc<str>,
        client_msg_id: u64,
        to: Target,
        content_type: String,
        body: Bytes,
        system: bool,
        state: &mut BatchState,
    ) -> Result<Outcome, StorageError> {
        if client_msg_id != 0 && !system {
            let known = match state.dedup.get(&(from.clone(), client_msg_id)) {
                Some(v) => Some(*v),
                None => self.storage.dedup(&from, client_msg_id)?,
            };
            if let Some(first) = known {
                return Ok(Outcome::Sent {
                    ack: proto::SendAck {
                        client_msg_id,
                        msg_id: first.msg_id,
                        server_time_ms: first.server_time_ms,
                        seq: first.seq,
                    },
                    duplicate: true,
                    recipients: 0,
                    fanouts: Vec::new(),
                });
            }
        }
        let recipients: Vec<Arc<str>> = match &to {
            Target::Direct(peer) => {
                let mut r = vec![peer.clone()];
                if !system && *peer != from {
                    r.push(from.clone());
                }
                r
            }
            Target::Group(g) => {
                let Some(group) = self.group_in_batch(g, state)? else {
                    return Ok(Outcome::Refused(refuse(
                        ErrorCode::NoSuchGroup,
                        format!("no group {g}"),
                    )));
                };
                if !system && !group.is_member(&from) {
                    return Ok(Outcome::Refused(refuse(
                        ErrorCode::NotAMember,
                        format!("not a member of {g}"),
                    )));
                }
                group.members.clone()
            }
        };
        let conv = to.conv(&from);
        let conv_bytes = conv.encode();
        let msg_id = self.next_msg_id();
        let time = msg_id >> MSG_ID_TIME_SHIFT;
        let msg = StoredMessage {
            from: from.to_string(),
            kind: if system {
                EntryKind::System
            } else {
                EntryKind::Message
            } as i32,
            content_type,
            body,
            server_time_ms: time,
            client_msg_id,
            recalled: false,
            group_event: None,
        };
        if let Some(refusal) = self.refuse_unfit("the message", entry_len_bound(&msg)) {
            return Ok(Outcome::Refused(refusal));
        }
        self.put_message_row(&conv_bytes, msg_id, &msg, state);
        let pointer = InboxValue {
            conv: conv_bytes,
            msg_id,
            inline: None,
        };
        let mut sender_seq = 0;
        let mut others = Vec::with_capacity(recipients.len());
        let written = recipients
            .iter()
            .filter(|user| system || **user != from)
            .count();
        for user in &recipients {
            // A user homed on another node gets the entry there (cluster mode).
            let Some(seq) = self.put_entry(user, &pointer, state)? else {
                continue;
            };
            if *user == from && !system {
                sender_seq = seq;
            } else {
                others.push((user.clone(), seq));
            }
        }
        let mut fanouts = Vec::with_capacity(2);
        if !others.is_empty() {
            // Everyone but the sender sees the same entry, except that a
            // direct conversation is named after the other party.
            let viewer = others[0].0.clone();
            fanouts.push(Fanout {
                entry: message_entry(&viewer, 0, msg_id, &conv, msg.clone()),
                targets: others,
            });
        }
        if sender_seq != 0 {
            fanouts.push(Fanout {
                entry: message_entry(&from, 0, msg_id, &conv, msg),
                targets: vec![(from.clone(), sender_seq)],
            });
        }
        if client_msg_id != 0 && !system {
            let record = DedupValue {
                msg_id,
                seq: sender_seq,
                server_time_ms: time,
            };
            state.put(
                cf::DEDUP,
                keys::dedup_key(&from, client_msg_id),
                record.encode_to_vec(),
            );
            self.stage_dedup((from.clone(), client_msg_id), record, state);
        }
        Ok(Outcome::Sent {
            ack: proto::SendAck {
                client_msg_id,
                msg_id,
                server_time_ms: time,
                seq: sender_seq,
            },
            duplicate: false,
            recipients: written,
            fanouts,
        })
    }
}
