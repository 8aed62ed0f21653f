//! Update codecs for slow links.
//!
//! Volunteer workers send gradients and pseudo-gradients over home links, so an update is
//! quantized by one of several codecs ([`CodecKind`]) and, optionally, zstd-compressed. The
//! result is self-describing: [`decode`] needs no configuration, only [`DecodeLimits`].
//!
//! # Format (version 1)
//!
//! An encoded update is a 36-byte header followed by the body, zstd-compressed when the
//! header's flag says so. All integers are little-endian.
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..4 | magic `DTC1` |
//! | 4 | format version, `1` (anything else: [`CodecError::UnsupportedVersion`]) |
//! | 5 | codec id: 0 fp32, 1 fp16, 2 bf16, 3 int8, 4 int4, 5 sign1, 6 topk |
//! | 6 | flags: bit 0 zstd, bit 1 stochastic rounding, bits 2-3 top-k value kind (0 fp32, 1 fp16, 2 int8); bits 4-7 zero |
//! | 7 | reserved, zero |
//! | 8..12 | block size, u32, in 8..=65536 |
//! | 12..20 | number of values `n`, u64 |
//! | 20..28 | body length before zstd, u64 |
//! | 28..36 | first 8 bytes of blake3 over the raw (uncompressed) body |
//!
//! Bodies, with `nb = ceil(n / block_size)` blocks:
//!
//! * **fp32**: `n` f32.
//! * **fp16**: `n` IEEE half floats (u16). Values beyond ±65504 are *clamped* to ±65504
//!   rather than refused, so a large but finite update still goes through.
//! * **bf16**: `n` bfloat16 (u16), round to nearest even; values that would round past the
//!   largest bf16 are clamped to it.
//! * **int8**: `nb` f32 scales `absmax/127`, then `n` i8 `q = round(x/scale)` (ties to even;
//!   with stochastic rounding `floor(x/scale + u)`, `u ~ U[0,1)` from ChaCha8 seeded by the
//!   encoder's seed). An all-zero block has scale 0. Decodes to `q * scale`.
//! * **int4**: `nb` f32 scales `absmax/7`, then `q` in -7..=7 as 4-bit two's complement,
//!   two per byte, the earlier value in the low nibble (a final odd nibble is 0).
//! * **sign1**: `nb` f32 scales `mean(|x|)` of the block, then one bit per value (1 =
//!   negative), eight per byte, the earlier value in the low bit. Decodes to `±scale`.
//! * **topk**: `k` as u64, then the `k` kept indices ascending, delta-coded as LEB128 varints
//!   (each the gap from the previous index + 1, the first from 0), then the `k` values as fp32,
//!   fp16 (clamped like the fp16 codec) or int8 (as the int8 body over the kept values, with
//!   the same block size). `k = max(1, ceil(fraction * n))` for `n > 0` (the fraction is first
//!   rounded to 6 decimals so that `0.05` is not read as `0.0500000007`); the kept entries are
//!   the `k` largest `|x|`, ties going to the lower index.
//!
//! # Hostile input
//!
//! [`decode`] treats its input as untrusted: every length is checked against the header and
//! the [`DecodeLimits`] before anything is allocated, zstd output is bounded by the announced
//! body length (itself bounded by the codec and `n`), the checksum is verified, and a
//! non-finite result is refused. It never panics.
//!
//! [`ErrorFeedback`] (EF-SGD) keeps what a lossy codec did not send and adds it to the next
//! update.
//!
//! # Parameter deltas
//!
//! [`xor_delta`] sends new parameters to a worker that holds the previous ones, losslessly:
//! the XOR of the f32 bit patterns, split into byte planes and zstd-compressed
//! ([`encode_xor_delta`], [`apply_xor_delta`]). It has its own `DTX1` format, documented
//! there.

pub mod adaptive;
mod codecs;
mod error;
mod feedback;
mod header;
pub mod xor_delta;
mod zstd_ctx;

use serde::{Deserialize, Serialize};

pub use adaptive::ZstdPolicy;
pub use error::CodecError;
pub use feedback::ErrorFeedback;
pub use header::{Header, FORMAT_VERSION, HEADER_LEN, MAGIC};
pub use xor_delta::{
    apply_xor_delta, compress_xor_delta, encode_xor_delta, XOR_FORMAT_VERSION, XOR_HEADER_LEN,
    XOR_MAGIC,
};

/// Which codec; serde names are lowercase (`"fp32"`, `"int8"`, `"topk"`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CodecKind {
    /// Raw 32-bit floats (lossless).
    #[default]
    Fp32,
    /// IEEE half precision; values beyond ±65504 are clamped to ±65504.
    Fp16,
    /// bfloat16, round to nearest even.
    Bf16,
    /// Blockwise 8-bit integers (-127..=127) with an absmax scale per block.
    Int8,
    /// Blockwise 4-bit integers (-7..=7) with an absmax scale per block.
    Int4,
    /// One sign bit per value with a mean-magnitude scale per block.
    Sign1,
    /// The largest-magnitude fraction of the values; the rest decode as zero.
    TopK,
}

impl CodecKind {
    /// Every codec, in id order.
    pub const ALL: [CodecKind; 7] = [
        CodecKind::Fp32,
        CodecKind::Fp16,
        CodecKind::Bf16,
        CodecKind::Int8,
        CodecKind::Int4,
        CodecKind::Sign1,
        CodecKind::TopK,
    ];

    /// The id written in the header.
    pub fn id(self) -> u8 {
        self as u8
    }

    /// The codec with header id `id`.
    pub fn from_id(id: u8) -> Option<Self> {
        Self::ALL.get(usize::from(id)).copied()
    }

    /// Whether decoding gives back exactly what was encoded.
    pub fn is_lossless(self) -> bool {
        self == CodecKind::Fp32
    }
}

/// How top-k values are stored; serde names `"fp32"`, `"fp16"`, `"int8"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TopKValues {
    /// 32-bit floats.
    Fp32,
    /// Half precision (clamped to ±65504).
    Fp16,
    /// Blockwise int8 over the kept values.
    #[default]
    Int8,
}

impl TopKValues {
    fn id(self) -> u8 {
        self as u8
    }

    fn from_id(id: u8) -> Option<Self> {
        [TopKValues::Fp32, TopKValues::Fp16, TopKValues::Int8]
            .get(usize::from(id))
            .copied()
    }
}

/// Codec settings: the `[compression]` table of a run config (every field has a default),
/// also sent to workers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CodecConfig {
    /// Codec (default fp32).
    pub codec: CodecKind,
    /// Values per scale block for int8, int4, sign1 and int8 top-k values (default 256,
    /// allowed 8..=65536).
    pub block_size: u32,
    /// Fraction of the values kept by top-k (default 0.01, allowed (0, 1]).
    pub topk_fraction: f32,
    /// Storage of top-k values (default int8).
    pub topk_values: TopKValues,
    /// zstd level (default 1); 0 turns zstd off. Allowed 0..=19. Payloads say whether they
    /// are compressed.
    pub zstd_level: i32,
    /// Use zstd only on links slow enough for it to pay (default true, see [`ZstdPolicy`]);
    /// false compresses every payload, so that byte counts do not depend on how fast the
    /// link is (the `experiments sweep` tables).
    pub zstd_adaptive: bool,
    /// Unbiased stochastic rounding for int8, int4 and int8 top-k values (default off).
    pub stochastic_rounding: bool,
    /// Keep what a lossy codec did not send and add it to the next update (error feedback,
    /// default on; meaningless for fp32).
    pub error_feedback: bool,
}

impl Default for CodecConfig {
    fn default() -> Self {
        CodecConfig {
            codec: CodecKind::Fp32,
            block_size: 256,
            topk_fraction: 0.01,
            topk_values: TopKValues::Int8,
            zstd_level: 1,
            zstd_adaptive: true,
            stochastic_rounding: false,
            error_feedback: true,
        }
    }
}

/// Smallest allowed block size.
pub const MIN_BLOCK_SIZE: u32 = 8;
/// Largest allowed block size.
pub const MAX_BLOCK_SIZE: u32 = 65_536;
/// Largest allowed zstd level.
pub const MAX_ZSTD_LEVEL: i32 = 19;

impl CodecConfig {
    /// Lossless: fp32 with zstd level 1.
    pub fn lossless() -> Self {
        CodecConfig::default()
    }

    /// Checks that every setting is in range: `block_size` in 8..=65536, `topk_fraction` in
    /// (0, 1], `zstd_level` in 0..=19.
    pub fn validate(&self) -> Result<(), CodecError> {
        if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&self.block_size) {
            return Err(CodecError::Config(format!(
                "block_size {} not in {MIN_BLOCK_SIZE}..={MAX_BLOCK_SIZE}",
                self.block_size
            )));
        }
        if !(self.topk_fraction > 0.0 && self.topk_fraction <= 1.0) {
            return Err(CodecError::Config(format!(
                "topk_fraction {} not in (0, 1]",
                self.topk_fraction
            )));
        }
        if !(0..=MAX_ZSTD_LEVEL).contains(&self.zstd_level) {
            return Err(CodecError::Config(format!(
                "zstd_level {} not in 0..={MAX_ZSTD_LEVEL}",
                self.zstd_level
            )));
        }
        Ok(())
    }

    /// Number of entries top-k keeps out of `n`: `max(1, ceil(fraction * n))` for `n > 0`,
    /// with the fraction first rounded to 6 decimals (so an f32 `0.05` means 0.05).
    pub fn topk_k(&self, n: usize) -> usize {
        codecs::topk::k_for(n, self.topk_fraction)
    }
}

/// Limits applied when decoding untrusted bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Most values a payload may announce (default 2^28).
    pub max_values: usize,
    /// Most bytes of encoded input accepted (default 2^30).
    pub max_encoded_bytes: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_values: 1 << 28,
            max_encoded_bytes: 1 << 30,
        }
    }
}

/// Encodes `values` with `cfg`. Every value must be finite. `seed` drives stochastic
/// rounding: the same input, config and seed always give the same bytes.
pub fn encode(values: &[f32], cfg: &CodecConfig, seed: u64) -> Result<Vec<u8>, CodecError> {
    encode_parts(values, cfg, seed, false).map(|(bytes, _)| bytes)
}

/// Encodes, and when `want_decoded` also decodes the raw body (skipping zstd and the
/// checksum, which cannot fail on our own output) to give what the receiver will see.
fn encode_parts(
    values: &[f32],
    cfg: &CodecConfig,
    seed: u64,
    want_decoded: bool,
) -> Result<(Vec<u8>, Option<Vec<f32>>), CodecError> {
    cfg.validate()?;
    if let Some(index) = codecs::first_non_finite(values) {
        return Err(CodecError::NonFiniteInput { index });
    }
    let mut buf = Vec::with_capacity(HEADER_LEN + codecs::body_len_hint(values.len(), cfg));
    buf.resize(HEADER_LEN, 0);
    codecs::encode_body(values, cfg, seed, &mut buf)?;
    let body = &buf[HEADER_LEN..];
    let header = Header {
        version: FORMAT_VERSION,
        codec: cfg.codec,
        zstd: cfg.zstd_level > 0,
        stochastic_rounding: cfg.stochastic_rounding,
        topk_values: cfg.topk_values,
        block_size: cfg.block_size,
        n: values.len() as u64,
        body_len: body.len() as u64,
        checksum: header::checksum(body),
    };
    let decoded = if want_decoded {
        let out = codecs::decode_body(&header, body, values.len())?;
        if let Some(index) = codecs::first_non_finite(&out) {
            return Err(CodecError::NonFiniteOutput { index });
        }
        Some(out)
    } else {
        None
    };
    if header.zstd {
        Ok((
            zstd_ctx::framed(&header.to_bytes(), body, cfg.zstd_level)?,
            decoded,
        ))
    } else {
        buf[..HEADER_LEN].copy_from_slice(&header.to_bytes());
        Ok((buf, decoded))
    }
}

/// The most bytes [`encode`] gives for `n` values under `cfg` with zstd off, header
/// included: what a payload sent raw ([`ZstdPolicy`]) needs a receiver's frame limit to
/// allow. `None` if that overflows `usize`.
pub fn max_raw_len(n: usize, cfg: &CodecConfig) -> Option<usize> {
    let (_, max) = codecs::body_len_range(cfg.codec, n, cfg.block_size as usize)?;
    max.checked_add(HEADER_LEN)
}

/// zstd-compresses the body of a payload that [`encode`] made with `zstd_level` 0, at
/// `level` (1..=19): the result is exactly what `encode` gives with `zstd_level = level`, so
/// a sender can encode once and then choose, by the link, whether to compress
/// ([`ZstdPolicy`]). Errors: [`CodecError::Config`] for a level out of range or a payload
/// already compressed, [`CodecError::Malformed`] when the body is not as long as the header
/// says (this is the sender's own payload, not untrusted input).
pub fn compress_payload(payload: &[u8], level: i32) -> Result<Vec<u8>, CodecError> {
    let mut header = Header::parse(payload)?;
    let raw = zstd_ctx::raw_body(payload, HEADER_LEN, header.zstd, header.body_len)?;
    header.zstd = true;
    zstd_ctx::framed(&header.to_bytes(), raw, level)
}

/// Reads only the header (codec, version, number of values, block size, ...) without
/// decoding or checking the body.
pub fn peek_header(bytes: &[u8]) -> Result<Header, CodecError> {
    Header::parse(bytes)
}

/// Decodes a payload made by [`encode`]. Hostile input gives an error, never a panic, and
/// never makes this allocate beyond what `limits` allow. The result is all finite.
pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<Vec<f32>, CodecError> {
    if bytes.len() > limits.max_encoded_bytes {
        return Err(CodecError::TooLarge(format!(
            "{} encoded bytes, limit {}",
            bytes.len(),
            limits.max_encoded_bytes
        )));
    }
    let h = Header::parse(bytes)?;
    decode_with_header(&h, &bytes[HEADER_LEN..], limits)
}

fn decode_with_header(
    h: &Header,
    rest: &[u8],
    limits: &DecodeLimits,
) -> Result<Vec<f32>, CodecError> {
    let n = match usize::try_from(h.n) {
        Ok(n) if n <= limits.max_values => n,
        _ => {
            return Err(CodecError::TooLarge(format!(
                "{} values, limit {}",
                h.n, limits.max_values
            )))
        }
    };
    let (min_body, max_body) = codecs::body_len_range(h.codec, n, h.block_size as usize)
        .ok_or_else(|| CodecError::TooLarge(format!("{n} values overflow the body size")))?;
    if h.body_len < min_body as u64 || h.body_len > max_body as u64 {
        return Err(CodecError::Malformed(format!(
            "{:?} body of {} bytes for {n} values, expected {min_body}..={max_body}",
            h.codec, h.body_len
        )));
    }
    // body_len <= max_body, which fits in usize.
    let body = zstd_ctx::checked_body(rest, h.zstd, h.body_len as usize, &h.checksum)?;
    let out = codecs::decode_body(h, &body, n)?;
    if let Some(index) = codecs::first_non_finite(&out) {
        return Err(CodecError::NonFiniteOutput { index });
    }
    Ok(out)
}

/// Decodes like [`decode`] and also checks that the payload holds exactly `expected_len`
/// values (checked from the header, before decoding).
pub fn decode_exact(
    bytes: &[u8],
    expected_len: usize,
    limits: &DecodeLimits,
) -> Result<Vec<f32>, CodecError> {
    let h = Header::parse(bytes)?;
    if h.n != expected_len as u64 {
        return Err(CodecError::Length {
            expected: expected_len,
            got: h.n,
        });
    }
    decode(bytes, limits)
}

#[cfg(test)]
mod tests;
