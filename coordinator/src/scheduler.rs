//! The scheduler: synchronous data parallelism (or DiLoCo rounds) over whichever workers are
//! connected.
//!
//! Each step (round) splits its global batch (its H global batches) over the idle workers,
//! sends every part with the current parameters, and waits for all parts. With H = 1 a part
//! answers with its mean gradient; with H > 1 with its pseudo-gradient after H inner steps. A part whose worker leaves, answers with an
//! invalid result, or misses its deadline goes to another idle worker (the first valid answer
//! wins). Gradients are averaged weighted by sample count, in part order, and the optimizer
//! is applied here, so the result does not depend on arrival order.

use std::collections::{BTreeMap, HashSet};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use compression::{CodecConfig, CodecKind, DecodeLimits};
use proto::{close, Task, TaskResult, ToCoordinator, ToWorker};
use serde_bytes::ByteBuf;
use serde_json::json;
use tracing::{info, warn};
use trainer::schedule::{split_exact, BatchSchedule};
use trainer::{Dataset, Net, Optimizer};
use verify::WorkerId;

use crate::config::RunConfig;
use crate::metrics::{Metrics, Traffic};
use crate::progress::{Progress, StepLine};
use crate::server::{Event, Outgoing};
use crate::state::Checkpoint;

struct WorkerState {
    id: WorkerId,
    name: String,
    tx: tokio::sync::mpsc::UnboundedSender<Outgoing>,
    traffic: Arc<Traffic>,
    busy: Option<u64>,
    ms_per_sample: Option<f64>,
    tasks_ok: u64,
}

struct Attempt {
    task_id: u64,
    conn: u64,
    started: Instant,
    deadline: Instant,
    live: bool,
}

struct Contribution {
    grad: Vec<f32>,
    loss_sum: f64,
}

struct Part {
    indices: Vec<u32>,
    /// Sizes of the micro-batches (one per global batch of the round).
    micro: Vec<u32>,
    done: Option<Contribution>,
    attempts: Vec<Attempt>,
}

impl Part {
    fn needs_worker(&self, now: Instant) -> bool {
        self.done.is_none() && !self.attempts.iter().any(|a| a.live && a.deadline > now)
    }
}

/// Everything a step hands to the workers.
struct StepInput {
    params: ByteBuf,
    params_hash: [u8; 32],
    indices_hash: Vec<[u8; 32]>,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// All steps done.
    Finished,
    /// Stopped by the operator; the checkpoint holds the progress.
    Stopped,
}

/// Counters reported in the summary.
#[derive(Default)]
struct Counts {
    tasks_sent: u64,
    tasks_ok: u64,
    rejected: u64,
    reassigned: u64,
    /// Encoded bytes of accepted updates.
    update_bytes: u64,
    /// What those updates would take as raw fp32.
    update_raw: u64,
    /// Traffic totals after the previous step.
    last_in: u64,
    last_out: u64,
}

impl Counts {
    fn uplink_ratio(&self) -> f64 {
        self.update_raw as f64 / self.update_bytes.max(1) as f64
    }
}

/// The scheduler and the model state it owns.
pub struct Scheduler {
    cfg: RunConfig,
    run_id: [u8; 32],
    events: Receiver<Event>,
    test: Dataset,
    net: Net,
    params: Vec<f32>,
    opt: Optimizer,
    schedule: BatchSchedule,
    /// Rounds (optimizer steps) done.
    step: u64,
    /// Rounds in the run.
    total_steps: u64,
    /// Global batches per round.
    h: u64,
    /// Global batches in the run.
    total_batches: u64,
    workers: BTreeMap<u64, WorkerState>,
    seen: HashSet<WorkerId>,
    seen_before: u64,
    metrics: Metrics,
    traffic: Arc<Traffic>,
    next_task: u64,
    hyper: [u8; 32],
    downlink: CodecConfig,
    limits: DecodeLimits,
    counts: Counts,
    progress: Progress,
    last_eval: Option<(u64, f64)>,
    started: bool,
}

impl Scheduler {
    /// Builds the scheduler, resuming from the checkpoint in the output directory if any.
    pub fn new(
        cfg: RunConfig,
        run_id: [u8; 32],
        events: Receiver<Event>,
        train_len: usize,
        test: Dataset,
        traffic: Arc<Traffic>,
    ) -> Result<Self> {
        let net = Net::new(cfg.model.kind, tch::Device::Cpu, cfg.run.seed);
        let n = if cfg.data.train_limit > 0 {
            cfg.data.train_limit.min(train_len)
        } else {
            train_len
        };
        let schedule = BatchSchedule::new(n, cfg.training.global_batch, cfg.run.seed);
        let total_batches = cfg
            .training
            .steps
            .unwrap_or(cfg.training.epochs * schedule.steps_per_epoch());
        let h = u64::from(cfg.training.local_steps.max(1));
        let total_steps = total_batches.div_ceil(h);
        let dir = &cfg.run.output_dir;
        let ck = if cfg.run.resume {
            Checkpoint::load(dir, &run_id, net.n_params())?
        } else {
            None
        };
        let (params, opt, step, wall, seen_before) = match ck {
            Some(ck) => {
                info!(step = ck.step, "resuming from checkpoint");
                traffic.add_in(ck.bytes_in);
                traffic.add_out(ck.bytes_out);
                (ck.params, ck.optimizer, ck.step, ck.wall_s, ck.workers_seen)
            }
            None => (
                net.flat_params(),
                Optimizer::new(cfg.optimizer.clone()),
                0,
                0.0,
                0,
            ),
        };
        let mut metrics = Metrics::open(dir, wall)?;
        metrics.emit(
            if step > 0 { "resume" } else { "start" },
            json!({"step": step, "total_steps": total_steps, "local_steps": h, "total_batches": total_batches, "n_params": net.n_params(),
                   "steps_per_epoch": schedule.steps_per_epoch(), "global_batch": cfg.training.global_batch,
                   "codec": cfg.compression}),
        );
        let downlink = CodecConfig {
            codec: CodecKind::Fp32,
            zstd_level: cfg.compression.zstd_level,
            ..CodecConfig::default()
        };
        let limits = DecodeLimits {
            max_values: net.n_params(),
            max_encoded_bytes: cfg.network.max_frame_bytes as usize,
        };
        let (last_in, last_out) = traffic.get();
        Ok(Scheduler {
            hyper: hyperparams_digest(&cfg),
            progress: Progress::new(total_steps, step),
            run_id,
            events,
            test,
            net,
            params,
            opt,
            schedule,
            step,
            total_steps,
            h,
            total_batches,
            workers: BTreeMap::new(),
            seen: HashSet::new(),
            seen_before,
            metrics,
            traffic,
            next_task: step * 1_000_000,
            downlink,
            limits,
            counts: Counts {
                last_in,
                last_out,
                ..Counts::default()
            },
            last_eval: None,
            started: false,
            cfg,
        })
    }

    /// Runs until every step is done or the operator stops the run.
    pub fn run(mut self) -> Result<Outcome> {
        while self.step < self.total_steps {
            if !self.train_step()? {
                self.save_checkpoint()?;
                self.metrics.emit("stopped", json!({"step": self.step}));
                for w in self.workers.values() {
                    let _ = w.tx.send(Outgoing::Close(
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

    fn idle_workers(&self) -> Vec<u64> {
        self.workers
            .iter()
            .filter(|(_, w)| w.busy.is_none())
            .map(|(&c, _)| c)
            .collect()
    }

    /// One synchronous step; false when the operator stopped the run.
    fn train_step(&mut self) -> Result<bool> {
        let step_start = Instant::now();
        let batches: Vec<Vec<u32>> = (self.batches_done(self.step)
            ..self.batches_done(self.step + 1))
            .map(|b| self.schedule.batch(b))
            .collect();
        let mut waited = Instant::now();
        let need = if self.started {
            1
        } else {
            self.cfg.run.min_workers.max(1)
        };
        while self.idle_workers().len() < need {
            if waited.elapsed() > Duration::from_secs(10) {
                info!(
                    step = self.step,
                    busy = self.workers.len(),
                    "waiting for workers"
                );
                waited = Instant::now();
            }
            match self.events.recv_timeout(Duration::from_millis(500)) {
                Ok(ev) => {
                    if !self.handle(ev, &mut [], None)? {
                        return Ok(false);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => bail!("network side ended"),
            }
        }
        self.started = true;
        let idle = self.idle_workers();
        // Never more parts than the round's first (largest) batch has samples.
        let n = idle.len().min(batches.first().map_or(1, Vec::len)).max(1);
        let per_batch: Vec<Vec<Vec<u32>>> = batches.iter().map(|b| split_exact(b, n)).collect();
        let mut parts: Vec<Part> = (0..n)
            .map(|i| Part {
                indices: per_batch
                    .iter()
                    .flat_map(|pb| pb[i].iter().copied())
                    .collect(),
                micro: per_batch.iter().map(|pb| pb[i].len() as u32).collect(),
                done: None,
                attempts: Vec::new(),
            })
            .collect();
        let input = StepInput {
            params: ByteBuf::from(compression::encode(&self.params, &self.downlink, 0)?),
            params_hash: verify::hash_f32(&self.params),
            indices_hash: parts
                .iter()
                .map(|p| verify::hash_indices(&p.indices))
                .collect(),
        };
        for (i, &conn) in idle.iter().enumerate().take(parts.len()) {
            self.assign(&mut parts[i], i, conn, &input);
        }
        while parts.iter().any(|p| p.done.is_none()) {
            self.dispatch(&mut parts, &input);
            let now = Instant::now();
            let wait = parts
                .iter()
                .flat_map(|p| p.attempts.iter().filter(|a| a.live))
                .map(|a| a.deadline.saturating_duration_since(now))
                .min()
                .unwrap_or(Duration::from_millis(500))
                .clamp(Duration::from_millis(5), Duration::from_millis(500));
            match self.events.recv_timeout(wait) {
                Ok(ev) => {
                    if !self.handle(ev, &mut parts, Some(&input))? {
                        return Ok(false);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => bail!("network side ended"),
            }
        }
        self.apply(parts, step_start)?;
        Ok(true)
    }

    /// Gives every part that has no live, in-time attempt to an idle worker not already on it.
    fn dispatch(&mut self, parts: &mut [Part], input: &StepInput) {
        let now = Instant::now();
        for (i, part) in parts.iter_mut().enumerate() {
            if !part.needs_worker(now) {
                continue;
            }
            let on_it: Vec<u64> = part
                .attempts
                .iter()
                .filter(|a| a.live)
                .map(|a| a.conn)
                .collect();
            let Some(conn) = self
                .workers
                .iter()
                .find(|(c, w)| w.busy.is_none() && !on_it.contains(c))
                .map(|(&c, _)| c)
            else {
                continue;
            };
            if !part.attempts.is_empty() {
                self.counts.reassigned += 1;
                info!(step = self.step, part = i, to = conn, "reassigning part");
                self.metrics.emit(
                    "reassigned",
                    json!({"step": self.step, "part": i, "to_conn": conn}),
                );
            }
            self.assign(part, i, conn, input);
        }
    }

    fn assign(&mut self, part: &mut Part, index: usize, conn: u64, input: &StepInput) {
        let Some(w) = self.workers.get_mut(&conn) else {
            return;
        };
        self.next_task += 1;
        let task_id = self.next_task;
        let n = part.indices.len() as f64;
        let timeout = match w.ms_per_sample {
            None => self.cfg.network.first_task_timeout_s,
            Some(ms) => (4.0 * ms * n / 1000.0 + 1.0).max(self.cfg.network.min_task_timeout_s),
        };
        let task = Task {
            task_id,
            step: self.step,
            params_version: self.step,
            params: Some(input.params.clone()),
            params_hash: input.params_hash,
            indices: part.indices.clone(),
            micro_batches: part.micro.clone(),
            seed: self.cfg.run.seed ^ task_id,
            hyperparams: self.hyper,
        };
        debug_assert_eq!(
            verify::hash_indices(&part.indices),
            input.indices_hash[index]
        );
        if w.tx
            .send(Outgoing::Msg(Box::new(ToWorker::Task(task))))
            .is_err()
        {
            return;
        }
        w.busy = Some(task_id);
        self.counts.tasks_sent += 1;
        let now = Instant::now();
        part.attempts.push(Attempt {
            task_id,
            conn,
            started: now,
            deadline: now + Duration::from_secs_f64(timeout),
            live: true,
        });
    }

    /// Handles one event; false on a stop request.
    fn handle(&mut self, ev: Event, parts: &mut [Part], input: Option<&StepInput>) -> Result<bool> {
        match ev {
            Event::Stop => return Ok(false),
            Event::Joined {
                conn,
                worker,
                name,
                tx,
                traffic,
            } => {
                self.seen.insert(worker);
                self.metrics.emit(
                    "worker_joined",
                    json!({"conn": conn, "worker": worker.to_string(), "name": name, "step": self.step}),
                );
                self.workers.insert(
                    conn,
                    WorkerState {
                        id: worker,
                        name,
                        tx,
                        traffic,
                        busy: None,
                        ms_per_sample: None,
                        tasks_ok: 0,
                    },
                );
            }
            Event::Left { conn, reason } => {
                if let Some(w) = self.workers.remove(&conn) {
                    let (bin, bout) = w.traffic.get();
                    self.metrics.emit(
                        "worker_left",
                        json!({"conn": conn, "worker": w.id.to_string(), "name": w.name, "reason": reason,
                               "tasks_ok": w.tasks_ok, "bytes_in": bin, "bytes_out": bout, "step": self.step}),
                    );
                }
                for a in parts.iter_mut().flat_map(|p| p.attempts.iter_mut()) {
                    if a.conn == conn {
                        a.live = false;
                    }
                }
            }
            Event::Message { conn, msg } => match *msg {
                ToCoordinator::Result(res) => self.on_result(conn, *res, parts, input),
                ToCoordinator::TaskFailed { task_id, reason } => {
                    let reason: String = reason.chars().take(256).collect();
                    warn!(conn, task_id, "worker could not do its task: {reason}");
                    if let Some(w) = self.workers.get_mut(&conn) {
                        if w.busy == Some(task_id) {
                            w.busy = None;
                        }
                    }
                    for a in parts.iter_mut().flat_map(|p| p.attempts.iter_mut()) {
                        if a.task_id == task_id && a.conn == conn {
                            a.live = false;
                        }
                    }
                }
                ToCoordinator::Hello(_) => self.drop_worker(conn, "unexpected Hello".into()),
            },
        }
        Ok(true)
    }

    fn on_result(
        &mut self,
        conn: u64,
        res: TaskResult,
        parts: &mut [Part],
        input: Option<&StepInput>,
    ) {
        let Some(w) = self.workers.get_mut(&conn) else {
            return;
        };
        if w.busy == Some(res.task_id) {
            w.busy = None;
        }
        let found = parts.iter_mut().enumerate().find_map(|(i, p)| {
            let a = p
                .attempts
                .iter()
                .position(|a| a.task_id == res.task_id && a.conn == conn)?;
            Some((i, a))
        });
        let (Some((pi, ai)), Some(input)) = (found, input) else {
            tracing::debug!(
                task = res.task_id,
                "late result for an earlier step, ignored"
            );
            return;
        };
        let part = &mut parts[pi];
        part.attempts[ai].live = false;
        let elapsed = part.attempts[ai].started.elapsed().as_secs_f64() * 1000.0;
        let worker = self.workers[&conn].id;
        match self.validate(
            &worker,
            &res,
            part,
            &input.params_hash,
            &input.indices_hash[pi],
        ) {
            Ok(c) => {
                let w = self.workers.get_mut(&conn).expect("worker present");
                w.tasks_ok += 1;
                let per = elapsed / part.indices.len().max(1) as f64;
                w.ms_per_sample = Some(match w.ms_per_sample {
                    Some(old) => 0.7 * old + 0.3 * per,
                    None => per,
                });
                self.counts.tasks_ok += 1;
                self.counts.update_bytes += res.update.len() as u64;
                self.counts.update_raw += 4 * self.params.len() as u64;
                if part.done.is_none() {
                    part.done = Some(c);
                }
            }
            Err(reason) => {
                self.counts.rejected += 1;
                warn!(worker = %worker.short(), task = res.task_id, "rejected result: {reason}");
                self.metrics.emit(
                    "rejected_result",
                    json!({"conn": conn, "worker": worker.to_string(), "task_id": res.task_id, "step": self.step, "reason": reason}),
                );
                self.drop_worker(conn, format!("invalid result: {reason}"));
            }
        }
    }

    /// Checks an untrusted result against what was asked; returns the decoded gradient.
    fn validate(
        &self,
        worker: &WorkerId,
        res: &TaskResult,
        part: &Part,
        params_hash: &[u8; 32],
        indices_hash: &[u8; 32],
    ) -> Result<Contribution, String> {
        let c = &res.commitment;
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
            || c.step != self.step
            || &c.input_params != params_hash
            || &c.indices != indices_hash
            || c.hyperparams != self.hyper
        {
            return Err("commitment does not match the task".into());
        }
        if c.update != verify::hash_update(&res.update) {
            return Err("update bytes do not match the commitment".into());
        }
        verify::verify_signature(worker, c, &res.signature)
            .map_err(|e| format!("signature: {e}"))?;
        let grad = compression::decode_exact(&res.update, self.params.len(), &self.limits)
            .map_err(|e| format!("update: {e}"))?;
        Ok(Contribution {
            grad,
            loss_sum: res.loss_sum,
        })
    }

    fn drop_worker(&mut self, conn: u64, reason: String) {
        if let Some(w) = self.workers.remove(&conn) {
            let _ = w.tx.send(Outgoing::Close(close::PROTOCOL, reason));
        }
    }

    /// Averages the parts' gradients (weighted by samples, in part order) and steps.
    fn apply(&mut self, parts: Vec<Part>, started: Instant) -> Result<()> {
        let total: usize = parts.iter().map(|p| p.indices.len()).sum();
        let mut grad = vec![0f32; self.params.len()];
        let mut loss_sum = 0.0;
        for p in &parts {
            let c = p.done.as_ref().expect("all parts done");
            let w = p.indices.len() as f32 / total as f32;
            for (g, x) in grad.iter_mut().zip(&c.grad) {
                *g += w * x;
            }
            loss_sum += c.loss_sum;
        }
        self.opt.step(&mut self.params, &grad)?;
        self.step += 1;
        let loss = loss_sum / total.max(1) as f64;
        let (bin, bout) = self.traffic.get();
        let per_worker: Vec<serde_json::Value> = self
            .workers
            .iter()
            .map(|(conn, w)| {
                let (i, o) = w.traffic.get();
                json!({"conn": conn, "bytes_in": i, "bytes_out": o})
            })
            .collect();
        self.metrics.emit(
            "step",
            json!({"step": self.step, "batches": self.batches_done(self.step), "loss": loss,
                   "parts": parts.len(), "workers": self.workers.len(),
                   "bytes_in": bin, "bytes_out": bout,
                   "round_bytes_in": bin - self.counts.last_in, "round_bytes_out": bout - self.counts.last_out,
                   "uplink_ratio": self.counts.uplink_ratio(), "per_worker": per_worker,
                   "step_ms": started.elapsed().as_secs_f64() * 1000.0}),
        );
        (self.counts.last_in, self.counts.last_out) = (bin, bout);
        self.progress.update(
            self.step,
            &StepLine {
                loss,
                workers: self.workers.len(),
                bytes_in: bin,
                bytes_out: bout,
                uplink_ratio: self.counts.uplink_ratio(),
                test_acc: self.last_eval.map(|e| e.1),
            },
        );
        Ok(())
    }

    fn after_step(&mut self) -> Result<()> {
        let spe = self.schedule.steps_per_epoch();
        let every = self.cfg.training.eval_every;
        let epoch_ended =
            self.batches_done(self.step - 1) / spe != self.batches_done(self.step) / spe;
        if epoch_ended
            || self.step == self.total_steps
            || (every > 0 && self.step.is_multiple_of(every))
        {
            self.evaluate()?;
            self.save_checkpoint()?;
        } else if self.cfg.training.checkpoint_every > 0
            && self.step.is_multiple_of(self.cfg.training.checkpoint_every)
        {
            self.save_checkpoint()?;
        }
        Ok(())
    }

    fn evaluate(&mut self) -> Result<()> {
        self.net.set_flat_params(&self.params)?;
        let e = trainer::evaluate(&self.net, &self.test)?;
        let epoch = self.batches_done(self.step) as f64 / self.schedule.steps_per_epoch() as f64;
        self.last_eval = Some((self.step, e.accuracy));
        self.metrics.emit(
            "eval",
            json!({"epoch": (epoch * 1000.0).round() / 1000.0, "step": self.step, "test_acc": e.accuracy, "test_loss": e.loss}),
        );
        self.progress.message(&format!(
            "step {} epoch {epoch:.2}: test accuracy {:.4}, test loss {:.4}",
            self.step, e.accuracy, e.loss
        ));
        Ok(())
    }

    fn save_checkpoint(&mut self) -> Result<()> {
        let (bytes_in, bytes_out) = self.traffic.get();
        Checkpoint {
            version: 1,
            run_id: self.run_id,
            step: self.step,
            params: self.params.clone(),
            optimizer: self.opt.clone(),
            bytes_in,
            bytes_out,
            wall_s: self.metrics.wall_s(),
            workers_seen: self.workers_seen(),
        }
        .save(&self.cfg.run.output_dir)
    }

    fn workers_seen(&self) -> u64 {
        self.seen_before.max(self.seen.len() as u64)
    }

    fn finish(&mut self) -> Result<()> {
        if self.last_eval.map(|e| e.0) != Some(self.step) {
            self.evaluate()?;
            self.save_checkpoint()?;
        }
        let acc = self.last_eval.map(|e| e.1).unwrap_or(0.0);
        let meta = [
            ("model".to_string(), self.cfg.model.kind.name().to_string()),
            ("steps".to_string(), self.step.to_string()),
            ("test_acc".to_string(), format!("{acc:.4}")),
        ]
        .into_iter()
        .collect();
        trainer::export::write_safetensors(
            &self.cfg.run.output_dir.join("model.safetensors"),
            &self.net.layout(),
            &self.params,
            meta,
        )?;
        let (bin, bout) = self.traffic.get();
        let c = &self.counts;
        self.metrics.emit(
            "summary",
            json!({"steps": self.step, "batches": self.batches_done(self.step), "wall_s": self.metrics.wall_s(), "bytes_in": bin, "bytes_out": bout,
                   "workers_seen": self.workers_seen(), "final_test_acc": acc, "tasks_sent": c.tasks_sent,
                   "tasks_ok": c.tasks_ok, "rejected": c.rejected, "uplink_ratio": c.uplink_ratio(), "reassigned": c.reassigned,
                   "params_blake3": hex::encode(verify::hash_f32(&self.params))}),
        );
        self.progress.finish();
        info!(
            steps = self.step,
            test_acc = acc,
            wall_s = self.metrics.wall_s(),
            "run complete"
        );
        self.shutdown_workers("run complete");
        Ok(())
    }

    fn shutdown_workers(&mut self, reason: &str) {
        for w in self.workers.values() {
            let _ = w.tx.send(Outgoing::Msg(Box::new(ToWorker::Shutdown {
                reason: reason.to_string(),
            })));
            let _ = w.tx.send(Outgoing::Close(close::DONE, reason.to_string()));
        }
    }
}

/// What every result's commitment binds as hyperparameters: the outer optimizer, and for
/// multi-step rounds the inner optimizer and H.
fn hyperparams_digest(cfg: &RunConfig) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("dtrain hyperparams v1");
    h.update(&cfg.optimizer.digest());
    h.update(&cfg.inner_optimizer.digest());
    h.update(&cfg.training.local_steps.to_le_bytes());
    *h.finalize().as_bytes()
}
