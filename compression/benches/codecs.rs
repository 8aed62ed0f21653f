//! Encode and decode throughput, in bytes of f32 input per second.

use std::hint::black_box;
use std::time::Duration;

use compression::{decode, encode, CodecConfig, CodecKind, DecodeLimits};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn gradient_like(n: usize) -> Vec<f32> {
    let mut s = 0x2545_f491_4f6c_dd1du64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 1e-2
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let sizes: Vec<usize> = std::env::var("CODEC_BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![1 << 20, 25 << 20]);
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

criterion_group!(benches, bench);
criterion_main!(benches);
