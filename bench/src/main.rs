//! `ferry-bench`: the load harness of ferry.
//!
//! Thousands of real TCP clients against a ferry server (spawned for the run
//! with `--spawn`, a local cluster of N nodes and an nsqd with
//! `--spawn-cluster N`, or running at `--server`), with HDR latency histograms,
//! the server's CPU and memory from `/proc`, its own figures from its
//! `/metrics`, and every figure as JSON.
//! Scenarios: `conns`, `direct`, `group`, `floor` (bare-socket baseline),
//! `churn` (exactly-once under reconnects and a server kill), `soak` (an
//! hour of mixed load, watching for leaks) and `suite`.
//! Run `ferry-bench <scenario> --help` for the options.

mod clients;
mod cluster;
mod hist;
mod payload;
mod procfs;
mod report;
mod scenarios;
mod server_metrics;
mod spawn;
mod target;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::report::Outcome;
use crate::scenarios::{churn, conns, direct, floor, group, soak, suite};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "ferry-bench",
    version,
    about = "ferry load harness: real TCP clients, HDR histograms, server CPU and memory, JSON results"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// N authenticated idle connections held with heartbeats: connect rate, memory per connection.
    Conns(conns::ConnsArgs),
    /// One-to-one messages at offered rates: throughput, ack and delivery latency, loss.
    Direct(direct::DirectArgs),
    /// One big group: time until the last member has each message.
    Group(group::GroupArgs),
    /// The same shapes over bare sockets, without ferry: the baseline.
    Floor(floor::FloorArgs),
    /// Exactly-once delivery while users reconnect (and the server is killed).
    Churn(churn::ChurnArgs),
    /// An hour (--minutes) of mixed load with churn: fails on RSS growth, lost messages, fd leaks.
    Soak(soak::SoakArgs),
    /// Every scenario, small, under five minutes (`make bench`).
    Suite(suite::SuiteArgs),
    /// A worker process of a scenario (internal).
    #[command(hide = true)]
    Worker,
    /// The bare servers of `floor` (internal).
    #[command(hide = true)]
    FloorServer,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Every connection is a file descriptor.
    if let Err(e) = ferry_gateway::rlimit::raise_nofile_to_hard() {
        eprintln!("ferry-bench: cannot raise the open-file limit: {e}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry-bench: starting the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let worker = matches!(cli.command, Command::Worker | Command::FloorServer);
    let result = runtime.block_on(async {
        if worker {
            return run(cli.command).await;
        }
        // On Ctrl-C, drop the run: that kills the spawned server and the
        // worker processes and removes the temporary data dir.
        tokio::select! {
            result = run(cli.command) => result,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    let machine = report::machine();
    let (outcomes, json) = match command {
        Command::Worker => {
            worker::run_stdio().await?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::FloorServer => {
            floor::serve().await?;
            return Ok(ExitCode::SUCCESS);
        }
        command => {
            report::print_machine(&machine);
            match command {
                Command::Conns(a) => (vec![conns::run(&a).await?], a.common.harness.json),
                Command::Direct(a) => (vec![direct::run(&a).await?], a.common.harness.json),
                Command::Group(a) => (vec![group::run(&a).await?], a.common.harness.json),
                Command::Floor(a) => (vec![floor::run(&a).await?], a.harness.json),
                Command::Churn(a) => (vec![churn::run(&a).await?], a.common.harness.json),
                Command::Soak(a) => (vec![soak::run(&a).await?], a.common.harness.json),
                Command::Suite(a) => {
                    let path = a
                        .common
                        .harness
                        .json
                        .clone()
                        .unwrap_or_else(|| PathBuf::from(suite::DEFAULT_JSON));
                    (suite::run(&a).await, Some(path))
                }
                Command::Worker | Command::FloorServer => unreachable!("handled above"),
            }
        }
    };
    finish(&machine, &outcomes, json)
}

/// Writes the JSON, lists failed checks, and picks the exit code.
fn finish(
    machine: &serde_json::Value,
    outcomes: &[Outcome],
    json: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    if let Some(path) = json {
        report::write_json(&path, machine, outcomes)?;
        eprintln!("ferry-bench: figures written to {}", path.display());
    }
    let failures: Vec<&String> = outcomes.iter().flat_map(|o| &o.failures).collect();
    if failures.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    println!("\nFAILED checks:");
    for f in failures {
        println!("  - {f}");
    }
    Ok(ExitCode::FAILURE)
}
