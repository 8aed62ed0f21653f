//! Task execution, shared by workers and by the coordinator's spot checks so that both compute
//! the same bits.
//!
//! * [`Executor::compute`]: the raw update of a task: the mean gradient of one micro-batch, or
//!   for a multi-step (DiLoCo) task the pseudo-gradient after one inner optimizer step per
//!   micro-batch, with the hash of the inner state after every step (the Merkle leaves).
//! * [`encode_update`]: error feedback and encoding of a raw update.
//! * [`params`]: rebuilding a task's starting parameters from what the coordinator sent.
//!
//! A task is a pure function of (parameters, indices, micro-batch sizes, inner optimizer,
//! codec, seed, the error-feedback residual it continues): the inner optimizer starts fresh
//! in every task, so a re-execution needs nothing of the worker's history but that residual.

pub mod class;
pub mod params;

use std::sync::Arc;

use compression::{CodecConfig, CodecError, ErrorFeedback};
use tch::Device;
use trainer::{gradient, ModelSpec, Net, Optimizer, OptimizerConfig, TrainData, TrainError};
use verify::{Hash, MerkleTree};

/// Largest number of sample indices accepted in one task.
pub const MAX_TASK_SAMPLES: usize = 1 << 20;
/// Most micro-batches (inner steps) in one task.
pub const MAX_MICRO_BATCHES: usize = 10_000;

/// Why a task could not be executed.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The task's shape is invalid (sizes, micro-batches).
    #[error("invalid task: {0}")]
    Invalid(String),
    /// Training failed (bad index, non-finite gradient, libtorch error).
    #[error(transparent)]
    Train(#[from] TrainError),
    /// Encoding failed.
    #[error("encode: {0}")]
    Codec(#[from] CodecError),
    /// The operating system refused a thread.
    #[error("cannot start a thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// The update a task computed, before error feedback and encoding.
#[derive(Clone, Debug)]
pub struct RawUpdate {
    /// Mean gradient (one micro-batch) or start minus end parameters (several).
    pub values: Vec<f32>,
    /// Sum of the per-sample losses (at the parameters each sample was seen with).
    pub loss_sum: f64,
    /// Samples covered.
    pub n: usize,
    /// Hash of the inner state after each step ([`state_leaf`]); empty for one micro-batch.
    pub leaves: Vec<Hash>,
}

impl RawUpdate {
    /// Merkle root over the leaves (all zero for single-step tasks).
    pub fn step_root(&self) -> Hash {
        MerkleTree::new(self.leaves.clone()).root()
    }
}

/// The hash of an inner state: parameters and optimizer state after an inner step.
pub fn state_leaf(params: &[f32], opt: &Optimizer) -> Hash {
    leaf_of(&verify::hash_f32(params), &opt.state_digest())
}

/// [`state_leaf`] (the same hash) over the threads of `pool`.
pub fn state_leaf_in(pool: &rayon::ThreadPool, params: &[f32], opt: &Optimizer) -> Hash {
    pool.install(|| leaf_of(&verify::hash_f32_rayon(params), &opt.state_digest_rayon()))
}

fn leaf_of(params_hash: &Hash, opt_digest: &[u8; 32]) -> Hash {
    let mut h = blake3::Hasher::new_derive_key("dtrain inner state v1");
    h.update(params_hash);
    h.update(opt_digest);
    *h.finalize().as_bytes()
}

/// Checks a task's sizes before any work: at most [`MAX_TASK_SAMPLES`] indices, 1 to
/// [`MAX_MICRO_BATCHES`] micro-batches (exactly one without inner steps) that add up to the
/// indices.
pub fn check_shape(indices: &[u32], micro: &[u32], inner_steps: bool) -> Result<(), ExecError> {
    if !inner_steps && micro.len() != 1 {
        return Err(ExecError::Invalid(
            "a gradient task has exactly one micro-batch".into(),
        ));
    }
    if indices.len() > MAX_TASK_SAMPLES {
        return Err(ExecError::Invalid(format!(
            "{} samples, limit {MAX_TASK_SAMPLES}",
            indices.len()
        )));
    }
    let total: u64 = micro.iter().map(|&m| u64::from(m)).sum();
    if micro.is_empty() || micro.len() > MAX_MICRO_BATCHES || total != indices.len() as u64 {
        return Err(ExecError::Invalid(
            "micro-batch sizes do not cover the indices".into(),
        ));
    }
    Ok(())
}

/// A model and a data set, ready to execute tasks.
pub struct Executor {
    net: Net,
    data: Arc<TrainData>,
    inner: OptimizerConfig,
    /// Threads that hash the inner steps' leaves on a GPU worker, whose CPU threads are
    /// otherwise idle while the device computes (the leaf of a 110M-parameter model is
    /// 1.3 GB of blake3 a step); made at the first DiLoCo task. On the CPU the leaf is
    /// hashed on one thread beside the gradient's.
    leaf_pool: Option<Arc<rayon::ThreadPool>>,
}

impl Executor {
    /// An executor for `model` on `device` over `data`; multi-step tasks use `inner`.
    pub fn new(
        model: &ModelSpec,
        device: Device,
        data: Arc<TrainData>,
        inner: OptimizerConfig,
    ) -> Self {
        Executor {
            net: Net::new(model, device, 0),
            data,
            inner,
            leaf_pool: None,
        }
    }

    /// Number of model parameters.
    pub fn n_params(&self) -> usize {
        self.net.n_params()
    }

    /// The training data.
    pub fn data(&self) -> &Arc<TrainData> {
        &self.data
    }

    /// Computes the raw update of a task starting from `params`: the mean gradient, or with
    /// `inner_steps` the pseudo-gradient of one inner step per micro-batch.
    pub fn compute(
        &mut self,
        params: &[f32],
        indices: &[u32],
        micro: &[u32],
        inner_steps: bool,
    ) -> Result<RawUpdate, ExecError> {
        check_shape(indices, micro, inner_steps)?;
        self.net.set_flat_params(params)?;
        if !inner_steps {
            let g = gradient(&mut self.net, &self.data, indices)?;
            return Ok(RawUpdate {
                values: g.grad,
                loss_sum: g.loss_sum,
                n: g.n,
                leaves: Vec::new(),
            });
        }
        // Each inner step's Merkle leaf (blake3 over the parameters and both moments, three
        // times the model's bytes) is hashed on a second thread while the next micro-batch's
        // gradient is computed: the gradient reads the net's own copy of the parameters,
        // and the vector and the optimizer come back before the next optimizer step.
        let pool = self.leaf_pool()?;
        let mut state = Some((params.to_vec(), Optimizer::new(self.inner.clone())));
        let mut hashing: Option<LeafThread> = None;
        let mut leaves = Vec::with_capacity(micro.len());
        let (mut o, mut loss_sum) = (0usize, 0f64);
        for &m in micro {
            let idx = &indices[o..o + m as usize];
            o += m as usize;
            let g = (!idx.is_empty())
                .then(|| gradient(&mut self.net, &self.data, idx))
                .transpose();
            if let Some(h) = hashing.take() {
                let (p, opt, leaf) = join_leaf(h);
                leaves.push(leaf);
                state = Some((p, opt));
            }
            let (mut p, mut opt) = state.take().ok_or_else(lost_state)?;
            if let Some(g) = g? {
                loss_sum += g.loss_sum;
                opt.step(&mut p, &g.grad)?;
                self.net.set_flat_params(&p)?;
            }
            let pool = pool.clone();
            hashing = Some(
                std::thread::Builder::new()
                    .name("inner-step leaf".into())
                    .spawn(move || {
                        let leaf = match &pool {
                            Some(pool) => state_leaf_in(pool, &p, &opt),
                            None => state_leaf(&p, &opt),
                        };
                        (p, opt, leaf)
                    })?,
            );
        }
        let (p, _, leaf) = join_leaf(hashing.ok_or_else(lost_state)?);
        leaves.push(leaf);
        let values = params.iter().zip(&p).map(|(s, e)| s - e).collect();
        Ok(RawUpdate {
            values,
            loss_sum,
            n: indices.len(),
            leaves,
        })
    }

    /// The leaf-hashing pool on a GPU, made once; `None` on the CPU. Its threads and the
    /// one driving the device (which keeps a core busy launching kernels and waiting for
    /// them) are libtorch's intra-op thread count, what `runtime::set_threads` set: the
    /// threads the volunteer allows.
    fn leaf_pool(&mut self) -> Result<Option<Arc<rayon::ThreadPool>>, ExecError> {
        if self.leaf_pool.is_none() && self.net.device().is_cuda() {
            let threads = (tch::get_num_threads().max(1) as usize).saturating_sub(1);
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads.max(1))
                .thread_name(|i| format!("leaf hash {i}"))
                .build()
                .map_err(|e| ExecError::Thread(std::io::Error::other(e)))?;
            self.leaf_pool = Some(Arc::new(pool));
        }
        Ok(self.leaf_pool.clone())
    }
}

/// A thread hashing one inner step's leaf; it hands the parameters and the optimizer back.
type LeafThread = std::thread::JoinHandle<(Vec<f32>, Optimizer, Hash)>;

/// The thread's result; its panic, if it panicked, goes on here (as it would have, hashed
/// on this thread).
fn join_leaf(h: LeafThread) -> (Vec<f32>, Optimizer, Hash) {
    h.join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

fn lost_state() -> ExecError {
    ExecError::Invalid("no micro-batch: the inner state was never set".into())
}

/// An update after error feedback and encoding.
#[derive(Clone, Debug)]
pub struct Encoded {
    /// The payload sent (compression format).
    pub bytes: Vec<u8>,
    /// The exact values encoded: the raw update plus the residual taken over.
    pub encoded_input: Vec<f32>,
    /// What the receiver will not see: `encoded_input - decode(bytes)`; the residual the next
    /// task continues. Empty when error feedback is off or the codec is lossless.
    pub residual: Vec<f32>,
}

/// Adds `residual_in` (when given; it must have the same length) to `values`, encodes the sum
/// with `codec` and `seed`, and keeps as the new residual what decoding will not give back
/// (only when `codec.error_feedback` and the codec is lossy; the residual arithmetic is
/// [`ErrorFeedback`]'s).
pub fn encode_update(
    values: &[f32],
    residual_in: Option<&[f32]>,
    codec: &CodecConfig,
    seed: u64,
) -> Result<Encoded, ExecError> {
    // The same arithmetic as `ErrorFeedback::encode`, so that this is exactly what it encodes.
    let encoded_input: Vec<f32> = match residual_in {
        Some(r) if r.len() == values.len() => values.iter().zip(r).map(|(u, r)| u + r).collect(),
        Some(r) => {
            return Err(ExecError::Invalid(format!(
                "residual of {} values for an update of {}",
                r.len(),
                values.len()
            )))
        }
        None => values.to_vec(),
    };
    let keep = codec.error_feedback && !codec.codec.is_lossless();
    if !keep {
        let bytes = compression::encode(&encoded_input, codec, seed)?;
        return Ok(Encoded {
            bytes,
            encoded_input,
            residual: Vec::new(),
        });
    }
    let mut ef = ErrorFeedback::with_residual(residual_in.map(<[f32]>::to_vec).unwrap_or_default());
    let (bytes, _) = ef.encode(values, codec, seed)?;
    let residual = ef.into_residual();
    Ok(Encoded {
        bytes,
        encoded_input,
        residual,
    })
}

#[cfg(test)]
mod tests;
