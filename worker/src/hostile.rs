//! TEST ONLY: workers that break the protocol, for the hostile-input tests. Each mode turns
//! an honest result into something malformed, mis-signed, misaddressed or replayed, or into
//! raw junk on the stream. The coordinator must refuse each with a clear reason and go on.

use std::str::FromStr;

use compression::{CodecConfig, CodecKind, Header, FORMAT_VERSION, HEADER_LEN};
use proto::{TaskResult, ToCoordinator};
use serde_bytes::ByteBuf;
use verify::WorkerKey;

use crate::Send;

/// How a hostile worker misbehaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hostile {
    /// A correctly signed update holding a NaN.
    Nan,
    /// A correctly signed update with one value too few.
    WrongShape,
    /// The update bytes cut in half (and signed that way).
    Truncated,
    /// Every result sent twice, and the previous one again.
    Replay,
    /// A result for a task that was never assigned.
    UnknownTask,
    /// A signature that does not verify.
    BadSignature,
    /// A frame whose body is random bytes.
    JunkFrame,
    /// A frame announcing 4 GiB.
    Oversized,
    /// After every honest result, a data request for a file outside the run.
    BadDataRequest,
}

impl Hostile {
    /// Every mode.
    pub const ALL: [Hostile; 9] = [
        Hostile::Nan,
        Hostile::WrongShape,
        Hostile::Truncated,
        Hostile::Replay,
        Hostile::UnknownTask,
        Hostile::BadSignature,
        Hostile::JunkFrame,
        Hostile::Oversized,
        Hostile::BadDataRequest,
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Hostile::Nan => "nan",
            Hostile::WrongShape => "wrong-shape",
            Hostile::Truncated => "truncated",
            Hostile::Replay => "replay",
            Hostile::UnknownTask => "unknown-task",
            Hostile::BadSignature => "bad-signature",
            Hostile::JunkFrame => "junk-frame",
            Hostile::Oversized => "oversized",
            Hostile::BadDataRequest => "bad-data-request",
        }
    }
}

impl FromStr for Hostile {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Hostile::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Hostile::ALL.iter().map(|m| m.name()).collect();
                format!("unknown hostile mode {s:?}; one of {}", names.join(", "))
            })
    }
}

/// An fp32 payload of `values` with the first value replaced by NaN and a valid checksum.
fn nan_payload(n: usize) -> Vec<u8> {
    let mut body = vec![0u8; n * 4];
    body[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    let sum = blake3::hash(&body);
    let mut checksum = [0u8; 8];
    checksum.copy_from_slice(&sum.as_bytes()[..8]);
    let h = Header {
        version: FORMAT_VERSION,
        codec: CodecKind::Fp32,
        zstd: false,
        stochastic_rounding: false,
        topk_values: Default::default(),
        block_size: 256,
        n: n as u64,
        body_len: body.len() as u64,
        checksum,
    };
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&h.to_bytes());
    out.extend_from_slice(&body);
    out
}

/// Replaces the update bytes and signs the result again, as a cheater would.
fn resign(mut r: TaskResult, update: Vec<u8>, key: &WorkerKey) -> TaskResult {
    r.commitment.update = verify::hash_update(&update);
    r.update = ByteBuf::from(update);
    r.signature = key.sign(&r.commitment);
    r
}

/// A hostile mode and what it remembers.
pub struct Tamper {
    mode: Hostile,
    previous: Option<TaskResult>,
}

impl Tamper {
    /// Misbehaves with `mode`.
    pub fn new(mode: Hostile) -> Self {
        Tamper {
            mode,
            previous: None,
        }
    }

    /// What to send instead of the honest `result`; `n` is the model size.
    pub fn tamper(&mut self, result: TaskResult, n: usize, key: &WorkerKey) -> Vec<Send> {
        let msg = |r: TaskResult| Send::Msg(ToCoordinator::Result(Box::new(r)));
        let out = match self.mode {
            Hostile::BadDataRequest => vec![
                msg(result.clone()),
                Send::Data(proto::DataRequest {
                    blake3: [0xab; 32],
                    part: proto::DataPart::Outboard,
                }),
            ],
            Hostile::Nan => vec![msg(resign(result.clone(), nan_payload(n), key))],
            Hostile::WrongShape => {
                let short = compression::encode(&vec![0.0; n - 1], &CodecConfig::default(), 0)
                    .expect("zeros encode");
                vec![msg(resign(result.clone(), short, key))]
            }
            Hostile::Truncated => {
                let half = result.update[..result.update.len() / 2].to_vec();
                vec![msg(resign(result.clone(), half, key))]
            }
            Hostile::Replay => {
                let mut v = vec![msg(result.clone()), msg(result.clone())];
                v.extend(self.previous.take().map(msg));
                v
            }
            Hostile::UnknownTask => {
                let mut r = result.clone();
                r.task_id += 1_000_000_007;
                r.commitment.task_id = r.task_id;
                r.signature = key.sign(&r.commitment);
                vec![msg(r)]
            }
            Hostile::BadSignature => {
                let mut r = result.clone();
                r.signature.0[0] ^= 1;
                vec![msg(r)]
            }
            Hostile::JunkFrame => {
                let mut raw = 1000u32.to_be_bytes().to_vec();
                raw.extend((0..1000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
                vec![Send::Raw(raw)]
            }
            Hostile::Oversized => vec![Send::Raw(u32::MAX.to_be_bytes().to_vec())],
        };
        self.previous = Some(result);
        out
    }
}
