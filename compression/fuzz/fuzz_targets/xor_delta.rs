//! Applying arbitrary bytes as an XOR delta must never panic; whatever applies must be
//! finite and as long as the base, and re-encoding base -> result must apply to the same
//! bits (both ways).
#![no_main]

use compression::{apply_xor_delta, encode_xor_delta, DecodeLimits};
use libfuzzer_sys::fuzz_target;

/// A trusted base of `n` values with the awkward ones mixed in (zeros of both signs,
/// subnormals, extremes).
fn base(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| match i % 8 {
            0 => 0.0,
            1 => -0.0,
            2 => f32::from_bits(1 + i as u32),
            3 => f32::MAX,
            4 => -f32::MIN_POSITIVE,
            _ => (i as f32 * 0.37).sin() * 0.02,
        })
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the base length (0..=64); the rest is the delta.
    let Some((&first, bytes)) = data.split_first() else {
        return;
    };
    let base = base(usize::from(first % 65));
    let limits = DecodeLimits {
        max_values: 1 << 20,
        max_encoded_bytes: 1 << 22,
    };
    if let Ok(v) = apply_xor_delta(&base, bytes, &limits) {
        assert_eq!(v.len(), base.len());
        assert!(v.iter().all(|x| x.is_finite()));
        for level in [0, 1] {
            let forward = encode_xor_delta(&base, &v, level).expect("result is finite");
            let again = apply_xor_delta(&base, &forward, &limits).expect("own delta applies");
            assert_eq!(bits(&again), bits(&v));
            let back = encode_xor_delta(&v, &base, level).expect("base is finite");
            let old = apply_xor_delta(&v, &back, &limits).expect("own delta applies");
            assert_eq!(bits(&old), bits(&base));
        }
    }
});
