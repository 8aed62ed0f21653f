//! Decoding hostile headers must not allocate what they announce: a counting global
//! allocator records the largest single allocation made while decoding.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use compression::{
    apply_xor_delta, decode, encode, encode_xor_delta, CodecConfig, CodecError, CodecKind,
    DecodeLimits, HEADER_LEN, XOR_HEADER_LEN,
};

struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);
/// Tests in this file run one at a time so the counter belongs to one of them.
static SERIAL: Mutex<()> = Mutex::new(());

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Largest single allocation made by `f`.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.store(0, Ordering::SeqCst);
    let r = f();
    (r, LARGEST.load(Ordering::SeqCst))
}

fn payload(codec: CodecKind, zstd: i32) -> Vec<u8> {
    let v: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
    let cfg = CodecConfig {
        codec,
        zstd_level: zstd,
        block_size: 64,
        ..Default::default()
    };
    encode(&v, &cfg, 0).expect("encode")
}

fn set_n(b: &mut [u8], n: u64) {
    b[12..20].copy_from_slice(&n.to_le_bytes());
}

fn set_body_len(b: &mut [u8], len: u64) {
    b[20..28].copy_from_slice(&len.to_le_bytes());
}

const SMALL: usize = 1 << 20;

#[test]
fn header_claiming_2_pow_40_values_allocates_nothing_big() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for codec in compression::CodecKind::ALL {
        for zstd in [0, 1] {
            let mut b = payload(codec, zstd);
            set_n(&mut b, 1 << 40);
            let (r, big) = largest_allocation(|| decode(&b, &DecodeLimits::default()));
            assert!(
                matches!(r, Err(CodecError::TooLarge(_))),
                "{codec:?}: {r:?}"
            );
            assert!(big < SMALL, "{codec:?}: allocated {big} bytes");
        }
    }
}

#[test]
fn zstd_body_larger_than_its_frame_is_refused_before_allocating() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // A header announcing 2^28 fp32 values (1 GiB body, within the default limits) in front
    // of a small zstd frame: the frame's content size disagrees, so nothing big is allocated.
    let mut b = payload(CodecKind::Fp32, 1);
    let n = 1u64 << 28;
    set_n(&mut b, n);
    set_body_len(&mut b, 4 * n);
    let (r, big) = largest_allocation(|| decode(&b, &DecodeLimits::default()));
    assert!(matches!(r, Err(CodecError::Malformed(_))), "{r:?}");
    assert!(big < SMALL, "allocated {big} bytes");
    // Same without zstd: the body is not there.
    let mut b = payload(CodecKind::Int8, 0);
    set_n(&mut b, n);
    set_body_len(&mut b, n + n.div_ceil(64) * 4);
    let (r, big) = largest_allocation(|| decode(&b, &DecodeLimits::default()));
    assert!(matches!(r, Err(CodecError::Malformed(_))), "{r:?}");
    assert!(big < SMALL, "allocated {big} bytes");
}

#[test]
fn honest_payload_allocates_about_its_size() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let b = payload(CodecKind::Int8, 1);
    assert!(b.len() > HEADER_LEN);
    let (r, big) = largest_allocation(|| decode(&b, &DecodeLimits::default()));
    assert_eq!(r.expect("decode").len(), 1000);
    assert!(big <= 4 * 1000 + 64, "allocated {big} bytes");
}

fn xor_delta_pair() -> (Vec<f32>, Vec<u8>) {
    let old: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
    let new: Vec<f32> = old.iter().map(|x| x * 1.001).collect();
    let bytes = encode_xor_delta(&old, &new, 1).expect("encode");
    (old, bytes)
}

#[test]
fn xor_delta_announcing_huge_sizes_allocates_nothing_big() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (base, good) = xor_delta_pair();
    let open = DecodeLimits {
        max_values: usize::MAX,
        max_encoded_bytes: usize::MAX,
    };
    // n and body length far beyond the base: refused from the header.
    let mut b = good.clone();
    b[8..16].copy_from_slice(&(1u64 << 28).to_le_bytes());
    b[16..24].copy_from_slice(&(1u64 << 30).to_le_bytes());
    for limits in [DecodeLimits::default(), open] {
        let (r, big) = largest_allocation(|| apply_xor_delta(&base, &b, &limits));
        assert!(matches!(r, Err(CodecError::Length { .. })), "{r:?}");
        assert!(big < SMALL, "allocated {big} bytes");
    }
    // A zstd frame announcing 1 GiB of content behind an honest header: a single-segment
    // frame header with a 4-byte content size, then an empty last raw block.
    let mut b = good[..XOR_HEADER_LEN].to_vec();
    b.extend_from_slice(&[0x28, 0xb5, 0x2f, 0xfd, 0xa0]);
    b.extend_from_slice(&(1u32 << 30).to_le_bytes());
    b.extend_from_slice(&[0x01, 0x00, 0x00]);
    assert!(matches!(
        zstd::zstd_safe::get_frame_content_size(&b[XOR_HEADER_LEN..]),
        Ok(Some(s)) if s == 1 << 30
    ));
    let (r, big) = largest_allocation(|| apply_xor_delta(&base, &b, &open));
    assert!(matches!(r, Err(CodecError::Malformed(_))), "{r:?}");
    assert!(big < SMALL, "allocated {big} bytes");
}

#[test]
fn honest_xor_delta_allocates_about_its_size() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (base, bytes) = xor_delta_pair();
    let (r, big) = largest_allocation(|| apply_xor_delta(&base, &bytes, &DecodeLimits::default()));
    assert_eq!(r.expect("apply").len(), 1000);
    assert!(big <= 4 * 1000 + 64, "allocated {big} bytes");
}
