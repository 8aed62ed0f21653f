//! The connected workers: who is idle (in key order), who is busy with which task, and how
//! fast each has been. Every operation is O(log N) in the number of connections.

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use verify::WorkerId;

/// A connected worker as the core sees it.
#[derive(Clone, Debug)]
pub struct Member {
    /// Its identity.
    pub worker: WorkerId,
    /// The task it is working on.
    pub busy: Option<u64>,
    /// When it is given up on entirely if that task has not been answered.
    pub busy_until: Option<Instant>,
    /// Tasks it reported failed since its last valid result.
    pub failures: u32,
    /// Milliseconds per sample from sending a task to its answer (smoothed, from every
    /// answer, late ones included): pace and deadlines. `None`: not measured yet.
    pub ms_per_sample: Option<f64>,
    /// A floor under its task times (see [`Floor`]). `None` when not measured yet.
    pub floor: Option<Floor>,
    /// When it was last measured.
    pub measured_at: Option<Instant>,
    /// When its current task was sent, its samples, and whether it is a probe.
    pub task_sent: Option<(Instant, usize, bool)>,
    /// Answers received on this connection (the first one, which carries one-time costs
    /// such as the full parameters and warm-up, does not measure the worker).
    pub answers: u64,
    /// Results accepted on this connection.
    pub tasks_ok: u64,
    /// When it joined.
    pub joined: Instant,
}

impl Member {
    /// Predicted milliseconds for a task of `n` samples: per-sample time times `n`, at
    /// least its floor where that applies; `None` when not measured yet.
    pub fn predict(&self, n: usize) -> Option<f64> {
        let ms = self.ms_per_sample?;
        Some((ms * n as f64).max(self.floor.map_or(0.0, |f| f.under(n))))
    }
}

/// A lower bound under a worker's task times (its fixed cost per task: latency, parameter
/// decoding, start-up of the step): the time of its quickest recent task, and from how many
/// samples on it applies. A task of its own share (on the critical path) bounds tasks of
/// every size, as a fixed cost does. A probe is a copy of another worker's part, sized for
/// that worker: task time grows with samples, so it bounds only tasks at least that large,
/// and a worker measured only on probes is not judged by a whole part's time for a smaller
/// share of its own.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Floor {
    /// Milliseconds.
    pub ms: f64,
    /// The smallest task, in samples, it bounds.
    pub samples: usize,
}

impl Floor {
    /// The floor under a task of `n` samples, ms: [`Floor::ms`] when `n >= samples`, else 0.
    pub fn under(&self, n: usize) -> f64 {
        if n >= self.samples {
            self.ms
        } else {
            0.0
        }
    }

    /// The floor after a task of `n` samples (`probe`: a copy of another's part; else a
    /// part of its own, which counts as 1 sample: it bounds every size) took `took` ms. A
    /// quicker task lowers it at once (applying from the smaller of the two sizes); a slower
    /// one of no more samples raises it a fifth of the way (one pause must not price a
    /// worker out) and applies from its size; a larger and slower task tells nothing new.
    pub fn after(floor: Option<Floor>, took: f64, n: usize, probe: bool) -> Floor {
        let n = if probe { n } else { 1 };
        match floor {
            Some(f) if took > f.ms && n > f.samples => f,
            Some(f) if took > f.ms => Floor {
                ms: f.ms + 0.2 * (took - f.ms),
                samples: n,
            },
            Some(f) => Floor {
                ms: took,
                samples: n.min(f.samples),
            },
            None => Floor {
                ms: took,
                samples: n,
            },
        }
    }
}

/// Connections, with an index of the idle ones sorted by worker key (parts go to workers in
/// key order, so that the same workers get the same parts however they reconnected).
#[derive(Default)]
pub struct Members {
    by_conn: HashMap<u64, Member>,
    by_worker: HashMap<WorkerId, u64>,
    idle: BTreeSet<(WorkerId, u64)>,
    /// Busy connections by the time they are given up on.
    hung: BTreeSet<(Instant, u64)>,
    /// The last measured speed of each identity (ms per sample, floor, when), so that a worker
    /// that reconnects keeps its place.
    speeds: HashMap<WorkerId, (f64, Floor, Instant)>,
    /// Connections that became idle or were measured since [`Members::take_fresh`].
    fresh: Vec<u64>,
}

impl Members {
    /// Connections.
    pub fn len(&self) -> usize {
        self.by_conn.len()
    }

    /// Whether nobody is connected.
    pub fn is_empty(&self) -> bool {
        self.by_conn.is_empty()
    }

    /// Idle connections.
    pub fn idle_len(&self) -> usize {
        self.idle.len()
    }

    /// A connection.
    pub fn get(&self, conn: u64) -> Option<&Member> {
        self.by_conn.get(&conn)
    }

    /// The connection of identity `w`.
    pub fn conn_of(&self, w: &WorkerId) -> Option<u64> {
        self.by_worker.get(w).copied()
    }

    /// Adds an idle connection (the caller removed any older one of the same identity).
    pub fn insert(&mut self, conn: u64, worker: WorkerId, now: Instant) {
        let known = self.speeds.get(&worker).copied();
        self.by_conn.insert(
            conn,
            Member {
                worker,
                busy: None,
                busy_until: None,
                failures: 0,
                ms_per_sample: known.map(|k| k.0),
                floor: known.map(|k| k.1),
                measured_at: known.map(|k| k.2),
                task_sent: None,
                answers: 0,
                tasks_ok: 0,
                joined: now,
            },
        );
        self.by_worker.insert(worker, conn);
        self.idle.insert((worker, conn));
        self.fresh.push(conn);
    }

    /// Removes a connection.
    pub fn remove(&mut self, conn: u64) -> Option<Member> {
        let m = self.by_conn.remove(&conn)?;
        if self.by_worker.get(&m.worker) == Some(&conn) {
            self.by_worker.remove(&m.worker);
        }
        self.idle.remove(&(m.worker, conn));
        if let Some(t) = m.busy_until {
            self.hung.remove(&(t, conn));
        }
        Some(m)
    }

    /// Marks `conn` busy with `task` of `samples` samples sent at `now`, to be given up on
    /// at `until`.
    pub fn set_busy(
        &mut self,
        conn: u64,
        task: u64,
        sent: (usize, bool),
        now: Instant,
        until: Instant,
    ) {
        let (samples, probe) = sent;
        if let Some(m) = self.by_conn.get_mut(&conn) {
            m.task_sent = Some((now, samples, probe));
            if let Some(t) = m.busy_until.replace(until) {
                self.hung.remove(&(t, conn));
            }
            m.busy = Some(task);
            self.idle.remove(&(m.worker, conn));
            self.hung.insert((until, conn));
        }
    }

    /// Marks `conn` idle; returns the task it was busy with.
    pub fn set_idle(&mut self, conn: u64) -> Option<u64> {
        let m = self.by_conn.get_mut(&conn)?;
        m.task_sent = None;
        self.idle.insert((m.worker, conn));
        self.fresh.push(conn);
        if let Some(t) = m.busy_until.take() {
            self.hung.remove(&(t, conn));
        }
        m.busy.take()
    }

    /// Takes the time `conn` needed for its current task, answered at `now`, into its
    /// speed and its floor (the time of its quickest recent task). A connection's first
    /// answer does not count (one-time costs), unless the identity was measured before.
    pub fn measure(&mut self, conn: u64, now: Instant) {
        let Some(m) = self.by_conn.get_mut(&conn) else {
            return;
        };
        m.answers += 1;
        if m.answers == 1 && m.ms_per_sample.is_none() {
            return;
        }
        if let Some((sent, n, probe)) = m.task_sent {
            let took = now.saturating_duration_since(sent).as_secs_f64() * 1000.0;
            let per = took / n.max(1) as f64;
            // Noise mostly adds time: a faster measurement moves the estimate half way, a
            // slower one by at most 30% (clipped to twice it), so that one pause on either
            // side does not take a fast worker off the path.
            let ms = m.ms_per_sample.map_or(per, |o| {
                if per < o {
                    0.5 * o + 0.5 * per
                } else {
                    0.7 * o + 0.3 * per.min(2.0 * o)
                }
            });
            let floor = Floor::after(m.floor, took, n, probe);
            m.ms_per_sample = Some(ms);
            m.floor = Some(floor);
            m.measured_at = Some(now);
            self.fresh.push(conn);
            self.speeds.insert(m.worker, (ms, floor, now));
        }
    }

    /// The connections that became idle or were measured since the last call, idle ones
    /// only, in worker-key order (those are the only ones whose fitness for a part can have
    /// changed).
    pub fn take_fresh(&mut self) -> Vec<(WorkerId, u64)> {
        let mut fresh: Vec<(WorkerId, u64)> = std::mem::take(&mut self.fresh)
            .into_iter()
            .filter_map(|c| {
                let m = self.by_conn.get(&c)?;
                self.idle.contains(&(m.worker, c)).then_some((m.worker, c))
            })
            .collect();
        fresh.sort_unstable();
        fresh.dedup();
        fresh
    }

    /// Forgets which connections are fresh.
    pub fn clear_fresh(&mut self) {
        self.fresh.clear();
    }

    /// Drops a deadline entry whose connection is gone.
    pub fn forget_hung(&mut self, t: Instant, conn: u64) {
        self.hung.remove(&(t, conn));
    }

    /// The busy connection given up on first, and when.
    pub fn first_hung(&self) -> Option<(Instant, u64)> {
        self.hung.first().copied()
    }

    /// Changes a connection's record (not its busy state).
    pub fn update<R>(&mut self, conn: u64, f: impl FnOnce(&mut Member) -> R) -> Option<R> {
        self.by_conn.get_mut(&conn).map(f)
    }

    /// Idle connections in worker-key order, with their identity.
    pub fn idle(&self) -> impl Iterator<Item = (WorkerId, u64)> + '_ {
        self.idle.iter().copied()
    }

    /// Every connection (unordered).
    pub fn iter(&self) -> impl Iterator<Item = (u64, &Member)> {
        self.by_conn.iter().map(|(c, m)| (*c, m))
    }
}
