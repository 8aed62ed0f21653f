//! The fixed 36-byte payload header.

use crate::{CodecError, CodecKind, TopKValues, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};

/// Header length in bytes.
pub const HEADER_LEN: usize = 36;
/// The magic bytes every payload starts with.
pub const MAGIC: [u8; 4] = *b"DTC1";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u8 = 1;

const FLAG_ZSTD: u8 = 1;
const FLAG_STOCHASTIC: u8 = 2;
const TOPK_SHIFT: u8 = 2;
const KNOWN_FLAGS: u8 = 0b1111;

/// A parsed payload header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Format version (always [`FORMAT_VERSION`] once parsed).
    pub version: u8,
    /// Codec of the body.
    pub codec: CodecKind,
    /// Whether the body is zstd-compressed.
    pub zstd: bool,
    /// Whether the encoder used stochastic rounding (informative only).
    pub stochastic_rounding: bool,
    /// How top-k values are stored (meaningful for top-k only).
    pub topk_values: TopKValues,
    /// Values per scale block.
    pub block_size: u32,
    /// Number of values.
    pub n: u64,
    /// Body length before zstd.
    pub body_len: u64,
    /// First 8 bytes of blake3 over the raw body.
    pub checksum: [u8; 8],
}

/// First 8 bytes of blake3 over `body`.
pub(crate) fn checksum(body: &[u8]) -> [u8; 8] {
    let h = blake3::hash(body);
    let mut c = [0u8; 8];
    c.copy_from_slice(&h.as_bytes()[..8]);
    c
}

fn array<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[at..at + N]);
    a
}

impl Header {
    /// The header's 36 bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut flags = self.topk_values.id() << TOPK_SHIFT;
        if self.zstd {
            flags |= FLAG_ZSTD;
        }
        if self.stochastic_rounding {
            flags |= FLAG_STOCHASTIC;
        }
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4] = self.version;
        b[5] = self.codec.id();
        b[6] = flags;
        b[7] = 0;
        b[8..12].copy_from_slice(&self.block_size.to_le_bytes());
        b[12..20].copy_from_slice(&self.n.to_le_bytes());
        b[20..28].copy_from_slice(&self.body_len.to_le_bytes());
        b[28..36].copy_from_slice(&self.checksum);
        b
    }

    /// Parses and sanity-checks the header at the start of `b` (the body is not looked at).
    pub fn parse(b: &[u8]) -> Result<Self, CodecError> {
        if b.len() < HEADER_LEN {
            return Err(CodecError::Malformed(format!(
                "{} bytes, shorter than the {HEADER_LEN}-byte header",
                b.len()
            )));
        }
        if b[0..4] != MAGIC {
            return Err(CodecError::Malformed(
                "bad magic (not a DTC1 payload)".into(),
            ));
        }
        if b[4] != FORMAT_VERSION {
            return Err(CodecError::UnsupportedVersion(b[4]));
        }
        let codec = CodecKind::from_id(b[5])
            .ok_or_else(|| CodecError::Malformed(format!("unknown codec id {}", b[5])))?;
        let flags = b[6];
        let topk_values = TopKValues::from_id((flags & KNOWN_FLAGS) >> TOPK_SHIFT);
        let topk_values = match topk_values {
            Some(t) if flags & !KNOWN_FLAGS == 0 && b[7] == 0 => t,
            _ => {
                return Err(CodecError::Malformed(format!(
                    "unknown flags {flags:#04x} / reserved byte {}",
                    b[7]
                )))
            }
        };
        let block_size = u32::from_le_bytes(array(b, 8));
        if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
            return Err(CodecError::Malformed(format!(
                "block size {block_size} not in {MIN_BLOCK_SIZE}..={MAX_BLOCK_SIZE}"
            )));
        }
        Ok(Header {
            version: b[4],
            codec,
            zstd: flags & FLAG_ZSTD != 0,
            stochastic_rounding: flags & FLAG_STOCHASTIC != 0,
            topk_values,
            block_size,
            n: u64::from_le_bytes(array(b, 12)),
            body_len: u64::from_le_bytes(array(b, 20)),
            checksum: array(b, 28),
        })
    }
}
