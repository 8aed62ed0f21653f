//! Round trips of every codec, with and without zstd, and their error bounds.

use super::*;

const BLOCKS: [u32; 4] = [8, 13, 64, 256];

#[test]
fn every_codec_round_trips_within_its_bound() {
    for codec in CodecKind::ALL {
        for zstd in [0, 1, 3] {
            for block in BLOCKS {
                for n in [0, 1, 7, 8, 9, 100, 1000, 4099] {
                    let v = data(n, n as u32 + block);
                    let c = cfg(codec, zstd, block);
                    check_decoded(&v, &rt(&v, &c, 5), &c);
                }
            }
        }
    }
}

#[test]
fn fp32_is_bit_exact_including_edge_values() {
    let v = vec![
        0.0,
        -0.0,
        f32::MAX,
        f32::MIN,
        f32::MIN_POSITIVE,
        1e-45,
        -3.5,
        1.0 / 3.0,
    ];
    for zstd in [0, 1] {
        let out = rt(&v, &cfg(CodecKind::Fp32, zstd, 8), 0);
        let bits = |s: &[f32]| s.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&out), bits(&v));
    }
}

#[test]
fn fp16_clamps_out_of_range_values_and_bf16_stays_finite() {
    let v = vec![1e6, -1e9, 65_504.0, 70_000.0, 1.5, f32::MAX];
    let out = rt(&v, &cfg(CodecKind::Fp16, 0, 8), 0);
    assert_eq!(
        out,
        vec![65_504.0, -65_504.0, 65_504.0, 65_504.0, 1.5, 65_504.0]
    );
    let out = rt(&[f32::MAX, f32::MIN, 1.0], &cfg(CodecKind::Bf16, 0, 8), 0);
    let bf_max = half::bf16::MAX.to_f32();
    assert_eq!(out, vec![bf_max, -bf_max, 1.0]);
}

#[test]
fn int8_error_is_at_most_half_the_stored_scale() {
    // Read the scales from the body itself and check |decoded - x| <= scale / 2 exactly.
    let v = data(1000, 17);
    for (codec, levels) in [(CodecKind::Int8, 127.0f32), (CodecKind::Int4, 7.0)] {
        let c = cfg(codec, 0, 64);
        let bytes = encode(&v, &c, 0).unwrap();
        let out = decode(&bytes, &DecodeLimits::default()).unwrap();
        let body = &bytes[HEADER_LEN..];
        for (bi, (bv, bo)) in v.chunks(64).zip(out.chunks(64)).enumerate() {
            let s = f32::from_le_bytes(body[bi * 4..bi * 4 + 4].try_into().unwrap());
            let absmax = bv.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!((s - absmax / levels).abs() <= s * 1e-6);
            for (x, y) in bv.iter().zip(bo) {
                assert!(
                    (x - y).abs() <= s * 0.500_01,
                    "{codec:?}: {x} -> {y}, scale {s}"
                );
                let q = y / s;
                assert!((q - q.round()).abs() < 1e-3 && q.abs() <= levels + 1e-3);
            }
        }
    }
}

#[test]
fn all_zero_blocks_have_zero_scale() {
    let mut v = vec![0f32; 64];
    v.extend(data(64, 1));
    for codec in [CodecKind::Int8, CodecKind::Int4, CodecKind::Sign1] {
        let bytes = encode(&v, &cfg(codec, 0, 64), 0).unwrap();
        assert_eq!(&bytes[HEADER_LEN..HEADER_LEN + 4], &[0, 0, 0, 0]);
        let out = decode(&bytes, &DecodeLimits::default()).unwrap();
        assert!(out[..64].iter().all(|&x| x == 0.0));
    }
}

#[test]
fn extreme_magnitudes_stay_finite_and_close() {
    let huge = vec![f32::MAX, -f32::MAX, 1e38, 0.0, 3e38, -2e38, 1.0, f32::MAX];
    let tiny = vec![1e-40, -3e-39, 1e-45, 0.0, 2e-38, 5e-41, -1e-44, 1e-39];
    for v in [&huge, &tiny] {
        for codec in CodecKind::ALL {
            let c = cfg(codec, 1, 8);
            let out = rt(v, &c, 0);
            assert!(out.iter().all(|x| x.is_finite()), "{codec:?}: {out:?}");
            if matches!(codec, CodecKind::Int8 | CodecKind::Int4) {
                let absmax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
                let levels = if codec == CodecKind::Int8 { 127.0 } else { 7.0 };
                for (x, y) in v.iter().zip(&out) {
                    // Half a step, plus the coarse scale of subnormal blocks.
                    let err = f64::from(*x) - f64::from(*y);
                    let bound = f64::from(absmax / levels) * 0.5001 + 1e-43;
                    assert!(err.abs() <= bound, "{codec:?}: {x} -> {y}");
                }
            }
        }
    }
}

#[test]
fn sign1_decodes_to_plus_minus_block_mean() {
    let v = vec![1.0, -3.0, 0.5, -0.5, 2.0, 2.0, -1.0, 0.0, 10.0, -10.0];
    let out = rt(&v, &cfg(CodecKind::Sign1, 1, 8), 0);
    let m = 10.0 / 8.0;
    assert_eq!(&out[..8], &[m, -m, m, -m, m, m, -m, m]);
    assert_eq!(&out[8..], &[10.0, -10.0]);
}

#[test]
fn topk_keeps_exactly_the_k_largest() {
    let v = data(1000, 9);
    for kind in [TopKValues::Fp32, TopKValues::Fp16, TopKValues::Int8] {
        for fraction in [0.001, 0.01, 0.05, 0.5, 1.0] {
            for zstd in [0, 1] {
                let c = CodecConfig {
                    topk_fraction: fraction,
                    topk_values: kind,
                    ..cfg(CodecKind::TopK, zstd, 64)
                };
                let out = rt(&v, &c, 0);
                check_decoded(&v, &out, &c);
            }
        }
    }
    let c = CodecConfig {
        topk_fraction: 0.05,
        topk_values: TopKValues::Fp32,
        ..cfg(CodecKind::TopK, 1, 64)
    };
    assert_eq!(c.topk_k(1000), 50);
    let out = rt(&v, &c, 0);
    let kept = reference_topk(&v, 50);
    let nonzero: Vec<usize> = (0..v.len()).filter(|&i| out[i] != 0.0).collect();
    assert_eq!(nonzero, kept);
}

#[test]
fn topk_ties_go_to_the_lower_index() {
    let v = vec![1.0, -2.0, 2.0, 0.5, -2.0, 2.0, 0.0, 1.0];
    let c = CodecConfig {
        topk_fraction: 0.375, // k = 3 of 8
        topk_values: TopKValues::Fp32,
        ..cfg(CodecKind::TopK, 0, 8)
    };
    assert_eq!(c.topk_k(8), 3);
    let out = rt(&v, &c, 0);
    assert_eq!(out, vec![0.0, -2.0, 2.0, 0.0, -2.0, 0.0, 0.0, 0.0]);
}

#[test]
fn topk_k_rule() {
    let c = |f: f32| CodecConfig {
        topk_fraction: f,
        ..Default::default()
    };
    assert_eq!(c(0.01).topk_k(0), 0);
    assert_eq!(c(0.01).topk_k(1), 1);
    assert_eq!(c(0.01).topk_k(99), 1);
    assert_eq!(c(0.01).topk_k(101), 2);
    assert_eq!(c(0.01).topk_k(100_000), 1000);
    assert_eq!(c(0.05).topk_k(1000), 50);
    assert_eq!(c(1e-9).topk_k(1000), 1);
    assert_eq!(c(1.0).topk_k(1000), 1000);
}

#[test]
fn zstd_shrinks_compressible_updates_and_every_level_decodes() {
    let v = vec![0f32; 100_000];
    let raw = encode(&v, &cfg(CodecKind::Int8, 0, 256), 0).unwrap();
    let z = encode(&v, &cfg(CodecKind::Int8, 1, 256), 0).unwrap();
    assert!(z.len() * 50 < raw.len(), "{} vs {}", z.len(), raw.len());
    let v = data(5000, 2);
    for level in [1, 2, 3, 4, 9, 19] {
        let c = cfg(CodecKind::Int8, level, 256);
        check_decoded(&v, &rt(&v, &c, 0), &c);
    }
}

#[test]
fn header_describes_the_payload() {
    let v = data(1234, 3);
    let c = CodecConfig {
        stochastic_rounding: true,
        topk_values: TopKValues::Fp16,
        ..cfg(CodecKind::TopK, 2, 32)
    };
    let bytes = encode(&v, &c, 1).unwrap();
    let h = peek_header(&bytes).unwrap();
    assert_eq!(&bytes[..4], b"DTC1");
    assert_eq!(h.version, 1);
    assert_eq!(h.codec, CodecKind::TopK);
    assert!(h.zstd && h.stochastic_rounding);
    assert_eq!(h.topk_values, TopKValues::Fp16);
    assert_eq!((h.block_size, h.n), (32, 1234));
    assert_eq!(Header::parse(&h.to_bytes()).unwrap(), h);
    // Uncompressed: the body follows the header and has the announced length.
    let bytes = encode(&v, &cfg(CodecKind::Int4, 0, 32), 1).unwrap();
    let h = peek_header(&bytes).unwrap();
    assert_eq!(h.body_len as usize, bytes.len() - HEADER_LEN);
    assert_eq!(h.body_len as usize, 39 * 4 + 617);
}

#[test]
fn encoding_is_deterministic() {
    let v = data(3000, 4);
    for codec in CodecKind::ALL {
        let c = cfg(codec, 1, 64);
        assert_eq!(encode(&v, &c, 9).unwrap(), encode(&v, &c, 9).unwrap());
    }
}

#[test]
fn compressing_a_raw_payload_afterwards_gives_the_bytes_of_encoding_with_zstd() {
    for codec in CodecKind::ALL {
        for n in [0, 1, 100, 4099] {
            let v = data(n, n as u32 + 3);
            let raw = encode(&v, &cfg(codec, 0, 64), 7).unwrap();
            for level in [1, 3] {
                let direct = encode(&v, &cfg(codec, level, 64), 7).unwrap();
                assert_eq!(
                    compress_payload(&raw, level).unwrap(),
                    direct,
                    "{codec:?} {n}"
                );
            }
            let zstd = compress_payload(&raw, 1).unwrap();
            assert!(matches!(
                compress_payload(&zstd, 1),
                Err(CodecError::Config(_))
            ));
            assert!(matches!(
                compress_payload(&raw, 0),
                Err(CodecError::Config(_))
            ));
            assert!(matches!(
                compress_payload(&raw[..raw.len() - 1], 1),
                Err(CodecError::Malformed(_))
            ));
        }
    }
}

#[test]
fn max_raw_len_bounds_every_raw_payload() {
    for codec in CodecKind::ALL {
        for n in [0, 1, 100, 4099] {
            let c = cfg(codec, 0, 64);
            let raw = encode(&data(n, 9), &c, 1).unwrap();
            assert!(raw.len() <= max_raw_len(n, &c).unwrap(), "{codec:?} {n}");
        }
    }
    assert_eq!(max_raw_len(usize::MAX / 2, &CodecConfig::default()), None);
}
