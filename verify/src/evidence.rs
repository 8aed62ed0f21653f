//! Evidence of a cheat that anyone can check.

use serde::{Deserialize, Serialize};

use crate::{verify_signature, Commitment, Hash, Signature, WorkerId};

/// A worker's signed commitment together with what honest re-execution produced.
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
    /// True when the signature is the worker's and the claim differs from the recomputation.
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
            ..e
        };
        assert!(!forged.check());
    }
}
