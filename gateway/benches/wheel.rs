//! The heartbeat timing wheel: cost of insert + remove, reschedule, and of
//! one tick over a slot with many entries.

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use ferry_gateway::wheel::TimerWheel;
use std::hint::black_box;

fn wheel(c: &mut Criterion) {
    c.bench_function("wheel_insert_remove", |b| {
        let mut w = TimerWheel::new(128, 0);
        let mut t = 0u64;
        b.iter(|| {
            t += 1;
            let k = w.insert(t, t % 100 + 1);
            black_box(w.remove(k));
        })
    });
    c.bench_function("wheel_reschedule_in_100k", |b| {
        let mut w = TimerWheel::new(128, 0);
        let keys: Vec<_> = (0..100_000u64).map(|i| w.insert(i, i % 90 + 1)).collect();
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 7919) % keys.len();
            black_box(w.reschedule(keys[i], (i as u64 % 90) + 1));
        })
    });
    c.bench_function("wheel_tick_10k_due", |b| {
        b.iter_batched(
            || {
                let mut w = TimerWheel::new(128, 0);
                for i in 0..10_000u64 {
                    w.insert(i, 1);
                }
                w
            },
            |mut w| black_box(w.tick().len()),
            BatchSize::LargeInput,
        )
    });
}

criterion_group!(benches, wheel);
criterion_main!(benches);
