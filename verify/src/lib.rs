//! Verification primitives for untrusted workers, with no ML dependency:
//!
//! * [`commit`]: domain-separated blake3 hashes and the [`Commitment`] a result binds to.
//! * [`identity`]: persistent ed25519 worker keys, [`WorkerId`]s and [`Signature`]s.
//! * [`merkle`]: Merkle trees over per-step state hashes, proofs, and dispute bisection.
//! * [`policy`]: reputation and the adaptive spot-check probability.
//! * [`evidence`]: signed, independently checkable evidence of a cheat.

pub mod commit;
pub mod evidence;
pub mod identity;
pub mod merkle;
pub mod policy;

pub use commit::{hash_f32, hash_indices, hash_update, Commitment, Hash};
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
