//! Robust aggregation of worker updates: a second line of defence against cheating workers.
//!
//! Every round the coordinator combines the accepted contributions (flat `f32` vectors of
//! one length, with their sample counts as weights) into one update with [`aggregate`].
//! The [`Rule`] picks how:
//!
//! * [`Rule::Mean`] (the default): the sample-weighted mean, computed exactly as the
//!   coordinator always has, so a one-worker run stays bit-for-bit equal to single-process
//!   training;
//! * [`Rule::TrimmedMean`]: per coordinate, the unweighted mean after cutting
//!   `floor(trim_fraction × m)` values at each end;
//! * [`Rule::Median`]: per coordinate, the unweighted median.
//!
//! Optionally ([`AggregationConfig::clip_factor`]), contributions whose L2 norm exceeds
//! `clip_factor ×` the round's median norm are first scaled down to that norm, which bounds
//! what one worker can do to any rule.
//!
//! ```
//! use verify::{aggregate, AggregationConfig, Rule};
//!
//! let honest = [1.0f32, 2.0];
//! let also_honest = [1.2f32, 1.8];
//! let attacker = [1e6f32, -1e6];
//! let cfg = AggregationConfig { rule: Rule::Median, ..Default::default() };
//! let mut out = [0f32; 2];
//! let report = aggregate(&[&honest, &also_honest, &attacker], &[1.0, 1.0, 1.0], &cfg, &mut out)
//!     .unwrap();
//! assert_eq!(out, [1.2, 1.8]);
//! assert_eq!(report.clipped, 0);
//! assert_eq!(report.norms.len(), 3);
//! ```

use serde::{Deserialize, Serialize};

/// Which rule combines the contributions of a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// Sample-weighted mean (bit-for-bit the coordinator's historical averaging).
    #[default]
    Mean,
    /// Per coordinate, unweighted mean of what is left after cutting
    /// `floor(trim_fraction × m)` values at each end.
    TrimmedMean,
    /// Per coordinate, unweighted median (mean of the two middle values for an even count).
    Median,
}

/// The `[aggregation]` table of a run config.
///
/// Missing fields take their defaults when deserialized; unknown fields are refused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AggregationConfig {
    /// The combining rule (default [`Rule::Mean`]).
    pub rule: Rule,
    /// For [`Rule::TrimmedMean`]: the fraction cut at each end, per coordinate
    /// (default 0.25, allowed `[0, 0.5)`).
    pub trim_fraction: f64,
    /// `Some(c)`: before combining, scale every contribution whose L2 norm exceeds
    /// `c ×` the median of the round's contribution norms down to that norm
    /// (finite, `c >= 1`). Default `None`: no clipping.
    pub clip_factor: Option<f64>,
}

impl Default for AggregationConfig {
    fn default() -> Self {
        AggregationConfig {
            rule: Rule::Mean,
            trim_fraction: 0.25,
            clip_factor: None,
        }
    }
}

impl AggregationConfig {
    /// Checks the ranges: `trim_fraction` in `[0, 0.5)`, `clip_factor` (if set) finite and `>= 1`.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..0.5).contains(&self.trim_fraction) {
            return Err(format!(
                "aggregation.trim_fraction must be in [0, 0.5), got {}",
                self.trim_fraction
            ));
        }
        if let Some(c) = self.clip_factor {
            if !(c.is_finite() && c >= 1.0) {
                return Err(format!(
                    "aggregation.clip_factor must be finite and >= 1, got {c}"
                ));
            }
        }
        Ok(())
    }
}

/// What aggregation did, for the metrics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AggregateReport {
    /// How many contributions were scaled down by clipping.
    pub clipped: usize,
    /// The L2 norm of each input (before clipping), in input order.
    pub norms: Vec<f64>,
}

/// Why a round could not be aggregated.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AggregateError {
    /// There is nothing to combine.
    #[error("no contributions to aggregate")]
    Empty,
    /// A contribution's length differs from the first one's.
    #[error("contribution {index} has {len} values, contribution 0 has {expected}")]
    LengthMismatch {
        /// Index of the offending contribution.
        index: usize,
        /// Its length.
        len: usize,
        /// The length of contribution 0.
        expected: usize,
    },
    /// The output buffer's length differs from the contributions'.
    #[error("output has {len} values, contributions have {expected}")]
    OutputLength {
        /// Length of the output buffer.
        len: usize,
        /// Length of the contributions.
        expected: usize,
    },
    /// The number of weights differs from the number of contributions.
    #[error("{weights} weights for {updates} contributions")]
    WeightCount {
        /// Number of weights given.
        weights: usize,
        /// Number of contributions given.
        updates: usize,
    },
    /// A weight is negative or not finite.
    #[error("weight {index} is {value}; weights must be finite and non-negative")]
    BadWeight {
        /// Index of the offending weight.
        index: usize,
        /// Its value.
        value: f64,
    },
    /// The weights sum to zero (or overflow to infinity).
    #[error("weights sum to {total}; need a finite positive total")]
    BadWeightTotal {
        /// The sum of the weights.
        total: f64,
    },
    /// A contribution holds a NaN or an infinity.
    #[error("contribution {index} has a non-finite value at position {position}")]
    NonFinite {
        /// Index of the offending contribution.
        index: usize,
        /// Position of its first non-finite value.
        position: usize,
    },
    /// The configuration is out of range (see [`AggregationConfig::validate`]).
    #[error("invalid aggregation config: {0}")]
    Config(String),
}

/// Combines `updates` (weights = sample counts) into `out` (overwritten; same length as
/// each update), following `cfg`.
///
/// Inputs are checked before `out` is touched: on error, `out` is left as it was.
///
/// [`Rule::Mean`] computes, in input order, `out = 0; out[j] += w_i * x_i[j]` in `f32`
/// with `w_i = (weights[i] / Σ weights) as f32` (the division in `f64`). For integer
/// sample counts below 2^24 this weight equals `n_i as f32 / total as f32` exactly (a
/// quotient rounded to `f64` and then to `f32` is the correctly rounded `f32` quotient),
/// and one contribution gives exactly its input. The other rules ignore the weights (which
/// are still checked) and are deterministic for a given input order.
pub fn aggregate(
    updates: &[&[f32]],
    weights: &[f64],
    cfg: &AggregationConfig,
    out: &mut [f32],
) -> Result<AggregateReport, AggregateError> {
    cfg.validate().map_err(AggregateError::Config)?;
    let first = updates.first().ok_or(AggregateError::Empty)?;
    let n = first.len();
    if weights.len() != updates.len() {
        return Err(AggregateError::WeightCount {
            weights: weights.len(),
            updates: updates.len(),
        });
    }
    for (index, &value) in weights.iter().enumerate() {
        if !(value.is_finite() && value >= 0.0) {
            return Err(AggregateError::BadWeight { index, value });
        }
    }
    let total: f64 = weights.iter().sum();
    if !(total.is_finite() && total > 0.0) {
        return Err(AggregateError::BadWeightTotal { total });
    }
    for (index, u) in updates.iter().enumerate() {
        if u.len() != n {
            return Err(AggregateError::LengthMismatch {
                index,
                len: u.len(),
                expected: n,
            });
        }
    }
    if out.len() != n {
        return Err(AggregateError::OutputLength {
            len: out.len(),
            expected: n,
        });
    }
    // The norms double as the finiteness check: a sum of squares of finite f32 values
    // cannot overflow f64, so a non-finite norm means a non-finite input.
    let mut norms = Vec::with_capacity(updates.len());
    for (index, u) in updates.iter().enumerate() {
        let norm = l2_norm(u);
        if !norm.is_finite() {
            if let Some(position) = u.iter().position(|v| !v.is_finite()) {
                return Err(AggregateError::NonFinite { index, position });
            }
        }
        norms.push(norm);
    }

    let mut clipped = 0;
    let scaled: Vec<Option<Vec<f32>>> = match cfg.clip_factor {
        Some(c) => {
            let mut sorted = norms.clone();
            let median = median_f64(&mut sorted);
            let limit = c * median;
            norms
                .iter()
                .zip(updates)
                .map(|(&norm, u)| {
                    if median > 0.0 && norm > limit {
                        clipped += 1;
                        let s = limit / norm;
                        Some(u.iter().map(|&v| (f64::from(v) * s) as f32).collect())
                    } else {
                        None
                    }
                })
                .collect()
        }
        None => Vec::new(),
    };
    let views: Vec<&[f32]> = if scaled.is_empty() {
        updates.to_vec()
    } else {
        updates
            .iter()
            .zip(&scaled)
            .map(|(&u, s)| s.as_deref().unwrap_or(u))
            .collect()
    };

    match cfg.rule {
        Rule::Mean => {
            out.fill(0.0);
            for (x, &wi) in views.iter().zip(weights) {
                let w = (wi / total) as f32;
                for (g, x) in out.iter_mut().zip(x.iter()) {
                    *g += w * x;
                }
            }
        }
        Rule::Median => per_coordinate(&views, out, median_f32),
        Rule::TrimmedMean => {
            let m = views.len();
            let k = ((cfg.trim_fraction * m as f64).floor() as usize).min(m);
            per_coordinate(&views, out, |s| trimmed_mean_f32(s, k));
        }
    }
    Ok(AggregateReport { clipped, norms })
}

/// L2 norm in `f64`, with eight independent accumulators so the loop vectorizes.
fn l2_norm(x: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            let v = f64::from(v);
            *a += v * v;
        }
    }
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum();
    (acc.iter().sum::<f64>() + tail).sqrt()
}

/// Median of a non-empty slice (reorders it); 0 for an empty one.
fn median_f64(s: &mut [f64]) -> f64 {
    let m = s.len();
    if m == 0 {
        return 0.0;
    }
    let (lower, mid, _) = s.select_nth_unstable_by(m / 2, f64::total_cmp);
    let mid = *mid;
    if m % 2 == 1 {
        mid
    } else {
        let lo = lower.iter().copied().max_by(f64::total_cmp).unwrap_or(mid);
        (lo + mid) / 2.0
    }
}

/// Fills `out[j]` with `f(values of coordinate j across the updates)`, reusing one scratch
/// buffer of length `m`.
fn per_coordinate(updates: &[&[f32]], out: &mut [f32], mut f: impl FnMut(&mut [f32]) -> f32) {
    let mut scratch = vec![0f32; updates.len()];
    for (j, o) in out.iter_mut().enumerate() {
        for (s, u) in scratch.iter_mut().zip(updates) {
            *s = u[j];
        }
        *o = f(&mut scratch);
    }
}

/// Median of a slice (reorders it), averaging the two middle values in `f64` for an even
/// count; 0 for an empty one.
fn median_f32(s: &mut [f32]) -> f32 {
    let m = s.len();
    if m == 0 {
        return 0.0;
    }
    let (lower, mid, _) = s.select_nth_unstable_by(m / 2, f32::total_cmp);
    let mid = *mid;
    if m % 2 == 1 {
        mid
    } else {
        let lo = lower.iter().copied().max_by(f32::total_cmp).unwrap_or(mid);
        ((f64::from(lo) + f64::from(mid)) / 2.0) as f32
    }
}

/// Mean (in `f64`) of a slice after dropping its `k` smallest and `k` largest values
/// (reorders it); the median if that would drop everything.
fn trimmed_mean_f32(s: &mut [f32], k: usize) -> f32 {
    let m = s.len();
    if 2 * k >= m {
        return median_f32(s);
    }
    let kept = if k == 0 {
        &s[..]
    } else {
        // s[..k] become the k smallest; then within the rest, its last k the largest.
        s.select_nth_unstable_by(k, f32::total_cmp);
        let rest = &mut s[k..];
        let keep = m - 2 * k;
        rest.select_nth_unstable_by(keep, f32::total_cmp);
        &rest[..keep]
    };
    let sum: f64 = kept.iter().map(|&v| f64::from(v)).sum();
    (sum / kept.len() as f64) as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg(rule: Rule) -> AggregationConfig {
        AggregationConfig {
            rule,
            ..Default::default()
        }
    }

    fn run(
        updates: &[Vec<f32>],
        weights: &[f64],
        cfg: &AggregationConfig,
    ) -> Result<(Vec<f32>, AggregateReport), AggregateError> {
        let views: Vec<&[f32]> = updates.iter().map(|u| u.as_slice()).collect();
        let mut out = vec![f32::NAN; updates.first().map_or(0, |u| u.len())];
        let r = aggregate(&views, weights, cfg, &mut out)?;
        Ok((out, r))
    }

    fn dist(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
            .sum::<f64>()
            .sqrt()
    }

    fn norm(a: &[f32]) -> f64 {
        a.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt()
    }

    /// Five honest updates near 1.0 (small deterministic spread), 64 values each.
    fn honest() -> Vec<Vec<f32>> {
        (0..5)
            .map(|i| {
                (0..64)
                    .map(|j| 1.0 + 0.01 * (((i * 7 + j * 13) % 11) as f32 - 5.0))
                    .collect()
            })
            .collect()
    }

    fn unweighted_mean(updates: &[Vec<f32>]) -> Vec<f32> {
        (0..updates[0].len())
            .map(|j| {
                let s: f64 = updates.iter().map(|u| f64::from(u[j])).sum();
                (s / updates.len() as f64) as f32
            })
            .collect()
    }

    #[test]
    fn mean_is_the_documented_formula_bitwise() {
        let updates: Vec<Vec<f32>> = (0..4)
            .map(|i| {
                (0..257)
                    .map(|j| ((i * 31 + j * 17) % 97) as f32 * 0.013 - 0.6)
                    .collect()
            })
            .collect();
        let weights = [3.0, 7.0, 1.0, 12.0];
        let (out, report) = run(&updates, &weights, &cfg(Rule::Mean)).unwrap();

        let total: f64 = weights.iter().sum();
        let mut expect = vec![0f32; 257];
        for (x, &wi) in updates.iter().zip(&weights) {
            let w = (wi / total) as f32;
            for (g, x) in expect.iter_mut().zip(x) {
                *g += w * x;
            }
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&out), bits(&expect));
        assert_eq!(report.clipped, 0);
        assert_eq!(report.norms.len(), 4);
        for (n, u) in report.norms.iter().zip(&updates) {
            assert!((n - norm(u)).abs() < 1e-9 * n.max(1.0));
        }
    }

    #[test]
    fn mean_of_one_update_is_the_input_exactly() {
        let x: Vec<f32> = (0..1000)
            .map(|j| (j as f32 * 0.37).sin() * 1e-3 + if j % 3 == 0 { -0.0 } else { 0.0 })
            .collect();
        for w in [1.0, 64.0, 12345.0] {
            let (out, _) = run(std::slice::from_ref(&x), &[w], &cfg(Rule::Mean)).unwrap();
            // 0.0 + 1.0 * x is x, except -0.0 becomes +0.0; compare values for those.
            for (o, x) in out.iter().zip(&x) {
                if *x == 0.0 {
                    assert_eq!(*o, 0.0);
                } else {
                    assert_eq!(o.to_bits(), x.to_bits());
                }
            }
        }
    }

    /// The coordinator has historically used `n as f32 / total as f32`; the f64 division
    /// rounded to f32 is the same number for integer counts.
    #[test]
    fn mean_weight_matches_f32_division_of_counts() {
        for total in 1u32..300 {
            for n in 0..=total {
                let f64_way = (f64::from(n) / f64::from(total)) as f32;
                let f32_way = n as f32 / total as f32;
                assert_eq!(f64_way.to_bits(), f32_way.to_bits(), "{n}/{total}");
            }
        }
        for (n, total) in [(1u32, 3u32), (7, 4_000_000), (16_000_000, 16_777_215)] {
            let f64_way = (f64::from(n) / f64::from(total)) as f32;
            assert_eq!(f64_way.to_bits(), (n as f32 / total as f32).to_bits());
        }
    }

    #[test]
    fn mean_respects_weights() {
        let updates = vec![vec![1.0f32, 0.0, 4.0], vec![5.0, 8.0, 0.0]];
        let (out, _) = run(&updates, &[3.0, 1.0], &cfg(Rule::Mean)).unwrap();
        assert_eq!(out, vec![2.0, 2.0, 3.0]);
        // A zero weight is allowed and ignores that contribution.
        let (out, _) = run(&updates, &[0.0, 5.0], &cfg(Rule::Mean)).unwrap();
        assert_eq!(out, vec![5.0, 8.0, 0.0]);
    }

    #[test]
    fn robust_rules_resist_one_huge_attacker() {
        let honest = honest();
        let target = unweighted_mean(&honest);
        let mut all = honest.clone();
        all.push(vec![1e6; 64]);
        let w = [32.0; 6];

        let (mean, _) = run(&all, &w, &cfg(Rule::Mean)).unwrap();
        assert!(dist(&mean, &target) > 1e4, "mean is dragged away");

        let (median, _) = run(&all, &w, &cfg(Rule::Median)).unwrap();
        assert!(dist(&median, &target) < 0.5, "{}", dist(&median, &target));

        let trimmed = AggregationConfig {
            rule: Rule::TrimmedMean,
            trim_fraction: 0.2,
            clip_factor: None,
        };
        let (tm, _) = run(&all, &w, &trimmed).unwrap();
        assert!(dist(&tm, &target) < 0.5, "{}", dist(&tm, &target));
    }

    #[test]
    fn robust_rules_resist_one_sign_flipped_attacker() {
        let honest = honest();
        let target = unweighted_mean(&honest);
        let mut all = honest.clone();
        all.push(honest[0].iter().map(|v| -100.0 * v).collect());
        let w = [10.0; 6];

        let (mean, _) = run(&all, &w, &cfg(Rule::Mean)).unwrap();
        assert!(dist(&mean, &target) > 50.0);
        // The attacker even flips the mean's direction.
        assert!(mean.iter().all(|&v| v < 0.0));

        for c in [
            cfg(Rule::Median),
            AggregationConfig {
                rule: Rule::TrimmedMean,
                trim_fraction: 0.2,
                clip_factor: None,
            },
        ] {
            let (out, _) = run(&all, &w, &c).unwrap();
            assert!(
                dist(&out, &target) < 0.5,
                "{:?}: {}",
                c.rule,
                dist(&out, &target)
            );
        }
    }

    #[test]
    fn clipping_bounds_the_attacker() {
        let honest = honest();
        let target = unweighted_mean(&honest);
        let honest_norms: Vec<f64> = honest.iter().map(|u| norm(u)).collect();
        let max_honest = honest_norms.iter().cloned().fold(0.0, f64::max);
        for attacker in [
            vec![1e6f32; 64],
            honest[0].iter().map(|v| -100.0 * v).collect::<Vec<_>>(),
        ] {
            let mut all = honest.clone();
            all.push(attacker.clone());
            let c = AggregationConfig {
                rule: Rule::Mean,
                trim_fraction: 0.25,
                clip_factor: Some(2.0),
            };
            let (out, report) = run(&all, &[1.0; 6], &c).unwrap();
            assert_eq!(report.clipped, 1);
            assert_eq!(report.norms.len(), 6);
            // Reported norms are those of the inputs, before clipping.
            assert!((report.norms[5] - norm(&attacker)).abs() <= 1e-6 * norm(&attacker));

            let mut sorted = report.norms.clone();
            sorted.sort_by(f64::total_cmp);
            let median = (sorted[2] + sorted[3]) / 2.0;
            // A convex combination of vectors of norm <= 2 × median.
            assert!(norm(&out) <= 2.0 * median * (1.0 + 1e-5));
            // The attacker moves the mean by at most (2 × median + max honest) / 6.
            let bound = (2.0 * median + max_honest) / 6.0;
            assert!(dist(&out, &target) <= bound * (1.0 + 1e-5));
            // Without clipping it would have been far worse.
            let (unclipped, r) = run(&all, &[1.0; 6], &cfg(Rule::Mean)).unwrap();
            assert_eq!(r.clipped, 0);
            assert!(dist(&unclipped, &target) > 10.0 * bound);
        }
    }

    #[test]
    fn clipping_edge_cases() {
        let c = AggregationConfig {
            rule: Rule::Mean,
            trim_fraction: 0.25,
            clip_factor: Some(1.0),
        };
        // A single contribution is its own median: never clipped.
        let (out, r) = run(&[vec![3.0, 4.0]], &[1.0], &c).unwrap();
        assert_eq!((out, r.clipped, r.norms), (vec![3.0, 4.0], 0, vec![5.0]));
        // Median norm 0: nothing is clipped.
        let all = vec![vec![0.0, 0.0], vec![0.0, 0.0], vec![3.0, 4.0]];
        let (_, r) = run(&all, &[1.0; 3], &c).unwrap();
        assert_eq!(r.clipped, 0);
        // c = 1 scales the largest of three down to the median norm.
        let all = vec![vec![1.0, 0.0], vec![0.0, 2.0], vec![30.0, 40.0]];
        let c = AggregationConfig {
            rule: Rule::Median,
            ..c
        };
        let (out, r) = run(&all, &[1.0; 3], &c).unwrap();
        assert_eq!(r.clipped, 1);
        assert_eq!(r.norms, vec![1.0, 2.0, 50.0]);
        // Clipped to [1.2, 1.6]; per-coordinate medians of {1, 0, 1.2} and {0, 2, 1.6}.
        assert_eq!(out, vec![1.0, 1.6]);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        let odd = vec![vec![5.0f32, -1.0], vec![1.0, -3.0], vec![3.0, 10.0]];
        let (out, _) = run(&odd, &[1.0; 3], &cfg(Rule::Median)).unwrap();
        assert_eq!(out, vec![3.0, -1.0]);

        let even = vec![vec![4.0f32], vec![1.0], vec![2.0], vec![100.0]];
        let (out, _) = run(&even, &[1.0; 4], &cfg(Rule::Median)).unwrap();
        assert_eq!(out, vec![3.0]);

        // Weights do not matter to the median.
        let (out2, _) = run(&even, &[100.0, 1.0, 1.0, 0.0], &cfg(Rule::Median)).unwrap();
        assert_eq!(out2, out);

        let one = vec![vec![7.5f32, -2.0]];
        let (out, _) = run(&one, &[1.0], &cfg(Rule::Median)).unwrap();
        assert_eq!(out, vec![7.5, -2.0]);
    }

    #[test]
    fn trimmed_mean_cases() {
        let updates: Vec<Vec<f32>> = (0..7)
            .map(|i| {
                (0..33)
                    .map(|j| ((i * 5 + j * 3) % 13) as f32 * 0.7 - 2.0)
                    .collect()
            })
            .collect();
        let zero = AggregationConfig {
            rule: Rule::TrimmedMean,
            trim_fraction: 0.0,
            clip_factor: None,
        };
        let (out, _) = run(&updates, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], &zero).unwrap();
        assert_eq!(out, unweighted_mean(&updates));

        // m = 5, trim 0.25: floor(1.25) = 1 cut at each end.
        let five = vec![vec![-50.0f32], vec![1.0], vec![2.0], vec![6.0], vec![99.0]];
        let (out, _) = run(&five, &[1.0; 5], &cfg(Rule::TrimmedMean)).unwrap();
        assert_eq!(out, vec![3.0]);
        // m = 3, trim 0.25: floor(0.75) = 0, the plain unweighted mean.
        let three = vec![vec![0.0f32], vec![3.0], vec![30.0]];
        let (out, _) = run(&three, &[1.0; 3], &cfg(Rule::TrimmedMean)).unwrap();
        assert_eq!(out, vec![11.0]);
        // m = 2, trim 0.49: nothing cut.
        let c = AggregationConfig {
            rule: Rule::TrimmedMean,
            trim_fraction: 0.49,
            clip_factor: None,
        };
        let (out, _) = run(&[vec![1.0], vec![2.0]], &[1.0; 2], &c).unwrap();
        assert_eq!(out, vec![1.5]);
        // The drop-everything fallback is the median.
        let mut s = [4.0f32, 1.0, 3.0, 2.0];
        assert_eq!(trimmed_mean_f32(&mut s, 2), 2.5);
        let mut s = [4.0f32, 1.0, 3.0];
        assert_eq!(trimmed_mean_f32(&mut s, 7), 3.0);
    }

    #[test]
    fn errors() {
        let m = cfg(Rule::Mean);
        let mut out = [0f32; 2];
        assert_eq!(
            aggregate(&[], &[], &m, &mut out),
            Err(AggregateError::Empty)
        );

        let a = [1.0f32, 2.0];
        let b = [1.0f32, 2.0, 3.0];
        assert_eq!(
            aggregate(&[&a, &a, &b], &[1.0; 3], &m, &mut out),
            Err(AggregateError::LengthMismatch {
                index: 2,
                len: 3,
                expected: 2
            })
        );
        let mut short = [0f32; 1];
        assert_eq!(
            aggregate(&[&a], &[1.0], &m, &mut short),
            Err(AggregateError::OutputLength {
                len: 1,
                expected: 2
            })
        );

        let nan = [1.0f32, f32::NAN];
        let inf = [f32::NEG_INFINITY, 0.0];
        for rule in [Rule::Mean, Rule::Median, Rule::TrimmedMean] {
            let mut out = [9.0f32; 2];
            assert_eq!(
                aggregate(&[&a, &nan], &[1.0; 2], &cfg(rule), &mut out),
                Err(AggregateError::NonFinite {
                    index: 1,
                    position: 1
                })
            );
            assert_eq!(
                aggregate(&[&inf], &[1.0], &cfg(rule), &mut out),
                Err(AggregateError::NonFinite {
                    index: 0,
                    position: 0
                })
            );
            // Errors leave the output untouched.
            assert_eq!(out, [9.0; 2]);
        }

        assert_eq!(
            aggregate(&[&a, &a], &[1.0], &m, &mut out),
            Err(AggregateError::WeightCount {
                weights: 1,
                updates: 2
            })
        );
        assert_eq!(
            aggregate(&[&a, &a], &[1.0, -1.0], &m, &mut out),
            Err(AggregateError::BadWeight {
                index: 1,
                value: -1.0
            })
        );
        assert!(matches!(
            aggregate(&[&a], &[f64::NAN], &m, &mut out),
            Err(AggregateError::BadWeight { index: 0, .. })
        ));
        assert!(matches!(
            aggregate(&[&a], &[f64::INFINITY], &m, &mut out),
            Err(AggregateError::BadWeight { index: 0, .. })
        ));
        assert_eq!(
            aggregate(&[&a, &a], &[0.0, 0.0], &m, &mut out),
            Err(AggregateError::BadWeightTotal { total: 0.0 })
        );
        assert!(matches!(
            aggregate(&[&a, &a], &[f64::MAX, f64::MAX], &m, &mut out),
            Err(AggregateError::BadWeightTotal { .. })
        ));

        let bad = AggregationConfig {
            trim_fraction: 0.5,
            ..Default::default()
        };
        assert!(matches!(
            aggregate(&[&a], &[1.0], &bad, &mut out),
            Err(AggregateError::Config(_))
        ));
        // Messages name the culprit.
        let e = AggregateError::LengthMismatch {
            index: 4,
            len: 3,
            expected: 2,
        };
        assert_eq!(
            e.to_string(),
            "contribution 4 has 3 values, contribution 0 has 2"
        );
    }

    #[test]
    fn validate_ranges() {
        let ok = |trim: f64, clip: Option<f64>| {
            AggregationConfig {
                rule: Rule::TrimmedMean,
                trim_fraction: trim,
                clip_factor: clip,
            }
            .validate()
        };
        assert!(AggregationConfig::default().validate().is_ok());
        assert!(ok(0.0, None).is_ok());
        assert!(ok(0.49, Some(1.0)).is_ok());
        assert!(ok(0.25, Some(3.5)).is_ok());
        assert!(ok(0.5, None).is_err());
        assert!(ok(0.7, None).is_err());
        assert!(ok(-0.1, None).is_err());
        assert!(ok(f64::NAN, None).is_err());
        assert!(ok(f64::INFINITY, None).is_err());
        assert!(ok(0.25, Some(0.99)).is_err());
        assert!(ok(0.25, Some(-2.0)).is_err());
        assert!(ok(0.25, Some(f64::NAN)).is_err());
        assert!(ok(0.25, Some(f64::INFINITY)).is_err());
    }

    #[test]
    fn config_serde() {
        let c: AggregationConfig = serde_json::from_str(r#"{"rule":"trimmed_mean"}"#).unwrap();
        assert_eq!(
            c,
            AggregationConfig {
                rule: Rule::TrimmedMean,
                trim_fraction: 0.25,
                clip_factor: None,
            }
        );
        let c: AggregationConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, AggregationConfig::default());
        assert_eq!(c.rule, Rule::Mean);
        let c: AggregationConfig =
            serde_json::from_str(r#"{"rule":"median","clip_factor":2.0,"trim_fraction":0.1}"#)
                .unwrap();
        assert_eq!(c.rule, Rule::Median);
        assert_eq!(c.clip_factor, Some(2.0));
        assert_eq!(c.trim_fraction, 0.1);
        // Round trip.
        let back: AggregationConfig =
            serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);

        assert!(serde_json::from_str::<AggregationConfig>(r#"{"rules":"median"}"#).is_err());
        assert!(serde_json::from_str::<AggregationConfig>(r#"{"rule":"TrimmedMean"}"#).is_err());
        assert!(serde_json::from_str::<AggregationConfig>(r#"{"rule":"mode"}"#).is_err());
    }

    fn small_round() -> impl Strategy<Value = (Vec<Vec<f32>>, Vec<f64>)> {
        (1usize..8, 1usize..50).prop_flat_map(|(m, len)| {
            (
                proptest::collection::vec(proptest::collection::vec(-100f32..100f32, len), m),
                proptest::collection::vec(0.0f64..100.0, m),
            )
        })
    }

    proptest! {
        #[test]
        fn robust_outputs_lie_within_the_inputs(
            (updates, mut weights) in small_round(),
            trim in 0.0f64..0.5,
            clip in proptest::option::of(1.0f64..10.0),
        ) {
            weights[0] += 1.0; // a positive total
            for rule in [Rule::Median, Rule::TrimmedMean, Rule::Mean] {
                let c = AggregationConfig { rule, trim_fraction: trim, clip_factor: clip };
                let (out, report) = run(&updates, &weights, &c).unwrap();
                prop_assert_eq!(report.norms.len(), updates.len());
                prop_assert!(report.clipped < updates.len().max(2));
                if clip.is_some() || rule == Rule::Mean {
                    continue; // clipping moves the inputs; the f32 mean may round past them
                }
                for (j, &o) in out.iter().enumerate() {
                    let lo = updates.iter().map(|u| u[j]).fold(f32::INFINITY, f32::min);
                    let hi = updates.iter().map(|u| u[j]).fold(f32::NEG_INFINITY, f32::max);
                    prop_assert!(lo <= o && o <= hi, "{:?} coord {}: {} not in [{}, {}]", rule, j, o, lo, hi);
                }
            }
        }

        #[test]
        fn never_panics(
            updates in proptest::collection::vec(
                proptest::collection::vec(any::<f32>(), 0..6), 0..6),
            weights in proptest::collection::vec(any::<f64>(), 0..7),
            rule in prop_oneof![Just(Rule::Mean), Just(Rule::Median), Just(Rule::TrimmedMean)],
            trim in any::<f64>(),
            clip in proptest::option::of(any::<f64>()),
            out_len in 0usize..6,
        ) {
            let views: Vec<&[f32]> = updates.iter().map(|u| u.as_slice()).collect();
            let mut out = vec![0f32; out_len];
            let c = AggregationConfig { rule, trim_fraction: trim, clip_factor: clip };
            let _ = aggregate(&views, &weights, &c, &mut out);
        }
    }
}
