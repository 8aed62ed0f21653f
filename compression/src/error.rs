//! The error type.

/// Why encoding or decoding failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    /// A [`CodecConfig`](crate::CodecConfig) setting is out of range.
    #[error("invalid codec config: {0}")]
    Config(String),
    /// The input to encode holds NaN or infinity.
    #[error("cannot encode: input value at index {index} is NaN or infinite")]
    NonFiniteInput {
        /// First offending position.
        index: usize,
    },
    /// The payload is malformed (bad magic, codec, flags, lengths, indices...).
    #[error("malformed payload: {0}")]
    Malformed(String),
    /// The payload's format version is not one this build reads.
    #[error("unsupported payload format version {0} (this build reads version 1)")]
    UnsupportedVersion(u8),
    /// The payload, or the input to encode, exceeds a size limit.
    #[error("too large: {0}")]
    TooLarge(String),
    /// The body does not match the checksum in the header.
    #[error("payload checksum mismatch (corrupted body)")]
    Checksum,
    /// Decoding produced NaN or infinity.
    #[error("payload decodes to a NaN or infinite value at index {index}")]
    NonFiniteOutput {
        /// First offending position.
        index: usize,
    },
    /// The payload holds another number of values than expected.
    #[error("payload has {got} values, expected {expected}")]
    Length {
        /// Expected count.
        expected: usize,
        /// Count announced by the payload.
        got: u64,
    },
    /// zstd failed to compress or decompress.
    #[error("zstd: {0}")]
    Zstd(String),
}
