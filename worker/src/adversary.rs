//! TEST ONLY: workers that cheat, for the verification tests and experiments.
//!
//! Each mode computes a wrong update but commits to it and signs it exactly as an honest
//! worker would, claiming the task's inputs (parameters, indices): what a real cheater
//! sends. Only re-execution can tell them apart. Never enable this on a real run.

use std::str::FromStr;

use executor::{ExecError, Executor, RawUpdate};
use proto::Task;
use rand::{Rng, SeedableRng};

/// How a cheating worker cheats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Gaussian noise with the norm of the honest update.
    Noise,
    /// The honest update times 10.
    Scaled,
    /// The honest update negated.
    SignFlip,
    /// All zeros, no work done.
    Zero,
    /// Computed on the first parameters it ever received (an old model).
    Stale,
    /// Computed on other samples than the task's.
    WrongData,
    /// The update of its previous task, sent again as if computed for this one.
    Copy,
    /// Computed on the first half of the samples (or inner steps) only.
    Partial,
}

impl Mode {
    /// Every mode, in a fixed order.
    pub const ALL: [Mode; 8] = [
        Mode::Noise,
        Mode::Scaled,
        Mode::SignFlip,
        Mode::Zero,
        Mode::Stale,
        Mode::WrongData,
        Mode::Copy,
        Mode::Partial,
    ];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Noise => "noise",
            Mode::Scaled => "scaled",
            Mode::SignFlip => "sign-flip",
            Mode::Zero => "zero",
            Mode::Stale => "stale",
            Mode::WrongData => "wrong-data",
            Mode::Copy => "copy",
            Mode::Partial => "partial",
        }
    }
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Mode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Mode::ALL.iter().map(|m| m.name()).collect();
                format!("unknown adversary {s:?}; one of {}", names.join(", "))
            })
    }
}

/// A cheating strategy and its memory.
pub struct Adversary {
    mode: Mode,
    /// Fraction of tasks cheated on (the rest are honest).
    rate: f64,
    first_params: Option<Vec<f32>>,
    previous: Option<RawUpdate>,
    /// Tasks cheated on so far.
    pub cheated: u64,
}

impl Adversary {
    /// Cheats with `mode` on a fraction `rate` of the tasks (decided per task id).
    pub fn new(mode: Mode, rate: f64) -> Self {
        Adversary {
            mode,
            rate: rate.clamp(0.0, 1.0),
            first_params: None,
            previous: None,
            cheated: 0,
        }
    }

    /// Computes what this adversary sends for `task`, starting from `params`.
    pub fn compute(
        &mut self,
        exec: &mut Executor,
        params: &[f32],
        task: &Task,
    ) -> Result<RawUpdate, ExecError> {
        let first = self
            .first_params
            .get_or_insert_with(|| params.to_vec())
            .clone();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(task.task_id ^ 0xadd5);
        let (idx, micro, steps) = (&task.indices, &task.micro_batches, task.inner_steps);
        // What an honest result commits to: one state hash per inner step.
        let n_leaves = if steps { micro.len() } else { 0 };
        if rng.gen::<f64>() >= self.rate {
            let honest = exec.compute(params, idx, micro, steps)?;
            self.previous = Some(honest.clone());
            return Ok(honest);
        }
        self.cheated += 1;
        let mut out = match self.mode {
            Mode::Zero => RawUpdate {
                values: vec![0.0; exec.n_params()],
                loss_sum: 2.3 * idx.len() as f64,
                n: idx.len(),
                leaves: vec![[0; 32]; n_leaves],
            },
            Mode::Stale => exec.compute(&first, idx, micro, steps)?,
            Mode::WrongData => {
                let n = exec.data().len() as u32;
                let other: Vec<u32> = idx.iter().map(|i| (i + 7919) % n).collect();
                exec.compute(params, &other, micro, steps)?
            }
            Mode::Copy => match self.previous.clone() {
                Some(p) if p.values.len() == exec.n_params() => p,
                _ => exec.compute(params, idx, micro, steps)?,
            },
            Mode::Partial => {
                let (idx2, micro2) = first_half(idx, micro);
                let mut r = exec.compute(params, &idx2, &micro2, steps)?;
                r.leaves.resize(n_leaves, [0; 32]);
                r
            }
            Mode::Noise | Mode::Scaled | Mode::SignFlip => {
                let mut r = exec.compute(params, idx, micro, steps)?;
                match self.mode {
                    Mode::Noise => {
                        let norm = r.values.iter().map(|x| x * x).sum::<f32>().sqrt();
                        let scale = norm / (r.values.len() as f32).sqrt();
                        for v in &mut r.values {
                            *v = scale * standard_normal(&mut rng);
                        }
                    }
                    Mode::Scaled => r.values.iter_mut().for_each(|v| *v *= 10.0),
                    _ => r.values.iter_mut().for_each(|v| *v = -*v),
                }
                r
            }
        };
        out.n = idx.len();
        self.previous = Some(out.clone());
        Ok(out)
    }
}

/// The first half of the samples: of one micro-batch, or the first half of the inner steps.
fn first_half(idx: &[u32], micro: &[u32]) -> (Vec<u32>, Vec<u32>) {
    if micro.len() == 1 {
        let h = idx.len().div_ceil(2);
        return (idx[..h].to_vec(), vec![h as u32]);
    }
    let steps = micro.len().div_ceil(2);
    let samples: u32 = micro[..steps].iter().sum();
    (idx[..samples as usize].to_vec(), micro[..steps].to_vec())
}

/// A standard normal sample (Box-Muller).
fn standard_normal(rng: &mut impl Rng) -> f32 {
    let u1: f64 = rng.gen::<f64>().max(1e-12);
    let u2: f64 = rng.gen();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for m in Mode::ALL {
            assert_eq!(m.name().parse::<Mode>().unwrap(), m);
        }
        assert!("honest".parse::<Mode>().is_err());
    }

    #[test]
    fn partial_keeps_the_first_half() {
        assert_eq!(first_half(&[1, 2, 3], &[3]), (vec![1, 2], vec![2]));
        assert_eq!(
            first_half(&[1, 2, 3, 4, 5], &[2, 2, 1]),
            (vec![1, 2, 3, 4], vec![2, 2])
        );
    }
}
