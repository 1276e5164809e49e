//! The bytes the harness puts in every message body, and the shared clock.
//!
//! A body is [`BODY_BYTES`] long: an 8-byte send timestamp, the sender's
//! index and a per-sender counter (together the message's identity for the
//! loss and duplicate checks), a one-byte tag (the step or message number),
//! then padding. Timestamps are `CLOCK_MONOTONIC` nanoseconds, which every
//! process on the machine shares, so a receiver in another worker process
//! can subtract the sender's stamp from its own clock.

/// Length of every message body the harness sends.
pub const BODY_BYTES: usize = 100;

/// Nanoseconds of `CLOCK_MONOTONIC` (system-wide, not per process).
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    debug_assert_eq!(rc, 0);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Microseconds from `since_ns` to now (0 if the clock reads earlier).
pub fn micros_since(since_ns: u64) -> u64 {
    now_ns().saturating_sub(since_ns) / 1000
}

/// The decoded header of a harness message body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Payload {
    /// `now_ns()` when the sender wrote the frame.
    pub sent_ns: u64,
    /// Global index of the sending user.
    pub sender: u32,
    /// Per-sender message counter.
    pub counter: u32,
    /// Scenario-specific tag: the step of `direct`, the message of `group`.
    pub tag: u8,
}

impl Payload {
    /// `(sender, counter)` as one number, the message's identity.
    pub fn id(&self) -> u64 {
        (self.sender as u64) << 32 | self.counter as u64
    }

    /// The full body.
    pub fn encode(&self) -> bytes::Bytes {
        let mut body = [0u8; BODY_BYTES];
        self.write(&mut body);
        bytes::Bytes::copy_from_slice(&body)
    }

    /// Writes the header into the first bytes of `body` (at least 17 long).
    pub fn write(&self, body: &mut [u8]) {
        body[0..8].copy_from_slice(&self.sent_ns.to_le_bytes());
        body[8..12].copy_from_slice(&self.sender.to_le_bytes());
        body[12..16].copy_from_slice(&self.counter.to_le_bytes());
        body[16] = self.tag;
    }

    /// Parses a body written by [`Payload::encode`]; `None` for foreign bodies.
    pub fn decode(body: &[u8]) -> Option<Payload> {
        if body.len() != BODY_BYTES {
            return None;
        }
        Some(Payload {
            sent_ns: u64::from_le_bytes(body[0..8].try_into().ok()?),
            sender: u32::from_le_bytes(body[8..12].try_into().ok()?),
            counter: u32::from_le_bytes(body[12..16].try_into().ok()?),
            tag: body[16],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let p = Payload {
            sent_ns: now_ns(),
            sender: 7,
            counter: 42,
            tag: 3,
        };
        let body = p.encode();
        assert_eq!(body.len(), BODY_BYTES);
        assert_eq!(Payload::decode(&body), Some(p));
        assert_eq!(p.id(), 7 << 32 | 42);
        assert_eq!(Payload::decode(b"short"), None);
    }
}
