//! Where the server's log lines go: stderr, through a writer that never
//! fails.
//!
//! A log line that cannot be written (stderr redirected to a file on a full
//! disk, a closed pipe) must cost the line, never the code that logged it.
//! tracing-subscriber's fmt layer reports a failed write with `eprintln!`,
//! and `eprintln!` panics when stderr itself fails: the panic then kills
//! whatever logged, a connection task between its cleanup steps (its
//! connection gauge and session left behind) or the committer or its
//! delivery thread (every later write refused). So [`Stderr`] swallows the
//! error and counts the line in `ferry_log_lines_dropped_total`.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};

/// Log writes that failed (each a line, or the rest of one).
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Log lines (or the rest of one) that could not be written so far.
pub fn dropped_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Standard error that never reports a failure: what cannot be written is
/// dropped and counted ([`dropped_lines`]). Give it to the log subscriber
/// as its writer (`.with_writer(|| Stderr)`).
#[derive(Debug, Default, Clone, Copy)]
pub struct Stderr;

impl Stderr {
    /// One write of [`Stderr`]'s, to any sink (the tests use others). The
    /// only error passed on is `Interrupted`, which `write_all` retries.
    fn write_to(out: &mut impl Write, buf: &[u8]) -> io::Result<usize> {
        match out.write(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Ok(0) | Err(_) if !buf.is_empty() => {
                // The caller writes a line with write_all: claiming it all
                // written drops the rest of the line, once.
                DROPPED.fetch_add(1, Ordering::Relaxed);
                Ok(buf.len())
            }
            other => other,
        }
    }
}

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Stderr::write_to(&mut io::stderr().lock(), buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Unbuffered; a failed flush has nothing more to lose.
        let _ = io::stderr().flush();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink on a full disk.
    struct Full;

    impl Write for Full {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from_raw_os_error(ENOSPC))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// "No space left on device" on Linux.
    const ENOSPC: i32 = 28;

    #[test]
    fn a_failed_write_is_dropped_and_counted() {
        let before = dropped_lines();
        let line = b"a log line\n";
        assert_eq!(Stderr::write_to(&mut Full, line).unwrap(), line.len());
        assert!(dropped_lines() > before);
    }

    #[test]
    fn a_good_write_passes_through() {
        let mut out = Vec::new();
        assert_eq!(Stderr::write_to(&mut out, b"line\n").unwrap(), 5);
        assert_eq!(out, b"line\n");
    }
}
