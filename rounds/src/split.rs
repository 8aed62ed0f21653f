//! How a round's samples are cut into parts, and the speed weights that size the parts.

use std::collections::HashMap;

/// Sizes of shares of `len` samples proportional to `weights` (largest remainder, ties to
/// the earlier part), at least one sample each when there are enough. Equal weights give
/// sizes that differ by at most one. Weights that are not all finite and positive count as
/// equal.
pub fn shares(len: usize, weights: &[f64]) -> Vec<usize> {
    let n = weights.len().max(1);
    let ok = weights.len() == n && weights.iter().all(|w| w.is_finite() && *w > 0.0);
    let equal = vec![1.0; n];
    let weights = if ok { weights } else { &equal[..] };
    let min_each = usize::from(len >= n);
    let rest = len - min_each * n;
    let total: f64 = weights.iter().sum();
    let exact: Vec<f64> = weights.iter().map(|w| w / total * rest as f64).collect();
    let mut out: Vec<usize> = exact.iter().map(|e| e.floor() as usize).collect();
    let left = rest - out.iter().sum::<usize>().min(rest);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| {
        let fa = exact[a] - exact[a].floor();
        let fb = exact[b] - exact[b].floor();
        fb.total_cmp(&fa).then(a.cmp(&b))
    });
    for &i in order.iter().cycle().take(left) {
        out[i] += 1;
    }
    out.iter().map(|s| s + min_each).collect()
}

/// A part's samples: indices micro-batch after micro-batch, and the micro-batch sizes (one
/// per inner batch of the round).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Slice {
    /// Sample indices.
    pub indices: Vec<u32>,
    /// Micro-batch sizes; they sum to `indices.len()`.
    pub micro: Vec<u32>,
}

/// Splits a round's inner batches into one slice per weight, each batch cut by [`shares`].
pub fn split(batches: &[Vec<u32>], weights: &[f64]) -> Vec<Slice> {
    let mut parts = vec![Slice::default(); weights.len()];
    for b in batches {
        let mut o = 0;
        for (p, s) in parts.iter_mut().zip(shares(b.len(), weights)) {
            p.indices.extend_from_slice(&b[o..o + s]);
            p.micro.push(s as u32);
            o += s;
        }
    }
    parts
}

/// Relative shares of the connected workers, adjusted so that they finish their parts at the
/// same time: after each round the weight of a worker more than 20% off the median time is
/// multiplied by `sqrt(median / its time)` (damped); the weights of the others drift toward
/// equal. A worker's time includes a fixed overhead, so weights from per-sample speed would
/// wander with the noise; these converge.
#[derive(Default)]
pub struct Balancer {
    weights: HashMap<u64, f64>,
}

impl Balancer {
    /// Weights of `conns`, whose measured milliseconds per sample are `ms` (`None`: not
    /// measured). A connection not weighed yet gets a weight from its measured speed, on
    /// the scale of the others (`w = k / ms`, `k` the mean `w x ms` of those weighed and
    /// measured; with nobody weighed, weights in proportion to speed with mean 1), so that a
    /// slow newcomer does not start with an equal share; unmeasured, the mean weight.
    pub fn weights(&self, conns: &[u64], ms: &[Option<f64>]) -> Vec<f64> {
        let ms: Vec<Option<f64>> = (0..conns.len())
            .map(|i| {
                ms.get(i)
                    .copied()
                    .flatten()
                    .filter(|m| m.is_finite() && *m > 0.0)
            })
            .collect();
        let have: Vec<Option<f64>> = conns.iter().map(|c| self.weights.get(c).copied()).collect();
        let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
        let pairs: Vec<f64> = have
            .iter()
            .zip(&ms)
            .filter_map(|(w, m)| Some((*w)? * (*m)?))
            .collect();
        let k = mean(&pairs).or_else(|| {
            let speed: f64 = ms.iter().flatten().map(|m| 1.0 / m).sum();
            let n = ms.iter().flatten().count();
            (have.iter().all(Option::is_none) && n > 0).then(|| n as f64 / speed)
        });
        let first: Vec<Option<f64>> = have
            .iter()
            .zip(&ms)
            .map(|(w, m)| w.or_else(|| Some(k? / (*m)?)))
            .collect();
        let fallback = mean(&first.iter().flatten().copied().collect::<Vec<_>>()).unwrap_or(1.0);
        first.into_iter().map(|w| w.unwrap_or(fallback)).collect()
    }

    /// Takes the compute times (ms) of a round's parts, one per connection that did one.
    pub fn observe(&mut self, times: &[(u64, f64)]) {
        let valid: Vec<(u64, f64)> = times.iter().copied().filter(|(_, t)| *t > 0.0).collect();
        if valid.len() < 2 {
            return;
        }
        let mut sorted: Vec<f64> = valid.iter().map(|(_, t)| *t).collect();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        let conns: Vec<u64> = valid.iter().map(|(c, _)| *c).collect();
        let before = self.weights(&conns, &[]);
        let in_band = |t: f64| (t / median - 1.0).abs() <= 0.2;
        // Workers whose times agree with the median drift toward equal shares among them
        // (where overhead dominates, shares barely change times and would wander with noise);
        // the others move toward the median time.
        let band: Vec<f64> = before
            .iter()
            .zip(&valid)
            .filter(|(_, (_, t))| in_band(*t))
            .map(|(w, _)| w.ln())
            .collect();
        let centre = band.iter().sum::<f64>() / band.len().max(1) as f64;
        let after: Vec<f64> = before
            .iter()
            .zip(&valid)
            .map(|(w, (_, t))| {
                if in_band(*t) {
                    (centre + 0.8 * (w.ln() - centre)).exp()
                } else {
                    w * (median / t).sqrt().clamp(0.5, 2.0)
                }
            })
            .collect();
        let scale = before.iter().sum::<f64>() / after.iter().sum::<f64>();
        for (c, w) in conns.iter().zip(after) {
            self.weights.insert(*c, (w * scale).clamp(1e-3, 1e3));
        }
    }

    /// Forgets a connection.
    pub fn remove(&mut self, conn: u64) {
        self.weights.remove(&conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_weights_give_equal_shares() {
        assert_eq!(shares(10, &[1.0, 1.0, 1.0]), vec![4, 3, 3]);
        assert_eq!(shares(10, &[1.0]), vec![10]);
        assert_eq!(shares(2, &[1.0, 1.0, 1.0]), vec![1, 1, 0]);
        assert_eq!(
            shares(7, &[1.0, f64::NAN]),
            vec![4, 3],
            "bad weights: equal"
        );
    }

    #[test]
    fn weights_set_the_shares() {
        let s = shares(64, &[4.0, 4.0, 1.0]);
        assert_eq!(s.iter().sum::<usize>(), 64);
        assert_eq!(s, vec![28, 28, 8]);
        // Never zero while there are enough samples.
        assert_eq!(shares(3, &[1000.0, 1.0, 1.0]), vec![1, 1, 1]);
    }

    #[test]
    fn split_covers_every_batch_in_order() {
        let batches = vec![(0..10).collect::<Vec<u32>>(), (10..17).collect()];
        let parts = split(&batches, &[5.0, 5.0, 1.0]);
        let mut all: Vec<u32> = parts.iter().flat_map(|p| p.indices.clone()).collect();
        all.sort();
        assert_eq!(all, (0..17).collect::<Vec<_>>());
        for p in &parts {
            assert_eq!(p.micro.len(), 2);
            assert_eq!(p.micro.iter().sum::<u32>() as usize, p.indices.len());
        }
        assert!(parts[2].indices.len() < parts[0].indices.len());
    }

    /// Rounds of 96 samples over workers whose time is `overhead + n * cost`.
    fn simulate(costs: &[f64], overhead: f64, rounds: usize) -> Vec<usize> {
        let conns: Vec<u64> = (0..costs.len() as u64).collect();
        let mut b = Balancer::default();
        let mut sizes = Vec::new();
        for _ in 0..rounds {
            sizes = shares(96, &b.weights(&conns, &[]));
            let times: Vec<(u64, f64)> = conns
                .iter()
                .zip(&sizes)
                .zip(costs)
                .map(|((c, n), k)| (*c, overhead + *n as f64 * k))
                .collect();
            b.observe(&times);
        }
        sizes
    }

    #[test]
    fn a_newcomer_starts_from_its_measured_speed() {
        let mut b = Balancer::default();
        // Nobody weighed: weights follow speed, mean 1; unmeasured ones get the mean.
        let w = b.weights(&[1, 2, 3], &[Some(1.0), Some(10.0), None]);
        let expect = [2.0 / 1.1, 0.2 / 1.1];
        assert!(
            (w[0] - expect[0]).abs() < 1e-9 && (w[1] - expect[1]).abs() < 1e-9,
            "{w:?}"
        );
        assert!((w[2] - (w[0] + w[1]) / 2.0).abs() < 1e-9);
        // Weighed ones keep their weights; a newcomer 10x slower than them gets a tenth.
        b.observe(&[(1, 10.0), (2, 10.0)]);
        let w = b.weights(&[1, 2, 3], &[Some(1.0), Some(1.0), Some(10.0)]);
        assert!((w[2] * 10.0 - w[0]).abs() < 1e-9, "{w:?}");
        // Bad speeds count as unmeasured.
        let w = b.weights(&[1, 3], &[Some(1.0), Some(f64::NAN)]);
        assert!((w[1] - w[0]).abs() < 1e-9, "{w:?}");
    }

    #[test]
    fn shares_converge_to_equal_finish_times_without_drifting() {
        // Equal workers with a large fixed overhead stay equal.
        assert_eq!(simulate(&[1.0, 1.0, 1.0], 50.0, 50), vec![32, 32, 32]);
        // A worker 5x slower ends with about a fifth of the others' share.
        let s = simulate(&[1.0, 1.0, 5.0], 5.0, 50);
        assert!(s[2] * 3 < s[0] && s[2] >= 5, "{s:?}");
        let times: Vec<f64> = s
            .iter()
            .zip([1.0, 1.0, 5.0])
            .map(|(n, k)| 5.0 + *n as f64 * k)
            .collect();
        let (lo, hi) = times
            .iter()
            .fold((f64::MAX, 0f64), |(l, h), t| (l.min(*t), h.max(*t)));
        assert!(hi / lo < 1.3, "finish times {times:?}");
    }
}
