//! The compute side of a worker: turns a task into a signed, committed result.

use compression::{CodecConfig, DecodeLimits, ErrorFeedback};
use proto::{Task, TaskResult};
use serde_bytes::ByteBuf;
use trainer::{gradient, Dataset, ModelKind, Net};
use verify::{Commitment, WorkerKey};

/// Largest number of sample indices accepted in one task.
const MAX_TASK_SAMPLES: usize = 1 << 20;

/// Model, data and identity of a worker for one run.
pub struct Compute {
    net: Net,
    data: Dataset,
    key: WorkerKey,
    run_id: [u8; 32],
    codec: CodecConfig,
    limits: DecodeLimits,
    feedback: ErrorFeedback,
    version: Option<(u64, [u8; 32])>,
}

impl Compute {
    /// Sets up the model for a run.
    pub fn new(
        model: ModelKind,
        device: tch::Device,
        data: Dataset,
        key: WorkerKey,
        run_id: [u8; 32],
        codec: CodecConfig,
    ) -> Self {
        let net = Net::new(model, device, 0);
        let limits = DecodeLimits {
            max_values: net.n_params(),
            ..DecodeLimits::default()
        };
        Compute {
            net,
            data,
            key,
            run_id,
            codec,
            limits,
            feedback: ErrorFeedback::new(),
            version: None,
        }
    }

    /// Number of model parameters.
    pub fn n_params(&self) -> usize {
        self.net.n_params()
    }

    /// Runs one task. Errors are reasons to report back, not reasons to disconnect.
    pub fn run(&mut self, task: Task) -> Result<TaskResult, String> {
        let start = std::time::Instant::now();
        if task.indices.len() > MAX_TASK_SAMPLES {
            return Err(format!(
                "task has {} samples, limit {MAX_TASK_SAMPLES}",
                task.indices.len()
            ));
        }
        if let Some(p) = &task.params {
            let params = compression::decode_exact(p, self.net.n_params(), &self.limits)
                .map_err(|e| format!("parameters: {e}"))?;
            let h = verify::hash_f32(&params);
            if h != task.params_hash {
                return Err("parameters do not match their announced hash".into());
            }
            self.net
                .set_flat_params(&params)
                .map_err(|e| e.to_string())?;
            self.version = Some((task.params_version, h));
        }
        let input_params = match self.version {
            Some((v, h)) if v == task.params_version => h,
            _ => {
                return Err(format!(
                    "parameters of version {} are missing",
                    task.params_version
                ))
            }
        };
        let g = gradient(&mut self.net, &self.data, &task.indices).map_err(|e| e.to_string())?;
        let (update, _) = self
            .feedback
            .encode(&g.grad, &self.codec, task.seed)
            .map_err(|e| format!("encode: {e}"))?;
        let commitment = Commitment {
            run_id: self.run_id,
            task_id: task.task_id,
            step: task.step,
            input_params,
            indices: verify::hash_indices(&task.indices),
            seed: task.seed,
            hyperparams: task.hyperparams,
            update: verify::hash_update(&update),
            step_root: [0; 32],
            n_samples: g.n as u32,
        };
        let signature = self.key.sign(&commitment);
        Ok(TaskResult {
            task_id: task.task_id,
            n_samples: g.n as u32,
            loss_sum: g.loss_sum,
            update: ByteBuf::from(update),
            commitment,
            signature,
            compute_ms: start.elapsed().as_millis() as u64,
        })
    }
}
