//! Encode and decode throughput, in bytes of f32 input per second; likewise for XOR
//! parameter deltas (encode and apply).

use std::hint::black_box;
use std::time::Duration;

use compression::{
    apply_xor_delta, decode, encode, encode_xor_delta, CodecConfig, CodecKind, DecodeLimits,
};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn gradient_like(n: usize) -> Vec<f32> {
    seeded(n, 0x2545_f491_4f6c_dd1d)
}

/// Uniform in [-5e-3, 5e-3) from a xorshift64 stream started at `s` (nonzero).
fn seeded(n: usize, mut s: u64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 1e-2
        })
        .collect()
}

/// `old` after an Adam-like step: every value moved by a relative 1e-3 at most.
fn stepped(old: &[f32]) -> Vec<f32> {
    let noise = seeded(old.len(), 0x9e37_79b9_7f4a_7c15);
    old.iter()
        .zip(noise)
        .map(|(x, u)| x * (1.0 + 0.2 * u))
        .collect()
}

fn sizes() -> Vec<usize> {
    std::env::var("CODEC_BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![1 << 20, 25 << 20])
}

fn bench(c: &mut Criterion) {
    let sizes = sizes();
    let codecs = [
        CodecKind::Fp32,
        CodecKind::Fp16,
        CodecKind::Bf16,
        CodecKind::Int8,
        CodecKind::Int4,
        CodecKind::Sign1,
        CodecKind::TopK,
    ];
    for &n in &sizes {
        let v = gradient_like(n);
        let mut g = c.benchmark_group(format!("n{n}"));
        g.sample_size(10)
            .measurement_time(Duration::from_secs(2))
            .warm_up_time(Duration::from_millis(300));
        g.throughput(Throughput::Bytes(4 * n as u64));
        for codec in codecs {
            for zstd in [0, 1] {
                let cfg = CodecConfig {
                    codec,
                    zstd_level: zstd,
                    ..Default::default()
                };
                let name = format!("{codec:?}-zstd{zstd}").to_lowercase();
                g.bench_with_input(BenchmarkId::new("encode", &name), &v, |b, v| {
                    b.iter(|| encode(black_box(v), &cfg, 1).expect("encode"))
                });
                let bytes = encode(&v, &cfg, 1).expect("encode");
                g.bench_with_input(BenchmarkId::new("decode", &name), &bytes, |b, bytes| {
                    b.iter(|| decode(black_box(bytes), &DecodeLimits::default()).expect("decode"))
                });
            }
        }
        g.finish();
    }
}

fn bench_xor_delta(c: &mut Criterion) {
    for n in sizes() {
        let old: Vec<f32> = gradient_like(n).iter().map(|x| x * 4.0).collect();
        let new = stepped(&old);
        let mut g = c.benchmark_group(format!("xor-n{n}"));
        g.sample_size(10)
            .measurement_time(Duration::from_secs(2))
            .warm_up_time(Duration::from_millis(300));
        g.throughput(Throughput::Bytes(4 * n as u64));
        for zstd in [0, 1, 3] {
            let name = format!("zstd{zstd}");
            g.bench_with_input(BenchmarkId::new("encode", &name), &new, |b, new| {
                b.iter(|| encode_xor_delta(black_box(&old), black_box(new), zstd).expect("encode"))
            });
            let bytes = encode_xor_delta(&old, &new, zstd).expect("encode");
            g.bench_with_input(BenchmarkId::new("apply", &name), &bytes, |b, bytes| {
                b.iter(|| {
                    apply_xor_delta(black_box(&old), black_box(bytes), &DecodeLimits::default())
                        .expect("apply")
                })
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench, bench_xor_delta);
criterion_main!(benches);
