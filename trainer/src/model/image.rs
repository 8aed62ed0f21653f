//! The image classifiers for 28x28 grey images (Fashion-MNIST): inputs `[n,1,28,28]`,
//! logits `[n,10]`.

use tch::{nn, nn::Module, Tensor};

use super::Architecture;

/// conv3x3(32)-relu-pool-conv3x3(64)-relu-pool-fc128-relu-fc10.
pub struct Cnn {
    conv1: nn::Conv2D,
    conv2: nn::Conv2D,
    fc1: nn::Linear,
    fc2: nn::Linear,
}

impl Cnn {
    /// Creates the variables under `p` (`conv1.weight`, ...), PyTorch's default init.
    pub fn new(p: &nn::Path) -> Self {
        let conv = nn::ConvConfig {
            padding: 1,
            ..Default::default()
        };
        Cnn {
            conv1: nn::conv2d(p / "conv1", 1, 32, 3, conv),
            conv2: nn::conv2d(p / "conv2", 32, 64, 3, conv),
            fc1: nn::linear(p / "fc1", 64 * 7 * 7, 128, Default::default()),
            fc2: nn::linear(p / "fc2", 128, 10, Default::default()),
        }
    }
}

impl Architecture for Cnn {
    fn forward(&self, xs: &Tensor) -> Tensor {
        xs.apply(&self.conv1)
            .relu()
            .max_pool2d_default(2)
            .apply(&self.conv2)
            .relu()
            .max_pool2d_default(2)
            .flat_view()
            .apply(&self.fc1)
            .relu()
            .apply(&self.fc2)
    }
}

/// 784-128-relu-10.
pub struct Mlp {
    fc1: nn::Linear,
    fc2: nn::Linear,
}

impl Mlp {
    /// Creates the variables under `p` (`fc1.weight`, ...), PyTorch's default init.
    pub fn new(p: &nn::Path) -> Self {
        Mlp {
            fc1: nn::linear(p / "fc1", 28 * 28, 128, Default::default()),
            fc2: nn::linear(p / "fc2", 128, 10, Default::default()),
        }
    }
}

impl Architecture for Mlp {
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.fc1.forward(&xs.flat_view()).relu().apply(&self.fc2)
    }
}
