//! Reputation and the adaptive spot-check probability.

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// How often results are re-executed, adapted to each worker's track record.
///
/// Missing fields take their defaults when deserialized (e.g. from a TOML config).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpotCheckPolicy {
    /// Probability for a trusted worker (default 0.1).
    pub base_p: f64,
    /// Probability for a worker with no passed check yet (default 0.5).
    pub new_worker_p: f64,
    /// Passed checks after which `base_p` applies (default 20).
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

/// What the coordinator knows of a worker's track record.
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

/// A configured probability as a usable one: clamped to `[0, 1]`, NaN fails safe to 1.
fn sane(p: f64) -> f64 {
    if p.is_nan() {
        1.0
    } else {
        p.clamp(0.0, 1.0)
    }
}

impl SpotCheckPolicy {
    /// Probability of checking the next result of a worker with reputation `rep`.
    ///
    /// Linear in `checks_passed`: `new_worker_p` with no passed check, down to `base_p` at
    /// `trusted_after` passed checks and after (so `trusted_after = 0` means `base_p`
    /// from the start). If `new_worker_p < base_p` is configured, `base_p` is used
    /// throughout: a new worker is never checked less than a trusted one. Banned workers
    /// get 0, as their results are refused anyway. Failed checks do not enter the formula;
    /// the coordinator is expected to ban on a failed check. Out-of-range settings are
    /// clamped to `[0, 1]`, and NaN is treated as 1.
    pub fn probability(&self, rep: &Reputation) -> f64 {
        if rep.banned {
            return 0.0;
        }
        let base = sane(self.base_p);
        let hi = sane(self.new_worker_p).max(base);
        if rep.checks_passed >= u64::from(self.trusted_after) {
            return base; // Exactly, not up to rounding.
        }
        let frac = rep.checks_passed as f64 / f64::from(self.trusted_after);
        (base + (hi - base) * (1.0 - frac)).clamp(0.0, 1.0)
    }

    /// Whether to re-execute task `task_id` of a worker with reputation `rep`.
    ///
    /// The draw is a uniform `f64` from a ChaCha8 generator seeded with
    /// `blake3_keyed(secret, "spot-check" ‖ task_id LE)`: reproducible by whoever holds the
    /// coordinator's secret (an audit can replay every decision), unpredictable to a worker
    /// that does not, and independent across task ids. It returns true with exactly
    /// [`probability`](Self::probability) (always for 1, never for 0).
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
    fn probability_is_strictly_decreasing_until_trusted() {
        let p = SpotCheckPolicy::default();
        for k in 0..20 {
            assert!(p.probability(&rep(k + 1)) < p.probability(&rep(k)), "k={k}");
        }
        // Failed checks and task counts do not buy trust.
        let busy = Reputation {
            tasks: 1000,
            checks_failed: 3,
            ..rep(0)
        };
        assert_eq!(p.probability(&busy), 0.5);
    }

    #[test]
    fn odd_configurations_are_safe() {
        let r = rep(3);
        let immediate = SpotCheckPolicy {
            trusted_after: 0,
            ..Default::default()
        };
        assert_eq!(immediate.probability(&rep(0)), 0.1);
        let inverted = SpotCheckPolicy {
            base_p: 0.3,
            new_worker_p: 0.1,
            trusted_after: 5,
        };
        assert_eq!(inverted.probability(&r), 0.3);
        let nan = SpotCheckPolicy {
            base_p: f64::NAN,
            ..Default::default()
        };
        assert_eq!(nan.probability(&r), 1.0);
        let wild = SpotCheckPolicy {
            base_p: -1.0,
            new_worker_p: 7.0,
            trusted_after: 1,
        };
        assert_eq!(wild.probability(&rep(0)), 1.0);
        assert_eq!(wild.probability(&rep(1)), 0.0);
        let always = SpotCheckPolicy {
            base_p: 1.0,
            new_worker_p: 1.0,
            trusted_after: 1,
        };
        let never = SpotCheckPolicy {
            base_p: 0.0,
            new_worker_p: 0.0,
            trusted_after: 1,
        };
        for t in 0..1000 {
            assert!(always.should_check(&r, &[5; 32], t));
            assert!(!never.should_check(&r, &[5; 32], t));
        }
        let banned = Reputation { banned: true, ..r };
        assert!((0..1000).all(|t| !always.should_check(&banned, &[5; 32], t)));
    }

    #[test]
    fn policy_deserializes_with_defaults() {
        let p: SpotCheckPolicy = serde_json::from_str(r#"{"base_p":0.05}"#).unwrap();
        assert_eq!(
            p,
            SpotCheckPolicy {
                base_p: 0.05,
                ..Default::default()
            }
        );
        assert!(serde_json::from_str::<SpotCheckPolicy>(r#"{"bsae_p":0.05}"#).is_err());
    }

    #[test]
    fn decisions_match_probability_and_are_keyed() {
        let p = SpotCheckPolicy::default();
        let n = 20_000u64;
        for passed in [0, 5, 13, 20] {
            let r = rep(passed);
            let q = p.probability(&r);
            let hits = (0..n).filter(|&t| p.should_check(&r, &[1; 32], t)).count() as f64;
            let sigma = (n as f64 * q * (1.0 - q)).sqrt();
            assert!(
                (hits - n as f64 * q).abs() < 3.0 * sigma,
                "passed {passed}: hits {hits}, expected {}",
                n as f64 * q
            );
        }
        let r = rep(5);
        let a: Vec<bool> = (0..256).map(|t| p.should_check(&r, &[1; 32], t)).collect();
        let again: Vec<bool> = (0..256).map(|t| p.should_check(&r, &[1; 32], t)).collect();
        let other: Vec<bool> = (0..256).map(|t| p.should_check(&r, &[2; 32], t)).collect();
        assert_eq!(a, again);
        assert_ne!(a, other);
    }
}
