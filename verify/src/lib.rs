//! Verification primitives for untrusted workers, with no ML dependency:
//!
//! * [`commit`]: domain-separated blake3 hashes and the [`Commitment`] a result binds to.
//! * [`identity`]: persistent ed25519 worker keys, [`WorkerId`]s and [`Signature`]s.
//! * [`blob`]: content-addressed files verified group by group (BLAKE3 outboards).
//! * [`merkle`]: Merkle trees over per-step state hashes, proofs, and dispute bisection.
//! * [`policy`]: reputation and the adaptive spot-check probability.
//! * [`evidence`]: signed, independently checkable evidence of a cheat.
//! * [`aggregate`](mod@aggregate): robust combination of worker updates (mean, trimmed mean,
//!   median, norm clipping), a second line of defence against cheating workers.
//!
//! The flow: a worker computes an update, fills a [`Commitment`] (hashes of everything
//! the result depends on, plus the hash of the exact update bytes) and signs it with its
//! persistent [`WorkerKey`]. The coordinator checks the signature, decides with
//! [`SpotCheckPolicy::should_check`] whether to re-execute the task, and on a mismatch
//! records [`Evidence`] that anyone can verify. Multi-step tasks also commit to a
//! [`MerkleTree`] root over per-step states, so a dispute can be narrowed to one step with
//! [`first_divergence`].
//!
//! ```
//! use verify::*;
//!
//! let key = WorkerKey::from_seed([7; 32]);
//! let update = b"encoded update bytes";
//! let c = Commitment {
//!     run_id: [1; 32],
//!     task_id: 42,
//!     step: 3,
//!     input_params: hash_f32(&[0.5, -1.0]),
//!     indices: hash_indices(&[10, 11, 12]),
//!     seed: 1234,
//!     hyperparams: *blake3::hash(b"lr=0.1").as_bytes(),
//!     update: hash_update(update),
//!     step_root: [0; 32],
//!     n_samples: 3,
//!     ef_base: 0,
//!     encoded_input: hash_f32(&[0.25, 0.5]),
//!     class: ComputeClass::default().digest(),
//! };
//! let sig = key.sign(&c);
//! assert!(verify_signature(&key.public(), &c, &sig).is_ok());
//!
//! // Re-execution produced something else: that is checkable evidence.
//! let e = Evidence {
//!     worker: key.public(),
//!     commitment: c.clone(),
//!     signature: sig,
//!     claimed_update: c.update,
//!     recomputed_update: hash_update(b"what the task really gives"),
//!     divergent_step: None,
//!     reason: "update differs".into(),
//! };
//! assert!(e.check());
//!
//! let policy = SpotCheckPolicy::default();
//! let p = policy.probability(&Reputation::default());
//! assert_eq!(p, policy.new_worker_p);
//! let _check = policy.should_check(&Reputation::default(), &[9; 32], c.task_id);
//! ```

#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod aggregate;
pub mod blob;
pub mod class;
pub mod commit;
pub mod evidence;
pub mod identity;
pub mod merkle;
pub mod policy;

pub use aggregate::{aggregate, AggregateError, AggregateReport, AggregationConfig, Rule};
pub use class::ComputeClass;
pub use commit::{hash_f32, hash_f32_rayon, hash_indices, hash_update, Commitment, Hash};
pub use evidence::Evidence;
pub use identity::{verify_signature, Signature, WorkerId, WorkerKey};
pub use merkle::{first_divergence, MerkleProof, MerkleTree};
pub use policy::{Reputation, SpotCheckPolicy};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A public key is not a valid ed25519 point.
    #[error("invalid worker public key")]
    BadKey,
    /// A signature does not verify.
    #[error("signature does not verify")]
    BadSignature,
    /// A key file is malformed.
    #[error("key file {path}: {reason}")]
    KeyFile {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// Reading or writing a key file failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}
