//! Output: aligned tables on stdout, and one JSON document with every figure.

use std::path::Path;

use anyhow::Context;
use serde_json::{Value, json};

use crate::hist::{Summary, fmt_us};
use crate::procfs::{ProcessFigures, Usage};

/// What a scenario produced.
pub struct Outcome {
    /// Scenario name.
    pub name: &'static str,
    /// Every figure.
    pub json: Value,
    /// Checks that failed (the run exits non-zero when any did).
    pub failures: Vec<String>,
}

/// An aligned text table.
pub struct Table {
    title: String,
    header: Option<Vec<String>>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table of `label  value` rows.
    pub fn new(title: impl Into<String>) -> Table {
        Table {
            title: title.into(),
            header: None,
            rows: Vec::new(),
        }
    }

    /// A table with column headers.
    pub fn with_header(title: impl Into<String>, header: &[&str]) -> Table {
        Table {
            title: title.into(),
            header: Some(header.iter().map(|s| s.to_string()).collect()),
            rows: Vec::new(),
        }
    }

    /// Adds a `label  value` row.
    pub fn row(&mut self, label: &str, value: impl std::fmt::Display) -> &mut Table {
        self.rows.push(vec![label.to_owned(), value.to_string()]);
        self
    }

    /// Adds a row of cells.
    pub fn cells(&mut self, cells: Vec<String>) -> &mut Table {
        self.rows.push(cells);
        self
    }

    /// Prints the table to stdout.
    pub fn print(&self) {
        print!("{self}");
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let all: Vec<&Vec<String>> = self.header.iter().chain(self.rows.iter()).collect();
        let columns = all.iter().map(|r| r.len()).max().unwrap_or(0);
        let width = |c: usize| {
            all.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..columns).map(width).collect();
        let total: usize = widths.iter().sum::<usize>() + 2 * columns.saturating_sub(1);
        writeln!(f, "\n== {}", self.title)?;
        let line = |f: &mut std::fmt::Formatter<'_>, row: &[String]| -> std::fmt::Result {
            let mut out = String::new();
            for (c, cell) in row.iter().enumerate() {
                let pad = widths[c].saturating_sub(cell.chars().count());
                if c == 0 {
                    out.push_str(cell);
                    out.push_str(&" ".repeat(pad));
                } else {
                    out.push_str("  ");
                    out.push_str(&" ".repeat(pad));
                    out.push_str(cell);
                }
            }
            writeln!(f, "{}", out.trim_end())
        };
        if let Some(h) = &self.header {
            line(f, h)?;
            writeln!(f, "{}", "-".repeat(total))?;
        }
        for r in &self.rows {
            line(f, r)?;
        }
        Ok(())
    }
}

/// `p50 / p99 / p99.9 / max` of a latency summary, for one table cell.
pub fn latency_cell(s: &Summary) -> String {
    if s.count == 0 {
        return "-".into();
    }
    format!(
        "{} / {} / {} / {}",
        fmt_us(s.p50_us),
        fmt_us(s.p99_us),
        fmt_us(s.p999_us),
        fmt_us(s.max_us)
    )
}

/// Adds the rows of a CPU and memory window to a table.
pub fn usage_rows(table: &mut Table, label: &str, u: &Usage) {
    table.row(
        &format!("server CPU, {label}"),
        u.server_cpu_pct
            .map(|p| format!("{p:.0}% of one core"))
            .unwrap_or_else(|| "n/a (give --server-pid)".into()),
    );
    if let Some(nodes) = u.per_server() {
        table.row(&format!("node CPU, {label}"), nodes);
    }
    if let Some(p) = u.nsqd_cpu_pct {
        table.row(
            &format!("nsqd CPU, {label}"),
            format!("{p:.0}% of one core"),
        );
    }
    table.row(
        &format!("harness CPU, {label}"),
        format!("{:.0}% of one core", u.harness_cpu_pct),
    );
}

/// The table of every process's CPU time and memory over the run.
pub fn process_table(processes: &[ProcessFigures]) -> Table {
    let mut t = Table::with_header(
        "processes: CPU time (utime + stime) and memory over the run",
        &[
            "process",
            "pid",
            "starts",
            "CPU s",
            "RSS at end",
            "peak RSS",
        ],
    );
    for p in processes {
        t.cells(vec![
            p.name.clone(),
            p.pid.to_string(),
            p.starts.to_string(),
            format!("{:.2}", p.cpu_secs),
            p.rss_mib
                .map_or_else(|| "exited".into(), |m| format!("{m:.1} MiB")),
            mib(p.peak_rss_mib),
        ]);
    }
    t
}

/// Formats a MiB figure.
pub fn mib(v: Option<f64>) -> String {
    v.map(|m| format!("{m:.1} MiB"))
        .unwrap_or_else(|| "n/a".into())
}

/// Formats a count with thousands separators.
pub fn count(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// Facts about this machine, printed once and stored in the JSON.
pub fn machine() -> Value {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|t| {
        t.lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
    });
    let mem_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| {
        t.lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|s| s.trim().to_owned());
    json!({
        "cores": cores,
        "cpu": cpu,
        "memory_mib": mem_kib.map(|k| k / 1024),
        "kernel": kernel,
    })
}

/// Prints the machine line.
pub fn print_machine(m: &Value) {
    println!(
        "machine: {} cores ({}), {} MiB RAM, Linux {}; CPU figures are % of one core",
        m["cores"],
        m["cpu"].as_str().unwrap_or("unknown CPU"),
        m["memory_mib"],
        m["kernel"].as_str().unwrap_or("?"),
    );
}

/// Writes the JSON document.
pub fn write_json(path: &Path, machine: &Value, outcomes: &[Outcome]) -> anyhow::Result<()> {
    let results: Vec<Value> = outcomes
        .iter()
        .map(|o| {
            let mut v = o.json.clone();
            if let Value::Object(map) = &mut v {
                map.insert("scenario".into(), json!(o.name));
                map.insert("failures".into(), json!(o.failures));
            }
            v
        })
        .collect();
    let doc = json!({
        "tool": format!("ferry-bench {}", env!("CARGO_PKG_VERSION")),
        "machine": machine,
        "unix_time": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        "results": results,
    });
    let text = serde_json::to_string_pretty(&doc)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_tables() {
        assert_eq!(count(0), "0");
        assert_eq!(count(1234567), "1,234,567");
        let mut t = Table::with_header("x", &["a", "bb"]);
        t.cells(vec!["long".into(), "1".into()]);
        assert_eq!(t.to_string(), "\n== x\na     bb\n--------\nlong   1\n");
    }
}
