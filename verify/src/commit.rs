//! Hashes and work commitments.

use serde::{Deserialize, Serialize};

/// A blake3 digest.
pub type Hash = [u8; 32];

/// blake3 of `f32` values as little-endian bytes (parameters, updates as numbers).
pub fn hash_f32(values: &[f32]) -> Hash {
    let mut h = blake3::Hasher::new_derive_key("dtrain params v1");
    h.update(&(values.len() as u64).to_le_bytes());
    // Hash in chunks to avoid one large temporary.
    let mut buf = [0u8; 4096];
    for chunk in values.chunks(1024) {
        for (i, v) in chunk.iter().enumerate() {
            buf[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
        h.update(&buf[..chunk.len() * 4]);
    }
    *h.finalize().as_bytes()
}

/// blake3 of the exact bytes of an encoded update.
pub fn hash_update(bytes: &[u8]) -> Hash {
    let mut h = blake3::Hasher::new_derive_key("dtrain update v1");
    h.update(bytes);
    *h.finalize().as_bytes()
}

/// blake3 of a list of sample indices.
pub fn hash_indices(indices: &[u32]) -> Hash {
    let mut h = blake3::Hasher::new_derive_key("dtrain indices v1");
    h.update(&(indices.len() as u64).to_le_bytes());
    for i in indices {
        h.update(&i.to_le_bytes());
    }
    *h.finalize().as_bytes()
}

/// Everything a result binds to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commitment {
    /// The run.
    pub run_id: Hash,
    /// The task.
    pub task_id: u64,
    /// The optimizer step (or round) of the task.
    pub step: u64,
    /// [`hash_f32`] of the parameters the task started from.
    pub input_params: Hash,
    /// [`hash_indices`] of the data indices.
    pub indices: Hash,
    /// Seed of the task's randomness.
    pub seed: u64,
    /// Canonical hash of the hyperparameters.
    pub hyperparams: Hash,
    /// [`hash_update`] of the exact bytes sent.
    pub update: Hash,
    /// Merkle root over per-step state hashes (zero for single-step tasks).
    pub step_root: Hash,
    /// Samples covered.
    pub n_samples: u32,
}

impl Commitment {
    /// One blake3 over a fixed, field-by-field layout (independent of serde).
    pub fn digest(&self) -> Hash {
        let mut h = blake3::Hasher::new_derive_key("dtrain commitment v1");
        h.update(&self.run_id);
        h.update(&self.task_id.to_le_bytes());
        h.update(&self.step.to_le_bytes());
        h.update(&self.input_params);
        h.update(&self.indices);
        h.update(&self.seed.to_le_bytes());
        h.update(&self.hyperparams);
        h.update(&self.update);
        h.update(&self.step_root);
        h.update(&self.n_samples.to_le_bytes());
        *h.finalize().as_bytes()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn sample() -> Commitment {
        Commitment {
            run_id: [1; 32],
            task_id: 2,
            step: 3,
            input_params: [4; 32],
            indices: [5; 32],
            seed: 6,
            hyperparams: [7; 32],
            update: [8; 32],
            step_root: [9; 32],
            n_samples: 10,
        }
    }

    #[test]
    fn digest_binds_every_field() {
        let base = sample();
        let d = base.digest();
        assert_eq!(d, sample().digest());
        let variants: Vec<Commitment> = vec![
            Commitment {
                run_id: [0; 32],
                ..sample()
            },
            Commitment {
                task_id: 0,
                ..sample()
            },
            Commitment {
                step: 0,
                ..sample()
            },
            Commitment {
                input_params: [0; 32],
                ..sample()
            },
            Commitment {
                indices: [0; 32],
                ..sample()
            },
            Commitment {
                seed: 0,
                ..sample()
            },
            Commitment {
                hyperparams: [0; 32],
                ..sample()
            },
            Commitment {
                update: [0; 32],
                ..sample()
            },
            Commitment {
                step_root: [0; 32],
                ..sample()
            },
            Commitment {
                n_samples: 0,
                ..sample()
            },
        ];
        for v in variants {
            assert_ne!(v.digest(), d, "{v:?}");
        }
    }

    #[test]
    fn digest_is_canonical() {
        // Fixed vector: a change of the encoding must be deliberate (and versioned).
        assert_eq!(
            hex::encode(sample().digest()),
            "b4007f3da105bc46f5e11927371b840d2a96a2bcd9399592c7c4a8861e475356"
        );
    }

    #[test]
    fn hashes_are_domain_separated_and_length_aware() {
        assert_ne!(hash_f32(&[]), hash_update(&[]));
        assert_ne!(hash_indices(&[1, 2]), hash_indices(&[1, 2, 0]));
        assert_ne!(hash_f32(&[0.0]), hash_f32(&[-0.0]));
        assert_eq!(hash_f32(&[1.5; 3000]), hash_f32(&[1.5; 3000]));
    }
}
