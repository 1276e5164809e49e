//! `ferry-bench --spawn-cluster`: the harness starts an nsqd (a real one
//! from `PATH`, else the in-repo NSQ-protocol test double) and three real
//! `ferry serve` nodes, sends one-to-one messages that all cross nodes, and
//! finds every acknowledged one delivered exactly once. Also: the example
//! configuration of `deploy/cluster/` is a valid cluster.
//!
//! Needs `ferry` and `ferry-nsqd-double` built next to `ferry-bench`
//! (`cargo test --release --workspace` builds them).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// The whole run may take this long (cluster start, 60 logins, a 3 s step,
/// the drain, the stop).
const RUN_BOUND: Duration = Duration::from_secs(60);

fn bench_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferry-bench"))
}

fn sibling(name: &str) -> PathBuf {
    let bin = bench_binary().with_file_name(name);
    assert!(
        bin.exists(),
        "{} is not built: run the tests with `cargo test --release --workspace`",
        bin.display()
    );
    bin
}

/// Runs ferry-bench with `args` within [`RUN_BOUND`]; on time-out it gets
/// SIGINT (it then stops the nodes it started) and the test fails.
async fn run_bench(args: &[String]) -> (std::process::ExitStatus, String, String) {
    sibling("ferry");
    sibling("ferry-nsqd-double");
    let child = tokio::process::Command::new(bench_binary())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start ferry-bench");
    let pid = child.id().expect("pid") as libc::pid_t;
    match tokio::time::timeout(RUN_BOUND, child.wait_with_output()).await {
        Ok(out) => {
            let out = out.expect("ferry-bench output");
            (
                out.status,
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
        Err(_) => {
            // SAFETY: kill(2) on our child's pid; no memory involved.
            unsafe { libc::kill(pid, libc::SIGINT) };
            tokio::time::sleep(Duration::from_secs(5)).await;
            panic!("ferry-bench {args:?} did not finish within {RUN_BOUND:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cross_node_direct_messages_are_all_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("direct.json");
    let args: Vec<String> = [
        "direct",
        "--spawn-cluster=3",
        "--cross-node",
        "--users=60",
        "--rate=300",
        "--duration=3",
        "--ramp=2000",
        "--server-arg=--durability=wal",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        format!("--work-dir={}", dir.path().display()),
        format!("--json={}", json.display()),
    ])
    .collect();
    let (status, stdout, stderr) = run_bench(&args).await;
    assert!(status.success(), "{stderr}\n{stdout}");
    assert!(
        stderr.contains("nsqd"),
        "the harness says which nsqd it uses: {stderr}"
    );

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let direct = &report["results"][0];
    assert_eq!(direct["failures"], serde_json::json!([]), "{direct}");
    let nodes = direct["target"]["cluster"]["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3, "{direct}");
    // Every node has users: the harness saw them spread by the placement.
    let spread = direct["spread_by_node"].as_object().unwrap();
    assert_eq!(spread.len(), 3, "{spread:?}");
    assert!(
        spread.values().all(|n| n.as_u64().unwrap() > 0),
        "{spread:?}"
    );

    let step = &direct["steps"][0];
    let sent = step["sent"].as_u64().unwrap();
    assert!(sent >= 300, "{step}");
    assert_eq!(
        step["cross_node_sent"], sent,
        "every message crosses nodes: {step}"
    );
    assert_eq!(step["acked"], sent, "{step}");
    assert_eq!(step["lost"], 0, "{step}");
    assert_eq!(step["duplicates"], 0, "{step}");
    assert_eq!(step["delivered_total"], sent, "{step}");
    // And the bus carried them: link batches published and consumed.
    let bus = &step["server"]["bus"];
    assert!(bus["batches_published"].as_u64().unwrap() > 0, "{bus}");
    assert!(bus["consumed"].as_u64().unwrap() > 0, "{bus}");

    // CPU time of every process: three nodes, the nsqd, the harness.
    let processes = direct["processes"].as_array().unwrap();
    let names: Vec<&str> = processes
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for name in ["node 1", "node 2", "node 3", "harness"] {
        assert!(names.contains(&name), "{names:?}");
    }
    assert!(
        processes.iter().any(|p| p["role"] == "nsqd"),
        "{processes:?}"
    );
    for p in processes.iter().filter(|p| p["role"] == "server") {
        assert!(p["cpu_secs"].as_f64().unwrap() > 0.0, "{p}");
        assert!(p["rss_mib"].as_f64().unwrap() > 1.0, "{p}");
    }
    // The nodes were stopped and their directory removed.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with("ferry-bench-cluster-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn cross_node_is_refused_without_a_cluster() {
    let out = std::process::Command::new(bench_binary())
        .args(["direct", "--spawn", "--cross-node"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--cross-node needs --spawn-cluster"),
        "{stderr}"
    );
}

/// `deploy/cluster/ferry-{1,2,3}.toml` are valid configurations of one
/// cluster: each is node N, and all three have the same node list.
#[test]
fn deploy_cluster_example_is_one_valid_cluster() {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/cluster");
    let mut digests = Vec::new();
    for id in 1..=3u16 {
        let path = deploy.join(format!("ferry-{id}.toml"));
        let config = ferry_gateway::config::ServeArgs {
            config: Some(path.clone()),
            ..Default::default()
        }
        .resolve()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let cluster = config.cluster.as_ref().expect("a [cluster] section");
        assert_eq!(cluster.node_id, id, "{}", path.display());
        let placement = cluster.placement().unwrap();
        assert_eq!(placement.nodes().len(), 3);
        // The ops port is the one the node list gives the other nodes.
        let me = placement.nodes().iter().find(|n| n.id.get() == id).unwrap();
        assert_eq!(me.ops_address, config.http_listen.to_string());
        digests.push(placement.digest());
    }
    assert!(digests.windows(2).all(|w| w[0] == w[1]), "{digests:?}");
    for unit in ["ferry@.service", "nsqd.service", "nsqlookupd.service"] {
        let text = std::fs::read_to_string(deploy.join(unit)).unwrap();
        assert!(
            text.contains("[Service]") && text.contains("ExecStart="),
            "{unit}"
        );
    }
}
