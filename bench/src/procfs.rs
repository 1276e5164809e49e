//! CPU and memory of processes, read from `/proc`, and a sampler that
//! records them every 500 ms while a scenario runs.
//!
//! CPU is `utime + stime` from `/proc/<pid>/stat`; 100 % means one core
//! busy. Memory is `VmRSS` from `/proc/<pid>/status`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use crate::payload::now_ns;

/// How often the sampler reads `/proc`.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(500);

/// Clock ticks per second of the `stat` CPU fields.
fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// `utime + stime` of `pid`, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields after it are plain.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Resident set size of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Number of open file descriptors of `pid`.
pub fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// The processes a [`Sampler`] watches. Both sets can change while it runs
/// (worker processes start, the server restarts).
#[derive(Debug, Default)]
pub struct Watched {
    /// The server under test, if known.
    pub server: Option<u32>,
    /// The harness: this process and its worker processes.
    pub harness: Vec<u32>,
}

/// One reading.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at_ns: u64,
    /// Cumulative CPU seconds of the server since sampling began (across restarts).
    server_cpu_s: f64,
    server_rss_kib: Option<u64>,
    /// Cumulative CPU seconds of the harness processes since sampling began.
    harness_cpu_s: f64,
}

/// CPU and memory over a time window.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Usage {
    /// Seconds covered.
    pub seconds: f64,
    /// Average CPU of the server, % of one core (`None` when not watched).
    pub server_cpu_pct: Option<f64>,
    /// Peak resident memory of the server, MiB.
    pub server_peak_rss_mib: Option<f64>,
    /// Average CPU of the harness (all its processes), % of one core.
    pub harness_cpu_pct: f64,
}

/// Samples the watched processes every [`SAMPLE_EVERY`] until dropped.
pub struct Sampler {
    watched: Arc<Mutex<Watched>>,
    samples: Arc<Mutex<Vec<Sample>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Per-pid bookkeeping that turns per-process tick counters into one
/// cumulative counter that survives processes coming and going.
#[derive(Default)]
struct Accumulator {
    last: HashMap<u32, u64>,
    total_ticks: u64,
}

impl Accumulator {
    fn update(&mut self, pids: &[u32]) {
        let mut seen = HashMap::with_capacity(pids.len());
        for &pid in pids {
            if let Some(t) = cpu_ticks(pid) {
                // A pid seen for the first time contributes from now on.
                let prev = self.last.get(&pid).copied().unwrap_or(t);
                self.total_ticks += t.saturating_sub(prev);
                seen.insert(pid, t);
            }
        }
        self.last = seen;
    }
}

impl Sampler {
    /// Starts sampling (call inside a tokio runtime).
    pub fn start(watched: Watched) -> Sampler {
        let watched = Arc::new(Mutex::new(watched));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let watched = watched.clone();
            let samples = samples.clone();
            tokio::spawn(async move {
                let hz = ticks_per_sec();
                let mut server = Accumulator::default();
                let mut harness = Accumulator::default();
                let mut tick = tokio::time::interval(SAMPLE_EVERY);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let (server_pid, harness_pids) = {
                        let w = watched.lock().expect("watched lock");
                        (w.server, w.harness.clone())
                    };
                    server.update(server_pid.as_slice());
                    harness.update(&harness_pids);
                    let sample = Sample {
                        at_ns: now_ns(),
                        server_cpu_s: server.total_ticks as f64 / hz,
                        server_rss_kib: server_pid.and_then(rss_kib),
                        harness_cpu_s: harness.total_ticks as f64 / hz,
                    };
                    samples.lock().expect("samples lock").push(sample);
                }
            })
        };
        Sampler {
            watched,
            samples,
            task,
        }
    }

    /// Changes the server pid (after a restart).
    pub fn set_server(&self, pid: Option<u32>) {
        self.watched.lock().expect("watched lock").server = pid;
    }

    /// Adds harness worker processes.
    pub fn add_harness(&self, pids: &[u32]) {
        let mut w = self.watched.lock().expect("watched lock");
        w.harness.extend_from_slice(pids);
    }

    /// The server's resident memory right now, in KiB.
    pub fn server_rss_now(&self) -> Option<u64> {
        let pid = self.watched.lock().expect("watched lock").server;
        pid.and_then(rss_kib)
    }

    /// Usage between two `now_ns()` instants. Waits for the sample that
    /// closes the window, so call it right after the window ends.
    pub async fn usage(&self, from_ns: u64, to_ns: u64) -> Usage {
        // Make sure a sample at or after `to_ns` exists.
        for _ in 0..10 {
            let done = self
                .samples
                .lock()
                .expect("samples lock")
                .last()
                .is_some_and(|s| s.at_ns >= to_ns);
            if done {
                break;
            }
            tokio::time::sleep(SAMPLE_EVERY / 4).await;
        }
        let server_watched = self.watched.lock().expect("watched lock").server.is_some();
        let samples = self.samples.lock().expect("samples lock");
        // The last sample at or before the start, and the first at or after the end.
        let first = samples
            .iter()
            .rev()
            .find(|s| s.at_ns <= from_ns)
            .or(samples.first());
        let last = samples.iter().find(|s| s.at_ns >= to_ns).or(samples.last());
        let (Some(first), Some(last)) = (first, last) else {
            return Usage::default();
        };
        let seconds = (last.at_ns.saturating_sub(first.at_ns)) as f64 / 1e9;
        let pct = |a: f64, b: f64| {
            if seconds > 0.0 {
                (b - a) / seconds * 100.0
            } else {
                0.0
            }
        };
        let peak = samples
            .iter()
            .filter(|s| s.at_ns >= first.at_ns && s.at_ns <= last.at_ns)
            .filter_map(|s| s.server_rss_kib)
            .max();
        Usage {
            seconds,
            server_cpu_pct: server_watched.then(|| pct(first.server_cpu_s, last.server_cpu_s)),
            server_peak_rss_mib: peak.map(|k| k as f64 / 1024.0),
            harness_cpu_pct: pct(first.harness_cpu_s, last.harness_cpu_s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        assert!(cpu_ticks(me).is_some());
        assert!(rss_kib(me).unwrap() > 0);
        assert!(cpu_ticks(u32::MAX).is_none());
    }
}
