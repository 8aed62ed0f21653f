//! Rebuilding a task's starting parameters on the worker from a [`ParamsPayload`].
//!
//! The coordinator sends full parameters to a worker that holds none, and otherwise a delta
//! from the version the worker used last: lossless XOR deltas, or lossy additive deltas when
//! the downlink is quantized (the coordinator then applies the same decoded deltas to its
//! own copy, so both sides hold the same bits). Either way the result must hash to the
//! task's `params_hash`, so a worker never computes on parameters other than the ones the
//! coordinator holds.

use compression::{CodecError, DecodeLimits};
use proto::ParamsPayload;
use verify::Hash;

/// Parameters a worker holds, with their version.
#[derive(Clone, Debug)]
pub struct Held {
    /// Version number given by the coordinator.
    pub version: u64,
    /// The values.
    pub values: Vec<f32>,
}

/// Why the parameters could not be rebuilt.
#[derive(Debug, thiserror::Error)]
pub enum ParamsError {
    /// The payload builds on a version this worker does not hold.
    #[error("parameters of version {0} are not held here")]
    MissingBase(u64),
    /// A payload does not decode.
    #[error("parameter payload: {0}")]
    Codec(#[from] CodecError),
    /// A decoded value is NaN or infinite.
    #[error("rebuilt parameters are not all finite")]
    NonFinite,
    /// The result is not what the coordinator announced.
    #[error("rebuilt parameters do not match the announced hash")]
    HashMismatch,
}

impl ParamsError {
    /// Whether full parameters would fix this (as opposed to a malformed payload).
    pub fn needs_full(&self) -> bool {
        matches!(
            self,
            ParamsError::MissingBase(_) | ParamsError::HashMismatch
        )
    }
}

fn base(held: Option<&Held>, version: u64) -> Result<&Held, ParamsError> {
    held.filter(|h| h.version == version)
        .ok_or(ParamsError::MissingBase(version))
}

/// Applies `payload` to what the worker holds and returns version `version`, checked
/// against `hash`. `n` is the model's parameter count.
pub fn rebuild(
    held: Option<&Held>,
    payload: &ParamsPayload,
    version: u64,
    hash: &Hash,
    n: usize,
    limits: &DecodeLimits,
) -> Result<Held, ParamsError> {
    let values = match payload {
        ParamsPayload::Held => base(held, version)?.values.clone(),
        ParamsPayload::Full(bytes) => compression::decode_exact(bytes, n, limits)?,
        ParamsPayload::Xor { base: b, delta } => {
            compression::apply_xor_delta(&base(held, *b)?.values, delta, limits)?
        }
        ParamsPayload::Add { base: b, deltas } => {
            let mut v = base(held, *b)?.values.clone();
            for d in deltas {
                add_delta(&mut v, d, limits)?;
            }
            v
        }
    };
    if values.iter().any(|x| !x.is_finite()) {
        return Err(ParamsError::NonFinite);
    }
    if verify::hash_f32(&values) != *hash {
        return Err(ParamsError::HashMismatch);
    }
    Ok(Held { version, values })
}

/// `values[i] += decode(delta)[i]`: how a worker applies a lossy delta.
pub fn add_delta(
    values: &mut [f32],
    delta: &[u8],
    limits: &DecodeLimits,
) -> Result<(), CodecError> {
    let d = compression::decode_exact(delta, values.len(), limits)?;
    add_decoded(values, &d);
    Ok(())
}

/// `values[i] += d[i]` in f32: the one way both sides apply a decoded lossy delta.
pub fn add_decoded(values: &mut [f32], d: &[f32]) {
    for (v, d) in values.iter_mut().zip(d) {
        *v += d;
    }
}
