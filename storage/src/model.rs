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

/// Bits of a message id below the millisecond timestamp.
pub const MSG_ID_TIME_SHIFT: u32 = 22;

/// The server time (ms) at which `msg_id` was issued.
pub fn msg_id_time_ms(msg_id: u64) -> u64 {
    msg_id >> MSG_ID_TIME_SHIFT
}
