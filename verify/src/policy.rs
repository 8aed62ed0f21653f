//! Reputation and the adaptive spot-check probability.

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// How often results are re-executed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpotCheckPolicy {
    /// Probability for a trusted worker.
    pub base_p: f64,
    /// Probability for a worker with no passed check yet.
    pub new_worker_p: f64,
    /// Passed checks after which `base_p` applies.
    pub trusted_after: u32,
}

impl Default for SpotCheckPolicy {
    fn default() -> Self {
        SpotCheckPolicy {
            base_p: 0.1,
            new_worker_p: 0.5,
            trusted_after: 20,
        }
    }
}

/// What the coordinator knows of a worker.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reputation {
    /// Results accepted.
    pub tasks: u64,
    /// Spot checks passed.
    pub checks_passed: u64,
    /// Spot checks failed.
    pub checks_failed: u64,
    /// Banned for cheating.
    pub banned: bool,
}

impl SpotCheckPolicy {
    /// Probability of checking the next result: linear from `new_worker_p` (no passed check)
    /// down to `base_p` (at `trusted_after` passed checks); 0 for a banned worker.
    pub fn probability(&self, rep: &Reputation) -> f64 {
        if rep.banned {
            return 0.0;
        }
        let t = f64::from(self.trusted_after.max(1));
        let frac = (rep.checks_passed as f64 / t).min(1.0);
        let hi = self.new_worker_p.max(self.base_p);
        (hi + (self.base_p - hi) * frac).clamp(0.0, 1.0)
    }

    /// Whether to check task `task_id`: a ChaCha draw keyed by the coordinator's secret and
    /// the task id, reproducible from the secret, unpredictable without it.
    pub fn should_check(&self, rep: &Reputation, secret: &[u8; 32], task_id: u64) -> bool {
        let mut h = blake3::Hasher::new_keyed(secret);
        h.update(b"spot-check");
        h.update(&task_id.to_le_bytes());
        let mut rng = rand_chacha::ChaCha8Rng::from_seed(*h.finalize().as_bytes());
        rng.gen::<f64>() < self.probability(rep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rep(passed: u64) -> Reputation {
        Reputation {
            checks_passed: passed,
            ..Default::default()
        }
    }

    #[test]
    fn probability_decays_to_base() {
        let p = SpotCheckPolicy::default();
        assert_eq!(p.probability(&rep(0)), 0.5);
        let mut last = 1.0;
        for k in 0..=20 {
            let q = p.probability(&rep(k));
            assert!(q <= last);
            last = q;
        }
        assert!((p.probability(&rep(20)) - 0.1).abs() < 1e-12);
        assert!((p.probability(&rep(1000)) - 0.1).abs() < 1e-12);
        let banned = Reputation {
            banned: true,
            ..rep(0)
        };
        assert_eq!(p.probability(&banned), 0.0);
    }

    #[test]
    fn decisions_match_probability_and_are_keyed() {
        let p = SpotCheckPolicy::default();
        let r = rep(5);
        let q = p.probability(&r);
        let n = 20_000u64;
        let hits = (0..n).filter(|&t| p.should_check(&r, &[1; 32], t)).count() as f64;
        let sigma = (n as f64 * q * (1.0 - q)).sqrt();
        assert!(
            (hits - n as f64 * q).abs() < 3.0 * sigma,
            "hits {hits}, expected {}",
            n as f64 * q
        );
        let a: Vec<bool> = (0..256).map(|t| p.should_check(&r, &[1; 32], t)).collect();
        let again: Vec<bool> = (0..256).map(|t| p.should_check(&r, &[1; 32], t)).collect();
        let other: Vec<bool> = (0..256).map(|t| p.should_check(&r, &[2; 32], t)).collect();
        assert_eq!(a, again);
        assert_ne!(a, other);
    }
}
