//! The compute side of a worker: turns a task into a signed, committed result, and answers
//! the coordinator's challenges about recent results.

use std::collections::VecDeque;
use std::sync::Arc;

use compression::{CodecConfig, DecodeLimits, ZstdPolicy};
use executor::params::{rebuild, Held};
use executor::{encode_update, Executor, RawUpdate};
use proto::{Answer, ParamsPayload, Query, Task, TaskResult};
use serde_bytes::ByteBuf;
use trainer::{ModelSpec, OptimizerConfig, TrainData};
use verify::{Commitment, Hash, MerkleTree, WorkerKey};

#[cfg(feature = "test-hooks")]
use crate::adversary::Adversary;

/// Recent results kept to continue error feedback and answer challenges.
const KEEP_RESULTS: usize = 8;

/// Why a task was not done; reported to the coordinator.
#[derive(Debug)]
pub struct Failure {
    /// For the coordinator's log.
    pub reason: String,
    /// Full parameters would let the worker do it.
    pub need_full_params: bool,
}

impl Failure {
    fn new(reason: impl ToString) -> Self {
        Failure {
            reason: reason.to_string(),
            need_full_params: false,
        }
    }
}

/// What the worker remembers of a result it sent.
struct Sent {
    task_id: u64,
    /// The exact values encoded (kept whenever the codec is lossy).
    encoded_input: Vec<f32>,
    /// Error-feedback residual left by the task (empty when off).
    residual: Vec<f32>,
    /// Inner-step state hashes (multi-step tasks).
    tree: Option<MerkleTree>,
    leaves: Vec<Hash>,
}

/// Model, data, parameters and identity of a worker for one run. Kept across reconnects to
/// the same run, so error feedback continues where it stopped.
pub struct Compute {
    exec: Executor,
    key: WorkerKey,
    run_id: [u8; 32],
    codec: CodecConfig,
    /// Whether each result's bytes are worth compressing on the uplink.
    zstd: ZstdPolicy,
    inner: OptimizerConfig,
    limits: DecodeLimits,
    held: Option<Held>,
    sent: VecDeque<Sent>,
    /// TEST ONLY: a cheating strategy.
    #[cfg(feature = "test-hooks")]
    adversary: Option<Adversary>,
    /// Digest of the compute class declared on the current connection.
    class: Hash,
}

impl Compute {
    /// Sets up the model for a run.
    pub fn new(
        model: &ModelSpec,
        device: tch::Device,
        data: Arc<TrainData>,
        key: WorkerKey,
        run_id: [u8; 32],
        codec: CodecConfig,
        inner: OptimizerConfig,
    ) -> Self {
        let exec = Executor::new(model, device, data, inner.clone());
        let limits = DecodeLimits {
            max_values: exec.n_params(),
            ..DecodeLimits::default()
        };
        Compute {
            exec,
            key,
            run_id,
            zstd: ZstdPolicy::new(&codec),
            codec,
            inner,
            limits,
            held: None,
            sent: VecDeque::new(),
            #[cfg(feature = "test-hooks")]
            adversary: None,
            class: [0; 32],
        }
    }

    /// TEST ONLY: cheats with `adversary` (`None`: honest).
    #[cfg(feature = "test-hooks")]
    pub fn with_adversary(mut self, adversary: Option<Adversary>) -> Self {
        self.adversary = adversary;
        self
    }

    /// Sets the compute class (its [`verify::ComputeClass::digest`]) bound into commitments.
    pub fn set_class(&mut self, class: Hash) {
        self.class = class;
    }

    /// Number of model parameters.
    pub fn n_params(&self) -> usize {
        self.exec.n_params()
    }

    /// Whether this state belongs to the run described (so it can be kept on reconnecting).
    pub fn same_run(
        &self,
        run_id: &[u8; 32],
        codec: &CodecConfig,
        inner: &OptimizerConfig,
    ) -> bool {
        &self.run_id == run_id && &self.codec == codec && &self.inner == inner
    }

    /// Runs one task whose result goes over a link carrying `link` bytes a second (`None`:
    /// unknown), which decides whether zstd pays ([`ZstdPolicy`]). Errors are reasons to
    /// report back, not reasons to disconnect.
    pub fn run(&mut self, task: Task, link: Option<f64>) -> Result<TaskResult, Failure> {
        let start = std::time::Instant::now();
        executor::check_shape(&task.indices, &task.micro_batches, task.inner_steps)
            .map_err(Failure::new)?;
        self.load_params(&task)?;
        let params = &self.held.as_ref().expect("loaded").values;
        #[cfg(feature = "test-hooks")]
        if let Some(a) = self.adversary.as_mut() {
            let raw = a
                .compute(&mut self.exec, params, &task)
                .map_err(Failure::new)?;
            return self.commit(task, raw, start, link);
        }
        let raw = self
            .exec
            .compute(params, &task.indices, &task.micro_batches, task.inner_steps)
            .map_err(Failure::new)?;
        self.commit(task, raw, start, link)
    }

    fn load_params(&mut self, task: &Task) -> Result<(), Failure> {
        if matches!(task.params, ParamsPayload::Held)
            && self.held.as_ref().map(|h| h.version) == Some(task.params_version)
        {
            return Ok(());
        }
        match rebuild(
            self.held.as_ref(),
            &task.params,
            task.params_version,
            &task.params_hash,
            self.exec.n_params(),
            &self.limits,
        ) {
            Ok(h) => {
                self.held = Some(h);
                Ok(())
            }
            Err(e) => {
                if e.needs_full() {
                    self.held = None;
                }
                Err(Failure {
                    reason: e.to_string(),
                    need_full_params: e.needs_full(),
                })
            }
        }
    }

    /// Error feedback, encoding, commitment and signature.
    fn commit(
        &mut self,
        task: Task,
        raw: RawUpdate,
        start: std::time::Instant,
        link: Option<f64>,
    ) -> Result<TaskResult, Failure> {
        let base = self
            .sent
            .iter()
            .rfind(|s| s.task_id == task.ef_base && task.ef_base != 0);
        let residual_in = base
            .filter(|s| !s.residual.is_empty())
            .map(|s| s.residual.as_slice());
        let ef_base = if residual_in.is_some() {
            task.ef_base
        } else {
            0
        };
        // Encoded raw, then compressed if the link is slow enough for zstd to pay: the
        // bytes are those of encoding with the run's level or with zstd off, and the header
        // says which (a spot check re-encodes the same way).
        let raw_codec = CodecConfig {
            zstd_level: 0,
            ..self.codec.clone()
        };
        let mut enc =
            encode_update(&raw.values, residual_in, &raw_codec, task.seed).map_err(Failure::new)?;
        if let Some(z) = self
            .zstd
            .compress_if_it_pays(&enc.bytes, link, compression::compress_payload)
            .map_err(Failure::new)?
        {
            enc.bytes = z;
        }
        let tree = (!raw.leaves.is_empty()).then(|| MerkleTree::new(raw.leaves.clone()));
        let commitment = Commitment {
            run_id: self.run_id,
            task_id: task.task_id,
            step: task.step,
            input_params: task.params_hash,
            indices: verify::hash_indices(&task.indices),
            seed: task.seed,
            hyperparams: task.hyperparams,
            update: verify::hash_update(&enc.bytes),
            step_root: tree.as_ref().map_or([0; 32], MerkleTree::root),
            n_samples: raw.n as u32,
            ef_base,
            encoded_input: verify::hash_f32(&enc.encoded_input),
            class: self.class,
        };
        let signature = self.key.sign(&commitment);
        // Kept whenever the bytes lose information: revealed for error-feedback checks and
        // for checks across compute classes.
        let keep_input = !self.codec.codec.is_lossless();
        self.sent.push_back(Sent {
            task_id: task.task_id,
            encoded_input: if keep_input {
                enc.encoded_input
            } else {
                Vec::new()
            },
            residual: enc.residual,
            tree,
            leaves: raw.leaves,
        });
        while self.sent.len() > KEEP_RESULTS {
            self.sent.pop_front();
        }
        Ok(TaskResult {
            task_id: task.task_id,
            n_samples: raw.n as u32,
            loss_sum: raw.loss_sum,
            update: ByteBuf::from(enc.bytes),
            commitment,
            signature,
            compute_us: start.elapsed().as_micros() as u64,
        })
    }

    /// Answers a challenge about a recent result.
    pub fn answer(&self, task_id: u64, query: &Query) -> Answer {
        let Some(s) = self.sent.iter().rfind(|s| s.task_id == task_id) else {
            return Answer::Unavailable(format!("task {task_id} is no longer held"));
        };
        match query {
            Query::EncodedInput if !s.encoded_input.is_empty() => {
                match compression::encode(&s.encoded_input, &CodecConfig::lossless(), 0) {
                    Ok(b) => Answer::Values(ByteBuf::from(b)),
                    Err(e) => Answer::Unavailable(e.to_string()),
                }
            }
            Query::EncodedInput => Answer::Unavailable("no encoded values kept".into()),
            Query::Leaf { index } => match (&s.tree, s.leaves.get(*index as usize)) {
                (Some(t), Some(leaf)) => match t.proof(*index as usize) {
                    Some(proof) => Answer::Leaf { leaf: *leaf, proof },
                    None => Answer::Unavailable("no such leaf".into()),
                },
                _ => Answer::Unavailable("no such leaf".into()),
            },
        }
    }
}
