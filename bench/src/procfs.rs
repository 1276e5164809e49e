//! CPU and memory of processes, read from `/proc`, and a sampler that
//! records them every 500 ms while a scenario runs.
//!
//! CPU is `utime + stime` from `/proc/<pid>/stat`; 100 % means one core
//! busy. Memory is `VmRSS` from `/proc/<pid>/status`.

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

/// The open file descriptors of a process, by what they point to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FdCounts {
    /// Every open descriptor.
    pub total: usize,
    /// Sockets (listeners, client connections, the ops HTTP port's).
    pub sockets: usize,
    /// Files under the data directory (RocksDB's tables, WAL, logs):
    /// their number follows the database's file count, not the load.
    pub data_files: usize,
    /// Files deleted while still open: a descriptor nobody closed.
    pub deleted: usize,
    /// The rest: pipes, eventfds, epoll, other files.
    pub other: usize,
}

impl FdCounts {
    /// Descriptors that should come back to their starting number once the
    /// clients are gone: all but the data directory's (still-present) files.
    pub fn leakable(&self) -> usize {
        self.total - self.data_files
    }
}

/// The open file descriptors of `pid` by kind (`/proc/PID/fd` links);
/// `data_dir` is the server's data directory, if known.
pub fn fd_counts(pid: u32, data_dir: Option<&std::path::Path>) -> Option<FdCounts> {
    let data_dir = data_dir.map(|d| std::fs::canonicalize(d).unwrap_or_else(|_| d.to_owned()));
    let mut c = FdCounts::default();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        // A descriptor closed between the listing and the readlink is gone.
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        c.total += 1;
        let text = target.to_string_lossy();
        if text.starts_with("socket:") {
            c.sockets += 1;
        } else if text.ends_with(" (deleted)") {
            c.deleted += 1;
        } else if data_dir.as_ref().is_some_and(|d| target.starts_with(d)) {
            c.data_files += 1;
        } else {
            c.other += 1;
        }
    }
    (c.total > 0).then_some(c)
}

/// What a watched process is, for the figures that sum over a kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A ferry server under test (every node of a cluster).
    Server,
    /// The nsqd (or its test double) of a spawned cluster.
    Nsqd,
    /// The harness: this process and its worker processes.
    Harness,
}

/// The processes a [`Sampler`] starts with; more can be added while it
/// runs ([`Sampler::watch`]), and a server's pid changes on a restart
/// ([`Sampler::set_pid`]).
#[derive(Debug, Default)]
pub struct Watched {
    /// The server under test, if known (watched as `server`).
    pub server: Option<u32>,
    /// The harness: this process first (`harness`), then worker processes.
    pub harness: Vec<u32>,
}

/// One watched process, across its restarts.
#[derive(Debug)]
struct Proc {
    name: String,
    role: Role,
    pid: u32,
    /// Times a process was started under this name (restarts + 1).
    starts: u32,
    /// CPU ticks of earlier incarnations (before a restart).
    earlier_ticks: u64,
    /// Last reading of the current incarnation.
    ticks: u64,
    /// `earlier_ticks + ticks` when watching began: windows count from there.
    base_ticks: u64,
    rss_kib: Option<u64>,
    peak_rss_kib: Option<u64>,
}

impl Proc {
    fn total_ticks(&self) -> u64 {
        self.earlier_ticks + self.ticks
    }

    /// Reads `/proc` now; keeps the last values of a process that is gone.
    fn read(&mut self) {
        if let Some(t) = cpu_ticks(self.pid) {
            self.ticks = self.ticks.max(t);
        }
        self.rss_kib = rss_kib(self.pid);
        if let Some(r) = self.rss_kib {
            self.peak_rss_kib = Some(self.peak_rss_kib.map_or(r, |p| p.max(r)));
        }
    }
}

/// One reading.
#[derive(Debug, Clone)]
struct Sample {
    at_ns: u64,
    /// Per watched process (index as in `State::procs`), CPU seconds
    /// since it began to be watched, across restarts.
    cpu_s: Vec<f64>,
    /// Per watched process, resident memory now (KiB).
    rss_kib: Vec<Option<u64>>,
}

/// CPU of one process over a window.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessUsage {
    /// Name (`node 2`, `nsqd`, `harness`, …).
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Average CPU, % of one core.
    pub cpu_pct: f64,
}

/// CPU and memory over a time window.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Usage {
    /// Seconds covered.
    pub seconds: f64,
    /// Average CPU of the server, % of one core; every node of a cluster
    /// together (`None` when not watched).
    pub server_cpu_pct: Option<f64>,
    /// Peak resident memory of the server (every node together), MiB.
    pub server_peak_rss_mib: Option<f64>,
    /// Average CPU of the harness (all its processes), % of one core.
    pub harness_cpu_pct: f64,
    /// Average CPU of the nsqd of a spawned cluster, % of one core.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nsqd_cpu_pct: Option<f64>,
    /// Every watched process on its own.
    pub processes: Vec<ProcessUsage>,
}

impl Usage {
    /// The servers' CPU one by one (`node 1: 80%, …`) when there are
    /// several (a cluster); `None` for a single server.
    pub fn per_server(&self) -> Option<String> {
        let servers: Vec<&ProcessUsage> = self
            .processes
            .iter()
            .filter(|p| p.role == Role::Server)
            .collect();
        (servers.len() > 1).then(|| {
            servers
                .iter()
                .map(|p| format!("{} {:.0}%", p.name, p.cpu_pct))
                .collect::<Vec<_>>()
                .join(", ")
        })
    }
}

/// CPU time and memory of one process over the whole run, read from
/// `/proc/PID/stat` and `/proc/PID/status` at the end.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessFigures {
    /// Name (`node 2`, `nsqd`, `harness`, …).
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Pid of the last incarnation.
    pub pid: u32,
    /// Times started (a node killed and restarted: 2).
    pub starts: u32,
    /// `utime + stime` of every incarnation, seconds.
    pub cpu_secs: f64,
    /// Resident memory at the end, MiB (`None`: already exited).
    pub rss_mib: Option<f64>,
    /// Highest resident memory seen while sampling, MiB.
    pub peak_rss_mib: Option<f64>,
}

#[derive(Debug, Default)]
struct State {
    procs: Vec<Proc>,
    samples: Vec<Sample>,
}

impl State {
    fn add(&mut self, name: String, role: Role, pid: u32) {
        let mut p = Proc {
            name,
            role,
            pid,
            starts: 1,
            earlier_ticks: 0,
            ticks: 0,
            base_ticks: 0,
            rss_kib: None,
            peak_rss_kib: None,
        };
        p.read();
        p.base_ticks = p.total_ticks();
        self.procs.push(p);
    }

    fn sample(&mut self, hz: f64) {
        for p in &mut self.procs {
            p.read();
        }
        let sample = Sample {
            at_ns: now_ns(),
            cpu_s: self
                .procs
                .iter()
                .map(|p| p.total_ticks().saturating_sub(p.base_ticks) as f64 / hz)
                .collect(),
            rss_kib: self.procs.iter().map(|p| p.rss_kib).collect(),
        };
        self.samples.push(sample);
    }
}

/// Samples the watched processes every [`SAMPLE_EVERY`] until dropped.
pub struct Sampler {
    state: Arc<Mutex<State>>,
    hz: f64,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Sampler {
    /// Starts sampling (call inside a tokio runtime).
    pub fn start(watched: Watched) -> Sampler {
        let hz = ticks_per_sec();
        let state = Arc::new(Mutex::new(State::default()));
        {
            let mut s = state.lock().expect("sampler lock");
            if let Some(pid) = watched.server {
                s.add("server".into(), Role::Server, pid);
            }
            for (k, &pid) in watched.harness.iter().enumerate() {
                let name = if k == 0 {
                    "harness".into()
                } else {
                    format!("harness worker {k}")
                };
                s.add(name, Role::Harness, pid);
            }
        }
        let task = {
            let state = state.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(SAMPLE_EVERY);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    state.lock().expect("sampler lock").sample(hz);
                }
            })
        };
        Sampler { state, hz, task }
    }

    /// Watches one more process under `name`.
    pub fn watch(&self, name: impl Into<String>, role: Role, pid: u32) {
        self.state
            .lock()
            .expect("sampler lock")
            .add(name.into(), role, pid);
    }

    /// The process watched as `name` was restarted as `pid`: its CPU goes
    /// on adding up. Call [`Sampler::refresh`] just before killing the old
    /// one, so that its last CPU time is read.
    pub fn set_pid(&self, name: &str, pid: u32) {
        let mut s = self.state.lock().expect("sampler lock");
        if let Some(p) = s.procs.iter_mut().find(|p| p.name == name) {
            p.earlier_ticks += p.ticks;
            p.ticks = 0;
            p.pid = pid;
            p.starts += 1;
            p.read();
        }
    }

    /// Changes the pid of the single server (after a restart).
    pub fn set_server(&self, pid: Option<u32>) {
        if let Some(pid) = pid {
            self.set_pid("server", pid);
        }
    }

    /// Adds harness worker processes.
    pub fn add_harness(&self, pids: &[u32]) {
        let mut s = self.state.lock().expect("sampler lock");
        for &pid in pids {
            let k = s.procs.iter().filter(|p| p.role == Role::Harness).count();
            s.add(format!("harness worker {k}"), Role::Harness, pid);
        }
    }

    /// Takes a sample now (before a process exits or is killed, so that
    /// its CPU time up to then is counted).
    pub fn refresh(&self) {
        self.state.lock().expect("sampler lock").sample(self.hz);
    }

    /// The server's resident memory right now, in KiB (every node of a
    /// cluster together).
    pub fn server_rss_now(&self) -> Option<u64> {
        let s = self.state.lock().expect("sampler lock");
        let rss: Vec<u64> = s
            .procs
            .iter()
            .filter(|p| p.role == Role::Server)
            .filter_map(|p| rss_kib(p.pid))
            .collect();
        (!rss.is_empty()).then(|| rss.iter().sum())
    }

    /// Every process's CPU time and memory so far (reads `/proc` now).
    pub fn processes(&self) -> Vec<ProcessFigures> {
        let mut s = self.state.lock().expect("sampler lock");
        s.sample(self.hz);
        let to_mib = |k: Option<u64>| k.map(|k| k as f64 / 1024.0);
        s.procs
            .iter()
            .map(|p| ProcessFigures {
                name: p.name.clone(),
                role: p.role,
                pid: p.pid,
                starts: p.starts,
                cpu_secs: p.total_ticks() as f64 / self.hz,
                rss_mib: to_mib(p.rss_kib),
                peak_rss_mib: to_mib(p.peak_rss_kib),
            })
            .collect()
    }

    /// Usage between two `now_ns()` instants. Waits for the sample that
    /// closes the window, so call it right after the window ends.
    pub async fn usage(&self, from_ns: u64, to_ns: u64) -> Usage {
        // Make sure a sample at or after `to_ns` exists.
        for _ in 0..10 {
            let done = self
                .state
                .lock()
                .expect("sampler lock")
                .samples
                .last()
                .is_some_and(|s| s.at_ns >= to_ns);
            if done {
                break;
            }
            tokio::time::sleep(SAMPLE_EVERY / 4).await;
        }
        let s = self.state.lock().expect("sampler lock");
        let samples = &s.samples;
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
        // A process watched after `first` was taken counts from 0 there.
        let cpu = |sample: &Sample, i: usize| sample.cpu_s.get(i).copied().unwrap_or(0.0);
        let pct = |i: usize| {
            if seconds > 0.0 {
                (cpu(last, i) - cpu(first, i)).max(0.0) / seconds * 100.0
            } else {
                0.0
            }
        };
        let processes: Vec<ProcessUsage> = s
            .procs
            .iter()
            .enumerate()
            .map(|(i, p)| ProcessUsage {
                name: p.name.clone(),
                role: p.role,
                cpu_pct: pct(i),
            })
            .collect();
        let role_pct = |role: Role| {
            let mut of_role = processes.iter().filter(|p| p.role == role).peekable();
            of_role
                .peek()
                .is_some()
                .then(|| of_role.map(|p| p.cpu_pct).sum::<f64>())
        };
        let servers: Vec<usize> = (0..s.procs.len())
            .filter(|&i| s.procs[i].role == Role::Server)
            .collect();
        let peak = samples
            .iter()
            .filter(|x| x.at_ns >= first.at_ns && x.at_ns <= last.at_ns)
            .filter_map(|x| {
                let rss: Vec<u64> = servers
                    .iter()
                    .filter_map(|&i| x.rss_kib.get(i).copied().flatten())
                    .collect();
                (!rss.is_empty()).then(|| rss.iter().sum::<u64>())
            })
            .max();
        Usage {
            seconds,
            server_cpu_pct: role_pct(Role::Server),
            server_peak_rss_mib: peak.map(|k| k as f64 / 1024.0),
            harness_cpu_pct: role_pct(Role::Harness).unwrap_or(0.0),
            nsqd_cpu_pct: role_pct(Role::Nsqd),
            processes,
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

    #[test]
    fn counts_own_fds_by_kind() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let before = fd_counts(me, Some(dir.path())).unwrap();
        let _kept = std::fs::File::create(dir.path().join("kept")).unwrap();
        let gone = std::fs::File::create(dir.path().join("gone")).unwrap();
        std::fs::remove_file(dir.path().join("gone")).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let after = fd_counts(me, Some(dir.path())).unwrap();
        // Other tests open and close descriptors meanwhile: compare kinds
        // that only this test touches in this directory.
        assert_eq!(after.data_files, before.data_files + 1);
        assert!(after.deleted >= 1);
        assert!(after.sockets >= 1);
        drop((gone, listener));
        assert!(fd_counts(u32::MAX, None).is_none());
    }
}
