//! What the status server shows: the run's summary, its workers and its curves, as plain
//! serializable values the scheduler publishes and `coordinator status` reads back.

use std::collections::VecDeque;
use std::io::BufRead;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Where the run is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Loading, or waiting for its first round.
    #[default]
    Starting,
    /// Rounds are running.
    Running,
    /// The operator paused it: the round in flight finishes, no new one opens.
    Paused,
    /// Stopped with a checkpoint; it resumes from the output dir.
    Stopped,
    /// Every step done; the model is exported.
    Finished,
}

/// Counts of spot checks.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckCounts {
    /// Re-executions finished.
    pub done: u64,
    /// Passed.
    pub passed: u64,
    /// Workers caught cheating.
    pub caught: u64,
    /// Checks that could not be completed (their results were dropped).
    pub abandoned: u64,
}

/// A cheat caught by a spot check, with what proves it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cheat {
    /// Round (step) when it was caught.
    pub step: u64,
    /// The worker's key (hex).
    pub worker: String,
    /// The task re-executed.
    pub task_id: u64,
    /// What differed.
    pub reason: String,
    /// The first inner step whose result differed (multi-step rounds), from the bisection.
    pub divergent_step: Option<u32>,
    /// Whether the signed evidence checks out on its own (`verify::Evidence::check`).
    pub evidence_valid: bool,
}

/// A ban.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ban {
    /// Round (step) of the ban.
    pub step: u64,
    /// The worker's key (hex).
    pub worker: String,
    /// Why.
    pub reason: String,
}

/// A rollback of contributions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rollback {
    /// Round (step) when it happened.
    pub step: u64,
    /// The first round recomputed.
    pub from_round: u64,
    /// Rounds replayed.
    pub replayed: u64,
    /// Contributions removed.
    pub removed: u64,
}

/// The last evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Eval {
    /// Round (step) evaluated.
    pub step: u64,
    /// Test loss (images) or validation loss in nats per token (language models); `None`
    /// when it was not a finite number.
    pub loss: Option<f64>,
    /// Test accuracy (images) or next-token accuracy (language models); `None` when it was
    /// not a finite number.
    pub accuracy: Option<f64>,
}

/// The run's summary (`/api/status`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Run id (hex).
    pub run_id: String,
    /// Model name.
    pub model: String,
    /// Data set name.
    pub dataset: String,
    /// Parameters.
    pub n_params: u64,
    /// Whether this is a language model (losses per token, throughput in tokens).
    pub language_model: bool,
    /// Where the run is.
    pub state: RunState,
    /// Rounds (outer steps) done.
    pub step: u64,
    /// Rounds in the run.
    pub total_steps: u64,
    /// Epochs done (fractional).
    pub epoch: f64,
    /// Inner steps (global batches) per round (H).
    pub local_steps: u64,
    /// Samples per global batch.
    pub global_batch: u64,
    /// Training samples in the rounds done.
    pub samples: u64,
    /// Wall seconds of the run, earlier sessions included.
    pub wall_s: f64,
    /// Mean training loss of the last round.
    pub loss: Option<f64>,
    /// The last evaluation.
    pub eval: Option<Eval>,
    /// Training samples per second (smoothed over rounds).
    pub samples_per_s: Option<f64>,
    /// Training tokens per second (language models; smoothed over rounds).
    pub tokens_per_s: Option<f64>,
    /// Bytes received from workers (frames).
    pub bytes_in: u64,
    /// Bytes sent to workers (frames).
    pub bytes_out: u64,
    /// Bytes of data files served.
    pub data_served: u64,
    /// Uplink compression: fp32 bytes of accepted updates over their encoded bytes.
    pub uplink_ratio: f64,
    /// Workers connected.
    pub workers: u64,
    /// Distinct workers seen in the run.
    pub workers_seen: u64,
    /// Results rejected at validation.
    pub rejected: u64,
    /// Parts given to another worker.
    pub reassigned: u64,
    /// Spot checks.
    pub checks: CheckCounts,
    /// Workers banned in the run.
    pub banned: u64,
    /// Rollbacks of contributions.
    pub rollbacks: u64,
    /// Contributions removed by rollbacks.
    pub removed: u64,
    /// The latest cheats caught (at most [`KEEP_EVENTS`]).
    pub cheats: VecDeque<Cheat>,
    /// The latest bans (at most [`KEEP_EVENTS`]).
    pub bans: VecDeque<Ban>,
    /// The latest rollbacks (at most [`KEEP_EVENTS`]).
    pub rollback_log: VecDeque<Rollback>,
}

/// Events of each kind kept for the page (older ones are in `metrics.jsonl`).
pub const KEEP_EVENTS: usize = 50;

/// Appends `x` to a list that keeps its last [`KEEP_EVENTS`] entries.
pub fn keep_last<T>(list: &mut VecDeque<T>, x: T) {
    if list.len() == KEEP_EVENTS {
        list.pop_front();
    }
    list.push_back(x);
}

/// One connected worker (`/api/workers`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerRow {
    /// Connection number.
    pub conn: u64,
    /// Key (hex).
    pub worker: String,
    /// Self-reported name.
    pub name: String,
    /// Its compute class, as a label (device, threads, library versions).
    pub class: String,
    /// Samples per second it trains at, as measured by the scheduler (task sent to answer).
    pub samples_per_s: Option<f64>,
    /// Its fraction of the samples of the last round.
    pub share: f64,
    /// Results accepted over the run (its reputation).
    pub tasks: u64,
    /// Spot checks passed.
    pub checks_passed: u64,
    /// Spot checks failed.
    pub checks_failed: u64,
    /// Strikes (protocol offences, unanswered challenges).
    pub strikes: u32,
    /// Bytes it sent.
    pub bytes_in: u64,
    /// Bytes sent to it.
    pub bytes_out: u64,
    /// Bytes of data files it fetched.
    pub data_served: u64,
    /// Whether it is working on a task now.
    pub busy: bool,
}

/// Points kept per curve at most.
pub const CURVE_POINTS: usize = 1024;

/// A curve of `(step, value)` with bounded memory: once [`CURVE_POINTS`] are kept, every
/// other point is dropped and only every other later point is kept (the stride doubles),
/// so a run of any length is drawn from at most that many evenly spaced points.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Curve {
    /// The points, by step.
    pub points: Vec<(u64, f64)>,
    /// Keep one offered point in `stride`.
    stride: u64,
    /// Points offered.
    offered: u64,
    /// The last point offered (drawn after `points` when it is not among them).
    pub latest: Option<(u64, f64)>,
}

impl Curve {
    /// Offers a point; non-finite values are skipped.
    pub fn push(&mut self, step: u64, value: f64) {
        if !value.is_finite() {
            return;
        }
        self.latest = Some((step, value));
        let stride = self.stride.max(1);
        self.offered += 1;
        if !(self.offered - 1).is_multiple_of(stride) {
            return;
        }
        self.points.push((step, value));
        if self.points.len() >= CURVE_POINTS {
            let mut i = 0;
            self.points.retain(|_| {
                i += 1;
                i % 2 == 1
            });
            self.stride = stride * 2;
        }
    }
}

/// The run's curves (`/api/history`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    /// Mean training loss per round.
    pub loss: Curve,
    /// Evaluation loss.
    pub eval_loss: Curve,
    /// Evaluation accuracy.
    pub eval_accuracy: Curve,
}

impl History {
    /// Adds what one `metrics.jsonl` event says (`step` and `eval` events).
    pub fn add_event(&mut self, v: &Value) {
        let step = v["step"].as_u64().unwrap_or(0);
        match v["event"].as_str() {
            Some("step") => {
                if let Some(l) = v["loss"].as_f64() {
                    self.loss.push(step, l);
                }
            }
            Some("eval") => {
                let loss = v["val_loss"].as_f64().or(v["test_loss"].as_f64());
                let acc = v["val_acc"].as_f64().or(v["test_acc"].as_f64());
                if let Some(l) = loss {
                    self.eval_loss.push(step, l);
                }
                if let Some(a) = acc {
                    self.eval_accuracy.push(step, a);
                }
            }
            _ => {}
        }
    }
}

/// The summary and curves told by a run's `metrics.jsonl` events: what a restart shows from
/// its first second, and what `coordinator status` prints for a run that is not running.
/// Its counters cover the whole run (every session's events). The live scheduler overlays
/// what only it knows (workers, rates, state).
#[derive(Clone, Debug, Default)]
pub struct Digest {
    /// The summary.
    pub status: Status,
    /// The curves.
    pub history: History,
    /// Whether the operator's last word was pause (a restart stays paused).
    pub paused: bool,
    /// Keys seen (`workers_seen`).
    seen: std::collections::HashSet<[u8; 32]>,
    /// Global batches per epoch (from the `start`/`resume` event): the epoch of a round.
    steps_per_epoch: u64,
}

impl Digest {
    /// Reads `metrics.jsonl`; a missing file gives empty values, lines that are not JSON
    /// are skipped.
    pub fn read(path: &Path) -> std::io::Result<Self> {
        let mut d = Digest::default();
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(d),
            Err(e) => return Err(e),
        };
        for line in std::io::BufReader::new(file).lines() {
            if let Ok(v) = serde_json::from_str::<Value>(&line?) {
                d.add(&v);
            }
        }
        Ok(d)
    }

    /// Takes one event. A `start` event marked `fresh` begins another run in the same
    /// folder: what came before is forgotten.
    pub fn add(&mut self, v: &Value) {
        if v["event"] == "start" && v["fresh"] == true {
            *self = Digest::default();
        }
        self.history.add_event(v);
        let status = &mut self.status;
        let step = v["step"].as_u64().unwrap_or(status.step);
        let u = |k: &str| v[k].as_u64().unwrap_or(0);
        let text = |k: &str| v[k].as_str().unwrap_or("").to_string();
        status.wall_s = v["wall_s"].as_f64().unwrap_or(status.wall_s);
        match v["event"].as_str() {
            Some("start") | Some("resume") => {
                status.state = RunState::Starting;
                status.step = step;
                status.total_steps = u("total_steps");
                status.n_params = u("n_params");
                status.global_batch = u("global_batch");
                status.local_steps = u("local_steps");
                self.steps_per_epoch = u("steps_per_epoch");
            }
            Some("step") => {
                status.state = RunState::Running;
                status.step = step;
                status.loss = v["loss"].as_f64().or(status.loss);
                status.samples = u("batches") * status.global_batch;
                if self.steps_per_epoch > 0 && v.get("batches").is_some() {
                    status.epoch = u("batches") as f64 / self.steps_per_epoch as f64;
                }
                status.workers = u("workers");
                status.bytes_in = u("bytes_in").max(status.bytes_in);
                status.bytes_out = u("bytes_out").max(status.bytes_out);
                status.data_served = u("data_served").max(status.data_served);
                status.uplink_ratio = v["uplink_ratio"].as_f64().unwrap_or(status.uplink_ratio);
            }
            Some("eval") => {
                status.epoch = v["epoch"].as_f64().unwrap_or(status.epoch);
                status.language_model = v.get("val_loss").is_some();
                status.eval = Some(Eval {
                    step,
                    loss: v["val_loss"].as_f64().or(v["test_loss"].as_f64()),
                    accuracy: v["val_acc"].as_f64().or(v["test_acc"].as_f64()),
                });
            }
            Some("worker_joined") => {
                let key = hex::decode(text("worker")).ok();
                if let Some(k) = key.and_then(|k| <[u8; 32]>::try_from(k).ok()) {
                    self.seen.insert(k);
                    status.workers_seen = status.workers_seen.max(self.seen.len() as u64);
                }
            }
            Some("check_passed") => {
                status.checks.done += 1;
                status.checks.passed += 1;
            }
            Some("check_abandoned") => status.checks.abandoned += 1,
            Some("rejected_result") => status.rejected += 1,
            Some("reassigned") => status.reassigned += 1,
            Some("cheat_detected") => {
                status.checks.done += 1;
                status.checks.caught += 1;
                let cheat = Cheat {
                    step,
                    worker: text("worker"),
                    task_id: u("task_id"),
                    reason: text("reason"),
                    divergent_step: v["divergent_step"].as_u64().map(|s| s as u32),
                    evidence_valid: v["evidence_valid"].as_bool().unwrap_or(false),
                };
                keep_last(&mut status.cheats, cheat);
            }
            Some("banned") => {
                status.banned += 1;
                let ban = Ban {
                    step,
                    worker: text("worker"),
                    reason: text("reason"),
                };
                keep_last(&mut status.bans, ban);
            }
            Some("rolled_back") => {
                status.rollbacks += 1;
                status.removed += u("removed");
                let rollback = Rollback {
                    step,
                    from_round: u("from_round"),
                    replayed: u("replayed"),
                    removed: u("removed"),
                };
                keep_last(&mut status.rollback_log, rollback);
            }
            Some("paused") => {
                status.state = RunState::Paused;
                self.paused = true;
            }
            Some("resumed") => {
                status.state = RunState::Running;
                self.paused = false;
            }
            Some("stopped") => {
                status.state = RunState::Stopped;
                status.workers = 0;
            }
            Some("summary") => {
                status.state = RunState::Finished;
                status.workers = 0;
                status.workers_seen = status.workers_seen.max(u("workers_seen"));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_curve_stays_bounded_and_evenly_spaced() {
        let mut c = Curve::default();
        for s in 0..100_000u64 {
            c.push(s, s as f64);
        }
        c.push(100_000, f64::NAN);
        assert!(c.points.len() < CURVE_POINTS, "{}", c.points.len());
        assert!(c.points.len() > CURVE_POINTS / 4, "{}", c.points.len());
        assert_eq!(c.points[0], (0, 0.0));
        let gaps: Vec<u64> = c.points.windows(2).map(|w| w[1].0 - w[0].0).collect();
        assert!(gaps.iter().all(|&g| g == gaps[0]), "uneven gaps");
        assert!(c.points.last().unwrap().0 > 99_000 - gaps[0]);
        assert_eq!(
            c.latest,
            Some((99_999, 99_999.0)),
            "the newest point is kept"
        );
    }

    #[test]
    fn a_fresh_start_forgets_the_runs_before_it() {
        let mut d = Digest::default();
        for e in [
            json!({"event": "start", "step": 0, "fresh": false}),
            json!({"event": "step", "step": 1, "loss": 2.0}),
            json!({"event": "check_passed", "step": 1}),
            json!({"event": "paused", "step": 1}),
        ] {
            d.add(&e);
        }
        assert!(d.paused && d.status.checks.passed == 1);
        // A resumed run keeps all of it; a fresh one starts from nothing.
        d.add(&json!({"event": "resume", "step": 1}));
        assert!(d.paused && d.history.loss.points.len() == 1);
        d.add(&json!({"event": "start", "step": 0, "fresh": true, "steps_per_epoch": 10}));
        assert!(!d.paused);
        assert_eq!(d.status.checks.passed, 0);
        assert!(d.history.loss.points.is_empty());
        // A round's epoch: its global batches over the epoch's.
        d.add(&json!({"event": "step", "step": 1, "batches": 5, "loss": 1.0}));
        assert_eq!(d.status.epoch, 0.5);
    }

    #[test]
    fn a_stopped_run_is_read_back_from_its_metrics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(
            &path,
            concat!(
                "{\"event\":\"start\",\"step\":0,\"steps_per_epoch\":4,\"total_steps\":40,\"n_params\":1000,\"global_batch\":64,\"local_steps\":1,\"wall_s\":0.1}\n",
                "{\"event\":\"step\",\"step\":1,\"loss\":2.5,\"workers\":3,\"bytes_in\":10,\"bytes_out\":20,\"uplink_ratio\":4.0,\"wall_s\":1.0}\n",
                "not json\n",
                "{\"event\":\"step\",\"step\":2,\"loss\":2.0,\"workers\":3,\"bytes_in\":30,\"bytes_out\":40,\"uplink_ratio\":4.0,\"wall_s\":2.0}\n",
                "{\"event\":\"eval\",\"step\":2,\"epoch\":0.5,\"test_acc\":0.7,\"test_loss\":0.9,\"wall_s\":2.5}\n",
                "{\"event\":\"banned\",\"step\":2,\"worker\":\"ab\",\"reason\":\"caught cheating\",\"wall_s\":2.6}\n",
                "{\"event\":\"check_passed\",\"step\":2,\"wall_s\":2.6}\n",
                "{\"event\":\"rolled_back\",\"step\":2,\"from_round\":1,\"replayed\":1,\"removed\":3,\"wall_s\":2.7}\n",
                "{\"event\":\"paused\",\"step\":2,\"wall_s\":2.8}\n",
                "{\"event\":\"stopped\",\"step\":2,\"wall_s\":3.0}\n",
            ),
        )
        .unwrap();
        let d = Digest::read(&path).unwrap();
        assert!(d.paused, "the pause outlives the stop");
        let (s, h) = (d.status, d.history);
        assert_eq!((s.checks.done, s.checks.passed), (1, 1));
        assert_eq!((s.rollbacks, s.removed), (1, 3));
        assert_eq!(s.state, RunState::Stopped);
        assert_eq!((s.step, s.total_steps, s.bytes_out), (2, 40, 40));
        assert_eq!(s.loss, Some(2.0));
        assert_eq!(s.eval.and_then(|e| e.accuracy), Some(0.7));
        assert_eq!(s.bans.len(), 1);
        assert_eq!(s.wall_s, 3.0);
        assert_eq!(h.loss.points, vec![(1, 2.5), (2, 2.0)]);
        assert_eq!(h.eval_accuracy.points, vec![(2, 0.7)]);
        let empty = Digest::read(&dir.path().join("none.jsonl")).unwrap();
        assert_eq!(empty.status.state, RunState::Starting);
    }
}
