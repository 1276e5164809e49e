//! `suite`: a short run of every scenario (under five minutes), each on its
//! own server, at sizes that fit a laptop. `make bench` runs it with
//! `--spawn`. Writes `bench-results.json` unless `--json` says otherwise.

use crate::report::Outcome;
use crate::scenarios::{churn, conns, direct, floor, group};
use crate::target::CommonArgs;

/// Options of `suite`.
#[derive(Debug, Clone, clap::Args)]
pub struct SuiteArgs {
    /// Users of the load scenarios (connections of `conns` and `floor` too).
    #[arg(long, default_value_t = 2000)]
    pub users: u32,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// Where the suite writes its JSON when `--json` is not given.
pub const DEFAULT_JSON: &str = "bench-results.json";

/// Runs every scenario in turn. A scenario that cannot run is reported as a
/// failure and the suite goes on with the next.
pub async fn run(args: &SuiteArgs) -> Vec<Outcome> {
    let users = args.users;
    let common = args.common.clone();
    let mut outcomes = Vec::new();
    let conns_common = {
        // Hold is short: ping often enough for heartbeats to be exercised.
        let mut c = common.clone();
        c.harness.ping_secs = c.harness.ping_secs.min(4);
        c
    };
    let runs: Vec<(&'static str, ScenarioRun)> = vec![
        (
            "conns",
            ScenarioRun::Conns(conns::ConnsArgs {
                n: users,
                hold: 10,
                login_sync: false,
                in_flight: 512,
                common: conns_common,
            }),
        ),
        (
            "direct",
            ScenarioRun::Direct(direct::DirectArgs {
                users,
                rate: vec![5000, 10_000],
                duration: 10,
                cross_node: false,
                common: common.clone(),
            }),
        ),
        (
            "group",
            ScenarioRun::Group(group::GroupArgs {
                members: users,
                messages: 5,
                interval_ms: 500,
                common: common.clone(),
            }),
        ),
        (
            "floor",
            ScenarioRun::Floor(floor::FloorArgs {
                n: users,
                users,
                duration: 10,
                members: users,
                messages: 5,
                interval_ms: 500,
                relay_batch: super::floor::WRITE_BATCH_DEFAULT,
                harness: common.harness.clone(),
            }),
        ),
        (
            "churn",
            ScenarioRun::Churn(churn::ChurnArgs {
                users: (users / 4).max(2),
                messages: 10_000,
                disconnect_fraction: 0.1,
                round_secs: 1.0,
                rate: 2000,
                kill_server: false,
                kill_node: None,
                common: common.clone(),
            }),
        ),
    ];
    for (name, run) in runs {
        eprintln!("suite: {name}");
        let result = match &run {
            ScenarioRun::Conns(a) => conns::run(a).await,
            ScenarioRun::Direct(a) => direct::run(a).await,
            ScenarioRun::Group(a) => group::run(a).await,
            ScenarioRun::Floor(a) => floor::run(a).await,
            ScenarioRun::Churn(a) => churn::run(a).await,
        };
        outcomes.push(result.unwrap_or_else(|e| {
            eprintln!("suite: {name} failed: {e:#}");
            Outcome {
                name,
                json: serde_json::json!({ "error": format!("{e:#}") }),
                failures: vec![format!("{name}: {e:#}")],
            }
        }));
    }
    outcomes
}

enum ScenarioRun {
    Conns(conns::ConnsArgs),
    Direct(direct::DirectArgs),
    Group(group::GroupArgs),
    Floor(floor::FloorArgs),
    Churn(churn::ChurnArgs),
}
