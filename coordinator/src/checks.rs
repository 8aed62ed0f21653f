//! Spot checks: re-executing a random sample of results on the coordinator and comparing.
//!
//! A check of task `t` re-executes it from the same parameters and samples with the same
//! executor code the workers run, continues the same error-feedback residual, encodes with
//! the same seed, and compares with what the worker committed: bitwise (the hash of the
//! encoded values, the update bytes and the inner-step root) for workers of the checks' own
//! compute class in deterministic mode, within a relative tolerance otherwise ([`judge`]:
//! across classes on the values encoded, with a re-execution in the worker's own class
//! before any accusation). The residual comes from the
//! worker's previous used result `b`: the worker reveals the values it encoded for `b`
//! (which must hash to `b`'s signed commitment), and the residual is those values minus the
//! decoding of `b`'s bytes. A passed check thus confirms the task's computation and encoding
//! given `b`'s revealed values; `b`'s own honesty is confirmed only by a check of `b` (the
//! scheduler counts a result as verified only when its base is).
//!
//! When a multi-step result disagrees, the coordinator bisects over the worker's committed
//! inner-step hashes (each revealed with a Merkle proof against the signed root) to find
//! the first divergent step, which the evidence names: one step that anyone can re-execute
//! from the agreed state before it.

use std::collections::{HashMap, HashSet};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use compression::{CodecConfig, DecodeLimits};
use executor::{encode_update, Executor};
use proto::{Answer, Query, TaskResult};
use serde_bytes::ByteBuf;
use trainer::{ModelSpec, OptimizerConfig, TrainData};
use verify::{Commitment, Evidence, Hash, WorkerId};

use serde::{Deserialize, Serialize};
use verify::ComputeClass;

/// The result of the worker's previous used task, whose residual task `t` continues.
#[derive(Clone)]
pub struct Base {
    /// Its commitment.
    pub commitment: Commitment,
    /// Its update bytes.
    pub update: Arc<ByteBuf>,
}

/// What a task asked for, besides its parameters.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Work {
    /// Its samples.
    pub indices: Vec<u32>,
    /// Its micro-batches.
    pub micro: Vec<u32>,
    /// Inner steps (DiLoCo) or one gradient.
    pub inner_steps: bool,
    /// Its seed.
    pub seed: u64,
}

/// One result to re-execute.
pub struct Job {
    /// Check number (given by [`Checks::submit`]).
    id: u64,
    /// Who computed it.
    pub worker: WorkerId,
    /// The connection challenges go to: the one the result came on, or a later one of the
    /// same worker.
    pub conn: u64,
    /// The connection the result came on.
    origin: u64,
    /// Starting parameters of the task.
    pub params: Arc<Vec<f32>>,
    /// The task.
    pub work: Work,
    /// What the worker sent.
    pub result: Arc<TaskResult>,
    /// The error-feedback base, when the result continues one.
    pub base: Option<Base>,
    /// The values the worker revealed for the base.
    base_input: Option<Vec<f32>>,
    /// The values the worker revealed it encoded for this task (asked for results of another
    /// compute class with a lossy codec, so that the comparison is not of quantized values,
    /// where a tiny difference can flip a level).
    own_input: Option<Vec<f32>>,
    /// Relative L2 tolerance (None: bitwise).
    pub tolerance: Option<f64>,
    /// The compute class the worker declared (and bound into the commitment).
    pub class: ComputeClass,
    /// When the worker's answer to the pending challenge is due (kept across reconnects).
    deadline: Option<Instant>,
}

impl Job {
    /// A job; `base` must be given when the commitment names an error-feedback base.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        worker: WorkerId,
        conn: u64,
        params: Arc<Vec<f32>>,
        work: Work,
        result: Arc<TaskResult>,
        base: Option<Base>,
        tolerance: Option<f64>,
        class: ComputeClass,
    ) -> Self {
        Job {
            id: 0,
            worker,
            conn,
            origin: conn,
            params,
            work,
            result,
            base,
            base_input: None,
            own_input: None,
            tolerance,
            class,
            deadline: None,
        }
    }

    fn task_id(&self) -> u64 {
        self.result.task_id
    }
}

/// What re-execution concluded.
#[derive(Debug, Serialize, Deserialize)]
pub enum Verdict {
    /// The result is what the task gives; how it was confirmed.
    Pass(String),
    /// It is not.
    Fail {
        /// What differs.
        reason: String,
        /// The update hash re-execution produced.
        recomputed: Hash,
        /// The honest inner-step hashes (multi-step tasks), for bisection.
        leaves: Vec<Hash>,
        /// Relative L2 distance between the decoded updates (infinite when the worker's
        /// does not decode).
        distance: f64,
    },
    /// The disagreement is no evidence: bits that differ within the tolerance in one
    /// declared class, or a difference across classes below the gross bound where the
    /// worker's class could not be reproduced faithfully (or its re-execution failed). The
    /// result is dropped, nobody is accused.
    Unconfirmed(String),
    /// The check could not run on the coordinator's side (e.g. the revealed base does not
    /// decode, re-execution failed).
    Error(String),
}

/// A finished re-execution.
pub struct Done {
    /// The job.
    pub job: Job,
    /// The verdict.
    pub verdict: Verdict,
    /// Milliseconds of re-execution.
    pub ms: f64,
}

/// What the scheduler must do after a check event.
pub enum Out {
    /// Send a challenge to a connection.
    Challenge {
        /// The connection.
        conn: u64,
        /// Challenge id.
        challenge_id: u64,
        /// The task asked about.
        task_id: u64,
        /// What to reveal.
        query: Query,
    },
    /// A result was confirmed.
    Passed {
        /// Its worker.
        worker: WorkerId,
        /// Its task.
        task_id: u64,
        /// How: bitwise, within the tolerance, across classes, in its own class.
        how: String,
        /// The error-feedback base it continued (0: none).
        base: u64,
        /// Milliseconds of re-execution.
        ms: f64,
    },
    /// A worker was caught.
    Caught {
        /// The evidence.
        evidence: Box<Evidence>,
        /// Milliseconds of re-execution.
        ms: f64,
    },
    /// A check could not be completed; the result cannot stay in the model.
    Abandoned {
        /// The worker.
        worker: WorkerId,
        /// The task.
        task_id: u64,
        /// The connection the question went to.
        conn: u64,
        /// Why.
        reason: String,
        /// Whether the worker is to blame (it did not answer, or answered that it cannot),
        /// as opposed to the coordinator's side failing.
        worker_fault: bool,
    },
}

/// A failed multi-step check being narrowed down to one inner step.
struct Bisection {
    /// Every step before `lo` agrees; step `hi` disagrees (or `hi` is the step count).
    lo: usize,
    hi: usize,
    /// The honest inner-step hashes.
    leaves: Vec<Hash>,
    /// Why the check failed, and the update hash re-execution produced.
    reason: String,
    recomputed: Hash,
    /// Milliseconds the re-execution took.
    ms: f64,
}

impl Bisection {
    fn mid(&self) -> usize {
        self.lo + (self.hi - self.lo) / 2
    }

    /// The evidence as it stands, with the divergent step when it is known.
    fn caught(self, job: &Job, step: Option<u64>) -> Out {
        let reason = match step {
            Some(s) => format!("{}; first divergent inner step {s}", self.reason),
            None if self.lo >= self.hi => {
                format!(
                    "{}; every inner step agrees, the final update differs",
                    self.reason
                )
            }
            None => self.reason,
        };
        Out::Caught {
            evidence: Box::new(evidence(job, self.recomputed, step, reason)),
            ms: self.ms,
        }
    }
}

/// What a waiting check waits for.
enum Stage {
    /// The worker to reveal the base's encoded values.
    Reveal,
    /// The worker to reveal the values it encoded for the task itself.
    RevealOwn,
    /// The worker to open an inner-step hash.
    Bisect(Bisection),
}

/// A check in progress.
enum Slot {
    /// On the checker thread.
    Running,
    /// Waiting for a worker's answer to challenge `challenge`.
    Waiting {
        job: Box<Job>,
        stage: Stage,
        challenge: u64,
    },
}

/// The checks in progress.
pub struct Checks {
    jobs: HashMap<u64, Slot>,
    challenges: HashMap<u64, u64>,
    next_challenge: u64,
    next_job: u64,
    to_checker: Sender<Job>,
    timeout: Duration,
    limits: DecodeLimits,
    /// Digest of the checks' compute class.
    own_class: Hash,
    /// Whether the codec loses information (then results of other classes reveal their
    /// encoded values).
    lossy: bool,
}

/// How the checker treats results computed in another compute class than its own.
pub struct Classes {
    /// The class the checker computes in.
    pub own: ComputeClass,
    /// Relative L2 distance accepted between classes, of the values encoded.
    pub tolerance: f64,
    /// Relative L2 distance between decoded updates below which other bits in the checks'
    /// own class are not taken as evidence (the codec's tolerance).
    pub decoded_tolerance: f64,
    /// A relative L2 distance beyond any honest difference between classes (reached or
    /// passed): evidence even when the worker's own class cannot be reproduced here.
    pub gross: f64,
    /// How to re-execute in another class (`None`: never).
    pub emulator: Option<Emulator>,
}

/// The longest a re-execution in another class may take.
const EMULATION_TIMEOUT: Duration = Duration::from_secs(600);

/// Re-execution in another class: this program (`exe recheck`) started with the class's
/// settings in its environment, the run config and the job on its stdin (bincode), the
/// [`Verdict`] on its stdout.
pub struct Emulator {
    /// The program (the coordinator's own binary).
    pub exe: std::path::PathBuf,
    /// The run config, TOML.
    pub config: String,
    /// [`TrainData::digest`] of the training data the checks use (the child must load
    /// the same).
    pub dataset_digest: Hash,
}

/// What a child re-executing in another class gets.
#[derive(Serialize, Deserialize)]
struct EmulatedCheck {
    config: String,
    dataset_digest: Hash,
    worker: WorkerId,
    threads: u32,
    params: Vec<f32>,
    work: Work,
    result: TaskResult,
    base: Option<(Commitment, ByteBuf)>,
    base_input: Option<Vec<f32>>,
    own_input: Option<Vec<f32>>,
    tolerance: f64,
}

impl Emulator {
    /// Re-executes `job` with `env` set (and every other class variable unset) at the
    /// worker's thread count.
    fn run(
        &self,
        job: &Job,
        env: Vec<(String, String)>,
        tolerance: f64,
    ) -> Result<Verdict, String> {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let req = EmulatedCheck {
            config: self.config.clone(),
            dataset_digest: self.dataset_digest,
            worker: job.worker,
            threads: job.class.threads.max(1),
            params: job.params.to_vec(),
            work: job.work.clone(),
            result: (*job.result).clone(),
            base: job
                .base
                .as_ref()
                .map(|b| (b.commitment.clone(), (*b.update).clone())),
            base_input: job.base_input.clone(),
            own_input: job.own_input.clone(),
            tolerance,
        };
        let mut cmd = Command::new(&self.exe);
        cmd.arg("recheck")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for v in executor::class::CLASS_ENV_VARS {
            cmd.env_remove(v);
        }
        let mut child = cmd.envs(env).spawn().map_err(|e| e.to_string())?;
        let body = bincode::serialize(&req).map_err(|e| e.to_string())?;
        let (mut stdin, mut stdout) = match (child.stdin.take(), child.stdout.take()) {
            (Some(i), Some(o)) => (i, o),
            _ => return Err("no pipes to the re-execution".into()),
        };
        // The answer is read on a thread so that a hung child is killed at the deadline
        // instead of stopping the checks.
        let reader = std::thread::spawn(move || {
            let mut out = Vec::new();
            std::io::Read::read_to_end(&mut stdout, &mut out).map(|_| out)
        });
        let written = stdin.write_all(&body);
        drop(stdin);
        let deadline = Instant::now() + EMULATION_TIMEOUT;
        let status = loop {
            match child.try_wait().map_err(|e| e.to_string())? {
                Some(status) => break status,
                None if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("no answer in {EMULATION_TIMEOUT:?}"));
                }
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        written.map_err(|e| e.to_string())?;
        let out = reader
            .join()
            .map_err(|_| "the reader failed".to_string())?
            .map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("the re-execution exited with {status}"));
        }
        bincode::deserialize(&out).map_err(|e| e.to_string())
    }
}

/// The child side of [`Emulator`]: reads the job from `input`, re-executes it in this
/// process's class (bitwise, then within the tolerance) and writes the [`Verdict`].
pub fn serve_emulated_check(
    input: impl std::io::Read,
    output: impl std::io::Write,
) -> anyhow::Result<()> {
    let req: EmulatedCheck = bincode::deserialize_from(input)?;
    let cfg = crate::RunConfig::parse(&req.config)?;
    let spec = cfg.check_model()?;
    let data = crate::dataset::load(&cfg, &spec)?;
    if data.train.digest() != req.dataset_digest {
        anyhow::bail!("the training data on disk changed since the run started");
    }
    trainer::runtime::set_threads(Some(req.threads as usize));
    let mut exec = Executor::new(
        &spec,
        tch::Device::Cpu,
        Arc::new(data.train),
        cfg.inner_optimizer.clone(),
    );
    let limits = DecodeLimits {
        max_values: exec.n_params(),
        max_encoded_bytes: cfg.network.max_frame_bytes as usize,
    };
    let mut job = Job::new(
        req.worker,
        0,
        Arc::new(req.params),
        req.work,
        Arc::new(req.result),
        req.base.map(|(commitment, update)| Base {
            commitment,
            update: Arc::new(update),
        }),
        None,
        ComputeClass::default(),
    );
    job.base_input = req.base_input;
    job.own_input = req.own_input;
    let mut verdict = recheck(&mut exec, &job, &cfg.compression, &limits);
    if let Verdict::Fail { distance, .. } = &verdict {
        if *distance <= req.tolerance {
            verdict = Verdict::Pass(format!(
                "relative L2 {distance:.1e}, within {:.0e}",
                req.tolerance
            ));
        }
    }
    bincode::serialize_into(output, &verdict)?;
    Ok(())
}

/// Where the checker thread hands finished checks (false once nobody listens).
pub type Report = Box<dyn Fn(Done) -> bool + Send>;

/// Starts the checker thread; its verdicts go to `report`.
#[allow(clippy::too_many_arguments)]
pub fn start(
    model: ModelSpec,
    data: Arc<TrainData>,
    inner: OptimizerConfig,
    codec: CodecConfig,
    limits: DecodeLimits,
    classes: Classes,
    report: Report,
    timeout: Duration,
) -> Checks {
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    let (own_class, lossy) = (classes.own.digest(), !codec.codec.is_lossless());
    std::thread::Builder::new()
        .name("checker".into())
        .spawn(move || checker(model, data, inner, codec, limits, classes, rx, report))
        .expect("spawn the checker thread");
    Checks {
        jobs: HashMap::new(),
        challenges: HashMap::new(),
        next_challenge: 1,
        next_job: 1,
        to_checker: tx,
        timeout,
        limits,
        own_class,
        lossy,
    }
}

#[allow(clippy::too_many_arguments)]
fn checker(
    model: ModelSpec,
    data: Arc<TrainData>,
    inner: OptimizerConfig,
    codec: CodecConfig,
    limits: DecodeLimits,
    classes: Classes,
    jobs: Receiver<Job>,
    report: Report,
) {
    let mut exec = Executor::new(&model, tch::Device::Cpu, data, inner);
    for job in jobs {
        let t = Instant::now();
        let verdict = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            judge(&mut exec, &job, &codec, &limits, &classes)
        }))
        .unwrap_or_else(|_| Verdict::Error("re-execution panicked".into()));
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if !report(Done { job, verdict, ms }) {
            return;
        }
    }
}

/// Re-executes a job and judges it, following the classes: a result of another class that
/// fails the comparison is not held against the worker until it also fails in its own class
/// (reproduced here when this machine can, see [`executor::class::emulation_env`]), or
/// differs by more than any honest difference between classes.
pub fn judge(
    exec: &mut Executor,
    job: &Job,
    codec: &CodecConfig,
    limits: &DecodeLimits,
    classes: &Classes,
) -> Verdict {
    if let Some(input) = &job.own_input {
        // Encoding is plain Rust, the same bits in every class: the revealed values must
        // give exactly the bytes sent.
        let bytes = compression::encode(input, &as_sent(codec, &job.result.update), job.work.seed);
        if !bytes.is_ok_and(|b| verify::hash_update(&b) == job.result.commitment.update) {
            return Verdict::Fail {
                reason: "the values it revealed encode to other bytes than it sent".into(),
                recomputed: [0; 32],
                leaves: Vec::new(),
                distance: f64::INFINITY,
            };
        }
    }
    let verdict = recheck(exec, job, codec, limits);
    let (mine, theirs) = (classes.own.label(), job.class.label());
    let (reason, distance) = match &verdict {
        Verdict::Fail {
            reason, distance, ..
        } => (reason.clone(), *distance),
        Verdict::Pass(how) if job.class.digest() != classes.own.digest() => {
            return Verdict::Pass(format!("across classes {theirs} and {mine}: {how}"))
        }
        _ => return verdict,
    };
    if job.class.digest() == classes.own.digest() {
        // Bits that differ within the tolerance are no evidence either: two machines that
        // declare the same class may still run other kernels (a library choosing by CPU
        // model). The decoded updates are compared unless the values encoded were revealed.
        let tol = if job.own_input.is_some() {
            classes.tolerance
        } else {
            classes.decoded_tolerance
        };
        return if distance <= tol {
            Verdict::Unconfirmed(format!(
                "other bits in the same declared class {theirs}, relative L2 {distance:.1e} \
                 within {tol:.0e}"
            ))
        } else {
            verdict
        };
    }
    let tol = classes.tolerance;
    if distance <= tol {
        return Verdict::Pass(format!(
            "across classes {theirs} and {mine}: relative L2 {distance:.1e} within {tol:.0e}"
        ));
    }
    let gross = |why: String| {
        if distance >= classes.gross {
            Verdict::Fail {
                reason: format!(
                    "{reason}: relative L2 {distance:.1e} from {mine}, beyond any honest \
                     difference between classes ({:.0e}); {why}",
                    classes.gross
                ),
                recomputed: [0; 32],
                // Steps of another class do not bisect.
                leaves: Vec::new(),
                distance,
            }
        } else {
            Verdict::Unconfirmed(format!(
                "differs from {mine} by relative L2 {distance:.1e} (tolerance {tol:.0e}); {why}"
            ))
        }
    };
    let env = executor::class::emulation_env(&classes.own, &job.class);
    let Some((env, em)) = env.zip(classes.emulator.as_ref()) else {
        return gross(format!("its class {theirs} cannot be reproduced here"));
    };
    match em.run(job, env, tol) {
        Ok(Verdict::Pass(how)) => Verdict::Pass(format!(
            "in its own class {theirs}, reproduced here ({how}); {distance:.1e} from {mine}"
        )),
        // Reproduced faithfully, an honest result gives the same bits; other bits beyond
        // the tolerance there mean an unfaithful reproduction (another CPU model behind the
        // same declared class) or a small lie: no accusation short of the gross bound.
        Ok(Verdict::Fail {
            reason,
            recomputed,
            leaves,
            distance: own,
        }) if own >= classes.gross => Verdict::Fail {
            reason: format!(
                "{reason} in its own class {theirs} (reproduced here, relative L2 {own:.1e}) \
                 and in {mine} ({distance:.1e})"
            ),
            recomputed,
            leaves,
            distance: own,
        },
        Ok(Verdict::Fail { distance: own, .. }) => gross(format!(
            "reproduced in its class {theirs} here it differs by {own:.1e}"
        )),
        Ok(other) => other,
        Err(e) => gross(format!("re-execution in its class {theirs} failed: {e}")),
    }
}

/// The run's codec as the worker applied it to `update`: zstd at the run's level, or off
/// where the payload's header says its body is raw (a worker whose link was fast enough that
/// zstd did not pay, see [`compression::ZstdPolicy`]).
fn as_sent(codec: &CodecConfig, update: &[u8]) -> CodecConfig {
    let raw = compression::peek_header(update).is_ok_and(|h| !h.zstd);
    CodecConfig {
        zstd_level: if raw { 0 } else { codec.zstd_level },
        ..codec.clone()
    }
}

fn l2(v: impl Iterator<Item = f64>) -> f64 {
    v.map(|x| x * x).sum::<f64>().sqrt()
}

/// Relative L2 distance of `theirs` from `ours` (infinite when the lengths differ).
fn rel_l2(theirs: &[f32], ours: &[f32]) -> f64 {
    if theirs.len() != ours.len() {
        return f64::INFINITY;
    }
    let diff = l2(theirs.iter().zip(ours).map(|(a, b)| f64::from(a - b)));
    diff / l2(ours.iter().map(|&x| f64::from(x))).max(1e-12)
}

/// Relative L2 distance between the worker's decoded update and ours (infinite when the
/// worker's does not decode); `Err` when ours does not.
fn distance(theirs: &[u8], ours: &[u8], n: usize, limits: &DecodeLimits) -> Result<f64, String> {
    let ours = compression::decode_exact(ours, n, limits)
        .map_err(|e| format!("own update does not decode: {e}"))?;
    let Ok(theirs) = compression::decode_exact(theirs, n, limits) else {
        return Ok(f64::INFINITY);
    };
    Ok(rel_l2(&theirs, &ours))
}

/// Re-executes a job and compares, bitwise or within `job.tolerance`.
pub fn recheck(
    exec: &mut Executor,
    job: &Job,
    codec: &CodecConfig,
    limits: &DecodeLimits,
) -> Verdict {
    let c = &job.result.commitment;
    let w = &job.work;
    let raw = match exec.compute(&job.params, &w.indices, &w.micro, w.inner_steps) {
        Ok(r) => r,
        Err(e) => return Verdict::Error(format!("re-execution failed: {e}")),
    };
    let residual = match (&job.base, &job.base_input) {
        (Some(b), Some(input)) => match compression::decode_exact(&b.update, input.len(), limits) {
            Ok(sent) => Some(
                input
                    .iter()
                    .zip(&sent)
                    .map(|(c, s)| c - s)
                    .collect::<Vec<f32>>(),
            ),
            Err(e) => return Verdict::Error(format!("base update: {e}")),
        },
        _ => None,
    };
    let codec = as_sent(codec, &job.result.update);
    let enc = match encode_update(&raw.values, residual.as_deref(), &codec, w.seed) {
        Ok(e) => e,
        Err(e) => return Verdict::Error(format!("re-encoding failed: {e}")),
    };
    let recomputed = verify::hash_update(&enc.bytes);
    let root = raw.step_root();
    // Of the values encoded when the worker revealed them, else of the decoded updates.
    let distance = match &job.own_input {
        Some(theirs) => rel_l2(theirs, &enc.encoded_input),
        None => match distance(&job.result.update, &enc.bytes, raw.values.len(), limits) {
            Ok(d) => d,
            Err(e) => return Verdict::Error(e),
        },
    };
    let fail = |reason: String| Verdict::Fail {
        reason,
        recomputed,
        leaves: raw.leaves.clone(),
        distance,
    };
    if raw.n as u32 != c.n_samples {
        return fail("sample count differs".into());
    }
    match job.tolerance {
        None => {
            if root != c.step_root || verify::hash_f32(&enc.encoded_input) != c.encoded_input {
                fail("re-execution computes other values".into())
            } else if recomputed != c.update {
                // Encoding is the same in every class: never relaxed.
                Verdict::Fail {
                    reason: "the same values encode to other bytes".into(),
                    recomputed,
                    leaves: raw.leaves.clone(),
                    distance: f64::INFINITY,
                }
            } else {
                Verdict::Pass("bitwise".into())
            }
        }
        Some(tol) if distance <= tol => {
            Verdict::Pass(format!("relative L2 {distance:.1e} within {tol:.0e}"))
        }
        Some(tol) => fail(format!(
            "update differs by {distance:.3e} (relative L2), tolerance {tol:.1e}"
        )),
    }
}

impl Checks {
    /// Checks in progress.
    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    /// Whether none is in progress.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// Whether a result of `worker` is being disputed (it gets no new work meanwhile).
    pub fn disputed(&self, worker: &WorkerId) -> bool {
        self.jobs.values().any(|s| {
            matches!(s, Slot::Waiting { job, stage: Stage::Bisect(_), .. } if job.worker == *worker)
        })
    }

    /// The workers whose results are being disputed.
    pub fn disputed_workers(&self) -> HashSet<WorkerId> {
        self.jobs
            .values()
            .filter_map(|s| match s {
                Slot::Waiting {
                    job,
                    stage: Stage::Bisect(_),
                    ..
                } => Some(job.worker),
                _ => None,
            })
            .collect()
    }

    /// Sends `query` about `task_id` to the job's connection and parks the job until the
    /// answer (or its deadline, which a reconnect does not move).
    fn ask(&mut self, mut job: Job, stage: Stage, task_id: u64, query: Query) -> Vec<Out> {
        let challenge = self.next_challenge;
        self.next_challenge += 1;
        self.challenges.insert(challenge, job.id);
        job.deadline.get_or_insert(Instant::now() + self.timeout);
        let out = Out::Challenge {
            conn: job.conn,
            challenge_id: challenge,
            task_id,
            query,
        };
        let id = job.id;
        self.jobs.insert(
            id,
            Slot::Waiting {
                job: Box::new(job),
                stage,
                challenge,
            },
        );
        vec![out]
    }

    /// Starts checking a job.
    pub fn submit(&mut self, mut job: Job) -> Vec<Out> {
        job.id = self.next_job;
        self.next_job += 1;
        self.resume(job)
    }

    /// Asks for what the job still needs revealed (the base's encoded values, then those of
    /// a result of another class with a lossy codec), or runs it.
    fn resume(&mut self, job: Job) -> Vec<Out> {
        if let (Some(base), None) = (&job.base, &job.base_input) {
            let task = base.commitment.task_id;
            return self.ask(job, Stage::Reveal, task, Query::EncodedInput);
        }
        if self.lossy && job.own_input.is_none() && job.class.digest() != self.own_class {
            let task = job.task_id();
            return self.ask(job, Stage::RevealOwn, task, Query::EncodedInput);
        }
        self.run(job)
    }

    fn run(&mut self, job: Job) -> Vec<Out> {
        let (id, worker, task_id, conn) = (job.id, job.worker, job.task_id(), job.conn);
        if self.to_checker.send(job).is_err() {
            return vec![Out::Abandoned {
                worker,
                task_id,
                conn,
                reason: "the checker thread is gone".into(),
                worker_fault: false,
            }];
        }
        self.jobs.insert(id, Slot::Running);
        Vec::new()
    }

    /// Removes a waiting job and its challenge.
    fn take(&mut self, id: u64) -> Option<(Job, Stage)> {
        match self.jobs.remove(&id)? {
            Slot::Waiting {
                job,
                stage,
                challenge,
            } => {
                self.challenges.remove(&challenge);
                Some((*job, stage))
            }
            Slot::Running => {
                self.jobs.insert(id, Slot::Running);
                None
            }
        }
    }

    fn waiting_of(&self, worker: &WorkerId) -> Vec<u64> {
        self.jobs
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Waiting { job, .. } if job.worker == *worker))
            .map(|(&id, _)| id)
            .collect()
    }

    /// A worker reconnected on `conn`: re-sends the challenges its checks wait on, with their
    /// original deadlines.
    pub fn retarget(&mut self, worker: &WorkerId, conn: u64) -> Vec<Out> {
        let mut out = Vec::new();
        for id in self.waiting_of(worker) {
            let Some((job, stage)) = self.take(id) else {
                continue;
            };
            let job = Job { conn, ..job };
            out.extend(match stage {
                Stage::Reveal | Stage::RevealOwn => self.resume(job),
                Stage::Bisect(b) => self.bisect(job, b),
            });
        }
        out
    }

    /// Drops every waiting check of `worker` (it was banned).
    pub fn forget(&mut self, worker: &WorkerId) {
        for id in self.waiting_of(worker) {
            self.take(id);
        }
    }

    /// A worker answered a challenge.
    pub fn on_reply(&mut self, conn: u64, challenge_id: u64, answer: Answer) -> Vec<Out> {
        let Some(&id) = self.challenges.get(&challenge_id) else {
            return Vec::new();
        };
        if !matches!(self.jobs.get(&id), Some(Slot::Waiting { job, .. }) if job.conn == conn) {
            return Vec::new();
        }
        let Some((mut job, stage)) = self.take(id) else {
            return Vec::new();
        };
        job.deadline = None;
        match stage {
            Stage::Reveal => self.on_values(job, answer, false),
            Stage::RevealOwn => self.on_values(job, answer, true),
            Stage::Bisect(b) => self.on_leaf(job, answer, b),
        }
    }

    /// The worker revealed values it encoded: of the base (`own` false) or of the task
    /// itself; they must hash to what the signed commitment says.
    fn on_values(&mut self, mut job: Job, answer: Answer, own: bool) -> Vec<Out> {
        let (expected, what) = if own {
            (job.result.commitment.encoded_input, "encoded values")
        } else {
            match &job.base {
                Some(b) => (b.commitment.encoded_input, "error-feedback input"),
                None => return Vec::new(),
            }
        };
        let n = job.params.len();
        let revealed = match answer {
            Answer::Values(bytes) => compression::decode_exact(&bytes, n, &self.limits).ok(),
            // An answer on a later connection than the result's may come from a new process
            // of the worker, which lost what the old one kept (its residuals): no fault of an
            // honest worker. The result, which cannot be confirmed, still goes.
            Answer::Unavailable(why) => {
                return vec![Out::Abandoned {
                    worker: job.worker,
                    task_id: job.task_id(),
                    conn: job.conn,
                    reason: format!("could not reveal the {what}: {why}"),
                    worker_fault: job.conn == job.origin,
                }]
            }
            Answer::Leaf { .. } => None,
        };
        match revealed {
            Some(v) if verify::hash_f32(&v) == expected => {
                if own {
                    job.own_input = Some(v);
                } else {
                    job.base_input = Some(v);
                }
                self.resume(job)
            }
            _ => {
                let e = evidence(
                    &job,
                    [0; 32],
                    None,
                    format!("the revealed {what} do not match its signed commitment"),
                );
                vec![Out::Caught {
                    evidence: Box::new(e),
                    ms: 0.0,
                }]
            }
        }
    }

    fn on_leaf(&mut self, job: Job, answer: Answer, mut b: Bisection) -> Vec<Out> {
        let mid = b.mid();
        let root = job.result.commitment.step_root;
        let agrees = match answer {
            Answer::Leaf { leaf, proof }
                if proof.index == mid as u64
                    && proof.leaf_count == b.leaves.len() as u64
                    && proof.verify(&root, &leaf) =>
            {
                leaf == b.leaves[mid]
            }
            // No valid opening of its own commitment: stop bisecting, the evidence stands.
            _ => return vec![b.caught(&job, None)],
        };
        if agrees {
            b.lo = mid + 1;
        } else {
            b.hi = mid;
        }
        if b.lo >= b.hi {
            let step = (b.lo < b.leaves.len()).then_some(b.lo as u64);
            return vec![b.caught(&job, step)];
        }
        self.bisect(job, b)
    }

    fn bisect(&mut self, job: Job, b: Bisection) -> Vec<Out> {
        let query = Query::Leaf {
            index: b.mid() as u32,
        };
        let task = job.task_id();
        self.ask(job, Stage::Bisect(b), task, query)
    }

    /// The checker finished a job.
    pub fn on_done(&mut self, done: Done) -> Vec<Out> {
        let Done { job, verdict, ms } = done;
        self.jobs.remove(&job.id);
        match verdict {
            Verdict::Pass(how) => vec![Out::Passed {
                worker: job.worker,
                task_id: job.task_id(),
                how,
                base: job.result.commitment.ef_base,
                ms,
            }],
            Verdict::Error(reason) | Verdict::Unconfirmed(reason) => vec![Out::Abandoned {
                worker: job.worker,
                task_id: job.task_id(),
                conn: job.conn,
                reason,
                worker_fault: false,
            }],
            Verdict::Fail {
                reason,
                recomputed,
                leaves,
                ..
            } => {
                let root = verify::MerkleTree::new(leaves.clone()).root();
                let b = Bisection {
                    lo: 0,
                    hi: leaves.len(),
                    leaves,
                    reason,
                    recomputed,
                    ms,
                };
                if b.hi > 0 && root != job.result.commitment.step_root {
                    return self.bisect(job, b);
                }
                vec![b.caught(&job, None)]
            }
        }
    }

    /// Ends the checks whose challenge went unanswered past the deadline.
    pub fn tick(&mut self, now: Instant) -> Vec<Out> {
        let expired: Vec<u64> = self
            .jobs
            .iter()
            .filter(|(_, s)| {
                matches!(s, Slot::Waiting { job, .. } if job.deadline.is_some_and(|d| d <= now))
            })
            .map(|(&id, _)| id)
            .collect();
        let mut out = Vec::new();
        for id in expired {
            let Some((job, stage)) = self.take(id) else {
                continue;
            };
            out.push(match stage {
                Stage::Bisect(b) => b.caught(&job, None),
                Stage::Reveal | Stage::RevealOwn => Out::Abandoned {
                    worker: job.worker,
                    task_id: job.task_id(),
                    conn: job.conn,
                    reason: "no answer to a challenge in time".into(),
                    worker_fault: true,
                },
            });
        }
        out
    }
}

fn evidence(job: &Job, recomputed: Hash, step: Option<u64>, reason: String) -> Evidence {
    Evidence {
        worker: job.worker,
        commitment: job.result.commitment.clone(),
        signature: job.result.signature,
        claimed_update: job.result.commitment.update,
        recomputed_update: recomputed,
        divergent_step: step,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use verify::{Signature, WorkerKey};

    fn commitment(task_id: u64, ef_base: u64) -> Commitment {
        Commitment {
            run_id: [0; 32],
            task_id,
            step: 0,
            input_params: [0; 32],
            indices: [0; 32],
            seed: 0,
            hyperparams: [0; 32],
            update: [0; 32],
            step_root: [0; 32],
            n_samples: 1,
            ef_base,
            encoded_input: [0; 32],
            class: [0; 32],
        }
    }

    fn challenge(outs: &[Out]) -> (u64, u64) {
        match outs {
            [Out::Challenge {
                conn, challenge_id, ..
            }] => (*conn, *challenge_id),
            _ => panic!("expected one challenge"),
        }
    }

    fn abandoned(outs: &[Out]) -> (u64, bool) {
        match outs {
            [Out::Abandoned {
                task_id,
                worker_fault,
                ..
            }] => (*task_id, *worker_fault),
            _ => panic!("expected the check abandoned"),
        }
    }

    /// A result of a multiple `scale` of the honest update of task 1, from a worker of
    /// `class`, judged by a checker of class `own` that cannot start re-executions.
    fn judged(own: &ComputeClass, class: ComputeClass, scale: f32) -> Verdict {
        judged_sent(own, class, scale, CodecConfig::default().zstd_level)
    }

    /// As [`judged`], the worker's bytes compressed at `sent_level` (0: raw), the run's
    /// codec being the default (zstd level 1).
    fn judged_sent(
        own: &ComputeClass,
        class: ComputeClass,
        scale: f32,
        sent_level: i32,
    ) -> Verdict {
        let data = Arc::new(trainer::Dataset::synthetic(32, 0).into());
        let mut exec = Executor::new(&ModelSpec::Mlp, tch::Device::Cpu, data, Default::default());
        let params = trainer::Net::new(&ModelSpec::Mlp, tch::Device::Cpu, 0).flat_params();
        let (indices, micro) = (vec![0, 1, 2, 3], vec![4]);
        let raw = exec.compute(&params, &indices, &micro, false).unwrap();
        let values: Vec<f32> = raw.values.iter().map(|v| v * scale).collect();
        let codec = CodecConfig::default();
        let sent = CodecConfig {
            zstd_level: sent_level,
            ..codec.clone()
        };
        let enc = encode_update(&values, None, &sent, 0).unwrap();
        let commitment = Commitment {
            update: verify::hash_update(&enc.bytes),
            encoded_input: verify::hash_f32(&enc.encoded_input),
            n_samples: 4,
            ..commitment(1, 0)
        };
        let result = TaskResult {
            task_id: 1,
            n_samples: 4,
            loss_sum: raw.loss_sum,
            update: ByteBuf::from(enc.bytes),
            commitment,
            signature: Signature([0; 64]),
            compute_us: 0,
        };
        let work = Work {
            indices,
            micro,
            inner_steps: false,
            seed: 0,
        };
        let worker = WorkerKey::from_seed([1; 32]).public();
        let job = Job::new(
            worker,
            1,
            Arc::new(params),
            work,
            Arc::new(result),
            None,
            None,
            class,
        );
        let classes = Classes {
            own: own.clone(),
            tolerance: 1e-2,
            decoded_tolerance: 1e-2,
            gross: 0.5,
            emulator: None,
        };
        let limits = DecodeLimits::default();
        judge(&mut exec, &job, &codec, &limits, &classes)
    }

    #[test]
    fn a_result_sent_without_zstd_is_re_encoded_without_it_but_another_level_fails() {
        let own = executor::class::detect(tch::Device::Cpu, 1);
        assert!(
            matches!(judged_sent(&own, own.clone(), 1.0, 0), Verdict::Pass(h) if h == "bitwise")
        );
        assert!(
            matches!(judged_sent(&own, own.clone(), 1.0, 1), Verdict::Pass(h) if h == "bitwise")
        );
        match judged_sent(&own, own.clone(), 1.0, 3) {
            Verdict::Fail { reason, .. } => {
                assert!(reason.contains("encode to other bytes"), "{reason}")
            }
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn a_class_that_cannot_be_reproduced_is_accused_only_beyond_any_honest_difference() {
        let own = executor::class::detect(tch::Device::Cpu, 1);
        let other = ComputeClass {
            cpu_vendor: "another vendor".into(),
            ..own.clone()
        };
        // The same bits from another class: confirmed, and said to be across classes.
        assert!(
            matches!(judged(&own, other.clone(), 1.0), Verdict::Pass(h) if h.starts_with("across classes"))
        );
        // 5% off: more than the tolerance, less than the gross bound: dropped, no accusation.
        assert!(matches!(
            judged(&own, other.clone(), 1.05),
            Verdict::Unconfirmed(_)
        ));
        // Ten times: no class computes that.
        match judged(&own, other, 10.0) {
            Verdict::Fail { reason, leaves, .. } => {
                assert!(reason.contains("beyond any honest difference"), "{reason}");
                assert!(leaves.is_empty());
            }
            v => panic!("{v:?}"),
        }
        // Within its own class, 5% off is a mismatch.
        assert!(matches!(
            judged(&own, own.clone(), 1.05),
            Verdict::Fail { .. }
        ));
    }

    /// Checks of the MLP on synthetic data with `codec`, in the default class, whose
    /// verdicts go nowhere.
    fn checks_for(codec: CodecConfig) -> Checks {
        start(
            ModelSpec::Mlp,
            Arc::new(trainer::Dataset::synthetic(8, 0).into()),
            OptimizerConfig::default(),
            codec,
            DecodeLimits::default(),
            Classes {
                own: ComputeClass::default(),
                tolerance: 1e-2,
                decoded_tolerance: 1e-2,
                gross: 0.5,
                emulator: None,
            },
            Box::new(|_| true),
            Duration::from_secs(60),
        )
    }

    #[test]
    fn a_lossy_result_of_another_class_reveals_what_it_encoded() {
        let mut checks = checks_for(CodecConfig {
            codec: compression::CodecKind::Int8,
            ..CodecConfig::default()
        });
        let worker = WorkerKey::from_seed([1; 32]).public();
        let other = ComputeClass {
            cpu_capability: "DEFAULT".into(),
            ..ComputeClass::default()
        };
        let result = TaskResult {
            task_id: 5,
            n_samples: 1,
            loss_sum: 0.0,
            update: ByteBuf::new(),
            commitment: commitment(5, 0),
            signature: Signature([0; 64]),
            compute_us: 0,
        };
        let work = Work {
            indices: vec![0],
            micro: vec![1],
            inner_steps: false,
            seed: 0,
        };
        let job = Job::new(
            worker,
            1,
            Arc::new(vec![0.0; 4]),
            work,
            Arc::new(result),
            None,
            Some(1e-2),
            other,
        );
        // The task's own encoded values are asked for...
        let outs = checks.submit(job);
        let [Out::Challenge {
            challenge_id,
            task_id: 5,
            query: Query::EncodedInput,
            ..
        }] = outs.as_slice()
        else {
            panic!("expected a reveal of task 5's encoded values");
        };
        // ...and values that are not the committed ones are evidence.
        let bytes = compression::encode(&[1.0; 4], &CodecConfig::lossless(), 0).unwrap();
        let outs = checks.on_reply(1, *challenge_id, Answer::Values(ByteBuf::from(bytes)));
        assert!(matches!(outs.as_slice(), [Out::Caught { .. }]));
    }

    #[test]
    fn a_reveal_only_a_former_process_could_give_is_abandoned_without_blame() {
        let mut checks = checks_for(CodecConfig::default());
        let worker = WorkerKey::from_seed([1; 32]).public();
        // A check of `task`, which continued the residual of `task - 1`, from connection 1.
        let job = |task: u64| {
            let result = TaskResult {
                task_id: task,
                n_samples: 1,
                loss_sum: 0.0,
                update: ByteBuf::new(),
                commitment: commitment(task, task - 1),
                signature: Signature([0; 64]),
                compute_us: 0,
            };
            let base = Base {
                commitment: commitment(task - 1, 0),
                update: Arc::new(ByteBuf::new()),
            };
            let work = Work {
                indices: vec![0],
                micro: vec![1],
                inner_steps: false,
                seed: 0,
            };
            Job::new(
                worker,
                1,
                Arc::new(vec![0.0; 4]),
                work,
                Arc::new(result),
                Some(base),
                None,
                ComputeClass::default(),
            )
        };
        // The connection the result came on cannot reveal what it should hold: its fault.
        let (conn, id) = challenge(&checks.submit(job(2)));
        assert_eq!(conn, 1);
        let outs = checks.on_reply(1, id, Answer::Unavailable("lost".into()));
        assert_eq!(abandoned(&outs), (2, true));
        // The worker reconnects on connection 2, maybe as a new process that lost what the
        // old one kept: the challenge follows it, and its "unavailable" is nobody's fault.
        challenge(&checks.submit(job(3)));
        let (conn, id) = challenge(&checks.retarget(&worker, 2));
        assert_eq!(conn, 2);
        let outs = checks.on_reply(2, id, Answer::Unavailable("no longer held".into()));
        assert_eq!(abandoned(&outs), (3, false));
    }
}
