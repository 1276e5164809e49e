//! Values stored in the column families (Protobuf via prost derive, so new
//! fields stay readable by old code and the other way round).

use bytes::Bytes;
use ferry_protocol::proto;

/// One message of a conversation (`msgs` CF): stored once, however many
/// inboxes point at it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredMessage {
    /// Sender user id ("" for system messages).
    #[prost(string, tag = "1")]
    pub from: String,
    /// `proto::EntryKind` (MESSAGE or SYSTEM).
    #[prost(int32, tag = "2")]
    pub kind: i32,
    /// App-chosen content type.
    #[prost(string, tag = "3")]
    pub content_type: String,
    /// Opaque body.
    #[prost(bytes = "bytes", tag = "4")]
    pub body: Bytes,
    /// Server time of the send.
    #[prost(uint64, tag = "5")]
    pub server_time_ms: u64,
    /// The sender's client message id.
    #[prost(uint64, tag = "6")]
    pub client_msg_id: u64,
    /// Set by a recall: the body is gone.
    #[prost(bool, tag = "7")]
    pub recalled: bool,
    /// For GROUP_EVENT entries: what changed.
    #[prost(message, optional, tag = "8")]
    pub group_event: Option<proto::GroupEvent>,
}

/// One inbox entry (`inbox` CF): a pointer to a stored message, or a small
/// entry kept inline (recall, read receipt, group event).
#[derive(Clone, PartialEq, prost::Message)]
pub struct InboxValue {
    /// Encoded conversation key of the message pointed to.
    #[prost(bytes = "vec", tag = "1")]
    pub conv: Vec<u8>,
    /// The message pointed to (or, for inline entries, the entry's own id).
    #[prost(uint64, tag = "2")]
    pub msg_id: u64,
    /// A complete entry, stored inline (seq is 0; the key has it).
    #[prost(message, optional, tag = "3")]
    pub inline: Option<proto::Deliver>,
}

/// The answer to a deduplicated send (`dedup` CF).
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct DedupValue {
    /// The message id first assigned.
    #[prost(uint64, tag = "1")]
    pub msg_id: u64,
    /// The seq of the sender's copy.
    #[prost(uint64, tag = "2")]
    pub seq: u64,
    /// Server time of the first send.
    #[prost(uint64, tag = "3")]
    pub server_time_ms: u64,
}

/// A group's metadata (`groups` CF).
#[derive(Clone, PartialEq, prost::Message)]
pub struct GroupMeta {
    /// Display name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// The owner's user id.
    #[prost(string, tag = "2")]
    pub owner: String,
    /// Creation time.
    #[prost(uint64, tag = "3")]
    pub created_ms: u64,
}

/// Bits of a message id below the millisecond timestamp: the minting
/// node's id ([`MSG_ID_NODE_BITS`]) above a per-millisecond counter
/// ([`MSG_ID_COUNTER_BITS`]). A message id is `[ms:42][node:10][counter:12]`,
/// so two nodes of a cluster never mint the same id; a single node is node 0.
pub const MSG_ID_TIME_SHIFT: u32 = MSG_ID_NODE_BITS + MSG_ID_COUNTER_BITS;

/// Bits of a message id that name the node that minted it (ids 0–1023).
pub const MSG_ID_NODE_BITS: u32 = 10;

/// Bits of a message id that count ids minted in one millisecond by one
/// node (4,096 per ms; more borrow the next millisecond).
pub const MSG_ID_COUNTER_BITS: u32 = 12;

/// The next message id after `last` for `node` at wall-clock time `now_ms`:
/// strictly greater than `last`, with `node` in its node bits. `last` may
/// have been minted under another node id (a data dir moved into a
/// cluster); the result is still greater. Time never goes backwards in the
/// ids, even when the clock does: the id borrows from `last`'s millisecond.
pub fn mint_msg_id(last: u64, now_ms: u64, node: u16) -> u64 {
    let node = u64::from(node) & ((1 << MSG_ID_NODE_BITS) - 1);
    let counter_mask = (1u64 << MSG_ID_COUNTER_BITS) - 1;
    let last_ms = last >> MSG_ID_TIME_SHIFT;
    let last_node = (last >> MSG_ID_COUNTER_BITS) & ((1 << MSG_ID_NODE_BITS) - 1);
    let (ms, counter) = if now_ms > last_ms {
        (now_ms, 0)
    } else if last_node == node && last & counter_mask < counter_mask {
        (last_ms, (last & counter_mask) + 1)
    } else if last_node < node {
        (last_ms, 0)
    } else {
        (last_ms + 1, 0)
    };
    (ms << MSG_ID_TIME_SHIFT) | (node << MSG_ID_COUNTER_BITS) | counter
}

/// The server time (ms) at which `msg_id` was issued.
pub fn msg_id_time_ms(msg_id: u64) -> u64 {
    msg_id >> MSG_ID_TIME_SHIFT
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ids_carry_the_node_and_the_time() {
        let id = mint_msg_id(0, 1_700_000_000_000, 5);
        assert_eq!(msg_id_time_ms(id), 1_700_000_000_000);
        assert_eq!((id >> MSG_ID_COUNTER_BITS) & 1023, 5);
        assert_eq!(id & 4095, 0);
        let next = mint_msg_id(id, 1_700_000_000_000, 5);
        assert_eq!(next, id + 1);
    }

    #[test]
    fn a_full_millisecond_borrows_the_next() {
        let mut id = mint_msg_id(0, 1000, 7);
        for _ in 0..4095 {
            id = mint_msg_id(id, 1000, 7);
        }
        assert_eq!(msg_id_time_ms(id), 1000);
        let next = mint_msg_id(id, 1000, 7);
        assert_eq!(msg_id_time_ms(next), 1001);
        assert_eq!((next >> MSG_ID_COUNTER_BITS) & 1023, 7);
    }

    proptest! {
        /// Whatever came before (another node's id, a clock that went
        /// back), the next id is greater and names this node.
        #[test]
        fn minted_ids_increase_and_name_their_node(
            last in any::<u64>().prop_map(|v| v >> 2),
            now in 0u64..(1 << 41),
            node in 0u16..1024,
            steps in 1usize..50,
        ) {
            let mut prev = last;
            for _ in 0..steps {
                let id = mint_msg_id(prev, now, node);
                prop_assert!(id > prev);
                prop_assert_eq!((id >> MSG_ID_COUNTER_BITS) & 1023, u64::from(node));
                prop_assert!(msg_id_time_ms(id) >= now.min(msg_id_time_ms(prev)));
                prev = id;
            }
        }

        /// Two nodes minting at the same times never mint the same id.
        #[test]
        fn two_nodes_never_collide(
            a in 0u16..1024,
            b in 0u16..1024,
            times in proptest::collection::vec(0u64..4, 1..200),
        ) {
            prop_assume!(a != b);
            let (mut la, mut lb) = (0, 0);
            let mut seen = std::collections::HashSet::new();
            for t in times {
                la = mint_msg_id(la, 1000 + t, a);
                lb = mint_msg_id(lb, 1000 + t, b);
                prop_assert!(seen.insert(la));
                prop_assert!(seen.insert(lb));
            }
        }
    }
}
