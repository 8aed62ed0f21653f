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
        let mut h = blake3::Hasher::new_derive_key("dtrain optimizer state v1");
        h.update(&self.cfg.digest());
        h.update(&self.steps.to_le_bytes());
        for buf in [&self.m, &self.v] {
            h.update(&(buf.len() as u64).to_le_bytes());
            // Each value's little-endian bytes; in one piece where that is the memory
            // layout, so that blake3 hashes many chunks at once.
            #[cfg(target_endian = "little")]
            h.update(bytemuck::cast_slice(buf));
            #[cfg(target_endian = "big")]
            for x in buf.iter() {
                h.update(&x.to_le_bytes());
            }
        }
        *h.finalize().as_bytes()
    }

    /// Applies one update to `params` with gradient `grad`.
    pub fn step(&mut self, params: &mut [f32], grad: &[f32]) -> Result<(), TrainError> {
        if params.len() != grad.len() {
            return Err(TrainError::Length {
                expected: params.len(),
                got: grad.len(),
            });
        }
        if grad.iter().any(|g| !g.is_finite()) {
            return Err(TrainError::NonFinite("gradient"));
        }
        self.steps += 1;
        match self.cfg.kind {
            OptimizerKind::Sgd => self.sgd(params, grad),
            OptimizerKind::Adam | OptimizerKind::AdamW => self.adam(params, grad),
        }
        Ok(())
    }

    fn sgd(&mut self, params: &mut [f32], grad: &[f32]) {
        let c = &self.cfg;
        let (lr, wd, mu) = (c.lr as f32, c.weight_decay as f32, c.momentum as f32);
        let first = self.m.is_empty();
        if mu != 0.0 && first {
            self.m = vec![0.0; params.len()];
        }
        for i in 0..params.len() {
            let mut g = grad[i];
            if wd != 0.0 {
                g += wd * params[i];
            }
            if mu != 0.0 {
                let b = if first { g } else { mu * self.m[i] + g };
                self.m[i] = b;
                g = if c.nesterov { g + mu * b } else { b };
            }
            params[i] -= lr * g;
        }
    }

    fn adam(&mut self, params: &mut [f32], grad: &[f32]) {
        let c = &self.cfg;
        if self.m.is_empty() {
            self.m = vec![0.0; params.len()];
            self.v = vec![0.0; params.len()];
        }
        let t = self.steps as i32;
        let (b1, b2) = (c.beta1 as f32, c.beta2 as f32);
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt() as f32;
        let step_size = (c.lr / bc1) as f32;
        let (eps, wd, lr) = (c.eps as f32, c.weight_decay as f32, c.lr as f32);
        let decoupled = c.kind == OptimizerKind::AdamW;
        for i in 0..params.len() {
            let mut g = grad[i];
            if wd != 0.0 {
                if decoupled {
                    params[i] *= 1.0 - lr * wd;
                } else {
                    g += wd * params[i];
                }
            }
            let m = b1 * self.m[i] + (1.0 - b1) * g;
            let v = b2 * self.v[i] + (1.0 - b2) * g * g;
            self.m[i] = m;
            self.v[i] = v;
            params[i] -= step_size * m / (v.sqrt() / bc2_sqrt + eps);
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
    fn refuses_bad_gradients() {
        let mut o = Optimizer::new(OptimizerConfig::default());
        let mut p = vec![1.0f32; 3];
        assert!(o.step(&mut p, &[1.0, f32::NAN, 0.0]).is_err());
        assert!(o.step(&mut p, &[1.0]).is_err());
        assert_eq!(p, vec![1.0; 3]);
    }
}
