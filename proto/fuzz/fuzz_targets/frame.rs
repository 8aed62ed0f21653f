//! Decoding an arbitrary frame body as either direction's message must never panic, and
//! whatever a worker could send must be safe to look at: a Merkle proof in a challenge reply
//! verifies or not (never panics, bounded work), a payload decodes or not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::frame::decode_body;
use proto::{Answer, DataReply, DataRequest, ToCoordinator, ToWorker};

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = decode_body::<ToCoordinator>(data, 1 << 20) {
        match msg {
            ToCoordinator::ChallengeReply {
                answer: Answer::Leaf { leaf, proof },
                ..
            } => {
                let _ = proof.verify(&[7; 32], &leaf);
            }
            ToCoordinator::Result(r) => {
                let key = verify::WorkerId(r.commitment.run_id);
                let _ = verify::verify_signature(&key, &r.commitment, &r.signature);
            }
            _ => {}
        }
    }
    let _ = decode_body::<ToWorker>(data, 1 << 20);
    let _ = decode_body::<DataRequest>(data, 1024);
    let _ = decode_body::<DataReply>(data, 1 << 16);
});
