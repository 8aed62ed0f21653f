//! Who is connected, and what the run knows of each worker identity: its reputation,
//! strikes and ban, kept across reconnects and restarts.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use verify::Commitment;
use verify::{Reputation, WorkerId};

use crate::metrics::Traffic;
use crate::server::Outgoing;

/// Results of a worker kept for the spot checks of its later tasks (error-feedback bases).
const KEEP_ACCEPTED: usize = 8;

/// What the run knows of a worker identity (persisted in checkpoints and the log).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Standing {
    /// Tasks accepted, checks passed and failed, banned.
    pub rep: Reputation,
    /// Protocol offences and unanswered challenges.
    pub strikes: u32,
    /// Why it was banned.
    pub ban_reason: Option<String>,
}

/// A connected worker.
pub struct Conn {
    /// Its identity.
    pub id: WorkerId,
    /// Name and device, as it reported them.
    pub name: String,
    /// Whether its results are compared bitwise first (deterministic mode, its class the
    /// checks' class).
    pub bitwise: bool,
    /// Whether it computes in the checks' own compute class.
    pub same_class: bool,
    /// [`verify::ComputeClass::digest`] of its class, which its commitments must carry.
    pub class_digest: verify::Hash,
    /// The compute class it computes in.
    pub class: verify::ComputeClass,
    /// Where its messages go.
    pub tx: tokio::sync::mpsc::UnboundedSender<Outgoing>,
    /// Its traffic.
    pub traffic: Arc<Traffic>,
    /// The task it is working on.
    pub busy: Option<u64>,
    /// When it is given up on entirely if that task has not been answered.
    pub busy_until: Option<Instant>,
    /// Tasks it reported failed since its last valid result.
    pub failures: u32,
    /// Milliseconds per sample from sending a task to its answer (smoothed): deadlines.
    pub ms_per_sample: Option<f64>,
    /// Results accepted on this connection.
    pub tasks_ok: u64,
    /// The parameter version it holds (the one its last task used).
    pub held_version: Option<u64>,
}

/// A result kept after acceptance.
#[derive(Clone)]
pub struct Accepted {
    /// Its task.
    pub task_id: u64,
    /// What the worker committed to.
    pub commitment: Commitment,
    /// The update bytes.
    pub update: Arc<ByteBuf>,
}

/// Connections and standings.
#[derive(Default)]
pub struct Registry {
    /// Connected workers by connection number.
    pub conns: BTreeMap<u64, Conn>,
    standings: HashMap<WorkerId, Standing>,
    /// Banned identities, shared with the accept loop, which refuses them.
    pub banned: Arc<RwLock<HashSet<WorkerId>>>,
    accepted: HashMap<WorkerId, VecDeque<Accepted>>,
}

impl Registry {
    /// A registry with the standings recovered from disk.
    pub fn new(
        standings: Vec<(WorkerId, Standing)>,
        banned: Arc<RwLock<HashSet<WorkerId>>>,
    ) -> Self {
        let mut r = Registry {
            banned,
            ..Default::default()
        };
        for (w, s) in standings {
            if s.rep.banned {
                r.ban_set().insert(w);
            }
            r.standings.insert(w, s);
        }
        r
    }

    fn ban_set(&self) -> std::sync::RwLockWriteGuard<'_, HashSet<WorkerId>> {
        self.banned.write().unwrap_or_else(|e| e.into_inner())
    }

    /// A worker's standing (default for a new one).
    pub fn standing(&self, w: &WorkerId) -> Standing {
        self.standings.get(w).cloned().unwrap_or_default()
    }

    /// Changes a worker's standing and returns the new one.
    pub fn update(&mut self, w: WorkerId, f: impl FnOnce(&mut Standing)) -> Standing {
        let s = self.standings.entry(w).or_default();
        f(s);
        if s.rep.banned {
            let s = s.clone();
            self.ban_set().insert(w);
            return s;
        }
        s.clone()
    }

    /// Every standing (for checkpoints).
    pub fn standings(&self) -> Vec<(WorkerId, Standing)> {
        let mut v: Vec<_> = self
            .standings
            .iter()
            .map(|(w, s)| (*w, s.clone()))
            .collect();
        v.sort_by_key(|(w, _)| *w);
        v
    }

    /// Whether `w` is banned.
    pub fn is_banned(&self, w: &WorkerId) -> bool {
        self.standings.get(w).is_some_and(|s| s.rep.banned)
    }

    /// Connections of idle workers, in connection order.
    pub fn idle(&self) -> Vec<u64> {
        self.conns
            .iter()
            .filter(|(_, c)| c.busy.is_none())
            .map(|(&n, _)| n)
            .collect()
    }

    /// Connections of worker `w`.
    pub fn conns_of(&self, w: &WorkerId) -> Vec<u64> {
        self.conns
            .iter()
            .filter(|(_, c)| c.id == *w)
            .map(|(&n, _)| n)
            .collect()
    }

    /// Keeps an accepted result for later checks.
    pub fn accept(&mut self, w: WorkerId, a: Accepted) {
        let q = self.accepted.entry(w).or_default();
        q.push_back(a);
        while q.len() > KEEP_ACCEPTED {
            q.pop_front();
        }
    }

    /// An accepted result of `w`, if still kept.
    pub fn accepted(&self, w: &WorkerId, task_id: u64) -> Option<Accepted> {
        self.accepted
            .get(w)?
            .iter()
            .find(|a| a.task_id == task_id)
            .cloned()
    }
}
