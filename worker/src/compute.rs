//! The compute side of a worker: turns a task into a signed, committed result.

use compression::{CodecConfig, DecodeLimits, ErrorFeedback};
use proto::{Task, TaskResult};
use serde_bytes::ByteBuf;
use trainer::{gradient, Dataset, ModelKind, Net, Optimizer, OptimizerConfig};
use verify::{Commitment, MerkleTree, WorkerKey};

/// Largest number of sample indices accepted in one task.
const MAX_TASK_SAMPLES: usize = 1 << 20;
/// Most micro-batches (inner steps) in one task.
const MAX_MICRO_BATCHES: usize = 10_000;

/// What a task produced before encoding.
struct Update {
    values: Vec<f32>,
    loss_sum: f64,
    n: usize,
    step_root: [u8; 32],
}

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
    inner: Optimizer,
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
        inner: OptimizerConfig,
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
            inner: Optimizer::new(inner),
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
        let micro_total: u64 = task.micro_batches.iter().map(|&m| u64::from(m)).sum();
        if task.micro_batches.is_empty()
            || task.micro_batches.len() > MAX_MICRO_BATCHES
            || micro_total != task.indices.len() as u64
        {
            return Err("micro-batch sizes do not cover the indices".into());
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
        let u = if task.micro_batches.len() == 1 {
            let g =
                gradient(&mut self.net, &self.data, &task.indices).map_err(|e| e.to_string())?;
            Update {
                values: g.grad,
                loss_sum: g.loss_sum,
                n: g.n,
                step_root: [0; 32],
            }
        } else {
            self.local_round(&task.indices, &task.micro_batches)?
        };
        let (update, _) = self
            .feedback
            .encode(&u.values, &self.codec, task.seed)
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
            step_root: u.step_root,
            n_samples: u.n as u32,
        };
        let signature = self.key.sign(&commitment);
        Ok(TaskResult {
            task_id: task.task_id,
            n_samples: u.n as u32,
            loss_sum: u.loss_sum,
            update: ByteBuf::from(update),
            commitment,
            signature,
            compute_ms: start.elapsed().as_millis() as u64,
        })
    }

    /// A DiLoCo round: one inner optimizer step per micro-batch from the current parameters;
    /// returns start minus end parameters and a Merkle root over the per-step parameter hashes.
    fn local_round(&mut self, indices: &[u32], micro: &[u32]) -> Result<Update, String> {
        let start = self.net.flat_params();
        let mut params = start.clone();
        let mut leaves = Vec::with_capacity(micro.len());
        let (mut o, mut loss_sum) = (0usize, 0f64);
        for &m in micro {
            let idx = &indices[o..o + m as usize];
            o += m as usize;
            if idx.is_empty() {
                continue;
            }
            let g = gradient(&mut self.net, &self.data, idx).map_err(|e| e.to_string())?;
            loss_sum += g.loss_sum;
            self.inner
                .step(&mut params, &g.grad)
                .map_err(|e| e.to_string())?;
            self.net
                .set_flat_params(&params)
                .map_err(|e| e.to_string())?;
            leaves.push(verify::hash_f32(&params));
        }
        let values = start.iter().zip(&params).map(|(s, e)| s - e).collect();
        Ok(Update {
            values,
            loss_sum,
            n: indices.len(),
            step_root: MerkleTree::new(leaves).root(),
        })
    }
}
