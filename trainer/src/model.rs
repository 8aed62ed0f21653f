//! The models. Parameters are exposed as one flat `f32` vector in a fixed order (variables
//! sorted by name), which is what travels on the wire and what the optimizers update.

use serde::{Deserialize, Serialize};
use tch::{nn, nn::Module, Device, Tensor};

use crate::TrainError;

/// Model architectures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// conv3x3(32)-pool-conv3x3(64)-pool-fc128-fc10, 421,642 parameters.
    #[default]
    Cnn,
    /// 784-128-10 perceptron, 101,770 parameters (fast, for tests).
    Mlp,
}

impl ModelKind {
    /// Name used on the wire.
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Cnn => "cnn",
            ModelKind::Mlp => "mlp",
        }
    }

    /// Parses a wire name.
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "cnn" => Some(ModelKind::Cnn),
            "mlp" => Some(ModelKind::Mlp),
            _ => None,
        }
    }
}

struct CnnLayers {
    conv1: nn::Conv2D,
    conv2: nn::Conv2D,
    fc1: nn::Linear,
    fc2: nn::Linear,
}

enum Layers {
    Cnn(Box<CnnLayers>),
    Mlp { fc1: nn::Linear, fc2: nn::Linear },
}

/// A model instance with its variables.
pub struct Net {
    /// Architecture.
    pub kind: ModelKind,
    vs: nn::VarStore,
    layers: Layers,
    /// Variables sorted by name, with their element counts.
    vars: Vec<(String, Tensor, usize)>,
    n_params: usize,
}

impl Net {
    /// Builds the model on `device` with weights initialised from `seed` (deterministic).
    pub fn new(kind: ModelKind, device: Device, seed: u64) -> Self {
        tch::manual_seed(seed as i64);
        let vs = nn::VarStore::new(device);
        let p = vs.root();
        let conv = nn::ConvConfig {
            padding: 1,
            ..Default::default()
        };
        let layers = match kind {
            ModelKind::Cnn => Layers::Cnn(Box::new(CnnLayers {
                conv1: nn::conv2d(&p / "conv1", 1, 32, 3, conv),
                conv2: nn::conv2d(&p / "conv2", 32, 64, 3, conv),
                fc1: nn::linear(&p / "fc1", 64 * 7 * 7, 128, Default::default()),
                fc2: nn::linear(&p / "fc2", 128, 10, Default::default()),
            })),
            ModelKind::Mlp => Layers::Mlp {
                fc1: nn::linear(&p / "fc1", 28 * 28, 128, Default::default()),
                fc2: nn::linear(&p / "fc2", 128, 10, Default::default()),
            },
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
            kind,
            vs,
            layers,
            vars,
            n_params,
        }
    }

    /// Device the variables live on.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Number of parameters.
    pub fn n_params(&self) -> usize {
        self.n_params
    }

    /// Logits for a batch `[n,1,28,28]`.
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        match &self.layers {
            Layers::Cnn(l) => xs
                .apply(&l.conv1)
                .relu()
                .max_pool2d_default(2)
                .apply(&l.conv2)
                .relu()
                .max_pool2d_default(2)
                .flat_view()
                .apply(&l.fc1)
                .relu()
                .apply(&l.fc2),
            Layers::Mlp { fc1, fc2 } => fc1.forward(&xs.flat_view()).relu().apply(fc2),
        }
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
        let net = Net::new(ModelKind::Cnn, Device::Cpu, 0);
        assert_eq!(net.n_params(), 421_642);
        let names: Vec<String> = net.layout().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names[0], "conv1.bias");
        assert_eq!(Net::new(ModelKind::Mlp, Device::Cpu, 0).n_params(), 101_770);
    }

    #[test]
    fn init_is_seeded_and_flat_round_trips() {
        let a = Net::new(ModelKind::Mlp, Device::Cpu, 5);
        let b = Net::new(ModelKind::Mlp, Device::Cpu, 5);
        let c = Net::new(ModelKind::Mlp, Device::Cpu, 6);
        assert_eq!(a.flat_params(), b.flat_params());
        assert_ne!(a.flat_params(), c.flat_params());
        let mut d = Net::new(ModelKind::Mlp, Device::Cpu, 7);
        d.set_flat_params(&a.flat_params()).unwrap();
        assert_eq!(d.flat_params(), a.flat_params());
        assert!(d.set_flat_params(&[0.0; 3]).is_err());
    }
}
