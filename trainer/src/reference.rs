//! Plain single-process training: the yardstick the swarm is compared against.

use tch::Device;

use crate::schedule::BatchSchedule;
use crate::{gradient, ModelSpec, Net, Optimizer, OptimizerConfig, TrainData, TrainError};

/// Settings of a single-process run.
#[derive(Clone, Debug)]
pub struct ReferenceRun {
    /// Architecture.
    pub model: ModelSpec,
    /// Seed of the weight initialisation and of the batch order.
    pub seed: u64,
    /// Global batch size.
    pub batch: usize,
    /// Optimizer.
    pub optimizer: OptimizerConfig,
}

/// Trains for `steps` steps and returns the final flat parameters. `on_step` is called after
/// every step with (step index, mean loss, the net holding the new parameters).
pub fn train(
    run: &ReferenceRun,
    data: &TrainData,
    steps: u64,
    mut on_step: impl FnMut(u64, f64, &Net) -> Result<(), TrainError>,
) -> Result<Vec<f32>, TrainError> {
    let mut net = Net::new(&run.model, Device::Cpu, run.seed);
    let mut params = net.flat_params();
    let mut opt = Optimizer::new(run.optimizer.clone());
    let mut schedule = BatchSchedule::new(data.len(), run.batch, run.seed);
    for step in 0..steps {
        let idx = schedule.batch(step);
        let g = gradient(&mut net, data, &idx)?;
        opt.step(&mut params, &g.grad)?;
        net.set_flat_params(&params)?;
        on_step(step, g.loss_sum / g.n.max(1) as f64, &net)?;
    }
    Ok(params)
}
