//! Length-prefixed frames: a 4-byte big-endian length, then a bincode body.
//!
//! Every read is capped: a frame longer than the cap is refused before anything is
//! allocated, and the body is decoded with the same byte limit.

use bincode::Options;
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Magic bytes that open every stream, followed by the 4-byte protocol version.
pub const MAGIC: &[u8; 4] = b"DTRN";

/// Errors while reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream ended or failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The peer announced a frame larger than allowed.
    #[error("frame of {len} bytes exceeds the cap of {cap} bytes")]
    TooLarge {
        /// Announced length.
        len: u64,
        /// Allowed maximum.
        cap: u64,
    },
    /// The body is not a valid message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The stream does not start with the protocol magic.
    #[error("not a dtrain stream (bad magic)")]
    BadMagic,
}

fn codec(limit: u64) -> impl Options {
    bincode::DefaultOptions::new()
        .with_limit(limit)
        .with_little_endian()
        .with_varint_encoding()
        .reject_trailing_bytes()
}

/// Serializes `msg` into one frame and writes it; returns the number of bytes written.
pub async fn write_frame<W, T>(w: &mut W, msg: &T, cap: u64) -> Result<u64, FrameError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let body = codec(cap)
        .serialize(msg)
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = body.len() as u64;
    if len > cap || len > u64::from(u32::MAX) {
        return Err(FrameError::TooLarge { len, cap });
    }
    w.write_all(&(len as u32).to_be_bytes()).await?;
    w.write_all(&body).await?;
    Ok(len + 4)
}

/// Reads one frame of at most `cap` bytes and decodes it; returns the message and its size.
pub async fn read_frame<R, T>(r: &mut R, cap: u64) -> Result<(T, u64), FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u64::from(u32::from_be_bytes(len));
    if len > cap {
        return Err(FrameError::TooLarge { len, cap });
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body).await?;
    let msg = decode_body(&body, cap)?;
    Ok((msg, len + 4))
}

/// Decodes a frame body (without its length prefix).
pub fn decode_body<T: DeserializeOwned>(body: &[u8], cap: u64) -> Result<T, FrameError> {
    codec(cap)
        .deserialize(body)
        .map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Writes the stream preamble: magic and protocol version.
pub async fn write_preamble<W: AsyncWrite + Unpin>(
    w: &mut W,
    version: u32,
) -> Result<(), FrameError> {
    let mut buf = [0u8; 8];
    buf[..4].copy_from_slice(MAGIC);
    buf[4..].copy_from_slice(&version.to_be_bytes());
    w.write_all(&buf).await?;
    Ok(())
}

/// Reads the stream preamble and returns the peer's protocol version.
pub async fn read_preamble<R: AsyncRead + Unpin>(r: &mut R) -> Result<u32, FrameError> {
    let mut buf = [0u8; 8];
    r.read_exact(&mut buf).await?;
    if &buf[..4] != MAGIC {
        return Err(FrameError::BadMagic);
    }
    Ok(u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{ToCoordinator, ToWorker};

    #[tokio::test]
    async fn frame_round_trip_and_cap() {
        let msg = ToWorker::Shutdown {
            reason: "done".into(),
        };
        let mut buf = Vec::new();
        let n = write_frame(&mut buf, &msg, 1024).await.unwrap();
        assert_eq!(n as usize, buf.len());
        let (back, m): (ToWorker, u64) = read_frame(&mut buf.as_slice(), 1024).await.unwrap();
        assert_eq!(m, n);
        assert!(matches!(back, ToWorker::Shutdown { reason } if reason == "done"));
        // A cap smaller than the frame refuses it before reading the body.
        let err = read_frame::<_, ToWorker>(&mut buf.as_slice(), 2)
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }));
    }

    #[tokio::test]
    async fn oversized_announcement_is_refused_without_allocation() {
        let mut buf = Vec::new();
        buf.extend_from_slice(&u32::MAX.to_be_bytes());
        let err = read_frame::<_, ToCoordinator>(&mut buf.as_slice(), 1 << 20)
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len, .. } if len == u64::from(u32::MAX)));
    }

    #[tokio::test]
    async fn junk_and_truncation_are_errors() {
        let mut junk = Vec::new();
        junk.extend_from_slice(&5u32.to_be_bytes());
        junk.extend_from_slice(&[0xff; 5]);
        assert!(matches!(
            read_frame::<_, ToCoordinator>(&mut junk.as_slice(), 1024).await,
            Err(FrameError::Malformed(_))
        ));
        let mut short = Vec::new();
        short.extend_from_slice(&100u32.to_be_bytes());
        short.extend_from_slice(&[0u8; 10]);
        assert!(matches!(
            read_frame::<_, ToCoordinator>(&mut short.as_slice(), 1024).await,
            Err(FrameError::Io(_))
        ));
    }

    #[tokio::test]
    async fn preamble_checks_magic() {
        let mut buf = Vec::new();
        write_preamble(&mut buf, 7).await.unwrap();
        assert_eq!(read_preamble(&mut buf.as_slice()).await.unwrap(), 7);
        assert!(matches!(
            read_preamble(&mut &b"HTTP/1.1"[..]).await,
            Err(FrameError::BadMagic)
        ));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = decode_body::<ToCoordinator>(&body, 4096);
            let _ = decode_body::<ToWorker>(&body, 4096);
        }
    }
}
