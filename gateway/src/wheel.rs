//! A hashed timing wheel: the heartbeat deadlines of every connection.
//!
//! ```text
//!   slots (ticks mod N)        entries (slab), doubly linked per slot
//!   +---+---+---+---+---+
//!   | 0 | 1 | 2 | … |N-1|      slot 2 ──▶ e7 ⇄ e3 ⇄ e9
//!   +---+---+---+---+---+
//!         ▲ now
//! ```
//!
//! Insert, remove and reschedule are O(1). Advancing one tick visits only
//! the entries filed in that tick's slot; an entry whose deadline is more
//! than N ticks away stays in its slot across laps (wrap-around) until its
//! own tick comes.
//!
//! The gateway keeps inbound traffic off this structure: every frame does a
//! relaxed atomic store of "last seen" on its connection (the O(1) touch),
//! and when a connection's slot comes due, the heartbeat task compares the
//! deadline with "last seen" and either closes it or reschedules it. A busy
//! connection is therefore looked at once per timeout, not once per frame,
//! and nothing here costs O(connections) per tick.
//!
//! Time is a plain tick counter advanced by the caller, so tests drive it
//! directly with no sleeps.

/// Where an entry lives; returned by [`TimerWheel::insert`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TimerKey(usize);

#[derive(Debug)]
struct Entry<T> {
    value: T,
    deadline: u64,
    prev: Option<usize>,
    next: Option<usize>,
}

#[derive(Debug)]
enum Slot<T> {
    Used(Entry<T>),
    Free { next_free: Option<usize> },
}

/// A timing wheel of values of type `T`, due at integer ticks.
#[derive(Debug)]
pub struct TimerWheel<T> {
    entries: Vec<Slot<T>>,
    free: Option<usize>,
    heads: Vec<Option<usize>>,
    now: u64,
    len: usize,
}

impl<T> TimerWheel<T> {
    /// A wheel of `slots` slots, at tick `now`. Deadlines up to `slots`
    /// ticks ahead cost nothing extra; farther ones wait out whole laps.
    pub fn new(slots: usize, now: u64) -> Self {
        assert!(slots > 0, "a wheel needs at least one slot");
        TimerWheel {
            entries: Vec::new(),
            free: None,
            heads: vec![None; slots],
            now,
            len: 0,
        }
    }

    /// The current tick.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// Number of scheduled entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is scheduled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn slot_of(&self, tick: u64) -> usize {
        (tick % self.heads.len() as u64) as usize
    }

    /// Schedules `value` at `deadline` (a deadline in the past fires at the
    /// next tick).
    pub fn insert(&mut self, value: T, deadline: u64) -> TimerKey {
        let deadline = deadline.max(self.now + 1);
        let entry = Entry {
            value,
            deadline,
            prev: None,
            next: None,
        };
        let index = match self.free {
            Some(i) => {
                let Slot::Free { next_free } = self.entries[i] else {
                    unreachable!("free list points at a used entry");
                };
                self.free = next_free;
                self.entries[i] = Slot::Used(entry);
                i
            }
            None => {
                self.entries.push(Slot::Used(entry));
                self.entries.len() - 1
            }
        };
        self.link(index, deadline);
        self.len += 1;
        TimerKey(index)
    }

    fn entry_mut(&mut self, i: usize) -> &mut Entry<T> {
        match &mut self.entries[i] {
            Slot::Used(e) => e,
            Slot::Free { .. } => unreachable!("linked entry is free"),
        }
    }

    fn link(&mut self, i: usize, deadline: u64) {
        let slot = self.slot_of(deadline);
        let head = self.heads[slot];
        {
            let e = self.entry_mut(i);
            e.prev = None;
            e.next = head;
        }
        if let Some(h) = head {
            self.entry_mut(h).prev = Some(i);
        }
        self.heads[slot] = Some(i);
    }

    fn unlink(&mut self, i: usize) {
        let (prev, next, deadline) = {
            let e = self.entry_mut(i);
            (e.prev, e.next, e.deadline)
        };
        match prev {
            Some(p) => self.entry_mut(p).next = next,
            None => {
                let slot = self.slot_of(deadline);
                self.heads[slot] = next;
            }
        }
        if let Some(n) = next {
            self.entry_mut(n).prev = prev;
        }
    }

    /// The value at `key`, if it is still scheduled.
    pub fn get(&self, key: TimerKey) -> Option<&T> {
        match self.entries.get(key.0) {
            Some(Slot::Used(e)) => Some(&e.value),
            _ => None,
        }
    }

    /// Unschedules `key` and returns its value.
    pub fn remove(&mut self, key: TimerKey) -> Option<T> {
        if !matches!(self.entries.get(key.0), Some(Slot::Used(_))) {
            return None;
        }
        self.unlink(key.0);
        let old = std::mem::replace(
            &mut self.entries[key.0],
            Slot::Free {
                next_free: self.free,
            },
        );
        self.free = Some(key.0);
        self.len -= 1;
        match old {
            Slot::Used(e) => Some(e.value),
            Slot::Free { .. } => unreachable!(),
        }
    }

    /// Moves `key` to a new deadline. Returns false if it is not scheduled.
    pub fn reschedule(&mut self, key: TimerKey, deadline: u64) -> bool {
        if !matches!(self.entries.get(key.0), Some(Slot::Used(_))) {
            return false;
        }
        let deadline = deadline.max(self.now + 1);
        self.unlink(key.0);
        self.entry_mut(key.0).deadline = deadline;
        self.link(key.0, deadline);
        true
    }

    /// Advances one tick and returns the keys due at it. They stay scheduled
    /// until the caller removes or reschedules them (a key left alone fires
    /// again one lap later).
    pub fn tick(&mut self) -> Vec<TimerKey> {
        self.now += 1;
        let now = self.now;
        let mut due = Vec::new();
        let mut cursor = self.heads[self.slot_of(now)];
        while let Some(i) = cursor {
            let e = self.entry_mut(i);
            cursor = e.next;
            if e.deadline <= now {
                due.push(TimerKey(i));
            }
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_until(wheel: &mut TimerWheel<&'static str>, tick: u64) -> Vec<(u64, &'static str)> {
        let mut fired = Vec::new();
        while wheel.now() < tick {
            for key in wheel.tick() {
                let value = wheel.remove(key).unwrap();
                fired.push((wheel.now(), value));
            }
        }
        fired
    }

    #[test]
    fn fires_at_the_deadline_and_not_before() {
        let mut w = TimerWheel::new(8, 0);
        w.insert("a", 3);
        assert!(w.tick().is_empty());
        assert!(w.tick().is_empty());
        assert_eq!(run_until(&mut w, 3), vec![(3, "a")]);
        assert!(w.is_empty());
    }

    #[test]
    fn touch_by_reschedule_postpones_expiry() {
        let mut w = TimerWheel::new(8, 0);
        let k = w.insert("conn", 3);
        w.tick();
        w.tick();
        assert!(w.reschedule(k, 5));
        assert!(w.tick().is_empty(), "not at the old deadline");
        assert!(w.tick().is_empty());
        assert_eq!(run_until(&mut w, 5), vec![(5, "conn")]);
    }

    #[test]
    fn a_due_key_left_alone_fires_again_a_lap_later() {
        let mut w = TimerWheel::new(4, 0);
        let k = w.insert("x", 2);
        w.tick();
        assert_eq!(w.tick(), vec![k]);
        // Re-arm by leaving it: it is due again when its slot comes round.
        assert!(w.tick().is_empty());
        assert!(w.tick().is_empty());
        assert!(w.tick().is_empty());
        assert_eq!(w.tick(), vec![k]);
    }

    #[test]
    fn removal_prevents_firing() {
        let mut w = TimerWheel::new(8, 0);
        let a = w.insert("a", 2);
        w.insert("b", 2);
        assert_eq!(w.remove(a), Some("a"));
        assert_eq!(w.remove(a), None, "removing twice is harmless");
        assert!(!w.reschedule(a, 4));
        assert_eq!(run_until(&mut w, 4), vec![(2, "b")]);
    }

    #[test]
    fn deadlines_beyond_one_lap_wrap_around() {
        let mut w = TimerWheel::new(4, 0);
        w.insert("far", 10);
        w.insert("near", 2);
        // Slot 10 % 4 == 2 comes round at ticks 2 and 6 before 10.
        assert_eq!(run_until(&mut w, 9), vec![(2, "near")]);
        assert_eq!(run_until(&mut w, 12), vec![(10, "far")]);
    }

    #[test]
    fn many_entries_in_one_slot() {
        let mut w = TimerWheel::new(16, 100);
        let keys: Vec<_> = (0..10_000).map(|_| w.insert("c", 105)).collect();
        // Remove every third, reschedule every fifth.
        for (i, k) in keys.iter().enumerate() {
            if i % 3 == 0 {
                w.remove(*k);
            } else if i % 5 == 0 {
                w.reschedule(*k, 107);
            }
        }
        let expect_at_105 = (0..10_000).filter(|i| i % 3 != 0 && i % 5 != 0).count();
        let expect_at_107 = (0..10_000).filter(|i| i % 3 != 0 && i % 5 == 0).count();
        let fired = run_until(&mut w, 110);
        assert_eq!(
            fired.iter().filter(|(t, _)| *t == 105).count(),
            expect_at_105
        );
        assert_eq!(
            fired.iter().filter(|(t, _)| *t == 107).count(),
            expect_at_107
        );
        assert_eq!(fired.len(), expect_at_105 + expect_at_107);
        assert!(w.is_empty());
    }

    #[test]
    fn slots_are_reused_after_removal() {
        let mut w = TimerWheel::new(4, 0);
        let a = w.insert("a", 1);
        w.remove(a);
        let b = w.insert("b", 1);
        assert_eq!(a, b, "the freed entry is reused");
        assert_eq!(w.get(b), Some(&"b"));
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn past_deadlines_fire_on_the_next_tick() {
        let mut w = TimerWheel::new(4, 50);
        w.insert("late", 10);
        assert_eq!(run_until(&mut w, 51), vec![(51, "late")]);
    }
}
