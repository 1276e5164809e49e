//! Cluster links in the committer (docs/CLUSTER.md §2.1-2.2).
//!
//! Sending: an op that puts an entry in the inbox of a user homed on
//! another node stages it for that node instead ([`Worker::stage_remote`]),
//! together with every `msgs` row the op wrote; when the op succeeds its
//! staged items join the batch's per-node list; at commit each node's list
//! becomes one or more link batches, written to the outbox with the next
//! link seqs in the same `WriteBatch` ([`Worker::seal_links`]).
//!
//! Receiving: `Op::ApplyLink` applies a peer's link batch if it is the next
//! one of its link (the position is persisted in the same write), each
//! exactly once: message rows once, then each user's entry with the user's
//! next seq.

use std::sync::Arc;

use bytes::Bytes;
use ferry_protocol::bus;
use prost::Message;

use super::*;
use crate::keys::{self, ConvKey};
use crate::link::{LinkOut, NodeId};
use crate::model::{InboxValue, StoredMessage};

/// Largest link batch: below nsqd's default `--max-msg-size` (1 MiB) with
/// room for the envelope.
pub const MAX_LINK_BATCH_BYTES: usize = 512 * 1024;

/// Users per `Append`: with 64-byte ids, about 260 KiB, so that one append
/// always fits a link batch whatever the group size.
const USERS_PER_APPEND: usize = 4096;

/// One thing for a peer node: a message row, or an entry for its users.
#[derive(Debug)]
pub(super) enum RemoteItem {
    Row(bus::MessageRow),
    Append(bus::Append),
}

impl RemoteItem {
    fn encoded_len(&self) -> usize {
        // The field tag and length around it in a LinkBatch, at most.
        6 + match self {
            RemoteItem::Row(r) => r.encoded_len(),
            RemoteItem::Append(a) => a.encoded_len(),
        }
    }
}

/// Items for one peer node, in commit order.
#[derive(Default, Debug)]
pub(super) struct RemoteItems {
    pub items: Vec<RemoteItem>,
}

/// What the current op staged for other nodes (moved into the batch only
/// if the op succeeds).
#[derive(Default)]
pub(super) struct OpRemote {
    /// `msgs` rows the op wrote: (conversation key, msg id, encoded row).
    pub rows: Vec<(Vec<u8>, u64, Bytes)>,
    /// (node, encoded inbox value, user), in the order the op made them.
    pub appends: Vec<(NodeId, Bytes, Arc<str>)>,
}

impl OpRemote {
    pub fn clear(&mut self) {
        self.rows.clear();
        self.appends.clear();
    }
}

impl Worker {
    /// The node `user` lives on, when it is not this one.
    pub(super) fn remote_home(&self, user: &str) -> Option<NodeId> {
        let homes = self.options.homes.as_ref()?;
        let home = homes.home_of_user(user);
        (home != homes.this_node()).then_some(home)
    }

    /// Puts `value` in `user`'s inbox if the user lives here (its seq), or
    /// stages it for the user's home node (`None`).
    pub(super) fn put_entry(
        &mut self,
        user: &Arc<str>,
        value: &InboxValue,
        state: &mut BatchState,
    ) -> Result<Option<u64>, StorageError> {
        match self.remote_home(user) {
            None => self.put_inbox(user, value, state).map(Some),
            Some(node) => {
                self.op_remote
                    .appends
                    .push((node, value.encode_to_vec().into(), user.clone()));
                Ok(None)
            }
        }
    }

    /// Writes a `msgs` row (and remembers it for the nodes the op stages
    /// entries for).
    pub(super) fn put_message_row(
        &mut self,
        conv: &[u8],
        msg_id: u64,
        row: &StoredMessage,
        state: &mut BatchState,
    ) {
        let encoded = row.encode_to_vec();
        if self.options.homes.is_some() {
            self.op_remote
                .rows
                .push((conv.to_vec(), msg_id, Bytes::from(encoded.clone())));
        }
        state.put(cf::MSGS, keys::msg_key(conv, msg_id), encoded);
    }

    /// Moves what a successful op staged for other nodes into the batch:
    /// for each node the op has entries for, first every row the op wrote,
    /// then its entries (one `Append` per run of the same value).
    pub(super) fn keep_op_remote(&mut self, state: &mut BatchState) {
        if self.op_remote.appends.is_empty() {
            self.op_remote.clear();
            return;
        }
        let mut nodes: Vec<NodeId> = self.op_remote.appends.iter().map(|a| a.0).collect();
        nodes.sort_unstable();
        nodes.dedup();
        for node in nodes {
            let items = &mut state.remote.entry(node).or_default().items;
            for (conv, msg_id, row) in &self.op_remote.rows {
                items.push(RemoteItem::Row(bus::MessageRow {
                    conversation: Bytes::from(conv.clone()),
                    msg_id: *msg_id,
                    stored: row.clone(),
                }));
            }
            for (n, value, user) in &self.op_remote.appends {
                if *n != node {
                    continue;
                }
                match items.last_mut() {
                    Some(RemoteItem::Append(last))
                        if last.value == *value && last.users.len() < USERS_PER_APPEND =>
                    {
                        last.users.push(user.to_string())
                    }
                    _ => items.push(RemoteItem::Append(bus::Append {
                        value: value.clone(),
                        users: vec![user.to_string()],
                    })),
                }
            }
        }
        self.op_remote.clear();
    }

    /// Turns the batch's staged items into link batches: each gets the next
    /// seq of its node's link and goes into the outbox with the batch.
    pub(super) fn seal_links(
        &mut self,
        state: &mut BatchState,
    ) -> Result<Vec<LinkOut>, StorageError> {
        let Some(homes) = self.options.homes.clone() else {
            return Ok(Vec::new());
        };
        let this = homes.this_node();
        let mut out = Vec::new();
        for (node, items) in std::mem::take(&mut state.remote) {
            for (rows, appends) in split_items(items) {
                let previous = match self.link_out.get(&node) {
                    Some(v) => *v,
                    None => self.storage.link_out_last(node)?,
                };
                state.link_out_journal.entry(node).or_insert(previous);
                let seq = previous + 1;
                self.link_out.insert(node, seq);
                let envelope = bus::encode_envelope(
                    this,
                    node,
                    bus::envelope::Body::LinkBatch(bus::LinkBatch {
                        seq,
                        epoch: self.link_epoch,
                        messages: rows,
                        appends,
                    }),
                );
                state.put(cf::OUTBOX, keys::outbox_key(node, seq), envelope.to_vec());
                state.put(cf::META, keys::link_out_key(node), seq.to_be_bytes());
                out.push(LinkOut {
                    peer: node,
                    seq,
                    envelope,
                });
            }
        }
        Ok(out)
    }

    /// Applies a peer's link batch (see the module doc).
    pub(super) fn apply_link(
        &mut self,
        from: NodeId,
        epoch: u64,
        batch: bus::LinkBatch,
        head: &bus::LinkHead,
        state: &mut BatchState,
    ) -> Result<Outcome, StorageError> {
        let position = match self.link_in.get(&from) {
            Some(v) => *v,
            None => self.storage.link_in_applied(from)?,
        };
        let Some(applied) = link_position(position, epoch, batch.seq, head) else {
            return Ok(Outcome::Link(LinkOutcome::Dropped));
        };
        if batch.seq <= applied {
            return Ok(Outcome::Link(LinkOutcome::Applied {
                fanouts: Vec::new(),
                duplicate: true,
            }));
        }
        if batch.seq != applied + 1 {
            return Ok(Outcome::Link(LinkOutcome::NotNext));
        }
        self.set_link_in(from, epoch, batch.seq, state);
        let decoded = match decode_link_batch(&batch) {
            Ok(decoded) => decoded,
            Err(why) => {
                // Nothing of it is written, but its seq is taken: one batch
                // that can never be applied must not stop the link for good.
                return Ok(Outcome::Link(LinkOutcome::Skipped(why)));
            }
        };
        let mut rows: HashMap<(Vec<u8>, u64), StoredMessage, RandomState> = HashMap::default();
        for (row, message) in batch.messages.iter().zip(decoded.rows) {
            state.put(
                cf::MSGS,
                keys::msg_key(&row.conversation, row.msg_id),
                row.stored.to_vec(),
            );
            rows.insert((row.conversation.to_vec(), row.msg_id), message);
        }
        let mut fanouts: Vec<Fanout> = Vec::new();
        for (append, (value, conv)) in batch.appends.iter().zip(decoded.appends) {
            let row = match (&value.inline, rows.get(&(value.conv.clone(), value.msg_id))) {
                (Some(_), _) => None,
                (None, Some(row)) => Some(row.clone()),
                (None, None) => self.storage.message(&conv, value.msg_id)?,
            };
            for user in &append.users {
                let user: Arc<str> = user.as_str().into();
                if self.remote_home(&user).is_some() {
                    // Placed elsewhere by this node's node list: the digest
                    // check should have stopped this. Stored all the same:
                    // nothing acknowledged is dropped.
                    tracing::warn!(peer = from, %user, "link entry for a user homed elsewhere");
                }
                let seq = self.put_inbox(&user, &value, state)?;
                let entry = match (&value.inline, &row) {
                    (Some(inline), _) => inline.clone(),
                    (None, Some(row)) => message_entry(&user, 0, value.msg_id, &conv, row.clone()),
                    // The row is gone (expired): the entry is stored and a
                    // page reads it as it reads any such entry; no push.
                    (None, None) => continue,
                };
                // Only the last fan-out can share its entry: an append's
                // users share one (a group message), and each user's
                // entries stay in seq order, so no live push skips ahead.
                match fanouts.last_mut().filter(|f| f.entry == entry) {
                    Some(f) => f.targets.push((user, seq)),
                    None => fanouts.push(Fanout {
                        entry,
                        targets: vec![(user, seq)],
                    }),
                }
            }
        }
        Ok(Outcome::Link(LinkOutcome::Applied {
            fanouts,
            duplicate: false,
        }))
    }

    /// Moves the link position from `from` (journaled) and stages its write.
    fn set_link_in(&mut self, from: NodeId, epoch: u64, seq: u64, state: &mut BatchState) {
        let previous = self.link_in.insert(from, (epoch, seq));
        self.undo.link_in.push((from, previous));
        state.link_in_journal.entry(from).or_insert(previous);
        let mut position = Vec::with_capacity(16);
        position.extend_from_slice(&epoch.to_be_bytes());
        position.extend_from_slice(&seq.to_be_bytes());
        state.put(cf::META, keys::link_in_key(from), position);
    }
}

/// Where a link stands for a batch `(epoch, seq)` that arrives with `head`,
/// given the receiver's persisted `(epoch, applied)`: the seq the batch
/// must follow (it is applied if it is the next one), or `None` when the
/// batch belongs to no link this node can take (dropped). docs/CLUSTER.md
/// §2.6:
///
/// - same epoch: the position;
/// - a new epoch that continues the receiver's (`head.prev_epoch`, the
///   sender was restored): the smaller of the position and
///   `head.prev_through` (batches up to it are the same in both epochs);
/// - another new epoch: 0 (the link starts over), which its first batch
///   (seq 1, or `head.held_from`) takes;
///
/// then, if the batch is `head.held_from` and the position is below it,
/// `held_from - 1`: the batches in between were confirmed by this node and
/// trimmed by the sender, and this node lost them with its tail (restored
/// from a backup). Nothing the sender still holds is ever skipped.
pub fn link_position(
    (current_epoch, applied): (u64, u64),
    epoch: u64,
    seq: u64,
    head: &bus::LinkHead,
) -> Option<u64> {
    let position = if epoch == current_epoch {
        applied
    } else if head.prev_epoch != 0 && head.prev_epoch == current_epoch {
        applied.min(head.prev_through)
    } else if seq == 1 || (head.held_from != 0 && seq == head.held_from) {
        0
    } else {
        return None;
    };
    if head.held_from != 0 && seq == head.held_from && position + 1 < head.held_from {
        return Some(head.held_from - 1);
    }
    Some(position)
}

/// A link batch's contents, decoded and checked.
struct DecodedBatch {
    rows: Vec<StoredMessage>,
    appends: Vec<(InboxValue, ConvKey)>,
}

/// Decodes and checks every row and entry of a batch before anything is
/// written: what this node stores must be what a node of ours would have
/// written.
fn decode_link_batch(batch: &bus::LinkBatch) -> Result<DecodedBatch, String> {
    let mut rows = Vec::with_capacity(batch.messages.len());
    for row in &batch.messages {
        let conv = ConvKey::decode(&row.conversation)
            .ok_or("a message row's conversation key does not decode")?;
        if !storable_conv(&conv) {
            return Err("a message row's conversation id is too long".into());
        }
        rows.push(
            StoredMessage::decode(row.stored.as_ref())
                .map_err(|e| format!("a message row does not decode: {e}"))?,
        );
    }
    let mut appends = Vec::with_capacity(batch.appends.len());
    for append in &batch.appends {
        let value = InboxValue::decode(append.value.as_ref())
            .map_err(|e| format!("an inbox entry does not decode: {e}"))?;
        let conv = ConvKey::decode(&value.conv)
            .ok_or("an inbox entry's conversation key does not decode")?;
        if !storable_conv(&conv) {
            return Err("an inbox entry's conversation id is too long".into());
        }
        for user in &append.users {
            ferry_protocol::limits::check_id("user", user).map_err(|e| e.to_string())?;
        }
        appends.push((value, conv));
    }
    Ok(DecodedBatch { rows, appends })
}

/// Splits a node's items into link batches of at most
/// [`MAX_LINK_BATCH_BYTES`] (a single item may exceed it), in commit order.
///
/// Every batch is self-contained: an entry's message row is in the same
/// batch. The receiver applies several batches in one write, and an entry
/// whose row is only staged by an earlier batch of that write cannot be
/// pushed live (its row is not readable yet): that entry would wait for the
/// device's next sync. So when a split falls among the entries of one op,
/// the op's rows are repeated at the head of the next batch (the receiver
/// writes the same row twice: one row).
fn split_items(items: RemoteItems) -> Vec<(Vec<bus::MessageRow>, Vec<bus::Append>)> {
    let mut out = Vec::new();
    let (mut rows, mut appends, mut bytes) = (Vec::new(), Vec::new(), 0);
    // The rows of the op whose items are being read: rows come first, then
    // that op's entries (`keep_op_remote`). An op without rows (inline
    // entries only) leaves the previous op's rows here, and a split among
    // its entries repeats them: harmless as long as every op that changes a
    // row sends the row again (recall does), so a repeated row is current.
    let (mut op_rows, mut op_rows_bytes): (Vec<bus::MessageRow>, usize) = (Vec::new(), 0);
    let mut in_appends = false;
    for item in items.items {
        let len = item.encoded_len();
        if bytes + len > MAX_LINK_BATCH_BYTES && bytes > 0 {
            out.push((std::mem::take(&mut rows), std::mem::take(&mut appends)));
            bytes = 0;
            if matches!(item, RemoteItem::Append(_)) && !op_rows.is_empty() {
                rows.extend(op_rows.iter().cloned());
                bytes = op_rows_bytes;
            }
        }
        bytes += len;
        match item {
            RemoteItem::Row(r) => {
                if in_appends {
                    op_rows.clear();
                    op_rows_bytes = 0;
                    in_appends = false;
                }
                op_rows.push(r.clone());
                op_rows_bytes += len;
                rows.push(r);
            }
            RemoteItem::Append(a) => {
                in_appends = true;
                appends.push(a);
            }
        }
    }
    if bytes > 0 {
        out.push((rows, appends));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(msg_id: u64, body_bytes: usize) -> RemoteItem {
        RemoteItem::Row(bus::MessageRow {
            conversation: Bytes::from_static(b"d:alice:bob"),
            msg_id,
            stored: Bytes::from(vec![7u8; body_bytes]),
        })
    }

    fn append(msg_id: u64, users: usize) -> RemoteItem {
        RemoteItem::Append(bus::Append {
            value: Bytes::from(msg_id.to_be_bytes().to_vec()),
            users: (0..users)
                .map(|i| format!("user-{msg_id}-{i:04}"))
                .collect(),
        })
    }

    /// The msg ids of an append's value, as `append` encodes them.
    fn msg_id_of(a: &bus::Append) -> u64 {
        u64::from_be_bytes(a.value[..8].try_into().unwrap())
    }

    #[test]
    fn every_split_batch_carries_the_rows_of_its_entries() {
        // Ops of one row and a few entries each, then one op whose entries
        // alone span several batches (a big group).
        let mut items = Vec::new();
        for id in 1..=400u64 {
            items.push(row(id, 2_000));
            items.push(append(id, 1));
            items.push(append(id, 1));
        }
        items.push(row(1_000, 30_000));
        for _ in 0..12 {
            items.push(append(1_000, 4_096));
        }
        let batches = split_items(RemoteItems { items });
        assert!(batches.len() >= 3, "{} batches", batches.len());
        let mut entries = 0;
        for (rows, appends) in &batches {
            let len: usize = rows.iter().map(|r| 6 + r.encoded_len()).sum::<usize>()
                + appends.iter().map(|a| 6 + a.encoded_len()).sum::<usize>();
            assert!(
                len <= MAX_LINK_BATCH_BYTES || appends.len() + rows.len() <= 2,
                "batch of {len} bytes"
            );
            for a in appends {
                let id = msg_id_of(a);
                assert!(
                    rows.iter().any(|r| r.msg_id == id),
                    "entry of message {id} in a batch without its row"
                );
                entries += a.users.len();
            }
        }
        assert_eq!(entries, 800 + 12 * 4_096, "every entry once");
        // Rows are repeated only where a split fell among an op's entries.
        let rows: usize = batches.iter().map(|(r, _)| r.len()).sum();
        assert!(rows <= 401 + batches.len(), "{rows} rows");
    }
}
