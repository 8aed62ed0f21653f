//! The scheduler: the driver of the round core ([`rounds::Core`]). It owns the clock, the
//! connections' channels, the ledger (disk), the downlink payloads, the spot checks and the
//! reports, and feeds the core.
//!
//! The core splits each round's global batch (its H global batches) over the idle workers,
//! reassigns parts whose worker leaves, fails or misses its deadline, keeps strikes and bans,
//! and hands over a complete round in part order. This driver sends the tasks (with what each
//! worker needs to hold the current parameters), validates results before the core accepts
//! them, commits rounds to the ledger (aggregate, optimizer step, write-ahead log), runs the
//! spot checks the core draws ([`crate::checks`]), and rolls back the unverified
//! contributions of banned workers.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use compression::DecodeLimits;
use proto::{close, Task, TaskResult, ToCoordinator, ToWorker};
use rounds::{Action, CloseWhy, Commit, Core, Input, TaskView, Valid};
use serde_json::json;
use tracing::{info, warn};
use trainer::schedule::BatchSchedule;
use trainer::{Evaluation, ModelSpec, Net, Optimizer, TrainData};
use verify::WorkerId;

use crate::checks::{self, Checks, Out};
use crate::config::{CheckMode, RunConfig};
use crate::downlink::Downlink;
use crate::ledger::{Contribution, Ledger, Meta, RoundRecord, Rules, TrainState};
use crate::metrics::{Metrics, Traffic};
use crate::monitor::{self, Command, Monitor, RunState};
use crate::progress::{Progress, StepLine};
use crate::registry::{Accepted, Link, Links};
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
    /// A language-model run's training shards as windows without tokens: which shards a
    /// task's next samples fall in (the prefetch hint of every task).
    pub layout: Option<trainer::tokens::TokenWindows>,
    /// The status server's shared state, when `[monitor] listen` is set.
    pub monitor: Option<Arc<Monitor>>,
    /// The data set's kind (`fashion-mnist`, `tokens`), as the status server names it.
    pub dataset: &'static str,
}

/// The run's batch schedule as the core reads it.
pub struct Schedule(RefCell<BatchSchedule>);

impl rounds::Batches for Schedule {
    fn batch(&self, index: u64) -> Vec<u32> {
        self.0.borrow_mut().batch(index)
    }
}

impl Schedule {
    fn steps_per_epoch(&self) -> u64 {
        self.0.borrow().steps_per_epoch()
    }
}

/// What a result is checked against before the core accepts it.
struct Expected<'a> {
    run_id: [u8; 32],
    hyper: [u8; 32],
    round: u64,
    params_hash: verify::Hash,
    n_params: usize,
    limits: &'a DecodeLimits,
    multi_step: bool,
    /// The error-feedback base the task was given.
    ef_base: u64,
    /// The class the worker declared.
    class: Option<verify::Hash>,
    norms: &'a NormTracker,
}

/// The scheduler and the run state it owns.
pub struct Scheduler {
    cfg: RunConfig,
    /// See [`Inputs::layout`].
    layout: Option<trainer::tokens::TokenWindows>,
    run_id: [u8; 32],
    events: Receiver<Event>,
    test: TrainData,
    tokenizer: Option<std::path::PathBuf>,
    net: Net,
    ledger: Ledger,
    downlink: Downlink,
    core: Core<Arc<TaskResult>, Schedule>,
    links: Links,
    h: u64,
    total_batches: u64,
    checks: Option<Checks>,
    /// Digest of the compute class the checks run in.
    class_digest: verify::Hash,
    /// Banned identities, shared with the accept loop, which refuses them.
    banned: Arc<std::sync::RwLock<HashSet<WorkerId>>>,
    /// Workers banned since the last round was committed (their contributions go).
    to_remove: HashSet<WorkerId>,
    /// Single results to remove (their check could not be completed).
    to_drop: HashSet<u64>,
    /// Results confirmed by a check before their round was committed.
    verified_now: HashSet<u64>,
    /// A round the core handed over, to commit.
    complete: Option<Commit<Arc<TaskResult>>>,
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
    /// Training samples per second, smoothed over rounds.
    sample_rate: Option<f64>,
    /// The status server, if any.
    monitor: Option<Arc<Monitor>>,
    /// See [`Inputs::dataset`].
    dataset: &'static str,
    /// When the status server was last given a snapshot.
    published: Option<Instant>,
    /// Where the run is (as the status server shows it).
    state: RunState,
    /// Rounds committed by this process (`starting` until the first).
    rounds_done: u64,
    /// Samples each worker contributed to the last committed round (its share).
    last_shares: std::collections::HashMap<WorkerId, u64>,
    /// The last committed round, until it is logged and reported ([`Scheduler::report`]).
    unreported: Option<Unreported>,
    /// Decoded updates of the round's accepted results, by task id, and their bytes (at
    /// most [`DECODED_KEEP_BYTES`]).
    decoded: (HashMap<u64, Vec<f32>>, usize),
}

/// Bytes of decoded updates kept from validation to the commit; beyond this the commit
/// decodes them again.
const DECODED_KEEP_BYTES: usize = 512 << 20;

/// A committed round's report, held until the round is logged.
struct Unreported {
    step: u64,
    /// The `step` event.
    event: serde_json::Value,
    line: StepLine,
    /// The round's wall time, seconds.
    step_s: f64,
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
            layout,
            monitor,
            dataset,
        } = inputs;
        let net = Net::new(&spec, tch::Device::Cpu, cfg.run.seed);
        let n_params = net.n_params();
        let n = match cfg.data.train_limit {
            0 => train.len(),
            l => l.min(train.len()),
        };
        let schedule = BatchSchedule::new(n, cfg.training.global_batch, cfg.run.seed);
        let steps_per_epoch = schedule.steps_per_epoch();
        let total_batches = cfg
            .training
            .steps
            .unwrap_or(cfg.training.epochs * steps_per_epoch);
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
        // `fresh`: a run started over in this folder (`run.resume = false`); what
        // metrics.jsonl said before it is another run's.
        metrics.emit(
            if step > 0 { "resume" } else { "start" },
            json!({"step": step, "fresh": !cfg.run.resume, "total_steps": total_steps, "local_steps": h, "total_batches": total_batches,
                   "n_params": n_params, "steps_per_epoch": steps_per_epoch,
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
                json!({"step": round, "batches": meta.batches_done, "recovered": true}),
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
                {
                    let tx = events_tx.clone();
                    Box::new(move |done| tx.send(Event::Checked(Box::new(done))).is_ok())
                },
                Duration::from_secs_f64(cfg.verification.challenge_timeout_s),
            )
        });
        drop(events_tx);
        let downlink = Downlink::new(ledger.state.params.clone(), &cfg.downlink);
        let (last_in, last_out) = traffic.get();
        {
            let mut set = banned.write().unwrap_or_else(|e| e.into_inner());
            set.extend(
                recovered
                    .standings
                    .iter()
                    .filter(|(_, s)| s.rep.banned)
                    .map(|(w, _)| *w),
            );
        }
        let core = Core::new(
            rounds::Config {
                min_workers: cfg.run.min_workers,
                start_gather: Duration::from_secs_f64(cfg.run.start_gather_s),
                balance_by_speed: cfg.workers.balance_by_speed,
                first_task_timeout: Duration::from_secs_f64(cfg.network.first_task_timeout_s),
                min_task_timeout: Duration::from_secs_f64(cfg.network.min_task_timeout_s),
                straggler_grace: Duration::from_secs_f64(cfg.network.straggler_grace_s),
                max_strikes: cfg.verification.max_strikes,
                max_pending_checks: cfg.verification.max_pending,
                checks: cfg
                    .verification
                    .enabled()
                    .then(|| (cfg.verification.policy(), check_key)),
                run_seed: cfg.run.seed,
                inner_batches: h,
                total_batches,
                growth: cfg.training.growth(),
                next_hints: layout.is_some(),
            },
            Schedule(RefCell::new(schedule)),
            recovered.standings.clone(),
            meta.next_task,
        );
        let paused = cfg.run.resume && metrics.digest.paused;
        if paused {
            tracing::warn!("the run was paused by the operator: it stays paused until resumed");
        }
        Ok(Scheduler {
            layout,
            class_digest,
            hyper: hyperparams_digest(&cfg, &spec),
            progress: Progress::new(total_steps, step),
            run_id,
            events,
            test,
            tokenizer,
            net,
            ledger,
            downlink,
            core,
            links: Links::default(),
            h,
            total_batches,
            banned,
            // A ban or a dropped result whose rollback a crash interrupted is redone.
            to_remove: recovered
                .standings
                .iter()
                .filter(|(_, s)| s.rep.banned)
                .map(|(w, _)| *w)
                .collect(),
            to_drop: recovered.dropped.iter().copied().collect(),
            checks,
            verified_now: HashSet::new(),
            complete: None,
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
            sample_rate: None,
            monitor,
            dataset,
            published: None,
            // A run the operator paused stays paused across restarts.
            state: if paused {
                RunState::Paused
            } else {
                RunState::Starting
            },
            last_shares: Default::default(),
            unreported: None,
            decoded: Default::default(),
            rounds_done: 0,
            cfg,
        })
    }

    fn step(&self) -> u64 {
        self.ledger.state.round
    }

    /// Runs until every global batch is done or the operator stops the run.
    pub fn run(mut self) -> Result<Outcome> {
        self.publish();
        while self.meta.batches_done < self.total_batches {
            if self.state == RunState::Paused {
                self.report()?;
                // No round opens; joins, checks and operator actions are still handled.
                if !self.pump(Duration::from_millis(200))? {
                    return self.stop();
                }
                // An operator's ban takes its contributions out now, not at the next round.
                self.roll_back()?;
                continue;
            }
            let before = self.meta.batches_done;
            if !self.train_step()? {
                return self.stop();
            }
            self.after_step(before)?;
        }
        self.finish()?;
        self.state = RunState::Finished;
        self.publish();
        Ok(Outcome::Finished)
    }

    /// Saves a checkpoint and tells the workers the run stops (it resumes from the folder).
    fn stop(&mut self) -> Result<Outcome> {
        self.report()?;
        // Contributions of workers banned meanwhile leave before the state is saved.
        self.roll_back()?;
        self.save_checkpoint()?;
        self.metrics.emit("stopped", json!({"step": self.step()}));
        for c in self.links.conns.values() {
            let _ = c.tx.send(Outgoing::Close(
                close::GOING_AWAY,
                "coordinator stopping; the run will resume".into(),
            ));
        }
        self.progress.finish();
        self.state = RunState::Stopped;
        self.publish();
        Ok(Outcome::Stopped)
    }

    /// Waits for an event (at most `wait`), hands it and what is due to the core, and carries
    /// out the core's actions; false on a stop request.
    fn pump(&mut self, wait: Duration) -> Result<bool> {
        let ok = match self.events.recv_timeout(wait) {
            Ok(ev) => self.handle(ev)?,
            Err(RecvTimeoutError::Timeout) => true,
            Err(RecvTimeoutError::Disconnected) => bail!("network side ended"),
        };
        let now = Instant::now();
        if let Some(c) = self.checks.as_mut() {
            let outs = c.tick(now);
            self.act(outs)?;
        }
        self.core.handle_timeout(now);
        self.apply()?;
        if self
            .published
            .is_none_or(|t| now.saturating_duration_since(t) >= PUBLISH_EVERY)
        {
            self.publish();
        }
        Ok(ok)
    }

    /// One round; false when the operator stopped the run.
    fn train_step(&mut self) -> Result<bool> {
        self.core
            .open_round(Instant::now(), self.step(), self.meta.batches_done);
        // The round's tasks go out first; the last round is logged while they compute.
        self.apply()?;
        self.report()?;
        loop {
            self.apply()?;
            if let Some(c) = self.complete.take() {
                self.commit_round(c)?;
                return Ok(true);
            }
            let now = Instant::now();
            let wait = self
                .core
                .poll_timeout()
                .map_or(Duration::from_millis(200), |t| {
                    t.saturating_duration_since(now)
                })
                .clamp(Duration::from_millis(1), Duration::from_millis(200));
            if !self.pump(wait)? {
                return Ok(false);
            }
        }
    }

    /// Tells the core the checks' backlog and disputes, then carries out its actions.
    fn apply(&mut self) -> Result<()> {
        if let Some(c) = &self.checks {
            self.core
                .set_checks(Instant::now(), c.len(), c.disputed_workers());
        }
        while let Some(a) = self.core.poll_action() {
            self.carry_out(a)?;
        }
        Ok(())
    }

    fn carry_out(&mut self, a: Action<Arc<TaskResult>>) -> Result<()> {
        match a {
            Action::SendTask {
                conn,
                worker,
                task,
                reassigned,
            } => {
                if reassigned {
                    self.counts.reassigned += 1;
                    info!(
                        step = task.round,
                        part = task.part,
                        to = conn,
                        "reassigning part"
                    );
                    self.metrics.emit(
                        "reassigned",
                        json!({"step": task.round, "part": task.part, "to_conn": conn}),
                    );
                }
                self.send_task(conn, worker, task)?;
            }
            Action::Close {
                conn,
                worker,
                why,
                reason,
            } => {
                let code = match why {
                    CloseWhy::Protocol => close::PROTOCOL,
                    CloseWhy::Timeout => {
                        warn!(conn, worker = %worker.short(), "no answer to its task long past its deadline; closing");
                        close::TIMEOUT
                    }
                    CloseWhy::Auth => close::AUTH,
                };
                if let Some(l) = self.links.conns.remove(&conn) {
                    let _ = l.tx.send(Outgoing::Close(code, reason));
                }
            }
            Action::Rejected {
                conn,
                worker,
                task_id,
                reason,
            } => {
                self.counts.rejected += 1;
                warn!(worker = %worker.short(), task = task_id, "rejected result: {reason}");
                self.metrics.emit(
                    "rejected_result",
                    json!({"conn": conn, "worker": worker.to_string(), "task_id": task_id, "step": self.step(), "reason": reason}),
                );
            }
            Action::Offence {
                conn,
                worker,
                reason,
                standing,
            } => {
                warn!(conn, worker = %worker.short(), "offence: {reason}");
                self.ledger.log_standing(worker, &standing)?;
                self.metrics.emit(
                    "offence",
                    json!({"conn": conn, "worker": worker.to_string(), "reason": reason, "strikes": standing.strikes, "step": self.step()}),
                );
            }
            Action::Accepted {
                conn,
                worker,
                task,
                result,
                check,
            } => self.on_accepted(conn, worker, task, result, check)?,
            Action::Passed { worker, standing } => {
                self.ledger.log_standing(worker, &standing)?;
            }
            Action::Banned {
                worker,
                reason,
                standing,
            } => {
                self.ledger.log_standing(worker, &standing)?;
                self.metrics.emit(
                    "banned",
                    json!({"worker": worker.to_string(), "reason": reason, "step": self.step()}),
                );
                self.banned
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(worker);
                if let Some(c) = self.checks.as_mut() {
                    c.forget(&worker);
                }
                self.links.forget(&worker);
                self.to_remove.insert(worker);
            }
            Action::Waiting {
                round,
                connected,
                backlog,
            } => info!(step = round, connected, backlog, "waiting for workers"),
            Action::Commit(c) => self.complete = Some(c),
        }
        Ok(())
    }

    /// Sends a task to connection `conn`, with the parameters it needs.
    fn send_task(&mut self, conn: u64, worker: WorkerId, task: rounds::TaskSpec) -> Result<()> {
        let Some((held, link)) = self
            .links
            .conns
            .get(&conn)
            .map(|l| (l.held_version, l.traffic.send_rate()))
        else {
            return Ok(());
        };
        let ef_base = self.ledger.state.ef_base(&worker);
        let params = self.downlink.payload(held, link)?;
        let msg = Task {
            task_id: task.task_id,
            step: task.round,
            params_version: self.downlink.version(),
            params,
            params_hash: self.downlink.hash(),
            prefetch: self.layout.as_ref().map_or_else(Vec::new, |l| {
                l.missing(&task.next)
                    .into_iter()
                    .take(proto::MAX_PREFETCH)
                    .map(|p| p as u32)
                    .collect()
            }),
            indices: task.slice.indices,
            micro_batches: task.slice.micro,
            seed: task.seed,
            hyperparams: self.hyper,
            ef_base,
            inner_steps: self.h > 1,
            standing: {
                let s = self.core.discipline().standing(&worker);
                proto::Standing {
                    tasks_accepted: s.rep.tasks,
                    checks_passed: s.rep.checks_passed,
                    strikes: s.strikes,
                }
            },
        };
        let Some(l) = self.links.conns.get_mut(&conn) else {
            return Ok(());
        };
        if l.tx
            .send(Outgoing::Msg(Box::new(ToWorker::Task(msg))))
            .is_ok()
        {
            l.held_version = Some(self.downlink.version());
            l.task = Some((task.task_id, ef_base));
            self.counts.tasks_sent += 1;
        }
        Ok(())
    }

    /// Handles one event; false on a stop request.
    fn handle(&mut self, ev: Event) -> Result<bool> {
        let now = Instant::now();
        match ev {
            Event::Stop | Event::Operator(Command::Stop) => return Ok(false),
            Event::Operator(Command::Pause) => {
                if self.state != RunState::Paused {
                    info!(
                        step = self.step(),
                        "paused by the operator: no new round opens"
                    );
                    self.metrics.emit("paused", json!({"step": self.step()}));
                    self.state = RunState::Paused;
                    self.publish();
                }
            }
            Event::Operator(Command::Resume) => {
                if self.state == RunState::Paused {
                    info!(step = self.step(), "resumed by the operator");
                    self.metrics.emit("resumed", json!({"step": self.step()}));
                    self.state = if self.rounds_done > 0 {
                        RunState::Running
                    } else {
                        RunState::Starting
                    };
                    self.publish();
                }
            }
            Event::Operator(Command::Ban { worker, reason }) => {
                warn!(worker = %worker.short(), "banned by the operator: {reason}");
                self.core.handle(now, Input::Ban { worker, reason });
            }
            Event::Joined(j) => self.on_join(*j)?,
            Event::Offence {
                conn,
                worker,
                reason,
            } => self.core.handle(
                now,
                Input::Offence {
                    conn,
                    worker,
                    reason,
                },
            ),
            Event::Left {
                conn,
                reason,
                offence,
            } => {
                if let Some(c) = self.links.conns.remove(&conn) {
                    let (bin, bout) = c.traffic.get();
                    let tasks_ok = self.core.members().get(conn).map_or(0, |m| m.tasks_ok);
                    self.metrics.emit(
                        "worker_left",
                        json!({"conn": conn, "worker": c.id.to_string(), "name": c.name, "reason": reason,
                               "tasks_ok": tasks_ok, "bytes_in": bin, "bytes_out": bout,
                               "data_served": c.traffic.data(), "step": self.step()}),
                    );
                }
                self.core.handle(
                    now,
                    Input::Left {
                        conn,
                        reason,
                        offence,
                    },
                );
            }
            Event::Checked(done) => {
                if let Some(c) = self.checks.as_mut() {
                    let outs = c.on_done(*done);
                    self.act(outs)?;
                }
            }
            Event::Message { conn, msg, .. } => match *msg {
                ToCoordinator::Result(res) => self.on_result(conn, *res),
                ToCoordinator::TaskFailed {
                    task_id,
                    reason,
                    need_full_params,
                } => {
                    let reason: String = reason.chars().take(256).collect();
                    warn!(
                        conn,
                        task_id, need_full_params, "worker could not do its task: {reason}"
                    );
                    let holds = self
                        .core
                        .members()
                        .get(conn)
                        .is_some_and(|m| m.busy == Some(task_id));
                    if let Some(l) = self.links.conns.get_mut(&conn).filter(|_| holds) {
                        l.task = None;
                        if need_full_params {
                            l.held_version = None;
                        }
                    }
                    self.core.handle(
                        now,
                        Input::TaskFailed {
                            conn,
                            task_id,
                            reason,
                        },
                    );
                }
                ToCoordinator::ChallengeReply {
                    challenge_id,
                    answer,
                } => {
                    if let Some(c) = self.checks.as_mut() {
                        let outs = c.on_reply(conn, challenge_id, answer);
                        self.act(outs)?;
                    }
                }
                // The connection task refuses a second Hello or Ready before it gets here.
                ToCoordinator::Hello(_) | ToCoordinator::Ready => {}
            },
        }
        Ok(true)
    }

    fn on_join(&mut self, j: Joined) -> Result<()> {
        if self.core.discipline().is_banned(&j.worker) {
            let _ = j.tx.send(Outgoing::Close(
                close::AUTH,
                "this worker is banned from the run".into(),
            ));
            return Ok(());
        }
        self.seen.insert(j.worker);
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
        if j.data_served > 0 {
            self.metrics.emit(
                "data_served",
                json!({"conn": j.conn, "worker": j.worker.to_string(), "name": j.name,
                       "bytes": j.data_served, "fetch_s": (j.fetch_s * 1000.0).round() / 1000.0,
                       "step": self.step()}),
            );
        }
        let bitwise = match self.cfg.verification.mode {
            CheckMode::Bitwise => true,
            CheckMode::Tolerance => false,
            CheckMode::Auto => self.cfg.workers.deterministic_threads.is_some() && same_class,
        };
        self.links.conns.insert(
            j.conn,
            Link {
                id: j.worker,
                name: j.name,
                bitwise,
                same_class,
                class_digest,
                class,
                tx: j.tx,
                traffic: j.traffic,
                held_version: None,
                task: None,
            },
        );
        self.core.handle(
            Instant::now(),
            Input::Joined {
                conn: j.conn,
                worker: j.worker,
            },
        );
        if let Some(c) = self.checks.as_mut() {
            let outs = c.retarget(&j.worker, j.conn);
            self.act(outs)?;
        }
        Ok(())
    }

    /// A result: validated against its task, then handed to the core.
    fn on_result(&mut self, conn: u64, res: TaskResult) {
        let Some(link) = self.links.conns.get_mut(&conn) else {
            return;
        };
        let worker = link.id;
        let ef_base = link
            .task
            .take()
            .filter(|(t, _)| *t == res.task_id)
            .map_or(0, |(_, e)| e);
        let expected = Expected {
            run_id: self.run_id,
            hyper: self.hyper,
            round: self.ledger.state.round,
            params_hash: self.downlink.hash(),
            n_params: self.downlink.params().len(),
            limits: &self.limits,
            multi_step: self.h > 1,
            ef_base,
            class: Some(link.class_digest),
            norms: &self.norms,
        };
        let res = Arc::new(res);
        let now = Instant::now();
        let counts = &mut self.counts;
        let mut norm = None;
        let mut values = None;
        self.core.handle_result(now, conn, res.task_id, |view| {
            let (n, v) = validate(&expected, &worker, &res, view)?;
            norm = Some(n);
            values = Some(v);
            let elapsed = now.saturating_duration_since(view.sent).as_secs_f64() * 1000.0;
            let compute_ms = (res.compute_us as f64 / 1000.0).min(elapsed);
            counts.tasks_ok += 1;
            counts.work_ms += compute_ms;
            counts.update_bytes += res.update.len() as u64;
            counts.update_raw += 4 * expected.n_params as u64;
            Ok(Valid {
                result: res.clone(),
                compute_ms,
            })
        });
        if let Some(n) = norm {
            self.norms.add(n);
        }
        // Kept for the commit (which would decode them again), within a memory budget.
        if let Some(v) = values {
            let (held, bytes) = &mut self.decoded;
            if *bytes + 4 * v.len() <= DECODED_KEEP_BYTES {
                *bytes += 4 * v.len();
                held.insert(res.task_id, v);
            }
        }
    }

    /// Keeps an accepted result for later checks and, when drawn, spot-checks it.
    fn on_accepted(
        &mut self,
        conn: u64,
        worker: WorkerId,
        task: rounds::TaskSpec,
        res: Arc<TaskResult>,
        check: bool,
    ) -> Result<()> {
        self.links.accept(
            worker,
            Accepted {
                task_id: res.task_id,
                commitment: res.commitment.clone(),
                update: Arc::new(res.update.clone()),
            },
        );
        let Some(link) = self.links.conns.get(&conn) else {
            return Ok(());
        };
        if !check || self.checks.is_none() {
            return Ok(());
        }
        let base = match res.commitment.ef_base {
            0 => Some(None),
            b => self.links.accepted(&worker, b).map(|a| {
                Some(checks::Base {
                    commitment: a.commitment,
                    update: a.update,
                })
            }),
        };
        // A result whose error-feedback base is no longer kept cannot be re-executed exactly;
        // it is not drawn (the base was used at most a few tasks earlier, so this is rare).
        let Some(base) = base else {
            return Ok(());
        };
        let tolerance = (!link.bitwise).then_some(if link.same_class {
            self.cfg.verification.tolerance_for(&self.cfg.compression)
        } else {
            self.cfg.verification.cross_class_tolerance()
        });
        let job = checks::Job::new(
            worker,
            conn,
            self.downlink.params().clone(),
            checks::Work {
                indices: task.slice.indices,
                micro: task.slice.micro,
                inner_steps: self.h > 1,
                seed: task.seed,
            },
            res,
            base,
            tolerance,
            link.class.clone(),
        );
        let outs = self
            .checks
            .as_mut()
            .map(|c| c.submit(job))
            .unwrap_or_default();
        self.act(outs)
    }

    /// Carries out what the checks decided (the core hears of the verdicts).
    fn act(&mut self, outs: Vec<Out>) -> Result<()> {
        let now = Instant::now();
        for o in outs {
            match o {
                Out::Challenge {
                    conn,
                    challenge_id,
                    task_id,
                    query,
                } => {
                    if let Some(c) = self.links.conns.get(&conn) {
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
                    self.core.handle(now, Input::CheckPassed { worker });
                    self.metrics.emit(
                        "check_passed",
                        json!({"worker": worker.to_string(), "task_id": task_id, "ms": ms, "how": how, "step": self.step()}),
                    );
                }
                Out::Caught { evidence, ms } => {
                    self.counts.checks += 1;
                    self.counts.caught += 1;
                    self.counts.check_ms += ms;
                    let e = *evidence;
                    let worker = e.worker;
                    warn!(worker = %worker.short(), task = e.commitment.task_id, "cheat detected: {}", e.reason);
                    self.metrics.emit(
                        "cheat_detected",
                        json!({"worker": worker.to_string(), "task_id": e.commitment.task_id, "step": self.step(),
                               "reason": e.reason, "divergent_step": e.divergent_step, "evidence_valid": e.check(), "evidence": e}),
                    );
                    self.core.handle(
                        now,
                        Input::Caught {
                            worker,
                            reason: e.reason,
                        },
                    );
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
                    self.core.handle(
                        now,
                        Input::CheckAbandoned {
                            worker,
                            task_id,
                            conn,
                            reason,
                            worker_fault,
                        },
                    );
                }
            }
        }
        Ok(())
    }

    /// Applies a finished round: contributions in part order to the ledger (durably), then
    /// the downlink, the accounting and the live line.
    fn commit_round(&mut self, c: Commit<Arc<TaskResult>>) -> Result<()> {
        let round = self.step();
        let contributions: Vec<Contribution> = c
            .answers
            .iter()
            .map(|d| Contribution {
                worker: d.worker,
                task_id: d.result.task_id,
                n_samples: d.result.n_samples,
                loss_sum: d.result.loss_sum,
                update: bytes::Bytes::copy_from_slice(&d.result.update),
                verified: self.verified_now.remove(&d.result.task_id),
            })
            .collect();
        self.meta.next_task = self.core.last_task();
        self.meta.batches_done = (self.meta.batches_done + c.batches).min(self.total_batches);
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
        let decoded = record
            .contributions
            .iter()
            .map(|c| self.decoded.0.remove(&c.task_id))
            .collect();
        // Results are only accepted for the round in flight: what is left is stale.
        self.decoded = Default::default();
        let applied = self.ledger.commit(record, decoded, &self.meta)?;
        self.verified_now.clear();
        self.downlink
            .advance(self.ledger.state.params.clone(), applied.delta);
        let loss = applied.loss_sum / applied.n.max(1) as f64;
        let step_s = c.started.elapsed().as_secs_f64();
        let tokens = applied.n * self.test.tokens_per_sample() as u64;
        if tokens > 0 && step_s > 0.0 {
            let rate = tokens as f64 / step_s;
            self.token_rate = Some(self.token_rate.map_or(rate, |r| 0.9 * r + 0.1 * rate));
        }
        if step_s > 0.0 {
            let rate = applied.n as f64 / step_s;
            self.sample_rate = Some(self.sample_rate.map_or(rate, |r| 0.9 * r + 0.1 * rate));
        }
        self.rounds_done += 1;
        if self.state == RunState::Starting {
            self.state = RunState::Running;
        }
        self.last_shares.clear();
        for d in &c.answers {
            *self.last_shares.entry(d.worker).or_default() += u64::from(d.result.n_samples);
        }
        let (bin, bout) = self.traffic.get();
        // Per-connection traffic, while the list stays short enough for one line.
        let per_worker: Vec<serde_json::Value> = self
            .links
            .conns
            .iter()
            .take(PER_WORKER_LINES)
            .map(|(conn, w)| {
                let (i, o) = w.traffic.get();
                json!({"conn": conn, "bytes_in": i, "bytes_out": o, "data_served": w.traffic.data()})
            })
            .collect();
        let step = self.step();
        let event = json!({"step": step, "batches": self.meta.batches_done, "loss": loss,
               "parts": parts_used, "workers": self.links.conns.len(), "samples": samples,
               "bytes_in": bin, "bytes_out": bout, "data_served": self.traffic.data(),
               "round_bytes_in": bin - self.counts.last_in, "round_bytes_out": bout - self.counts.last_out,
               "uplink_ratio": self.counts.uplink_ratio(), "per_worker": per_worker,
               "clipped": applied.report.clipped, "tokens": tokens,
               "step_ms": step_s * 1000.0});
        (self.counts.last_in, self.counts.last_out) = (bin, bout);
        let line = StepLine {
            loss,
            workers: self.links.conns.len(),
            bytes_in: bin,
            bytes_out: bout,
            uplink_ratio: self.counts.uplink_ratio(),
            tokens_per_s: self.token_rate,
            eval: self.last_eval.map(|(_, e)| self.eval_line(&e)),
        };
        debug_assert!(self.unreported.is_none(), "a round left unreported");
        self.unreported = Some(Unreported {
            step,
            event,
            line,
            step_s,
        });
        Ok(())
    }

    /// Logs the last committed round (write-ahead log, synced) and then reports it: the
    /// `step` event, the progress line, the status server's round time. Called once the
    /// next round's tasks are out, so that the log's write overlaps the workers' compute,
    /// and before anything else is reported or saved.
    fn report(&mut self) -> Result<()> {
        let Some(r) = self.unreported.take() else {
            return Ok(());
        };
        self.ledger.flush()?;
        #[cfg(feature = "test-hooks")]
        if self.cfg.test_crash_after_logging == Some(r.step) {
            tracing::warn!(step = r.step, "test-only crash after logging the round");
            std::process::exit(137);
        }
        self.metrics.emit("step", r.event);
        if let Some(m) = &self.monitor {
            m.round_time(r.step_s);
        }
        self.progress.update(r.step, &r.line);
        // The status server's snapshot follows within PUBLISH_EVERY (from `pump`): rounds can
        // take milliseconds, and a snapshot copies the curves.
        Ok(())
    }

    /// Gives the status server the run's state: what `metrics.jsonl` says, with what only
    /// the scheduler knows (workers, rates, traffic, checks) on top. O(workers).
    fn publish(&mut self) {
        let Some(m) = self.monitor.clone() else {
            return;
        };
        self.published = Some(Instant::now());
        let mut s = self.metrics.digest.status.clone();
        let spe = self.core.batches().steps_per_epoch().max(1);
        let (bytes_in, bytes_out) = self.traffic.get();
        let c = &self.counts;
        s.run_id = hex::encode(self.run_id);
        s.model = self.spec().name().to_string();
        s.dataset = self.dataset.to_string();
        s.n_params = self.downlink.params().len() as u64;
        s.language_model = self.spec().is_language_model();
        s.state = self.state;
        s.step = self.step();
        s.total_steps = self.total_batches.div_ceil(self.h);
        s.epoch = self.meta.batches_done as f64 / spe as f64;
        s.local_steps = self.h;
        s.global_batch = self.cfg.training.global_batch as u64;
        s.samples = self.meta.batches_done * s.global_batch;
        s.wall_s = self.metrics.wall_s();
        let finite = |x: f64| x.is_finite().then_some(x);
        // Before this session's first evaluation: the last one in metrics.jsonl.
        s.eval = self
            .last_eval
            .map(|(step, e)| monitor::status::Eval {
                step,
                loss: finite(e.loss),
                accuracy: finite(e.accuracy),
            })
            .or(s.eval);
        s.samples_per_s = self.sample_rate;
        s.tokens_per_s = self.token_rate;
        s.bytes_in = bytes_in;
        s.bytes_out = bytes_out;
        s.data_served = self.traffic.data();
        s.uplink_ratio = c.uplink_ratio();
        s.workers = self.links.conns.len() as u64;
        s.workers_seen = s.workers_seen.max(self.workers_seen());
        // Checks, rejections, reassignments and rollbacks: the digest's counts over the
        // whole run; bans: the standings' (restored with the checkpoint).
        s.banned = self.core.discipline().banned().count() as u64;
        let round_samples: u64 = self.last_shares.values().sum();
        let mut workers: Vec<monitor::WorkerRow> = self
            .links
            .conns
            .iter()
            .map(|(&conn, l)| {
                let member = self.core.members().get(conn);
                let standing = self.core.discipline().standing(&l.id);
                let (i, o) = l.traffic.get();
                monitor::WorkerRow {
                    conn,
                    worker: l.id.to_string(),
                    name: l.name.clone(),
                    class: l.class.label(),
                    samples_per_s: member
                        .and_then(|m| m.ms_per_sample)
                        .filter(|&ms| ms > 0.0)
                        .map(|ms| 1000.0 / ms),
                    share: self.last_shares.get(&l.id).copied().unwrap_or(0) as f64
                        / round_samples.max(1) as f64,
                    tasks: standing.rep.tasks,
                    checks_passed: standing.rep.checks_passed,
                    checks_failed: standing.rep.checks_failed,
                    strikes: standing.strikes,
                    bytes_in: i,
                    bytes_out: o,
                    data_served: l.traffic.data(),
                    busy: member.is_some_and(|m| m.busy.is_some()),
                }
            })
            .collect();
        workers.sort_by_key(|w| w.conn);
        m.publish(monitor::Snapshot {
            status: s,
            workers,
            history: self.metrics.digest.history.clone(),
        });
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

    /// Rollbacks, evaluations and checkpoints due after a round; `before`: global batches
    /// done before it.
    /// The round is reported first when any of them is due (else while the next round
    /// computes).
    fn after_step(&mut self, before: u64) -> Result<()> {
        let spe = self.core.batches().steps_per_epoch().max(1);
        let every = self.cfg.training.eval_every;
        let step = self.step();
        let done = self.meta.batches_done;
        let epoch_ended = before / spe != done / spe;
        let eval =
            epoch_ended || done >= self.total_batches || (every > 0 && step.is_multiple_of(every));
        if eval || !self.to_remove.is_empty() || !self.to_drop.is_empty() {
            self.report()?;
        }
        self.roll_back()?;
        if eval {
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
        let epoch =
            self.meta.batches_done as f64 / self.core.batches().steps_per_epoch().max(1) as f64;
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

    /// Reports the last round (see [`Scheduler::report`]), then writes a checkpoint.
    fn save_checkpoint(&mut self) -> Result<()> {
        self.report()?;
        self.meta.wall_s = self.metrics.wall_s();
        (self.meta.bytes_in, self.meta.bytes_out) = self.traffic.get();
        self.meta.workers_seen = self.workers_seen();
        let standings = self.core.discipline().all();
        self.ledger.checkpoint(&self.meta, standings)
    }

    fn workers_seen(&self) -> u64 {
        self.meta.workers_seen.max(self.seen.len() as u64)
    }

    /// Waits (a bounded time) for the checks still running, so the summary counts them.
    fn drain_checks(&mut self) -> Result<()> {
        let until = Instant::now() + Duration::from_secs(30);
        while self.checks.as_ref().is_some_and(|c| !c.is_empty()) && Instant::now() < until {
            self.pump(Duration::from_millis(100))?;
        }
        self.roll_back()
    }

    fn finish(&mut self) -> Result<()> {
        self.report()?;
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
        let mut summary = json!({"steps": step, "batches": self.meta.batches_done, "wall_s": self.metrics.wall_s(),
                   "cpu_s": crate::metrics::process_cpu_s(), "bytes_in": bin, "bytes_out": bout,
                   "workers_seen": self.workers_seen(), "tasks_sent": c.tasks_sent,
                   "tasks_ok": c.tasks_ok, "rejected": c.rejected, "uplink_ratio": c.uplink_ratio(), "reassigned": c.reassigned,
                   "checks": c.checks, "checks_passed": c.passed, "cheats_caught": c.caught, "checks_abandoned": c.abandoned,
                   "check_ms": c.check_ms, "work_ms": c.work_ms, "verify_overhead": c.check_ms / c.work_ms.max(1e-9),
                   "rollbacks": c.rollbacks, "removed_contributions": c.removed,
                   "banned": self.core.discipline().banned().map(|w| w.to_string()).collect::<Vec<_>>(),
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
        for w in self.links.conns.values() {
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

/// How often the status server gets a new snapshot between rounds.
const PUBLISH_EVERY: Duration = Duration::from_millis(500);

/// Connections listed with their traffic in a `step` event at most.
const PER_WORKER_LINES: usize = 256;

/// Checks an untrusted result against what was asked, before anything uses it; returns the
/// L2 norm of its update and the decoded update.
fn validate(
    e: &Expected<'_>,
    worker: &WorkerId,
    res: &TaskResult,
    task: &TaskView<'_>,
) -> Result<(f64, Vec<f32>), String> {
    let c = &res.commitment;
    if Some(c.class) != e.class {
        return Err("committed in another compute class than the one declared".into());
    }
    let indices = &task.slice.indices;
    if res.n_samples as usize != indices.len() || c.n_samples != res.n_samples {
        return Err(format!(
            "covers {} samples, asked {}",
            res.n_samples,
            indices.len()
        ));
    }
    if !res.loss_sum.is_finite() || res.loss_sum < 0.0 {
        return Err("loss is not a finite non-negative number".into());
    }
    if c.run_id != e.run_id
        || c.task_id != res.task_id
        || c.step != e.round
        || task.round != e.round
        || c.input_params != e.params_hash
        || c.indices != verify::hash_indices(indices)
        || c.seed != task.seed
        || c.hyperparams != e.hyper
        || (c.ef_base != 0 && c.ef_base != e.ef_base)
        || e.multi_step == (c.step_root == [0; 32])
    {
        return Err("commitment does not match the task".into());
    }
    if c.update != verify::hash_update(&res.update) {
        return Err("update bytes do not match the commitment".into());
    }
    verify::verify_signature(worker, c, &res.signature).map_err(|e| format!("signature: {e}"))?;
    let values = compression::decode_exact(&res.update, e.n_params, e.limits)
        .map_err(|e| format!("update: {e}"))?;
    let norm = values
        .iter()
        .map(|&x| f64::from(x).powi(2))
        .sum::<f64>()
        .sqrt();
    // Finite but huge values would overflow the optimizer: beyond 100x the usual norm an
    // update is refused (once enough results set what usual is).
    if let Some(usual) = e.norms.usual() {
        if norm > 100.0 * usual {
            return Err(format!(
                "update norm {norm:.3e} is over 100x the usual {usual:.3e}"
            ));
        }
    }
    Ok((norm, values))
}
