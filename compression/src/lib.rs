//! Update codecs for slow links.
//!
//! An encoded update is a 36-byte self-describing header followed by a body, optionally
//! zstd-compressed:
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..4 | magic `DTC1` |
//! | 4 | format version (1) |
//! | 5 | codec id ([`CodecKind`]) |
//! | 6 | flags: bit 0 zstd, bit 1 stochastic rounding, bits 2-3 top-k value kind |
//! | 7 | reserved (0) |
//! | 8..12 | block size, u32 LE |
//! | 12..20 | number of values n, u64 LE |
//! | 20..28 | raw body length (before zstd), u64 LE |
//! | 28..36 | first 8 bytes of blake3 over the raw body |
//!
//! Bodies: fp32 (4n bytes), fp16/bf16 (2n), int8 (one f32 absmax/127 scale per block, then
//! one i8 per value), int4 (scale absmax/7 per block, two values per byte), sign1 (scale
//! mean|x| per block, one bit per value), top-k (k as u64, the kept indices ascending and
//! delta-coded as LEB128 varints, then the values as fp32, fp16 or blockwise int8).
//!
//! Decoding treats its input as hostile: every length is checked against the header and the
//! [`DecodeLimits`] before anything is allocated, zstd output is bounded, and non-finite
//! results are refused. [`ErrorFeedback`] keeps what a lossy codec did not send and adds it
//! to the next update.

mod codecs;
mod feedback;
mod header;

use serde::{Deserialize, Serialize};

pub use feedback::ErrorFeedback;
pub use header::{Header, HEADER_LEN};

/// Which codec.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CodecKind {
    /// Raw 32-bit floats (lossless).
    #[default]
    Fp32,
    /// IEEE half precision (values beyond ±65504 are clamped).
    Fp16,
    /// bfloat16 (round to nearest even).
    Bf16,
    /// Blockwise 8-bit integers with an absmax scale per block.
    Int8,
    /// Blockwise 4-bit integers (-7..=7) with an absmax scale per block.
    Int4,
    /// One sign bit per value with a mean-magnitude scale per block.
    Sign1,
    /// The largest-magnitude fraction of the values; the rest are zero.
    TopK,
}

impl CodecKind {
    fn id(self) -> u8 {
        self as u8
    }

    fn from_id(id: u8) -> Option<Self> {
        use CodecKind::*;
        [Fp32, Fp16, Bf16, Int8, Int4, Sign1, TopK]
            .get(id as usize)
            .copied()
    }
}

/// How top-k values are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TopKValues {
    /// 32-bit floats.
    Fp32,
    /// Half precision.
    Fp16,
    /// Blockwise int8.
    #[default]
    Int8,
}

/// Codec settings (the `[compression]` table of a run config; also sent to workers).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CodecConfig {
    /// Codec.
    pub codec: CodecKind,
    /// Values per scale block (int8, int4, sign1, top-k int8 values).
    pub block_size: u32,
    /// Fraction of values kept by top-k.
    pub topk_fraction: f32,
    /// Storage of top-k values.
    pub topk_values: TopKValues,
    /// zstd level, 0 = no zstd.
    pub zstd_level: i32,
    /// Unbiased stochastic rounding for int8/int4.
    pub stochastic_rounding: bool,
}

impl Default for CodecConfig {
    fn default() -> Self {
        CodecConfig {
            codec: CodecKind::Fp32,
            block_size: 256,
            topk_fraction: 0.01,
            topk_values: TopKValues::Int8,
            zstd_level: 1,
            stochastic_rounding: false,
        }
    }
}

impl CodecConfig {
    /// Checks ranges.
    pub fn validate(&self) -> Result<(), CodecError> {
        if !(8..=65_536).contains(&self.block_size) {
            return Err(CodecError::Config(format!(
                "block_size {} not in 8..=65536",
                self.block_size
            )));
        }
        if !(self.topk_fraction > 0.0 && self.topk_fraction <= 1.0) {
            return Err(CodecError::Config(format!(
                "topk_fraction {} not in (0, 1]",
                self.topk_fraction
            )));
        }
        if !(0..=19).contains(&self.zstd_level) {
            return Err(CodecError::Config(format!(
                "zstd_level {} not in 0..=19",
                self.zstd_level
            )));
        }
        Ok(())
    }
}

/// Limits applied when decoding untrusted bytes.
#[derive(Clone, Copy, Debug)]
pub struct DecodeLimits {
    /// Most values a payload may announce.
    pub max_values: usize,
    /// Most bytes of input accepted.
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

/// Codec errors.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CodecError {
    /// A setting is out of range.
    #[error("codec config: {0}")]
    Config(String),
    /// The input to encode holds NaN or infinity.
    #[error("input value {index} is not finite")]
    NonFiniteInput {
        /// First offending position.
        index: usize,
    },
    /// The payload is malformed.
    #[error("malformed payload: {0}")]
    Malformed(String),
    /// The payload's format version is unknown.
    #[error("unsupported payload format version {0}")]
    UnsupportedVersion(u8),
    /// The payload exceeds the decode limits.
    #[error("payload too large: {0}")]
    TooLarge(String),
    /// The body does not match its checksum.
    #[error("payload checksum mismatch")]
    Checksum,
    /// Decoding produced NaN or infinity.
    #[error("payload decodes to a non-finite value at {index}")]
    NonFiniteOutput {
        /// First offending position.
        index: usize,
    },
    /// The payload holds another number of values than expected.
    #[error("payload has {got} values, expected {expected}")]
    Length {
        /// Expected count.
        expected: usize,
        /// Count in the payload.
        got: usize,
    },
    /// zstd failed.
    #[error("zstd: {0}")]
    Zstd(String),
}

fn malformed<T>(m: impl Into<String>) -> Result<T, CodecError> {
    Err(CodecError::Malformed(m.into()))
}

/// Encodes `values` with `cfg`; `seed` drives stochastic rounding.
pub fn encode(values: &[f32], cfg: &CodecConfig, seed: u64) -> Result<Vec<u8>, CodecError> {
    cfg.validate()?;
    if let Some(index) = values.iter().position(|v| !v.is_finite()) {
        return Err(CodecError::NonFiniteInput { index });
    }
    let body = codecs::encode_body(values, cfg, seed);
    let mut flags = 0u8;
    if cfg.zstd_level > 0 {
        flags |= 1;
    }
    if cfg.stochastic_rounding {
        flags |= 2;
    }
    flags |= (cfg.topk_values as u8) << 2;
    let header = Header {
        codec: cfg.codec,
        flags,
        block_size: cfg.block_size,
        n: values.len() as u64,
        body_len: body.len() as u64,
        checksum: header::checksum(&body),
    };
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    header.write(&mut out);
    if cfg.zstd_level > 0 {
        let z = zstd::bulk::compress(&body, cfg.zstd_level)
            .map_err(|e| CodecError::Zstd(e.to_string()))?;
        out.extend_from_slice(&z);
    } else {
        out.extend_from_slice(&body);
    }
    Ok(out)
}

/// Reads the header only.
pub fn peek_header(bytes: &[u8]) -> Result<Header, CodecError> {
    Header::read(bytes)
}

/// Decodes a payload made by [`encode`].
pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<Vec<f32>, CodecError> {
    if bytes.len() > limits.max_encoded_bytes {
        return Err(CodecError::TooLarge(format!("{} bytes", bytes.len())));
    }
    let h = Header::read(bytes)?;
    if h.n > limits.max_values as u64 {
        return Err(CodecError::TooLarge(format!(
            "{} values, limit {}",
            h.n, limits.max_values
        )));
    }
    let n = h.n as usize;
    let max_body =
        codecs::max_body_len(&h).ok_or_else(|| CodecError::Malformed("bad header".into()))?;
    if h.body_len > max_body as u64 {
        return malformed(format!(
            "body of {} bytes, at most {max_body} possible",
            h.body_len
        ));
    }
    let rest = &bytes[HEADER_LEN..];
    let owned;
    let body: &[u8] = if h.flags & 1 != 0 {
        owned = zstd::bulk::decompress(rest, h.body_len as usize)
            .map_err(|e| CodecError::Zstd(e.to_string()))?;
        &owned
    } else {
        rest
    };
    if body.len() as u64 != h.body_len {
        return malformed(format!(
            "body is {} bytes, header says {}",
            body.len(),
            h.body_len
        ));
    }
    if header::checksum(body) != h.checksum {
        return Err(CodecError::Checksum);
    }
    let out = codecs::decode_body(&h, body, n)?;
    if let Some(index) = out.iter().position(|v| !v.is_finite()) {
        return Err(CodecError::NonFiniteOutput { index });
    }
    Ok(out)
}

/// Decodes and checks the number of values.
pub fn decode_exact(
    bytes: &[u8],
    expected_len: usize,
    limits: &DecodeLimits,
) -> Result<Vec<f32>, CodecError> {
    let h = Header::read(bytes)?;
    if h.n != expected_len as u64 {
        return Err(CodecError::Length {
            expected: expected_len,
            got: h.n.min(usize::MAX as u64) as usize,
        });
    }
    decode(bytes, limits)
}
#[cfg(test)]
mod tests;
