//! The receiving side of the links (docs/CLUSTER.md §2.1): batches from
//! each peer are applied in seq order, each exactly once, and confirmed.
//!
//! One task reads this node's topic. A `LinkBatch` that is the next one of
//! its link goes to the committer (`Op::ApplyLink`), whose own check of the
//! persisted position is the authority; the NSQ message is FINed only once
//! the committer reports the batch durable (or a duplicate). A batch beyond
//! the next one is held (bounded) until the gap is filled, and the sender is
//! asked to resend from the gap if it stays open. Applied positions are
//! confirmed to the sender, coalesced per tick.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use ferry_nsq::Delivery;
use ferry_protocol::bus;
use ferry_storage::NodeId;

/// Batches held per peer while waiting for a gap to fill; beyond this they
/// are FINed and dropped (the sender still has them and resends).
const HELD_PER_PEER: usize = 128;
/// How long a gap may stay open before the sender is asked to resend.
const GAP_PATIENCE: Duration = Duration::from_millis(200);
/// Least time between two resend requests to one peer.
const RESEND_ASK_INTERVAL: Duration = Duration::from_secs(1);

/// What the committer made of a link batch (from the delivery thread).
#[derive(Debug)]
pub(crate) enum LinkResult {
    /// Applied and durable (or found applied already).
    Applied,
    /// Not the next batch for the committer (an earlier one failed or the
    /// epoch changed): try again later.
    NotNext,
    /// Unusable (from an old epoch, or undecodable): dropped.
    Dropped,
    /// The write failed: requeue with back-off.
    Failed,
}

/// A link batch's outcome, sent back to the inbound task.
#[derive(Debug)]
pub(crate) struct LinkDone {
    pub origin: NodeId,
    pub epoch: u64,
    pub seq: u64,
    pub delivery: Delivery,
    pub result: LinkResult,
}

/// One incoming link.
pub(crate) struct InboundLink {
    /// The epoch being applied.
    pub epoch: u64,
    /// Durably applied through here.
    pub applied: u64,
    /// Handed to the committer through here (`>= applied`).
    pub submitted: u64,
    /// Batches beyond `submitted + 1`, waiting for the gap to fill.
    pub held: BTreeMap<u64, (Delivery, bus::LinkBatch)>,
    /// When the current gap was first seen.
    pub gap_since: Option<Instant>,
    /// When the sender was last asked to resend.
    pub resend_asked: Option<Instant>,
    /// `applied` changed (or a duplicate came) since the last confirmation.
    pub confirm_due: bool,
    /// When the held batches were last TOUCHed (or the first was held).
    pub held_touched: Option<Instant>,
}

impl InboundLink {
    pub fn new(epoch: u64, applied: u64) -> InboundLink {
        InboundLink {
            epoch,
            applied,
            submitted: applied,
            held: BTreeMap::new(),
            gap_since: None,
            resend_asked: None,
            confirm_due: applied > 0,
            held_touched: None,
        }
    }
}

/// What to do with a batch that just arrived.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// The next one: submit it.
    Submit,
    /// Seen before (applied or submitted): FIN it, confirm again.
    Duplicate,
    /// Beyond the next one: held.
    Held,
    /// Beyond the next one and nothing more can be held: FIN and forget.
    Overflow,
    /// From another epoch and not its first batch: FIN and forget (ask
    /// for the new epoch from seq 1).
    OtherEpoch,
    /// The next one after a gap that no one can fill any more (the
    /// sender's oldest held batch, above this node's position: it lost the
    /// batches in between with its tail when it was restored): submit it;
    /// the committer moves the position over the gap. Carries the gap.
    SkipGap(u64, u64),
}

impl InboundLink {
    /// Sorts an arriving batch, with the sender's link head. A new epoch
    /// starts the link over where `ferry_storage::link_position` says (the
    /// committer's own check, which this mirrors).
    pub fn arrive(&mut self, epoch: u64, seq: u64, head: &bus::LinkHead) -> Arrival {
        if epoch != self.epoch {
            let Some(position) =
                ferry_storage::link_position((self.epoch, self.applied), epoch, seq, head)
            else {
                return Arrival::OtherEpoch;
            };
            // The sender's data dir was replaced or restored: a new link.
            self.epoch = epoch;
            self.applied = position;
            self.submitted = position;
            self.held.clear();
            self.gap_since = None;
            self.held_touched = None;
            self.confirm_due = true;
        }
        if head.held_from != 0 && seq == head.held_from && seq > self.submitted + 1 {
            // Only from what is durably applied: an in-flight batch below
            // the gap must not be overtaken.
            if self.submitted == self.applied {
                let gap = (self.submitted + 1, seq - 1);
                self.submitted = seq;
                self.held.retain(|s, _| *s > seq);
                if self.held.is_empty() {
                    self.gap_since = None;
                    self.held_touched = None;
                }
                return Arrival::SkipGap(gap.0, gap.1);
            }
        }
        if seq <= self.submitted {
            self.confirm_due = true;
            return Arrival::Duplicate;
        }
        if seq == self.submitted + 1 {
            self.submitted = seq;
            return Arrival::Submit;
        }
        if self.gap_since.is_none() {
            self.gap_since = Some(Instant::now());
        }
        if self.held.len() >= HELD_PER_PEER || self.held.contains_key(&seq) {
            return Arrival::Overflow;
        }
        if self.held.is_empty() {
            self.held_touched = Some(Instant::now());
        }
        Arrival::Held
    }

    /// The held batch that is now next, if any.
    pub fn next_held(&mut self) -> Option<(Delivery, bus::LinkBatch)> {
        let next = self.submitted + 1;
        let entry = self.held.remove(&next)?;
        self.submitted = next;
        if self.held.is_empty() {
            self.gap_since = None;
            self.held_touched = None;
        }
        Some(entry)
    }

    /// Whether to ask the sender to resend from `submitted + 1` now.
    pub fn resend_due(&mut self, now: Instant) -> bool {
        let gap_open = self
            .gap_since
            .is_some_and(|since| now - since >= GAP_PATIENCE);
        let asked_recently = self
            .resend_asked
            .is_some_and(|at| now - at < RESEND_ASK_INTERVAL);
        if gap_open && !asked_recently {
            self.resend_asked = Some(now);
            return true;
        }
        false
    }

    /// Whether the held batches must be TOUCHed now so that nsqd does not
    /// redeliver them while the gap stays open: every half msg timeout.
    pub fn touch_due(&mut self, now: Instant) -> bool {
        let Some((delivery, _)) = self.held.values().next() else {
            return false;
        };
        let every = delivery.msg_timeout() / 2;
        if self.held_touched.is_none_or(|at| now - at >= every) {
            self.held_touched = Some(now);
            return true;
        }
        false
    }

    /// A batch's outcome. Returns whether the link must go back to what is
    /// applied (the committer did not take a batch).
    pub fn done(&mut self, epoch: u64, seq: u64, result: &LinkResult) -> bool {
        if epoch != self.epoch {
            return false;
        }
        match result {
            LinkResult::Applied => {
                self.applied = self.applied.max(seq);
                self.confirm_due = true;
                false
            }
            LinkResult::NotNext | LinkResult::Failed => {
                // This and everything submitted after it will come again
                // (REQueued, or resent by the sender).
                self.submitted = self.applied.min(self.submitted);
                if self.gap_since.is_none() {
                    self.gap_since = Some(Instant::now());
                }
                true
            }
            LinkResult::Dropped => false,
        }
    }
}

/// Inbound links by origin.
pub(crate) type InboundLinks = HashMap<NodeId, InboundLink>;

#[cfg(test)]
mod tests {
    use super::*;

    const H: bus::LinkHead = bus::LinkHead {
        held_from: 0,
        prev_epoch: 0,
        prev_through: 0,
    };

    #[test]
    fn a_gap_is_skipped_only_below_the_senders_oldest_held_batch() {
        // Restored: applied 10, the sender has trimmed through 20.
        let mut link = InboundLink::new(7, 10);
        let head = |held_from| bus::LinkHead { held_from, ..H };
        assert_eq!(
            link.arrive(7, 22, &head(21)),
            Arrival::Held,
            "21 is still held"
        );
        assert_eq!(link.arrive(7, 21, &head(21)), Arrival::SkipGap(11, 20));
        assert_eq!(link.submitted, 21);
        assert_eq!(link.arrive(7, 12, &head(12)), Arrival::Duplicate);
        // A gap the sender still holds stays a gap.
        let mut link = InboundLink::new(7, 10);
        assert_eq!(link.arrive(7, 13, &head(11)), Arrival::Held);
    }

    #[test]
    fn a_restored_senders_new_epoch_continues_where_the_receiver_stands() {
        let cont = |held_from| bus::LinkHead {
            held_from,
            prev_epoch: 7,
            prev_through: 30,
        };
        // Applied 25 of the old epoch: 26..=30 come again, new ones follow.
        let mut link = InboundLink::new(7, 25);
        assert_eq!(link.arrive(8, 24, &cont(24)), Arrival::Duplicate);
        assert_eq!((link.epoch, link.applied), (8, 25));
        assert_eq!(link.arrive(8, 26, &cont(24)), Arrival::Submit);
        // Applied 40 (the sender's lost tail): its new 31 is taken.
        let mut link = InboundLink::new(7, 40);
        assert_eq!(link.arrive(8, 31, &cont(31)), Arrival::Submit);
        assert_eq!((link.epoch, link.submitted), (8, 31));
    }

    #[test]
    fn batches_are_taken_in_order_duplicates_recognised_and_gaps_held() {
        let mut link = InboundLink::new(7, 0);
        assert_eq!(link.arrive(7, 1, &H), Arrival::Submit);
        assert_eq!(link.arrive(7, 1, &H), Arrival::Duplicate);
        assert_eq!(link.arrive(7, 3, &H), Arrival::Held);
        assert!(link.gap_since.is_some());
        assert_eq!(link.arrive(7, 2, &H), Arrival::Submit);
        assert_eq!(link.submitted, 2);
        assert!(!link.done(7, 1, &LinkResult::Applied));
        assert_eq!(link.applied, 1);
        assert!(link.confirm_due);
    }

    #[test]
    fn a_new_epoch_starts_over_only_at_its_first_batch() {
        let mut link = InboundLink::new(7, 40);
        assert_eq!(link.arrive(8, 5, &H), Arrival::OtherEpoch);
        assert_eq!(link.epoch, 7, "a stray batch does not switch the epoch");
        assert_eq!(link.arrive(8, 1, &H), Arrival::Submit);
        assert_eq!((link.epoch, link.applied, link.submitted), (8, 0, 1));
        assert_eq!(
            link.arrive(7, 41, &H),
            Arrival::OtherEpoch,
            "the old epoch is over"
        );
    }

    #[test]
    fn a_failed_batch_rewinds_to_what_is_applied() {
        let mut link = InboundLink::new(1, 10);
        assert_eq!(link.arrive(1, 11, &H), Arrival::Submit);
        assert_eq!(link.arrive(1, 12, &H), Arrival::Submit);
        assert!(link.done(1, 11, &LinkResult::Failed));
        assert_eq!(link.submitted, 10);
        assert_eq!(
            link.arrive(1, 11, &H),
            Arrival::Submit,
            "the redelivery is taken again"
        );
    }

    #[test]
    fn resends_are_asked_once_the_gap_outlasts_the_patience_and_not_too_often() {
        let mut link = InboundLink::new(1, 0);
        assert_eq!(link.arrive(1, 2, &H), Arrival::Held);
        let t0 = link.gap_since.unwrap();
        assert!(!link.resend_due(t0));
        assert!(link.resend_due(t0 + GAP_PATIENCE));
        assert!(!link.resend_due(t0 + GAP_PATIENCE + Duration::from_millis(10)));
        assert!(link.resend_due(t0 + GAP_PATIENCE + RESEND_ASK_INTERVAL));
    }
}
