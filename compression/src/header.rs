//! The fixed 36-byte payload header.

use crate::{CodecError, CodecKind};

/// Header length in bytes.
pub const HEADER_LEN: usize = 36;
const MAGIC: &[u8; 4] = b"DTC1";
const VERSION: u8 = 1;

/// A decoded header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Codec of the body.
    pub codec: CodecKind,
    /// Flags: bit 0 zstd, bit 1 stochastic rounding, bits 2-3 top-k value kind.
    pub flags: u8,
    /// Values per scale block.
    pub block_size: u32,
    /// Number of values.
    pub n: u64,
    /// Body length before zstd.
    pub body_len: u64,
    /// First 8 bytes of blake3 of the raw body.
    pub checksum: [u8; 8],
}

/// First 8 bytes of blake3 of `body`.
pub fn checksum(body: &[u8]) -> [u8; 8] {
    let h = blake3::hash(body);
    let mut c = [0u8; 8];
    c.copy_from_slice(&h.as_bytes()[..8]);
    c
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

impl Header {
    /// Appends the header to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.push(self.codec.id());
        out.push(self.flags);
        out.push(0);
        out.extend_from_slice(&self.block_size.to_le_bytes());
        out.extend_from_slice(&self.n.to_le_bytes());
        out.extend_from_slice(&self.body_len.to_le_bytes());
        out.extend_from_slice(&self.checksum);
    }

    /// Parses and sanity-checks a header.
    pub fn read(b: &[u8]) -> Result<Self, CodecError> {
        if b.len() < HEADER_LEN {
            return Err(CodecError::Malformed(format!(
                "{} bytes, shorter than the header",
                b.len()
            )));
        }
        if &b[..4] != MAGIC {
            return Err(CodecError::Malformed("bad magic".into()));
        }
        if b[4] != VERSION {
            return Err(CodecError::UnsupportedVersion(b[4]));
        }
        let codec = CodecKind::from_id(b[5])
            .ok_or_else(|| CodecError::Malformed(format!("unknown codec {}", b[5])))?;
        let flags = b[6];
        if flags & !0b1111 != 0 || (flags >> 2) > 2 || b[7] != 0 {
            return Err(CodecError::Malformed("unknown flags".into()));
        }
        let block_size = u32_at(b, 8);
        if !(8..=65_536).contains(&block_size) {
            return Err(CodecError::Malformed(format!("block size {block_size}")));
        }
        let mut checksum = [0u8; 8];
        checksum.copy_from_slice(&b[28..36]);
        Ok(Header {
            codec,
            flags,
            block_size,
            n: u64_at(b, 12),
            body_len: u64_at(b, 20),
            checksum,
        })
    }
}
