//! The training step shared by workers, re-execution and the single-process reference.

use tch::Tensor;

use crate::data::TrainData;
use crate::{Net, TrainError};

/// Result of one gradient computation.
pub struct GradOutput {
    /// Mean gradient of the cross-entropy loss over the samples (over every token position
    /// for a language model), flat.
    pub grad: Vec<f32>,
    /// Sum of the per-sample losses (a window's loss is its mean over positions).
    pub loss_sum: f64,
    /// Number of samples.
    pub n: usize,
}

/// Mean cross-entropy of `logits` against `targets` over every position: logits have the
/// targets' shape plus a last class dimension (`[n,10]` vs `[n]`, `[n,seq,vocab]` vs
/// `[n,seq]`). PyTorch's `F.cross_entropy(logits.view(-1, C), targets.view(-1))`.
pub fn loss(logits: &Tensor, targets: &Tensor) -> Tensor {
    let classes = logits.size().last().copied().unwrap_or(1);
    logits
        .view([-1, classes])
        .cross_entropy_for_logits(&targets.view([-1]))
}

/// Mean gradient of the cross-entropy loss over `indices` at the net's current parameters.
pub fn gradient(
    net: &mut Net,
    data: &TrainData,
    indices: &[u32],
) -> Result<GradOutput, TrainError> {
    if indices.is_empty() {
        return Ok(GradOutput {
            grad: vec![0.0; net.n_params()],
            loss_sum: 0.0,
            n: 0,
        });
    }
    net.zero_grad();
    let (xs, ys) = data.batch(indices)?;
    let dev = net.device();
    let logits = net.forward(&xs.to_device(dev));
    let loss = loss(&logits, &ys.to_device(dev));
    loss.backward();
    let mean_loss = loss.double_value(&[]);
    let grad = net.flat_grads();
    if !mean_loss.is_finite() || grad.iter().any(|g| !g.is_finite()) {
        return Err(TrainError::NonFinite("gradient"));
    }
    Ok(GradOutput {
        grad,
        loss_sum: mean_loss * indices.len() as f64,
        n: indices.len(),
    })
}

/// Accuracy and mean loss on a data set.
#[derive(Clone, Copy, Debug)]
pub struct Evaluation {
    /// Fraction of correct top-1 predictions (of next tokens, for a language model).
    pub accuracy: f64,
    /// Mean cross-entropy loss in nats (per token, for a language model).
    pub loss: f64,
}

/// Evaluates the net on the whole of `data` in batches of [`TrainData::eval_batch`].
pub fn evaluate(net: &Net, data: &TrainData) -> Result<Evaluation, TrainError> {
    let n = data.len();
    let step = data.eval_batch();
    let (mut correct, mut positions, mut loss_sum) = (0i64, 0i64, 0f64);
    let dev = net.device();
    tch::no_grad(|| -> Result<(), TrainError> {
        for start in (0..n).step_by(step) {
            let idx: Vec<u32> = (start as u32..(start + step).min(n) as u32).collect();
            let (xs, ys) = data.batch(&idx)?;
            let ys = ys.to_device(dev);
            let logits = net.forward(&xs.to_device(dev));
            loss_sum += loss(&logits, &ys).double_value(&[]) * idx.len() as f64;
            let pred: Tensor = logits.argmax(-1, false);
            correct += pred.eq_tensor(&ys).sum(tch::Kind::Int64).int64_value(&[]);
            positions += ys.numel() as i64;
        }
        Ok(())
    })?;
    Ok(Evaluation {
        accuracy: correct as f64 / positions.max(1) as f64,
        loss: loss_sum / n.max(1) as f64,
    })
}
