//! The run configuration (TOML), with defaults for everything but the essentials.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use compression::CodecConfig;
use serde::{Deserialize, Serialize};
use trainer::{LlamaConfig, ModelKind, ModelSpec, OptimizerConfig};
use verify::{AggregationConfig, SpotCheckPolicy};

/// A whole run configuration file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Where, and under which seed, the run happens.
    pub run: RunSection,
    /// The model.
    #[serde(default)]
    pub model: ModelSection,
    /// The data.
    #[serde(default)]
    pub data: DataSection,
    /// Batch size and length of training.
    pub training: TrainingSection,
    /// The optimizer applied by the coordinator (the outer optimizer when `local_steps > 1`).
    #[serde(default)]
    pub optimizer: OptimizerConfig,
    /// The workers' local optimizer in DiLoCo rounds (`training.local_steps > 1`).
    #[serde(default = "default_inner")]
    pub inner_optimizer: OptimizerConfig,
    /// How workers encode their updates.
    #[serde(default)]
    pub compression: CodecConfig,
    /// How the coordinator sends parameters: fp32 means lossless XOR deltas; a lossy codec
    /// means quantized deltas (with error feedback on the coordinator).
    #[serde(default = "default_downlink")]
    pub downlink: CodecConfig,
    /// How contributions are combined.
    #[serde(default)]
    pub aggregation: AggregationConfig,
    /// Spot checks of untrusted results.
    #[serde(default)]
    pub verification: VerificationSection,
    /// Durability and rollback history.
    #[serde(default)]
    pub ledger: LedgerSection,
    /// Network limits.
    #[serde(default)]
    pub network: NetworkSection,
    /// What workers are told about determinism, and how work is split among them.
    #[serde(default)]
    pub workers: WorkersSection,
    /// The status server (dashboard, JSON API, Prometheus metrics, operator actions).
    #[serde(default)]
    pub monitor: MonitorSection,
    /// TEST ONLY (cargo feature `test-hooks`; `coordinator run --test-crash-after-logging N`,
    /// never from a file): exit as if killed right after round N is in the write-ahead log
    /// and before it is reported.
    #[cfg(feature = "test-hooks")]
    #[serde(skip)]
    pub test_crash_after_logging: Option<u64>,
    /// TEST ONLY (cargo feature `test-hooks`; `coordinator run --test-corrupt-data N`, never
    /// from a file): flip one byte in each of the first N group replies of data streams.
    #[cfg(feature = "test-hooks")]
    #[serde(skip)]
    pub test_corrupt_data: u64,
    /// The coordinator program, which re-executes a result in a worker's compute class
    /// (`coordinator recheck`); set by `coordinator run`, never from a file. `None`: results
    /// of classes that fail the cross-class comparison are dropped, nobody is accused.
    #[serde(skip)]
    pub recheck_exe: Option<PathBuf>,
    /// The file this config was read from ([`RunConfig::load`]); errors about its inputs
    /// name it ([`RunConfig::field`]).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

fn default_downlink() -> CodecConfig {
    CodecConfig::lossless()
}

fn default_inner() -> OptimizerConfig {
    OptimizerConfig {
        kind: trainer::OptimizerKind::AdamW,
        ..OptimizerConfig::default()
    }
}

/// `[run]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    /// Directory for metrics, checkpoints, identity and the final model.
    pub output_dir: PathBuf,
    /// Seed of the weight initialisation and of the batch order.
    #[serde(default)]
    pub seed: u64,
    /// UDP address to listen on (port 0 picks a free port).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Address put into the join string, when it differs from `listen`.
    #[serde(default)]
    pub public_addr: Option<String>,
    /// Resume from `output_dir/checkpoint.bin` when present.
    #[serde(default = "yes")]
    pub resume: bool,
    /// Workers that must be connected before the first step (later steps use whoever is there).
    #[serde(default = "one_usize")]
    pub min_workers: usize,
    /// Seconds the first round, once it has `min_workers`, waits for more workers to join
    /// (so that workers started together share it; 0: start at once).
    #[serde(default = "one_f64")]
    pub start_gather_s: f64,
}

fn one_usize() -> usize {
    1
}

fn one_f64() -> f64 {
    1.0
}

fn default_listen() -> SocketAddr {
    ([127, 0, 0, 1], 7070).into()
}

fn yes() -> bool {
    true
}

/// `[model]`
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// Architecture.
    pub kind: ModelKind,
    /// `kind = "llama"`: a Hugging Face-style `config.json` with the dimensions (or give
    /// them inline as `[model.llama]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<PathBuf>,
    /// `kind = "llama"`: the dimensions inline (the keys of a Hugging Face `config.json`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub llama: Option<LlamaConfig>,
    /// Start from these weights (a safetensors file with the model's tensor names, e.g. an
    /// earlier run's `model.safetensors` or a Hugging Face checkpoint) instead of a fresh
    /// initialisation: fine-tuning.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init: Option<PathBuf>,
}

impl ModelSection {
    /// The model this section describes; errors name the file or the field.
    pub fn spec(&self) -> Result<ModelSpec, ConfigError> {
        let bad = |m: String| ConfigError::Invalid(m);
        match (self.kind, &self.config, &self.llama) {
            (ModelKind::Cnn, None, None) => Ok(ModelSpec::Cnn),
            (ModelKind::Mlp, None, None) => Ok(ModelSpec::Mlp),
            (ModelKind::Cnn | ModelKind::Mlp, _, _) => Err(bad(
                "model.config and [model.llama] are only for kind = \"llama\"".into(),
            )),
            (ModelKind::Llama, Some(path), None) => LlamaConfig::from_file(path)
                .map(|c| ModelSpec::Llama(Box::new(c)))
                .map_err(|e| bad(format!("model.config: {e}"))),
            (ModelKind::Llama, None, Some(c)) => c
                .validate()
                .map(|()| ModelSpec::Llama(Box::new(c.clone())))
                .map_err(|e| bad(format!("[model.llama]: {e}"))),
            (ModelKind::Llama, None, None) => Err(bad(
                "kind = \"llama\" needs model.config (a config.json) or a [model.llama] table"
                    .into(),
            )),
            (ModelKind::Llama, Some(_), Some(_)) => {
                Err(bad("give model.config or [model.llama], not both".into()))
            }
        }
    }
}

/// `[data]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// Image runs: directory with the gzipped IDX files.
    pub dir: PathBuf,
    /// Language-model runs: a folder of token shards with its `manifest.json`
    /// (`coordinator data prepare` makes one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shards: Option<PathBuf>,
    /// Language-model runs: input tokens per sample (a window is `seq_len + 1` tokens).
    pub seq_len: usize,
    /// Use only the first N training samples (0: all); handy for quick runs.
    pub train_limit: usize,
    /// Most megabits per second the coordinator spends serving data files to workers, over
    /// all of them together.
    pub serve_max_mbps: f64,
    /// Most data-file uploads in flight at once, over all workers (further requests wait).
    pub serve_max_streams: usize,
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection {
            dir: PathBuf::from(trainer::data::DEFAULT_DIR),
            shards: None,
            seq_len: 128,
            train_limit: 0,
            serve_max_mbps: 50.0,
            serve_max_streams: 4,
        }
    }
}

/// `[training]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingSection {
    /// Samples per optimizer step, split over the workers.
    pub global_batch: usize,
    /// Epochs to train (ignored when `steps` is set).
    #[serde(default = "one")]
    pub epochs: u64,
    /// Total global batches to train on; overrides `epochs`.
    #[serde(default)]
    pub steps: Option<u64>,
    /// Global batches per round (DiLoCo's H). 1: synchronous data parallelism, workers send
    /// gradients. H > 1: each worker takes H inner-optimizer steps on its share of H global
    /// batches and sends start minus end parameters, to which the coordinator applies
    /// `[optimizer]` as the outer optimizer.
    #[serde(default = "one_u32")]
    pub local_steps: u32,
    /// Evaluate every N steps as well as at each epoch end (0: only at epoch ends).
    #[serde(default)]
    pub eval_every: u64,
    /// Write a checkpoint every N steps as well as after each evaluation (0: never extra).
    #[serde(default)]
    pub checkpoint_every: u64,
    /// Compute threads of the coordinator (evaluation).
    #[serde(default)]
    pub threads: Option<usize>,
    /// Samples per inner batch at most when rounds grow with the workers present; unset: a
    /// round uses `global_batch` samples per inner step whatever the number of workers (and
    /// at most that many workers). When set, each inner batch of a round merges
    /// `k = ceil(workers * min_micro_batch / global_batch)` consecutive global batches, up to
    /// this many samples. The optimizer's learning rate stays as configured: for SGD the
    /// linear scaling rule (Goyal et al., 2017, "Accurate, Large Minibatch SGD") suggests
    /// `lr * k`, for Adam(W) the square-root rule (Malladi et al., 2022, "On the SDEs and
    /// Scaling Rules for Adaptive Gradient Algorithms") `lr * sqrt(k)`; set `lr` for the
    /// batch the swarm usually reaches.
    #[serde(default)]
    pub max_global_batch: Option<usize>,
    /// Samples per worker and inner batch that growing rounds aim at (default 8; shares
    /// still follow speed).
    #[serde(default = "eight")]
    pub min_micro_batch: usize,
}

fn eight() -> usize {
    8
}

impl TrainingSection {
    /// How rounds grow with the workers present (`max_global_batch` set).
    pub fn growth(&self) -> Option<rounds::Growth> {
        self.max_global_batch.map(|max| rounds::Growth {
            min_micro_batch: self.min_micro_batch,
            max_global_batch: max,
        })
    }
}

fn one() -> u64 {
    1
}

fn one_u32() -> u32 {
    1
}

/// `[network]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkSection {
    /// Most workers connected at once.
    pub max_workers: usize,
    /// Largest frame accepted from a worker, bytes.
    pub max_frame_bytes: u64,
    /// Seconds a new connection has to complete the handshake.
    pub handshake_timeout_s: f64,
    /// Seconds of silence after which a connection is dropped.
    pub idle_timeout_s: f64,
    /// Deadline of a worker's first task, seconds (later ones follow its measured speed).
    pub first_task_timeout_s: f64,
    /// Deadline floor for later tasks, seconds.
    pub min_task_timeout_s: f64,
    /// Seconds after which a round's unanswered parts go to workers that finished, beyond 4x
    /// the time its first answer took, counted from that answer (stragglers nobody
    /// predicted).
    pub straggler_grace_s: f64,
    /// Connections in the TLS or protocol handshake at once; more are refused at once.
    pub max_handshakes: usize,
    /// Frames a connection may send per second (burst: twice that); faster peers are slowed.
    pub max_frames_per_s: f64,
    /// Bytes a connection may send per second (burst: twice that); faster peers are slowed.
    pub max_bytes_per_s: f64,
    /// New connections accepted per second from one UDP socket (address and port; burst:
    /// twice that), and ten times that from one IP address.
    pub max_new_conns_per_s: f64,
}

impl Default for NetworkSection {
    fn default() -> Self {
        NetworkSection {
            max_workers: 10_000,
            max_frame_bytes: 256 << 20,
            handshake_timeout_s: 10.0,
            idle_timeout_s: 30.0,
            first_task_timeout_s: 60.0,
            min_task_timeout_s: 5.0,
            straggler_grace_s: 1.5,
            max_handshakes: 32,
            max_frames_per_s: 200.0,
            max_bytes_per_s: 1e9,
            max_new_conns_per_s: 5.0,
        }
    }
}

/// `[workers]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkersSection {
    /// Force this many compute threads on every worker (deterministic mode); unset: their choice.
    pub deterministic_threads: Option<u32>,
    /// The portable deterministic mode: workers and the coordinator's checks compute with
    /// `executor::class::PORTABLE_ENV` (libtorch's baseline kernels, MKL's `COMPATIBLE`
    /// path, oneDNN at SSE4.1) at `deterministic_threads` threads (1 when unset), so that
    /// every x86-64 CPU computes the same bits and is checked bitwise. Slower; see the
    /// README's "Verification across hardware".
    pub portable: bool,
    /// Size the workers' shares of each batch so that they finish at the same time (by their
    /// compute times; false: equal shares).
    pub balance_by_speed: bool,
}

impl Default for WorkersSection {
    fn default() -> Self {
        WorkersSection {
            deterministic_threads: None,
            portable: false,
            balance_by_speed: true,
        }
    }
}

/// How results are compared with their re-execution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CheckMode {
    /// Bitwise for CPU workers when `workers.deterministic_threads` is set, tolerance otherwise.
    #[default]
    Auto,
    /// The exact bytes must match.
    Bitwise,
    /// The decoded updates must agree within `tolerance` (relative L2 distance).
    Tolerance,
}

/// `[verification]`: spot checks by re-execution on the coordinator.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerificationSection {
    /// Probability of re-executing a result of a trusted worker (0 with `new_worker_p` 0: off).
    pub p: f64,
    /// Probability for a worker with no passed check yet; falls linearly to `p`.
    pub new_worker_p: f64,
    /// Passed checks after which `p` applies.
    pub trusted_after: u32,
    /// How results are compared.
    pub mode: CheckMode,
    /// Largest relative L2 distance accepted in tolerance mode (decoded updates) and between
    /// the results of two compute classes (values encoded); unset:
    /// [`VerificationSection::tolerance_for`] and [`VerificationSection::cross_class_tolerance`].
    pub tolerance: Option<f64>,
    /// A relative L2 distance no honest computation in any class reaches: evidence against
    /// a result of a class the coordinator cannot reproduce. Below it such a result that
    /// fails `tolerance` is dropped without accusation.
    pub gross_tolerance: f64,
    /// Seconds a worker has to answer a challenge about a result it committed to.
    pub challenge_timeout_s: f64,
    /// Checks waiting or running before new rounds wait for them.
    pub max_pending: usize,
    /// Unanswered challenges or protocol offences after which a worker is banned.
    pub max_strikes: u32,
}

impl VerificationSection {
    /// The relative L2 tolerance between results of two compute classes: `tolerance` when
    /// set, else 1e-2. It applies to the values encoded (a result of another class with a
    /// lossy codec reveals them), so the fp32 calibration holds for every codec.
    pub fn cross_class_tolerance(&self) -> f64 {
        self.tolerance.unwrap_or(1e-2)
    }

    /// The relative L2 tolerance for updates encoded with `codec`: `tolerance` when set,
    /// else 1e-2, and 1e-1 for sign1, whose signs flip on tiny differences: at least 5x the
    /// largest honest distance between compute classes that `experiments classes` measured
    /// for each codec (results/classes: fp32 3.9e-4, int8 4.1e-4, int4 1.4e-3, top-k
    /// 1.8e-4, sign1 8.5e-3).
    pub fn tolerance_for(&self, codec: &CodecConfig) -> f64 {
        self.tolerance.unwrap_or(match codec.codec {
            compression::CodecKind::Sign1 => 1e-1,
            _ => 1e-2,
        })
    }
}

impl Default for VerificationSection {
    fn default() -> Self {
        VerificationSection {
            p: 0.05,
            new_worker_p: 0.5,
            trusted_after: 20,
            mode: CheckMode::Auto,
            tolerance: None,
            gross_tolerance: 1.0,
            challenge_timeout_s: 60.0,
            max_pending: 16,
            max_strikes: 3,
        }
    }
}

impl VerificationSection {
    /// The spot-check policy these settings describe.
    pub fn policy(&self) -> SpotCheckPolicy {
        SpotCheckPolicy {
            base_p: self.p,
            new_worker_p: self.new_worker_p,
            trusted_after: self.trusted_after,
        }
    }

    /// Whether any result can be checked.
    pub fn enabled(&self) -> bool {
        self.p > 0.0 || self.new_worker_p > 0.0
    }
}

/// `[ledger]`: the write-ahead log, checkpoints and the history kept for rollbacks.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerSection {
    /// Write a checkpoint (and start a new write-ahead log) once the log exceeds this.
    pub wal_max_bytes: u64,
    /// Keep an in-memory snapshot every this many rounds, for rollbacks.
    pub snapshot_every: u64,
    /// Rounds of history kept for rollbacks.
    pub rollback_window: u64,
    /// Most bytes of contributions kept in memory for rollbacks.
    pub history_max_bytes: u64,
}

impl Default for LedgerSection {
    fn default() -> Self {
        LedgerSection {
            wal_max_bytes: 64 << 20,
            snapshot_every: 10,
            rollback_window: 200,
            history_max_bytes: 256 << 20,
        }
    }
}

/// `[monitor]`: the status server ([`crate::monitor`]).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitorSection {
    /// Address of the HTTP status server, e.g. `127.0.0.1:9090`; unset: no server. It is
    /// read-only without the operator token of the run's `identity.json`; put it behind a
    /// TLS proxy before exposing it beyond the machine.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
}

/// Errors of configuration loading.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {error}")]
    Read {
        /// The file.
        path: String,
        /// The cause (in the message, so not also a `source` of the error chain).
        error: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A value is out of range.
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl RunConfig {
    /// Reads and validates a config file. Relative paths are taken from the file's folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            error: source,
        })?;
        let in_file = |e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                message,
            },
            ConfigError::Invalid(m) => ConfigError::Invalid(format!("{}: {m}", path.display())),
            other => other,
        };
        let mut cfg = Self::parse(&text).map_err(in_file)?;
        cfg.source = Some(path.to_path_buf());
        let base = path.parent().unwrap_or(Path::new("."));
        if cfg.run.output_dir.is_relative() {
            cfg.run.output_dir = base.join(&cfg.run.output_dir);
        }
        if cfg.data.dir.is_relative() {
            cfg.data.dir = base.join(&cfg.data.dir);
        }
        for p in [
            &mut cfg.data.shards,
            &mut cfg.model.config,
            &mut cfg.model.init,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        cfg.check_model().map_err(in_file)?;
        Ok(cfg)
    }

    /// `field` (`model.init`, `data.shards`) as errors name it: after the config file's path
    /// when the config was read from one (`run.toml: model.init`).
    pub fn field(&self, field: &str) -> String {
        match &self.source {
            Some(p) => format!("{}: {field}", p.display()),
            None => field.to_string(),
        }
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let cfg: RunConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<config>".into(),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the model against the data settings (reads `model.config` when given):
    /// a language model needs `data.shards` and a `seq_len` within its
    /// `max_position_embeddings`. Returns the model.
    pub fn check_model(&self) -> Result<ModelSpec, ConfigError> {
        let spec = self.model.spec()?;
        if let ModelSpec::Llama(c) = &spec {
            if self.data.shards.is_none() {
                return Err(ConfigError::Invalid(
                    "a language model needs data.shards (a folder made by `coordinator data prepare`)"
                        .into(),
                ));
            }
            let max = c.max_position_embeddings as usize;
            if self.data.seq_len == 0 || self.data.seq_len > max {
                return Err(ConfigError::Invalid(format!(
                    "data.seq_len {} must be in 1..={max} (the model's max_position_embeddings)",
                    self.data.seq_len
                )));
            }
        }
        Ok(spec)
    }

    /// Checks value ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.training.global_batch == 0 || self.training.global_batch > 1 << 20 {
            return bad("training.global_batch must be in 1..=1048576".into());
        }
        if self.training.steps == Some(0)
            || (self.training.steps.is_none() && self.training.epochs == 0)
        {
            return bad("training needs epochs >= 1 or steps >= 1".into());
        }
        if !(self.run.start_gather_s.is_finite()
            && (0.0..=3600.0).contains(&self.run.start_gather_s))
        {
            return bad("run.start_gather_s must be in [0, 3600] seconds".into());
        }
        let d = &self.data;
        if !(d.serve_max_mbps.is_finite() && (1.0..=100_000.0).contains(&d.serve_max_mbps)) {
            return bad("data.serve_max_mbps must be in [1, 100000] megabits per second".into());
        }
        if !(1..=256).contains(&d.serve_max_streams) {
            return bad("data.serve_max_streams must be in 1..=256".into());
        }
        if !(1..=10_000).contains(&self.training.local_steps) {
            return bad("training.local_steps must be in 1..=10000".into());
        }
        if let Some(max) = self.training.max_global_batch {
            if max < self.training.global_batch || max > 1 << 24 {
                return bad(format!(
                    "training.max_global_batch must be in global_batch ({})..=16777216, got {max}",
                    self.training.global_batch
                ));
            }
            if !(1..=1 << 20).contains(&self.training.min_micro_batch) {
                return bad("training.min_micro_batch must be in 1..=1048576".into());
            }
        }
        if self.model.config.is_none() {
            self.check_model()?;
        }
        self.optimizer.validate().map_err(ConfigError::Invalid)?;
        self.inner_optimizer
            .validate()
            .map_err(|e| ConfigError::Invalid(format!("inner_{e}")))?;
        self.compression
            .validate()
            .map_err(|e| ConfigError::Invalid(format!("compression: {e}")))?;
        self.downlink
            .validate()
            .map_err(|e| ConfigError::Invalid(format!("downlink: {e}")))?;
        self.aggregation
            .validate()
            .map_err(|e| ConfigError::Invalid(format!("aggregation: {e}")))?;
        let v = &self.verification;
        if !(0.0..=1.0).contains(&v.p) || !(0.0..=1.0).contains(&v.new_worker_p) {
            return bad("verification.p and new_worker_p must be in [0, 1]".into());
        }
        if let Some(t) = v.tolerance {
            if !(t.is_finite() && t >= 0.0) {
                return bad("verification.tolerance must be a finite number >= 0".into());
            }
        }
        if !(v.gross_tolerance.is_finite()
            && v.gross_tolerance >= v.tolerance_for(&self.compression))
        {
            return bad("verification.gross_tolerance must be finite and >= tolerance".into());
        }
        if v.max_pending == 0 || v.max_strikes == 0 {
            return bad("verification.max_pending and max_strikes must be >= 1".into());
        }
        let l = &self.ledger;
        if l.snapshot_every == 0 || l.wal_max_bytes < 1 << 20 {
            return bad(
                "ledger.snapshot_every >= 1 and wal_max_bytes >= 1 MiB are required".into(),
            );
        }
        let n = &self.network;
        if n.max_workers == 0 || n.max_frame_bytes < 1024 {
            return bad("network.max_workers >= 1 and max_frame_bytes >= 1024 are required".into());
        }
        if n.max_new_conns_per_s.is_nan() || n.max_new_conns_per_s < 0.5 {
            return bad("network.max_new_conns_per_s must be >= 0.5".into());
        }
        if n.max_handshakes == 0
            || n.max_frames_per_s.is_nan()
            || n.max_frames_per_s < 1.0
            || n.max_bytes_per_s.is_nan()
            || n.max_bytes_per_s < 1e4
        {
            return bad(
                "network.max_handshakes >= 1, max_frames_per_s >= 1, max_bytes_per_s >= 1e4 are required"
                    .into(),
            );
        }
        for (name, v) in [
            ("challenge_timeout_s", self.verification.challenge_timeout_s),
            ("handshake_timeout_s", n.handshake_timeout_s),
            ("idle_timeout_s", n.idle_timeout_s),
            ("first_task_timeout_s", n.first_task_timeout_s),
            ("min_task_timeout_s", n.min_task_timeout_s),
            ("straggler_grace_s", n.straggler_grace_s),
        ] {
            if !(v.is_finite() && v > 0.0 && v < 86_400.0) {
                return bad(format!("{name} must be in (0, 86400) seconds"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [run]
        output_dir = "out"
        [training]
        global_batch = 64
    "#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = RunConfig::parse(MINIMAL).unwrap();
        assert_eq!(c.training.epochs, 1);
        assert_eq!(c.model.kind, ModelKind::Cnn);
        assert_eq!(c.optimizer.lr, 1e-3);
        assert!(c.run.resume);
    }

    #[test]
    fn bad_values_are_refused_with_a_reason() {
        let typo = MINIMAL.replace("global_batch", "global_bach");
        assert!(matches!(
            RunConfig::parse(&typo),
            Err(ConfigError::Parse { .. })
        ));
        let zero = MINIMAL.replace("64", "0");
        assert!(matches!(
            RunConfig::parse(&zero),
            Err(ConfigError::Invalid(_))
        ));
        let lr = format!("{MINIMAL}\n[optimizer]\nlr = -1.0\n");
        let err = RunConfig::parse(&lr).unwrap_err().to_string();
        assert!(err.contains("lr"), "{err}");
    }

    #[test]
    fn language_model_settings_are_checked() {
        let llama = r#"
            [model]
            kind = "llama"
            [model.llama]
            vocab_size = 256
            hidden_size = 64
            intermediate_size = 128
            num_hidden_layers = 2
            num_attention_heads = 4
            max_position_embeddings = 64
        "#;
        let no_shards = format!("{MINIMAL}{llama}");
        let e = RunConfig::parse(&no_shards).unwrap_err().to_string();
        assert!(e.contains("data.shards"), "{e}");
        let ok = format!("{MINIMAL}{llama}\n[data]\nshards = \"s\"\nseq_len = 64\n");
        let c = RunConfig::parse(&ok).unwrap();
        assert!(matches!(c.check_model().unwrap(), ModelSpec::Llama(_)));
        let long = ok.replace("seq_len = 64", "seq_len = 65");
        let e = RunConfig::parse(&long).unwrap_err().to_string();
        assert!(
            e.contains("seq_len") && e.contains("max_position_embeddings"),
            "{e}"
        );
        let heads = ok.replace("num_attention_heads = 4", "num_attention_heads = 5");
        let e = RunConfig::parse(&heads).unwrap_err().to_string();
        assert!(
            e.contains("hidden_size") && e.contains("num_attention_heads"),
            "{e}"
        );
        let kv = ok.replace(
            "num_attention_heads = 4",
            "num_attention_heads = 4\nnum_key_value_heads = 3",
        );
        let e = RunConfig::parse(&kv).unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
    }

    #[test]
    fn shipped_configs_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        for entry in std::fs::read_dir(dir).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e == "toml") {
                RunConfig::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            }
        }
    }
}
