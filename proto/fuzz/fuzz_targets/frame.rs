//! Decoding an arbitrary frame body as either direction's message must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::frame::decode_body;
use proto::{ToCoordinator, ToWorker};

fuzz_target!(|data: &[u8]| {
    let _ = decode_body::<ToCoordinator>(data, 1 << 20);
    let _ = decode_body::<ToWorker>(data, 1 << 20);
});
