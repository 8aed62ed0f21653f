//! Top-k sparsification: `k` as u64, the kept indices ascending as LEB128 varint gaps, then
//! the kept values (fp32, fp16 or blockwise int8).

use super::{blocks, float, malformed, quant};
use crate::{CodecConfig, CodecError, TopKValues};

/// Longest index gap varint accepted (5 bytes: 35 bits, more than any u32 index needs).
const MAX_VARINT_BYTES: u32 = 5;

/// `max(1, ceil(fraction * n))` for `n > 0` (0 for `n = 0`), at most `n`. The f32 fraction is
/// rounded to 6 decimals first, so `0.05` means 0.05 and not 0.0500000007.
pub(crate) fn k_for(n: usize, fraction: f32) -> usize {
    if n == 0 {
        return 0;
    }
    let f = (f64::from(fraction) * 1e6).round() / 1e6;
    let k = (f * n as f64).ceil();
    if k.is_nan() || k < 1.0 {
        1
    } else if k >= n as f64 {
        n
    } else {
        k as usize
    }
}

/// Bytes of the stored values for `k` kept entries.
fn values_len(k: usize, block: usize, kind: TopKValues) -> Option<usize> {
    match kind {
        TopKValues::Fp32 => k.checked_mul(4),
        TopKValues::Fp16 => k.checked_mul(2),
        TopKValues::Int8 => blocks(k, block).checked_mul(4)?.checked_add(k),
    }
}

/// The largest body any `k <= n` can give.
pub(crate) fn max_body_len(n: usize, block: usize) -> Option<usize> {
    let values =
        values_len(n, block, TopKValues::Fp32)?.max(values_len(n, block, TopKValues::Int8)?);
    n.checked_mul(MAX_VARINT_BYTES as usize)?
        .checked_add(values)?
        .checked_add(8)
}

/// A capacity hint for the encoder.
pub(crate) fn body_len_hint(n: usize, cfg: &CodecConfig) -> usize {
    let k = k_for(n, cfg.topk_fraction);
    let values = values_len(k, cfg.block_size as usize, cfg.topk_values).unwrap_or(0);
    8usize
        .saturating_add(k.saturating_mul(3))
        .saturating_add(values)
}

fn put_varint(out: &mut Vec<u8>, mut d: u32) {
    while d >= 0x80 {
        out.push((d as u8) | 0x80);
        d >>= 7;
    }
    out.push(d as u8);
}

/// Appends the top-k body of `v`: the `k` entries of largest magnitude, ties going to the
/// lower index.
pub(crate) fn encode(
    v: &[f32],
    cfg: &CodecConfig,
    seed: u64,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    let n = v.len();
    if u32::try_from(n).is_err() {
        return Err(CodecError::TooLarge(format!(
            "top-k encodes at most {} values, got {n}",
            u32::MAX
        )));
    }
    let k = k_for(n, cfg.topk_fraction);
    out.extend_from_slice(&(k as u64).to_le_bytes());
    let mut vals = Vec::with_capacity(k);
    if k == n {
        // Everything is kept: every gap is 0.
        out.resize(out.len() + n, 0);
        vals.extend_from_slice(v);
    } else if k > 0 {
        // Magnitude bits of finite floats order like the magnitudes. Select the k-th largest
        // in O(n), then keep everything above it plus the lowest-index entries equal to it.
        let mut mags: Vec<u32> = v.iter().map(|x| x.to_bits() & 0x7fff_ffff).collect();
        let (above, &mut threshold, _) = mags.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
        let greater = above.iter().filter(|&&m| m > threshold).count();
        let mut ties = k - greater;
        drop(mags);
        let mut next = 0u32;
        for (i, x) in (0u32..).zip(v) {
            let m = x.to_bits() & 0x7fff_ffff;
            if m > threshold || (m == threshold && ties > 0) {
                if m == threshold {
                    ties -= 1;
                }
                put_varint(out, i - next);
                next = i + 1;
                vals.push(*x);
            }
        }
    }
    let block = cfg.block_size as usize;
    match cfg.topk_values {
        TopKValues::Fp32 => float::put_f32(&vals, super::grow(out, k * 4)),
        TopKValues::Fp16 => float::put_f16(&vals, super::grow(out, k * 2)),
        TopKValues::Int8 => {
            quant::encode_int8(&vals, block, cfg.stochastic_rounding, seed, out);
        }
    }
    Ok(())
}

/// Decodes a top-k body into `out` (all zeros, `n` long). Indices must be in range and
/// strictly increasing (gap coding makes them so); every byte must be used.
pub(crate) fn decode(
    b: &[u8],
    block: usize,
    kind: TopKValues,
    out: &mut [f32],
) -> Result<(), CodecError> {
    let n = out.len();
    let Some((k_bytes, rest)) = b.split_first_chunk::<8>() else {
        return malformed("top-k body shorter than its count");
    };
    let k = u64::from_le_bytes(*k_bytes);
    let k = match usize::try_from(k) {
        Ok(k) if k <= n => k,
        _ => return malformed(format!("top-k keeps {k} of {n} values")),
    };
    // Each index takes at least one byte, so k is also bounded by the body length.
    let vlen = values_len(k, block, kind)
        .filter(|&l| l.checked_add(k).is_some_and(|m| m <= rest.len()))
        .ok_or_else(|| CodecError::Malformed(format!("top-k body too short for {k} values")))?;
    let (idx, val_bytes) = rest.split_at(rest.len() - vlen);
    let mut vals = vec![0f32; k];
    match kind {
        TopKValues::Fp32 => float::get_f32(val_bytes, &mut vals),
        TopKValues::Fp16 => float::get_f16(val_bytes, &mut vals),
        TopKValues::Int8 => quant::decode_int8(val_bytes, block, &mut vals)?,
    }
    let mut pos = 0usize;
    let mut next = 0u64;
    for &val in &vals {
        let mut gap = 0u64;
        let mut shift = 0u32;
        loop {
            let Some(&byte) = idx.get(pos) else {
                return malformed("top-k indices truncated");
            };
            pos += 1;
            gap |= u64::from(byte & 0x7f) << (7 * shift);
            shift += 1;
            if byte & 0x80 == 0 {
                break;
            }
            if shift == MAX_VARINT_BYTES {
                return malformed("top-k index gap varint too long");
            }
        }
        let i = next + gap;
        let Some(slot) = usize::try_from(i).ok().and_then(|i| out.get_mut(i)) else {
            return malformed(format!("top-k index {i} out of range for {n} values"));
        };
        *slot = val;
        next = i + 1;
    }
    if pos != idx.len() {
        return malformed("trailing bytes after the top-k indices");
    }
    Ok(())
}
