//! Lossless parameter deltas: the XOR of f32 bit patterns, split into byte planes.
//!
//! Every round the coordinator sends the model parameters to workers that already hold the
//! previous version, so it sends the XOR of the new and old bit patterns instead of the
//! values. After a small optimizer step the sign and exponent rarely change, so the XOR
//! words are split into four byte planes and zstd-compressed: the high planes are nearly all
//! zeros. Applying the delta to the old parameters gives the new ones bit for bit
//! ([`encode_xor_delta`], [`apply_xor_delta`]).
//!
//! # Format (version 1)
//!
//! A delta is a 32-byte header ([`XOR_HEADER_LEN`]) followed by the body, zstd-compressed
//! when the header's flag says so. All integers are little-endian.
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..4 | magic `DTX1` ([`XOR_MAGIC`]) |
//! | 4 | format version, `1` (anything else: [`CodecError::UnsupportedVersion`]) |
//! | 5 | flags: bit 0 zstd; bits 1-7 zero |
//! | 6..8 | reserved, zero |
//! | 8..16 | number of values `n`, u64 |
//! | 16..24 | body length before zstd, u64, always `4 n` |
//! | 24..32 | first 8 bytes of blake3 over the raw (uncompressed) body |
//!
//! The body is four byte planes of `n` bytes each: plane `k` (k = 0..4) holds byte `k` of
//! every XOR word `old.to_bits() ^ new.to_bits()` in little-endian byte order, so plane 0 is
//! all the lowest mantissa bytes and plane 3 all the sign/exponent bytes.
//!
//! # Hostile input
//!
//! [`apply_xor_delta`] treats its bytes as untrusted (the base is trusted local state): the
//! input length, `n` and the body length are checked against the [`DecodeLimits`] and the
//! base before anything is allocated, zstd output is bounded by `4 n`, the checksum is
//! verified, and a non-finite result is refused. It never panics.

use crate::codecs::first_non_finite;
use crate::{header, zstd_ctx, CodecError, DecodeLimits, MAX_ZSTD_LEVEL};

/// Delta header length in bytes.
pub const XOR_HEADER_LEN: usize = 32;
/// The magic bytes every delta starts with.
pub const XOR_MAGIC: [u8; 4] = *b"DTX1";
/// The delta format version this build writes and reads.
pub const XOR_FORMAT_VERSION: u8 = 1;

const FLAG_ZSTD: u8 = 1;
const KNOWN_FLAGS: u8 = FLAG_ZSTD;

/// A parsed delta header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct XorHeader {
    /// Whether the body is zstd-compressed.
    pub(crate) zstd: bool,
    /// Number of values.
    pub(crate) n: u64,
    /// Body length before zstd (must be `4 n`).
    pub(crate) body_len: u64,
    /// First 8 bytes of blake3 over the raw body.
    pub(crate) checksum: [u8; 8],
}

fn array<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[at..at + N]);
    a
}

impl XorHeader {
    /// The header's 32 bytes.
    pub(crate) fn to_bytes(self) -> [u8; XOR_HEADER_LEN] {
        let mut b = [0u8; XOR_HEADER_LEN];
        b[0..4].copy_from_slice(&XOR_MAGIC);
        b[4] = XOR_FORMAT_VERSION;
        b[5] = if self.zstd { FLAG_ZSTD } else { 0 };
        b[8..16].copy_from_slice(&self.n.to_le_bytes());
        b[16..24].copy_from_slice(&self.body_len.to_le_bytes());
        b[24..32].copy_from_slice(&self.checksum);
        b
    }

    /// Parses and sanity-checks the header at the start of `b` (lengths are checked by the
    /// caller, which knows the base and the limits).
    pub(crate) fn parse(b: &[u8]) -> Result<Self, CodecError> {
        if b.len() < XOR_HEADER_LEN {
            return Err(CodecError::Malformed(format!(
                "{} bytes, shorter than the {XOR_HEADER_LEN}-byte delta header",
                b.len()
            )));
        }
        if b[0..4] != XOR_MAGIC {
            return Err(CodecError::Malformed("bad magic (not a DTX1 delta)".into()));
        }
        if b[4] != XOR_FORMAT_VERSION {
            return Err(CodecError::UnsupportedVersion(b[4]));
        }
        let flags = b[5];
        if flags & !KNOWN_FLAGS != 0 || b[6] != 0 || b[7] != 0 {
            return Err(CodecError::Malformed(format!(
                "unknown flags {flags:#04x} / reserved bytes {} {}",
                b[6], b[7]
            )));
        }
        Ok(XorHeader {
            zstd: flags & FLAG_ZSTD != 0,
            n: u64::from_le_bytes(array(b, 8)),
            body_len: u64::from_le_bytes(array(b, 16)),
            checksum: array(b, 24),
        })
    }
}

/// Writes the byte planes of `old ^ new` (bitwise, same length) into `body` (`4 n` bytes).
fn split_planes(old: &[f32], new: &[f32], body: &mut [u8]) {
    let n = old.len();
    let (p0, rest) = body.split_at_mut(n);
    let (p1, rest) = rest.split_at_mut(n);
    let (p2, p3) = rest.split_at_mut(n);
    // Plain zips of slice iterators: no bounds checks, and the loop vectorizes.
    let words = old
        .iter()
        .zip(new)
        .map(|(o, x)| (o.to_bits() ^ x.to_bits()).to_le_bytes());
    let planes = p0.iter_mut().zip(p1).zip(p2).zip(p3);
    for (w, (((b0, b1), b2), b3)) in words.zip(planes) {
        *b0 = w[0];
        *b1 = w[1];
        *b2 = w[2];
        *b3 = w[3];
    }
}

/// XORs the byte planes in `body` (`4 * base.len()` bytes) into `base`, appending the
/// results to `out`.
fn join_planes(base: &[f32], body: &[u8], out: &mut Vec<f32>) {
    let n = base.len();
    let (p0, rest) = body.split_at(n);
    let (p1, rest) = rest.split_at(n);
    let (p2, p3) = rest.split_at(n);
    let words = p0
        .iter()
        .zip(p1)
        .zip(p2)
        .zip(p3)
        .map(|(((&b0, &b1), &b2), &b3)| u32::from_le_bytes([b0, b1, b2, b3]));
    out.extend(
        base.iter()
            .zip(words)
            .map(|(x, w)| f32::from_bits(x.to_bits() ^ w)),
    );
}

/// Encodes the lossless delta from `old` to `new` (see the [module docs](self) for the
/// format). `zstd_level` 0 stores the body raw; 1..=19 compresses it at that level (anything
/// else: [`CodecError::Config`]).
///
/// `new` must be all finite ([`CodecError::NonFiniteInput`] otherwise); `old` is trusted
/// local state and may hold any bit patterns. The two must have the same length
/// ([`CodecError::Length`] otherwise, with `expected` the length of `old`).
pub fn encode_xor_delta(old: &[f32], new: &[f32], zstd_level: i32) -> Result<Vec<u8>, CodecError> {
    if !(0..=MAX_ZSTD_LEVEL).contains(&zstd_level) {
        return Err(CodecError::Config(format!(
            "zstd_level {zstd_level} not in 0..={MAX_ZSTD_LEVEL}"
        )));
    }
    if old.len() != new.len() {
        return Err(CodecError::Length {
            expected: old.len(),
            got: new.len() as u64,
        });
    }
    if let Some(index) = first_non_finite(new) {
        return Err(CodecError::NonFiniteInput { index });
    }
    let n = new.len();
    // `new` occupies 4n bytes of memory, so this cannot overflow.
    let body_len = 4 * n;
    let mut buf = vec![0u8; XOR_HEADER_LEN + body_len];
    split_planes(old, new, &mut buf[XOR_HEADER_LEN..]);
    let body = &buf[XOR_HEADER_LEN..];
    let h = XorHeader {
        zstd: zstd_level > 0,
        n: n as u64,
        body_len: body_len as u64,
        checksum: header::checksum(body),
    };
    if h.zstd {
        zstd_ctx::framed(&h.to_bytes(), body, zstd_level)
    } else {
        buf[..XOR_HEADER_LEN].copy_from_slice(&h.to_bytes());
        Ok(buf)
    }
}

/// zstd-compresses the body of a delta that [`encode_xor_delta`] made with `zstd_level` 0,
/// at `level` (1..=19): the result is exactly what `encode_xor_delta` gives at that level.
/// Errors as [`compress_payload`](crate::compress_payload).
pub fn compress_xor_delta(delta: &[u8], level: i32) -> Result<Vec<u8>, CodecError> {
    let mut h = XorHeader::parse(delta)?;
    let raw = zstd_ctx::raw_body(delta, XOR_HEADER_LEN, h.zstd, h.body_len)?;
    h.zstd = true;
    zstd_ctx::framed(&h.to_bytes(), raw, level)
}

/// Applies a delta made by [`encode_xor_delta`] to `base` (the old values) and returns the
/// new values.
///
/// `bytes` are untrusted; `base` is trusted. Checked in this order:
///
/// 1. the input fits `limits.max_encoded_bytes` ([`CodecError::TooLarge`]);
/// 2. the header is whole, with the right magic, no unknown flags and zero reserved bytes
///    ([`CodecError::Malformed`]), and version 1 ([`CodecError::UnsupportedVersion`]);
/// 3. `n` fits `limits.max_values` ([`CodecError::TooLarge`]);
/// 4. `n` equals `base.len()` ([`CodecError::Length`], with `expected` the base length);
/// 5. the body length is `4 n` and the (decompressed) body is that long
///    ([`CodecError::Malformed`], or [`CodecError::Zstd`] for a broken frame);
/// 6. the checksum matches ([`CodecError::Checksum`]);
/// 7. every resulting value is finite ([`CodecError::NonFiniteOutput`]).
///
/// Nothing is allocated before step 5, and then at most `4 * base.len()` bytes for the
/// decompressed body and the result. It never panics.
pub fn apply_xor_delta(
    base: &[f32],
    bytes: &[u8],
    limits: &DecodeLimits,
) -> Result<Vec<f32>, CodecError> {
    if bytes.len() > limits.max_encoded_bytes {
        return Err(CodecError::TooLarge(format!(
            "{} encoded bytes, limit {}",
            bytes.len(),
            limits.max_encoded_bytes
        )));
    }
    let h = XorHeader::parse(bytes)?;
    if h.n > limits.max_values as u64 {
        return Err(CodecError::TooLarge(format!(
            "{} values, limit {}",
            h.n, limits.max_values
        )));
    }
    if h.n != base.len() as u64 {
        return Err(CodecError::Length {
            expected: base.len(),
            got: h.n,
        });
    }
    let n = base.len();
    // `base` occupies 4n bytes of memory, so this cannot overflow.
    let body_len = 4 * n;
    if h.body_len != body_len as u64 {
        return Err(CodecError::Malformed(format!(
            "delta body of {} bytes for {n} values, expected {body_len}",
            h.body_len
        )));
    }
    let body = zstd_ctx::checked_body(&bytes[XOR_HEADER_LEN..], h.zstd, body_len, &h.checksum)?;
    let mut out = Vec::new();
    out.try_reserve_exact(n)
        .map_err(|_| CodecError::TooLarge(format!("cannot allocate {n} values")))?;
    join_planes(base, &body, &mut out);
    if let Some(index) = first_non_finite(&out) {
        return Err(CodecError::NonFiniteOutput { index });
    }
    Ok(out)
}
