//! fp32, fp16 and bf16 bodies: plain little-endian arrays.

use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use half::{bf16, f16};

/// Largest finite fp16, as f32.
const F16_MAX: f32 = 65_504.0;
/// Values per stack chunk for the fp16 conversions (which use F16C when the CPU has it).
const CHUNK: usize = 512;

/// Writes `v` as little-endian f32 into `dst` (`4 * v.len()` bytes).
pub(crate) fn put_f32(v: &[f32], dst: &mut [u8]) {
    for (d, x) in dst.chunks_exact_mut(4).zip(v) {
        d.copy_from_slice(&x.to_le_bytes());
    }
}

/// Reads little-endian f32 from `src` into `dst` (`src` is `4 * dst.len()` bytes).
pub(crate) fn get_f32(src: &[u8], dst: &mut [f32]) {
    for (o, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
        *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

/// Writes `v` as little-endian fp16 into `dst` (`2 * v.len()` bytes). Values beyond
/// ±65504 are clamped to ±65504 instead of becoming infinite.
pub(crate) fn put_f16(v: &[f32], dst: &mut [u8]) {
    let mut clamped = [0f32; CHUNK];
    let mut halves = [f16::ZERO; CHUNK];
    for (src, d) in v.chunks(CHUNK).zip(dst.chunks_mut(2 * CHUNK)) {
        let c = &mut clamped[..src.len()];
        for (o, x) in c.iter_mut().zip(src) {
            *o = x.clamp(-F16_MAX, F16_MAX);
        }
        let h = &mut halves[..src.len()];
        h.convert_from_f32_slice(c);
        for (o, x) in d.chunks_exact_mut(2).zip(h.iter()) {
            o.copy_from_slice(&x.to_bits().to_le_bytes());
        }
    }
}

/// Reads little-endian fp16 from `src` into `dst`.
pub(crate) fn get_f16(src: &[u8], dst: &mut [f32]) {
    let mut bits = [0u16; CHUNK];
    for (s, d) in src.chunks(2 * CHUNK).zip(dst.chunks_mut(CHUNK)) {
        let b = &mut bits[..d.len()];
        for (o, c) in b.iter_mut().zip(s.chunks_exact(2)) {
            *o = u16::from_le_bytes([c[0], c[1]]);
        }
        let h: &[f16] = b.reinterpret_cast();
        h.convert_to_f32_slice(d);
    }
}

/// Writes `v` as little-endian bf16 (round to nearest even) into `dst`. Values that would
/// round past the largest finite bf16 are clamped to it.
pub(crate) fn put_bf16(v: &[f32], dst: &mut [u8]) {
    let max = bf16::MAX.to_f32();
    for (o, x) in dst.chunks_exact_mut(2).zip(v) {
        let b = bf16::from_f32(x.clamp(-max, max));
        o.copy_from_slice(&b.to_bits().to_le_bytes());
    }
}

/// Reads little-endian bf16 from `src` into `dst`.
pub(crate) fn get_bf16(src: &[u8], dst: &mut [f32]) {
    for (o, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *o = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16);
    }
}
