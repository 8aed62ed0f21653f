//! Spot checks: re-executing a random sample of results on the coordinator and comparing.
//!
//! A check of task `t` re-executes it from the same parameters and samples with the same
//! executor code the workers run, continues the same error-feedback residual, encodes with
//! the same seed, and compares with what the worker committed: bitwise (the hash of the
//! encoded values, the update bytes and the inner-step root) for CPU workers in
//! deterministic mode, within a relative tolerance otherwise. The residual comes from the
//! worker's previous used result `b`: the worker reveals the values it encoded for `b`
//! (which must hash to `b`'s signed commitment), and the residual is those values minus the
//! decoding of `b`'s bytes. So every part of a result is checked, the residual included.
//!
//! When a multi-step result disagrees, the coordinator bisects over the worker's committed
//! inner-step hashes (each revealed with a Merkle proof against the signed root) to find
//! the first divergent step, which the evidence names: one step that anyone can re-execute
//! from the agreed state before it.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use compression::{CodecConfig, DecodeLimits};
use executor::{encode_update, Executor};
use proto::{Answer, Query, TaskResult};
use serde_bytes::ByteBuf;
use trainer::{Dataset, ModelKind, OptimizerConfig};
use verify::{Commitment, Evidence, Hash, WorkerId};

use crate::server::Event;

/// The result of the worker's previous used task, whose residual task `t` continues.
#[derive(Clone)]
pub struct Base {
    /// Its commitment.
    pub commitment: Commitment,
    /// Its update bytes.
    pub update: Arc<ByteBuf>,
}

/// One result to re-execute.
pub struct Job {
    /// Check number.
    pub id: u64,
    /// Who computed it.
    pub worker: WorkerId,
    /// The connection it came on (challenges go there, or to a later connection).
    pub conn: u64,
    /// Starting parameters of the task.
    pub params: Arc<Vec<f32>>,
    /// Its samples.
    pub indices: Vec<u32>,
    /// Its micro-batches.
    pub micro: Vec<u32>,
    /// Its seed.
    pub seed: u64,
    /// What the worker sent.
    pub result: Arc<TaskResult>,
    /// The error-feedback base, when the result continues one.
    pub base: Option<Base>,
    /// The values the worker revealed for the base.
    base_input: Option<Vec<f32>>,
    /// Relative L2 tolerance (None: bitwise).
    pub tolerance: Option<f64>,
}

impl Job {
    /// A job; `base` must be given when the commitment names an error-feedback base.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u64,
        worker: WorkerId,
        conn: u64,
        params: Arc<Vec<f32>>,
        indices: Vec<u32>,
        micro: Vec<u32>,
        seed: u64,
        result: Arc<TaskResult>,
        base: Option<Base>,
        tolerance: Option<f64>,
    ) -> Self {
        Job {
            id,
            worker,
            conn,
            params,
            indices,
            micro,
            seed,
            result,
            base,
            base_input: None,
            tolerance,
        }
    }

    fn task_id(&self) -> u64 {
        self.result.task_id
    }
}

/// What re-execution concluded.
pub enum Verdict {
    /// The result is what the task gives.
    Pass,
    /// It is not.
    Fail {
        /// What differs.
        reason: String,
        /// The update hash re-execution produced.
        recomputed: Hash,
        /// The honest inner-step hashes (multi-step tasks), for bisection.
        leaves: Vec<Hash>,
    },
    /// The check could not run (e.g. the revealed base does not decode).
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
    /// A check could not be completed (no answer to a challenge).
    Abandoned {
        /// The worker.
        worker: WorkerId,
        /// The task.
        task_id: u64,
        /// Why.
        reason: String,
    },
}

enum Stage {
    /// Waiting for the worker to reveal the base's encoded values.
    Reveal { challenge: u64, deadline: Instant },
    /// Bisecting over inner steps: every step < lo agrees, step hi disagrees (or hi == len).
    Bisect {
        lo: usize,
        hi: usize,
        leaves: Vec<Hash>,
        reason: String,
        recomputed: Hash,
        ms: f64,
        challenge: u64,
        deadline: Instant,
    },
}

/// A check in progress.
enum Slot {
    /// On the checker thread.
    Running,
    /// Waiting for a worker's answer.
    Waiting(Box<Job>, Stage),
}

/// The checks in progress.
pub struct Checks {
    jobs: HashMap<u64, Slot>,
    challenges: HashMap<u64, u64>,
    next_challenge: u64,
    to_checker: Sender<Job>,
    timeout: Duration,
    limits: DecodeLimits,
}

/// Starts the checker thread; its verdicts come back as [`Event::Checked`].
#[allow(clippy::too_many_arguments)]
pub fn start(
    model: ModelKind,
    data: Arc<Dataset>,
    inner: OptimizerConfig,
    codec: CodecConfig,
    limits: DecodeLimits,
    events: Sender<Event>,
    timeout: Duration,
) -> Checks {
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("checker".into())
        .spawn(move || checker(model, data, inner, codec, limits, rx, events))
        .expect("spawn the checker thread");
    Checks {
        jobs: HashMap::new(),
        challenges: HashMap::new(),
        next_challenge: 1,
        to_checker: tx,
        timeout,
        limits,
    }
}

fn checker(
    model: ModelKind,
    data: Arc<Dataset>,
    inner: OptimizerConfig,
    codec: CodecConfig,
    limits: DecodeLimits,
    jobs: Receiver<Job>,
    events: Sender<Event>,
) {
    let mut exec = Executor::new(model, tch::Device::Cpu, data, inner);
    for job in jobs {
        let t = Instant::now();
        let verdict = recheck(&mut exec, &job, &codec, &limits);
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if events
            .send(Event::Checked(Box::new(Done { job, verdict, ms })))
            .is_err()
        {
            return;
        }
    }
}

fn l2(v: impl Iterator<Item = f64>) -> f64 {
    v.map(|x| x * x).sum::<f64>().sqrt()
}

/// Re-executes a job and compares.
pub fn recheck(
    exec: &mut Executor,
    job: &Job,
    codec: &CodecConfig,
    limits: &DecodeLimits,
) -> Verdict {
    let c = &job.result.commitment;
    let raw = match exec.compute(&job.params, &job.indices, &job.micro) {
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
    let enc = match encode_update(&raw.values, residual.as_deref(), codec, job.seed) {
        Ok(e) => e,
        Err(e) => return Verdict::Error(format!("re-encoding failed: {e}")),
    };
    let recomputed = verify::hash_update(&enc.bytes);
    let root = raw.step_root();
    let fail = |reason: String| Verdict::Fail {
        reason,
        recomputed,
        leaves: raw.leaves.clone(),
    };
    if raw.n as u32 != c.n_samples {
        return fail("sample count differs".into());
    }
    match job.tolerance {
        None => {
            if root != c.step_root || verify::hash_f32(&enc.encoded_input) != c.encoded_input {
                fail("re-execution computes other values".into())
            } else if recomputed != c.update {
                fail("the same values encode to other bytes".into())
            } else {
                Verdict::Pass
            }
        }
        Some(tol) => {
            let theirs =
                match compression::decode_exact(&job.result.update, raw.values.len(), limits) {
                    Ok(v) => v,
                    Err(e) => return fail(format!("update does not decode: {e}")),
                };
            let ours = match compression::decode_exact(&enc.bytes, raw.values.len(), limits) {
                Ok(v) => v,
                Err(e) => return Verdict::Error(format!("own update does not decode: {e}")),
            };
            let diff = l2(theirs.iter().zip(&ours).map(|(a, b)| f64::from(a - b)));
            let norm = l2(ours.iter().map(|&x| f64::from(x))).max(1e-12);
            if diff / norm <= tol {
                Verdict::Pass
            } else {
                fail(format!(
                    "update differs by {:.3e} (relative L2), tolerance {tol:.1e}",
                    diff / norm
                ))
            }
        }
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

    fn challenge(&mut self, job: u64, conn: u64, task_id: u64, query: Query) -> (u64, Out) {
        let id = self.next_challenge;
        self.next_challenge += 1;
        self.challenges.insert(id, job);
        (
            id,
            Out::Challenge {
                conn,
                challenge_id: id,
                task_id,
                query,
            },
        )
    }

    /// Starts checking a job.
    pub fn submit(&mut self, job: Job) -> Vec<Out> {
        let id = job.id;
        if let Some(base) = &job.base {
            let (ch, out) =
                self.challenge(id, job.conn, base.commitment.task_id, Query::EncodedInput);
            let deadline = Instant::now() + self.timeout;
            self.jobs.insert(
                id,
                Slot::Waiting(
                    Box::new(job),
                    Stage::Reveal {
                        challenge: ch,
                        deadline,
                    },
                ),
            );
            return vec![out];
        }
        self.run(job);
        Vec::new()
    }

    fn run(&mut self, job: Job) {
        let id = job.id;
        // The receiving thread lives as long as the coordinator; if it died, the job is dropped
        // and the check is reported abandoned by `tick`.
        let _ = self.to_checker.send(job);
        self.jobs.insert(id, Slot::Running);
    }

    /// A worker reconnected on `conn`: re-sends the challenges its checks wait on.
    pub fn retarget(&mut self, worker: &WorkerId, conn: u64) -> Vec<Out> {
        let ids: Vec<u64> = self
            .jobs
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Waiting(j, _) if j.worker == *worker))
            .map(|(&id, _)| id)
            .collect();
        let mut out = Vec::new();
        for id in ids {
            let Some(Slot::Waiting(job, stage)) = self.jobs.remove(&id) else {
                continue;
            };
            let job = Job { conn, ..*job };
            out.extend(match stage {
                Stage::Reveal { challenge, .. } => {
                    self.challenges.remove(&challenge);
                    self.submit(job)
                }
                Stage::Bisect {
                    lo,
                    hi,
                    leaves,
                    reason,
                    recomputed,
                    ms,
                    challenge,
                    ..
                } => {
                    self.challenges.remove(&challenge);
                    self.bisect(job, lo, hi, leaves, reason, recomputed, ms)
                }
            });
        }
        out
    }

    /// Drops every waiting check of `worker` (it was banned).
    pub fn forget(&mut self, worker: &WorkerId) {
        self.jobs
            .retain(|_, s| !matches!(s, Slot::Waiting(j, _) if j.worker == *worker));
    }

    /// A worker answered a challenge.
    pub fn on_reply(&mut self, conn: u64, challenge_id: u64, answer: Answer) -> Vec<Out> {
        let Some(&id) = self.challenges.get(&challenge_id) else {
            return Vec::new();
        };
        match self.jobs.get(&id) {
            Some(Slot::Waiting(job, _)) if job.conn == conn => {}
            _ => return Vec::new(),
        }
        self.challenges.remove(&challenge_id);
        let Some(Slot::Waiting(job, stage)) = self.jobs.remove(&id) else {
            return Vec::new();
        };
        match stage {
            Stage::Reveal { .. } => self.on_reveal(*job, answer),
            Stage::Bisect {
                lo,
                hi,
                leaves,
                reason,
                recomputed,
                ms,
                ..
            } => self.on_leaf(*job, answer, lo, hi, leaves, reason, recomputed, ms),
        }
    }

    fn on_reveal(&mut self, mut job: Job, answer: Answer) -> Vec<Out> {
        let Some(base) = job.base.clone() else {
            return Vec::new();
        };
        let n = job.params.len();
        let revealed = match answer {
            Answer::Values(bytes) => compression::decode_exact(&bytes, n, &self.limits).ok(),
            Answer::Unavailable(why) => {
                return vec![Out::Abandoned {
                    worker: job.worker,
                    task_id: job.task_id(),
                    reason: format!("could not reveal the error-feedback input: {why}"),
                }]
            }
            Answer::Leaf { .. } => None,
        };
        match revealed {
            Some(v) if verify::hash_f32(&v) == base.commitment.encoded_input => {
                job.base_input = Some(v);
                self.run(job);
                Vec::new()
            }
            _ => {
                let e = evidence(
                    &job,
                    [0; 32],
                    None,
                    "revealed error-feedback input does not match its signed commitment".into(),
                );
                vec![Out::Caught {
                    evidence: Box::new(e),
                    ms: 0.0,
                }]
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_leaf(
        &mut self,
        job: Job,
        answer: Answer,
        mut lo: usize,
        mut hi: usize,
        leaves: Vec<Hash>,
        reason: String,
        recomputed: Hash,
        ms: f64,
    ) -> Vec<Out> {
        let mid = lo + (hi - lo) / 2;
        let root = job.result.commitment.step_root;
        let agrees = match answer {
            Answer::Leaf { leaf, proof }
                if proof.index == mid as u64
                    && proof.leaf_count == leaves.len() as u64
                    && proof.verify(&root, &leaf) =>
            {
                leaf == leaves[mid]
            }
            // No valid opening of its own commitment: stop bisecting, the evidence stands.
            _ => {
                let e = evidence(&job, recomputed, None, reason);
                return vec![Out::Caught {
                    evidence: Box::new(e),
                    ms,
                }];
            }
        };
        if agrees {
            lo = mid + 1;
        } else {
            hi = mid;
        }
        if lo >= hi {
            let step = (lo < leaves.len()).then_some(lo as u64);
            let why = match step {
                Some(s) => format!("{reason}; first divergent inner step {s}"),
                None => format!("{reason}; every inner step agrees, the final update differs"),
            };
            let e = evidence(&job, recomputed, step, why);
            return vec![Out::Caught {
                evidence: Box::new(e),
                ms,
            }];
        }
        self.bisect(job, lo, hi, leaves, reason, recomputed, ms)
    }

    #[allow(clippy::too_many_arguments)]
    fn bisect(
        &mut self,
        job: Job,
        lo: usize,
        hi: usize,
        leaves: Vec<Hash>,
        reason: String,
        recomputed: Hash,
        ms: f64,
    ) -> Vec<Out> {
        let mid = lo + (hi - lo) / 2;
        let (ch, out) = self.challenge(
            job.id,
            job.conn,
            job.task_id(),
            Query::Leaf { index: mid as u32 },
        );
        let deadline = Instant::now() + self.timeout;
        let id = job.id;
        self.jobs.insert(
            id,
            Slot::Waiting(
                Box::new(job),
                Stage::Bisect {
                    lo,
                    hi,
                    leaves,
                    reason,
                    recomputed,
                    ms,
                    challenge: ch,
                    deadline,
                },
            ),
        );
        vec![out]
    }

    /// The checker finished a job.
    pub fn on_done(&mut self, done: Done) -> Vec<Out> {
        let Done { job, verdict, ms } = done;
        self.jobs.remove(&job.id);
        match verdict {
            Verdict::Pass => vec![Out::Passed {
                worker: job.worker,
                task_id: job.task_id(),
                ms,
            }],
            Verdict::Error(reason) => vec![Out::Abandoned {
                worker: job.worker,
                task_id: job.task_id(),
                reason,
            }],
            Verdict::Fail {
                reason,
                recomputed,
                leaves,
            } => {
                let root = verify::MerkleTree::new(leaves.clone()).root();
                if !leaves.is_empty() && root != job.result.commitment.step_root {
                    let len = leaves.len();
                    return self.bisect(job, 0, len, leaves, reason, recomputed, ms);
                }
                let e = evidence(&job, recomputed, None, reason);
                vec![Out::Caught {
                    evidence: Box::new(e),
                    ms,
                }]
            }
        }
    }

    /// Ends the checks whose challenge went unanswered past the deadline.
    pub fn tick(&mut self, now: Instant) -> Vec<Out> {
        let expired: Vec<u64> = self
            .jobs
            .iter()
            .filter(|(_, s)| match s {
                Slot::Waiting(_, Stage::Reveal { deadline, .. })
                | Slot::Waiting(_, Stage::Bisect { deadline, .. }) => *deadline <= now,
                Slot::Running => false,
            })
            .map(|(&id, _)| id)
            .collect();
        let mut out = Vec::new();
        for id in expired {
            let Some(Slot::Waiting(job, stage)) = self.jobs.remove(&id) else {
                continue;
            };
            out.push(match stage {
                Stage::Bisect {
                    reason,
                    recomputed,
                    ms,
                    ..
                } => {
                    let e = evidence(&job, recomputed, None, reason);
                    Out::Caught {
                        evidence: Box::new(e),
                        ms,
                    }
                }
                Stage::Reveal { .. } => Out::Abandoned {
                    worker: job.worker,
                    task_id: job.task_id(),
                    reason: "no answer to a challenge in time".into(),
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
