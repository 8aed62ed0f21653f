//! The scheduler: synchronous data parallelism (or DiLoCo rounds) over whichever workers are
//! connected, with spot checks of their results.
//!
//! Each round splits its global batch (its H global batches) over the idle workers (by speed
//! when they differ much), sends every part with what the worker needs to hold the current
//! parameters, and waits for all parts. A part whose worker leaves, answers with an invalid
//! result, or misses its deadline goes to another idle worker (the first valid answer wins).
//! The round is then committed to the ledger (aggregate, optimizer step, write-ahead log) in
//! part order, so the result does not depend on arrival order. A random sample of accepted
//! results is re-executed ([`crate::checks`]); a worker caught cheating is banned and its
//! unverified contributions are rolled back.

use std::collections::HashSet;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use compression::DecodeLimits;
use proto::{close, Task, TaskResult, ToCoordinator, ToWorker};
use serde_json::json;
use tracing::{info, warn};
use trainer::schedule::BatchSchedule;
use trainer::{Evaluation, ModelSpec, Net, Optimizer, TrainData};
use verify::{Evidence, SpotCheckPolicy, WorkerId};

use crate::checks::{self, Checks, Out};
use crate::config::{CheckMode, RunConfig};
use crate::downlink::Downlink;
use crate::ledger::{Contribution, Ledger, Meta, RoundRecord, Rules, TrainState};
use crate::metrics::{Metrics, Traffic};
use crate::parts::{self, Attempt, Part};
use crate::progress::{Progress, StepLine};
use crate::registry::{Accepted, Conn, Registry};
use crate::server::{Event, Joined, Outgoing};

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// All steps done.
    Finished,
    /// Stopped by the operator; the checkpoint holds the progress.
    Stopped,
}

/// Counters reported in the summary (this process's share; bytes come from the traffic).
#[derive(Default)]
struct Counts {
    tasks_sent: u64,
    tasks_ok: u64,
    rejected: u64,
    reassigned: u64,
    /// Encoded bytes of accepted updates, and what they would take as raw fp32.
    update_bytes: u64,
    update_raw: u64,
    /// Milliseconds workers computed for accepted results (as they report it, at most the
    /// time measured here).
    work_ms: f64,
    /// Spot checks: re-executions finished, passed, workers caught, checks abandoned.
    checks: u64,
    passed: u64,
    caught: u64,
    abandoned: u64,
    /// Milliseconds of re-execution.
    check_ms: f64,
    rollbacks: u64,
    removed: u64,
    last_in: u64,
    last_out: u64,
}

impl Counts {
    fn uplink_ratio(&self) -> f64 {
        self.update_raw as f64 / self.update_bytes.max(1) as f64
    }
}

/// What the network and the checker thread give the scheduler.
pub struct Inputs {
    /// Events.
    pub events: Receiver<Event>,
    /// A sender of the same channel (for the checker thread).
    pub events_tx: Sender<Event>,
    /// Training set (re-execution).
    pub train: Arc<TrainData>,
    /// Test set or validation windows (evaluation).
    pub test: TrainData,
    /// The model.
    pub spec: ModelSpec,
    /// Initial weights in flat order (`model.init`), instead of a fresh initialisation.
    pub init: Option<Vec<f32>>,
    /// The tokenizer file exported beside the final model, when the data has one.
    pub tokenizer: Option<std::path::PathBuf>,
    /// Traffic of all connections.
    pub traffic: Arc<Traffic>,
    /// Banned identities, shared with the accept loop.
    pub banned: Arc<std::sync::RwLock<HashSet<WorkerId>>>,
    /// Key of the spot-check draws (unpredictable to workers).
    pub check_key: [u8; 32],
}

/// The scheduler and the run state it owns.
pub struct Scheduler {
    cfg: RunConfig,
    run_id: [u8; 32],
    events: Receiver<Event>,
    test: TrainData,
    tokenizer: Option<std::path::PathBuf>,
    net: Net,
    ledger: Ledger,
    downlink: Downlink,
    schedule: BatchSchedule,
    total_steps: u64,
    h: u64,
    total_batches: u64,
    reg: Registry,
    balancer: parts::Balancer,
    checks: Option<Checks>,
    /// Digest of the compute class the checks run in.
    class_digest: verify::Hash,
    policy: SpotCheckPolicy,
    check_key: [u8; 32],
    /// Workers banned since the last round was committed (their contributions go).
    to_remove: HashSet<WorkerId>,
    /// Single results to remove (their check could not be completed).
    to_drop: HashSet<u64>,
    /// Results confirmed by a check before their round was committed.
    verified_now: HashSet<u64>,
    /// The usual norm of accepted updates.
    norms: NormTracker,
    seen: HashSet<WorkerId>,
    meta: Meta,
    metrics: Metrics,
    traffic: Arc<Traffic>,
    hyper: [u8; 32],
    limits: DecodeLimits,
    counts: Counts,
    progress: Progress,
    last_eval: Option<(u64, Evaluation)>,
    /// Training tokens per second, smoothed over rounds (language models).
    token_rate: Option<f64>,
    started: bool,
}

impl Scheduler {
    /// Builds the scheduler, resuming from the ledger in the output directory if any.
    pub fn new(cfg: RunConfig, run_id: [u8; 32], inputs: Inputs) -> Result<Self> {
        let Inputs {
            events,
            events_tx,
            train,
            test,
            spec,
            init,
            tokenizer,
            traffic,
            banned,
            check_key,
        } = inputs;
        let net = Net::new(&spec, tch::Device::Cpu, cfg.run.seed);
        let n_params = net.n_params();
        let n = match cfg.data.train_limit {
            0 => train.len(),
            l => l.min(train.len()),
        };
        let schedule = BatchSchedule::new(n, cfg.training.global_batch, cfg.run.seed);
        let total_batches = cfg
            .training
            .steps
            .unwrap_or(cfg.training.epochs * schedule.steps_per_epoch());
        let h = u64::from(cfg.training.local_steps.max(1));
        let total_steps = total_batches.div_ceil(h);
        let limits = DecodeLimits {
            max_values: n_params,
            max_encoded_bytes: cfg.network.max_frame_bytes as usize,
        };
        let fresh = TrainState::new(
            init.unwrap_or_else(|| net.flat_params()),
            Optimizer::new(cfg.optimizer.clone()),
        );
        let rules = Rules {
            aggregation: cfg.aggregation.clone(),
            downlink: cfg.downlink.clone(),
            limits,
        };
        let dir = &cfg.run.output_dir;
        let (ledger, recovered) = Ledger::open(
            dir,
            run_id,
            fresh,
            cfg.run.resume,
            rules,
            cfg.ledger.clone(),
        )?;
        let mut meta = recovered.meta.clone().unwrap_or_default();
        // Tasks sent after the last logged round, or by an earlier start in this folder, may
        // have used ids beyond the logged counter (and workers keep results by task id): jump
        // by a random amount, so that a task id never names two tasks.
        meta.next_task += 1 + (rand::random::<u64>() >> 24);
        traffic.add_in(meta.bytes_in);
        traffic.add_out(meta.bytes_out);
        let step = ledger.state.round;
        let (mut metrics, last_reported) = Metrics::open(dir, meta.wall_s)?;
        metrics.emit(
            if step > 0 { "resume" } else { "start" },
            json!({"step": step, "total_steps": total_steps, "local_steps": h, "total_batches": total_batches,
                   "n_params": n_params, "steps_per_epoch": schedule.steps_per_epoch(),
                   "global_batch": cfg.training.global_batch, "codec": cfg.compression, "downlink": cfg.downlink,
                   "replayed": recovered.replayed, "verification": cfg.verification, "aggregation": cfg.aggregation}),
        );
        // Rounds logged but not reported before a crash (at most the one in flight): report
        // them now, so that every round appears once.
        if last_reported.is_none() && step > 0 {
            tracing::warn!(
                "metrics.jsonl has no step event: rounds before {step} are not reported again"
            );
        }
        for round in last_reported.map_or(step + 1, |r| r + 1)..=step {
            metrics.emit(
                "step",
                json!({"step": round, "batches": (round * h).min(total_batches), "recovered": true}),
            );
        }
        let class = executor::class::detect(tch::Device::Cpu, tch::get_num_threads().max(1) as u32);
        let class_digest = class.digest();
        tracing::info!(class = %class.label(), "checks compute in this class");
        let checks = cfg.verification.enabled().then(|| {
            let emulator = cfg.recheck_exe.clone().and_then(|exe| {
                Some(checks::Emulator {
                    exe,
                    config: toml::to_string(&cfg).ok()?,
                    dataset_digest: train.digest(),
                })
            });
            checks::start(
                spec.clone(),
                train.clone(),
                cfg.inner_optimizer.clone(),
                cfg.compression.clone(),
                limits,
                checks::Classes {
                    own: class,
                    tolerance: cfg.verification.cross_class_tolerance(),
                    decoded_tolerance: cfg.verification.tolerance_for(&cfg.compression),
                    gross: cfg.verification.gross_tolerance,
                    emulator,
                },
                events_tx.clone(),
                Duration::from_secs_f64(cfg.verification.challenge_timeout_s),
            )
        });
        drop(events_tx);
        let downlink = Downlink::new(ledger.state.params.clone(), &cfg.downlink);
        let (last_in, last_out) = traffic.get();
        Ok(Scheduler {
            class_digest,
            hyper: hyperparams_digest(&cfg, &spec),
            progress: Progress::new(total_steps, step),
            policy: cfg.verification.policy(),
            run_id,
            events,
            test,
            tokenizer,
            net,
            ledger,
            downlink,
            schedule,
            total_steps,
            h,
            total_batches,
            // A ban or a dropped result whose rollback a crash interrupted is redone.
            to_remove: recovered
                .standings
                .iter()
                .filter(|(_, s)| s.rep.banned)
                .map(|(w, _)| *w)
                .collect(),
            to_drop: recovered.dropped.iter().copied().collect(),
            reg: Registry::new(recovered.standings, banned),
            balancer: parts::Balancer::default(),
            checks,
            check_key,
            verified_now: HashSet::new(),
            norms: NormTracker::default(),
            seen: HashSet::new(),
            meta,
            metrics,
            traffic,
            limits,
            counts: Counts {
                last_in,
                last_out,
                ..Counts::default()
            },
            last_eval: None,
            token_rate: None,
            started: false,
            cfg,
        })
    }

    fn step(&self) -> u64 {
        self.ledger.state.round
    }

    /// Runs until every step is done or the operator stops the run.
    pub fn run(mut self) -> Result<Outcome> {
        while self.step() < self.total_steps {
            if !self.train_step()? {
                // Contributions of workers banned meanwhile leave before the state is saved.
                self.roll_back()?;
                self.save_checkpoint()?;
                self.metrics.emit("stopped", json!({"step": self.step()}));
                for c in self.reg.conns.values() {
                    let _ = c.tx.send(Outgoing::Close(
                        close::GOING_AWAY,
                        "coordinator stopping; the run will resume".into(),
                    ));
                }
                self.progress.finish();
                return Ok(Outcome::Stopped);
            }
            self.after_step()?;
        }
        self.finish()?;
        Ok(Outcome::Finished)
    }

    /// Global batches done after `round` rounds.
    fn batches_done(&self, round: u64) -> u64 {
        (round * self.h).min(self.total_batches)
    }

    /// Waits for an event (at most `wait`) and handles it; false on a stop request.
    fn pump(&mut self, wait: Duration, parts: &mut [Part]) -> Result<bool> {
        let ok = match self.events.recv_timeout(wait) {
            Ok(ev) => self.handle(ev, parts)?,
            Err(RecvTimeoutError::Timeout) => true,
            Err(RecvTimeoutError::Disconnected) => bail!("network side ended"),
        };
        if let Some(c) = self.checks.as_mut() {
            let outs = c.tick(Instant::now());
            self.act(outs, parts)?;
        }
        // A worker that neither answers nor leaves holds its slot: close it (no strike; it
        // may just be a very slow machine), it can come back.
        let now = Instant::now();
        let hung: Vec<u64> = self
            .reg
            .conns
            .iter()
            .filter(|(_, c)| c.busy_until.is_some_and(|t| t < now))
            .map(|(&n, _)| n)
            .collect();
        for conn in hung {
            if let Some(c) = self.reg.conns.remove(&conn) {
                warn!(conn, worker = %c.id.short(), "no answer to its task long past its deadline; closing");
                let _ = c.tx.send(Outgoing::Close(
                    close::TIMEOUT,
                    "no answer to its task".into(),
                ));
            }
            retire(parts, conn);
        }
        Ok(ok)
    }

    /// Idle workers that may get work (not under a dispute).
    fn idle(&self) -> Vec<u64> {
        self.reg
            .idle()
            .into_iter()
            .filter(|c| {
                let w = &self.reg.conns[c].id;
                !self.checks.as_ref().is_some_and(|k| k.disputed(w))
            })
            .collect()
    }

    /// One round; false when the operator stopped the run.
    fn train_step(&mut self) -> Result<bool> {
        let step_start = Instant::now();
        let step = self.step();
        let batches: Vec<Vec<u32>> = (self.batches_done(step)..self.batches_done(step + 1))
            .map(|b| self.schedule.batch(b))
            .collect();
        let need = if self.started {
            1
        } else {
            self.cfg.run.min_workers.max(1)
        };
        let mut waited = Instant::now();
        loop {
            let backlog = self.checks.as_ref().map_or(0, Checks::len);
            if self.idle().len() >= need && backlog < self.cfg.verification.max_pending {
                break;
            }
            if waited.elapsed() > Duration::from_secs(10) {
                info!(
                    step,
                    connected = self.reg.conns.len(),
                    backlog,
                    "waiting for workers"
                );
                waited = Instant::now();
            }
            if !self.pump(Duration::from_millis(200), &mut [])? {
                return Ok(false);
            }
        }
        self.started = true;
        // Parts go to the workers in the order of their keys, not of their connections: the
        // same workers get the same parts, however they reconnected (each continues its own
        // error feedback, so this is what a restarted run needs to stay bit for bit).
        let mut idle = self.idle();
        idle.sort_by_key(|c| self.reg.conns[c].id);
        // Never more parts than the round's first batch has samples (only the run's last
        // batch can be smaller).
        let n = idle.len().min(batches.first().map_or(1, Vec::len)).max(1);
        let weights = if self.cfg.workers.balance_by_speed {
            self.balancer.weights(&idle[..n])
        } else {
            vec![1.0; n]
        };
        let mut parts = parts::split(&batches, &weights);
        for (i, &conn) in idle.iter().enumerate().take(parts.len()) {
            self.assign(&mut parts[i], i, conn)?;
        }
        while parts.iter().any(|p| p.done.is_none()) {
            self.dispatch(&mut parts)?;
            let now = Instant::now();
            let wait = parts
                .iter()
                .flat_map(|p| p.attempts.iter().filter(|a| a.live))
                .map(|a| a.deadline.saturating_duration_since(now))
                .min()
                .unwrap_or(Duration::from_millis(200))
                .clamp(Duration::from_millis(5), Duration::from_millis(200));
            if !self.pump(wait, &mut parts)? {
                return Ok(false);
            }
        }
        self.commit_round(parts, step_start)?;
        Ok(true)
    }

    /// Gives every part that has no live, in-time attempt to an idle worker: one that has not
    /// tried it yet, else one that tried it once (it may have lacked the parameters' base).
    fn dispatch(&mut self, parts: &mut [Part]) -> Result<()> {
        let now = Instant::now();
        for (i, part) in parts.iter_mut().enumerate() {
            if !part.needs_worker(now) {
                continue;
            }
            let tries = |c: &u64| part.attempts.iter().filter(|a| a.conn == *c).count();
            let idle = self.idle();
            let Some(conn) = idle
                .iter()
                .find(|c| tries(c) == 0)
                .or_else(|| {
                    idle.iter().find(|c| {
                        tries(c) == 1 && !part.attempts.iter().any(|a| a.conn == **c && a.live)
                    })
                })
                .copied()
            else {
                continue;
            };
            if !part.attempts.is_empty() {
                self.counts.reassigned += 1;
                info!(step = self.step(), part = i, to = conn, "reassigning part");
                self.metrics.emit(
                    "reassigned",
                    json!({"step": self.step(), "part": i, "to_conn": conn}),
                );
            }
            self.assign(part, i, conn)?;
        }
        Ok(())
    }

    /// Sends part `index` of this round to connection `conn`.
    fn assign(&mut self, part: &mut Part, index: usize, conn: u64) -> Result<()> {
        let Some(w) = self.reg.conns.get(&conn) else {
            return Ok(());
        };
        let held = w.held_version;
        let ef_base = self.ledger.state.ef_base(&w.id);
        let params = self.downlink.payload(held)?;
        self.meta.next_task += 1;
        let task_id = self.meta.next_task;
        let seed = task_seed(self.cfg.run.seed, self.step(), index);
        let n = part.indices.len() as f64;
        let timeout = match w.ms_per_sample {
            None => self.cfg.network.first_task_timeout_s,
            Some(ms) => (4.0 * ms * n / 1000.0 + 1.0).max(self.cfg.network.min_task_timeout_s),
        };
        let task = Task {
            task_id,
            step: self.step(),
            params_version: self.downlink.version(),
            params,
            params_hash: self.downlink.hash(),
            indices: part.indices.clone(),
            micro_batches: part.micro.clone(),
            seed,
            hyperparams: self.hyper,
            ef_base,
            inner_steps: self.h > 1,
        };
        let w = self.reg.conns.get_mut(&conn).expect("checked above");
        if w.tx
            .send(Outgoing::Msg(Box::new(ToWorker::Task(task))))
            .is_err()
        {
            return Ok(());
        }
        w.busy = Some(task_id);
        w.busy_until = Some(Instant::now() + Duration::from_secs_f64(3.0 * timeout + 30.0));
        w.held_version = Some(self.downlink.version());
        self.counts.tasks_sent += 1;
        let now = Instant::now();
        part.attempts.push(Attempt {
            task_id,
            conn,
            started: now,
            deadline: now + Duration::from_secs_f64(timeout),
            live: true,
            ef_base,
            seed,
            compute_ms: None,
        });
        Ok(())
    }

    /// Handles one event; false on a stop request.
    fn handle(&mut self, ev: Event, parts: &mut [Part]) -> Result<bool> {
        match ev {
            Event::Stop => return Ok(false),
            Event::Joined(j) => self.on_join(*j, parts)?,
            Event::Left {
                conn,
                reason,
                offence,
            } => {
                self.balancer.remove(conn);
                if let Some(c) = self.reg.conns.remove(&conn) {
                    let (bin, bout) = c.traffic.get();
                    self.metrics.emit(
                        "worker_left",
                        json!({"conn": conn, "worker": c.id.to_string(), "name": c.name, "reason": reason,
                               "tasks_ok": c.tasks_ok, "bytes_in": bin, "bytes_out": bout, "step": self.step()}),
                    );
                    if offence {
                        self.strike(c.id, conn, &reason, parts)?;
                    }
                }
                retire(parts, conn);
            }
            Event::Checked(done) => {
                if let Some(c) = self.checks.as_mut() {
                    let outs = c.on_done(*done);
                    self.act(outs, parts)?;
                }
            }
            Event::Message { conn, msg, .. } => match *msg {
                ToCoordinator::Result(res) => self.on_result(conn, *res, parts)?,
                ToCoordinator::TaskFailed {
                    task_id,
                    reason,
                    need_full_params,
                } => {
                    let reason: String = reason.chars().take(256).collect();
                    let Some(w) = self.reg.conns.get_mut(&conn) else {
                        return Ok(true);
                    };
                    warn!(
                        conn,
                        task_id, need_full_params, "worker could not do its task: {reason}"
                    );
                    if w.busy != Some(task_id) {
                        let reason =
                            format!("failure report for task {task_id}, which it does not hold");
                        return self.offend(conn, reason, parts).map(|_| true);
                    }
                    w.busy = None;
                    w.busy_until = None;
                    w.failures += 1;
                    let failures = w.failures;
                    if need_full_params {
                        w.held_version = None;
                    }
                    retire(parts, conn);
                    if failures > 3 {
                        let reason =
                            format!("{failures} failed tasks in a row, the last: {reason}");
                        self.offend(conn, reason, parts)?;
                    }
                }
                ToCoordinator::ChallengeReply {
                    challenge_id,
                    answer,
                } => {
                    if let Some(c) = self.checks.as_mut() {
                        let outs = c.on_reply(conn, challenge_id, answer);
                        self.act(outs, parts)?;
                    }
                }
                // The connection task refuses a second Hello before it gets here.
                ToCoordinator::Hello(_) => {}
            },
        }
        Ok(true)
    }

    fn on_join(&mut self, j: Joined, parts: &mut [Part]) -> Result<()> {
        if self.reg.is_banned(&j.worker) {
            let _ = j.tx.send(Outgoing::Close(
                close::AUTH,
                "this worker is banned from the run".into(),
            ));
            return Ok(());
        }
        self.seen.insert(j.worker);
        // One connection per identity: a worker that restarts replaces its old, dead one at
        // once instead of after the idle timeout, and its part goes elsewhere now.
        for old in self.reg.conns_of(&j.worker) {
            if let Some(c) = self.reg.conns.remove(&old) {
                let _ = c.tx.send(Outgoing::Close(
                    close::PROTOCOL,
                    "replaced by a newer connection".into(),
                ));
            }
            retire(parts, old);
        }
        // The class it computes in: as declared, at the run's forced thread count.
        let mut class = j.class;
        if let Some(t) = self.cfg.workers.deterministic_threads {
            class.threads = t;
        }
        let class_digest = class.digest();
        let same_class = class_digest == self.class_digest;
        self.metrics.emit(
            "worker_joined",
            json!({"conn": j.conn, "worker": j.worker.to_string(), "name": j.name, "step": self.step(),
                   "class": class, "class_label": class.label(), "same_class_as_checks": same_class}),
        );
        let bitwise = match self.cfg.verification.mode {
            CheckMode::Bitwise => true,
            CheckMode::Tolerance => false,
            CheckMode::Auto => self.cfg.workers.deterministic_threads.is_some() && same_class,
        };
        self.reg.conns.insert(
            j.conn,
            Conn {
                id: j.worker,
                name: j.name,
                bitwise,
                same_class,
                class_digest,
                class,
                tx: j.tx,
                traffic: j.traffic,
                busy: None,
                ms_per_sample: None,
                busy_until: None,
                failures: 0,
                tasks_ok: 0,
                held_version: None,
            },
        );
        if let Some(c) = self.checks.as_mut() {
            let outs = c.retarget(&j.worker, j.conn);
            self.act(outs, parts)?;
        }
        Ok(())
    }

    fn on_result(&mut self, conn: u64, res: TaskResult, parts: &mut [Part]) -> Result<()> {
        let Some(w) = self.reg.conns.get_mut(&conn) else {
            return Ok(());
        };
        if w.busy != Some(res.task_id) {
            let reason = format!("result for task {} that is not this connection's current task (replayed or out of order)", res.task_id);
            return self.offend(conn, reason, parts);
        }
        w.busy = None;
        w.busy_until = None;
        w.failures = 0;
        let worker = w.id;
        let found = parts.iter_mut().enumerate().find_map(|(i, p)| {
            let a = p
                .attempts
                .iter()
                .position(|a| a.task_id == res.task_id && a.conn == conn)?;
            Some((i, a))
        });
        let Some((pi, ai)) = found else {
            tracing::debug!(
                task = res.task_id,
                "late result for an earlier round, ignored"
            );
            return Ok(());
        };
        let part = &mut parts[pi];
        part.attempts[ai].live = false;
        let (ef_base, seed) = (part.attempts[ai].ef_base, part.attempts[ai].seed);
        let elapsed = part.attempts[ai].started.elapsed().as_secs_f64() * 1000.0;
        let declared = self.reg.conns.get(&conn).map(|w| w.class_digest);
        let norm = match self.validate(&worker, &res, part, ef_base, seed, declared) {
            Ok(norm) => norm,
            Err(reason) => {
                self.counts.rejected += 1;
                warn!(worker = %worker.short(), task = res.task_id, "rejected result: {reason}");
                self.metrics.emit(
                "rejected_result",
                json!({"conn": conn, "worker": worker.to_string(), "task_id": res.task_id, "step": self.step(), "reason": reason}),
            );
                return self.offend(conn, format!("invalid result: {reason}"), parts);
            }
        };
        self.norms.add(norm);
        let w = self.reg.conns.get_mut(&conn).expect("worker present");
        w.tasks_ok += 1;
        let per = elapsed / part.indices.len().max(1) as f64;
        w.ms_per_sample = Some(w.ms_per_sample.map_or(per, |o| 0.7 * o + 0.3 * per));
        part.attempts[ai].compute_ms = Some((res.compute_us as f64 / 1000.0).min(elapsed));
        let (bitwise, same_class, class) = (w.bitwise, w.same_class, w.class.clone());
        self.counts.tasks_ok += 1;
        self.counts.work_ms += (res.compute_us as f64 / 1000.0).min(elapsed);
        self.counts.update_bytes += res.update.len() as u64;
        self.counts.update_raw += 4 * self.downlink.params().len() as u64;
        if part.done.is_some() {
            return Ok(());
        }
        let res = Arc::new(res);
        self.reg.accept(
            worker,
            Accepted {
                task_id: res.task_id,
                commitment: res.commitment.clone(),
                update: Arc::new(res.update.clone()),
            },
        );
        // Strikes fade: one is forgiven every 50 accepted results.
        let standing = self.reg.update(worker, |s| {
            s.rep.tasks += 1;
            if s.rep.tasks.is_multiple_of(50) {
                s.strikes = s.strikes.saturating_sub(1);
            }
        });
        let check = self.checks.is_some()
            && self
                .policy
                .should_check(&standing.rep, &self.check_key, res.task_id);
        part.done = Some(parts::Answer {
            worker,
            result: res.clone(),
        });
        let base = match res.commitment.ef_base {
            0 => Some(None),
            b => self.reg.accepted(&worker, b).map(|a| {
                Some(checks::Base {
                    commitment: a.commitment,
                    update: a.update,
                })
            }),
        };
        // A result whose error-feedback base is no longer kept cannot be re-executed exactly;
        // it is not drawn (the base was used at most a few tasks earlier, so this is rare).
        if let (true, Some(base)) = (check, base) {
            let job = checks::Job::new(
                worker,
                conn,
                self.downlink.params().clone(),
                checks::Work {
                    indices: part.indices.clone(),
                    micro: part.micro.clone(),
                    inner_steps: self.h > 1,
                    seed,
                },
                res,
                base,
                (!bitwise).then_some(if same_class {
                    self.cfg.verification.tolerance_for(&self.cfg.compression)
                } else {
                    self.cfg.verification.cross_class_tolerance()
                }),
                class,
            );
            let outs = self
                .checks
                .as_mut()
                .map(|c| c.submit(job))
                .unwrap_or_default();
            self.act(outs, parts)?;
        }
        Ok(())
    }

    /// Checks an untrusted result against what was asked, before anything uses it; returns
    /// the L2 norm of its update.
    fn validate(
        &self,
        worker: &WorkerId,
        res: &TaskResult,
        part: &Part,
        ef_base: u64,
        seed: u64,
        class: Option<verify::Hash>,
    ) -> Result<f64, String> {
        let c = &res.commitment;
        if Some(c.class) != class {
            return Err("committed in another compute class than the one declared".into());
        }
        if res.n_samples as usize != part.indices.len() || c.n_samples != res.n_samples {
            return Err(format!(
                "covers {} samples, asked {}",
                res.n_samples,
                part.indices.len()
            ));
        }
        if !res.loss_sum.is_finite() || res.loss_sum < 0.0 {
            return Err("loss is not a finite non-negative number".into());
        }
        if c.run_id != self.run_id
            || c.task_id != res.task_id
            || c.step != self.step()
            || c.input_params != self.downlink.hash()
            || c.indices != verify::hash_indices(&part.indices)
            || c.seed != seed
            || c.hyperparams != self.hyper
            || (c.ef_base != 0 && c.ef_base != ef_base)
            || (self.h > 1) == (c.step_root == [0; 32])
        {
            return Err("commitment does not match the task".into());
        }
        if c.update != verify::hash_update(&res.update) {
            return Err("update bytes do not match the commitment".into());
        }
        verify::verify_signature(worker, c, &res.signature)
            .map_err(|e| format!("signature: {e}"))?;
        let values =
            compression::decode_exact(&res.update, self.downlink.params().len(), &self.limits)
                .map_err(|e| format!("update: {e}"))?;
        let norm = values
            .iter()
            .map(|&x| f64::from(x).powi(2))
            .sum::<f64>()
            .sqrt();
        // Finite but huge values would overflow the optimizer: beyond 100x the usual norm an
        // update is refused (once enough results set what usual is).
        if let Some(usual) = self.norms.usual() {
            if norm > 100.0 * usual {
                return Err(format!(
                    "update norm {norm:.3e} is over 100x the usual {usual:.3e}"
                ));
            }
        }
        Ok(norm)
    }

    /// Carries out what the checks decided.
    fn act(&mut self, outs: Vec<Out>, parts: &mut [Part]) -> Result<()> {
        for o in outs {
            match o {
                Out::Challenge {
                    conn,
                    challenge_id,
                    task_id,
                    query,
                } => {
                    if let Some(c) = self.reg.conns.get(&conn) {
                        let msg = ToWorker::Challenge {
                            challenge_id,
                            task_id,
                            query,
                        };
                        let _ = c.tx.send(Outgoing::Msg(Box::new(msg)));
                    }
                }
                Out::Passed {
                    worker,
                    task_id,
                    how,
                    base,
                    ms,
                } => {
                    self.counts.checks += 1;
                    self.counts.passed += 1;
                    self.counts.check_ms += ms;
                    // Verified means confirmed along its error-feedback chain: the check took
                    // the base's revealed values on trust of its commitment.
                    let chain = base == 0
                        || self.verified_now.contains(&base)
                        || self.ledger.is_verified(base);
                    if chain {
                        self.ledger.mark_verified(task_id)?;
                        self.verified_now.insert(task_id);
                    }
                    let s = self.reg.update(worker, |s| s.rep.checks_passed += 1);
                    self.ledger.log_standing(worker, &s)?;
                    self.metrics.emit(
                        "check_passed",
                        json!({"worker": worker.to_string(), "task_id": task_id, "ms": ms, "how": how, "step": self.step()}),
                    );
                }
                Out::Caught { evidence, ms } => {
                    self.counts.checks += 1;
                    self.counts.caught += 1;
                    self.counts.check_ms += ms;
                    self.on_caught(*evidence, parts)?;
                }
                Out::Abandoned {
                    worker,
                    task_id,
                    conn,
                    reason,
                    worker_fault,
                } => {
                    self.counts.abandoned += 1;
                    warn!(worker = %worker.short(), task_id, "check abandoned: {reason}");
                    self.metrics.emit(
                        "check_abandoned",
                        json!({"worker": worker.to_string(), "task_id": task_id, "reason": reason, "step": self.step()}),
                    );
                    // An unconfirmable result does not stay in the model (logged, so that a
                    // restart before the rollback still removes it).
                    self.ledger.mark_dropped(task_id)?;
                    self.to_drop.insert(task_id);
                    for p in parts.iter_mut() {
                        if p.done.as_ref().is_some_and(|d| d.result.task_id == task_id) {
                            p.done = None;
                        }
                    }
                    // A strike only when the worker could have answered: still on the
                    // connection that was asked (a restarted worker lost what it kept).
                    if worker_fault && self.reg.conns.contains_key(&conn) {
                        self.strike(worker, conn, &reason, parts)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn on_caught(&mut self, e: Evidence, parts: &mut [Part]) -> Result<()> {
        let worker = e.worker;
        warn!(worker = %worker.short(), task = e.commitment.task_id, "cheat detected: {}", e.reason);
        self.metrics.emit(
            "cheat_detected",
            json!({"worker": worker.to_string(), "task_id": e.commitment.task_id, "step": self.step(),
                   "reason": e.reason, "divergent_step": e.divergent_step, "evidence_valid": e.check(), "evidence": e}),
        );
        self.ban(worker, format!("caught cheating: {}", e.reason), parts)
    }

    /// A protocol offence: the connection is closed and the worker gets a strike.
    fn offend(&mut self, conn: u64, reason: String, parts: &mut [Part]) -> Result<()> {
        let Some(c) = self.reg.conns.remove(&conn) else {
            return Ok(());
        };
        warn!(conn, worker = %c.id.short(), "offence: {reason}");
        let _ = c.tx.send(Outgoing::Close(close::PROTOCOL, reason.clone()));
        retire(parts, conn);
        self.strike(c.id, conn, &reason, parts)
    }

    fn strike(
        &mut self,
        worker: WorkerId,
        conn: u64,
        reason: &str,
        parts: &mut [Part],
    ) -> Result<()> {
        let s = self.reg.update(worker, |s| s.strikes += 1);
        self.ledger.log_standing(worker, &s)?;
        self.metrics.emit(
            "offence",
            json!({"conn": conn, "worker": worker.to_string(), "reason": reason, "strikes": s.strikes, "step": self.step()}),
        );
        if s.strikes >= self.cfg.verification.max_strikes && !s.rep.banned {
            self.ban(
                worker,
                format!("{} strikes, the last: {reason}", s.strikes),
                parts,
            )?;
        }
        Ok(())
    }

    /// Bans a worker: refuses its key from now on, closes its connections, drops its parts of
    /// this round, and schedules the removal of its unverified contributions.
    fn ban(&mut self, worker: WorkerId, reason: String, parts: &mut [Part]) -> Result<()> {
        let s = self.reg.update(worker, |s| {
            s.rep.banned = true;
            s.rep.checks_failed += 1;
            s.ban_reason = Some(reason.clone());
        });
        self.ledger.log_standing(worker, &s)?;
        self.metrics.emit(
            "banned",
            json!({"worker": worker.to_string(), "reason": reason, "step": self.step()}),
        );
        for conn in self.reg.conns_of(&worker) {
            if let Some(c) = self.reg.conns.remove(&conn) {
                let _ =
                    c.tx.send(Outgoing::Close(close::AUTH, format!("banned: {reason}")));
            }
            retire(parts, conn);
        }
        for p in parts.iter_mut() {
            if p.done.as_ref().is_some_and(|d| d.worker == worker) {
                p.done = None;
            }
        }
        if let Some(c) = self.checks.as_mut() {
            c.forget(&worker);
        }
        self.to_remove.insert(worker);
        Ok(())
    }

    /// Applies a finished round: contributions in part order to the ledger (durably), then
    /// the downlink, the accounting and the live line.
    fn commit_round(&mut self, parts: Vec<Part>, started: Instant) -> Result<()> {
        let round = self.step();
        let times: Vec<(u64, f64)> = parts
            .iter()
            .filter_map(|p| {
                let id = p.done.as_ref()?.result.task_id;
                let a = p.attempts.iter().find(|a| a.task_id == id)?;
                Some((a.conn, a.compute_ms?))
            })
            .collect();
        self.balancer.observe(&times);
        let contributions: Vec<Contribution> = parts
            .iter()
            .filter_map(|p| p.done.as_ref())
            .map(|d| Contribution {
                worker: d.worker,
                task_id: d.result.task_id,
                n_samples: d.result.n_samples,
                loss_sum: d.result.loss_sum,
                update: d.result.update.clone(),
                verified: self.verified_now.remove(&d.result.task_id),
            })
            .collect();
        self.meta.wall_s = self.metrics.wall_s();
        (self.meta.bytes_in, self.meta.bytes_out) = self.traffic.get();
        self.meta.workers_seen = self.workers_seen();
        let record = RoundRecord {
            round,
            contributions,
        };
        let parts_used = record.contributions.len();
        let samples: Vec<serde_json::Value> = record
            .contributions
            .iter()
            .map(|c| json!({"worker": c.worker.short(), "samples": c.n_samples}))
            .collect();
        let applied = self.ledger.commit(record, &self.meta)?;
        if self.cfg.test_crash_after_logging == Some(self.step()) {
            tracing::warn!(
                step = self.step(),
                "test-only crash after logging the round"
            );
            std::process::exit(137);
        }
        self.verified_now.clear();
        self.downlink
            .advance(self.ledger.state.params.clone(), applied.delta);
        let loss = applied.loss_sum / applied.n.max(1) as f64;
        let step_s = started.elapsed().as_secs_f64();
        let tokens = applied.n * self.test.tokens_per_sample() as u64;
        if tokens > 0 && step_s > 0.0 {
            let rate = tokens as f64 / step_s;
            self.token_rate = Some(self.token_rate.map_or(rate, |r| 0.9 * r + 0.1 * rate));
        }
        let (bin, bout) = self.traffic.get();
        let per_worker: Vec<serde_json::Value> = self
            .reg
            .conns
            .iter()
            .map(|(conn, w)| {
                let (i, o) = w.traffic.get();
                json!({"conn": conn, "bytes_in": i, "bytes_out": o})
            })
            .collect();
        let step = self.step();
        self.metrics.emit(
            "step",
            json!({"step": step, "batches": self.batches_done(step), "loss": loss,
                   "parts": parts_used, "workers": self.reg.conns.len(), "samples": samples,
                   "bytes_in": bin, "bytes_out": bout,
                   "round_bytes_in": bin - self.counts.last_in, "round_bytes_out": bout - self.counts.last_out,
                   "uplink_ratio": self.counts.uplink_ratio(), "per_worker": per_worker,
                   "clipped": applied.report.clipped, "tokens": tokens,
                   "step_ms": step_s * 1000.0}),
        );
        (self.counts.last_in, self.counts.last_out) = (bin, bout);
        self.progress.update(
            step,
            &StepLine {
                loss,
                workers: self.reg.conns.len(),
                bytes_in: bin,
                bytes_out: bout,
                uplink_ratio: self.counts.uplink_ratio(),
                tokens_per_s: self.token_rate,
                eval: self.last_eval.map(|(_, e)| self.eval_line(&e)),
            },
        );
        Ok(())
    }

    /// Removes the contributions of banned workers and of unconfirmable results.
    fn roll_back(&mut self) -> Result<()> {
        if self.to_remove.is_empty() && self.to_drop.is_empty() {
            return Ok(());
        }
        let banned = std::mem::take(&mut self.to_remove);
        let dropped = std::mem::take(&mut self.to_drop);
        let rb = self.ledger.remove(|c| {
            (banned.contains(&c.worker) && !c.verified) || dropped.contains(&c.task_id)
        })?;
        let Some(rb) = rb else {
            return Ok(());
        };
        self.counts.rollbacks += 1;
        self.counts.removed += rb.removed;
        warn!(
            from = rb.from_round,
            replayed = rb.replayed,
            removed = rb.removed,
            "rolled back"
        );
        self.metrics.emit(
            "rolled_back",
            json!({"step": self.step(), "from_round": rb.from_round, "replayed": rb.replayed, "removed": rb.removed,
                   "workers": banned.iter().map(|w| w.to_string()).collect::<Vec<_>>(), "tasks": dropped}),
        );
        self.downlink
            .advance(self.ledger.state.params.clone(), None);
        self.save_checkpoint()
    }

    fn after_step(&mut self) -> Result<()> {
        self.roll_back()?;
        let spe = self.schedule.steps_per_epoch();
        let every = self.cfg.training.eval_every;
        let step = self.step();
        let epoch_ended = self.batches_done(step - 1) / spe != self.batches_done(step) / spe;
        if epoch_ended || step == self.total_steps || (every > 0 && step.is_multiple_of(every)) {
            self.evaluate()?;
            self.save_checkpoint()?;
        } else if (self.cfg.training.checkpoint_every > 0
            && step.is_multiple_of(self.cfg.training.checkpoint_every))
            || self.ledger.wal_bytes() > self.cfg.ledger.wal_max_bytes
        {
            self.save_checkpoint()?;
        }
        Ok(())
    }

    /// An evaluation as the live line shows it.
    fn eval_line(&self, e: &Evaluation) -> String {
        if self.spec().is_language_model() {
            format!("val loss {:.4}", e.loss)
        } else {
            format!("test acc {:.4}", e.accuracy)
        }
    }

    fn spec(&self) -> &ModelSpec {
        &self.net.spec
    }

    /// Evaluates the current parameters: test accuracy and loss for the image models;
    /// validation loss (nats per token), perplexity and next-token accuracy for a language
    /// model.
    fn evaluate(&mut self) -> Result<()> {
        self.net.set_flat_params(&self.ledger.state.params)?;
        let e = trainer::evaluate(&self.net, &self.test)?;
        let step = self.step();
        let epoch = self.batches_done(step) as f64 / self.schedule.steps_per_epoch() as f64;
        self.last_eval = Some((step, e));
        let epoch = (epoch * 1000.0).round() / 1000.0;
        if self.spec().is_language_model() {
            self.metrics.emit(
                "eval",
                json!({"epoch": epoch, "step": step, "val_loss": e.loss, "val_ppl": e.loss.exp(), "val_acc": e.accuracy}),
            );
            self.progress.message(&format!(
                "step {step} epoch {epoch:.3}: val loss {:.4} nats/token, perplexity {:.2}",
                e.loss,
                e.loss.exp()
            ));
        } else {
            self.metrics.emit(
                "eval",
                json!({"epoch": epoch, "step": step, "test_acc": e.accuracy, "test_loss": e.loss}),
            );
            self.progress.message(&format!(
                "step {step} epoch {epoch:.2}: test accuracy {:.4}, test loss {:.4}",
                e.accuracy, e.loss
            ));
        }
        Ok(())
    }

    /// Writes the final model: `model.safetensors`, and for a language model the Hugging
    /// Face `config.json` and the tokenizer, so that
    /// `AutoModelForCausalLM.from_pretrained(output_dir)` loads it.
    fn export(&self, eval: Option<&Evaluation>) -> Result<()> {
        let dir = &self.cfg.run.output_dir;
        let mut meta: std::collections::HashMap<String, String> = [
            // transformers refuses safetensors files without this tag.
            ("format".to_string(), "pt".to_string()),
            ("model".to_string(), self.spec().name().to_string()),
            ("steps".to_string(), self.step().to_string()),
        ]
        .into_iter()
        .collect();
        if let Some(e) = eval {
            let (k, v) = if self.spec().is_language_model() {
                ("val_loss", e.loss)
            } else {
                ("test_acc", e.accuracy)
            };
            meta.insert(k.to_string(), format!("{v:.4}"));
        }
        trainer::export::write_safetensors(
            &dir.join("model.safetensors"),
            &self.net.layout(),
            &self.ledger.state.params,
            meta,
        )?;
        if let ModelSpec::Llama(c) = self.spec() {
            let text = serde_json::to_vec_pretty(&c.hf_config_json())?;
            crate::state::atomic_write(&dir.join("config.json"), &text)?;
            if let Some(t) = &self.tokenizer {
                let bytes = std::fs::read(t)
                    .map_err(|e| anyhow::anyhow!("reading {}: {e}", t.display()))?;
                crate::state::atomic_write(&dir.join("tokenizer.json"), &bytes)?;
            }
        }
        Ok(())
    }

    fn save_checkpoint(&mut self) -> Result<()> {
        self.meta.wall_s = self.metrics.wall_s();
        (self.meta.bytes_in, self.meta.bytes_out) = self.traffic.get();
        self.meta.workers_seen = self.workers_seen();
        let standings = self.reg.standings();
        self.ledger.checkpoint(&self.meta, standings)
    }

    fn workers_seen(&self) -> u64 {
        self.meta.workers_seen.max(self.seen.len() as u64)
    }

    /// Waits (a bounded time) for the checks still running, so the summary counts them.
    fn drain_checks(&mut self) -> Result<()> {
        let until = Instant::now() + Duration::from_secs(30);
        while self.checks.as_ref().is_some_and(|c| !c.is_empty()) && Instant::now() < until {
            self.pump(Duration::from_millis(100), &mut [])?;
        }
        self.roll_back()
    }

    fn finish(&mut self) -> Result<()> {
        self.drain_checks()?;
        if self.last_eval.map(|e| e.0) != Some(self.step()) || self.counts.rollbacks > 0 {
            self.evaluate()?;
        }
        self.save_checkpoint()?;
        let eval = self.last_eval.map(|e| e.1);
        self.export(eval.as_ref())?;
        let acc = eval.map_or(0.0, |e| e.accuracy);
        let (bin, bout) = self.traffic.get();
        let c = &self.counts;
        let step = self.step();
        let mut summary = json!({"steps": step, "batches": self.batches_done(step), "wall_s": self.metrics.wall_s(), "bytes_in": bin, "bytes_out": bout,
                   "workers_seen": self.workers_seen(), "tasks_sent": c.tasks_sent,
                   "tasks_ok": c.tasks_ok, "rejected": c.rejected, "uplink_ratio": c.uplink_ratio(), "reassigned": c.reassigned,
                   "checks": c.checks, "checks_passed": c.passed, "cheats_caught": c.caught, "checks_abandoned": c.abandoned,
                   "check_ms": c.check_ms, "work_ms": c.work_ms, "verify_overhead": c.check_ms / c.work_ms.max(1e-9),
                   "rollbacks": c.rollbacks, "removed_contributions": c.removed,
                   "banned": self.reg.standings().iter().filter(|(_, s)| s.rep.banned).map(|(w, _)| w.to_string()).collect::<Vec<_>>(),
                   "params_blake3": hex::encode(verify::hash_f32(&self.ledger.state.params))});
        if let Some(o) = summary.as_object_mut() {
            if self.spec().is_language_model() {
                o.insert("final_val_loss".into(), json!(eval.map(|e| e.loss)));
                o.insert("final_val_ppl".into(), json!(eval.map(|e| e.loss.exp())));
            } else {
                o.insert("final_test_acc".into(), json!(acc));
            }
        }
        self.metrics.emit("summary", summary);
        self.progress.finish();
        info!(
            steps = step,
            test_acc = acc,
            wall_s = self.metrics.wall_s(),
            "run complete"
        );
        for w in self.reg.conns.values() {
            let _ = w.tx.send(Outgoing::Msg(Box::new(ToWorker::Shutdown {
                reason: "run complete".into(),
            })));
            let _ =
                w.tx.send(Outgoing::Close(close::DONE, "run complete".into()));
        }
        Ok(())
    }
}

/// A running mean of accepted update norms (exponential, in log space so that one large value
/// moves it little).
#[derive(Default)]
struct NormTracker {
    log_mean: f64,
    seen: u64,
}

impl NormTracker {
    /// Results needed before [`Self::usual`] says anything.
    const WARM_UP: u64 = 20;

    fn add(&mut self, norm: f64) {
        if norm > 0.0 && norm.is_finite() {
            let rate = 1.0 / (self.seen + 1).min(50) as f64;
            self.log_mean += rate * (norm.ln() - self.log_mean);
            self.seen += 1;
        }
    }

    fn usual(&self) -> Option<f64> {
        (self.seen >= Self::WARM_UP).then(|| self.log_mean.exp())
    }
}

/// Marks every attempt of connection `conn` as unable to answer: its parts go elsewhere.
fn retire(parts: &mut [Part], conn: u64) {
    for a in parts.iter_mut().flat_map(|p| p.attempts.iter_mut()) {
        if a.conn == conn {
            a.live = false;
        }
    }
}

/// The seed of part `part`'s tasks in round `round` (it drives stochastic rounding): a
/// function of the run's seed, the round and the part, never of the task id (random after a
/// restart), so that a restarted run draws the same bits as an uninterrupted one.
fn task_seed(run_seed: u64, round: u64, part: usize) -> u64 {
    let mut h = blake3::Hasher::new_derive_key("dtrain task seed v1");
    h.update(&run_seed.to_le_bytes());
    h.update(&round.to_le_bytes());
    h.update(&(part as u64).to_le_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.finalize().as_bytes()[..8]);
    u64::from_le_bytes(b)
}

/// What every result's commitment binds as hyperparameters: the outer optimizer, and for
/// multi-step rounds the inner optimizer and H, and the uplink codec.
fn hyperparams_digest(cfg: &RunConfig, spec: &ModelSpec) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("dtrain hyperparams v3");
    h.update(&spec.digest());
    h.update(&(cfg.data.seq_len as u64).to_le_bytes());
    h.update(&cfg.optimizer.digest());
    h.update(&cfg.inner_optimizer.digest());
    h.update(&cfg.training.local_steps.to_le_bytes());
    h.update(&serde_json::to_vec(&cfg.compression).unwrap_or_default());
    *h.finalize().as_bytes()
}
