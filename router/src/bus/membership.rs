//! Who agrees with this node about the node list (docs/CLUSTER.md §1).
//!
//! Every node says `Hello` with the digest of its node list to every peer.
//! A node starts serving clients once a majority of the configured nodes,
//! itself included, were heard with its own digest; after that it stops
//! only while the peers heard recently with another digest outnumber those
//! that agree (itself included). So a node started with another node list
//! never serves (it would split the users' homes), one misconfigured node
//! does not take a majority down, and peers that merely go silent (down,
//! or the bus is) do not stop the node from serving its own users.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_storage::NodeId;

/// What was last heard from a peer.
struct Heard {
    digest: String,
    at: Instant,
}

/// The membership check of this node.
pub(crate) struct Membership {
    digest: String,
    nodes: usize,
    /// A peer heard longer ago than this no longer counts.
    fresh_for: Duration,
    heard: Mutex<HashMap<NodeId, Heard>>,
    /// A majority agreed once since start-up.
    confirmed: std::sync::atomic::AtomicBool,
    mismatches: metrics::Counter,
}

impl Membership {
    pub fn new(digest: String, nodes: usize, hello_interval: Duration) -> Membership {
        Membership {
            digest,
            nodes,
            fresh_for: hello_interval * 3,
            heard: Mutex::new(HashMap::new()),
            confirmed: std::sync::atomic::AtomicBool::new(false),
            mismatches: metrics::counter!("ferry_bus_digest_mismatches_total"),
        }
    }

    /// This node's digest.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Records a peer's `Hello`.
    pub fn heard(&self, peer: NodeId, digest: &str) {
        if digest != self.digest {
            self.mismatches.increment(1);
        }
        let mut heard = self.heard.lock().expect("not poisoned");
        let changed = heard.get(&peer).is_none_or(|h| h.digest != digest);
        if changed && digest != self.digest {
            tracing::error!(
                peer,
                theirs = digest,
                ours = %self.digest,
                "a peer has a different node list: fix the [cluster] configuration"
            );
        }
        heard.insert(
            peer,
            Heard {
                digest: digest.to_owned(),
                at: Instant::now(),
            },
        );
    }

    /// A `Hello` from a node that is not in this node's list (its own list
    /// has this node): logged and counted, never counted as a peer.
    pub fn heard_stranger(&self, node: NodeId, digest: &str) {
        self.mismatches.increment(1);
        tracing::error!(
            node,
            theirs = digest,
            ours = %self.digest,
            "a node that is not in this node's list says hello: fix the [cluster] configuration"
        );
    }

    /// Nodes (this one included) recently heard with this node's digest.
    pub fn agreeing(&self, now: Instant) -> usize {
        let heard = self.heard.lock().expect("not poisoned");
        1 + heard
            .values()
            .filter(|h| h.digest == self.digest && now - h.at <= self.fresh_for)
            .count()
    }

    /// Whether this node may serve clients (see the module doc).
    pub fn serving(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let now = Instant::now();
        let agreeing = self.agreeing(now);
        if !self.confirmed.load(Relaxed) {
            if agreeing <= self.nodes / 2 {
                return false;
            }
            self.confirmed.store(true, Relaxed);
        }
        self.disagreeing().len() < agreeing
    }

    /// Peers heard recently with another digest (for `/readyz`).
    pub fn disagreeing(&self) -> Vec<NodeId> {
        let now = Instant::now();
        let heard = self.heard.lock().expect("not poisoned");
        let mut ids: Vec<NodeId> = heard
            .iter()
            .filter(|(_, h)| h.digest != self.digest && now - h.at <= self.fresh_for)
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_majority_with_the_same_digest_is_needed_to_serve() {
        let m = Membership::new("d".into(), 3, Duration::from_secs(5));
        assert!(!m.serving(), "alone, one of three is no majority");
        m.heard(2, "other");
        assert!(!m.serving(), "a peer with another node list does not count");
        assert_eq!(m.disagreeing(), vec![2]);
        m.heard(3, "d");
        assert!(m.serving());
        assert_eq!(m.agreeing(Instant::now()), 2);
        assert_eq!(
            m.agreeing(Instant::now() + Duration::from_secs(16)),
            1,
            "a peer not heard for three hello intervals no longer counts"
        );
    }

    #[test]
    fn once_confirmed_silent_peers_do_not_stop_serving_but_a_disagreeing_majority_does() {
        let m = Membership::new("d".into(), 3, Duration::from_millis(1));
        m.heard(2, "d");
        assert!(m.serving());
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(m.agreeing(Instant::now()), 1, "peer 2 went silent");
        assert!(m.serving(), "a silent peer is not a disagreeing one");
        m.heard(2, "x");
        m.heard(3, "x");
        assert!(
            !m.serving(),
            "two recent peers with another list outnumber this node"
        );
    }

    #[test]
    fn two_nodes_need_each_other() {
        let m = Membership::new("d".into(), 2, Duration::from_secs(5));
        assert!(!m.serving());
        m.heard(2, "d");
        assert!(m.serving());
    }
}
