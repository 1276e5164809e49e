//! The server's own figures, from its Prometheus `/metrics` endpoint.
//!
//! The harness scrapes `/metrics` (one plain HTTP/1.1 GET on a fresh
//! connection, [`scrape`]) at the start and the end of every measured
//! phase; a [`Snapshot`] keeps the series the tables report, [`change`]
//! turns two snapshots into what the server did in between, and
//! [`ServerFigures`] is that change as rows and JSON: group-commit batches,
//! the server-side latency histograms with quantiles estimated from their
//! buckets, deliveries, frames and closed connections.
//!
//! None of it may fail a scenario: an unreachable endpoint, an error status
//! or a missing metric makes the figure `None`, shown as "n/a".

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::hist::fmt_us;
use crate::report::count;

/// How long one scrape (connect, request, whole response) may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest response accepted; ferry's `/metrics` is a few tens of KiB.
const MAX_RESPONSE: u64 = 16 << 20;

/// One series: a metric name and its labels, rendered sorted
/// (`reason="disconnected"`; empty without labels).
type Series = (String, String);

/// The label [`Snapshot::of_nodes`] puts first on every series of a node.
const NODE_LABEL: &str = "ferry_bench_node";

/// `labels` without a leading `ferry_bench_node="ID"`.
fn without_node_label(labels: &str) -> String {
    match labels.strip_prefix(NODE_LABEL) {
        Some(rest) => {
            let rest = rest.strip_prefix("=\"").unwrap_or(rest);
            let rest = rest.split_once('"').map_or("", |(_, after)| after);
            rest.strip_prefix(',').unwrap_or(rest).to_owned()
        }
        None => labels.to_owned(),
    }
}

/// A cumulative histogram as Prometheus exposes it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// `(le, cumulative count)`, ascending, the last one `+Inf`.
    pub buckets: Vec<(f64, f64)>,
    /// `_sum`.
    pub sum: f64,
    /// `_count`.
    pub count: f64,
}

impl Histogram {
    /// The `q`-quantile estimated like PromQL's `histogram_quantile`: find
    /// the bucket holding rank `q × count` and interpolate linearly inside
    /// it (the first bucket starts at 0). A rank in the `+Inf` bucket gives
    /// the highest finite bound. `None` without observations.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.buckets.last()?.1;
        if total <= 0.0 || !(0.0..=1.0).contains(&q) {
            return None;
        }
        let rank = q * total;
        let b = self.buckets.iter().position(|&(_, c)| c >= rank)?;
        let (upper, cumulative) = self.buckets[b];
        if upper.is_infinite() {
            return Some(if b == 0 { 0.0 } else { self.buckets[b - 1].0 });
        }
        let (lower, below) = if b == 0 {
            (0.0_f64.min(upper), 0.0)
        } else {
            self.buckets[b - 1]
        };
        let inside = cumulative - below;
        if inside <= 0.0 {
            return Some(upper);
        }
        Some(lower + (upper - lower) * (rank - below) / inside)
    }

    /// The observations of `self` that `before` did not have yet. A count
    /// that went down means the server restarted: everything is new.
    fn since(&self, before: Option<&Histogram>) -> Histogram {
        let Some(before) = before.filter(|b| b.count <= self.count) else {
            return self.clone();
        };
        let earlier = |le: f64| {
            before
                .buckets
                .iter()
                .find(|&&(l, _)| l == le)
                .map_or(0.0, |&(_, c)| c)
        };
        Histogram {
            buckets: self
                .buckets
                .iter()
                .map(|&(le, c)| (le, (c - earlier(le)).max(0.0)))
                .collect(),
            sum: self.sum - before.sum,
            count: self.count - before.count,
        }
    }

    /// Both histograms' observations (same bucket bounds).
    fn plus(&self, other: &Histogram) -> Histogram {
        let mut out = self.clone();
        for &(le, c) in &other.buckets {
            match out.buckets.iter_mut().find(|(l, _)| *l == le) {
                Some(slot) => slot.1 += c,
                None => out.buckets.push((le, c)),
            }
        }
        out.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        out.sum += other.sum;
        out.count += other.count;
        out
    }
}

/// The series of one scrape, or what changed between two (see [`change`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    counters: BTreeMap<Series, f64>,
    gauges: BTreeMap<Series, f64>,
    histograms: BTreeMap<Series, Histogram>,
}

impl Snapshot {
    /// Parses the Prometheus text exposition format. Summaries and untyped
    /// series (other than histograms' `_sum`/`_count`) are left out.
    pub fn parse(text: &str) -> anyhow::Result<Snapshot> {
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        let scrape = prometheus_parse::Scrape::parse(lines).context("parsing /metrics")?;
        let mut untyped = BTreeMap::new();
        let mut snap = Snapshot::default();
        let mut histograms = Vec::new();
        for s in scrape.samples {
            let series = (s.metric, s.labels.to_string());
            match s.value {
                prometheus_parse::Value::Counter(v) => {
                    snap.counters.insert(series, v);
                }
                prometheus_parse::Value::Gauge(v) => {
                    snap.gauges.insert(series, v);
                }
                prometheus_parse::Value::Untyped(v) => {
                    untyped.insert(series, v);
                }
                prometheus_parse::Value::Histogram(buckets) => histograms.push((series, buckets)),
                prometheus_parse::Value::Summary(_) => {}
            }
        }
        // The parser hands a histogram's `_sum` and `_count` lines over as
        // untyped series of their own.
        for ((name, labels), buckets) in histograms {
            let mut buckets: Vec<(f64, f64)> =
                buckets.iter().map(|b| (b.less_than, b.count)).collect();
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            let part = |suffix: &str| untyped.get(&(format!("{name}{suffix}"), labels.clone()));
            let count = part("_count")
                .copied()
                .or_else(|| buckets.last().map(|b| b.1))
                .unwrap_or(0.0);
            let sum = part("_sum").copied().unwrap_or(0.0);
            snap.histograms.insert(
                (name, labels),
                Histogram {
                    buckets,
                    sum,
                    count,
                },
            );
        }
        Ok(snap)
    }

    /// The sum of a counter over all its label sets; `None` when absent.
    fn counter_total(&self, name: &str) -> Option<f64> {
        let mut values = self.counters.iter().filter(|((n, _), _)| n == name);
        let first = values.next()?.1;
        Some(first + values.map(|(_, v)| v).sum::<f64>())
    }

    /// A counter's value per value of its one label `label`.
    fn counter_by(&self, name: &str, label: &str) -> Option<BTreeMap<String, f64>> {
        let prefix = format!("{label}=\"");
        let by: BTreeMap<String, f64> = self
            .counters
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|((_, labels), v)| {
                let value = labels
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(&prefix))
                    .map(|v| v.trim_end_matches('"').to_owned())
                    .unwrap_or_default();
                (value, *v)
            })
            .fold(BTreeMap::new(), |mut by, (value, v)| {
                // One series per node in a cluster's snapshot: add them up.
                *by.entry(value).or_default() += v;
                by
            });
        (!by.is_empty()).then_some(by)
    }

    /// The histogram without labels (every node's together in a
    /// cluster's snapshot).
    fn histogram(&self, name: &str) -> Option<Histogram> {
        self.histogram_where(name, |labels| labels.is_empty())
    }

    /// The histogram summed over every label set (e.g. every peer).
    fn histogram_all(&self, name: &str) -> Option<Histogram> {
        self.histogram_where(name, |_| true)
    }

    fn histogram_where(&self, name: &str, keep: impl Fn(&str) -> bool) -> Option<Histogram> {
        self.histograms
            .iter()
            .filter(|((n, labels), _)| n == name && keep(without_node_label(labels).as_str()))
            .map(|(_, h)| h.clone())
            .reduce(|a, b| a.plus(&b))
    }

    /// A gauge summed over its label sets (every node's, every peer's).
    pub fn gauge_total(&self, name: &str) -> Option<f64> {
        let mut values = self.gauges.iter().filter(|((n, _), _)| n == name);
        let first = values.next()?.1;
        Some(first + values.map(|(_, v)| v).sum::<f64>())
    }

    /// The gauge `name` with exactly the labels `labels` (`key="value"`,
    /// comma-separated, keys in order).
    pub fn gauge_series(&self, name: &str, labels: &str) -> Option<f64> {
        self.gauges
            .get(&(name.to_owned(), labels.to_owned()))
            .copied()
    }

    /// Every node's scrape as one snapshot: each series gets the label
    /// `ferry_bench_node="ID"`, so that [`change`] works node by node (a
    /// restarted node's counters start over without hiding the others')
    /// and the figures sum over the nodes.
    pub fn of_nodes(nodes: Vec<(u16, Snapshot)>) -> Snapshot {
        let mut out = Snapshot::default();
        for (id, snap) in nodes {
            let label = |(name, labels): Series| {
                let node = format!("{NODE_LABEL}=\"{id}\"");
                let labels = if labels.is_empty() {
                    node
                } else {
                    format!("{node},{labels}")
                };
                (name, labels)
            };
            out.counters
                .extend(snap.counters.into_iter().map(|(k, v)| (label(k), v)));
            out.gauges
                .extend(snap.gauges.into_iter().map(|(k, v)| (label(k), v)));
            out.histograms
                .extend(snap.histograms.into_iter().map(|(k, v)| (label(k), v)));
        }
        out
    }

    /// Without node `id`'s series: what to compare a restarted node's new
    /// process with (everything it counts is new).
    pub fn without_node(&self, id: u16) -> Snapshot {
        let prefix = format!("{NODE_LABEL}=\"{id}\"");
        let keep = |(_, labels): &Series| {
            !(labels == &prefix || labels.starts_with(&format!("{prefix},")))
        };
        Snapshot {
            counters: self
                .counters
                .iter()
                .filter(|&(k, _)| keep(k))
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            gauges: self
                .gauges
                .iter()
                .filter(|&(k, _)| keep(k))
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            histograms: self
                .histograms
                .iter()
                .filter(|&(k, _)| keep(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}

/// What the server did between two snapshots: counter increments and
/// histogram observations, and the gauges as they were `after`. A counter
/// that went down means the server restarted in between; its value `after`
/// then counts from the restart. A histogram missing `before` had no
/// observations yet (they appear on the first one). `None` when either
/// scrape failed.
pub fn change(before: Option<&Snapshot>, after: Option<&Snapshot>) -> Option<Snapshot> {
    let (before, after) = (before?, after?);
    let counters = after
        .counters
        .iter()
        .map(|(k, &v)| {
            let old = before.counters.get(k).copied().unwrap_or(0.0);
            (k.clone(), if v >= old { v - old } else { v })
        })
        .collect();
    let histograms = after
        .histograms
        .iter()
        .map(|(k, h)| (k.clone(), h.since(before.histograms.get(k))))
        .collect();
    Some(Snapshot {
        counters,
        gauges: after.gauges.clone(),
        histograms,
    })
}

/// Two consecutive changes as one (around a server restart: the change up
/// to the kill, then the change of the new process): increments add up,
/// gauges are `later`'s. `None` when either is.
pub fn then(earlier: Option<Snapshot>, later: Option<Snapshot>) -> Option<Snapshot> {
    let (mut sum, later) = (earlier?, later?);
    for (k, v) in later.counters {
        *sum.counters.entry(k).or_default() += v;
    }
    for (k, h) in later.histograms {
        let merged = match sum.histograms.get(&k) {
            Some(old) => old.plus(&h),
            None => h,
        };
        sum.histograms.insert(k, merged);
    }
    sum.gauges = later.gauges;
    Some(sum)
}

/// One latency histogram over a phase.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencyFigures {
    /// Observations.
    pub count: u64,
    /// Mean, seconds (`None` without observations).
    pub mean_s: Option<f64>,
    /// Median estimated from the buckets, seconds.
    pub p50_s: Option<f64>,
    /// 99th percentile estimated from the buckets, seconds.
    pub p99_s: Option<f64>,
}

impl LatencyFigures {
    fn of(h: &Histogram) -> LatencyFigures {
        LatencyFigures {
            count: h.count.round() as u64,
            mean_s: (h.count > 0.0).then(|| h.sum / h.count),
            p50_s: h.quantile(0.5),
            p99_s: h.quantile(0.99),
        }
    }
}

/// The server's figures over one measured phase. Every field is `None`
/// ("n/a") when `/metrics` could not be scraped or the metric is absent.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ServerFigures {
    /// Whether both scrapes succeeded.
    pub available: bool,
    /// Group-commit batches written (`ferry_commit_batch_ops` count).
    pub commit_batches: Option<u64>,
    /// Mean ops per batch (`ferry_commit_batch_ops` sum / count).
    pub commit_mean_ops: Option<f64>,
    /// A Send inside the server, up to its SendAck (`ferry_send_ack_seconds`).
    pub send_ack: Option<LatencyFigures>,
    /// Writing (and syncing) a batch (`ferry_commit_seconds`).
    pub commit_write: Option<LatencyFigures>,
    /// Applying a batch's ops before its write (`ferry_commit_apply_seconds`).
    pub commit_apply: Option<LatencyFigures>,
    /// Handing a durable batch's acks and fan-out over (`ferry_commit_sink_seconds`).
    pub commit_sink: Option<LatencyFigures>,
    /// Inbox entries fanned out (`ferry_deliveries_total`).
    pub deliveries: Option<u64>,
    /// Sync pages served (`ferry_sync_pages_total`).
    pub sync_pages: Option<u64>,
    /// Frames received, all kinds (`ferry_frames_in_total`).
    pub frames_in: Option<u64>,
    /// Frames sent, all kinds (`ferry_frames_out_total`).
    pub frames_out: Option<u64>,
    /// Authenticated connections closed, by reason; only reasons that occurred
    /// (`ferry_connections_closed_total`).
    pub connections_closed: Option<BTreeMap<String, u64>>,
    /// Connections open at the end (`ferry_connections_open`).
    pub connections_open: Option<u64>,
    /// The cluster bus (every node together); `None` on a single node.
    pub bus: Option<BusFigures>,
}

/// What the NSQ bus of a cluster did over one phase, every node together.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BusFigures {
    /// Link batches published to peers (`ferry_bus_link_batches_published_total`).
    pub batches_published: Option<u64>,
    /// Link batches published again (resend timer, start-up, resend asks).
    pub batches_resent: Option<u64>,
    /// NSQ messages consumed (`ferry_bus_consumed_total`).
    pub consumed: u64,
    /// Link batches dropped as already applied (`ferry_bus_link_duplicates_total`).
    pub duplicates: Option<u64>,
    /// Failed publishes (`ferry_bus_publish_failures_total`).
    pub publish_failures: Option<u64>,
    /// Calls to a group's owner that timed out (`ferry_bus_call_timeouts_total`).
    pub call_timeouts: Option<u64>,
    /// Publish to confirmation of a link batch (`ferry_bus_confirm_seconds`, every peer).
    pub confirm: Option<LatencyFigures>,
    /// Unconfirmed outbox entries at the end (`ferry_bus_outbox_entries`).
    pub outbox_entries: Option<u64>,
}

impl ServerFigures {
    /// The figures of a [`change`].
    pub fn from_change(change: Option<&Snapshot>) -> ServerFigures {
        let Some(c) = change else {
            return ServerFigures::default();
        };
        let whole = |v: f64| v.round().max(0.0) as u64;
        let total = |name: &str| c.counter_total(name).map(whole);
        let batch = c.histogram("ferry_commit_batch_ops");
        let batch = batch.as_ref();
        let latency = |name: &str| c.histogram(name).as_ref().map(LatencyFigures::of);
        ServerFigures {
            available: true,
            commit_batches: batch.map(|h| whole(h.count)),
            commit_mean_ops: batch.and_then(|h| (h.count > 0.0).then(|| h.sum / h.count)),
            send_ack: latency("ferry_send_ack_seconds"),
            commit_write: latency("ferry_commit_seconds"),
            commit_apply: latency("ferry_commit_apply_seconds"),
            commit_sink: latency("ferry_commit_sink_seconds"),
            deliveries: total("ferry_deliveries_total"),
            sync_pages: total("ferry_sync_pages_total"),
            frames_in: total("ferry_frames_in_total"),
            frames_out: total("ferry_frames_out_total"),
            connections_closed: c
                .counter_by("ferry_connections_closed_total", "reason")
                .map(|by| {
                    by.into_iter()
                        .map(|(reason, v)| (reason, whole(v)))
                        .filter(|&(_, v)| v > 0)
                        .collect()
                }),
            connections_open: c.gauge_total("ferry_connections_open").map(whole),
            bus: c
                .counter_total("ferry_bus_consumed_total")
                .map(|consumed| BusFigures {
                    batches_published: total("ferry_bus_link_batches_published_total"),
                    batches_resent: total("ferry_bus_link_batches_resent_total"),
                    consumed: whole(consumed),
                    duplicates: total("ferry_bus_link_duplicates_total"),
                    publish_failures: total("ferry_bus_publish_failures_total"),
                    call_timeouts: total("ferry_bus_call_timeouts_total"),
                    confirm: c
                        .histogram_all("ferry_bus_confirm_seconds")
                        .as_ref()
                        .map(LatencyFigures::of),
                    outbox_entries: c.gauge_total("ferry_bus_outbox_entries").map(whole),
                }),
        }
    }

    /// The figures between two scrapes.
    pub fn between(before: Option<&Snapshot>, after: Option<&Snapshot>) -> ServerFigures {
        ServerFigures::from_change(change(before, after).as_ref())
    }

    /// `(label, value)` table rows, the same labels for every phase.
    pub fn rows(&self) -> Vec<(&'static str, String)> {
        const NA: &str = "n/a";
        let opt = |v: Option<u64>| v.map(count).unwrap_or_else(|| NA.into());
        let latency = |l: &Option<LatencyFigures>| match l {
            None => NA.to_owned(),
            Some(l) if l.count == 0 => "none".to_owned(),
            Some(l) => {
                let s = |v: Option<f64>| v.map(secs).unwrap_or_else(|| NA.into());
                format!("{} / {} / {}", s(l.p50_s), s(l.p99_s), s(l.mean_s))
            }
        };
        let mut rows = vec![
            (
                "server: commit batches / mean ops",
                match (self.commit_batches, self.commit_mean_ops) {
                    (None, _) => NA.to_owned(),
                    (Some(n), None) => format!("{} / -", count(n)),
                    (Some(n), Some(m)) => format!("{} / {m:.1}", count(n)),
                },
            ),
            (
                "server: send→ack p50/p99/mean (server-side)",
                latency(&self.send_ack),
            ),
            (
                "server: commit write p50/p99/mean",
                latency(&self.commit_write),
            ),
            (
                "server: commit apply p50/p99/mean",
                latency(&self.commit_apply),
            ),
            (
                "server: commit sink p50/p99/mean",
                latency(&self.commit_sink),
            ),
            (
                "server: deliveries / sync pages",
                format!("{} / {}", opt(self.deliveries), opt(self.sync_pages)),
            ),
            (
                "server: frames in / out",
                format!("{} / {}", opt(self.frames_in), opt(self.frames_out)),
            ),
            (
                "server: connections closed",
                match &self.connections_closed {
                    None => NA.to_owned(),
                    Some(by) if by.is_empty() => "none".to_owned(),
                    Some(by) => by
                        .iter()
                        .map(|(reason, n)| format!("{reason} {}", count(*n)))
                        .collect::<Vec<_>>()
                        .join(", "),
                },
            ),
            ("server: connections open (end)", opt(self.connections_open)),
        ];
        if let Some(bus) = &self.bus {
            rows.extend([
                (
                    "bus: link batches published / resent",
                    format!(
                        "{} / {}",
                        opt(bus.batches_published),
                        opt(bus.batches_resent)
                    ),
                ),
                (
                    "bus: consumed / duplicates dropped",
                    format!("{} / {}", count(bus.consumed), opt(bus.duplicates)),
                ),
                (
                    "bus: publish failures / call timeouts",
                    format!("{} / {}", opt(bus.publish_failures), opt(bus.call_timeouts)),
                ),
                ("bus: publish→confirm p50/p99/mean", latency(&bus.confirm)),
                ("bus: outbox entries (end)", opt(bus.outbox_entries)),
            ]);
        }
        rows
    }

    /// Adds the rows to a `label  value` table.
    pub fn add_rows(&self, table: &mut crate::report::Table) {
        for (label, value) in self.rows() {
            table.row(label, value);
        }
    }
}

/// Seconds as a latency cell, to the microsecond.
fn secs(s: f64) -> String {
    fmt_us((s * 1e6).round().max(0.0) as u64)
}

/// Scrapes `http://addr/metrics`; `None` (with a note on stderr) when it
/// cannot, so the scenario goes on without server figures.
pub async fn scrape(addr: SocketAddr) -> Option<Snapshot> {
    let got = tokio::time::timeout(SCRAPE_TIMEOUT, async {
        Snapshot::parse(&get(addr, "/metrics").await?)
    })
    .await;
    match got {
        Ok(Ok(snap)) => Some(snap),
        Ok(Err(e)) => {
            eprintln!("ferry-bench: no server metrics from http://{addr}/metrics: {e:#}");
            None
        }
        Err(_) => {
            eprintln!(
                "ferry-bench: no server metrics: http://{addr}/metrics took over {SCRAPE_TIMEOUT:?}"
            );
            None
        }
    }
}

/// `GET path` over one HTTP/1.1 connection; the body of a 200 answer.
async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let (status, body) = get_any(addr, path).await?;
    if status != 200 {
        bail!("answered {status}: {}", body.trim());
    }
    Ok(body)
}

/// `GET path` over one HTTP/1.1 connection: the status code and the body,
/// whatever the status (e.g. `/readyz`'s 503 with its reason).
pub async fn get_any(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    // `Connection: close`: the server ends the response by closing.
    let mut raw = Vec::new();
    (&mut stream)
        .take(MAX_RESPONSE + 1)
        .read_to_end(&mut raw)
        .await?;
    if raw.len() as u64 > MAX_RESPONSE {
        bail!("response over {MAX_RESPONSE} bytes");
    }
    parse_response(&raw)
}

/// The status and body of a complete HTTP/1.1 response, the body
/// de-chunked when sent chunked, cut at `Content-Length` when there is one.
fn parse_response(raw: &[u8]) -> anyhow::Result<(u16, String)> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("incomplete HTTP response")?;
    let head = std::str::from_utf8(&raw[..split]).context("HTTP head is not UTF-8")?;
    let body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    let code = status.split_whitespace().nth(1).unwrap_or_default();
    let code: u16 = match code.parse() {
        Ok(code) if status.starts_with("HTTP/1.") => code,
        _ => bail!("not an HTTP/1.x status line: {status:?}"),
    };
    let header = |name: &str| {
        lines.clone().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    };
    let body = if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        dechunk(body)?
    } else if let Some(len) = header("content-length") {
        let len: usize = len.parse().context("bad Content-Length")?;
        body.get(..len)
            .context("response shorter than its Content-Length")?
            .to_vec()
    } else {
        body.to_vec()
    };
    let body = String::from_utf8(body).context("the body is not UTF-8")?;
    Ok((code, body))
}

/// Decodes a chunked body (`SIZE-IN-HEX\r\nDATA\r\n`…`0\r\n\r\n`).
fn dechunk(mut raw: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("truncated chunk size")?;
        let size_line = std::str::from_utf8(&raw[..eol]).context("bad chunk size")?;
        let size_hex = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16).context("bad chunk size")?;
        raw = &raw[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(raw.get(..size).context("truncated chunk")?);
        raw = raw.get(size + 2..).context("truncated chunk")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As `metrics-exporter-prometheus` renders it, trimmed to a few series.
    const BEFORE: &str = r#"# HELP ferry_connections_open TCP connections held now
# TYPE ferry_connections_open gauge
ferry_connections_open 10

# TYPE ferry_frames_in_total counter
ferry_frames_in_total{kind="send"} 100
ferry_frames_in_total{kind="ping"} 5

# TYPE ferry_frames_out_total counter
ferry_frames_out_total{kind="send_ack"} 100

# TYPE ferry_deliveries_total counter
ferry_deliveries_total 100

# TYPE ferry_connections_closed_total counter
ferry_connections_closed_total{reason="disconnected"} 2
ferry_connections_closed_total{reason="slow_consumer"} 0

# TYPE ferry_commit_batch_ops histogram
ferry_commit_batch_ops_bucket{le="1"} 10
ferry_commit_batch_ops_bucket{le="2"} 15
ferry_commit_batch_ops_bucket{le="4"} 20
ferry_commit_batch_ops_bucket{le="+Inf"} 20
ferry_commit_batch_ops_sum 40
ferry_commit_batch_ops_count 20
"#;

    const AFTER: &str = r#"# TYPE ferry_connections_open gauge
ferry_connections_open 8
# TYPE ferry_frames_in_total counter
ferry_frames_in_total{kind="send"} 400
ferry_frames_in_total{kind="ping"} 5
# TYPE ferry_frames_out_total counter
ferry_frames_out_total{kind="send_ack"} 400
ferry_frames_out_total{kind="deliver"} 300
# TYPE ferry_deliveries_total counter
ferry_deliveries_total 400
# TYPE ferry_connections_closed_total counter
ferry_connections_closed_total{reason="disconnected"} 4
ferry_connections_closed_total{reason="slow_consumer"} 0
# TYPE ferry_commit_batch_ops histogram
ferry_commit_batch_ops_bucket{le="1"} 10
ferry_commit_batch_ops_bucket{le="2"} 15
ferry_commit_batch_ops_bucket{le="4"} 70
ferry_commit_batch_ops_bucket{le="+Inf"} 120
ferry_commit_batch_ops_sum 440
ferry_commit_batch_ops_count 120
# TYPE ferry_send_ack_seconds histogram
ferry_send_ack_seconds_bucket{le="0.001"} 100
ferry_send_ack_seconds_bucket{le="0.0025"} 250
ferry_send_ack_seconds_bucket{le="0.005"} 298
ferry_send_ack_seconds_bucket{le="0.01"} 300
ferry_send_ack_seconds_bucket{le="+Inf"} 300
ferry_send_ack_seconds_sum 0.6
ferry_send_ack_seconds_count 300
"#;

    fn hist(buckets: &[(f64, f64)]) -> Histogram {
        Histogram {
            buckets: buckets.to_vec(),
            sum: 0.0,
            count: buckets.last().map_or(0.0, |b| b.1),
        }
    }

    #[test]
    fn parses_counters_gauges_and_histograms() {
        let s = Snapshot::parse(AFTER).unwrap();
        assert_eq!(s.counter_total("ferry_frames_in_total"), Some(405.0));
        assert_eq!(s.counter_total("ferry_sync_pages_total"), None);
        let closed = s
            .counter_by("ferry_connections_closed_total", "reason")
            .unwrap();
        assert_eq!(closed["disconnected"], 4.0);
        assert_eq!(closed["slow_consumer"], 0.0);
        let h = s.histogram("ferry_send_ack_seconds").unwrap();
        assert_eq!(h.count, 300.0);
        assert_eq!(h.sum, 0.6);
        assert_eq!(
            h.buckets,
            vec![
                (0.001, 100.0),
                (0.0025, 250.0),
                (0.005, 298.0),
                (0.01, 300.0),
                (f64::INFINITY, 300.0)
            ]
        );
        assert!(Snapshot::parse("").unwrap().histograms.is_empty());
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        let h = hist(&[
            (0.001, 100.0),
            (0.0025, 250.0),
            (0.005, 298.0),
            (0.01, 300.0),
            (f64::INFINITY, 300.0),
        ]);
        // Rank 150 is 50 of the 150 in (0.001, 0.0025].
        assert!((h.quantile(0.5).unwrap() - 0.0015).abs() < 1e-12);
        // Rank 297 is 47 of the 48 in (0.0025, 0.005].
        let p99 = 0.0025 + 0.0025 * 47.0 / 48.0;
        assert!((h.quantile(0.99).unwrap() - p99).abs() < 1e-12);
        // The first bucket starts at 0: rank 50 of 100 in (0, 0.001].
        assert!((h.quantile(1.0 / 6.0).unwrap() - 0.0005).abs() < 1e-12);
        // A rank in +Inf gives the highest finite bound.
        let tail = hist(&[(0.5, 1.0), (1.0, 2.0), (f64::INFINITY, 4.0)]);
        assert_eq!(tail.quantile(0.99), Some(1.0));
        assert_eq!(
            hist(&[(1.0, 0.0), (f64::INFINITY, 0.0)]).quantile(0.5),
            None
        );
        assert_eq!(hist(&[]).quantile(0.5), None);
    }

    #[test]
    fn figures_are_deltas_between_scrapes() {
        let before = Snapshot::parse(BEFORE).unwrap();
        let after = Snapshot::parse(AFTER).unwrap();
        let f = ServerFigures::between(Some(&before), Some(&after));
        assert!(f.available);
        // 100 batches holding 400 ops.
        assert_eq!(f.commit_batches, Some(100));
        assert_eq!(f.commit_mean_ops, Some(4.0));
        assert_eq!(f.deliveries, Some(300));
        assert_eq!(f.frames_in, Some(300));
        // A series new since `before` counts from 0.
        assert_eq!(f.frames_out, Some(600));
        assert_eq!(f.sync_pages, None);
        assert_eq!(
            f.connections_closed,
            Some(BTreeMap::from([("disconnected".to_owned(), 2)]))
        );
        assert_eq!(f.connections_open, Some(8));
        // First observed after `before`: all its observations are new.
        let ack = f.send_ack.unwrap();
        assert_eq!(ack.count, 300);
        assert!((ack.mean_s.unwrap() - 0.002).abs() < 1e-12);
        assert!((ack.p50_s.unwrap() - 0.0015).abs() < 1e-12);
        assert_eq!(f.commit_write, None);

        let rows = f.rows();
        assert_eq!(
            rows[0],
            ("server: commit batches / mean ops", "100 / 4.0".into())
        );
        assert_eq!(rows[1].1, "1.5ms / 4.9ms / 2.0ms");
        assert_eq!(rows[2].1, "n/a");
        assert_eq!(rows[5].1, "300 / n/a");
        assert_eq!(rows[7].1, "disconnected 2");
        assert_eq!(rows[8].1, "8");
    }

    #[test]
    fn batch_ops_bucket_delta() {
        let before = Snapshot::parse(BEFORE).unwrap();
        let after = Snapshot::parse(AFTER).unwrap();
        let c = change(Some(&before), Some(&after)).unwrap();
        let h = c.histogram("ferry_commit_batch_ops").unwrap();
        assert_eq!(
            h.buckets,
            vec![(1.0, 0.0), (2.0, 0.0), (4.0, 50.0), (f64::INFINITY, 100.0)]
        );
        // Rank 50 is the last of the 50 in (2, 4].
        assert_eq!(h.quantile(0.5), Some(4.0));
    }

    #[test]
    fn restarts_and_missing_scrapes() {
        let (low, high) = (
            Snapshot::parse(BEFORE).unwrap(),
            Snapshot::parse(AFTER).unwrap(),
        );
        // The counters went down: the server restarted and counts from 0.
        let f = ServerFigures::between(Some(&high), Some(&low));
        assert_eq!(f.commit_batches, Some(20));
        assert_eq!(f.deliveries, Some(100));
        // 100 batches up to a kill, then 20 by the restarted server, which
        // starts from nothing.
        let first = change(Some(&low), Some(&high));
        let second = change(Some(&Snapshot::default()), Some(&low));
        let f = ServerFigures::from_change(then(first, second).as_ref());
        assert_eq!(f.commit_batches, Some(120));
        assert_eq!(f.commit_mean_ops, Some(440.0 / 120.0));
        assert_eq!(f.deliveries, Some(400));
        assert_eq!(f.connections_open, Some(10));
        assert_eq!(f.send_ack.unwrap().count, 300);
        // A failed scrape makes everything n/a.
        let none = ServerFigures::between(None, Some(&low));
        assert_eq!(none, ServerFigures::default());
        assert!(
            none.rows()
                .iter()
                .all(|(_, v)| v == "n/a" || v == "n/a / n/a")
        );
        assert_eq!(then(None, Some(low)), None);
    }

    #[test]
    fn http_responses() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
        assert_eq!(parse_response(plain).unwrap(), (200, "hello".into()));
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2;x=y\r\nlo\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (200, "hello".into()));
        let unready = parse_response(b"HTTP/1.1 503 Service Unavailable\r\n\r\nno").unwrap();
        assert_eq!(unready, (503, "no".into()));
        assert!(parse_response(b"SSH-2.0 x\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nshort").is_err());
    }

    #[tokio::test]
    async fn scrapes_over_tcp() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            drop(listener);
            let mut buf = vec![0; 4096];
            let n = s.read(&mut buf).await.unwrap();
            assert!(buf[..n].starts_with(b"GET /metrics HTTP/1.1\r\n"));
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{AFTER}",
                AFTER.len()
            );
            s.write_all(reply.as_bytes()).await.unwrap();
        });
        let snap = scrape(addr).await.unwrap();
        assert_eq!(snap, Snapshot::parse(AFTER).unwrap());
        // Nothing listens there any more.
        assert_eq!(scrape(addr).await, None);
    }
}
