//! The global batch schedule: a seeded permutation per epoch, cut into batches.

use rand::seq::SliceRandom;
use rand::SeedableRng;

/// Which samples each optimizer step uses. Every epoch visits each sample once, in an order
/// fixed by the seed, so a run and its single-process reference see the same batches.
#[derive(Clone, Debug)]
pub struct BatchSchedule {
    n: usize,
    batch: usize,
    seed: u64,
    cached: Option<(u64, Vec<u32>)>,
}

impl BatchSchedule {
    /// A schedule over `n` samples with global batch `batch` (>= 1).
    pub fn new(n: usize, batch: usize, seed: u64) -> Self {
        BatchSchedule {
            n,
            batch: batch.max(1),
            seed,
            cached: None,
        }
    }

    /// Steps in one epoch (the last batch may be smaller).
    pub fn steps_per_epoch(&self) -> u64 {
        self.n.div_ceil(self.batch) as u64
    }

    /// Epoch a step belongs to.
    pub fn epoch_of(&self, step: u64) -> u64 {
        step / self.steps_per_epoch().max(1)
    }

    /// The permutation of epoch `epoch`.
    pub fn permutation(&self, epoch: u64) -> Vec<u32> {
        let mut perm: Vec<u32> = (0..self.n as u32).collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
            self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        perm.shuffle(&mut rng);
        perm
    }

    /// The sample indices of global step `step`.
    pub fn batch(&mut self, step: u64) -> Vec<u32> {
        let spe = self.steps_per_epoch().max(1);
        let (epoch, k) = (step / spe, (step % spe) as usize);
        if self.cached.as_ref().map(|c| c.0) != Some(epoch) {
            self.cached = Some((epoch, self.permutation(epoch)));
        }
        let perm = &self.cached.as_ref().map(|c| &c.1);
        let perm = perm.map(|p| p.as_slice()).unwrap_or(&[]);
        let start = (k * self.batch).min(perm.len());
        let end = ((k + 1) * self.batch).min(perm.len());
        perm[start..end].to_vec()
    }
}

/// Splits `indices` into `parts` contiguous chunks whose sizes differ by at most one, never
/// more chunks than indices (at least one).
pub fn split(indices: &[u32], parts: usize) -> Vec<Vec<u32>> {
    split_exact(indices, parts.max(1).min(indices.len().max(1)))
}

/// Splits `indices` into exactly `parts` (>= 1) contiguous chunks whose sizes differ by at
/// most one; some are empty when there are fewer indices than parts.
pub fn split_exact(indices: &[u32], parts: usize) -> Vec<Vec<u32>> {
    let parts = parts.max(1);
    let (q, r) = (indices.len() / parts, indices.len() % parts);
    let mut out = Vec::with_capacity(parts);
    let mut o = 0;
    for i in 0..parts {
        let len = q + usize::from(i < r);
        out.push(indices[o..o + len].to_vec());
        o += len;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_cover_every_sample_once() {
        let mut s = BatchSchedule::new(10, 4, 3);
        assert_eq!(s.steps_per_epoch(), 3);
        let mut seen: Vec<u32> = (0..3).flat_map(|k| s.batch(k)).collect();
        assert_eq!(s.batch(2).len(), 2);
        seen.sort();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        let e0: Vec<u32> = (0..3).flat_map(|k| s.batch(k)).collect();
        let e1: Vec<u32> = (3..6).flat_map(|k| s.batch(k)).collect();
        assert_ne!(e0, e1, "each epoch has its own order");
        assert_eq!(BatchSchedule::new(10, 4, 3).batch(4), s.batch(4));
    }

    #[test]
    fn split_is_balanced_and_complete() {
        let idx: Vec<u32> = (0..10).collect();
        let parts = split(&idx, 3);
        assert_eq!(
            parts.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![4, 3, 3]
        );
        assert_eq!(parts.concat(), idx);
        assert_eq!(split(&idx[..2], 5).len(), 2);
        let exact = split_exact(&idx[..2], 4);
        assert_eq!(
            exact.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![1, 1, 0, 0]
        );
    }
}
