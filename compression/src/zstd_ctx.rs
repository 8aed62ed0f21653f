//! zstd with per-thread reused contexts and bounded output.

use std::borrow::Cow;
use std::cell::RefCell;
use std::io::Cursor;

use zstd::bulk::{Compressor, Decompressor};

use crate::{CodecError, MAX_ZSTD_LEVEL};

/// Levels up to this reuse a cached per-thread compression context; higher levels have big
/// match tables, which are not worth keeping alive.
const CACHED_MAX_LEVEL: i32 = 3;

thread_local! {
    static CCTX: RefCell<Option<(i32, Compressor<'static>)>> = const { RefCell::new(None) };
    static DCTX: RefCell<Option<Decompressor<'static>>> = const { RefCell::new(None) };
}

fn zerr(e: std::io::Error) -> CodecError {
    CodecError::Zstd(e.to_string())
}

/// Most bytes zstd can produce for `len` input bytes.
pub(crate) fn compress_bound(len: usize) -> usize {
    zstd::zstd_safe::compress_bound(len)
}

/// `header` followed by `body` as one zstd frame at `level` (1..=19, else
/// [`CodecError::Config`]).
pub(crate) fn framed(header: &[u8], body: &[u8], level: i32) -> Result<Vec<u8>, CodecError> {
    if !(1..=MAX_ZSTD_LEVEL).contains(&level) {
        return Err(CodecError::Config(format!(
            "zstd_level {level} not in 1..={MAX_ZSTD_LEVEL}"
        )));
    }
    let mut out = Vec::with_capacity(header.len() + compress_bound(body.len()));
    out.extend_from_slice(header);
    compress_append(body, level, &mut out)?;
    Ok(out)
}

/// The body of one of our own uncompressed payloads (`header_len` header bytes, then
/// `body_len` bytes): [`CodecError::Config`] if the header says it is compressed already,
/// [`CodecError::Malformed`] if the body has another length.
pub(crate) fn raw_body(
    payload: &[u8],
    header_len: usize,
    zstd: bool,
    body_len: u64,
) -> Result<&[u8], CodecError> {
    if zstd {
        return Err(CodecError::Config(
            "the payload is compressed already".into(),
        ));
    }
    let body = payload.get(header_len..).unwrap_or_default();
    if body.len() as u64 != body_len {
        return Err(CodecError::Malformed(format!(
            "{} body bytes, the header says {body_len}",
            body.len()
        )));
    }
    Ok(body)
}

/// Compresses `src` as one zstd frame appended to `out`.
pub(crate) fn compress_append(src: &[u8], level: i32, out: &mut Vec<u8>) -> Result<(), CodecError> {
    out.reserve(compress_bound(src.len()));
    let start = out.len() as u64;
    let run = |c: &mut Compressor<'static>, out: &mut Vec<u8>| {
        let mut cursor = Cursor::new(out);
        cursor.set_position(start);
        c.compress_to_buffer(src, &mut cursor).map_err(zerr)
    };
    if level > CACHED_MAX_LEVEL {
        let mut c = Compressor::new(level).map_err(zerr)?;
        run(&mut c, out)?;
        return Ok(());
    }
    CCTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        let c = match slot.as_mut() {
            Some((l, c)) => {
                if *l != level {
                    c.set_compression_level(level).map_err(zerr)?;
                    *l = level;
                }
                c
            }
            None => {
                &mut slot
                    .insert((level, Compressor::new(level).map_err(zerr)?))
                    .1
            }
        };
        run(c, out).map(|_| ())
    })
}

/// Decompresses `src`, which must hold exactly `len` bytes of content; never allocates more
/// than `len` bytes for the output.
pub(crate) fn decompress_exact(src: &[u8], len: usize) -> Result<Vec<u8>, CodecError> {
    // The frame must announce the content size the header gives (our encoder always writes
    // it), so a frame that cannot fill the buffer is refused before the buffer exists.
    match zstd::zstd_safe::get_frame_content_size(src) {
        Ok(Some(size)) if size == len as u64 => {}
        Ok(Some(size)) => {
            return Err(CodecError::Malformed(format!(
                "zstd frame holds {size} bytes, header says {len}"
            )))
        }
        Ok(None) => {
            return Err(CodecError::Malformed(
                "zstd frame does not announce its content size".into(),
            ))
        }
        Err(_) => return Err(CodecError::Malformed("body is not a zstd frame".into())),
    }
    let mut out = Vec::new();
    out.try_reserve_exact(len)
        .map_err(|_| CodecError::TooLarge(format!("cannot allocate a {len}-byte body")))?;
    DCTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        let d = match slot.as_mut() {
            Some(d) => d,
            None => slot.insert(Decompressor::new().map_err(zerr)?),
        };
        d.decompress_to_buffer(src, &mut out).map_err(zerr)
    })?;
    if out.len() != len {
        return Err(CodecError::Malformed(format!(
            "zstd body decompresses to {} bytes, header says {len}",
            out.len()
        )));
    }
    Ok(out)
}

/// The raw body of a payload from what follows its header: decompressed to exactly `len`
/// bytes when `zstd`, else exactly `len` bytes as they are; then checked against `checksum`
/// (the first 8 bytes of its blake3).
pub(crate) fn checked_body<'a>(
    rest: &'a [u8],
    zstd: bool,
    len: usize,
    checksum: &[u8; 8],
) -> Result<Cow<'a, [u8]>, CodecError> {
    let body = if zstd {
        Cow::Owned(decompress_exact(rest, len)?)
    } else if rest.len() == len {
        Cow::Borrowed(rest)
    } else {
        return Err(CodecError::Malformed(format!(
            "body is {} bytes, header says {len}",
            rest.len()
        )));
    };
    if &crate::header::checksum(&body) != checksum {
        return Err(CodecError::Checksum);
    }
    Ok(body)
}
