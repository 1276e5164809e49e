//! Key encodings of every column family. All integers are big-endian so
//! that RocksDB's bytewise order is numeric order; strings are prefixed with
//! their length (one byte) so that one id is never a prefix of another id's
//! keys.
//!
//! The encoders take ids of at most [`MAX_ID_LEN`] bytes (what a length
//! byte can hold); callers check ids first: the committer refuses ids over
//! `ferry_protocol::limits::MAX_ID_BYTES` and every public reader of
//! [`crate::Storage`] answers "nothing stored" for them without encoding a
//! key.
//!
//! ```text
//! inbox     [len u8][user][seq u64]                      → InboxValue
//! msgs      [conv key][msg_id u64]                       → StoredMessage
//!   conv key: [0x01][len][user a][len][user b]  (direct, a < b)
//!             [0x02][len][group]                (group)
//! dedup     [len][sender][client_msg_id u64]             → DedupValue
//! cursors   [len][user][len][device]                     → acked seq u64
//! groups    [0x01][len][group]                           → GroupMeta
//!           [0x02][len][group][len][member]              → role u8
//!           [0x03][len][group]                           → dissolved at, ms u64
//!             (tombstone: a dissolved group's id is never used again)
//! meta      b"schema_version"                            → u32
//!           b"msg_id_high_water"                         → u64
//!           b"link_out"[peer u16]                        → last link seq assigned for peer u64
//!           b"link_in"[origin u16]                       → origin's epoch u64, last seq applied u64
//!           b"link_epoch"                                → this data dir's link epoch u64
//!           b"link_prev"[peer u16]                       → epoch continued u64, last seq carried u64
//!           b"seq_floor"                                 → lowest seq an inbox may get next u64 (set by a restore)
//!           b"revoked"[len][user]                        → the user's tokens issued before, Unix s u64
//!           b"revoked"[len][user][len][device]           → the same for one device of the user
//! outbox    [peer u16][link seq u64]                     → bus Envelope (a LinkBatch), until confirmed
//! ```

/// Longest id (user, device, group) a key can hold.
pub const MAX_ID_LEN: usize = 255;

fn put_id(out: &mut Vec<u8>, id: &str) {
    debug_assert!(id.len() <= MAX_ID_LEN);
    out.push(id.len() as u8);
    out.extend_from_slice(id.as_bytes());
}

/// Reads a length-prefixed id at the start of `key`; returns it and the rest.
pub fn take_id(key: &[u8]) -> Option<(&str, &[u8])> {
    let (&len, rest) = key.split_first()?;
    let len = len as usize;
    if rest.len() < len {
        return None;
    }
    let id = std::str::from_utf8(&rest[..len]).ok()?;
    Some((id, &rest[len..]))
}

/// Reads a trailing big-endian u64.
pub fn trailing_u64(key: &[u8]) -> Option<u64> {
    let tail = key.len().checked_sub(8).map(|start| &key[start..])?;
    Some(u64::from_be_bytes(tail.try_into().ok()?))
}

/// `[len][user]`: the prefix of all of a user's inbox keys.
pub fn inbox_prefix(user: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + user.len() + 8);
    put_id(&mut k, user);
    k
}

/// `[len][user][seq]`.
pub fn inbox_key(user: &str, seq: u64) -> Vec<u8> {
    let mut k = inbox_prefix(user);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Which conversation a message belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ConvKey {
    /// One-to-one between two users (stored in sorted order).
    Direct(String, String),
    /// A group.
    Group(String),
}

impl ConvKey {
    /// The direct conversation of `a` and `b`, in either order.
    pub fn direct(a: &str, b: &str) -> ConvKey {
        if a <= b {
            ConvKey::Direct(a.to_owned(), b.to_owned())
        } else {
            ConvKey::Direct(b.to_owned(), a.to_owned())
        }
    }

    /// Encoded conversation key (the prefix of its `msgs` keys).
    pub fn encode(&self) -> Vec<u8> {
        let mut k = Vec::with_capacity(48);
        match self {
            ConvKey::Direct(a, b) => {
                k.push(0x01);
                put_id(&mut k, a);
                put_id(&mut k, b);
            }
            ConvKey::Group(g) => {
                k.push(0x02);
                put_id(&mut k, g);
            }
        }
        k
    }

    /// Decodes an encoded conversation key (without the msg id).
    pub fn decode(bytes: &[u8]) -> Option<ConvKey> {
        let (&tag, rest) = bytes.split_first()?;
        match tag {
            0x01 => {
                let (a, rest) = take_id(rest)?;
                let (b, rest) = take_id(rest)?;
                rest.is_empty()
                    .then(|| ConvKey::Direct(a.to_owned(), b.to_owned()))
            }
            0x02 => {
                let (g, rest) = take_id(rest)?;
                rest.is_empty().then(|| ConvKey::Group(g.to_owned()))
            }
            _ => None,
        }
    }

    /// The conversation as `viewer` sees it: the other user for direct, the
    /// group for groups.
    pub fn peer_of<'a>(&'a self, viewer: &str) -> &'a str {
        match self {
            ConvKey::Direct(a, b) => {
                if a == viewer {
                    b
                } else {
                    a
                }
            }
            ConvKey::Group(g) => g,
        }
    }
}

/// `[conv key][msg_id]`.
pub fn msg_key(conv: &[u8], msg_id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(conv.len() + 8);
    k.extend_from_slice(conv);
    k.extend_from_slice(&msg_id.to_be_bytes());
    k
}

/// `[len][sender][client_msg_id]`.
pub fn dedup_key(sender: &str, client_msg_id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + sender.len() + 8);
    put_id(&mut k, sender);
    k.extend_from_slice(&client_msg_id.to_be_bytes());
    k
}

/// `[len][user][len][device]`.
pub fn cursor_key(user: &str, device: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + user.len() + device.len());
    put_id(&mut k, user);
    put_id(&mut k, device);
    k
}

/// `[0x01][len][group]`.
pub fn group_meta_key(group: &str) -> Vec<u8> {
    let mut k = vec![0x01];
    put_id(&mut k, group);
    k
}

/// `[0x02][len][group]`: the prefix of a group's member keys.
pub fn group_members_prefix(group: &str) -> Vec<u8> {
    let mut k = vec![0x02];
    put_id(&mut k, group);
    k
}

/// `[0x02][len][group][len][member]`.
pub fn group_member_key(group: &str, member: &str) -> Vec<u8> {
    let mut k = group_members_prefix(group);
    put_id(&mut k, member);
    k
}

/// `[0x03][len][group]`: the tombstone of a dissolved group.
pub fn group_tombstone_key(group: &str) -> Vec<u8> {
    let mut k = vec![0x03];
    put_id(&mut k, group);
    k
}

/// Schema version key in `meta`.
pub const META_SCHEMA_VERSION: &[u8] = b"schema_version";
/// Highest message id ever issued, in `meta`.
pub const META_MSG_ID_HIGH_WATER: &[u8] = b"msg_id_high_water";

/// This data dir's link epoch, in `meta` (see `crate::link`).
pub const META_LINK_EPOCH: &[u8] = b"link_epoch";

/// `b"link_out"[peer]` in `meta`: the last link seq assigned for `peer`.
pub fn link_out_key(peer: u16) -> Vec<u8> {
    let mut k = b"link_out".to_vec();
    k.extend_from_slice(&peer.to_be_bytes());
    k
}

/// `b"link_prev"[peer]` in `meta`: the epoch the link to `peer` continues
/// after a restore, and the last seq it carried over (see `crate::link`).
pub fn link_prev_key(peer: u16) -> Vec<u8> {
    let mut k = b"link_prev".to_vec();
    k.extend_from_slice(&peer.to_be_bytes());
    k
}

/// `b"link_in"[origin]` in `meta`: the last link seq applied from `origin`.
pub fn link_in_key(origin: u16) -> Vec<u8> {
    let mut k = b"link_in".to_vec();
    k.extend_from_slice(&origin.to_be_bytes());
    k
}

/// The lowest seq an inbox may get next, in `meta`: set by a restore from
/// a backup (see `crate::backup`), absent otherwise.
pub const META_SEQ_FLOOR: &[u8] = b"seq_floor";

/// The prefix of every token revocation in `meta` (see `crate::revocation`).
pub const META_REVOKED_PREFIX: &[u8] = b"revoked";

/// `b"revoked"[len][user]`, and `[len][device]` after it for one device:
/// the revocation of `user`'s tokens (on `device`, or on every device).
pub fn revoked_key(user: &str, device: Option<&str>) -> Vec<u8> {
    let mut k = Vec::with_capacity(META_REVOKED_PREFIX.len() + 2 + user.len() + 64);
    k.extend_from_slice(META_REVOKED_PREFIX);
    put_id(&mut k, user);
    if let Some(device) = device {
        put_id(&mut k, device);
    }
    k
}

/// The user and device (`None`: every device) of a [`revoked_key`].
pub fn decode_revoked_key(key: &[u8]) -> Option<(&str, Option<&str>)> {
    let rest = key.strip_prefix(META_REVOKED_PREFIX)?;
    let (user, rest) = take_id(rest)?;
    if rest.is_empty() {
        return Some((user, None));
    }
    let (device, rest) = take_id(rest)?;
    rest.is_empty().then_some((user, Some(device)))
}

/// `[peer][seq]` in `outbox`.
pub fn outbox_key(peer: u16, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(10);
    k.extend_from_slice(&peer.to_be_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbox_keys_sort_by_user_then_numeric_seq() {
        let mut keys = vec![
            inbox_key("bob", 2),
            inbox_key("alice", 256),
            inbox_key("alice", 1),
            inbox_key("alice", 255),
            inbox_key("bob", 1),
        ];
        keys.sort();
        assert_eq!(
            keys,
            vec![
                inbox_key("bob", 1),
                inbox_key("bob", 2),
                inbox_key("alice", 1),
                inbox_key("alice", 255),
                inbox_key("alice", 256),
            ],
            "length prefix groups users; seq is numeric within one user"
        );
    }

    #[test]
    fn one_user_is_never_a_prefix_of_another() {
        // "al" + seq bytes must not fall inside "alice"'s range.
        let al = inbox_prefix("al");
        let alice = inbox_prefix("alice");
        assert!(!alice.starts_with(&al));
        assert!(!inbox_key("alice", 7).starts_with(&al));
    }

    #[test]
    fn msg_keys_sort_by_conversation_then_id() {
        let c = ConvKey::direct("bob", "alice").encode();
        assert!(msg_key(&c, 1) < msg_key(&c, 2));
        assert!(msg_key(&c, 255) < msg_key(&c, 256));
        assert_eq!(ConvKey::decode(&c), Some(ConvKey::direct("alice", "bob")));
        let g = ConvKey::Group("g1".into()).encode();
        assert_eq!(ConvKey::decode(&g), Some(ConvKey::Group("g1".into())));
        assert_eq!(trailing_u64(&msg_key(&g, 99)), Some(99));
    }

    #[test]
    fn direct_conversation_is_symmetric() {
        assert_eq!(ConvKey::direct("a", "b"), ConvKey::direct("b", "a"));
        let c = ConvKey::direct("a", "b");
        assert_eq!(c.peer_of("a"), "b");
        assert_eq!(c.peer_of("b"), "a");
    }

    #[test]
    fn group_member_keys_share_the_group_prefix() {
        let p = group_members_prefix("g");
        assert!(group_member_key("g", "zed").starts_with(&p));
        assert!(!group_member_key("gg", "zed").starts_with(&p));
        assert!(group_meta_key("g") < p, "meta keys sort before member keys");
    }

    #[test]
    fn revocation_keys_round_trip_and_sort_user_first() {
        let all = revoked_key("alice", None);
        let phone = revoked_key("alice", Some("phone"));
        assert_eq!(decode_revoked_key(&all), Some(("alice", None)));
        assert_eq!(decode_revoked_key(&phone), Some(("alice", Some("phone"))));
        assert!(all < phone, "a user's own key comes before its devices'");
        assert!(phone.starts_with(&all));
        assert!(
            !all.starts_with(&revoked_key("al", None)),
            "the length byte keeps one user's keys out of another's range"
        );
        assert_eq!(decode_revoked_key(b"revoked"), None);
        assert_eq!(decode_revoked_key(b"link_epoch"), None);
        let mut trailing = phone.clone();
        trailing.push(0);
        assert_eq!(decode_revoked_key(&trailing), None);
        // No other meta key falls inside the revocations' range.
        for other in [
            META_SCHEMA_VERSION,
            META_MSG_ID_HIGH_WATER,
            META_LINK_EPOCH,
            META_SEQ_FLOOR,
        ] {
            assert!(!other.starts_with(META_REVOKED_PREFIX));
        }
    }

    #[test]
    fn tombstones_sort_after_every_group_key_and_match_no_prefix() {
        let t = group_tombstone_key("g");
        assert_eq!(t, vec![0x03, 1, b'g']);
        // After every meta and member key of any group, so member scans
        // (which stop at the end of their prefix) never meet one.
        assert!(group_member_key(&"z".repeat(64), &"z".repeat(64)) < group_tombstone_key(""));
        assert!(group_meta_key("g") < t);
        assert!(!t.starts_with(&group_members_prefix("g")));
        assert!(!group_tombstone_key("gg").starts_with(&t));
        assert!(group_tombstone_key("g") < group_tombstone_key("gg"));
    }
}
