//! `soak`: steady mixed load against one spawned server for an hour (by
//! default), watching for what creeps.
//!
//! The users are `churn`'s complete clients (outbox resent after every
//! reconnect, cursor, gap syncs; see [`super::churn`]), and the load mixes
//! everything a day brings, well below saturation:
//!
//! - one-to-one messages and group messages (groups built at the start, a
//!   member of each sends to it);
//! - churn: a fraction of the users disconnects and reconnects every
//!   second, and syncs what it missed;
//! - slow readers: every 10 s a few devices stop reading (and writing) for
//!   10–40 s, then go on;
//! - bad frames: every few seconds a connection of its own sends an
//!   oversize frame header or bytes that are not a Frame, before or after
//!   its login, and must get the matching error frame and a closed
//!   connection, with no effect on anyone else.
//!
//! Every `--sample-secs` it records the server's RSS, its open file
//! descriptors by kind (`/proc/PID/fd`) and its queue and cache gauges
//! from `/metrics`, and prints a line. At the end every device syncs to the
//! end of its inbox and closes; the run fails when
//!
//! - the Theil–Sen slope (median of pairwise slopes) of RSS net of RocksDB's block cache (the
//!   `ferry_storage_cache_bytes` gauge: a cache bounded by the server's
//!   `storage_memory_mb`) over the samples of the steady state exceeds
//!   `--max-rss-slope` MiB per hour; the raw RSS slope is reported beside
//!   it. The steady state starts after the warm-up (`--warmup`, the first
//!   20 % of the load) and once that cache has levelled off: its 5-minute
//!   mean has reached 90 % of the highest 5-minute mean of the run. It
//!   must cover at least half the load;
//! - that cache levelled off too late for half the load to be judged, or
//!   never (a memory check of a cache still filling judges the filling:
//!   the allocator's overhead grows with what the cache holds, see below);
//! - that cache, subtracted above, ever held more than its capacity
//!   (`ferry_storage_cache_capacity_bytes`) plus 10%;
//! - any stored message was not delivered to each of its recipients, or
//!   twice (the exactly-once check of `churn`, per group member too);
//! - the server holds more descriptors after the clients are gone than
//!   before they came (`--fd-slack`), not counting its data directory's
//!   files (RocksDB's table files come and go with compactions) but
//!   counting every deleted file still held open;
//! - a bad frame did not get its error and close.
//!
//! `--plot FILE.svg` draws RSS and descriptors over time.
//!
//! The spawned server runs with `--storage-memory-mb=32` (a quarter of the
//! default budget) unless a `--server-arg` sets it. A leak detector must
//! judge a steady state, and RocksDB's cache is the one part of the
//! server's memory that grows for a long time by design: under this load a
//! 128 MiB cache was still filling at the end of an hour (its data blocks
//! 7 → 45 MiB), and the allocator's overhead around those blocks rose with
//! it, which the subtraction of the cache's own count does not remove. A
//! 32 MiB cache levels off within about 15 minutes, and is the harsher
//! setting besides: it evicts, flushes and compacts four times as often.
//! The levelling rule above makes a run at any other budget say when its
//! cache did not reach a steady state rather than judge the filling.
//!
//! "Levelled off" is relative to the cache's own highest level, not to its
//! capacity: a cache never holds its whole capacity for long. The
//! memtables' reservation (charged in 256 KiB dummy entries) shrinks at
//! every flush, and the cache is split into shards that evict each on its
//! own: with 32 MiB, usage swung between about 19 and 27 MiB once its data
//! blocks had stopped growing (at about 9 MiB).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use ferry_protocol::client::{Client, FrameReader};
use ferry_protocol::proto::{self, ErrorCode, Frame, frame::Body};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::json;
use tokio::sync::{Mutex, watch};
use tokio::time::Instant;

use super::churn::{self, Cmd, Dest, Shared};
use crate::clients::{client_codec, connect_login, tcp_connect, user_id, wait_until};
use crate::payload::now_ns;
use crate::procfs::{FdCounts, fd_counts, rss_kib};
use crate::report::{Outcome, Table, count, usage_rows};
use crate::server_metrics::{self, ServerFigures};
use crate::target::{CommonArgs, Target};

/// The server's gauges each sample records: (column, metric), the metric
/// with its labels where it has some (one series, not their sum).
const GAUGES: &[(&str, &str)] = &[
    ("conns", "ferry_connections_open"),
    ("sessions", "ferry_sessions_online"),
    ("commit_queue", "ferry_commit_queue_depth"),
    ("seq_cache", "ferry_commit_seq_cache_entries"),
    ("group_cache", "ferry_group_cache_entries"),
    ("storage_cache", "ferry_storage_cache_bytes"),
    (
        "storage_cache_capacity",
        "ferry_storage_cache_capacity_bytes",
    ),
    ("memtables", "ferry_storage_memtable_bytes"),
    (
        "cache_data",
        "ferry_storage_cache_entry_bytes{role=\"data-block\"}",
    ),
    (
        "cache_index",
        "ferry_storage_cache_entry_bytes{role=\"index-block\"}",
    ),
    (
        "cache_filter",
        "ferry_storage_cache_entry_bytes{role=\"filter-block\"}",
    ),
    (
        "cache_write_buffer",
        "ferry_storage_cache_entry_bytes{role=\"write-buffer\"}",
    ),
];

const MIB: f64 = 1024.0 * 1024.0;

/// How far RocksDB's cache may exceed its capacity (readers pin blocks;
/// the memtables' reservations come in 1 MiB steps) before the soak calls
/// the subtraction from RSS unfounded.
const CACHE_OVER_CAPACITY: f64 = 1.10;

/// The fraction of its highest level (as a trailing mean over
/// [`CACHE_LEVEL_WINDOW_SECS`]) at which RocksDB's cache counts as levelled
/// off: the memory check judges only the samples from the first one at or
/// above it.
const CACHE_LEVELLED: f64 = 0.90;

/// The trailing window of the cache's level: long enough to average out the
/// swings of the memtables' reservation between flushes.
const CACHE_LEVEL_WINDOW_SECS: f64 = 300.0;

/// The least fraction of the load time the memory check must judge.
const MIN_JUDGED_FRACTION: f64 = 0.5;

/// `--storage-memory-mb` of the spawned server unless a `--server-arg`
/// sets it: small enough for the cache to fill inside the warm-up (see the
/// module doc).
const SOAK_STORAGE_MEMORY_MB: u32 = 32;

/// How long one bad-frame connection may take to be answered and closed.
const BAD_FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the server may take to close every connection after the
/// clients are gone.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Options of `soak`.
#[derive(Debug, Clone, clap::Args)]
pub struct SoakArgs {
    /// Minutes of load (1..=1440); the login ramp before it and the final
    /// sync after it come on top.
    #[arg(long, default_value_t = 60)]
    pub minutes: u64,
    /// Users (one device each).
    #[arg(long, default_value_t = 2000)]
    pub users: u32,
    /// One-to-one messages per second (total).
    #[arg(long, default_value_t = 200.0)]
    pub direct_rate: f64,
    /// Groups: group g has the users g*S..g*S+S (mod --users), S = --group-size.
    #[arg(long, default_value_t = 20)]
    pub groups: u32,
    /// Members per group (2..=500).
    #[arg(long, default_value_t = 50)]
    pub group_size: u32,
    /// Group messages per second (total), each from a random member of a random group.
    #[arg(long, default_value_t = 5.0)]
    pub group_rate: f64,
    /// Fraction of the users that disconnect and reconnect in each 1 s round.
    #[arg(long, default_value_t = 0.01)]
    pub disconnect_fraction: f64,
    /// Slow readers: every 10 s this many devices stop reading for 10-40 s.
    #[arg(long, default_value_t = 5)]
    pub slow_readers: u32,
    /// Seconds between two bad-frame connections (0: none).
    #[arg(long, default_value_t = 2.0)]
    pub bad_frame_secs: f64,
    /// Seconds between two samples of RSS, descriptors and gauges.
    #[arg(long, default_value_t = 10)]
    pub sample_secs: u64,
    /// Fraction of the load time before the RSS slope is measured (warm-up);
    /// the slope also waits for RocksDB's cache to level off.
    #[arg(long, default_value_t = 0.2)]
    pub warmup: f64,
    /// Fail when the server's RSS, net of RocksDB's bounded block cache,
    /// grows faster than this after the warm-up and once that cache has
    /// levelled off, MiB per hour (Theil–Sen slope over the samples: the median of
    /// their pairwise slopes). The spawned server gets
    /// `--storage-memory-mb=32` unless a --server-arg sets it, so that its
    /// cache fills inside the warm-up.
    #[arg(long, value_name = "MIB_PER_HOUR", default_value_t = 10.0)]
    pub max_rss_slope: f64,
    /// Fail when the server holds more than this many descriptors more after
    /// the clients are gone than before they came (data-dir files not counted).
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub fd_slack: usize,
    /// Draw the server's RSS and descriptors over time to this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// One reading of the server.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since the load began (negative: before it, after: past its end).
    pub t_secs: f64,
    /// Resident memory, MiB.
    pub rss_mib: f64,
    /// Open descriptors by kind.
    pub fds: FdCounts,
    /// The [`GAUGES`] (`None`: the scrape failed or the series is missing).
    pub gauges: BTreeMap<&'static str, Option<f64>>,
    /// The data directory on disk: what RocksDB holds in memory follows
    /// its write-ahead log (the memtables) and its tables (the block cache).
    pub disk: Disk,
    /// Messages created so far.
    pub sent: u64,
    /// Messages waiting for their SendAck.
    pub outstanding: i64,
}

impl Sample {
    /// RocksDB's block cache (memtables charged in), MiB; 0 when the server
    /// does not report it.
    pub fn storage_cache_mib(&self) -> f64 {
        self.gauges
            .get("storage_cache")
            .copied()
            .flatten()
            .map_or(0.0, |b| b / MIB)
    }

    /// RSS less RocksDB's block cache, MiB: what the slope is judged on.
    pub fn rss_net_mib(&self) -> f64 {
        self.rss_mib - self.storage_cache_mib()
    }
}

/// The server's data directory on disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Disk {
    /// Write-ahead log files (`*.log`), MiB: the writes not yet flushed
    /// from every column family's memtables (an upper bound of them).
    pub wal_mib: f64,
    /// Table files (`*.sst`), MiB.
    pub sst_mib: f64,
    /// Table files.
    pub sst_files: usize,
}

impl Disk {
    /// Sizes of the files under `dir` (two levels deep).
    fn of(dir: &Path) -> Disk {
        fn walk(dir: &Path, depth: u32, d: &mut Disk) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for e in entries.flatten() {
                let Ok(meta) = e.metadata() else { continue };
                let path = e.path();
                if meta.is_dir() {
                    if depth > 0 {
                        walk(&path, depth - 1, d);
                    }
                    continue;
                }
                let mib = meta.len() as f64 / (1024.0 * 1024.0);
                match path.extension().and_then(|x| x.to_str()) {
                    Some("log") => d.wal_mib += mib,
                    Some("sst") => {
                        d.sst_mib += mib;
                        d.sst_files += 1;
                    }
                    _ => {}
                }
            }
        }
        let mut d = Disk::default();
        walk(dir, 2, &mut d);
        d
    }
}

/// What the thresholds are.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Limits {
    /// Fraction of the load time left out of the slope.
    pub warmup: f64,
    /// MiB per hour.
    pub max_rss_slope: f64,
    /// Descriptors.
    pub fd_slack: usize,
}

/// A line through RSS samples after the warm-up: Theil–Sen (the median of
/// the pairwise slopes), with the least-squares slope beside it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Fit {
    /// MiB per hour, Theil–Sen: the one judged. A leak raises every later
    /// sample; a compaction's transient allocations raise a few for a
    /// minute or two and tilt a least-squares line far more than this.
    pub slope_mib_per_hour: f64,
    /// MiB per hour, least squares (reported).
    pub least_squares_mib_per_hour: f64,
    /// RSS of the line at t = 0, MiB.
    pub intercept_mib: f64,
    /// Samples fitted.
    pub points: usize,
    /// Where the fit starts, seconds into the load: the end of the warm-up
    /// or the moment RocksDB's cache levelled off, whichever is later.
    pub from_secs: f64,
}

/// The memory and descriptor verdict of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    /// RSS before any client, MiB.
    pub rss_start_mib: f64,
    /// RSS of the first sample judged (after the warm-up, cache levelled
    /// off), MiB.
    pub rss_after_warmup_mib: Option<f64>,
    /// When RocksDB's cache levelled off (see [`cache_levelled_secs`]),
    /// seconds into the load (`None`: the server reports no cache).
    pub cache_levelled_secs: Option<f64>,
    /// RSS of the last sample under load, MiB.
    pub rss_end_of_load_mib: Option<f64>,
    /// RSS once the clients are gone, MiB.
    pub rss_end_mib: f64,
    /// The fit of RSS net of RocksDB's block cache after the warm-up, the
    /// one judged (`None`: fewer than 3 samples).
    pub fit: Option<Fit>,
    /// The fit of the raw RSS after the warm-up, reported beside it.
    pub raw_fit: Option<Fit>,
    /// RocksDB's block cache at its fullest, MiB.
    pub storage_cache_peak_mib: f64,
    /// Descriptors before any client.
    pub fds_start: FdCounts,
    /// Highest descriptor count under load.
    pub fds_peak: usize,
    /// Descriptors once the clients are gone.
    pub fds_end: FdCounts,
    /// Failed checks.
    pub failures: Vec<String>,
}

/// `(intercept, slope)` of the least-squares line through `points`;
/// `None` for fewer than 2 points or when every x is the same.
pub fn least_squares(points: &[(f64, f64)]) -> Option<(f64, f64)> {
    if points.len() < 2 {
        return None;
    }
    let n = points.len() as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx <= f64::EPSILON {
        return None;
    }
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let slope = sxy / sxx;
    Some((my - slope * mx, slope))
}

/// Most points [`theil_sen`] takes (evenly spaced): 2,000 make 2 M pairs.
const THEIL_SEN_MAX_POINTS: usize = 2000;

/// `(intercept, slope)` of the Theil–Sen line through `points`: the slope is
/// the median of the slopes between every two points (of at most
/// [`THEIL_SEN_MAX_POINTS`], evenly spaced), the intercept the median of
/// `y - slope * x`. Robust to outliers: up to ~29% of the points can be
/// anywhere without moving it far. `None` for fewer than 2 distinct x.
pub fn theil_sen(points: &[(f64, f64)]) -> Option<(f64, f64)> {
    let step = points.len().div_ceil(THEIL_SEN_MAX_POINTS).max(1);
    let pts: Vec<(f64, f64)> = points.iter().copied().step_by(step).collect();
    let mut slopes = Vec::with_capacity(pts.len() * pts.len().saturating_sub(1) / 2);
    for (i, a) in pts.iter().enumerate() {
        for b in &pts[i + 1..] {
            let dx = b.0 - a.0;
            if dx.abs() > f64::EPSILON {
                slopes.push((b.1 - a.1) / dx);
            }
        }
    }
    let slope = median(&mut slopes)?;
    let mut offsets: Vec<f64> = pts.iter().map(|p| p.1 - slope * p.0).collect();
    Some((median(&mut offsets)?, slope))
}

fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

/// Judges memory and descriptors: `under_load` are the samples taken while
/// the load ran (`t_secs` in `0..=load_secs`), `start` the one before any
/// client, `end` the one after the clients are gone.
pub fn judge(
    start: &Sample,
    under_load: &[Sample],
    end: &Sample,
    load_secs: f64,
    limits: Limits,
) -> Verdict {
    let mut failures = Vec::new();
    // The steady state: after the warm-up, and once RocksDB's cache has
    // levelled off.
    let cache_levelled_secs = cache_levelled_secs(under_load);
    let mut from_secs = load_secs * limits.warmup;
    match cache_levelled_secs {
        Some(t) if t > load_secs * (1.0 - MIN_JUDGED_FRACTION) => failures.push(format!(
            "RocksDB's cache was still growing: its 5-minute mean reached {:.0}% of its highest \
             only at {t:.0} s of {load_secs:.0}, which leaves less than {:.0}% of the load for \
             the memory check, and a cache still filling is no steady state (run longer, or \
             with a smaller --storage-memory-mb)",
            CACHE_LEVELLED * 100.0,
            MIN_JUDGED_FRACTION * 100.0
        )),
        Some(t) => from_secs = from_secs.max(t),
        None => {}
    }
    let after: Vec<&Sample> = under_load
        .iter()
        .filter(|s| s.t_secs >= from_secs)
        .collect();
    let fit_of = |rss: fn(&Sample) -> f64| {
        let points: Vec<(f64, f64)> = after.iter().map(|s| (s.t_secs / 3600.0, rss(s))).collect();
        let ls = least_squares(&points)?.1;
        (points.len() >= 3)
            .then(|| theil_sen(&points))
            .flatten()
            .map(|(intercept, slope)| Fit {
                slope_mib_per_hour: slope,
                least_squares_mib_per_hour: ls,
                intercept_mib: intercept,
                points: points.len(),
                from_secs,
            })
    };
    let fit = fit_of(Sample::rss_net_mib);
    match fit {
        Some(f) if f.slope_mib_per_hour > limits.max_rss_slope => failures.push(format!(
            "server RSS net of RocksDB's block cache grew {:.1} MiB/h after the warm-up \
             (Theil-Sen over {} samples from {:.0} s; least squares {:.1}), more than the {:.1} \
             MiB/h allowed",
            f.slope_mib_per_hour,
            f.points,
            f.from_secs,
            f.least_squares_mib_per_hour,
            limits.max_rss_slope
        )),
        Some(_) => {}
        None => failures.push(format!(
            "only {} samples after the warm-up: too few for an RSS slope (run longer or \
             sample more often)",
            after.len()
        )),
    }
    if let Some(over) = under_load.iter().find(|s| {
        s.gauges
            .get("storage_cache_capacity")
            .copied()
            .flatten()
            .is_some_and(|cap| s.storage_cache_mib() * MIB > cap * CACHE_OVER_CAPACITY)
    }) {
        failures.push(format!(
            "RocksDB's cache held {:.1} MiB at {:.0} s, more than its capacity ({:.1} MiB) + \
             {:.0}%: the RSS it explains is not bounded",
            over.storage_cache_mib(),
            over.t_secs,
            over.gauges["storage_cache_capacity"].unwrap_or(0.0) / MIB,
            (CACHE_OVER_CAPACITY - 1.0) * 100.0
        ));
    }
    let (fd0, fd1) = (start.fds.leakable(), end.fds.leakable());
    if fd1 > fd0 + limits.fd_slack {
        failures.push(format!(
            "descriptor leak: the server holds {fd1} descriptors (data-dir files not counted) \
             after the clients are gone, {fd0} before they came (slack {}): {} sockets (from {}), \
             {} deleted files (from {}), {} other (from {})",
            limits.fd_slack,
            end.fds.sockets,
            start.fds.sockets,
            end.fds.deleted,
            start.fds.deleted,
            end.fds.other,
            start.fds.other
        ));
    }
    if end.fds.deleted > start.fds.deleted {
        failures.push(format!(
            "{} deleted files still open at the end ({} at the start)",
            end.fds.deleted, start.fds.deleted
        ));
    }
    Verdict {
        rss_start_mib: start.rss_mib,
        rss_after_warmup_mib: after.first().map(|s| s.rss_mib),
        cache_levelled_secs,
        rss_end_of_load_mib: under_load.last().map(|s| s.rss_mib),
        rss_end_mib: end.rss_mib,
        fit,
        raw_fit: fit_of(|s| s.rss_mib),
        storage_cache_peak_mib: under_load
            .iter()
            .map(Sample::storage_cache_mib)
            .fold(0.0, f64::max),
        fds_start: start.fds,
        fds_peak: under_load.iter().map(|s| s.fds.total).max().unwrap_or(0),
        fds_end: end.fds,
        failures,
    }
}

/// When RocksDB's cache levelled off, seconds into the load: the first
/// sample whose trailing mean over [`CACHE_LEVEL_WINDOW_SECS`] reaches
/// [`CACHE_LEVELLED`] of the highest such mean of the run. `None` when the
/// server reports no cache. A cache still growing at the end reaches it
/// late, which the caller fails.
pub fn cache_levelled_secs(under_load: &[Sample]) -> Option<f64> {
    let means: Vec<(f64, f64)> = under_load
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let window: Vec<f64> = under_load[..=i]
                .iter()
                .rev()
                .take_while(|w| w.t_secs > s.t_secs - CACHE_LEVEL_WINDOW_SECS)
                .map(Sample::storage_cache_mib)
                .collect();
            (s.t_secs, window.iter().sum::<f64>() / window.len() as f64)
        })
        .collect();
    let highest = means.iter().map(|m| m.1).fold(0.0, f64::max);
    if highest <= 0.0 {
        return None;
    }
    means
        .iter()
        .find(|m| m.1 >= CACHE_LEVELLED * highest)
        .map(|m| m.0)
}

/// The members of group `g`: `size` consecutive users from `g * size`,
/// wrapping around `users`; the first is its owner.
fn members(g: u32, size: u32, users: u32) -> Vec<u32> {
    (0..size)
        .map(|k| ((g as u64 * size as u64 + k as u64) % users as u64) as u32)
        .collect()
}

/// The ways a bad-frame connection misbehaves, in turn.
#[allow(clippy::enum_variant_names)] // the names say what and when
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum BadKind {
    /// A length prefix over any frame limit, instead of Auth.
    OversizeBeforeAuth,
    /// Bytes that are no Frame, instead of Auth.
    MalformedBeforeAuth,
    /// A length prefix over any frame limit, after the login.
    OversizeAfterAuth,
    /// Bytes that are no Frame, after the login.
    MalformedAfterAuth,
}

const BAD_KINDS: [BadKind; 4] = [
    BadKind::OversizeBeforeAuth,
    BadKind::MalformedBeforeAuth,
    BadKind::OversizeAfterAuth,
    BadKind::MalformedAfterAuth,
];

impl BadKind {
    /// The bytes sent, and the error code they must get.
    fn bytes_and_code(self) -> (Vec<u8>, ErrorCode) {
        match self {
            BadKind::OversizeBeforeAuth | BadKind::OversizeAfterAuth => {
                // 16 MiB + 1: over the largest max_frame_bytes a server accepts.
                (
                    ((16u32 << 20) + 1).to_be_bytes().to_vec(),
                    ErrorCode::FrameTooLarge,
                )
            }
            BadKind::MalformedBeforeAuth | BadKind::MalformedAfterAuth => {
                // A truncated varint: no Protobuf message.
                (
                    vec![0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff],
                    ErrorCode::MalformedFrame,
                )
            }
        }
    }

    fn after_auth(self) -> bool {
        matches!(
            self,
            BadKind::OversizeAfterAuth | BadKind::MalformedAfterAuth
        )
    }
}

/// Reads until the closing error frame and the end of the stream; `Ok`
/// when the error has the expected code.
async fn expect_close(reader: &mut FrameReader, code: ErrorCode) -> Result<(), String> {
    let mut got = None;
    loop {
        match reader.recv().await {
            Ok(Some(Frame {
                body: Some(Body::Error(e)),
            })) => {
                if e.code() != code || !e.closing {
                    return Err(format!(
                        "got error {:?} (closing: {}), expected closing {code:?}",
                        e.code(),
                        e.closing
                    ));
                }
                got = Some(e.code());
            }
            Ok(Some(_)) => {}
            // Closed (a reset after the error frame is a close too).
            Ok(None) | Err(_) if got.is_some() => return Ok(()),
            Ok(None) => return Err(format!("closed without an error frame ({code:?})")),
            Err(e) => return Err(format!("read error before any error frame: {e}")),
        }
    }
}

/// Figures of the bad-frame connections.
#[derive(Debug, Default, Serialize)]
struct BadStats {
    /// Connections per kind: (kind, made, answered correctly).
    by_kind: Vec<(BadKind, u64, u64)>,
    /// Wrong answers (at most the first 10).
    wrong: Vec<String>,
    wrong_total: u64,
    /// Logins of the bad-frame users that failed (retried next time).
    login_failures: u64,
}

/// One bad-frame connection of `kind` as user `index`.
async fn bad_frame(
    kind: BadKind,
    shared: &Shared,
    index: u32,
) -> Result<Result<(), String>, anyhow::Error> {
    let addr = *shared.addr.borrow();
    let (bytes, code) = kind.bytes_and_code();
    let mut reader = if kind.after_auth() {
        let me = user_id(&shared.run_id, index);
        let token = shared.tokens.mint(&me, None, 3600);
        let (reader, mut writer, _ok) =
            connect_login(addr, shared.source_ips, index, &token, 0, true).await?;
        writer.send_raw(&bytes).await?;
        reader
    } else {
        let stream = tcp_connect(addr, shared.source_ips, index).await?;
        let mut client = Client::from_stream(stream, client_codec());
        client.send_raw(&bytes).await?;
        client.split().0
    };
    Ok(
        tokio::time::timeout(BAD_FRAME_TIMEOUT, expect_close(&mut reader, code))
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "no {code:?} and close within {BAD_FRAME_TIMEOUT:?}"
                ))
            }),
    )
}

/// Builds the groups, each by a connection of its owner (closed after).
async fn create_groups(shared: &Shared, groups: &[Vec<u32>], ids: &[String]) -> anyhow::Result<()> {
    let addr = *shared.addr.borrow();
    for (members, id) in groups.iter().zip(ids) {
        let owner = members[0];
        let me = user_id(&shared.run_id, owner);
        let token = shared.tokens.mint(&me, None, 3600);
        let (mut reader, mut writer, _ok) =
            connect_login(addr, shared.source_ips, owner, &token, 0, true).await?;
        let create = proto::GroupRequest {
            request_id: 1,
            op: Some(proto::group_request::Op::Create(proto::CreateGroup {
                group_id: id.clone(),
                name: "ferry-bench soak".into(),
                members: members[1..]
                    .iter()
                    .map(|&m| user_id(&shared.run_id, m))
                    .collect(),
            })),
        };
        writer.send(create).await?;
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match reader.recv().await?.and_then(|f| f.body) {
                    Some(Body::GroupReply(r)) if r.request_id == 1 => return Ok(()),
                    Some(Body::Error(e)) if e.request_id == 1 || e.closing => {
                        bail!("creating group {id}: {:?}: {}", e.code(), e.message)
                    }
                    Some(_) => {}
                    None => bail!("creating group {id}: connection closed"),
                }
            }
        })
        .await
        .with_context(|| format!("no GroupReply for group {id} within 30 s"))??;
    }
    Ok(())
}

/// Reads the server now.
struct Probe {
    pid: u32,
    data_dir: PathBuf,
    t0: Instant,
}

impl Probe {
    async fn sample(&self, target: &Target, shared: &Shared, sent: u64) -> Option<Sample> {
        // Descriptors before the scrape, whose connection would count.
        let fds = fd_counts(self.pid, Some(&self.data_dir))?;
        let rss = rss_kib(self.pid)?;
        let snap = target.scrape().await;
        let gauges = GAUGES
            .iter()
            .map(|&(col, metric)| {
                let value = snap.as_ref().and_then(|s| match metric.split_once('{') {
                    Some((name, labels)) => s.gauge_series(name, labels.trim_end_matches('}')),
                    None => s.gauge_total(metric),
                });
                (col, value)
            })
            .collect();
        let now = Instant::now();
        let t_secs = if now >= self.t0 {
            (now - self.t0).as_secs_f64()
        } else {
            -(self.t0 - now).as_secs_f64()
        };
        Some(Sample {
            t_secs,
            rss_mib: rss as f64 / 1024.0,
            fds,
            gauges,
            disk: Disk::of(&self.data_dir),
            sent,
            outstanding: shared.outstanding.load(Ordering::Relaxed),
        })
    }
}

/// One sample as one line.
fn line(s: &Sample) -> String {
    let t = s.t_secs.max(0.0) as u64;
    let g = |k: &str| {
        s.gauges
            .get(k)
            .copied()
            .flatten()
            .map_or_else(|| "n/a".into(), |v| count(v as u64))
    };
    let mib = |k: &str| s.gauges.get(k).copied().flatten().unwrap_or(0.0) / MIB;
    format!(
        "soak {:>3}:{:02}  rss {:7.1} MiB (db cache {:.1}, memtables {:.1})  fds {:>5} ({} sockets, \
         {} db, {} deleted, {} other)  conns {}  sessions {}  commit queue {}  seq cache {}  \
         group cache {}  wal {:.1} MiB  sst {:.1} MiB in {}  sent {}  unacked {}  cache census: data \
         {:.1} MiB, index {:.1} MiB, filter {:.1} MiB, write buffers {:.1} MiB",
        t / 60,
        t % 60,
        s.rss_mib,
        s.storage_cache_mib(),
        s.gauges.get("memtables").copied().flatten().unwrap_or(0.0) / MIB,
        s.fds.total,
        s.fds.sockets,
        s.fds.data_files,
        s.fds.deleted,
        s.fds.other,
        g("conns"),
        g("sessions"),
        g("commit_queue"),
        g("seq_cache"),
        g("group_cache"),
        s.disk.wal_mib,
        s.disk.sst_mib,
        s.disk.sst_files,
        count(s.sent),
        s.outstanding,
        mib("cache_data"),
        mib("cache_index"),
        mib("cache_filter"),
        mib("cache_write_buffer"),
    )
}

/// Runs `soak` and prints its lines and tables.
pub async fn run(args: &SoakArgs) -> anyhow::Result<Outcome> {
    let common = &args.common;
    anyhow::ensure!(
        (1..=1440).contains(&args.minutes),
        "--minutes must be in 1..=1440"
    );
    anyhow::ensure!(
        common.spawn,
        "soak needs --spawn: it reads the server's memory and descriptors in /proc"
    );
    anyhow::ensure!(args.users >= 2, "--users must be at least 2");
    anyhow::ensure!(
        args.users <= common.harness.per_process,
        "soak runs in one process: --users must be at most --per-process ({})",
        common.harness.per_process
    );
    anyhow::ensure!(
        (2..=500).contains(&args.group_size) && args.group_size <= args.users,
        "--group-size must be in 2..=500 and at most --users"
    );
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.disconnect_fraction),
        "--disconnect-fraction must be in 0..=1"
    );
    anyhow::ensure!(
        (0.0..1.0).contains(&args.warmup),
        "--warmup must be in 0..1"
    );
    anyhow::ensure!(
        args.direct_rate >= 0.0 && args.group_rate >= 0.0 && args.sample_secs >= 1,
        "rates must be ≥ 0 and --sample-secs ≥ 1"
    );
    anyhow::ensure!(
        args.groups == 0 || args.group_rate > 0.0 || args.direct_rate > 0.0,
        "nothing to send"
    );
    let limits = Limits {
        warmup: args.warmup,
        max_rss_slope: args.max_rss_slope,
        fd_slack: args.fd_slack,
    };
    let load_secs = args.minutes as f64 * 60.0;

    let mut spawned = common.clone();
    if !spawned
        .server_args
        .iter()
        .any(|a| a.starts_with("--storage-memory-mb"))
    {
        spawned
            .server_args
            .push(format!("--storage-memory-mb={SOAK_STORAGE_MEMORY_MB}"));
    }
    let mut target = Target::open(&spawned).await?;
    let (pid, data_dir) = {
        let server = target.server.as_ref().context("no spawned server")?;
        (server.pid, server.data_dir())
    };
    let (_addr_tx, addr_rx) = watch::channel(target.addr);
    let group_ids: Vec<String> = (0..args.groups)
        .map(|g| format!("{}-g{g}", target.run_id))
        .collect();
    let groups: Vec<Vec<u32>> = (0..args.groups)
        .map(|g| members(g, args.group_size, args.users))
        .collect();
    let shared = Arc::new(Shared::new(
        &target,
        addr_rx,
        common.harness.source_ips,
        group_ids.clone(),
    ));
    // The load's clock starts once every user is in; until then samples
    // are "before" it.
    let mut probe = Probe {
        pid,
        data_dir,
        t0: Instant::now() + Duration::from_secs(3600),
    };
    let start = probe
        .sample(&target, &shared, 0)
        .await
        .context("reading the server's /proc")?;
    println!("{}", line(&start));

    eprintln!(
        "soak: building {} groups of {} members…",
        args.groups, args.group_size
    );
    create_groups(&shared, &groups, &group_ids).await?;
    eprintln!("soak: connecting {} users…", args.users);
    let (devices, handles) = churn::start_devices(&shared, args.users, common.harness.ramp);
    churn::wait_all_in(&shared, args.users).await?;

    eprintln!(
        "soak: {} minutes of load: {} 1:1 msgs/s, {} group msgs/s to {} groups of {}, {:.1}% of \
         users reconnecting every second, {} slow readers every 10 s, a bad frame every {} s; a \
         sample every {} s…",
        args.minutes,
        args.direct_rate,
        args.group_rate,
        args.groups,
        args.group_size,
        args.disconnect_fraction * 100.0,
        args.slow_readers,
        args.bad_frame_secs,
        args.sample_secs
    );
    let metrics_start = target.scrape().await;
    let t0_ns = now_ns();
    probe.t0 = Instant::now();
    let deadline = probe.t0 + Duration::from_secs_f64(load_secs);
    let stop = Arc::new(AtomicBool::new(false));
    let issued = Arc::new(AtomicU64::new(0));
    let skipped = Arc::new(AtomicU64::new(0));

    let dispatcher = {
        let (devices, stop, issued, skipped) = (
            devices.clone(),
            stop.clone(),
            issued.clone(),
            skipped.clone(),
        );
        let groups = groups.clone();
        let (direct_rate, group_rate, users) = (args.direct_rate, args.group_rate, args.users);
        tokio::spawn(async move {
            let mut rng = rand::rngs::SmallRng::from_rng(&mut rand::rng());
            let start = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let (mut direct, mut group) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let secs = start.elapsed().as_secs_f64();
                let send = |from: u32, to: Dest| {
                    issued.fetch_add(1, Ordering::Relaxed);
                    if devices[from as usize].try_send(Cmd::Send { to }).is_err() {
                        skipped.fetch_add(1, Ordering::Relaxed);
                    }
                };
                while direct < (secs * direct_rate) as u64 {
                    direct += 1;
                    let from = rng.random_range(0..users);
                    let mut to = rng.random_range(0..users - 1);
                    if to >= from {
                        to += 1;
                    }
                    send(from, Dest::User(to));
                }
                while !groups.is_empty() && group < (secs * group_rate) as u64 {
                    group += 1;
                    let g = rng.random_range(0..groups.len());
                    let from = groups[g][rng.random_range(0..groups[g].len())];
                    send(from, Dest::Group(g as u32));
                }
            }
        })
    };
    let churner = {
        let (devices, stop) = (devices.clone(), stop.clone());
        let (fraction, users) = (args.disconnect_fraction, args.users);
        tokio::spawn(async move {
            let mut rng = rand::rngs::SmallRng::from_rng(&mut rand::rng());
            let per_round = (fraction * users as f64).round() as usize;
            let mut rounds = 0u64;
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                rounds += 1;
                for _ in 0..per_round {
                    let i = rng.random_range(0..users) as usize;
                    let pause = Duration::from_millis(rng.random_range(50..500));
                    let _ = devices[i].try_send(Cmd::Drop { pause });
                }
            }
            rounds
        })
    };
    let staller = {
        let (devices, stop) = (devices.clone(), stop.clone());
        let (n, users) = (args.slow_readers, args.users);
        tokio::spawn(async move {
            let mut rng = rand::rngs::SmallRng::from_rng(&mut rand::rng());
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(10)).await;
                for _ in 0..n {
                    let i = rng.random_range(0..users) as usize;
                    let pause = Duration::from_secs(rng.random_range(10..=40));
                    let _ = devices[i].try_send(Cmd::Stall { pause });
                }
            }
        })
    };
    let bad_stats = Arc::new(Mutex::new(BadStats {
        by_kind: BAD_KINDS.iter().map(|&k| (k, 0, 0)).collect(),
        ..Default::default()
    }));
    let bad_framer = {
        let (shared, stop, stats) = (shared.clone(), stop.clone(), bad_stats.clone());
        let (every, users) = (args.bad_frame_secs, args.users);
        tokio::spawn(async move {
            if every <= 0.0 {
                return;
            }
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs_f64(every)).await;
                let k = n % BAD_KINDS.len();
                n += 1;
                // Users of their own, past the load's: no device is kicked.
                let result = bad_frame(BAD_KINDS[k], &shared, users + k as u32).await;
                let mut s = stats.lock().await;
                match result {
                    Err(_) => s.login_failures += 1,
                    Ok(answer) => {
                        s.by_kind[k].1 += 1;
                        match answer {
                            Ok(()) => s.by_kind[k].2 += 1,
                            Err(why) => {
                                s.wrong_total += 1;
                                if s.wrong.len() < 10 {
                                    s.wrong.push(format!("{:?}: {why}", BAD_KINDS[k]));
                                }
                            }
                        }
                    }
                }
            }
        })
    };

    // Sample until the end of the load.
    let mut samples = Vec::new();
    let every = Duration::from_secs(args.sample_secs);
    let mut next = probe.t0 + every;
    while next <= deadline {
        tokio::time::sleep_until(next).await;
        next += every;
        target.check_alive()?;
        if let Some(s) = probe
            .sample(&target, &shared, issued.load(Ordering::Relaxed))
            .await
        {
            println!("{}", line(&s));
            samples.push(s);
        }
    }
    tokio::time::sleep_until(deadline).await;
    stop.store(true, Ordering::Relaxed);
    let load_end_ns = now_ns();
    dispatcher.await.context("dispatcher")?;
    let rounds = churner.await.context("churner")?;
    staller.await.context("staller")?;
    bad_framer.await.context("bad framer")?;

    let reports = churn::finish_devices("soak", &shared, &devices, handles).await?;
    target.check_alive()?;
    let metrics_end = target.scrape().await;
    let usage = target.sampler.usage(t0_ns, load_end_ns).await;

    // The clients are gone: wait for the server to close its side.
    let base_sockets = start.fds.sockets;
    let settled = wait_until(SETTLE_TIMEOUT, Duration::from_millis(500), || {
        fd_counts(pid, Some(&probe.data_dir)).is_some_and(|f| f.sockets <= base_sockets)
    })
    .await;
    if !settled {
        eprintln!(
            "soak: the server still holds more sockets than at the start after {SETTLE_TIMEOUT:?}"
        );
    }
    let end = probe
        .sample(&target, &shared, issued.load(Ordering::Relaxed))
        .await
        .context("reading the server's /proc at the end")?;
    println!("{}  (clients gone)", line(&end));

    let verdict = judge(&start, &samples, &end, load_secs, limits);
    let c = churn::check(&reports, &groups);
    let bad = std::mem::take(&mut *bad_stats.lock().await);
    let server = ServerFigures::from_change(
        server_metrics::change(metrics_start.as_ref(), metrics_end.as_ref()).as_ref(),
    );
    let describe = target.describe();
    let processes = target.close().await;

    let sum = |f: fn(&churn::DeviceReport) -> u64| reports.iter().map(f).sum::<u64>();
    let mut t = Table::new(format!(
        "soak: {} minutes, {} users, {} 1:1 + {} group msgs/s ({} groups of {})",
        args.minutes, args.users, args.direct_rate, args.group_rate, args.groups, args.group_size
    ));
    t.row(
        "sent (created) / acked / stored",
        format!(
            "{} / {} / {}",
            count(c.created),
            count(c.acked),
            count(c.stored)
        ),
    )
    .row("deliveries (message, recipient)", count(c.delivered))
    .row(
        "lost / duplicated / phantom",
        format!("{} / {} / {}", c.lost, c.duplicated, c.phantom),
    )
    .row(
        "refused / never acknowledged / skipped (queue full)",
        format!(
            "{} / {} / {}",
            c.refused,
            c.unacked,
            skipped.load(Ordering::Relaxed)
        ),
    )
    .row(
        "logins / commanded drops / lost sessions",
        format!(
            "{} / {} / {}",
            count(sum(|r| r.logins)),
            count(sum(|r| r.commanded_drops)),
            sum(|r| r.lost_sessions)
        ),
    )
    .row("disconnect rounds", rounds)
    .row("slow-reader stalls", sum(|r| r.stalls))
    .row(
        "gap syncs / redelivered / resent Sends",
        format!(
            "{} / {} / {}",
            sum(|r| r.gap_syncs),
            sum(|r| r.redelivered),
            sum(|r| r.resends)
        ),
    )
    .row(
        "bad-frame connections / answered right",
        format!(
            "{} / {}",
            bad.by_kind.iter().map(|k| k.1).sum::<u64>(),
            bad.by_kind.iter().map(|k| k.2).sum::<u64>()
        ),
    )
    .row(
        "RSS start / judged from / end of load / clients gone",
        format!(
            "{:.1} / {} / {} / {:.1} MiB",
            verdict.rss_start_mib,
            verdict
                .rss_after_warmup_mib
                .map_or("n/a".into(), |v| format!("{v:.1}")),
            verdict
                .rss_end_of_load_mib
                .map_or("n/a".into(), |v| format!("{v:.1}")),
            verdict.rss_end_mib
        ),
    )
    .row(
        "db cache levelled off at / judged from",
        format!(
            "{} / {}",
            verdict
                .cache_levelled_secs
                .map_or("n/a".into(), |t| format!("{t:.0} s")),
            verdict.fit.map_or("n/a".into(), |f| format!(
                "{:.0} s (warm-up {:.0} s)",
                f.from_secs,
                load_secs * args.warmup
            ))
        ),
    )
    .row(
        "RSS net of the db cache: slope judged",
        verdict.fit.map_or("n/a".into(), |f| {
            format!(
                "{:+.2} MiB/h (Theil-Sen; least squares {:+.2}) over {} samples from {:.0} s \
                 (limit {:.1})",
                f.slope_mib_per_hour,
                f.least_squares_mib_per_hour,
                f.points,
                f.from_secs,
                args.max_rss_slope
            )
        }),
    )
    .row(
        "raw RSS: slope judged / db cache at its fullest",
        format!(
            "{} / {:.1} MiB",
            verdict.raw_fit.map_or("n/a".into(), |f| format!(
                "{:+.2} MiB/h (least squares {:+.2})",
                f.slope_mib_per_hour, f.least_squares_mib_per_hour
            )),
            verdict.storage_cache_peak_mib
        ),
    )
    .row(
        "fds start / peak / end (sockets, db files, deleted, other)",
        format!(
            "{} / {} / {}  ({}→{}, {}→{}, {}→{}, {}→{})",
            verdict.fds_start.total,
            verdict.fds_peak,
            verdict.fds_end.total,
            verdict.fds_start.sockets,
            verdict.fds_end.sockets,
            verdict.fds_start.data_files,
            verdict.fds_end.data_files,
            verdict.fds_start.deleted,
            verdict.fds_end.deleted,
            verdict.fds_start.other,
            verdict.fds_end.other
        ),
    );
    usage_rows(&mut t, "under load", &usage);
    server.add_rows(&mut t);
    t.print();
    crate::report::process_table(&processes).print();

    let mut failures = c.failures();
    failures.extend(verdict.failures.iter().cloned());
    if bad.wrong_total > 0 {
        failures.push(format!(
            "{} bad frames not answered with their error and a close; first: {}",
            bad.wrong_total,
            bad.wrong.first().map_or("", String::as_str)
        ));
    }
    if let Some(path) = &args.plot {
        let title = format!(
            "ferry soak: {} min, {} users, {} 1:1 + {} group msgs/s, churn {:.1}%/s",
            args.minutes,
            args.users,
            args.direct_rate,
            args.group_rate,
            args.disconnect_fraction * 100.0
        );
        plot(path, &title, &samples, &verdict, limits)?;
        eprintln!("soak: plot written to {}", path.display());
    }
    let json = json!({
        "target": describe,
        "minutes": args.minutes,
        "users": args.users,
        "direct_rate": args.direct_rate,
        "group_rate": args.group_rate,
        "groups": args.groups,
        "group_size": args.group_size,
        "disconnect_fraction": args.disconnect_fraction,
        "slow_readers": args.slow_readers,
        "bad_frame_secs": args.bad_frame_secs,
        "limits": limits,
        "server_args": spawned.server_args,
        "verdict": verdict,
        "check": c,
        "skipped_queue_full": skipped.load(Ordering::Relaxed),
        "disconnect_rounds": rounds,
        "logins": sum(|r| r.logins),
        "lost_sessions": sum(|r| r.lost_sessions),
        "first_unplanned_disconnect": reports.iter().find_map(|r| r.first_loss.clone()),
        "stalls": sum(|r| r.stalls),
        "gap_syncs": sum(|r| r.gap_syncs),
        "resends": sum(|r| r.resends),
        "bad_frames": bad,
        "samples": samples,
        "sample_start": start,
        "sample_end": end,
        "usage": usage,
        "server_metrics": server,
        "processes": processes,
    });
    Ok(Outcome {
        name: "soak",
        json,
        failures,
    })
}

/// Draws RSS (with the fit after the warm-up) and descriptors over time.
fn plot(
    path: &Path,
    title: &str,
    samples: &[Sample],
    verdict: &Verdict,
    limits: Limits,
) -> anyhow::Result<()> {
    use plotters::prelude::*;
    const ORANGE: RGBColor = RGBColor(230, 140, 0);
    let minutes = |s: &Sample| s.t_secs / 60.0;
    let x_max = samples.last().map_or(1.0, minutes).max(1.0);
    let root = SVGBackend::new(path, (1000, 760)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    let (top, bottom) = root.split_vertically(430);

    let rss_max = samples
        .iter()
        .map(|s| s.rss_mib.max(s.disk.wal_mib))
        .fold(verdict.rss_start_mib, f64::max);
    let mut chart = ChartBuilder::on(&top)
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..x_max, 0f64..(rss_max * 1.15).max(1.0))?;
    chart
        .configure_mesh()
        .x_desc("minutes of load")
        .y_desc("server RSS, MiB")
        .draw()?;
    chart
        .draw_series(LineSeries::new(
            samples.iter().map(|s| (minutes(s), s.rss_mib)),
            BLUE.stroke_width(2),
        ))?
        .label("RSS")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(
            samples.iter().map(|s| (minutes(s), s.rss_net_mib())),
            MAGENTA.stroke_width(2),
        ))?
        .label("RSS net of RocksDB's block cache (judged)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], MAGENTA.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(
            samples.iter().map(|s| (minutes(s), s.storage_cache_mib())),
            CYAN.stroke_width(1),
        ))?
        .label("RocksDB block cache incl. memtables, MiB (bounded)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], CYAN.stroke_width(1)));
    chart
        .draw_series(LineSeries::new(
            samples.iter().map(|s| (minutes(s), s.disk.wal_mib)),
            ORANGE.stroke_width(1),
        ))?
        .label("write-ahead log on disk, MiB (unflushed writes)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], ORANGE.stroke_width(1)));
    // The judged window starts after the warm-up and once the cache has
    // levelled off.
    let warm = verdict
        .fit
        .map_or(x_max * limits.warmup, |f| f.from_secs / 60.0);
    chart
        .draw_series(LineSeries::new(
            vec![(warm, 0.0), (warm, rss_max * 1.15)],
            BLACK.mix(0.4),
        ))?
        .label(format!(
            "judged from here (warm-up {:.0}%, db cache levelled off)",
            limits.warmup * 100.0
        ))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.4)));
    if let Some(f) = verdict.fit {
        let at = |m: f64| f.intercept_mib + f.slope_mib_per_hour * m / 60.0;
        chart
            .draw_series(LineSeries::new(
                vec![(warm, at(warm)), (x_max, at(x_max))],
                RED.stroke_width(2),
            ))?
            .label(format!(
                "Theil-Sen fit of the net RSS: {:+.2} MiB/h (limit {:.1})",
                f.slope_mib_per_hour, limits.max_rss_slope
            ))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;

    let fd_max = samples
        .iter()
        .map(|s| s.fds.total)
        .max()
        .unwrap_or(0)
        .max(verdict.fds_end.total) as f64;
    let mut chart = ChartBuilder::on(&bottom)
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..x_max, 0f64..(fd_max * 1.15).max(1.0))?;
    chart
        .configure_mesh()
        .x_desc("minutes of load")
        .y_desc("server open fds")
        .draw()?;
    type Series = (&'static str, RGBColor, fn(&FdCounts) -> usize);
    let series: [Series; 3] = [
        ("all fds", GREEN, |f| f.total),
        ("sockets", MAGENTA, |f| f.sockets),
        ("data-dir files", CYAN, |f| f.data_files),
    ];
    for (label, color, value) in series {
        chart
            .draw_series(LineSeries::new(
                samples.iter().map(|s| (minutes(s), value(&s.fds) as f64)),
                color.stroke_width(2),
            ))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t_secs: f64, rss_mib: f64, fds: FdCounts) -> Sample {
        Sample {
            t_secs,
            rss_mib,
            fds,
            gauges: BTreeMap::new(),
            disk: Disk::default(),
            sent: 0,
            outstanding: 0,
        }
    }

    fn fds(sockets: usize, data_files: usize, deleted: usize, other: usize) -> FdCounts {
        FdCounts {
            total: sockets + data_files + deleted + other,
            sockets,
            data_files,
            deleted,
            other,
        }
    }

    const LIMITS: Limits = Limits {
        warmup: 0.2,
        max_rss_slope: 10.0,
        fd_slack: 4,
    };

    /// A one-hour run sampled every 10 s: RSS climbs fast during the first
    /// `warm` seconds, then follows `after(t)`.
    fn run(warm: f64, after: impl Fn(f64) -> f64) -> Vec<Sample> {
        (1..=360)
            .map(|k| {
                let t = k as f64 * 10.0;
                let rss = if t < warm { 50.0 + t / 10.0 } else { after(t) };
                sample(t, rss, fds(2003, 20, 0, 5))
            })
            .collect()
    }

    #[test]
    fn least_squares_recovers_a_line() {
        let pts: Vec<(f64, f64)> = (0..10).map(|x| (x as f64, 3.0 + 2.0 * x as f64)).collect();
        let (a, b) = least_squares(&pts).unwrap();
        assert!((a - 3.0).abs() < 1e-9 && (b - 2.0).abs() < 1e-9);
        assert!(least_squares(&[(1.0, 1.0)]).is_none());
        assert!(least_squares(&[(1.0, 1.0), (1.0, 2.0)]).is_none());
    }

    #[test]
    fn flat_after_warmup_passes_even_with_a_sawtooth() {
        let start = sample(-5.0, 40.0, fds(3, 10, 0, 5));
        // Warm-up growth of 60 MiB is left out; then ±8 MiB every 5 minutes.
        let s = run(600.0, |t| {
            110.0
                + if ((t / 300.0) as u64).is_multiple_of(2) {
                    8.0
                } else {
                    -8.0
                }
        });
        let end = sample(3700.0, 100.0, fds(3, 30, 0, 5));
        let v = judge(&start, &s, &end, 3600.0, LIMITS);
        assert!(v.failures.is_empty(), "{:?}", v.failures);
        let f = v.fit.unwrap();
        // Where the window cuts the square wave tilts the line a little.
        assert!(f.slope_mib_per_hour.abs() < 5.0, "{f:?}");
        assert_eq!(f.points, 289);
        assert_eq!(v.rss_after_warmup_mib, Some(110.0 + 8.0));
    }

    #[test]
    fn steady_growth_after_warmup_fails() {
        let start = sample(-5.0, 40.0, fds(3, 10, 0, 5));
        // 20 MiB per hour: a leak of ~1 KiB per message at 300 msgs/s would be 1 GiB/h.
        let s = run(600.0, |t| 100.0 + 20.0 * t / 3600.0);
        let end = sample(3700.0, 120.0, fds(3, 10, 0, 5));
        let v = judge(&start, &s, &end, 3600.0, LIMITS);
        let f = v.fit.unwrap();
        assert!((f.slope_mib_per_hour - 20.0).abs() < 1e-6, "{f:?}");
        assert_eq!(v.failures.len(), 1, "{:?}", v.failures);
        assert!(v.failures[0].contains("MiB/h"), "{:?}", v.failures);
        // The same growth below the limit passes.
        let lax = Limits {
            max_rss_slope: 25.0,
            ..LIMITS
        };
        assert!(judge(&start, &s, &end, 3600.0, lax).failures.is_empty());
    }

    /// `s` with RocksDB's block cache at `cache_mib`.
    fn with_cache(mut s: Sample, cache_mib: f64) -> Sample {
        s.gauges.insert("storage_cache", Some(cache_mib * MIB));
        s
    }

    #[test]
    fn a_filling_block_cache_is_not_a_leak_but_growth_beside_it_is() {
        let start = sample(-5.0, 40.0, fds(3, 10, 0, 5));
        let end = sample(3700.0, 150.0, fds(3, 10, 0, 5));
        // The cache fills by 60 MiB over 20 minutes, then goes on growing
        // by 10 MiB/h (it has levelled off: 90% of its highest), and RSS
        // follows it.
        let cache = |t: f64| 20.0 + 60.0 * (t / 1200.0).min(1.0) + 10.0 * t / 3600.0;
        let filling: Vec<Sample> = run(0.0, |t| 100.0 + cache(t))
            .into_iter()
            .map(|s| {
                let t = s.t_secs;
                with_cache(s, cache(t))
            })
            .collect();
        let v = judge(&start, &filling, &end, 3600.0, LIMITS);
        assert!(v.failures.is_empty(), "{:?}", v.failures);
        assert!(v.fit.unwrap().slope_mib_per_hour.abs() < 1e-6);
        assert!((v.raw_fit.unwrap().slope_mib_per_hour - 10.0).abs() < 1e-6);
        assert!((v.storage_cache_peak_mib - 90.0).abs() < 1e-9);
        // 20 MiB/h more than the cache explains fails.
        let leaking: Vec<Sample> = run(0.0, |t| 100.0 + cache(t) + 20.0 * t / 3600.0)
            .into_iter()
            .map(|s| {
                let t = s.t_secs;
                with_cache(s, cache(t))
            })
            .collect();
        let v = judge(&start, &leaking, &end, 3600.0, LIMITS);
        assert_eq!(v.failures.len(), 1, "{:?}", v.failures);
        assert!(v.failures[0].contains("net of RocksDB"), "{:?}", v.failures);
    }

    /// `samples` with the server reporting a cache capacity of `capacity_mib`.
    fn with_capacity(samples: &[Sample], capacity_mib: f64) -> Vec<Sample> {
        samples
            .iter()
            .cloned()
            .map(|mut s| {
                s.gauges
                    .insert("storage_cache_capacity", Some(capacity_mib * MIB));
                s
            })
            .collect()
    }

    /// A one-hour run whose cache fills from 2 to 32 MiB by `full_at`
    /// seconds and stays there, with RSS net of the cache at 60 MiB plus
    /// `overhead` per MiB the cache holds (the allocator's share of a
    /// filling cache) plus `leak(t)`.
    fn filling_then_full(full_at: f64, overhead: f64, leak: impl Fn(f64) -> f64) -> Vec<Sample> {
        let cache = |t: f64| 2.0 + 30.0 * (t / full_at).min(1.0);
        let samples: Vec<Sample> = run(0.0, |t| 60.0 + (1.0 + overhead) * cache(t) + leak(t))
            .into_iter()
            .map(|s| {
                let t = s.t_secs;
                with_cache(s, cache(t))
            })
            .collect();
        with_capacity(&samples, 32.0)
    }

    #[test]
    fn the_memory_check_waits_for_the_cache_to_level_off() {
        let start = sample(-5.0, 40.0, fds(3, 10, 0, 5));
        let end = sample(3700.0, 150.0, fds(3, 10, 0, 5));
        // The cache fills until minute 30, well after the 12-minute
        // warm-up, and the allocator's overhead grows with it (1 MiB per
        // MiB: 30 MiB over the filling): judged from when the cache's
        // 5-minute mean reaches 90% of its level (28.8 MiB), which lags the
        // cache by about 2.5 minutes.
        let v = judge(
            &start,
            &filling_then_full(1800.0, 1.0, |_| 0.0),
            &end,
            3600.0,
            LIMITS,
        );
        assert!(v.failures.is_empty(), "{:?}", v.failures);
        assert_eq!(v.cache_levelled_secs, Some(1760.0));
        let fit = v.fit.unwrap();
        assert_eq!(fit.from_secs, 1760.0);
        assert!(fit.slope_mib_per_hour.abs() < 1e-9, "{fit:?}");
        // Judged from the end of the warm-up instead, the filling fails it:
        // the reason for the wait. (A server that reports no cache.)
        let no_cache: Vec<Sample> = filling_then_full(1800.0, 1.0, |_| 0.0)
            .into_iter()
            .map(|mut s| {
                let cache = s.storage_cache_mib();
                s.gauges.remove("storage_cache");
                s.rss_mib -= cache;
                s
            })
            .collect();
        let v = judge(&start, &no_cache, &end, 3600.0, LIMITS);
        assert_eq!(v.cache_levelled_secs, None);
        assert_eq!(v.fit.unwrap().from_secs, 720.0);
        assert_eq!(v.failures.len(), 1, "{:?}", v.failures);
        assert!(v.failures[0].contains("net of RocksDB"), "{:?}", v.failures);
        // A leak once the cache has levelled off still fails.
        let v = judge(
            &start,
            &filling_then_full(1800.0, 1.0, |t| 20.0 * t / 3600.0),
            &end,
            3600.0,
            LIMITS,
        );
        assert_eq!(v.failures.len(), 1, "{:?}", v.failures);
        assert!(v.failures[0].contains("net of RocksDB"), "{:?}", v.failures);
        assert!((v.fit.unwrap().slope_mib_per_hour - 20.0).abs() < 1e-6);
        // A cache levelled off before the warm-up ends: judged from the
        // warm-up.
        let v = judge(
            &start,
            &filling_then_full(300.0, 0.5, |_| 0.0),
            &end,
            3600.0,
            LIMITS,
        );
        assert!(v.failures.is_empty(), "{:?}", v.failures);
        assert_eq!(v.cache_levelled_secs, Some(460.0));
        assert_eq!(v.fit.unwrap().from_secs, 720.0);
    }

    #[test]
    fn a_cache_that_levels_off_late_or_never_is_no_steady_state() {
        let start = sample(-5.0, 40.0, fds(3, 10, 0, 5));
        let end = sample(3700.0, 150.0, fds(3, 10, 0, 5));
        // Full at minute 40 of 60: less than half the run left to judge.
        let v = judge(
            &start,
            &filling_then_full(2400.0, 0.0, |_| 0.0),
            &end,
            3600.0,
            LIMITS,
        );
        assert_eq!(v.failures.len(), 1, "{:?}", v.failures);
        assert!(v.failures[0].contains("still growing"), "{:?}", v.failures);
        // Growing to the end: it reaches 90% of its highest at minute 54.
        let v = judge(
            &start,
            &filling_then_full(3600.0, 0.0, |_| 0.0),
            &end,
            3600.0,
            LIMITS,
        );
        assert_eq!(v.cache_levelled_secs, Some(3240.0));
        assert_eq!(v.failures.len(), 1, "{:?}", v.failures);
        assert!(v.failures[0].contains("still growing"), "{:?}", v.failures);
    }

    #[test]
    fn a_swinging_cache_levels_off_by_its_mean() {
        // Data blocks settle at 9 MiB by minute 10 while the memtables'
        // reservation swings between 10 and 18 MiB with every flush (a
        // 2-minute sawtooth): never 90% of a 32 MiB capacity, nor steadily
        // 90% of its highest sample, but its 5-minute mean levels off.
        let swinging: Vec<Sample> = run(0.0, |_| 100.0)
            .into_iter()
            .map(|s| {
                let t = s.t_secs;
                let data = 9.0 * (t / 600.0).min(1.0);
                let reservation = 10.0 + 8.0 * ((t % 120.0) / 120.0);
                with_cache(s, data + reservation)
            })
            .collect();
        let levelled = cache_levelled_secs(&swinging).unwrap();
        assert!((400.0..=800.0).contains(&levelled), "{levelled}");
        let start = sample(-5.0, 40.0, fds(3, 10, 0, 5));
        let v = judge(&start, &swinging, &start, 3600.0, LIMITS);
        assert!(v.failures.is_empty(), "{:?}", v.failures);
    }

    #[test]
    fn a_cache_over_its_capacity_fails() {
        let start = sample(-5.0, 40.0, fds(3, 10, 0, 5));
        let end = sample(3700.0, 150.0, fds(3, 10, 0, 5));
        // A cache that reaches 32 MiB against a stated capacity of 34 is
        // within it; against 24 it is over by a third.
        let full = filling_then_full(600.0, 0.0, |_| 0.0);
        let v = judge(&start, &with_capacity(&full, 34.0), &end, 3600.0, LIMITS);
        assert!(v.failures.is_empty(), "{:?}", v.failures);
        let v = judge(&start, &with_capacity(&full, 24.0), &end, 3600.0, LIMITS);
        assert_eq!(v.failures.len(), 1, "{:?}", v.failures);
        assert!(v.failures[0].contains("capacity"), "{:?}", v.failures);
    }

    #[test]
    fn theil_sen_ignores_a_transient_spike_but_not_a_leak() {
        let (a, b) = theil_sen(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0), (3.0, 7.0)]).unwrap();
        assert!((a - 1.0).abs() < 1e-9 && (b - 2.0).abs() < 1e-9);
        assert!(theil_sen(&[(1.0, 1.0), (1.0, 2.0)]).is_none());
        let start = sample(-5.0, 40.0, fds(3, 10, 0, 5));
        let end = sample(3700.0, 100.0, fds(3, 10, 0, 5));
        // Flat at 100 MiB but for a compaction's 80 MiB for 5 minutes at 50 min.
        let spike = |t: f64| {
            if (3000.0..3300.0).contains(&t) {
                80.0
            } else {
                0.0
            }
        };
        let s = run(600.0, |t| 100.0 + spike(t));
        let v = judge(&start, &s, &end, 3600.0, LIMITS);
        assert!(v.failures.is_empty(), "{:?}", v.failures);
        let f = v.fit.unwrap();
        assert!(f.slope_mib_per_hour.abs() < 1e-9, "{f:?}");
        // Least squares alone would have failed the run.
        assert!(f.least_squares_mib_per_hour > 10.0, "{f:?}");
        // A 20 MiB/h leak with the same spike still fails.
        let s = run(600.0, |t| 100.0 + 20.0 * t / 3600.0 + spike(t));
        let v = judge(&start, &s, &end, 3600.0, LIMITS);
        assert!((v.fit.unwrap().slope_mib_per_hour - 20.0).abs() < 1.0);
        assert_eq!(v.failures.len(), 1, "{:?}", v.failures);
    }

    #[test]
    fn too_few_samples_fail() {
        let start = sample(-5.0, 40.0, fds(3, 10, 0, 5));
        let s = vec![
            sample(10.0, 50.0, fds(3, 10, 0, 5)),
            sample(20.0, 50.0, fds(3, 10, 0, 5)),
        ];
        let v = judge(&start, &s, &start, 20.0, LIMITS);
        assert!(v.fit.is_none());
        assert!(v.failures[0].contains("too few"), "{:?}", v.failures);
    }

    #[test]
    fn descriptor_checks() {
        let start = sample(-5.0, 40.0, fds(3, 10, 0, 5));
        let s = run(600.0, |_| 100.0);
        // More RocksDB files and a few descriptors within the slack: fine.
        let ok = sample(3700.0, 100.0, fds(5, 40, 0, 7));
        assert!(judge(&start, &s, &ok, 3600.0, LIMITS).failures.is_empty());
        // Client sockets the server never closed.
        let sockets = sample(3700.0, 100.0, fds(103, 10, 0, 5));
        let v = judge(&start, &s, &sockets, 3600.0, LIMITS);
        assert_eq!(v.failures.len(), 1);
        assert!(
            v.failures[0].contains("descriptor leak"),
            "{:?}",
            v.failures
        );
        assert!(
            v.failures[0].contains("103 sockets (from 3)"),
            "{:?}",
            v.failures
        );
        // A deleted file held open fails even within the slack.
        let deleted = sample(3700.0, 100.0, fds(3, 10, 1, 5));
        let v = judge(&start, &s, &deleted, 3600.0, LIMITS);
        assert_eq!(v.failures.len(), 1);
        assert!(v.failures[0].contains("deleted files"), "{:?}", v.failures);
        assert_eq!(v.fds_peak, 2028);
    }

    #[test]
    fn disk_counts_wal_and_tables() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("000012.log"), vec![0u8; 1 << 20]).unwrap();
        std::fs::write(dir.path().join("000010.sst"), vec![0u8; 1 << 19]).unwrap();
        std::fs::create_dir(dir.path().join("db")).unwrap();
        std::fs::write(dir.path().join("db/000011.sst"), vec![0u8; 1 << 19]).unwrap();
        std::fs::write(dir.path().join("db/LOG"), b"text").unwrap();
        let d = Disk::of(dir.path());
        assert_eq!((d.wal_mib, d.sst_mib, d.sst_files), (1.0, 1.0, 2));
    }

    #[test]
    fn groups_wrap_around_the_users() {
        assert_eq!(members(0, 3, 10), vec![0, 1, 2]);
        assert_eq!(members(3, 3, 10), vec![9, 0, 1]);
    }

    #[test]
    fn bad_frames_are_what_they_say() {
        // Any frame limit a server may have (at most 16 MiB).
        let codec = ferry_protocol::FrameCodec::new(16 << 20);
        for kind in BAD_KINDS {
            let (bytes, code) = kind.bytes_and_code();
            let mut buf = bytes::BytesMut::from(&bytes[..]);
            let got = match codec.decode_raw(&mut buf) {
                Err(e) => e.error_code(),
                Ok(Some(raw)) => <Frame as prost::Message>::decode(raw)
                    .err()
                    .map(|_| ErrorCode::MalformedFrame),
                Ok(None) => None,
            };
            assert_eq!(got, Some(code), "{kind:?}");
        }
    }
}
