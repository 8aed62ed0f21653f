//! Messages of both directions. Every field that comes off the network is checked by the
//! receiver (sizes, shapes, finiteness); this module only defines the shapes.

use bytes::Bytes;
use compression::CodecConfig;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use verify::{Commitment, ComputeClass, MerkleProof, Signature, WorkerId};

/// First message of a worker, right after the stream preamble.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Hello {
    /// The join secret from the join string.
    pub secret: [u8; 32],
    /// The worker's persistent public key.
    pub worker_id: WorkerId,
    /// A human-readable name (host name or `--name`); at most 64 bytes are kept.
    pub name: String,
    /// What decides the bits it computes (device, libtorch, CPU kernels, threads); its
    /// digest is bound into every commitment. Strings are cut to
    /// [`verify::class::MAX_CLASS_FIELD`] bytes on arrival.
    pub class: ComputeClass,
}

/// What a worker needs to know about the run; sent once after a successful handshake.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Welcome {
    /// Identifier of the run (random, fixed for the run's lifetime, kept across restarts).
    pub run_id: [u8; 32],
    /// The model: canonical JSON of `trainer::ModelSpec` (architecture and dimensions);
    /// its blake3 is bound into every task's hyperparameter digest.
    pub model: String,
    /// Number of parameters of the model.
    pub n_params: u64,
    /// Dataset kind: `fashion-mnist` (IDX files) or `tokens` (token shards with a
    /// manifest).
    pub dataset: String,
    /// blake3 digest of the training samples the worker must hold (for tokens: the shards'
    /// digests and `seq_len`).
    pub dataset_digest: [u8; 32],
    /// Input tokens per sample of a `tokens` data set (0 for images).
    pub seq_len: u32,
    /// The files a worker loads the training set from (at most [`MAX_DATA_FILES`]), served
    /// on data streams ([`DataRequest`]) to workers that do not hold them.
    pub data_files: Vec<DataFile>,
    /// How the worker encodes its updates.
    pub codec: CodecConfig,
    /// Compute threads the worker must use in deterministic mode (`None`: its own choice).
    pub deterministic_threads: Option<u32>,
    /// The worker must compute with the portable deterministic settings
    /// (`executor::class::PORTABLE_ENV`), applied before libtorch starts: a worker started
    /// without them restarts itself with them and joins again.
    pub portable: bool,
    /// Local optimizer of multi-step (DiLoCo) tasks.
    pub inner_optimizer: InnerOptimizer,
}

/// The optimizer a worker runs locally during a multi-step task (wire form of
/// `trainer::OptimizerConfig`, kept here so the protocol does not depend on libtorch).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InnerOptimizer {
    /// `sgd`, `adam` or `adamw`.
    pub kind: String,
    /// Learning rate.
    pub lr: f64,
    /// Adam's first-moment decay.
    pub beta1: f64,
    /// Adam's second-moment decay.
    pub beta2: f64,
    /// Adam's epsilon.
    pub eps: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// SGD Nesterov momentum.
    pub nesterov: bool,
}

/// How the starting parameters of a task reach the worker. Every variant ends with the
/// worker holding parameters whose [`verify::hash_f32`] is the task's `params_hash`; a worker
/// that cannot get there answers [`ToCoordinator::TaskFailed`] with `need_full_params`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ParamsPayload {
    /// The worker already holds version `params_version` (its previous task used it).
    Held,
    /// The whole parameter vector, encoded losslessly (compression format, fp32 codec).
    Full(Bytes),
    /// A lossless XOR delta (`compression::apply_xor_delta`) from version `base`.
    Xor {
        /// Version the delta applies to.
        base: u64,
        /// The delta payload.
        delta: Bytes,
    },
    /// Lossy additive deltas from version `base`, applied in order: each `p[i] += d[i]` in
    /// f32, with `d` decoded from the payload (compression format).
    Add {
        /// Version the first delta applies to.
        base: u64,
        /// The deltas, oldest first.
        deltas: Vec<Bytes>,
    },
}

/// One unit of work: compute the update of the samples `indices` from the parameters of
/// version `params_version`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Task {
    /// Unique id of this task in the run (never 0).
    pub task_id: u64,
    /// Optimizer step (round) the task belongs to.
    pub step: u64,
    /// Version of the parameters the task starts from.
    pub params_version: u64,
    /// How the worker gets those parameters.
    pub params: ParamsPayload,
    /// blake3 (`verify::hash_f32`) of the parameters of version `params_version`.
    pub params_hash: [u8; 32],
    /// Indices into the training set.
    pub indices: Vec<u32>,
    /// Positions (in the manifest's training list) of the shards the worker's next task is
    /// likely to read (the same positions of the next round's batches): a worker that
    /// fetches shards as it needs them fetches these while it computes. At most
    /// [`MAX_PREFETCH`]; empty for image runs.
    pub prefetch: Vec<u32>,
    /// Sizes of the consecutive micro-batches `indices` is cut into (one per global batch of
    /// the round).
    pub micro_batches: Vec<u32>,
    /// false (synchronous rounds): return the mean gradient of the one micro-batch. true
    /// (DiLoCo rounds, H > 1): take one inner optimizer step on each micro-batch and return
    /// the pseudo-gradient, start parameters minus end parameters (also for a last round of
    /// a single batch).
    pub inner_steps: bool,
    /// Seed for any randomness of the task (stochastic rounding).
    pub seed: u64,
    /// Canonical hash of the hyperparameters the task must use.
    pub hyperparams: [u8; 32],
    /// The worker's last result that the coordinator used: continue the error-feedback
    /// residual left by that task (0: start from a zero residual).
    pub ef_base: u64,
    /// What the run has on record for this worker (shown on its status line).
    pub standing: Standing,
}

/// A worker's record in the run, as the coordinator keeps it (its reputation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Standing {
    /// Results accepted over the run.
    pub tasks_accepted: u64,
    /// Spot checks passed.
    pub checks_passed: u64,
    /// Strikes (protocol offences, unanswered challenges); a ban follows at the run's limit.
    pub strikes: u32,
}

/// The answer to a [`Task`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskResult {
    /// The task answered.
    pub task_id: u64,
    /// Number of samples the update covers.
    pub n_samples: u32,
    /// Sum of the per-sample losses.
    pub loss_sum: f64,
    /// Encoded update (compression format).
    pub update: ByteBuf,
    /// What the worker commits to; `commitment.update` is the blake3 of `update`.
    pub commitment: Commitment,
    /// The worker's signature over the commitment.
    pub signature: Signature,
    /// Microseconds of compute, as reported by the worker (used only to size its shares).
    pub compute_us: u64,
}

/// What the coordinator asks a worker to reveal about a result it committed to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Query {
    /// The exact values the worker encoded for the task (`commitment.encoded_input`).
    EncodedInput,
    /// The state hash after inner step `index` of a multi-step task, with its Merkle proof
    /// against `commitment.step_root`.
    Leaf {
        /// Inner step (0-based).
        index: u32,
    },
}

/// A worker's answer to a [`Query`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Answer {
    /// Values, encoded losslessly (compression format, fp32 codec).
    Values(ByteBuf),
    /// A leaf and its proof.
    Leaf {
        /// The state hash.
        leaf: [u8; 32],
        /// Its path to the committed root.
        proof: MerkleProof,
    },
    /// The worker no longer holds what was asked (e.g. it restarted).
    Unavailable(String),
}

/// Coordinator to worker.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ToWorker {
    /// Handshake accepted.
    Welcome(Welcome),
    /// Work to do.
    Task(Task),
    /// Reveal something about an earlier result (spot checks, disputes).
    Challenge {
        /// Id to quote in the reply.
        challenge_id: u64,
        /// The task the question is about.
        task_id: u64,
        /// What to reveal.
        query: Query,
    },
    /// The run is over (or the coordinator is stopping); the worker should exit.
    Shutdown {
        /// Why.
        reason: String,
    },
}

/// Worker to coordinator.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ToCoordinator {
    /// Handshake.
    Hello(Box<Hello>),
    /// A finished task.
    Result(Box<TaskResult>),
    /// The worker could not do a task; the part goes elsewhere.
    TaskFailed {
        /// The task.
        task_id: u64,
        /// Why, for the coordinator's log (at most 256 bytes are kept).
        reason: String,
        /// The worker lacks the base of the parameter delta: send full parameters.
        need_full_params: bool,
    },
    /// The answer to a [`ToWorker::Challenge`].
    ChallengeReply {
        /// The challenge answered.
        challenge_id: u64,
        /// The answer.
        answer: Answer,
    },
    /// The worker holds the run's data and can take tasks (sent once, right after the
    /// [`ToWorker::Welcome`]; until then the coordinator only serves its data streams).
    Ready,
}

/// Most shards one task names for prefetching.
pub const MAX_PREFETCH: usize = 256;

/// Most files a run's data set may have.
pub const MAX_DATA_FILES: usize = 4096;

/// Largest data file a worker accepts (1 TiB): sums of a run's files cannot overflow.
pub const MAX_DATA_FILE_LEN: u64 = 1 << 40;

/// Most groups ([`verify::blob::GROUP_LEN`] bytes each) one [`DataRequest`] may ask for.
pub const MAX_GROUPS_PER_REQUEST: u32 = 16;

/// Data streams a worker may have open at once (besides its control stream).
pub const DATA_STREAMS: u32 = 4;

/// One file of the run's data set, named by its content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataFile {
    /// The file name the loaders expect (a plain name, no path separators).
    pub name: String,
    /// Its length in bytes.
    pub len: u64,
    /// Its BLAKE3 hash: the name it is requested and cached by.
    pub blake3: [u8; 32],
}

/// The one request of a data stream (a bidirectional stream the worker opens after its
/// control stream). The coordinator answers with a [`DataReply`] frame, followed for
/// [`DataReply::Ok`] by exactly `len` raw bytes, and finishes the stream.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DataRequest {
    /// The file, by its BLAKE3 hash (one of the Welcome's `data_files`).
    pub blake3: [u8; 32],
    /// What of it.
    pub part: DataPart,
}

/// A part of a file (see [`verify::blob`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataPart {
    /// The outboard: 32 bytes per group, empty for a file of one group.
    Outboard,
    /// The bytes of groups `first .. first + count` (at most [`MAX_GROUPS_PER_REQUEST`]).
    Groups {
        /// First group.
        first: u64,
        /// Number of groups.
        count: u32,
    },
}

/// The coordinator's answer to a [`DataRequest`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum DataReply {
    /// `len` bytes follow.
    Ok {
        /// Bytes that follow the frame.
        len: u64,
    },
    /// Refused; nothing follows.
    Refused {
        /// Why.
        reason: String,
    },
}
