//! 1-bit sign codec: one f32 scale `mean(|x|)` per block, then one bit per value (1 =
//! negative sign bit), eight per byte with the earlier value in the low bit.

use super::{blocks, get_scale, grow, malformed, put_scale};
use crate::CodecError;

/// Mean |x| of a block, summed in f64 (no overflow, little rounding).
fn mean_abs(x: &[f32]) -> f32 {
    let mut acc = [0f64; 4];
    let mut it = x.chunks_exact(4);
    for c in &mut it {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += f64::from(v.abs());
        }
    }
    let rest: f64 = it.remainder().iter().map(|v| f64::from(v.abs())).sum();
    let sum = acc.iter().sum::<f64>() + rest;
    // The mean of finite values is at most their max, so this stays finite.
    (sum / x.len() as f64) as f32
}

fn sign_byte(c: &[f32]) -> u8 {
    c.iter()
        .enumerate()
        .fold(0u8, |b, (j, x)| b | (((x.to_bits() >> 31) as u8) << j))
}

/// Appends the sign1 body of `v`.
pub(crate) fn encode(v: &[f32], block: usize, out: &mut Vec<u8>) {
    let nb = blocks(v.len(), block);
    let body = grow(out, nb * 4 + v.len().div_ceil(8));
    let (scales, bits) = body.split_at_mut(nb * 4);
    for (x, s) in v.chunks(block).zip(scales.chunks_exact_mut(4)) {
        put_scale(s, mean_abs(x));
    }
    let mut it = v.chunks_exact(8);
    for (o, c) in bits.iter_mut().zip(&mut it) {
        *o = sign_byte(c);
    }
    if let (rest @ [_, ..], Some(o)) = (it.remainder(), bits.last_mut()) {
        *o = sign_byte(rest);
    }
}

/// Decodes a sign1 body into `out`: each value is `±scale` of its block. Unused bits of the
/// last byte must be zero.
pub(crate) fn decode(b: &[u8], block: usize, out: &mut [f32]) -> Result<(), CodecError> {
    let n = out.len();
    let nb = blocks(n, block);
    if b.len() != nb * 4 + n.div_ceil(8) {
        return malformed(format!("sign1 body of {} bytes for {n} values", b.len()));
    }
    let (scales, bits) = b.split_at(nb * 4);
    match (n % 8, bits.last()) {
        (used @ 1.., Some(&last)) if last >> used != 0 => {
            return malformed("sign1 padding bits are not zero");
        }
        _ => {}
    }
    // First ±1.0 from the bits, then the scales, block by block.
    const ONE: u32 = 0x3f80_0000;
    let mut it = out.chunks_exact_mut(8);
    for (o, &byte) in (&mut it).zip(bits) {
        for (j, x) in o.iter_mut().enumerate() {
            *x = f32::from_bits(ONE | (u32::from((byte >> j) & 1) << 31));
        }
    }
    if let Some(&byte) = bits.last() {
        for (j, x) in it.into_remainder().iter_mut().enumerate() {
            *x = f32::from_bits(ONE | (u32::from((byte >> j) & 1) << 31));
        }
    }
    for (o, s) in out.chunks_mut(block).zip(scales.chunks_exact(4)) {
        let s = get_scale(s)?;
        for x in o {
            *x *= s;
        }
    }
    Ok(())
}
