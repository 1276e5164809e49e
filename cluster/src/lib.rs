//! Which node owns a user or a group.
//!
//! A ferry cluster is a fixed list of nodes, the same in every node's
//! configuration. A user's **home node** (where the user's connections and
//! inbox live) and a group's **owner node** (which orders the group's
//! messages) are both chosen by rendezvous hashing ("highest random weight")
//! of the id over the node ids: every node computes the same answer from the
//! same list, with no coordination, and adding or removing a node moves only
//! the ids that land on, or lived on, that node.
//!
//! [`Placement::single`] is a node outside any cluster: every key is local,
//! nothing is hashed, and its id is [`NodeId::SINGLE`] (0).
//!
//! # The placement function (normative; `docs/CLUSTER.md` repeats it)
//!
//! All arithmetic is on unsigned 64-bit integers, wrapping (mod 2^64).
//!
//! ```text
//! fnv1a64(bytes):                       // FNV-1a, 64-bit
//!     h = 0xcbf29ce484222325
//!     for each byte b: h = (h XOR b) * 0x00000100000001b3
//!     return h
//!
//! splitmix64(x):                        // the SplitMix64 finalizer
//!     z = x + 0x9e3779b97f4a7c15
//!     z = (z XOR (z >> 30)) * 0xbf58476d1ce4e5b9
//!     z = (z XOR (z >> 27)) * 0x94d049bb133111eb
//!     return z XOR (z >> 31)
//!
//! owner(key, node_ids):                 // key = the user id or group id, UTF-8 bytes
//!     k = fnv1a64(key)
//!     for each node id n (1..=1023):
//!         score(n) = splitmix64(k XOR splitmix64(n))
//!     return the n with the highest score; on equal scores, the lower n
//! ```
//!
//! A user's home node is `owner(user_id, ids)`; a group's owner node is
//! `owner(group_id, ids)` (the same function). The function is pinned by
//! golden test vectors: changing it would silently move users between nodes,
//! so it carries a version, [`PLACEMENT_ALGORITHM`], which is part of the
//! [`Placement::digest`].
//!
//! # The node-list digest
//!
//! Nodes exchange [`Placement::digest`] to detect a peer configured with a
//! different list (which would place users differently: split brain). It is
//! the lowercase hex SHA-256 of this byte string, nodes in ascending id
//! order, integers big-endian:
//!
//! ```text
//! u32 len(PLACEMENT_ALGORITHM) ‖ PLACEMENT_ALGORITHM (UTF-8)
//! u32 node count
//! per node: u16 id ‖ u32 len(client_address) ‖ client_address ‖ u32 len(ops_address) ‖ ops_address
//! ```
//!
//! The order of the list in the configuration does not matter; any change of
//! an id or an address changes the digest. This node's own id is not part of
//! it (every node of a cluster has the same digest).
#![warn(missing_docs)]

use std::fmt;

use sha2::{Digest, Sha256};

/// Largest node id: ids must fit the 10 node bits of message ids.
pub const MAX_NODE_ID: u16 = 1023;

/// Version tag of the placement function, part of [`Placement::digest`]:
/// nodes running a different function never agree on a digest.
pub const PLACEMENT_ALGORITHM: &str = "ferry-placement/1 rendezvous fnv1a64 splitmix64";

/// A node id: 1..=[`MAX_NODE_ID`] in a cluster, [`NodeId::SINGLE`] (0) for
/// a node outside any cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(u16);

impl NodeId {
    /// The id of a single node with no cluster (what message ids carry then).
    pub const SINGLE: NodeId = NodeId(0);

    /// A cluster node id, if `id` is in 1..=[`MAX_NODE_ID`].
    pub const fn new(id: u16) -> Option<NodeId> {
        if id >= 1 && id <= MAX_NODE_ID {
            Some(NodeId(id))
        } else {
            None
        }
    }

    /// The number.
    pub const fn get(self) -> u16 {
        self.0
    }
}

impl fmt::Display for NodeId {
    /// The decimal id, e.g. `2`: what `AuthOk.node_id` and `Redirect.node_id` carry.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl TryFrom<u16> for NodeId {
    type Error = ClusterError;

    fn try_from(id: u16) -> Result<NodeId, ClusterError> {
        NodeId::new(id).ok_or(ClusterError::IdOutOfRange(id))
    }
}

/// One node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Its id.
    pub id: NodeId,
    /// `host:port` as clients dial it (sent in `Redirect.address`): the
    /// public name, not necessarily the address the node binds.
    pub client_address: String,
    /// `host:port` of its HTTP ops port (`/v1/route`, `/metrics`, admin API).
    pub ops_address: String,
}

/// Errors in a node list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    /// The list has no node.
    #[error("the cluster node list is empty")]
    Empty,
    /// A node id is outside 1..=1023.
    #[error("node id {0} is out of range: ids are 1..={MAX_NODE_ID}")]
    IdOutOfRange(u16),
    /// Two nodes share an id.
    #[error("node id {0} is listed twice")]
    DuplicateId(u16),
    /// This node's id is not in the list.
    #[error("this node's id {0} is not in the cluster node list")]
    SelfNotListed(u16),
    /// A node has an empty address.
    #[error("node {id} has an empty {which}")]
    EmptyAddress {
        /// The node.
        id: u16,
        /// `client_address` or `ops_address`.
        which: &'static str,
    },
}

/// This node's view of the cluster: its own id and every node, sorted by id.
#[derive(Debug, Clone)]
pub struct Placement {
    self_id: NodeId,
    /// Sorted by id; empty for [`Placement::single`].
    nodes: Vec<Node>,
    /// `splitmix64(id)` of each node, in the order of `nodes`: computed once.
    salts: Vec<u64>,
}

impl Placement {
    /// A node outside any cluster: every user and group is local.
    pub fn single() -> Placement {
        Placement {
            self_id: NodeId::SINGLE,
            nodes: Vec::new(),
            salts: Vec::new(),
        }
    }

    /// A cluster of `nodes` (in any order) seen from the node `self_id`.
    pub fn new(self_id: u16, nodes: Vec<Node>) -> Result<Placement, ClusterError> {
        let self_id = NodeId::try_from(self_id)?;
        if nodes.is_empty() {
            return Err(ClusterError::Empty);
        }
        let mut nodes = nodes;
        for node in &nodes {
            // A `Node` built by hand may carry any u16.
            NodeId::try_from(node.id.0)?;
            for (which, address) in [
                ("client_address", &node.client_address),
                ("ops_address", &node.ops_address),
            ] {
                if address.trim().is_empty() {
                    return Err(ClusterError::EmptyAddress {
                        id: node.id.0,
                        which,
                    });
                }
            }
        }
        nodes.sort_by_key(|n| n.id);
        if let Some(pair) = nodes.windows(2).find(|w| w[0].id == w[1].id) {
            return Err(ClusterError::DuplicateId(pair[0].id.0));
        }
        if !nodes.iter().any(|n| n.id == self_id) {
            return Err(ClusterError::SelfNotListed(self_id.0));
        }
        let salts = nodes.iter().map(|n| splitmix64(n.id.0 as u64)).collect();
        Ok(Placement {
            self_id,
            nodes,
            salts,
        })
    }

    /// This node's id ([`NodeId::SINGLE`] outside a cluster).
    pub fn self_id(&self) -> NodeId {
        self.self_id
    }

    /// Whether this node is part of a cluster.
    pub fn is_cluster(&self) -> bool {
        !self.nodes.is_empty()
    }

    /// Every node, sorted by id (empty outside a cluster).
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The node with this id, if listed.
    pub fn node(&self, id: NodeId) -> Option<&Node> {
        self.nodes
            .binary_search_by_key(&id, |n| n.id)
            .ok()
            .map(|i| &self.nodes[i])
    }

    /// The home node of a user.
    pub fn home_of_user(&self, user_id: &str) -> NodeId {
        self.owner(user_id)
    }

    /// The owner node of a group (the same function as for users).
    pub fn owner_of_group(&self, group_id: &str) -> NodeId {
        self.owner(group_id)
    }

    /// Whether a user is homed on this node.
    pub fn is_local_user(&self, user_id: &str) -> bool {
        !self.is_cluster() || self.home_of_user(user_id) == self.self_id
    }

    /// Whether a group is owned by this node.
    pub fn is_local_group(&self, group_id: &str) -> bool {
        !self.is_cluster() || self.owner_of_group(group_id) == self.self_id
    }

    fn owner(&self, key: &str) -> NodeId {
        if self.nodes.is_empty() {
            return self.self_id;
        }
        let k = fnv1a64(key.as_bytes());
        let mut best = (0u64, self.nodes[0].id);
        for (i, (node, salt)) in self.nodes.iter().zip(&self.salts).enumerate() {
            let score = splitmix64(k ^ salt);
            // Nodes are in ascending id order, so `>` keeps the lower id on a tie.
            if i == 0 || score > best.0 {
                best = (score, node.id);
            }
        }
        best.1
    }

    /// The node-list digest (lowercase hex SHA-256; see the crate docs for
    /// the exact encoding). Equal on every node of a correctly configured
    /// cluster.
    pub fn digest(&self) -> String {
        fn put(h: &mut Sha256, bytes: &[u8]) {
            h.update((bytes.len() as u32).to_be_bytes());
            h.update(bytes);
        }
        let mut h = Sha256::new();
        put(&mut h, PLACEMENT_ALGORITHM.as_bytes());
        h.update((self.nodes.len() as u32).to_be_bytes());
        for node in &self.nodes {
            h.update(node.id.0.to_be_bytes());
            put(&mut h, node.client_address.as_bytes());
            put(&mut h, node.ops_address.as_bytes());
        }
        let mut out = String::with_capacity(64);
        for byte in h.finalize() {
            out.push(char::from_digit((byte >> 4) as u32, 16).expect("nibble"));
            out.push(char::from_digit((byte & 0xf) as u32, 16).expect("nibble"));
        }
        out
    }
}

/// FNV-1a, 64-bit, over `bytes`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The SplitMix64 finalizer: a bijective 64-bit mix.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u16) -> Node {
        Node {
            id: NodeId(id),
            client_address: format!("10.0.0.{id}:7600"),
            ops_address: format!("10.0.0.{id}:7601"),
        }
    }

    fn cluster(self_id: u16, ids: &[u16]) -> Placement {
        Placement::new(self_id, ids.iter().map(|&i| node(i)).collect()).unwrap()
    }

    #[test]
    fn hash_primitives_match_their_reference_values() {
        // FNV-1a 64 reference values (from the FNV specification's test suite).
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
        // SplitMix64 with seed 0: the first output of the reference generator.
        assert_eq!(splitmix64(0), 0xe220a8397b1dcdaf);
    }

    /// Pins the placement function: if this test fails, users would move
    /// between nodes on upgrade. Never update these values; a new function
    /// needs a new `PLACEMENT_ALGORITHM`.
    #[test]
    fn golden_vectors_never_drift() {
        let p = cluster(1, &[1, 2, 3]);
        let golden: &[(&str, u16)] = &GOLDEN;
        for &(id, want) in golden {
            assert_eq!(p.home_of_user(id).get(), want, "user {id}");
            assert_eq!(p.owner_of_group(id).get(), want, "group {id}");
        }
        // Non-contiguous ids, list given out of order.
        let p = Placement::new(7, vec![node(1000), node(7), node(42)]).unwrap();
        for &(id, want) in &GOLDEN_SPARSE {
            assert_eq!(p.home_of_user(id).get(), want, "user {id}");
        }
    }

    /// Computed independently (a 15-line Python script following the crate
    /// docs), not by this code.
    const GOLDEN: [(&str, u16); 10] = [
        ("alice", 1),
        ("bob", 1),
        ("carol", 2),
        ("dave", 3),
        ("u0", 2),
        ("u1", 2),
        ("u2", 3),
        ("g-team", 2),
        ("", 2),
        ("用户", 1),
    ];

    /// Nodes 7, 42 and 1000.
    const GOLDEN_SPARSE: [(&str, u16); 4] = [("alice", 1000), ("bob", 7), ("u0", 7), ("u1", 42)];

    #[test]
    fn every_node_computes_the_same_owner() {
        let views: Vec<Placement> = (1..=3).map(|me| cluster(me, &[3, 1, 2])).collect();
        for i in 0..1000 {
            let id = format!("user-{i}");
            let home = views[0].home_of_user(&id);
            for v in &views {
                assert_eq!(v.home_of_user(&id), home);
                assert_eq!(v.is_local_user(&id), v.self_id() == home);
                assert_eq!(v.is_local_group(&id), v.self_id() == home);
            }
        }
    }

    #[test]
    fn ids_spread_evenly_over_three_nodes() {
        let p = cluster(1, &[1, 2, 3]);
        let n = 100_000;
        let mut counts = [0u32; 4];
        for i in 0..n {
            counts[p.home_of_user(&format!("u{i}")).get() as usize] += 1;
        }
        let third = n as f64 / 3.0;
        for (id, &count) in counts.iter().enumerate().skip(1) {
            let off = (count as f64 - third).abs() / third;
            assert!(off <= 0.02, "node {id}: {count} of {n} ({counts:?})");
        }
    }

    #[test]
    fn adding_a_node_moves_about_a_quarter_and_only_to_it() {
        let before = cluster(1, &[1, 2, 3]);
        let after = cluster(1, &[1, 2, 3, 4]);
        let n = 100_000;
        let mut moved = 0;
        for i in 0..n {
            let id = format!("u{i}");
            let (a, b) = (before.home_of_user(&id), after.home_of_user(&id));
            if a != b {
                assert_eq!(
                    b.get(),
                    4,
                    "{id} moved from {a} to {b}, not to the new node"
                );
                moved += 1;
            }
        }
        let share = moved as f64 / n as f64;
        assert!((0.23..=0.27).contains(&share), "moved {share}");
    }

    #[test]
    fn removing_a_node_moves_only_its_ids() {
        let before = cluster(1, &[1, 2, 3, 4]);
        let after = cluster(1, &[1, 2, 4]);
        for i in 0..50_000 {
            let id = format!("u{i}");
            let (a, b) = (before.home_of_user(&id), after.home_of_user(&id));
            if a.get() != 3 {
                assert_eq!(a, b, "{id} moved from {a} to {b}");
            }
        }
    }

    #[test]
    fn single_is_local_for_everything() {
        let p = Placement::single();
        assert!(!p.is_cluster());
        assert_eq!(p.self_id(), NodeId::SINGLE);
        assert_eq!(p.home_of_user("anyone"), NodeId::SINGLE);
        assert!(p.is_local_user("anyone"));
        assert!(p.is_local_group("any-group"));
        assert!(p.nodes().is_empty());
        assert!(p.node(NodeId::SINGLE).is_none());
    }

    #[test]
    fn bad_lists_are_refused() {
        assert_eq!(Placement::new(1, vec![]).unwrap_err(), ClusterError::Empty);
        assert_eq!(
            Placement::new(0, vec![node(1)]).unwrap_err(),
            ClusterError::IdOutOfRange(0)
        );
        assert_eq!(
            Placement::new(1, vec![node(1), node(1024)]).unwrap_err(),
            ClusterError::IdOutOfRange(1024)
        );
        assert_eq!(
            Placement::new(2, vec![node(2), node(1), node(2)]).unwrap_err(),
            ClusterError::DuplicateId(2)
        );
        assert_eq!(
            Placement::new(3, vec![node(1), node(2)]).unwrap_err(),
            ClusterError::SelfNotListed(3)
        );
        let mut blank = node(2);
        blank.ops_address = " ".into();
        assert_eq!(
            Placement::new(1, vec![node(1), blank]).unwrap_err(),
            ClusterError::EmptyAddress {
                id: 2,
                which: "ops_address"
            }
        );
        assert!(NodeId::new(1023).is_some());
        assert!(NodeId::new(1024).is_none());
        assert!(NodeId::new(0).is_none());
    }

    #[test]
    fn node_lookup_and_order() {
        let p = cluster(2, &[3, 1, 2]);
        let ids: Vec<u16> = p.nodes().iter().map(|n| n.id.get()).collect();
        assert_eq!(ids, [1, 2, 3]);
        assert_eq!(p.node(NodeId(3)).unwrap().client_address, "10.0.0.3:7600");
        assert!(p.node(NodeId(4)).is_none());
        assert_eq!(p.self_id().to_string(), "2");
    }

    #[test]
    fn digest_ignores_order_and_self_but_sees_every_change() {
        let base = cluster(1, &[1, 2, 3]);
        let d = base.digest();
        assert_eq!(d.len(), 64);
        assert!(
            d.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_eq!(cluster(3, &[3, 2, 1]).digest(), d, "order and self id");
        let changed = |f: &dyn Fn(&mut Vec<Node>)| {
            let mut nodes = vec![node(1), node(2), node(3)];
            f(&mut nodes);
            Placement::new(1, nodes).unwrap().digest()
        };
        assert_eq!(changed(&|_| {}), d);
        assert_ne!(changed(&|n| n[2].id = NodeId(4)), d, "id");
        assert_ne!(changed(&|n| n[1].client_address.push('0')), d, "client");
        assert_ne!(changed(&|n| n[1].ops_address = "x:1".into()), d, "ops");
        assert_ne!(
            changed(&|n| {
                n.pop();
            }),
            d,
            "node removed"
        );
        // Length prefixes: moving a byte between fields changes the digest.
        assert_ne!(
            changed(&|n| {
                n[0].client_address = "ab".into();
                n[0].ops_address = "c".into();
            }),
            changed(&|n| {
                n[0].client_address = "a".into();
                n[0].ops_address = "bc".into();
            })
        );
        assert_ne!(Placement::single().digest(), d);
    }
}
