//! The codec bodies (everything after the header, before zstd).

pub(crate) mod float;
pub(crate) mod quant;
pub(crate) mod sign;
pub(crate) mod topk;

use crate::{CodecConfig, CodecError, CodecKind, Header};

/// Number of scale blocks for `n` values.
pub(crate) fn blocks(n: usize, block: usize) -> usize {
    n.div_ceil(block)
}

pub(crate) fn malformed<T>(m: impl Into<String>) -> Result<T, CodecError> {
    Err(CodecError::Malformed(m.into()))
}

/// Position of the first NaN or infinity. The scan itself is branch-free per chunk so it
/// vectorizes; the position is only searched for once a chunk is known to be bad.
pub(crate) fn first_non_finite(v: &[f32]) -> Option<usize> {
    const CHUNK: usize = 256;
    for (ci, c) in v.chunks(CHUNK).enumerate() {
        let bad = c
            .iter()
            .fold(0u32, |acc, x| acc | u32::from(!x.is_finite()));
        if bad != 0 {
            return c
                .iter()
                .position(|x| !x.is_finite())
                .map(|p| ci * CHUNK + p);
        }
    }
    None
}

/// Length of the scales plus the packed values of a blockwise body.
fn blockwise_len(n: usize, block: usize, value_bytes: usize) -> Option<usize> {
    blocks(n, block).checked_mul(4)?.checked_add(value_bytes)
}

/// The smallest and largest possible raw body length for `n` values (equal except for
/// top-k), or `None` if it does not fit in `usize`.
pub(crate) fn body_len_range(codec: CodecKind, n: usize, block: usize) -> Option<(usize, usize)> {
    let exact = |len: Option<usize>| len.map(|l| (l, l));
    match codec {
        CodecKind::Fp32 => exact(n.checked_mul(4)),
        CodecKind::Fp16 | CodecKind::Bf16 => exact(n.checked_mul(2)),
        CodecKind::Int8 => exact(blockwise_len(n, block, n)),
        CodecKind::Int4 => exact(blockwise_len(n, block, n.div_ceil(2))),
        CodecKind::Sign1 => exact(blockwise_len(n, block, n.div_ceil(8))),
        CodecKind::TopK => Some((8, topk::max_body_len(n, block)?)),
    }
}

/// A capacity hint for the body of `n` values under `cfg` (not a bound the decoder relies on).
pub(crate) fn body_len_hint(n: usize, cfg: &CodecConfig) -> usize {
    let block = cfg.block_size as usize;
    match cfg.codec {
        CodecKind::TopK => topk::body_len_hint(n, cfg),
        codec => body_len_range(codec, n, block).map_or(0, |(lo, _)| lo),
    }
}

/// Appends the raw body of `v` (all finite; checked by the caller) to `out`.
pub(crate) fn encode_body(
    v: &[f32],
    cfg: &CodecConfig,
    seed: u64,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    let block = cfg.block_size as usize;
    let stochastic = cfg.stochastic_rounding;
    match cfg.codec {
        CodecKind::Fp32 => float::put_f32(v, grow(out, v.len() * 4)),
        CodecKind::Fp16 => float::put_f16(v, grow(out, v.len() * 2)),
        CodecKind::Bf16 => float::put_bf16(v, grow(out, v.len() * 2)),
        CodecKind::Int8 => quant::encode_int8(v, block, stochastic, seed, out),
        CodecKind::Int4 => quant::encode_int4(v, block, stochastic, seed, out),
        CodecKind::Sign1 => sign::encode(v, block, out),
        CodecKind::TopK => topk::encode(v, cfg, seed, out)?,
    }
    Ok(())
}

/// Extends `out` by `len` zero bytes and returns them.
pub(crate) fn grow(out: &mut Vec<u8>, len: usize) -> &mut [u8] {
    let start = out.len();
    out.resize(start + len, 0);
    &mut out[start..]
}

/// Decodes a raw body of `n` values (`n` already checked against the limits). The caller
/// checks the result for non-finite values.
pub(crate) fn decode_body(h: &Header, b: &[u8], n: usize) -> Result<Vec<f32>, CodecError> {
    let block = h.block_size as usize;
    if let Some((lo, hi)) = body_len_range(h.codec, n, block) {
        if b.len() < lo || b.len() > hi {
            return malformed(format!(
                "{:?} body of {} bytes for {n} values",
                h.codec,
                b.len()
            ));
        }
    } else {
        return malformed("body size overflows");
    }
    let mut out = zeroed(n)?;
    match h.codec {
        CodecKind::Fp32 => float::get_f32(b, &mut out),
        CodecKind::Fp16 => float::get_f16(b, &mut out),
        CodecKind::Bf16 => float::get_bf16(b, &mut out),
        CodecKind::Int8 => quant::decode_int8(b, block, &mut out)?,
        CodecKind::Int4 => quant::decode_int4(b, block, &mut out)?,
        CodecKind::Sign1 => sign::decode(b, block, &mut out)?,
        CodecKind::TopK => topk::decode(b, block, h.topk_values, &mut out)?,
    }
    Ok(out)
}

/// `n` zeros, or an error (not an abort) if they cannot be allocated.
fn zeroed(n: usize) -> Result<Vec<f32>, CodecError> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| CodecError::TooLarge(format!("cannot allocate {n} values")))?;
    v.resize(n, 0.0);
    Ok(v)
}

/// Writes a block scale as a little-endian f32 into `dst` (4 bytes).
pub(crate) fn put_scale(dst: &mut [u8], s: f32) {
    dst.copy_from_slice(&s.to_le_bytes());
}

/// Reads a block scale, which must be finite and non-negative.
pub(crate) fn get_scale(src: &[u8]) -> Result<f32, CodecError> {
    let mut a = [0u8; 4];
    a.copy_from_slice(src);
    let s = f32::from_le_bytes(a);
    if s.is_finite() && s >= 0.0 {
        Ok(s)
    } else {
        malformed(format!(
            "block scale {s} is not a finite non-negative number"
        ))
    }
}
