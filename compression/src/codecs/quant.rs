//! Blockwise absmax quantization: int8 (-127..=127) and int4 (-7..=7).
//!
//! Body layout: one little-endian f32 scale per block, then the integers (int8: one byte
//! each; int4: two per byte, the earlier value in the low nibble).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{blocks, get_scale, grow, malformed, put_scale};
use crate::CodecError;

/// Adding 1.5 * 2^23 to an f32 of magnitude < 2^22 rounds it to an integer (ties to even),
/// and the integer's two's complement sits in the low bits of the sum. Plain SSE2
/// arithmetic, so the loops vectorize.
const MAGIC: f32 = 12_582_912.0;

#[inline(always)]
fn round_even(y: f32) -> f32 {
    (y + MAGIC) - MAGIC
}

/// The low byte of the two's complement of the integer-valued `t` (|t| < 2^22).
#[inline(always)]
fn code(t: f32) -> u8 {
    (t + MAGIC).to_bits() as u8
}

/// Largest |x| of a block: finite floats compare like their magnitude bits.
fn absmax(x: &[f32]) -> f32 {
    let mut acc = [0u32; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for (a, v) in acc.iter_mut().zip(c) {
            *a = (*a).max(v.to_bits() & 0x7fff_ffff);
        }
    }
    let m = it
        .remainder()
        .iter()
        .fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff));
    f32::from_bits(acc.iter().fold(m, |m, &a| m.max(a)))
}

/// Uniform [0, 1) numbers for stochastic rounding, from ChaCha8 seeded by the encode seed.
pub(crate) struct Dither {
    rng: ChaCha8Rng,
    buf: [u32; DITHER_CHUNK],
}

const DITHER_CHUNK: usize = 64;

impl Dither {
    pub(crate) fn new(seed: u64) -> Self {
        Dither {
            rng: ChaCha8Rng::seed_from_u64(seed),
            buf: [0; DITHER_CHUNK],
        }
    }

    /// Fills and returns `len <= 64` fresh random words.
    fn next(&mut self, len: usize) -> &[u32] {
        let b = &mut self.buf[..len];
        self.rng.fill(b);
        b
    }
}

/// 24 random bits to a uniform f32 in [0, 1).
#[inline(always)]
fn unit(r: u32) -> f32 {
    (r >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// Quantizes one block to integers in `-levels..=levels`, written as two's complement bytes
/// into `q` (same length as `x`). Returns the block's scale (0 for an all-zero block).
///
/// `q = round(x / scale)`, or `floor(x / scale + u)` with dithering; `scale = absmax /
/// levels`, nudged down one ulp in the rare case where `scale * levels` would overflow, so
/// the decoded values are always finite. Blocks so small that the scale underflows to 0
/// (absmax below ~1e-43) are sent as zeros.
fn quantize_block(x: &[f32], q: &mut [u8], levels: f32, dither: Option<&mut Dither>) -> f32 {
    let absmax = absmax(x);
    let mut scale = absmax / levels;
    if scale == 0.0 {
        q.fill(0);
        return 0.0;
    }
    if !(scale * levels).is_finite() {
        scale = f32::from_bits(scale.to_bits() - 1);
    }
    let inv = levels / absmax;
    // Tiny blocks: levels / absmax overflows f32, so scale in f64.
    let inv64 = f64::from(levels) / f64::from(absmax);
    let scaled = |v: f32| -> f32 {
        if inv.is_finite() {
            v * inv
        } else {
            (f64::from(v) * inv64) as f32
        }
    };
    match dither {
        None if inv.is_finite() => {
            for (o, &v) in q.iter_mut().zip(x) {
                *o = code(round_even((v * inv).clamp(-levels, levels)));
            }
        }
        None => {
            for (o, &v) in q.iter_mut().zip(x) {
                *o = code(round_even(scaled(v).clamp(-levels, levels)));
            }
        }
        Some(d) => {
            for (xs, qs) in x.chunks(DITHER_CHUNK).zip(q.chunks_mut(DITHER_CHUNK)) {
                let u = d.next(xs.len());
                for ((o, &v), &r) in qs.iter_mut().zip(xs).zip(u) {
                    let z = scaled(v) + unit(r);
                    // floor(z), exact for |z| < 2^22.
                    let t = round_even(z);
                    let t = if t > z { t - 1.0 } else { t };
                    *o = code(t.clamp(-levels, levels));
                }
            }
        }
    }
    scale
}

/// Appends the int8 body of `v`: scales `absmax/127`, then one byte per value.
pub(crate) fn encode_int8(v: &[f32], block: usize, stochastic: bool, seed: u64, out: &mut Vec<u8>) {
    let nb = blocks(v.len(), block);
    let body = grow(out, nb * 4 + v.len());
    let (scales, q) = body.split_at_mut(nb * 4);
    let mut dither = stochastic.then(|| Dither::new(seed));
    for ((x, qb), s) in v
        .chunks(block)
        .zip(q.chunks_mut(block))
        .zip(scales.chunks_exact_mut(4))
    {
        put_scale(s, quantize_block(x, qb, 127.0, dither.as_mut()));
    }
}

/// Appends the int4 body of `v`: scales `absmax/7`, then two values per byte.
pub(crate) fn encode_int4(v: &[f32], block: usize, stochastic: bool, seed: u64, out: &mut Vec<u8>) {
    let nb = blocks(v.len(), block);
    let body = grow(out, nb * 4 + v.len().div_ceil(2));
    let (scales, packed) = body.split_at_mut(nb * 4);
    let mut dither = stochastic.then(|| Dither::new(seed));
    // One scratch buffer for the whole input: blocks may have odd sizes, so byte pairs can
    // straddle two blocks.
    let mut codes = vec![0u8; v.len()];
    for ((x, qb), s) in v
        .chunks(block)
        .zip(codes.chunks_mut(block))
        .zip(scales.chunks_exact_mut(4))
    {
        put_scale(s, quantize_block(x, qb, 7.0, dither.as_mut()));
    }
    let mut pairs = codes.chunks_exact(2);
    for (o, p) in packed.iter_mut().zip(&mut pairs) {
        *o = (p[0] & 0x0f) | (p[1] << 4);
    }
    if let ([last], Some(o)) = (pairs.remainder(), packed.last_mut()) {
        *o = last & 0x0f;
    }
}

/// Decodes an int8 body into `out` (the body length is checked here).
pub(crate) fn decode_int8(b: &[u8], block: usize, out: &mut [f32]) -> Result<(), CodecError> {
    let n = out.len();
    let nb = blocks(n, block);
    if b.len() != nb * 4 + n {
        return malformed(format!("int8 body of {} bytes for {n} values", b.len()));
    }
    let (scales, q) = b.split_at(nb * 4);
    for ((o, qb), s) in out
        .chunks_mut(block)
        .zip(q.chunks(block))
        .zip(scales.chunks_exact(4))
    {
        let s = get_scale(s)?;
        for (x, &c) in o.iter_mut().zip(qb) {
            *x = f32::from(c as i8) * s;
        }
    }
    Ok(())
}

/// Decodes an int4 body into `out` (the body length is checked here). The unused high
/// nibble after an odd number of values must be zero.
pub(crate) fn decode_int4(b: &[u8], block: usize, out: &mut [f32]) -> Result<(), CodecError> {
    let n = out.len();
    let nb = blocks(n, block);
    if b.len() != nb * 4 + n.div_ceil(2) {
        return malformed(format!("int4 body of {} bytes for {n} values", b.len()));
    }
    let (scales, packed) = b.split_at(nb * 4);
    // First the integers, then the scales, block by block.
    let mut pairs = out.chunks_exact_mut(2);
    for (o, &byte) in (&mut pairs).zip(packed) {
        o[0] = f32::from(((byte << 4) as i8) >> 4);
        o[1] = f32::from((byte as i8) >> 4);
    }
    if let ([x], Some(&byte)) = (pairs.into_remainder(), packed.last()) {
        if byte >> 4 != 0 {
            return malformed("int4 padding nibble is not zero");
        }
        *x = f32::from(((byte << 4) as i8) >> 4);
    }
    for (o, s) in out.chunks_mut(block).zip(scales.chunks_exact(4)) {
        let s = get_scale(s)?;
        for x in o {
            *x *= s;
        }
    }
    Ok(())
}
