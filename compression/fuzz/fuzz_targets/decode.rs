//! Decoding arbitrary bytes must never panic, and whatever decodes must be finite.
#![no_main]

use compression::{decode, DecodeLimits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = DecodeLimits {
        max_values: 1 << 20,
        max_encoded_bytes: 1 << 22,
    };
    if let Ok(v) = decode(data, &limits) {
        assert!(v.iter().all(|x| x.is_finite()));
    }
});
