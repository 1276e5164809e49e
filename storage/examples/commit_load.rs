//! Drives the group committer with 1:1 messages among many users and prints
//! its throughput and the committer thread's own CPU time per message.
//!
//! CPU time per message is the figure to compare between changes on a noisy
//! machine: wall-clock throughput depends on what else runs, the committer
//! thread's CPU time much less.
//!
//! `cargo run --release --workspace --example commit_load -- [users] [messages] [fsync|wal]`
//! (keep `--workspace`: see the Makefile on why).

use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use ferry_storage::{CommitOptions, Committer, Durability, Op, Storage, StorageOptions, Target};

/// CPU seconds used so far by this process's thread named `name`.
fn thread_cpu_seconds(name: &str) -> f64 {
    let ticks = 100.0; // USER_HZ on Linux
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the ")" that ends the command name: utime is the 12th, stime the 13th.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
        let stime: f64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
        return (utime + stime) / ticks;
    }
    0.0
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let users: u64 = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let messages: u64 = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(400_000);
    let durability = match args.get(3).map(String::as_str) {
        Some("wal") => Durability::Wal,
        _ => Durability::Fsync,
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let storage = Storage::open(dir.path(), StorageOptions::default()).expect("open");
    let (tx, rx) = mpsc::sync_channel::<usize>(4096);
    let options = CommitOptions {
        durability,
        ..Default::default()
    };
    let committer = Committer::start(storage, options, move |batch: Vec<(u64, _)>, _links| {
        let _ = tx.send(batch.len());
    })
    .expect("committer");
    let names: Vec<std::sync::Arc<str>> = (0..users).map(|u| format!("user-{u}").into()).collect();
    let body = Bytes::from(vec![b'x'; 100]);
    let ops: Vec<Op> = (0..messages)
        .map(|i| {
            let from = (i * 7919) % users;
            let to = (from + 1 + (i * 104_729) % (users - 1)) % users;
            Op::Send {
                from: names[from as usize].clone(),
                client_msg_id: i + 1,
                to: Target::Direct(names[to as usize].clone()),
                content_type: "text/plain".into(),
                body: body.clone(),
                system: false,
            }
        })
        .collect();
    let cpu_before = thread_cpu_seconds("ferry-commit");
    let started = Instant::now();
    let feeding = committer.clone();
    let feeder = std::thread::spawn(move || {
        for (i, op) in ops.into_iter().enumerate() {
            feeding.blocking_submit(op, i as u64).expect("submit");
        }
    });
    let mut done = 0usize;
    let mut batches = 0usize;
    while done < messages as usize {
        done += rx
            .recv_timeout(Duration::from_secs(60))
            .expect("outcomes stopped");
        batches += 1;
    }
    let wall = started.elapsed().as_secs_f64();
    feeder.join().expect("feeder");
    let cpu = thread_cpu_seconds("ferry-commit") - cpu_before;
    // The committer's threads must be done with RocksDB before main returns.
    committer.blocking_stop().expect("stop");
    println!(
        "{messages} messages, {users} users, {durability:?}: {:.0} msgs/s wall, \
         committer CPU {:.2} s = {:.2} us/msg, {batches} batches (avg {:.0} msgs)",
        messages as f64 / wall,
        cpu,
        cpu * 1e6 / messages as f64,
        messages as f64 / batches as f64
    );
}
