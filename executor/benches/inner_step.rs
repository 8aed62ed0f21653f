//! The host work of one DiLoCo inner step besides the gradient, for a model of 25M
//! parameters: the AdamW update (`Optimizer::step`, split over libtorch's thread count) and
//! the step's Merkle leaf (blake3 over the parameters and both moments, 300 MB), hashed on
//! one thread as a CPU worker does beside its gradient, or on a pool as a GPU worker does.
//! Each at 1 thread and at every core: `cargo bench -p executor --bench inner_step`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use trainer::{Optimizer, OptimizerConfig, OptimizerKind};

const N: usize = 25_000_000;

fn state() -> (Vec<f32>, Vec<f32>, Optimizer) {
    let p: Vec<f32> = (0..N).map(|i| (i % 977) as f32 * 1e-3).collect();
    let g: Vec<f32> = (0..N)
        .map(|i| ((i * 7) % 1013) as f32 * 1e-4 - 0.05)
        .collect();
    let mut opt = Optimizer::new(OptimizerConfig {
        kind: OptimizerKind::AdamW,
        weight_decay: 0.01,
        ..Default::default()
    });
    let mut q = p.clone();
    opt.step(&mut q, &g).expect("finite");
    (q, g, opt)
}

fn inner_step(c: &mut Criterion) {
    let (mut p, g, mut opt) = state();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut group = c.benchmark_group("inner step, 25M parameters");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    for threads in [1, cores] {
        tch::set_num_threads(threads as i32);
        group.throughput(Throughput::Bytes((N * 4) as u64));
        group.bench_with_input(BenchmarkId::new("adamw step", threads), &threads, |b, _| {
            b.iter(|| opt.step(black_box(&mut p), black_box(&g)).expect("finite"))
        });
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("a pool");
        group.throughput(Throughput::Bytes((3 * N * 4) as u64));
        group.bench_with_input(BenchmarkId::new("leaf", threads), &threads, |b, &t| {
            b.iter(|| {
                if t == 1 {
                    executor::state_leaf(black_box(&p), &opt)
                } else {
                    executor::state_leaf_in(&pool, black_box(&p), &opt)
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, inner_step);
criterion_main!(benches);
