//! Evidence of a cheat that anyone can check.
//!
//! A worker signs a [`Commitment`] that includes the hash of the update it sent. If the
//! coordinator's re-execution of the same task (same input parameters, indices, seed and
//! hyperparameters, all bound by the commitment) yields a different update hash, the
//! signed commitment plus the recomputed hash is self-contained proof: the worker cannot
//! deny having claimed that update, and anyone can re-run the task to confirm the
//! recomputation. [`Evidence::check`] verifies the cryptographic part.

use serde::{Deserialize, Serialize};

use crate::{verify_signature, Commitment, Hash, Signature, WorkerId};

/// A worker's signed commitment together with what honest re-execution produced.
///
/// Serializable (it is written to `metrics.jsonl` as JSON) and checkable offline with
/// [`Evidence::check`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    /// The accused worker.
    pub worker: WorkerId,
    /// What it committed to.
    pub commitment: Commitment,
    /// Its signature over the commitment.
    pub signature: Signature,
    /// The update hash it claimed (equals `commitment.update`).
    pub claimed_update: Hash,
    /// The update hash re-execution produced.
    pub recomputed_update: Hash,
    /// First divergent step of a multi-step task, when localised.
    pub divergent_step: Option<u64>,
    /// Human-readable reason.
    pub reason: String,
}

impl Evidence {
    /// Whether this is valid evidence: `signature` is `worker`'s signature over
    /// `commitment`, `claimed_update` is the update hash that commitment binds, and the
    /// recomputed update differs from it. Never panics on untrusted input.
    ///
    /// This does not (cannot) confirm that `recomputed_update` is right; that takes
    /// re-executing the task the commitment describes.
    pub fn check(&self) -> bool {
        verify_signature(&self.worker, &self.commitment, &self.signature).is_ok()
            && self.claimed_update == self.commitment.update
            && self.claimed_update != self.recomputed_update
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commit::tests::sample;
    use crate::WorkerKey;

    #[test]
    fn checks_signature_and_difference() {
        let k = WorkerKey::from_seed([9; 32]);
        let c = sample();
        let e = Evidence {
            worker: k.public(),
            signature: k.sign(&c),
            claimed_update: c.update,
            recomputed_update: [0; 32],
            divergent_step: None,
            reason: "update differs".into(),
            commitment: c.clone(),
        };
        assert!(e.check());
        let same = Evidence {
            recomputed_update: c.update,
            ..e.clone()
        };
        assert!(!same.check());
        let forged = Evidence {
            worker: WorkerKey::from_seed([1; 32]).public(),
            ..e.clone()
        };
        assert!(!forged.check());
        let mut bad_sig = e.clone();
        bad_sig.signature.0[0] ^= 1;
        assert!(!bad_sig.check());
        let mut other_commitment = e.clone();
        other_commitment.commitment.seed ^= 1;
        assert!(!other_commitment.check());
        // The claim must be what the worker actually signed.
        let misquoted = Evidence {
            claimed_update: [0xee; 32],
            ..e.clone()
        };
        assert!(!misquoted.check());
        let not_a_key = Evidence {
            worker: WorkerId([0xff; 32]),
            ..e.clone()
        };
        assert!(!not_a_key.check());
    }

    #[test]
    fn survives_json_round_trip() {
        let k = WorkerKey::from_seed([9; 32]);
        let c = sample();
        let e = Evidence {
            worker: k.public(),
            signature: k.sign(&c),
            claimed_update: c.update,
            recomputed_update: [0; 32],
            divergent_step: Some(17),
            reason: "step 17 state differs".into(),
            commitment: c,
        };
        let line = serde_json::to_string(&e).unwrap();
        assert!(!line.contains('\n'));
        let back: Evidence = serde_json::from_str(&line).unwrap();
        assert_eq!(back, e);
        assert!(back.check());
    }
}
