//! Error feedback (EF-SGD): what a lossy codec did not send is added to the next update.

use crate::{encode_parts, CodecConfig, CodecError};

/// The residual of past encodings: `sum(inputs) - sum(decoded)` over the steps since the
/// last reset, so nothing a lossy codec drops is lost for good, only delayed.
#[derive(Clone, Debug, Default)]
pub struct ErrorFeedback {
    residual: Vec<f32>,
}

impl ErrorFeedback {
    /// An empty residual.
    pub fn new() -> Self {
        Self::default()
    }

    /// Continues from a residual left by an earlier encoding (an empty one is a reset).
    pub fn with_residual(residual: Vec<f32>) -> Self {
        ErrorFeedback { residual }
    }

    /// The residual, consuming the state.
    pub fn into_residual(self) -> Vec<f32> {
        self.residual
    }

    /// Encodes `update + residual` and keeps as the new residual what the receiver will not
    /// see: `(update + old residual) - decoded`. Returns the encoded bytes and the decoded
    /// values (exactly what [`decode`](crate::decode) of those bytes gives the receiver).
    ///
    /// If the length of `update` differs from the residual's (first call, or the model
    /// changed), the residual starts from zero and `update` is encoded as it is. On error the residual is unchanged
    /// (or freshly reset) and nothing is sent.
    pub fn encode(
        &mut self,
        update: &[f32],
        cfg: &CodecConfig,
        seed: u64,
    ) -> Result<(Vec<u8>, Vec<f32>), CodecError> {
        // With no residual the update is encoded as it is (not `u + 0.0`, which would turn
        // -0.0 into +0.0): callers that hash what was encoded rely on that.
        let corrected: Vec<f32> = if self.residual.len() == update.len() {
            update
                .iter()
                .zip(&self.residual)
                .map(|(u, r)| u + r)
                .collect()
        } else {
            self.residual.clear();
            self.residual.resize(update.len(), 0.0);
            update.to_vec()
        };
        let (bytes, decoded) = encode_parts(&corrected, cfg, seed, true)?;
        let decoded = decoded.ok_or_else(|| CodecError::Malformed("no decoded values".into()))?;
        for ((r, c), d) in self.residual.iter_mut().zip(&corrected).zip(&decoded) {
            *r = c - d;
        }
        Ok((bytes, decoded))
    }

    /// Forgets the residual (e.g. after the receiver dropped an update, or on a new run).
    pub fn reset(&mut self) {
        self.residual.clear();
    }

    /// The current residual (empty before the first call or after [`reset`](Self::reset)).
    pub fn residual(&self) -> &[f32] {
        &self.residual
    }
}
