//! Round trips, error bounds and hostile input.

use proptest::prelude::*;

use crate::*;

fn cfg(codec: CodecKind, zstd: i32) -> CodecConfig {
    CodecConfig {
        codec,
        zstd_level: zstd,
        block_size: 64,
        ..Default::default()
    }
}

fn data(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let x =
                (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) as f32 / u32::MAX as f32;
            (x - 0.5) * (1.0 + (i % 7) as f32)
        })
        .collect()
}

const ALL: [CodecKind; 7] = [
    CodecKind::Fp32,
    CodecKind::Fp16,
    CodecKind::Bf16,
    CodecKind::Int8,
    CodecKind::Int4,
    CodecKind::Sign1,
    CodecKind::TopK,
];

fn rt(v: &[f32], c: &CodecConfig) -> Vec<f32> {
    decode_exact(&encode(v, c, 1).unwrap(), v.len(), &DecodeLimits::default()).unwrap()
}

#[test]
fn lossless_and_float_codecs() {
    let v = data(1000, 3);
    for z in [0, 3] {
        assert_eq!(rt(&v, &cfg(CodecKind::Fp32, z)), v);
        for (codec, rel) in [(CodecKind::Fp16, 1e-3), (CodecKind::Bf16, 8e-3)] {
            for (a, b) in rt(&v, &cfg(codec, z)).iter().zip(&v) {
                assert!((a - b).abs() <= rel * b.abs() + 1e-6, "{codec:?} {a} {b}");
            }
        }
    }
}

#[test]
fn blockwise_quantizers_stay_within_half_a_step() {
    let v = data(1000, 5);
    for (codec, levels) in [(CodecKind::Int8, 127.0f32), (CodecKind::Int4, 7.0)] {
        let out = rt(&v, &cfg(codec, 1));
        for (bo, bv) in out.chunks(64).zip(v.chunks(64)) {
            let scale = bv.iter().fold(0f32, |m, x| m.max(x.abs())) / levels;
            for (a, b) in bo.iter().zip(bv) {
                assert!((a - b).abs() <= scale * 0.5 + 1e-6, "{codec:?}");
            }
        }
    }
}

#[test]
fn sign_and_topk() {
    let v = data(1000, 9);
    let s = rt(&v, &cfg(CodecKind::Sign1, 0));
    for (bo, bv) in s.chunks(64).zip(v.chunks(64)) {
        let mean = bv.iter().map(|x| x.abs()).sum::<f32>() / bv.len() as f32;
        for (a, b) in bo.iter().zip(bv) {
            assert!(
                (a.abs() - mean).abs() < 1e-6 && (a.is_sign_negative() == b.is_sign_negative())
            );
        }
    }
    let c = CodecConfig {
        topk_fraction: 0.05,
        topk_values: TopKValues::Fp32,
        ..cfg(CodecKind::TopK, 1)
    };
    let t = rt(&v, &c);
    let kept: Vec<usize> = (0..v.len()).filter(|&i| t[i] != 0.0).collect();
    assert_eq!(kept.len(), 50);
    let threshold = kept.iter().map(|&i| v[i].abs()).fold(f32::MAX, f32::min);
    for i in 0..v.len() {
        if kept.contains(&i) {
            assert_eq!(t[i], v[i]);
        } else {
            assert!(v[i].abs() <= threshold);
        }
    }
}

#[test]
fn stochastic_rounding_is_unbiased_and_seeded() {
    let v = vec![0.3f32, 1.0, -0.77, 0.0];
    let c = CodecConfig {
        stochastic_rounding: true,
        ..cfg(CodecKind::Int4, 0)
    };
    let trials = 4000;
    let mut sum = [0f64; 4];
    for seed in 0..trials {
        let out = decode(&encode(&v, &c, seed).unwrap(), &DecodeLimits::default()).unwrap();
        for (s, o) in sum.iter_mut().zip(out) {
            *s += f64::from(o);
        }
    }
    for (s, x) in sum.iter().zip(&v) {
        assert!((s / trials as f64 - f64::from(*x)).abs() < 0.01, "{s} {x}");
    }
    assert_eq!(encode(&v, &c, 7).unwrap(), encode(&v, &c, 7).unwrap());
}

#[test]
fn error_feedback_carries_what_was_not_sent() {
    let mut ef = ErrorFeedback::new();
    let c = CodecConfig {
        topk_fraction: 0.1,
        ..cfg(CodecKind::TopK, 1)
    };
    let mut sent = vec![0f64; 500];
    let mut total = vec![0f64; 500];
    for step in 0..50 {
        let u = data(500, step);
        let (_, d) = ef.encode(&u, &c, step as u64).unwrap();
        for i in 0..500 {
            sent[i] += f64::from(d[i]);
            total[i] += f64::from(u[i]);
        }
    }
    // Everything not yet sent is exactly the residual, which stays bounded.
    for i in 0..500 {
        assert!((total[i] - sent[i] - f64::from(ef.residual()[i])).abs() < 1e-3);
    }
    let max_res = ef.residual().iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(max_res < 40.0, "residual {max_res}");
    ef.encode(&[1.0; 3], &c, 0).unwrap();
    assert_eq!(ef.residual().len(), 3, "length change resets");
}

#[test]
fn hostile_headers_and_bodies_are_refused() {
    let v = data(300, 1);
    let good = encode(&v, &cfg(CodecKind::Int8, 0), 0).unwrap();
    let lim = DecodeLimits::default();
    // Huge announced n: refused before allocation.
    let mut huge = good.clone();
    huge[12..20].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(matches!(decode(&huge, &lim), Err(CodecError::TooLarge(_))));
    let mut ver = good.clone();
    ver[4] = 9;
    assert_eq!(decode(&ver, &lim), Err(CodecError::UnsupportedVersion(9)));
    assert!(decode(&good[..good.len() - 1], &lim).is_err());
    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x40;
    assert_eq!(decode(&flipped, &lim), Err(CodecError::Checksum));
    assert!(matches!(
        decode_exact(&good, 301, &lim),
        Err(CodecError::Length {
            expected: 301,
            got: 300
        })
    ));
    assert_eq!(
        encode(&[1.0, f32::NAN], &CodecConfig::default(), 0),
        Err(CodecError::NonFiniteInput { index: 1 })
    );
    // A NaN smuggled into an fp32 body with a matching checksum is still refused.
    let mut body = Vec::new();
    for x in [1.0f32, f32::NAN] {
        body.extend_from_slice(&x.to_le_bytes());
    }
    let h = Header {
        codec: CodecKind::Fp32,
        flags: 0,
        block_size: 64,
        n: 2,
        body_len: 8,
        checksum: header::checksum(&body),
    };
    let mut nan = Vec::new();
    h.write(&mut nan);
    nan.extend_from_slice(&body);
    assert_eq!(
        decode(&nan, &lim),
        Err(CodecError::NonFiniteOutput { index: 1 })
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn round_trip_any_length_and_block(n in 0usize..5000, block in 8u32..600, seed in any::<u32>(), which in 0usize..7, z in 0i32..2) {
        let v = data(n, seed);
        let c = CodecConfig { codec: ALL[which], block_size: block, zstd_level: z, ..Default::default() };
        let out = decode_exact(&encode(&v, &c, 3).unwrap(), n, &DecodeLimits::default()).unwrap();
        prop_assert_eq!(out.len(), n);
        prop_assert!(out.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = decode(&bytes, &DecodeLimits::default());
    }

    #[test]
    fn corrupted_payloads_never_panic(which in 0usize..7, pos in any::<usize>(), byte in any::<u8>(), cut in any::<usize>()) {
        let v = data(200, 4);
        let c = CodecConfig { codec: ALL[which], block_size: 32, zstd_level: (which % 2) as i32, ..Default::default() };
        let mut e = encode(&v, &c, 1).unwrap();
        let p = pos % e.len();
        e[p] = byte;
        if let Ok(out) = decode(&e, &DecodeLimits::default()) {
            prop_assert!(out.iter().all(|x| x.is_finite()));
        }
        let short = &e[..cut % e.len()];
        let _ = decode(short, &DecodeLimits::default());
    }
}
