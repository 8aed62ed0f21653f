//! Decoding arbitrary bytes must never panic, and whatever decodes must be finite and as
//! long as its header says.
#![no_main]

use compression::{decode, decode_exact, peek_header, DecodeLimits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = DecodeLimits {
        max_values: 1 << 20,
        max_encoded_bytes: 1 << 22,
    };
    if let Ok(v) = decode(data, &limits) {
        assert!(v.iter().all(|x| x.is_finite()));
        let h = peek_header(data).expect("decoded payloads have a header");
        assert_eq!(h.n, v.len() as u64);
        assert_eq!(decode_exact(data, v.len(), &limits).ok(), Some(v));
    }
});
