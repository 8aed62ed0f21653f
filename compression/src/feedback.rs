//! Error feedback: what a lossy codec did not send is added to the next update.

use crate::{decode, encode, CodecConfig, CodecError, CodecKind, DecodeLimits};

/// The residual of the last encodings.
#[derive(Clone, Debug, Default)]
pub struct ErrorFeedback {
    residual: Vec<f32>,
}

impl ErrorFeedback {
    /// No residual yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Encodes `update + residual`, and keeps as new residual what the receiver will not
    /// see. Returns the bytes and the values the receiver decodes. A change of length resets
    /// the residual.
    pub fn encode(
        &mut self,
        update: &[f32],
        cfg: &CodecConfig,
        seed: u64,
    ) -> Result<(Vec<u8>, Vec<f32>), CodecError> {
        if cfg.codec == CodecKind::Fp32 {
            // Lossless: nothing is left behind.
            self.residual.clear();
            return Ok((encode(update, cfg, seed)?, update.to_vec()));
        }
        if self.residual.len() != update.len() {
            self.residual = vec![0.0; update.len()];
        }
        let corrected: Vec<f32> = update
            .iter()
            .zip(&self.residual)
            .map(|(u, r)| u + r)
            .collect();
        let bytes = encode(&corrected, cfg, seed)?;
        let limits = DecodeLimits {
            max_values: update.len(),
            max_encoded_bytes: usize::MAX,
        };
        let decoded = decode(&bytes, &limits)?;
        for ((r, c), d) in self.residual.iter_mut().zip(&corrected).zip(&decoded) {
            *r = c - d;
        }
        Ok((bytes, decoded))
    }

    /// Forgets the residual.
    pub fn reset(&mut self) {
        self.residual.clear();
    }

    /// The current residual.
    pub fn residual(&self) -> &[f32] {
        &self.residual
    }
}
