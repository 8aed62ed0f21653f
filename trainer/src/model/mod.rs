//! The models. Parameters are exposed as one flat `f32` vector in a fixed order (variables
//! sorted by name), which is what travels on the wire and what the optimizers update.
//!
//! The seam every architecture goes through is [`Architecture`]: a forward pass from a
//! batch's inputs to logits. [`Net`] holds the variables of any architecture and gives the
//! flat-vector view; the loss, gradient and evaluation ([`crate::step`]) work on logits and
//! targets alone, so the image models and the transformer share them.

pub mod image;
pub mod llama;

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Tensor};

use crate::TrainError;
pub use llama::LlamaConfig;

/// Model architectures by name (the `[model] kind` of a run config).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// conv3x3(32)-pool-conv3x3(64)-pool-fc128-fc10, 421,642 parameters.
    #[default]
    Cnn,
    /// 784-128-10 perceptron, 101,770 parameters (fast, for tests).
    Mlp,
    /// A Llama-style transformer language model ([`LlamaConfig`]).
    Llama,
}

/// A complete model description: the architecture and, for the transformer, its
/// dimensions. Its [`ModelSpec::digest`] is what the wire and the commitments bind, so a
/// worker cannot train another model than the run's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ModelSpec {
    /// The image CNN.
    Cnn,
    /// The image MLP.
    Mlp,
    /// The transformer.
    Llama(Box<LlamaConfig>),
}

impl ModelSpec {
    /// Short architecture name (`cnn`, `mlp`, `llama`).
    pub fn name(&self) -> &'static str {
        match self {
            ModelSpec::Cnn => "cnn",
            ModelSpec::Mlp => "mlp",
            ModelSpec::Llama(_) => "llama",
        }
    }

    /// Whether the model reads token windows (a language model) rather than images.
    pub fn is_language_model(&self) -> bool {
        matches!(self, ModelSpec::Llama(_))
    }

    /// Canonical JSON (the wire form).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses and validates the wire form.
    pub fn from_json(s: &str) -> Result<Self, String> {
        if s.len() > 1 << 16 {
            return Err("model spec larger than 64 KiB".into());
        }
        let spec: ModelSpec = serde_json::from_str(s).map_err(|e| e.to_string())?;
        spec.validate()?;
        Ok(spec)
    }

    /// Checks the dimensions (see [`LlamaConfig::validate`]).
    pub fn validate(&self) -> Result<(), String> {
        match self {
            ModelSpec::Llama(c) => c.validate(),
            _ => Ok(()),
        }
    }

    /// blake3 of the canonical JSON, under its own domain.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key("dtrain model spec v1");
        h.update(self.to_json().as_bytes());
        *h.finalize().as_bytes()
    }
}

/// What every architecture provides: logits for a batch of inputs. Inputs and logits by
/// architecture: images `[n,1,28,28]` f32 give `[n,10]`; token ids `[n,seq]` i64 give
/// `[n,seq,vocab]`. Targets have the logits' shape without the last dimension, so the loss
/// is one cross-entropy over the flattened positions for every model.
pub trait Architecture: Send {
    /// Logits for `inputs` (on the variables' device).
    fn forward(&self, inputs: &Tensor) -> Tensor;
}

/// A model instance with its variables.
pub struct Net {
    /// Architecture.
    pub spec: ModelSpec,
    vs: nn::VarStore,
    arch: Box<dyn Architecture>,
    /// Variables sorted by name, with their element counts.
    vars: Vec<(String, Tensor, usize)>,
    n_params: usize,
}

/// Runs `f` with libtorch's random generator seeded with `seed`, holding it alone: the
/// generator is one per process, so two nets initialised at once on two threads would
/// otherwise draw from each other's seed.
pub(crate) fn with_seed<T>(seed: u64, f: impl FnOnce() -> T) -> T {
    static GENERATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _alone = GENERATOR
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    tch::manual_seed(seed as i64);
    f()
}

impl Net {
    /// Builds the model on `device` with weights initialised from `seed` (deterministic).
    /// The spec must be valid ([`ModelSpec::validate`]).
    pub fn new(spec: &ModelSpec, device: Device, seed: u64) -> Self {
        with_seed(seed, || Self::build(spec, device))
    }

    fn build(spec: &ModelSpec, device: Device) -> Self {
        let vs = nn::VarStore::new(device);
        let p = vs.root();
        let arch: Box<dyn Architecture> = match spec {
            ModelSpec::Cnn => Box::new(image::Cnn::new(&p)),
            ModelSpec::Mlp => Box::new(image::Mlp::new(&p)),
            ModelSpec::Llama(c) => {
                Box::new(llama::Llama::new(&p, c).mixed_precision(device.is_cuda()))
            }
        };
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let vars: Vec<(String, Tensor, usize)> = named
            .into_iter()
            .map(|(n, t)| {
                let numel = t.numel();
                (n, t, numel)
            })
            .collect();
        let n_params = vars.iter().map(|v| v.2).sum();
        Net {
            spec: spec.clone(),
            vs,
            arch,
            vars,
            n_params,
        }
    }

    /// The variables (for libtorch's own optimizers).
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// Device the variables live on.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Number of parameters.
    pub fn n_params(&self) -> usize {
        self.n_params
    }

    /// Logits for a batch of inputs (see [`Architecture`]).
    pub fn forward(&self, inputs: &Tensor) -> Tensor {
        self.arch.forward(inputs)
    }

    /// Names and shapes of the variables, in flat order.
    pub fn layout(&self) -> Vec<(String, Vec<i64>)> {
        self.vars
            .iter()
            .map(|(n, t, _)| (n.clone(), t.size()))
            .collect()
    }

    /// The parameters as one flat vector.
    pub fn flat_params(&self) -> Vec<f32> {
        self.gather(|t| Some(t.detach()))
    }

    /// The gradients of the last backward pass as one flat vector (zeros where none).
    pub fn flat_grads(&self) -> Vec<f32> {
        self.gather(|t| {
            let g = t.grad();
            g.defined().then_some(g)
        })
    }

    fn gather(&self, pick: impl Fn(&Tensor) -> Option<Tensor>) -> Vec<f32> {
        let mut out = vec![0f32; self.n_params];
        let mut o = 0;
        for (_, t, n) in &self.vars {
            if let Some(src) = pick(t) {
                let src = src.to_device(Device::Cpu).contiguous().view([-1]);
                src.copy_data(&mut out[o..o + n], *n);
            }
            o += n;
        }
        out
    }

    /// Overwrites the parameters from a flat vector.
    pub fn set_flat_params(&mut self, flat: &[f32]) -> Result<(), TrainError> {
        if flat.len() != self.n_params {
            return Err(TrainError::Length {
                expected: self.n_params,
                got: flat.len(),
            });
        }
        let device = self.device();
        tch::no_grad(|| {
            let mut o = 0;
            for (_, t, n) in self.vars.iter_mut() {
                let src = Tensor::from_slice(&flat[o..o + *n])
                    .view(t.size().as_slice())
                    .to_device(device);
                t.copy_(&src);
                o += *n;
            }
        });
        Ok(())
    }

    /// Zeroes the gradients of all variables.
    pub fn zero_grad(&mut self) {
        for (_, t, _) in self.vars.iter_mut() {
            let mut g = t.grad();
            if g.defined() {
                let _ = g.detach_().zero_();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cnn_has_expected_size_and_layout() {
        let net = Net::new(&ModelSpec::Cnn, Device::Cpu, 0);
        assert_eq!(net.n_params(), 421_642);
        let names: Vec<String> = net.layout().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names[0], "conv1.bias");
        assert_eq!(
            Net::new(&ModelSpec::Mlp, Device::Cpu, 0).n_params(),
            101_770
        );
    }

    #[test]
    fn init_is_seeded_and_flat_round_trips() {
        let a = Net::new(&ModelSpec::Mlp, Device::Cpu, 5);
        let b = Net::new(&ModelSpec::Mlp, Device::Cpu, 5);
        let c = Net::new(&ModelSpec::Mlp, Device::Cpu, 6);
        assert_eq!(a.flat_params(), b.flat_params());
        assert_ne!(a.flat_params(), c.flat_params());
        let mut d = Net::new(&ModelSpec::Mlp, Device::Cpu, 7);
        d.set_flat_params(&a.flat_params()).unwrap();
        assert_eq!(d.flat_params(), a.flat_params());
        assert!(d.set_flat_params(&[0.0; 3]).is_err());
    }
}
