//! Unit tests: round trips and error bounds, stochastic rounding, error feedback, hostile
//! input, config parsing, property tests, and lossless XOR parameter deltas.

mod config;
mod feedback;
mod hostile;
mod props;
mod roundtrip;
mod stochastic;
mod xor_delta;

use crate::*;

/// A config for `codec` with the given zstd level and block size.
pub(crate) fn cfg(codec: CodecKind, zstd: i32, block: u32) -> CodecConfig {
    CodecConfig {
        codec,
        zstd_level: zstd,
        block_size: block,
        ..Default::default()
    }
}

/// Deterministic gradient-like data with varying magnitudes, some exact zeros and ties.
pub(crate) fn data(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let h = (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(40_503));
            let x = (h >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
            match i % 11 {
                0 => 0.0,
                1 => 0.25,
                _ => x * (1.0 + (i % 7) as f32),
            }
        })
        .collect()
}

/// Encodes then decodes (with the exact-length check).
pub(crate) fn rt(v: &[f32], c: &CodecConfig, seed: u64) -> Vec<f32> {
    let bytes = encode(v, c, seed).expect("encode");
    decode_exact(&bytes, v.len(), &DecodeLimits::default()).expect("decode")
}

/// Indices of the `k` largest |x|, ties to the lower index, ascending (the reference top-k).
pub(crate) fn reference_topk(v: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].abs().total_cmp(&v[a].abs()).then(a.cmp(&b)));
    idx.truncate(k);
    idx.sort_unstable();
    idx
}

/// Asserts that `out` is a valid decoding of `v` under `c`, with each codec's error bound.
pub(crate) fn check_decoded(v: &[f32], out: &[f32], c: &CodecConfig) {
    assert_eq!(out.len(), v.len());
    assert!(out.iter().all(|x| x.is_finite()));
    let block = c.block_size as usize;
    match c.codec {
        CodecKind::Fp32 => assert_eq!(out, v),
        CodecKind::Fp16 => check_float(v, out, 65_504.0, 2f32.powi(-11), 2f32.powi(-25)),
        CodecKind::Bf16 => check_float(v, out, f32::MAX, 2f32.powi(-8), f32::MIN_POSITIVE),
        CodecKind::Int8 => check_blockwise(v, out, block, 127.0, c.stochastic_rounding),
        CodecKind::Int4 => check_blockwise(v, out, block, 7.0, c.stochastic_rounding),
        CodecKind::Sign1 => {
            for (bv, bo) in v.chunks(block).zip(out.chunks(block)) {
                let mean = bv.iter().map(|x| f64::from(x.abs())).sum::<f64>() / bv.len() as f64;
                for (x, y) in bv.iter().zip(bo) {
                    assert!(
                        (f64::from(y.abs()) - mean).abs() <= mean * 1e-6,
                        "{y} vs ±{mean}"
                    );
                    assert_eq!(y.is_sign_negative(), x.is_sign_negative(), "{x} -> {y}");
                }
            }
        }
        CodecKind::TopK => {
            let kept = reference_topk(v, c.topk_k(v.len()));
            let mut is_kept = vec![false; v.len()];
            for &i in &kept {
                is_kept[i] = true;
            }
            let absmax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
            for (i, (&x, &y)) in v.iter().zip(out).enumerate() {
                if !is_kept[i] {
                    assert_eq!(y, 0.0, "index {i} not kept");
                    continue;
                }
                match c.topk_values {
                    TopKValues::Fp32 => assert_eq!(y, x),
                    TopKValues::Fp16 => {
                        let x = x.clamp(-65_504.0, 65_504.0);
                        assert!(
                            (y - x).abs() <= x.abs() * 2f32.powi(-11) + 1e-7,
                            "{x} -> {y}"
                        );
                    }
                    // Blockwise over the kept values: within half a step of the block's
                    // scale, which is at most absmax/127.
                    TopKValues::Int8 => {
                        let step = absmax / 127.0;
                        let half = if c.stochastic_rounding { 1.0 } else { 0.5 };
                        assert!((y - x).abs() <= step * (half + 2e-5), "{x} -> {y}");
                    }
                }
            }
        }
    }
}

fn check_float(v: &[f32], out: &[f32], max: f32, rel: f32, abs: f32) {
    for (&x, &y) in v.iter().zip(out) {
        let x = x.clamp(-max, max);
        assert!((y - x).abs() <= x.abs() * rel + abs, "{x} -> {y}");
    }
}

/// Per block: |decoded - x| <= scale/2 (a whole step with stochastic rounding), with
/// scale = absmax/levels.
fn check_blockwise(v: &[f32], out: &[f32], block: usize, levels: f32, stochastic: bool) {
    let half = if stochastic { 1.0 } else { 0.5 };
    for (bv, bo) in v.chunks(block).zip(out.chunks(block)) {
        let scale = bv.iter().fold(0f32, |m, x| m.max(x.abs())) / levels;
        for (x, y) in bv.iter().zip(bo) {
            assert!(
                (y - x).abs() <= scale * (half + 2e-5),
                "{x} -> {y}, scale {scale}"
            );
        }
    }
}

/// A payload with a valid header and checksum around an arbitrary raw body.
pub(crate) fn craft(
    codec: CodecKind,
    topk_values: TopKValues,
    block: u32,
    n: u64,
    body: &[u8],
) -> Vec<u8> {
    let h = Header {
        version: FORMAT_VERSION,
        codec,
        zstd: false,
        stochastic_rounding: false,
        topk_values,
        block_size: block,
        n,
        body_len: body.len() as u64,
        checksum: header::checksum(body),
    };
    let mut out = h.to_bytes().to_vec();
    out.extend_from_slice(body);
    out
}
