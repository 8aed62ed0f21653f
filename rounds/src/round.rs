//! A round in flight: its parts, the attempts at each, and their deadlines.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use verify::WorkerId;

use crate::split::Slice;

/// One try at a part, by one connection.
#[derive(Clone, Debug)]
pub struct Attempt {
    /// The task sent.
    pub task_id: u64,
    /// To whom.
    pub conn: u64,
    /// When.
    pub started: Instant,
    /// When it is given up on (the part goes elsewhere; the attempt may still answer).
    pub deadline: Instant,
    /// Whether an answer can still come.
    pub live: bool,
    /// Milliseconds the worker computed, once it answered validly.
    pub compute_ms: Option<f64>,
    /// A redundant copy for a worker not on the critical path (a new worker's probe, or a
    /// slow worker's re-measurement): the round never waits for it, but its valid answer
    /// counts if it comes first.
    pub probe: bool,
}

/// An accepted result of a part.
#[derive(Clone, Debug)]
pub struct Answer<P> {
    /// The worker that computed it.
    pub worker: WorkerId,
    /// Its task.
    pub task_id: u64,
    /// The result, as the driver keeps it.
    pub result: P,
}

/// A slice of a round's samples and what became of it.
pub struct Part<P> {
    /// The samples.
    pub slice: Slice,
    /// The seed of its tasks (stochastic rounding), see [`crate::task_seed`].
    pub seed: u64,
    /// The accepted answer.
    pub done: Option<Answer<P>>,
    /// Tries so far.
    pub attempts: Vec<Attempt>,
}

/// The parts of one round and indexes over them: attempts by task id, deadlines in a heap,
/// the parts that need a worker.
pub struct Round<P> {
    /// The round's number (the ledger's round it commits).
    pub number: u64,
    /// Global batches it covers.
    pub batches: u64,
    /// When its parts were first sent.
    pub started: Instant,
    /// Its parts, in part order.
    pub parts: Vec<Part<P>>,
    by_task: HashMap<u64, (usize, usize)>,
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    needy: BTreeSet<usize>,
    /// Bumped by every change to the needy parts or their attempts (what
    /// [`crate::Core`]'s dispatch depends on besides the idle workers).
    pub(crate) version: u64,
    open: usize,
    /// Live attempts that are not probes.
    live_primary: usize,
    /// The time the round should take (from the measured speeds of the workers it was given
    /// to); `None` when none was measured.
    pub target: Option<std::time::Duration>,
    /// After this grace, added to [`BACKUP_FACTOR`] times the first answer's time, parts
    /// still unanswered go to faster workers.
    grace: Duration,
    /// When the parts still unanswered go to faster workers (set by the first answer).
    backup_at: Option<Instant>,
    /// When the first answer came (attempts sent later are not cut by the backup).
    first_answer: Option<Instant>,
    backup_fired: bool,
    /// Where the search for a part to copy continues.
    copy_cursor: usize,
}

/// Probe copies of one part at most (newcomers' first tasks in a round nobody was measured
/// for).
const MAX_COPIES: usize = 2;

/// Unanswered parts go to workers that finished once this many times as long as the round's
/// first answer took (from its task's sending) has passed since it came, plus the grace: backup workers for stragglers nobody
/// predicted (a new or suddenly slow worker), after MapReduce's backup tasks (Dean and
/// Ghemawat, 2004).
pub const BACKUP_FACTOR: u32 = 4;

impl<P> Round<P> {
    /// A round of `slices`, none sent yet (all need a worker).
    pub fn new(
        number: u64,
        batches: u64,
        started: Instant,
        slices: Vec<(Slice, u64)>,
        grace: Duration,
    ) -> Self {
        let parts: Vec<Part<P>> = slices
            .into_iter()
            .map(|(slice, seed)| Part {
                slice,
                seed,
                done: None,
                attempts: Vec::new(),
            })
            .collect();
        Round {
            number,
            batches,
            started,
            open: parts.len(),
            needy: (0..parts.len()).collect(),
            version: 0,
            parts,
            by_task: HashMap::new(),
            deadlines: BinaryHeap::new(),
            live_primary: 0,
            target: None,
            grace,
            backup_at: None,
            first_answer: None,
            backup_fired: false,
            copy_cursor: 0,
        }
    }

    /// Whether every part still open needs a worker: no attempt on the critical path is
    /// within its deadline, so no worker on the path is about to become free for them.
    pub fn stalled(&self) -> bool {
        self.needy.len() == self.open
    }

    /// Whether every part has an answer.
    pub fn complete(&self) -> bool {
        self.open == 0
    }

    /// Parts that need a worker, in part order.
    pub fn needy(&self) -> Vec<usize> {
        self.needy.iter().copied().collect()
    }

    /// Whether any part needs a worker.
    pub fn has_needy(&self) -> bool {
        !self.needy.is_empty()
    }

    /// The earliest time something may be due: an attempt's deadline (possibly one already
    /// answered or retired, then nothing happens) or the backup time.
    pub fn next_deadline(&self) -> Option<Instant> {
        let heap = self.deadlines.peek().map(|Reverse((t, _))| *t);
        [heap, self.backup_at].into_iter().flatten().min()
    }

    /// Where task `task_id` sits: (part, attempt).
    pub fn locate(&self, task_id: u64) -> Option<(usize, usize)> {
        self.by_task.get(&task_id).copied()
    }

    /// How often `conn` tried part `part`, and whether one of its tries is live.
    pub fn tries(&self, part: usize, conn: u64) -> (usize, bool) {
        let a = &self.parts[part].attempts;
        let mine = a.iter().filter(|a| a.conn == conn);
        (mine.clone().count(), mine.clone().any(|a| a.live))
    }

    /// Whether any attempt other than a probe can still answer.
    pub fn has_live_primary(&self) -> bool {
        self.live_primary > 0
    }

    /// An unanswered part with fewer than [`MAX_COPIES`] probe copies, round robin.
    pub fn part_to_copy(&mut self) -> Option<usize> {
        let n = self.parts.len();
        for _ in 0..n {
            let p = self.copy_cursor % n;
            self.copy_cursor += 1;
            let part = &self.parts[p];
            if part.done.is_none() && part.attempts.iter().filter(|a| a.probe).count() < MAX_COPIES
            {
                return Some(p);
            }
        }
        None
    }

    /// Records an attempt.
    pub fn add_attempt(&mut self, part: usize, attempt: Attempt) {
        self.by_task
            .insert(attempt.task_id, (part, self.parts[part].attempts.len()));
        if !attempt.probe {
            self.deadlines
                .push(Reverse((attempt.deadline, attempt.task_id)));
            self.live_primary += 1;
            self.needy.remove(&part);
        }
        self.parts[part].attempts.push(attempt);
        self.version += 1;
    }

    fn refresh(&mut self, part: usize, now: Instant) {
        self.version += 1;
        let p = &self.parts[part];
        let covered = p.done.is_some()
            || p.attempts
                .iter()
                .any(|a| a.live && !a.probe && a.deadline > now);
        if covered {
            self.needy.remove(&part);
        } else {
            self.needy.insert(part);
        }
    }

    /// Marks task `task_id` as unable to answer (its worker left, failed or was banned, or
    /// it was answered).
    pub fn retire(&mut self, task_id: u64, now: Instant) {
        if let Some((p, a)) = self.locate(task_id) {
            let at = &mut self.parts[p].attempts[a];
            if at.live && !at.probe {
                self.live_primary -= 1;
            }
            at.live = false;
            self.refresh(p, now);
        }
    }

    /// Moves the parts whose attempts ran out of time to the needy set; returns how many
    /// deadlines passed.
    pub fn expire(&mut self, now: Instant) -> usize {
        let mut n = 0;
        if self.backup_at.is_some_and(|t| t <= now) {
            self.backup_at = None;
            self.backup_fired = true;
            let open: Vec<usize> = (0..self.parts.len())
                .filter(|&p| self.parts[p].done.is_none())
                .collect();
            let before = self.first_answer.unwrap_or(now);
            for p in open {
                for a in self.parts[p].attempts.iter_mut() {
                    if a.started <= before {
                        a.deadline = a.deadline.min(now);
                    }
                }
                self.refresh(p, now);
                n += 1;
            }
        }
        while let Some(Reverse((t, task))) = self.deadlines.peek().copied() {
            if t > now {
                break;
            }
            self.deadlines.pop();
            n += 1;
            if let Some((p, _)) = self.locate(task) {
                self.refresh(p, now);
            }
        }
        n
    }

    /// Accepts an answer for part `part` unless it has one, `took` after its task was sent;
    /// true when taken. The round's first answer sets when the parts still open go to
    /// workers that finished ([`BACKUP_FACTOR`] times `took`, plus the grace).
    pub fn answer(&mut self, part: usize, answer: Answer<P>, now: Instant, took: Duration) -> bool {
        if self.parts[part].done.is_some() {
            return false;
        }
        self.parts[part].done = Some(answer);
        self.open -= 1;
        if self.backup_at.is_none() && !self.backup_fired && self.open > 0 {
            self.backup_at = Some(now + took * BACKUP_FACTOR + self.grace);
            self.first_answer = Some(now);
        }
        self.refresh(part, now);
        true
    }

    /// Removes the answer of task `task_id` (its check could not be completed, or its worker
    /// was banned): the part needs a worker again. True when there was one.
    pub fn unanswer(&mut self, task_id: u64, now: Instant) -> bool {
        let Some(part) = self
            .parts
            .iter()
            .position(|p| p.done.as_ref().is_some_and(|d| d.task_id == task_id))
        else {
            return false;
        };
        self.parts[part].done = None;
        self.open += 1;
        self.refresh(part, now);
        true
    }

    /// Removes every answer of worker `w`; returns their task ids.
    pub fn unanswer_worker(&mut self, w: &WorkerId, now: Instant) -> Vec<u64> {
        let tasks: Vec<u64> = self
            .parts
            .iter()
            .filter_map(|p| {
                p.done
                    .as_ref()
                    .filter(|d| d.worker == *w)
                    .map(|d| d.task_id)
            })
            .collect();
        for &t in &tasks {
            self.unanswer(t, now);
        }
        tasks
    }
}
