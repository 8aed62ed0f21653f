//! A round's parts: how its global batches are split over the workers, and the attempts at
//! each part.

use std::sync::Arc;
use std::time::Instant;

use proto::TaskResult;

/// One try at a part, by one connection.
pub struct Attempt {
    /// The task sent.
    pub task_id: u64,
    /// To whom.
    pub conn: u64,
    /// When.
    pub started: Instant,
    /// When it is given up on (the part goes elsewhere, the attempt may still answer).
    pub deadline: Instant,
    /// Whether an answer can still come.
    pub live: bool,
    /// The error-feedback base the task was given.
    pub ef_base: u64,
}

/// An accepted result of a part.
pub struct Answer {
    /// The worker that computed it.
    pub worker: verify::WorkerId,
    /// The result.
    pub result: Arc<TaskResult>,
}

/// A slice of a round's samples.
pub struct Part {
    /// Sample indices, micro-batch after micro-batch.
    pub indices: Vec<u32>,
    /// Micro-batch sizes (one per global batch of the round).
    pub micro: Vec<u32>,
    /// The accepted answer.
    pub done: Option<Answer>,
    /// Tries so far.
    pub attempts: Vec<Attempt>,
}

impl Part {
    /// Whether the part needs another worker: not done and no live attempt within its deadline.
    pub fn needs_worker(&self, now: Instant) -> bool {
        self.done.is_none() && !self.attempts.iter().any(|a| a.live && a.deadline > now)
    }
}

/// Sizes of `parts` shares of `len` samples. Equal (differing by at most one) unless
/// `speeds` (samples per second, one per part) says the fastest is more than 1.5x the
/// slowest; then proportional to speed (largest remainder), at least one sample each when
/// there are enough.
pub fn shares(len: usize, speeds: Option<&[f64]>) -> Vec<usize> {
    let n = speeds.map_or(0, <[f64]>::len);
    let usable = speeds.filter(|s| {
        let (lo, hi) = s
            .iter()
            .fold((f64::MAX, 0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        n > 1 && lo > 0.0 && lo.is_finite() && hi.is_finite() && hi > 1.5 * lo
    });
    let Some(speeds) = usable else {
        let parts = n.max(1);
        return (0..parts)
            .map(|i| len / parts + usize::from(i < len % parts))
            .collect();
    };
    let min_each = usize::from(len >= n);
    let rest = len - min_each * n;
    let total: f64 = speeds.iter().sum();
    let exact: Vec<f64> = speeds.iter().map(|s| s / total * rest as f64).collect();
    let mut out: Vec<usize> = exact.iter().map(|e| e.floor() as usize).collect();
    let mut left = rest - out.iter().sum::<usize>();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| {
        let fa = exact[a] - exact[a].floor();
        let fb = exact[b] - exact[b].floor();
        fb.total_cmp(&fa).then(a.cmp(&b))
    });
    for &i in order.iter().cycle() {
        if left == 0 {
            break;
        }
        out[i] += 1;
        left -= 1;
    }
    out.iter().map(|s| s + min_each).collect()
}

/// Splits a round's batches into `n` parts, each batch cut by `shares`.
pub fn split(batches: &[Vec<u32>], n: usize, speeds: Option<&[f64]>) -> Vec<Part> {
    let mut parts: Vec<Part> = (0..n)
        .map(|_| Part {
            indices: Vec::new(),
            micro: Vec::new(),
            done: None,
            attempts: Vec::new(),
        })
        .collect();
    for b in batches {
        let sizes = shares(b.len(), speeds.filter(|s| s.len() == n));
        let sizes = if sizes.len() == n {
            sizes
        } else {
            (0..n)
                .map(|i| b.len() / n + usize::from(i < b.len() % n))
                .collect()
        };
        let mut o = 0;
        for (p, s) in parts.iter_mut().zip(sizes) {
            p.indices.extend_from_slice(&b[o..o + s]);
            p.micro.push(s as u32);
            o += s;
        }
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_speeds_give_equal_shares() {
        assert_eq!(shares(10, Some(&[1.0, 1.2, 1.4])), vec![4, 3, 3]);
        assert_eq!(shares(10, None), vec![10]);
        assert_eq!(shares(2, Some(&[1.0, 1.0, 1.0])), vec![1, 1, 0]);
    }

    #[test]
    fn a_slow_worker_gets_less() {
        let s = shares(64, Some(&[100.0, 100.0, 25.0]));
        assert_eq!(s.iter().sum::<usize>(), 64);
        assert!(s[2] < s[0] / 3 && s[2] >= 1, "{s:?}");
        // Never zero while there are enough samples.
        let s = shares(3, Some(&[1000.0, 1.0, 1.0]));
        assert_eq!(s, vec![1, 1, 1]);
    }

    #[test]
    fn split_covers_every_batch_in_order() {
        let batches = vec![(0..10).collect::<Vec<u32>>(), (10..17).collect()];
        let parts = split(&batches, 3, Some(&[10.0, 10.0, 2.0]));
        let mut all: Vec<u32> = parts.iter().flat_map(|p| p.indices.clone()).collect();
        all.sort();
        assert_eq!(all, (0..17).collect::<Vec<_>>());
        for p in &parts {
            assert_eq!(p.micro.len(), 2);
            assert_eq!(p.micro.iter().sum::<u32>() as usize, p.indices.len());
        }
        assert!(parts[2].indices.len() < parts[0].indices.len());
    }
}
