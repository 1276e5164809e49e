//! Latency histograms: HDR histograms of microseconds with 3 significant
//! digits, a shareable recorder, and a compact text form (V2 serialization
//! in hex) so worker processes can ship them to the coordinator for merging.

use std::sync::Mutex;

use anyhow::Context;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use serde::Serialize;

/// Highest recordable value: one hour in microseconds (larger ones saturate).
const MAX_MICROS: u64 = 3_600_000_000;

/// A histogram of microsecond latencies.
#[derive(Clone)]
pub struct Hist(Histogram<u64>);

impl Default for Hist {
    fn default() -> Self {
        Hist::new()
    }
}

impl std::fmt::Debug for Hist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hist({:?})", self.summary())
    }
}

impl Hist {
    /// An empty histogram.
    pub fn new() -> Hist {
        Hist(Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("valid histogram bounds"))
    }

    /// Records one value in microseconds.
    pub fn record(&mut self, micros: u64) {
        self.0.saturating_record(micros.max(1));
    }

    /// Number of recorded values.
    #[cfg(test)]
    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// Adds every value of `other`.
    pub fn merge(&mut self, other: &Hist) {
        self.0
            .add(&other.0)
            .expect("histograms with the same bounds always add");
    }

    /// Forgets every value.
    pub fn reset(&mut self) {
        self.0.reset();
    }

    /// The value at quantile `q` (0..=1), in microseconds.
    #[cfg(test)]
    pub fn quantile(&self, q: f64) -> u64 {
        self.0.value_at_quantile(q)
    }

    /// The usual percentiles.
    pub fn summary(&self) -> Summary {
        let h = &self.0;
        if h.is_empty() {
            return Summary::default();
        }
        Summary {
            count: h.len(),
            mean_us: h.mean().round() as u64,
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }

    /// V2 serialization, hex-encoded.
    pub fn to_hex(&self) -> String {
        let mut bytes = Vec::new();
        V2Serializer::new()
            .serialize(&self.0, &mut bytes)
            .expect("serializing into a Vec cannot fail");
        let mut out = String::with_capacity(bytes.len() * 2);
        for b in bytes {
            out.push_str(&format!("{b:02x}"));
        }
        out
    }

    /// The inverse of [`Hist::to_hex`].
    pub fn from_hex(text: &str) -> anyhow::Result<Hist> {
        anyhow::ensure!(text.len().is_multiple_of(2), "odd-length histogram hex");
        let bytes = (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .context("histogram hex")?;
        let decoded: Histogram<u64> = Deserializer::new()
            .deserialize(&mut bytes.as_slice())
            .map_err(|e| anyhow::anyhow!("decoding a histogram: {e:?}"))?;
        let mut hist = Hist::new();
        hist.0
            .add(&decoded)
            .map_err(|e| anyhow::anyhow!("merging a histogram: {e:?}"))?;
        Ok(hist)
    }
}

/// Percentiles of a [`Hist`], in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Summary {
    /// Number of values.
    pub count: u64,
    /// Mean.
    pub mean_us: u64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest value.
    pub max_us: u64,
}

/// A [`Hist`] shared by many tasks. Recording takes a short uncontended
/// lock; one histogram per connection would cost ~200 KB each.
#[derive(Debug, Default)]
pub struct SharedHist(Mutex<Hist>);

impl SharedHist {
    /// Records one value in microseconds.
    pub fn record(&self, micros: u64) {
        self.0.lock().expect("hist lock").record(micros);
    }

    /// Returns the values recorded so far and starts afresh.
    pub fn take(&self) -> Hist {
        let mut guard = self.0.lock().expect("hist lock");
        let out = guard.clone();
        guard.reset();
        out
    }
}

/// Formats microseconds for tables: `850µs`, `12.3ms`, `1.25s`.
pub fn fmt_us(us: u64) -> String {
    if us < 1_000 {
        format!("{us}µs")
    } else if us < 1_000_000 {
        format!("{:.1}ms", us as f64 / 1e3)
    } else {
        format!("{:.2}s", us as f64 / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_merge() {
        let mut a = Hist::new();
        for v in 1..=1000 {
            a.record(v);
        }
        let b = Hist::from_hex(&a.to_hex()).unwrap();
        assert_eq!(b.count(), 1000);
        assert_eq!(b.summary().max_us, a.summary().max_us);
        let mut c = a.clone();
        c.merge(&b);
        assert_eq!(c.count(), 2000);
        assert!((495..=505).contains(&c.quantile(0.5)));
    }

    #[test]
    fn formats() {
        assert_eq!(fmt_us(850), "850µs");
        assert_eq!(fmt_us(12_345), "12.3ms");
        assert_eq!(fmt_us(1_250_000), "1.25s");
    }
}
