//! Optimizers over flat `f32` vectors, written out in plain Rust so that their state is
//! serializable (checkpoints) and their arithmetic is the same on every machine. The update
//! rules follow PyTorch's `SGD` (momentum, Nesterov), `Adam` and `AdamW`.

use serde::{Deserialize, Serialize};

use crate::TrainError;

/// Which update rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// Stochastic gradient descent, optional (Nesterov) momentum.
    Sgd,
    /// Adam with L2 weight decay added to the gradient.
    #[default]
    Adam,
    /// Adam with decoupled weight decay.
    AdamW,
}

impl OptimizerKind {
    /// Name used in configs and on the wire.
    pub fn name(self) -> &'static str {
        match self {
            OptimizerKind::Sgd => "sgd",
            OptimizerKind::Adam => "adam",
            OptimizerKind::AdamW => "adamw",
        }
    }

    /// Parses a name.
    pub fn from_name(s: &str) -> Option<Self> {
        [
            OptimizerKind::Sgd,
            OptimizerKind::Adam,
            OptimizerKind::AdamW,
        ]
        .into_iter()
        .find(|k| k.name() == s)
    }
}

/// Optimizer hyperparameters (the `[optimizer]` table of a run config).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizerConfig {
    /// Update rule.
    pub kind: OptimizerKind,
    /// Learning rate.
    pub lr: f64,
    /// Adam's first-moment decay.
    pub beta1: f64,
    /// Adam's second-moment decay.
    pub beta2: f64,
    /// Adam's epsilon.
    pub eps: f64,
    /// Weight decay (L2 for sgd/adam, decoupled for adamw).
    pub weight_decay: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// SGD Nesterov momentum.
    pub nesterov: bool,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig {
            kind: OptimizerKind::Adam,
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            momentum: 0.0,
            nesterov: false,
        }
    }
}

impl OptimizerConfig {
    /// Checks ranges; returns a message naming the bad field.
    pub fn validate(&self) -> Result<(), String> {
        let finite = [
            self.lr,
            self.beta1,
            self.beta2,
            self.eps,
            self.weight_decay,
            self.momentum,
        ];
        if finite.iter().any(|v| !v.is_finite()) {
            return Err("optimizer values must be finite".into());
        }
        if self.lr <= 0.0 {
            return Err(format!("optimizer.lr must be > 0, got {}", self.lr));
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return Err("optimizer.beta1 and beta2 must be in [0, 1)".into());
        }
        if self.weight_decay < 0.0 || self.eps <= 0.0 || !(0.0..1.0).contains(&self.momentum) {
            return Err(
                "optimizer.weight_decay >= 0, eps > 0 and momentum in [0, 1) are required".into(),
            );
        }
        if self.nesterov && self.momentum == 0.0 {
            return Err("optimizer.nesterov needs momentum > 0".into());
        }
        Ok(())
    }

    /// Canonical blake3 of the hyperparameters (bound into work commitments).
    pub fn digest(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key("dtrain optimizer v1");
        h.update(&[self.kind as u8, u8::from(self.nesterov)]);
        for v in [
            self.lr,
            self.beta1,
            self.beta2,
            self.eps,
            self.weight_decay,
            self.momentum,
        ] {
            h.update(&v.to_le_bytes());
        }
        *h.finalize().as_bytes()
    }
}

/// An optimizer and its state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Optimizer {
    /// Hyperparameters.
    pub cfg: OptimizerConfig,
    /// Steps taken.
    pub steps: u64,
    /// First moment (Adam) or momentum buffer (SGD); empty until needed.
    m: Vec<f32>,
    /// Second moment (Adam); empty until needed.
    v: Vec<f32>,
}

impl Optimizer {
    /// A fresh optimizer.
    pub fn new(cfg: OptimizerConfig) -> Self {
        Optimizer {
            cfg,
            steps: 0,
            m: Vec::new(),
            v: Vec::new(),
        }
    }

    /// blake3 of the optimizer's state (hyperparameters, step count, moment buffers): two
    /// optimizers with equal digests make the same next step.
    pub fn state_digest(&self) -> [u8; 32] {
        self.digest_by(|h, bytes| {
            h.update(bytes);
        })
    }

    /// [`Optimizer::state_digest`] (the same digest) over the threads of the current rayon
    /// pool, with blake3's `update_rayon`: call it inside `rayon::ThreadPool::install`,
    /// since outside one rayon's global pool takes every core.
    pub fn state_digest_rayon(&self) -> [u8; 32] {
        self.digest_by(|h, bytes| {
            h.update_rayon(bytes);
        })
    }

    /// The state digest, feeding each moment buffer's bytes to the hasher with `feed`.
    fn digest_by(&self, feed: impl Fn(&mut blake3::Hasher, &[u8])) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key("dtrain optimizer state v1");
        h.update(&self.cfg.digest());
        h.update(&self.steps.to_le_bytes());
        for buf in [&self.m, &self.v] {
            h.update(&(buf.len() as u64).to_le_bytes());
            // Each value's little-endian bytes; in one piece where that is the memory
            // layout, so that blake3 hashes many chunks at once.
            #[cfg(target_endian = "little")]
            feed(&mut h, bytemuck::cast_slice(buf));
            #[cfg(target_endian = "big")]
            for x in buf.iter() {
                feed(&mut h, &x.to_le_bytes());
            }
        }
        *h.finalize().as_bytes()
    }

    /// Applies one update to `params` with gradient `grad`; with a million parameters or
    /// more, on libtorch's intra-op thread count (what `runtime::set_threads` sets: the
    /// threads the process may keep busy, idle between gradients), with the same bits.
    ///
    /// # Errors
    /// [`TrainError::Length`] when the lengths differ, [`TrainError::NonFinite`] for a NaN
    /// or infinite gradient value (nothing is changed then).
    pub fn step(&mut self, params: &mut [f32], grad: &[f32]) -> Result<(), TrainError> {
        self.step_on(params, grad, tch::get_num_threads().max(1) as usize)
    }

    /// [`Optimizer::step`] on up to `threads` threads.
    fn step_on(
        &mut self,
        params: &mut [f32],
        grad: &[f32],
        threads: usize,
    ) -> Result<(), TrainError> {
        if params.len() != grad.len() {
            return Err(TrainError::Length {
                expected: params.len(),
                got: grad.len(),
            });
        }
        if grad.iter().any(|g| !g.is_finite()) {
            return Err(TrainError::NonFinite("gradient"));
        }
        // The moments are empty until the first step, then as long as the parameters (a
        // state read from a file may be neither).
        if let Some(buf) = [&self.m, &self.v]
            .into_iter()
            .find(|b| !b.is_empty() && b.len() != params.len())
        {
            return Err(TrainError::Length {
                expected: params.len(),
                got: buf.len(),
            });
        }
        self.steps += 1;
        match self.cfg.kind {
            OptimizerKind::Sgd => self.sgd(params, grad, threads),
            OptimizerKind::Adam | OptimizerKind::AdamW => self.adam(params, grad, threads),
        }
        Ok(())
    }

    fn sgd(&mut self, params: &mut [f32], grad: &[f32], threads: usize) {
        let c = &self.cfg;
        let k = SgdStep {
            lr: c.lr as f32,
            wd: c.weight_decay as f32,
            mu: c.momentum as f32,
            nesterov: c.nesterov,
            first: self.m.is_empty(),
        };
        if k.mu != 0.0 && k.first {
            self.m = vec![0.0; params.len()];
        }
        in_chunks(threads, params, &mut self.m, &mut [], grad, |p, m, _, g| {
            k.apply(p, m, g)
        });
    }

    fn adam(&mut self, params: &mut [f32], grad: &[f32], threads: usize) {
        let c = &self.cfg;
        if self.m.is_empty() {
            self.m = vec![0.0; params.len()];
            self.v = vec![0.0; params.len()];
        }
        let t = self.steps as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let k = AdamStep {
            b1: c.beta1 as f32,
            b2: c.beta2 as f32,
            bc2_sqrt: (1.0 - c.beta2.powi(t)).sqrt() as f32,
            step_size: (c.lr / bc1) as f32,
            eps: c.eps as f32,
            wd: c.weight_decay as f32,
            lr: c.lr as f32,
            decoupled: c.kind == OptimizerKind::AdamW,
        };
        in_chunks(
            threads,
            params,
            &mut self.m,
            &mut self.v,
            grad,
            |p, m, v, g| k.apply(p, m, v, g),
        );
    }
}

/// Below this many parameters an update runs on the calling thread alone: starting threads
/// would cost more than it saves.
const PARALLEL_MIN: usize = 1 << 20;

/// Runs `f` over matching chunks of `params`, the two state buffers (each either as long as
/// `params` or empty, which gives empty chunks) and `grad`: on the calling thread below
/// [`PARALLEL_MIN`] parameters, else on up to `threads` scoped threads (chunks of at least
/// a quarter of [`PARALLEL_MIN`]). Every value is computed by the same operations either
/// way, so the result is bitwise the same.
fn in_chunks<F>(
    threads: usize,
    params: &mut [f32],
    a: &mut [f32],
    b: &mut [f32],
    grad: &[f32],
    f: F,
) where
    F: Fn(&mut [f32], &mut [f32], &mut [f32], &[f32]) + Sync,
{
    let n = params.len();
    let threads = if n < PARALLEL_MIN {
        1
    } else {
        threads.min(n / (PARALLEL_MIN / 4))
    };
    if threads <= 1 {
        return f(params, a, b, grad);
    }
    let len = n.div_ceil(threads);
    let chunks = params
        .chunks_mut(len)
        .zip(parts(a, len, threads))
        .zip(parts(b, len, threads))
        .zip(grad.chunks(len));
    // The chunks go to whichever thread asks next: this one and the others started, so
    // that a thread the system refuses only means fewer threads.
    let queue = std::sync::Mutex::new(chunks);
    let work = || loop {
        let next = queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .next();
        let Some((((p, a), b), g)) = next else { break };
        f(p, a, b, g);
    };
    std::thread::scope(|scope| {
        for _ in 1..threads {
            if std::thread::Builder::new()
                .name("optimizer".into())
                .spawn_scoped(scope, work)
                .is_err()
            {
                break;
            }
        }
        work();
    });
}

/// `s` in chunks of `len`, or `count` empty chunks when `s` is empty (a state buffer the
/// optimizer does not use).
fn parts(s: &mut [f32], len: usize, count: usize) -> Vec<&mut [f32]> {
    if s.is_empty() {
        (0..count).map(|_| Default::default()).collect()
    } else {
        s.chunks_mut(len).collect()
    }
}

/// The constants of one SGD step (PyTorch's `torch.optim.SGD`: weight decay added to the
/// gradient, momentum buffer seeded with the first gradient, optional Nesterov).
struct SgdStep {
    lr: f32,
    wd: f32,
    mu: f32,
    nesterov: bool,
    /// The momentum buffer is new (this is its first step).
    first: bool,
}

impl SgdStep {
    /// `params -= lr * update` elementwise; `m` is the momentum buffer (empty without
    /// momentum).
    fn apply(&self, params: &mut [f32], m: &mut [f32], grad: &[f32]) {
        let (lr, wd, mu) = (self.lr, self.wd, self.mu);
        for i in 0..params.len() {
            let mut g = grad[i];
            if wd != 0.0 {
                g += wd * params[i];
            }
            if mu != 0.0 {
                let b = if self.first { g } else { mu * m[i] + g };
                m[i] = b;
                g = if self.nesterov { g + mu * b } else { b };
            }
            params[i] -= lr * g;
        }
    }
}

/// The constants of one Adam/AdamW step at step count t (PyTorch's `torch.optim.Adam` and
/// `AdamW`, non-fused: `step_size = lr / (1 - beta1^t)`, denominator
/// `sqrt(v) / sqrt(1 - beta2^t) + eps`; AdamW decays the parameters by `1 - lr * wd` first).
struct AdamStep {
    b1: f32,
    b2: f32,
    bc2_sqrt: f32,
    step_size: f32,
    eps: f32,
    wd: f32,
    lr: f32,
    decoupled: bool,
}

impl AdamStep {
    /// One step over matching slices of the parameters, both moments and the gradient.
    fn apply(&self, params: &mut [f32], m: &mut [f32], v: &mut [f32], grad: &[f32]) {
        let (b1, b2) = (self.b1, self.b2);
        for i in 0..params.len() {
            let mut g = grad[i];
            if self.wd != 0.0 {
                if self.decoupled {
                    params[i] *= 1.0 - self.lr * self.wd;
                } else {
                    g += self.wd * params[i];
                }
            }
            let mi = b1 * m[i] + (1.0 - b1) * g;
            let vi = b2 * v[i] + (1.0 - b2) * g * g;
            m[i] = mi;
            v[i] = vi;
            params[i] -= self.step_size * mi / (vi.sqrt() / self.bc2_sqrt + self.eps);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::OptimizerConfig as _;
    use tch::{nn, Device, Kind, Tensor};

    /// Runs `steps` updates of torch's own optimizer on a fixed quadratic and ours on the
    /// same gradients; returns the largest absolute difference of the parameters.
    fn compare_with_torch(cfg: OptimizerConfig, steps: usize) -> f32 {
        let vs = nn::VarStore::new(Device::Cpu);
        let init: Vec<f32> = (0..257)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let w = vs.root().var_copy("w", &Tensor::from_slice(&init));
        let mut topt = match cfg.kind {
            OptimizerKind::Adam => nn::Adam {
                beta1: cfg.beta1,
                beta2: cfg.beta2,
                wd: cfg.weight_decay,
                eps: cfg.eps,
                amsgrad: false,
            }
            .build(&vs, cfg.lr)
            .unwrap(),
            OptimizerKind::AdamW => nn::AdamW {
                beta1: cfg.beta1,
                beta2: cfg.beta2,
                wd: cfg.weight_decay,
                eps: cfg.eps,
                amsgrad: false,
            }
            .build(&vs, cfg.lr)
            .unwrap(),
            OptimizerKind::Sgd => nn::Sgd {
                momentum: cfg.momentum,
                dampening: 0.0,
                wd: cfg.weight_decay,
                nesterov: cfg.nesterov,
            }
            .build(&vs, cfg.lr)
            .unwrap(),
        };
        let mut ours = Optimizer::new(cfg);
        let mut p = init.clone();
        for _ in 0..steps {
            topt.zero_grad();
            // loss = sum(cos(w)) + 0.1 * sum(w^2): gradient -sin(w) + 0.2 w, bounded steps.
            let loss = w.cos().sum(Kind::Float) + (&w * &w).sum(Kind::Float) * 0.1;
            loss.backward();
            let g: Vec<f32> = p.iter().map(|x| -x.sin() + 0.2 * x).collect();
            topt.step();
            ours.step(&mut p, &g).unwrap();
        }
        let mut theirs = vec![0f32; p.len()];
        w.detach().copy_data(&mut theirs, p.len());
        p.iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn matches_torch_optimizers() {
        let adam = OptimizerConfig {
            lr: 0.01,
            ..Default::default()
        };
        assert!(compare_with_torch(adam.clone(), 50) < 1e-4);
        let adam_wd = OptimizerConfig {
            weight_decay: 0.1,
            ..adam.clone()
        };
        assert!(compare_with_torch(adam_wd.clone(), 50) < 1e-4);
        let adamw = OptimizerConfig {
            kind: OptimizerKind::AdamW,
            ..adam_wd
        };
        assert!(compare_with_torch(adamw, 50) < 1e-4);
        let nesterov = OptimizerConfig {
            kind: OptimizerKind::Sgd,
            lr: 0.01,
            momentum: 0.9,
            nesterov: true,
            ..Default::default()
        };
        assert!(compare_with_torch(nesterov, 50) < 1e-4);
    }

    #[test]
    fn validate_and_digest() {
        assert!(OptimizerConfig::default().validate().is_ok());
        let bad = OptimizerConfig {
            lr: f64::NAN,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        let other = OptimizerConfig {
            lr: 2e-3,
            ..Default::default()
        };
        assert_ne!(OptimizerConfig::default().digest(), other.digest());
    }

    #[test]
    fn state_digest_hashes_each_moment_little_endian() {
        let mut o = Optimizer::new(OptimizerConfig::default());
        let before = o.state_digest();
        let mut p = vec![0.5f32; 1500];
        let g: Vec<f32> = (0..1500).map(|i| (i as f32 * 0.01).sin()).collect();
        o.step(&mut p, &g).unwrap();
        assert_ne!(o.state_digest(), before);
        let mut h = blake3::Hasher::new_derive_key("dtrain optimizer state v1");
        h.update(&o.cfg.digest());
        h.update(&o.steps.to_le_bytes());
        for buf in [&o.m, &o.v] {
            h.update(&(buf.len() as u64).to_le_bytes());
            for x in buf.iter() {
                h.update(&x.to_le_bytes());
            }
        }
        assert_eq!(o.state_digest(), *h.finalize().as_bytes());
    }

    #[test]
    fn large_updates_split_over_threads_give_the_same_bits() {
        let n = 2 * PARALLEL_MIN + 12_345;
        let init: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 1001) as f32 - 500.0) / 250.0)
            .collect();
        let kinds = [
            (OptimizerKind::AdamW, 0.0, false),
            (OptimizerKind::Adam, 0.0, false),
            (OptimizerKind::Sgd, 0.9, true),
            (OptimizerKind::Sgd, 0.0, false),
        ];
        for (kind, momentum, nesterov) in kinds {
            let cfg = OptimizerConfig {
                kind,
                weight_decay: 0.01,
                momentum,
                nesterov,
                ..Default::default()
            };
            let run = |threads: usize| {
                let mut o = Optimizer::new(cfg.clone());
                let mut p = init.clone();
                for s in 0..3 {
                    let g: Vec<f32> = p.iter().map(|x| (x * (s + 2) as f32).sin()).collect();
                    o.step_on(&mut p, &g, threads).unwrap();
                }
                (p, o.state_digest())
            };
            let (one, d1) = run(1);
            let (three, d3) = run(3);
            let same = one
                .iter()
                .zip(&three)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same && d1 == d3, "{kind:?}: 3 threads differ from 1");
            assert!(one.iter().zip(&init).any(|(a, b)| a != b), "{kind:?} moved");
        }
    }

    #[test]
    fn refuses_bad_gradients() {
        let mut o = Optimizer::new(OptimizerConfig::default());
        let mut p = vec![1.0f32; 3];
        assert!(o.step(&mut p, &[1.0, f32::NAN, 0.0]).is_err());
        assert!(o.step(&mut p, &[1.0]).is_err());
        assert_eq!(p, vec![1.0; 3]);
        // Moments of 3 values cannot step 4 parameters.
        o.step(&mut p, &[0.1; 3]).unwrap();
        let mut q = vec![1.0f32; 4];
        assert!(matches!(
            o.step(&mut q, &[0.1; 4]),
            Err(TrainError::Length {
                expected: 4,
                got: 3
            })
        ));
        assert_eq!(q, vec![1.0; 4]);
    }
}
