//! The coordinator's round core: a deterministic state machine, the way `quinn-proto` is to
//! `quinn`.
//!
//! It owns who is connected ([`members`]), the round in flight ([`round`]: parts, attempts,
//! deadlines), how a round is cut ([`split`]) and the standings of identities
//! ([`discipline`]: strikes, bans). It has no sockets, threads, clocks, disk, randomness or
//! model compute: the driver (the coordinator's scheduler) feeds it events with the current
//! time ([`Core::handle`], [`Core::handle_result`], [`Core::handle_timeout`]), asks when to
//! wake it next ([`Core::poll_timeout`]) and carries out the [`Action`]s it returns
//! ([`Core::poll_action`]): send a task, close a connection, keep an accepted result (and
//! spot-check it), record a standing, commit a round.
//!
//! A round goes through [`Phase::Waiting`] (for enough idle workers and a short enough
//! spot-check backlog), [`Phase::InFlight`] (parts out, answers in; a part whose worker
//! leaves, fails, answers invalidly or misses its deadline goes to another idle worker; the
//! first valid answer wins; it may go back to the same worker when nobody else can take it)
//! and back to [`Phase::Idle`] when every part has an answer: the
//! [`Action::Commit`] hands the answers over in part order, so that the result does not
//! depend on arrival order.
//!
//! Work per event is O(log N) in the connected workers (indexes: idle workers by key,
//! attempts by task id, deadline heaps); a round's start looks at every idle worker, and so
//! does a dispatch after the round's parts or attempts changed while a part had no taker.

pub mod discipline;
pub mod members;
pub mod round;
pub mod split;

#[cfg(test)]
mod tests;

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use verify::{SpotCheckPolicy, WorkerId};

pub use discipline::{Discipline, Standing};
pub use members::{Floor, Member, Members};
pub use round::{Answer, Attempt, Part, Round};
pub use split::{shares, split, Balancer, Slice};

/// The run's global batches, by index (a pure function of the index: the driver's seeded
/// schedule).
pub trait Batches {
    /// Sample indices of global batch `index`.
    fn batch(&self, index: u64) -> Vec<u32>;
}

/// How the samples of a round grow with the workers present (see [`Config::growth`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Growth {
    /// Samples each worker should get per inner batch at least: a round merges
    /// `k = ceil(workers * min_micro_batch / global_batch)` consecutive global batches into
    /// each of its inner batches.
    pub min_micro_batch: usize,
    /// Samples per inner batch at most (`k <= max_global_batch / global_batch`).
    pub max_global_batch: usize,
}

/// The core's settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Idle workers needed before the first round starts (later rounds need one).
    pub min_workers: usize,
    /// How long the first round, once it has its `min_workers`, waits for more workers to
    /// join before it starts. Nobody is measured then, so the round splits over every idle
    /// worker and waits for its slowest part (until a backup): workers started together
    /// should all be in it, not join it late as copies of a part held by a slow one.
    pub start_gather: Duration,
    /// Whether parts are sized by the workers' measured speed.
    pub balance_by_speed: bool,
    /// Deadline of a worker's first task.
    pub first_task_timeout: Duration,
    /// Shortest deadline of a later task (which is 4x the worker's measured time, plus 1 s).
    pub min_task_timeout: Duration,
    /// Grace after which parts still unanswered go to faster workers, beyond
    /// [`round::BACKUP_FACTOR`] times the round's first answer time.
    pub straggler_grace: Duration,
    /// Strikes that ban.
    pub max_strikes: u32,
    /// Spot checks in progress beyond which no new round starts.
    pub max_pending_checks: usize,
    /// The spot-check policy and the key of its draws; `None`: no checks.
    pub checks: Option<(SpotCheckPolicy, [u8; 32])>,
    /// The run's seed (task seeds).
    pub run_seed: u64,
    /// Global batches per round: H inner steps (1 for synchronous data parallelism).
    pub inner_batches: u64,
    /// Global batches in the run.
    pub total_batches: u64,
    /// Growth of a round's samples with the workers present; `None`: one global batch per
    /// inner step, whatever the number of workers (then at most as many parts as a batch
    /// has samples).
    pub growth: Option<Growth>,
    /// Attach to every task the samples at the same positions of the next round's batches
    /// ([`TaskSpec::next`]), for workers that fetch data ahead (language-model shards).
    pub next_hints: bool,
}

/// Where the core is in the round cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// No round open: the driver opens the next one ([`Core::open_round`]).
    Idle,
    /// A round is open and waits for workers (or for the spot-check backlog to shrink).
    Waiting,
    /// A round's parts are out.
    InFlight,
}

/// Why the core closes a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseWhy {
    /// A protocol offence, or replaced by a newer connection of the same identity.
    Protocol,
    /// No answer to its task long past the deadline (no strike).
    Timeout,
    /// Banned.
    Auth,
}

/// A task to send: which part of which round, and its samples.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskSpec {
    /// Its id (unique in the run).
    pub task_id: u64,
    /// The round.
    pub round: u64,
    /// The part of the round.
    pub part: usize,
    /// Its samples.
    pub slice: Slice,
    /// Its seed ([`task_seed`]).
    pub seed: u64,
    /// The samples at the same positions of the next round's batches, split with the same
    /// weights: what this worker is likely to get next (empty unless
    /// [`Config::next_hints`], and in the last round).
    pub next: Vec<u32>,
}

/// What a round hands over when every part has an answer.
pub struct Commit<P> {
    /// The round.
    pub round: u64,
    /// Global batches it covers.
    pub batches: u64,
    /// When it started.
    pub started: Instant,
    /// The answers, in part order.
    pub answers: Vec<Answer<P>>,
}

/// What the driver must do.
pub enum Action<P> {
    /// Send a task to a connection (with the parameters it needs).
    SendTask {
        /// The connection.
        conn: u64,
        /// Its identity.
        worker: WorkerId,
        /// The task.
        task: TaskSpec,
        /// Whether the part was given to another worker before.
        reassigned: bool,
    },
    /// Close a connection (the core has forgotten it).
    Close {
        /// The connection.
        conn: u64,
        /// Its identity.
        worker: WorkerId,
        /// Why, as a code.
        why: CloseWhy,
        /// Why, in words.
        reason: String,
    },
    /// A result failed validation (an offence follows).
    Rejected {
        /// The connection.
        conn: u64,
        /// Its identity.
        worker: WorkerId,
        /// The task.
        task_id: u64,
        /// What was wrong.
        reason: String,
    },
    /// A protocol offence earned a strike (record the standing).
    Offence {
        /// The connection.
        conn: u64,
        /// Its identity.
        worker: WorkerId,
        /// What it did.
        reason: String,
        /// Its standing now.
        standing: Standing,
    },
    /// A result was accepted for its part: keep it; spot-check it when `check`.
    Accepted {
        /// The connection.
        conn: u64,
        /// Its identity.
        worker: WorkerId,
        /// What was asked.
        task: TaskSpec,
        /// The result.
        result: P,
        /// Whether the spot-check draw picked it.
        check: bool,
    },
    /// A spot check passed (record the standing).
    Passed {
        /// The worker.
        worker: WorkerId,
        /// Its standing now.
        standing: Standing,
    },
    /// A worker was banned: refuse its key, drop its pending checks, roll back its
    /// unverified contributions.
    Banned {
        /// The worker.
        worker: WorkerId,
        /// Why.
        reason: String,
        /// Its standing now.
        standing: Standing,
    },
    /// The open round still waits for workers (every 10 s).
    Waiting {
        /// The round.
        round: u64,
        /// Connections.
        connected: usize,
        /// Spot checks in progress.
        backlog: usize,
    },
    /// Every part of a round has an answer: apply them in this order.
    Commit(Commit<P>),
}

/// Whether a worker may answer a task: the result's context, for validation.
pub struct TaskView<'a> {
    /// The round.
    pub round: u64,
    /// The part.
    pub part: usize,
    /// Its samples.
    pub slice: &'a Slice,
    /// Its seed.
    pub seed: u64,
    /// When the task was sent.
    pub sent: Instant,
}

/// A valid result: what the driver keeps, and the compute time the worker reported (ms).
pub struct Valid<P> {
    /// The result.
    pub result: P,
    /// Milliseconds the worker says it computed (capped at the time measured here).
    pub compute_ms: f64,
}

struct Pending {
    number: u64,
    first_batch: u64,
    note_at: Instant,
}

enum State<P> {
    Idle,
    Waiting(Pending),
    InFlight(Box<Round<P>>),
}

/// How much slower than the round's target a worker's predicted time may be: a worker joins
/// the critical path only if its share (at least one sample per inner batch, and at least
/// its floor where that applies) would take at most `PACE_MARGIN` times the round's time.
/// Wide enough that equal workers measured through the noise of a shared machine all stay
/// on the path.
const PACE_MARGIN: f64 = 3.0;
/// Balancer weights below the largest by more than this factor take a worker off the path.
const MIN_SHARE_RATIO: f64 = 8.0;
/// How often a worker off the critical path is measured again (a probe copy).
const REMEASURE_AFTER: Duration = Duration::from_secs(5);

/// How long a worker with a task may stay silent, as a multiple of the task's deadline
/// plus a constant, before its connection is closed.
const HUNG_FACTOR: f64 = 3.0;
const HUNG_EXTRA: Duration = Duration::from_secs(30);
/// How often a waiting round says so.
const WAIT_NOTE: Duration = Duration::from_secs(10);
/// Failed tasks in a row tolerated; the next one is an offence.
const MAX_FAILURES: u32 = 3;

/// The round core. `P` is the driver's result type (kept opaque), `B` its batch source.
pub struct Core<P, B> {
    cfg: Config,
    batches: B,
    members: Members,
    discipline: Discipline,
    balancer: Balancer,
    state: State<P>,
    disputed: HashSet<WorkerId>,
    /// After a dispatch left a part without a worker: the round, its version and whether
    /// any worker would do then. While these stay the same, only fresh idle workers can
    /// take a part, so dispatch looks at those alone (no scan of every idle worker per event).
    fruitless: Option<(u64, u64, bool)>,
    /// When the first round stops gathering workers (set once it has its `min_workers`).
    gather_until: Option<Instant>,
    /// Per part of the round in flight: [`TaskSpec::next`].
    hints: Vec<Vec<u32>>,
    backlog: usize,
    next_task: u64,
    started: bool,
    actions: VecDeque<Action<P>>,
}

impl<P: Clone, B: Batches> Core<P, B> {
    /// A core with the standings recovered from disk; task ids continue after `next_task`.
    pub fn new(
        cfg: Config,
        batches: B,
        standings: Vec<(WorkerId, Standing)>,
        next_task: u64,
    ) -> Self {
        Core {
            discipline: Discipline::new(standings, cfg.max_strikes),
            cfg,
            batches,
            members: Members::default(),
            balancer: Balancer::default(),
            state: State::Idle,
            disputed: HashSet::new(),
            fruitless: None,
            gather_until: None,
            hints: Vec::new(),
            backlog: 0,
            next_task,
            started: false,
            actions: VecDeque::new(),
        }
    }

    /// The phase.
    pub fn phase(&self) -> Phase {
        match self.state {
            State::Idle => Phase::Idle,
            State::Waiting(_) => Phase::Waiting,
            State::InFlight(_) => Phase::InFlight,
        }
    }

    /// The round in flight.
    pub fn round(&self) -> Option<&Round<P>> {
        match &self.state {
            State::InFlight(r) => Some(r),
            _ => None,
        }
    }

    /// The connected workers.
    pub fn members(&self) -> &Members {
        &self.members
    }

    /// The standings.
    pub fn discipline(&self) -> &Discipline {
        &self.discipline
    }

    /// The batch source.
    pub fn batches(&self) -> &B {
        &self.batches
    }

    /// The last task id used.
    pub fn last_task(&self) -> u64 {
        self.next_task
    }

    /// The next action to carry out.
    pub fn poll_action(&mut self) -> Option<Action<P>> {
        self.actions.pop_front()
    }

    /// When [`Core::handle_timeout`] must be called next at the latest.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let round = match &self.state {
            State::InFlight(r) => r.next_deadline(),
            State::Waiting(p) => Some(match self.gather_until {
                Some(t) if !self.started => t.min(p.note_at),
                _ => p.note_at,
            }),
            State::Idle => None,
        };
        let hung = self.members.first_hung().map(|(t, _)| t);
        [round, hung].into_iter().flatten().min()
    }

    /// Opens round `number`, which starts at global batch `first_batch`; it starts as soon
    /// as enough workers are idle. Ignored unless [`Phase::Idle`].
    pub fn open_round(&mut self, now: Instant, number: u64, first_batch: u64) {
        if !matches!(self.state, State::Idle) {
            return;
        }
        self.state = State::Waiting(Pending {
            number,
            first_batch,
            note_at: now + WAIT_NOTE,
        });
        self.progress(now);
    }

    /// Tells the core how many spot checks are in progress and whose results are being
    /// disputed (those workers get no new work meanwhile).
    pub fn set_checks(&mut self, now: Instant, backlog: usize, disputed: HashSet<WorkerId>) {
        self.backlog = backlog;
        // A worker no longer disputed may take parts it could not (the driver calls this
        // after every event: only a shrinking set forgets a fruitless dispatch).
        if self.disputed.iter().any(|w| !disputed.contains(w)) {
            self.fruitless = None;
        }
        self.disputed = disputed;
        self.progress(now);
    }

    /// Handles an event other than a result.
    pub fn handle(&mut self, now: Instant, input: Input) {
        match input {
            Input::Joined { conn, worker } => {
                self.on_join(now, conn, worker);
                self.progress(now);
                self.copy_for_newcomer(now, conn);
            }
            Input::Left {
                conn,
                reason,
                offence,
            } => {
                self.balancer.remove(conn);
                if let Some(m) = self.drop_conn(now, conn) {
                    if offence {
                        self.strike(now, m.worker, conn, &reason);
                    }
                }
            }
            Input::Offence {
                conn,
                worker,
                reason,
            } => self.strike(now, worker, conn, &reason),
            Input::TaskFailed {
                conn,
                task_id,
                reason,
            } => self.on_failed(now, conn, task_id, &reason),
            Input::CheckPassed { worker } => {
                let standing = self.discipline.passed(worker);
                self.actions.push_back(Action::Passed { worker, standing });
            }
            Input::Caught { worker, reason } => {
                self.ban(now, worker, format!("caught cheating: {reason}"));
            }
            Input::Ban { worker, reason } => {
                if !self.discipline.is_banned(&worker) {
                    self.ban(now, worker, format!("banned by the operator: {reason}"));
                }
            }
            Input::CheckAbandoned {
                worker,
                task_id,
                conn,
                reason,
                worker_fault,
            } => {
                if let State::InFlight(r) = &mut self.state {
                    r.unanswer(task_id, now);
                }
                // A strike only when the worker could have answered: still on the connection
                // that was asked (a restarted worker lost what it kept).
                if worker_fault && self.members.get(conn).is_some_and(|m| m.worker == worker) {
                    self.strike(now, worker, conn, &reason);
                }
            }
        }
        self.progress(now);
    }

    /// What `conn`'s answer to `task_id` is expected to be, when it is the connection's
    /// current task in the round in flight (then the driver validates it).
    pub fn expects(&self, conn: u64, task_id: u64) -> Option<TaskView<'_>> {
        if self.members.get(conn)?.busy != Some(task_id) {
            return None;
        }
        let State::InFlight(r) = &self.state else {
            return None;
        };
        let (p, a) = r.locate(task_id)?;
        let part = &r.parts[p];
        Some(TaskView {
            round: r.number,
            part: p,
            slice: &part.slice,
            seed: part.seed,
            sent: part.attempts[a].started,
        })
    }

    /// Handles `conn`'s result for `task_id`. `validate` runs on what the task asked
    /// ([`Core::expects`]) when it is the connection's current task in this round; a result
    /// for a task of an earlier round is dropped without blame, one for a task the
    /// connection does not hold is an offence.
    pub fn handle_result(
        &mut self,
        now: Instant,
        conn: u64,
        task_id: u64,
        validate: impl FnOnce(&TaskView<'_>) -> Result<Valid<P>, String>,
    ) {
        let Some(m) = self.members.get(conn) else {
            return;
        };
        let worker = m.worker;
        if m.busy != Some(task_id) {
            let reason = format!("result for task {task_id} that is not this connection's current task (replayed or out of order)");
            self.offend(now, conn, reason);
            self.progress(now);
            return;
        }
        let outcome = self.expects(conn, task_id).map(|v| validate(&v));
        // Every answer measures the worker's speed, a late one included (that is how a
        // probe or a replaced straggler is measured).
        self.members.measure(conn, now);
        self.members.set_idle(conn);
        self.members.update(conn, |m| m.failures = 0);
        let State::InFlight(r) = &mut self.state else {
            self.progress(now);
            return;
        };
        let Some((p, a)) = r.locate(task_id) else {
            // A late answer to an earlier round's task.
            self.progress(now);
            return;
        };
        r.retire(task_id, now);
        let elapsed = now.saturating_duration_since(r.parts[p].attempts[a].started);
        let elapsed_ms = elapsed.as_secs_f64() * 1000.0;
        match outcome {
            Some(Ok(valid)) => {
                r.parts[p].attempts[a].compute_ms = Some(valid.compute_ms.min(elapsed_ms));
                self.members.update(conn, |m| m.tasks_ok += 1);
                let answer = Answer {
                    worker,
                    task_id,
                    result: valid.result.clone(),
                };
                if r.answer(p, answer, now, elapsed) {
                    let task = TaskSpec {
                        task_id,
                        round: r.number,
                        part: p,
                        slice: r.parts[p].slice.clone(),
                        seed: r.parts[p].seed,
                        next: Vec::new(),
                    };
                    let standing = self.discipline.accepted(worker);
                    let check = self.cfg.checks.as_ref().is_some_and(|(policy, key)| {
                        policy.should_check(&standing.rep, key, task_id)
                    });
                    self.actions.push_back(Action::Accepted {
                        conn,
                        worker,
                        task,
                        result: valid.result,
                        check,
                    });
                }
            }
            Some(Err(reason)) => {
                self.actions.push_back(Action::Rejected {
                    conn,
                    worker,
                    task_id,
                    reason: reason.clone(),
                });
                self.offend(now, conn, format!("invalid result: {reason}"));
            }
            None => {}
        }
        self.progress(now);
    }

    /// Handles what is due at `now`: parts whose deadline passed go to other workers,
    /// connections silent long past their task's deadline are closed (no strike: it may be a
    /// very slow machine; it can come back), a waiting round says so every 10 s.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some((t, conn)) = self.members.first_hung() {
            if t > now {
                break;
            }
            match self.drop_conn(now, conn) {
                Some(m) => self.actions.push_back(Action::Close {
                    conn,
                    worker: m.worker,
                    why: CloseWhy::Timeout,
                    reason: "no answer to its task".into(),
                }),
                None => self.members.forget_hung(t, conn),
            }
        }
        match &mut self.state {
            State::InFlight(r) => {
                r.expire(now);
            }
            State::Waiting(p) if p.note_at <= now => {
                p.note_at = now + WAIT_NOTE;
                let round = p.number;
                self.actions.push_back(Action::Waiting {
                    round,
                    connected: self.members.len(),
                    backlog: self.backlog,
                });
            }
            _ => {}
        }
        self.progress(now);
    }

    /// Moves the round on after any change: starts a waiting round when it can, gives parts
    /// that need a worker to idle ones, commits a complete round.
    fn progress(&mut self, now: Instant) {
        if let State::Waiting(_) = self.state {
            self.try_start(now);
        }
        let State::InFlight(r) = &self.state else {
            self.members.clear_fresh();
            return;
        };
        if r.has_needy() && self.members.idle_len() > 0 {
            self.dispatch(now);
        } else {
            self.members.clear_fresh();
            self.fruitless = None;
        }
        if matches!(&self.state, State::InFlight(r) if r.complete()) {
            self.commit();
        }
    }

    /// A worker that joins a round started with nobody measured gets a copy of an open part
    /// (its answer counts if it comes first): a round whose first workers were all slow is
    /// not held by them.
    fn copy_for_newcomer(&mut self, now: Instant, conn: u64) {
        let Some(m) = self.members.get(conn) else {
            return;
        };
        if m.busy.is_some() || !self.eligible(&m.worker) {
            return;
        }
        let State::InFlight(r) = &mut self.state else {
            return;
        };
        if r.target.is_some() {
            return;
        }
        if let Some(p) = r.part_to_copy() {
            self.send(now, p, conn, false, true);
        }
    }

    fn eligible(&self, w: &WorkerId) -> bool {
        !self.disputed.contains(w)
    }

    fn try_start(&mut self, now: Instant) {
        if !matches!(self.state, State::Waiting(_)) {
            return;
        }
        let need = if self.started {
            1
        } else {
            self.cfg.min_workers.max(1)
        };
        if self.backlog >= self.cfg.max_pending_checks
            || self.members.idle_len() < need
            || self
                .members
                .idle()
                .filter(|(w, _)| self.eligible(w))
                .take(need)
                .count()
                < need
        {
            // Gathering starts again once the first round has its workers back.
            self.gather_until = None;
            return;
        }
        if !self.started && !self.cfg.start_gather.is_zero() {
            let until = *self.gather_until.get_or_insert(now + self.cfg.start_gather);
            if now < until {
                return;
            }
        }
        let State::Waiting(p) = &self.state else {
            return;
        };
        let (number, first) = (p.number, p.first_batch);
        self.started = true;
        let idle: Vec<(u64, Option<Speed>, Option<Instant>)> = self
            .members
            .idle()
            .filter(|(w, _)| self.eligible(w))
            .filter_map(|(_, c)| {
                let m = self.members.get(c)?;
                let speed = m.ms_per_sample.map(|ms| Speed {
                    ms_per_sample: ms,
                    floor: m.floor,
                });
                Some((c, speed, m.measured_at))
            })
            .collect();
        let inner = self.inner_batches(first, idle.len());
        let batches = inner.iter().map(|(_, n)| *n).sum::<u64>();
        let inner: Vec<Vec<u32>> = inner.into_iter().map(|(b, _)| b).collect();
        let samples = inner.iter().map(Vec::len).sum::<usize>();
        let speeds: Vec<Option<Speed>> = idle.iter().map(|(_, s, _)| *s).collect();
        let (critical, target) = pace(&speeds, samples, inner.len());
        // Never more parts than the round's first inner batch has samples (only the run's
        // last batch can be smaller).
        let n = critical.len().min(inner.first().map_or(1, Vec::len)).max(1);
        let mut conns: Vec<u64> = critical.iter().take(n).map(|&i| idle[i].0).collect();
        let weights = if self.cfg.balance_by_speed {
            // A worker whose share the balancer had to squeeze below 1/8 of the largest
            // (its fixed cost per task exceeds what its samples save) costs the round a task
            // and saves nothing: it goes off the path like a slow one.
            let ms: Vec<Option<f64>> = conns
                .iter()
                .map(|c| self.members.get(*c).and_then(|m| m.ms_per_sample))
                .collect();
            let w = self.balancer.weights(&conns, &ms);
            let top = w.iter().copied().fold(0.0, f64::max);
            let keep: Vec<bool> = w.iter().map(|x| *x * MIN_SHARE_RATIO >= top).collect();
            conns = conns
                .into_iter()
                .zip(&keep)
                .filter(|(_, k)| **k)
                .map(|(c, _)| c)
                .collect();
            w.into_iter()
                .zip(keep)
                .filter(|(_, k)| *k)
                .map(|(x, _)| x)
                .collect()
        } else {
            vec![1.0; n]
        };
        let n = conns.len().max(1);
        // The target follows the workers actually taken (the cap and the share filter may
        // have left some out).
        let target = target.and_then(|_| {
            let speed: f64 = conns
                .iter()
                .filter_map(|c| self.members.get(*c)?.ms_per_sample)
                .map(|ms| 1.0 / ms.max(1e-9))
                .sum();
            (speed > 0.0).then(|| Duration::from_secs_f64(samples as f64 / speed / 1000.0))
        });
        let slices = split(&inner, &weights)
            .into_iter()
            .enumerate()
            .map(|(i, s)| (s, task_seed(self.cfg.run_seed, number, i)))
            .collect();
        self.hints = match first + batches {
            next if self.cfg.next_hints && next < self.cfg.total_batches => {
                let inner: Vec<Vec<u32>> = self
                    .inner_batches(next, idle.len())
                    .into_iter()
                    .map(|(b, _)| b)
                    .collect();
                split(&inner, &weights)
                    .into_iter()
                    .map(|s| s.indices)
                    .collect()
            }
            _ => Vec::new(),
        };
        let mut round = Round::new(number, batches, now, slices, self.cfg.straggler_grace);
        round.target = target;
        self.state = State::InFlight(Box::new(round));
        for (i, &conn) in conns.iter().enumerate() {
            self.send(now, i, conn, false, false);
        }
        // Workers off the critical path: a new one gets a copy of a part to measure it (its
        // answer counts if it comes first); a slow one is measured again now and then.
        let on_path: HashSet<u64> = conns.iter().copied().collect();
        let mut k = 0;
        for &(conn, ms, at) in &idle {
            let due = match (ms, at) {
                (None, _) | (_, None) => true,
                (Some(_), Some(at)) => now.saturating_duration_since(at) >= REMEASURE_AFTER,
            };
            if due && !on_path.contains(&conn) {
                self.send(now, k % n, conn, false, true);
                k += 1;
            }
        }
    }

    /// The round's inner batches from global batch `first`, each `k` global batches merged
    /// (`k` from [`Growth`] and the workers present), with the global batches each covers.
    fn inner_batches(&self, first: u64, workers: usize) -> Vec<(Vec<u32>, u64)> {
        let left = self.cfg.total_batches.saturating_sub(first);
        let b = self.batches.batch(first);
        let k = match self.cfg.growth {
            Some(g) if !b.is_empty() => {
                let want = (workers * g.min_micro_batch.max(1)).div_ceil(b.len());
                let most = (g.max_global_batch / b.len()).max(1);
                want.clamp(1, most) as u64
            }
            _ => 1,
        };
        let count = (self.cfg.inner_batches.max(1) * k).min(left).max(1);
        (0..count.div_ceil(k))
            .map(|g| {
                let from = first + g * k;
                let to = (from + k).min(first + count);
                let mut s = Vec::new();
                for i in from..to {
                    if i == first {
                        s.extend_from_slice(&b);
                    } else {
                        s.extend(self.batches.batch(i));
                    }
                }
                (s, to - from)
            })
            .collect()
    }

    /// Gives every part that needs a worker to an idle one that can do it within the
    /// round's target time (any idle one when no attempt on the critical path can still
    /// answer): one that has not tried it yet, else one that tried it once (it may have
    /// lacked the parameters' base).
    fn dispatch(&mut self, now: Instant) {
        let State::InFlight(r) = &self.state else {
            return;
        };
        let anyone = !r.has_live_primary();
        let fresh = self.members.take_fresh();
        let only_fresh = self.fruitless == Some((r.number, r.version, anyone));
        if only_fresh && fresh.is_empty() {
            return;
        }
        // The idle workers that may take a part: all of them, or only the fresh ones when
        // the others were all found unfit since.
        let candidates = || -> Box<dyn Iterator<Item = (WorkerId, u64)> + '_> {
            if only_fresh {
                Box::new(fresh.iter().copied())
            } else {
                Box::new(self.members.idle())
            }
        };
        let fits = |c: u64, part: usize| match (r.target, self.members.get(c)) {
            (_, _) if anyone => true,
            (Some(t), Some(m)) => m
                .predict(r.parts[part].slice.indices.len())
                .is_some_and(|ms| ms <= PACE_MARGIN * t.as_secs_f64() * 1000.0),
            (None, _) => true,
            (_, None) => false,
        };
        let mut taken = HashSet::new();
        let mut plan = Vec::new();
        let mut unserved = false;
        for part in r.needy() {
            let pick = candidates()
                .filter(|(w, c)| self.eligible(w) && !taken.contains(c) && fits(*c, part))
                .map(|(_, c)| (c, r.tries(part, c)))
                .find(|(_, (n, _))| *n == 0)
                .or_else(|| {
                    candidates()
                        .filter(|(w, c)| self.eligible(w) && !taken.contains(c) && fits(*c, part))
                        .map(|(_, c)| (c, r.tries(part, c)))
                        .find(|(_, (n, live))| *n == 1 && !live)
                });
            // Nobody fits, nothing can still answer the part, and no worker on the path is
            // within its deadline (one that is will soon be free to take it): any idle
            // worker, so that the round never stalls (repeated failures end in an offence).
            let pick = pick.or_else(|| {
                let p = &r.parts[part];
                let silent = !p.attempts.iter().any(|a| a.live) && r.stalled();
                candidates()
                    .find(|(w, c)| silent && self.eligible(w) && !taken.contains(c))
                    .map(|(_, c)| (c, (0, false)))
            });
            match pick {
                Some((conn, _)) => {
                    taken.insert(conn);
                    let reassigned = r.parts[part].attempts.iter().any(|a| !a.probe);
                    plan.push((part, conn, reassigned));
                }
                None => unserved = true,
            }
        }
        for (part, conn, reassigned) in plan {
            self.send(now, part, conn, reassigned, false);
        }
        // Sends only take workers and cover parts: what was unfit stays unfit.
        self.fruitless = match &self.state {
            State::InFlight(r) if unserved => Some((r.number, r.version, !r.has_live_primary())),
            _ => None,
        };
        self.members.clear_fresh();
    }

    /// Sends part `part` of the round in flight to `conn` (`probe`: a redundant copy the
    /// round does not wait for).
    fn send(&mut self, now: Instant, part: usize, conn: u64, reassigned: bool, probe: bool) {
        let State::InFlight(r) = &mut self.state else {
            return;
        };
        let Some(m) = self.members.get(conn) else {
            return;
        };
        let worker = m.worker;
        let n = r.parts[part].slice.indices.len() as f64;
        // A measured worker's deadline follows the round's target time (which its own
        // predicted time is within); 4x and 1 s of slack for noise.
        let timeout = match (m.predict(n as usize), r.target) {
            (None, _) => self.cfg.first_task_timeout,
            (Some(ms), target) => {
                let own = Duration::from_secs_f64(ms / 1000.0);
                (own.max(target.unwrap_or_default().mul_f64(PACE_MARGIN)) * 4
                    + Duration::from_secs(1))
                .max(self.cfg.min_task_timeout)
            }
        };
        self.next_task += 1;
        let task_id = self.next_task;
        r.add_attempt(
            part,
            Attempt {
                task_id,
                conn,
                started: now,
                deadline: now + timeout,
                live: true,
                compute_ms: None,
                probe,
            },
        );
        let until = now + timeout.mul_f64(HUNG_FACTOR) + HUNG_EXTRA;
        self.members
            .set_busy(conn, task_id, (n as usize, probe), now, until);
        let task = TaskSpec {
            task_id,
            round: r.number,
            part,
            slice: r.parts[part].slice.clone(),
            seed: r.parts[part].seed,
            next: self.hints.get(part).cloned().unwrap_or_default(),
        };
        self.actions.push_back(Action::SendTask {
            conn,
            worker,
            task,
            reassigned,
        });
    }

    fn commit(&mut self) {
        let State::InFlight(r) = std::mem::replace(&mut self.state, State::Idle) else {
            return;
        };
        let r = *r;
        let times: Vec<(u64, f64)> = r
            .parts
            .iter()
            .filter_map(|p| {
                let id = p.done.as_ref()?.task_id;
                let a = p.attempts.iter().find(|a| a.task_id == id)?;
                Some((a.conn, a.compute_ms?))
            })
            .collect();
        self.balancer.observe(&times);
        let answers = r.parts.into_iter().filter_map(|p| p.done).collect();
        self.actions.push_back(Action::Commit(Commit {
            round: r.number,
            batches: r.batches,
            started: r.started,
            answers,
        }));
    }

    fn on_join(&mut self, now: Instant, conn: u64, worker: WorkerId) {
        if self.discipline.is_banned(&worker) {
            self.actions.push_back(Action::Close {
                conn,
                worker,
                why: CloseWhy::Auth,
                reason: "this worker is banned from the run".into(),
            });
            return;
        }
        // One connection per identity: a worker that restarts replaces its old, dead one at
        // once instead of after the idle timeout, and its part goes elsewhere now.
        if let Some(old) = self.members.conn_of(&worker) {
            if self.drop_conn(now, old).is_some() {
                self.actions.push_back(Action::Close {
                    conn: old,
                    worker,
                    why: CloseWhy::Protocol,
                    reason: "replaced by a newer connection".into(),
                });
            }
        }
        self.members.insert(conn, worker, now);
    }

    fn on_failed(&mut self, now: Instant, conn: u64, task_id: u64, reason: &str) {
        let Some(m) = self.members.get(conn) else {
            return;
        };
        if m.busy != Some(task_id) {
            let reason = format!("failure report for task {task_id}, which it does not hold");
            return self.offend(now, conn, reason);
        }
        self.members.set_idle(conn);
        let failures = self
            .members
            .update(conn, |m| {
                m.failures += 1;
                m.failures
            })
            .unwrap_or(0);
        if let State::InFlight(r) = &mut self.state {
            r.retire(task_id, now);
        }
        if failures > MAX_FAILURES {
            let reason = format!("{failures} failed tasks in a row, the last: {reason}");
            self.offend(now, conn, reason);
        }
    }

    /// Forgets a connection; its task goes elsewhere.
    fn drop_conn(&mut self, now: Instant, conn: u64) -> Option<Member> {
        let m = self.members.remove(conn)?;
        if let (Some(t), State::InFlight(r)) = (m.busy, &mut self.state) {
            r.retire(t, now);
        }
        Some(m)
    }

    /// A protocol offence: the connection is closed and the worker gets a strike.
    fn offend(&mut self, now: Instant, conn: u64, reason: String) {
        let Some(m) = self.drop_conn(now, conn) else {
            return;
        };
        self.actions.push_back(Action::Close {
            conn,
            worker: m.worker,
            why: CloseWhy::Protocol,
            reason: reason.clone(),
        });
        self.strike(now, m.worker, conn, &reason);
    }

    fn strike(&mut self, now: Instant, worker: WorkerId, conn: u64, reason: &str) {
        let (standing, ban) = self.discipline.strike(worker);
        let strikes = standing.strikes;
        self.actions.push_back(Action::Offence {
            conn,
            worker,
            reason: reason.to_string(),
            standing,
        });
        if ban {
            self.ban(
                now,
                worker,
                format!("{strikes} strikes, the last: {reason}"),
            );
        }
    }

    /// Bans a worker: closes its connection, drops its answers in the round in flight.
    fn ban(&mut self, now: Instant, worker: WorkerId, reason: String) {
        let standing = self.discipline.ban(worker, &reason);
        self.actions.push_back(Action::Banned {
            worker,
            reason: reason.clone(),
            standing,
        });
        if let Some(conn) = self.members.conn_of(&worker) {
            self.drop_conn(now, conn);
            self.actions.push_back(Action::Close {
                conn,
                worker,
                why: CloseWhy::Auth,
                reason: format!("banned: {reason}"),
            });
        }
        if let State::InFlight(r) = &mut self.state {
            r.unanswer_worker(&worker, now);
        }
    }
}

/// Events other than results.
#[derive(Clone, Debug)]
pub enum Input {
    /// A worker completed the handshake on connection `conn`.
    Joined {
        /// The connection.
        conn: u64,
        /// Its identity.
        worker: WorkerId,
    },
    /// A connection ended.
    Left {
        /// The connection.
        conn: u64,
        /// Why.
        reason: String,
        /// Whether the worker broke the protocol.
        offence: bool,
    },
    /// A connection the core never admitted (it broke the protocol before it was ready,
    /// e.g. with a bad data request): its key gets a strike all the same.
    Offence {
        /// The connection.
        conn: u64,
        /// The key it presented.
        worker: WorkerId,
        /// What it did.
        reason: String,
    },
    /// A worker reported that it could not do its task.
    TaskFailed {
        /// The connection.
        conn: u64,
        /// The task.
        task_id: u64,
        /// Why (bounded by the driver).
        reason: String,
    },
    /// A spot check confirmed a result of `worker`.
    CheckPassed {
        /// The worker.
        worker: WorkerId,
    },
    /// A spot check caught `worker`.
    Caught {
        /// The worker.
        worker: WorkerId,
        /// Why.
        reason: String,
    },
    /// The operator banned `worker` (connected or not): as a caught cheat, its connection
    /// closes and its unverified contributions go.
    Ban {
        /// The worker.
        worker: WorkerId,
        /// Why, as the operator gave it.
        reason: String,
    },
    /// A spot check could not be completed: the result cannot stay in the model.
    CheckAbandoned {
        /// The worker.
        worker: WorkerId,
        /// The task.
        task_id: u64,
        /// The connection the question went to.
        conn: u64,
        /// Why.
        reason: String,
        /// Whether the worker is to blame.
        worker_fault: bool,
    },
}

/// A measured worker's speed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Speed {
    /// Milliseconds per sample.
    pub ms_per_sample: f64,
    /// A floor under its task times (`None`: none known).
    pub floor: Option<Floor>,
}

/// Which workers a round waits for, and how long it should take. `speeds[i]`: worker i's
/// measured speed (`None`: unmeasured); `samples`: the round's samples; `min_part`: the
/// samples of the smallest part (one per inner batch).
///
/// Unmeasured workers are all taken when nobody is measured (the run's start); otherwise
/// they go off the path (probes). Measured ones join fastest first while their part fits the
/// round's time with them, `with = samples / sum(1/ms)`: with `share = samples * (1/ms) /
/// sum(1/ms)` (at least `min_part`), `max(share * ms, floor under share) <= PACE_MARGIN *
/// with`. Shares then follow speed, so those taken finish together: synchronous SGD with backup workers dropped (Chen
/// et al., 2016, "Revisiting Distributed Synchronous SGD") decided before the round instead
/// of after it. Returns the indices taken, in input order, and the round's target time.
pub fn pace(
    speeds: &[Option<Speed>],
    samples: usize,
    min_part: usize,
) -> (Vec<usize>, Option<Duration>) {
    let mut measured: Vec<(f64, Option<Floor>, usize)> = speeds
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.map(|s| (s.ms_per_sample.max(1e-9), s.floor, i)))
        .collect();
    if measured.is_empty() {
        return ((0..speeds.len()).collect(), None);
    }
    measured.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.2.cmp(&b.2)));
    let (mut speed, mut chosen) = (0.0, Vec::new());
    for (ms, floor, i) in measured {
        let with = samples as f64 / (speed + 1.0 / ms);
        let share = ((samples as f64 / ms / (speed + 1.0 / ms)) as usize).max(min_part);
        let took = (share as f64 * ms).max(floor.map_or(0.0, |f| f.under(share)));
        if !chosen.is_empty() && took > PACE_MARGIN * with {
            continue;
        }
        speed += 1.0 / ms;
        chosen.push(i);
    }
    chosen.sort_unstable();
    let target = Duration::from_secs_f64(samples as f64 / speed / 1000.0);
    (chosen, Some(target))
}

/// The seed of part `part`'s tasks in round `round` (it drives stochastic rounding): a
/// function of the run's seed, the round and the part, never of the task id (random after a
/// restart), so that a restarted run draws the same bits as an uninterrupted one.
pub fn task_seed(run_seed: u64, round: u64, part: usize) -> u64 {
    let mut h = blake3::Hasher::new_derive_key("dtrain task seed v1");
    h.update(&run_seed.to_le_bytes());
    h.update(&round.to_le_bytes());
    h.update(&(part as u64).to_le_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.finalize().as_bytes()[..8]);
    u64::from_le_bytes(b)
}
