//! The codec bodies.

use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{malformed, CodecConfig, CodecError, CodecKind, Header, TopKValues};

/// Adding and subtracting 1.5 * 2^23 rounds an f32 of magnitude < 2^22 to the nearest
/// integer (ties to even) with plain SSE2 arithmetic, which vectorizes.
const ROUND: f32 = 12_582_912.0;

#[inline(always)]
fn round_even(x: f32) -> f32 {
    (x + ROUND) - ROUND
}

fn f32_bytes(v: &[f32], out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + v.len() * 4, 0);
    for (c, x) in out[start..].chunks_exact_mut(4).zip(v) {
        c.copy_from_slice(&x.to_le_bytes());
    }
}

fn read_f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn blocks(n: usize, block: usize) -> usize {
    n.div_ceil(block)
}

/// Blockwise symmetric quantization to integers in -levels..=levels. Returns the scales
/// (absmax / levels) and the integers.
fn quantize(
    v: &[f32],
    block: usize,
    levels: f32,
    stochastic: bool,
    seed: u64,
) -> (Vec<f32>, Vec<i8>) {
    let mut scales = Vec::with_capacity(blocks(v.len(), block));
    let mut q = vec![0i8; v.len()];
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for (chunk, qc) in v.chunks(block).zip(q.chunks_mut(block)) {
        let absmax = chunk.iter().fold(0f32, |m, x| m.max(x.abs()));
        if absmax == 0.0 {
            scales.push(0.0);
            continue;
        }
        let inv = levels / absmax;
        scales.push(absmax / levels);
        if stochastic {
            for (o, x) in qc.iter_mut().zip(chunk) {
                let u: f32 = rng.gen();
                *o = (x * inv + u).floor().clamp(-levels, levels) as i8;
            }
        } else {
            for (o, x) in qc.iter_mut().zip(chunk) {
                *o = round_even(x * inv).clamp(-levels, levels) as i8;
            }
        }
    }
    (scales, q)
}

fn dequantize(scales: &[f32], q: impl Iterator<Item = i8>, n: usize, block: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    for (i, v) in q.take(n).enumerate() {
        out.push(f32::from(v) * scales[i / block]);
    }
    out
}

fn int8_body(v: &[f32], block: usize, stochastic: bool, seed: u64, out: &mut Vec<u8>) {
    let (scales, q) = quantize(v, block, 127.0, stochastic, seed);
    f32_bytes(&scales, out);
    out.extend(q.iter().map(|&x| x as u8));
}

fn int8_len(n: usize, block: usize) -> Option<usize> {
    blocks(n, block).checked_mul(4)?.checked_add(n)
}

fn decode_int8(b: &[u8], n: usize, block: usize) -> Result<Vec<f32>, CodecError> {
    let nb = blocks(n, block);
    if Some(b.len()) != int8_len(n, block) {
        return malformed("int8 body has the wrong length");
    }
    let scales = read_f32s(&b[..nb * 4]);
    let mut out = vec![0f32; n];
    for ((o, qc), s) in out
        .chunks_mut(block)
        .zip(b[nb * 4..].chunks(block))
        .zip(&scales)
    {
        for (x, &q) in o.iter_mut().zip(qc) {
            *x = f32::from(q as i8) * s;
        }
    }
    Ok(out)
}

/// Bytes of the body for `cfg` given the number of values (top-k: the most it can be).
pub fn max_body_len(h: &Header) -> Option<usize> {
    let n = usize::try_from(h.n).ok()?;
    let block = h.block_size as usize;
    let nb4 = blocks(n, block).checked_mul(4)?;
    match h.codec {
        CodecKind::Fp32 => n.checked_mul(4),
        CodecKind::Fp16 | CodecKind::Bf16 => n.checked_mul(2),
        CodecKind::Int8 => int8_len(n, block),
        CodecKind::Int4 => nb4.checked_add(n.div_ceil(2)),
        CodecKind::Sign1 => nb4.checked_add(n.div_ceil(8)),
        CodecKind::TopK => n.checked_mul(9)?.checked_add(nb4)?.checked_add(8),
    }
}

/// Encodes the body (before zstd).
pub fn encode_body(v: &[f32], cfg: &CodecConfig, seed: u64) -> Vec<u8> {
    let block = cfg.block_size as usize;
    let mut out = Vec::new();
    match cfg.codec {
        CodecKind::Fp32 => f32_bytes(v, &mut out),
        CodecKind::Fp16 => {
            out.reserve(v.len() * 2);
            for x in v {
                out.extend_from_slice(&f16::from_f32(x.clamp(-65504.0, 65504.0)).to_le_bytes());
            }
        }
        CodecKind::Bf16 => {
            out.reserve(v.len() * 2);
            for x in v {
                out.extend_from_slice(&bf16::from_f32(*x).to_le_bytes());
            }
        }
        CodecKind::Int8 => int8_body(v, block, cfg.stochastic_rounding, seed, &mut out),
        CodecKind::Int4 => {
            let (scales, q) = quantize(v, block, 7.0, cfg.stochastic_rounding, seed);
            f32_bytes(&scales, &mut out);
            out.extend(q.chunks(2).map(|p| {
                let lo = (p[0] as u8) & 0x0f;
                let hi = p.get(1).map(|&x| (x as u8) & 0x0f).unwrap_or(0);
                lo | (hi << 4)
            }));
        }
        CodecKind::Sign1 => {
            let scales: Vec<f32> = v
                .chunks(block)
                .map(|c| c.iter().map(|x| x.abs()).sum::<f32>() / c.len() as f32)
                .collect();
            f32_bytes(&scales, &mut out);
            out.extend(v.chunks(8).map(|c| {
                c.iter()
                    .enumerate()
                    .fold(0u8, |b, (i, x)| b | (u8::from(x.is_sign_negative()) << i))
            }));
        }
        CodecKind::TopK => topk_body(v, cfg, seed, &mut out),
    }
    out
}

fn topk_body(v: &[f32], cfg: &CodecConfig, seed: u64, out: &mut Vec<u8>) {
    let n = v.len();
    let k = if n == 0 {
        0
    } else {
        // The fraction is an f32 from a config: round it to 6 decimals so 0.05 means 0.05.
        let f = (f64::from(cfg.topk_fraction) * 1e6).round() / 1e6;
        ((f * n as f64).ceil() as usize).clamp(1, n)
    };
    let mut idx: Vec<u32> = (0..n as u32).collect();
    if k < n {
        // Largest magnitude first; ties by lower index, so the choice is deterministic.
        idx.select_nth_unstable_by(k - 1, |&a, &b| {
            v[b as usize]
                .abs()
                .total_cmp(&v[a as usize].abs())
                .then(a.cmp(&b))
        });
        idx.truncate(k);
    }
    idx.sort_unstable();
    out.extend_from_slice(&(k as u64).to_le_bytes());
    let mut next = 0u32;
    for &i in &idx {
        let mut d = i - next;
        loop {
            let byte = (d & 0x7f) as u8;
            d >>= 7;
            if d == 0 {
                out.push(byte);
                break;
            }
            out.push(byte | 0x80);
        }
        next = i + 1;
    }
    let vals: Vec<f32> = idx.iter().map(|&i| v[i as usize]).collect();
    match cfg.topk_values {
        TopKValues::Fp32 => f32_bytes(&vals, out),
        TopKValues::Fp16 => {
            for x in vals {
                out.extend_from_slice(&f16::from_f32(x.clamp(-65504.0, 65504.0)).to_le_bytes());
            }
        }
        TopKValues::Int8 => int8_body(
            &vals,
            cfg.block_size as usize,
            cfg.stochastic_rounding,
            seed,
            out,
        ),
    }
}

/// Decodes a raw body of `n` values.
pub fn decode_body(h: &Header, b: &[u8], n: usize) -> Result<Vec<f32>, CodecError> {
    let block = h.block_size as usize;
    let exact = |len: Option<usize>| {
        if Some(b.len()) == len {
            Ok(())
        } else {
            malformed(format!(
                "{:?} body of {} bytes for {n} values",
                h.codec,
                b.len()
            ))
        }
    };
    match h.codec {
        CodecKind::Fp32 => {
            exact(n.checked_mul(4))?;
            Ok(read_f32s(b))
        }
        CodecKind::Fp16 => {
            exact(n.checked_mul(2))?;
            Ok(b.chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect())
        }
        CodecKind::Bf16 => {
            exact(n.checked_mul(2))?;
            Ok(b.chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect())
        }
        CodecKind::Int8 => decode_int8(b, n, block),
        CodecKind::Int4 => {
            let nb = blocks(n, block);
            exact(max_body_len(h))?;
            let scales = read_f32s(&b[..nb * 4]);
            let q = b[nb * 4..]
                .iter()
                .flat_map(|&byte| [((byte << 4) as i8) >> 4, (byte as i8) >> 4]);
            Ok(dequantize(&scales, q, n, block))
        }
        CodecKind::Sign1 => {
            let nb = blocks(n, block);
            exact(max_body_len(h))?;
            let scales = read_f32s(&b[..nb * 4]);
            let bits = &b[nb * 4..];
            Ok((0..n)
                .map(|i| {
                    let s = scales[i / block];
                    if bits[i / 8] >> (i % 8) & 1 == 1 {
                        -s
                    } else {
                        s
                    }
                })
                .collect())
        }
        CodecKind::TopK => decode_topk(h, b, n),
    }
}

fn decode_topk(h: &Header, b: &[u8], n: usize) -> Result<Vec<f32>, CodecError> {
    if b.len() < 8 {
        return malformed("top-k body too short");
    }
    let mut k8 = [0u8; 8];
    k8.copy_from_slice(&b[..8]);
    let k = u64::from_le_bytes(k8);
    if k > n as u64 {
        return malformed(format!("top-k keeps {k} of {n} values"));
    }
    let k = k as usize;
    let mut pos = 8;
    let mut idx = Vec::with_capacity(k.min(b.len()));
    let mut next = 0u64;
    for _ in 0..k {
        let mut d = 0u64;
        let mut shift = 0;
        loop {
            let Some(&byte) = b.get(pos) else {
                return malformed("top-k indices truncated");
            };
            pos += 1;
            d |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                break;
            }
            shift += 7;
            if shift > 35 {
                return malformed("top-k index varint too long");
            }
        }
        let i = next + d;
        if i >= n as u64 {
            return malformed(format!("top-k index {i} out of range {n}"));
        }
        idx.push(i as usize);
        next = i + 1;
    }
    let rest = &b[pos..];
    let vals = match h.flags >> 2 {
        0 if rest.len() == k * 4 => read_f32s(rest),
        1 if rest.len() == k * 2 => rest
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        2 => decode_int8(rest, k, h.block_size as usize)?,
        _ => return malformed("top-k values have the wrong length"),
    };
    let mut out = vec![0f32; n];
    for (i, v) in idx.into_iter().zip(vals) {
        out[i] = v;
    }
    Ok(out)
}
