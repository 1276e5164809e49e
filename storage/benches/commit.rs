//! The storage commit path: 1:1 messages through the group committer into
//! a real RocksDB on disk, fsync and wal durability. Each iteration submits
//! a burst from 8 threads and waits until every outcome is reported.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ferry_storage::{CommitOptions, Committer, Durability, Op, Storage, StorageOptions, Target};

const BURST: u64 = 4000;
const WRITERS: u64 = 8;

fn commit_path(c: &mut Criterion) {
    let mut group = c.benchmark_group("commit");
    group.throughput(Throughput::Elements(BURST));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    for durability in [Durability::Fsync, Durability::Wal] {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), StorageOptions::default()).unwrap();
        let (tx, rx) = mpsc::sync_channel::<usize>(1024);
        let options = CommitOptions {
            durability,
            ..Default::default()
        };
        let committer = Committer::start(storage, options, move |batch: Vec<(u64, _)>, _links| {
            let _ = tx.send(batch.len());
        })
        .unwrap();
        let body = Bytes::from(vec![b'x'; 100]);
        let mut next_id = 1u64;
        group.bench_function(format!("direct_100B_{durability:?}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    let base = next_id;
                    next_id += BURST;
                    std::thread::scope(|s| {
                        for w in 0..WRITERS {
                            let committer = committer.clone();
                            let body = body.clone();
                            s.spawn(move || {
                                for i in (w..BURST).step_by(WRITERS as usize) {
                                    let op = Op::Send {
                                        from: format!("u{}", i % 1000).into(),
                                        client_msg_id: base + i,
                                        to: Target::Direct(
                                            format!("u{}", (i * 7 + 3) % 1000).into(),
                                        ),
                                        content_type: "text/plain".into(),
                                        body: body.clone(),
                                        system: false,
                                    };
                                    committer.blocking_submit(op, i).unwrap();
                                }
                            });
                        }
                    });
                    let mut done = 0;
                    while done < BURST as usize {
                        done += rx.recv().unwrap();
                    }
                    total += start.elapsed();
                }
                total
            })
        });
        // Close the database before its temp dir goes, and before exit.
        committer.blocking_stop().unwrap();
    }
    group.finish();
}

criterion_group!(benches, commit_path);
criterion_main!(benches);
