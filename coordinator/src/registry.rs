//! The driver's side of each connection (where its messages go, its compute class, the
//! parameter version it holds) and the accepted results kept for later spot checks. Who is
//! busy, parts and standings live in the round core ([`rounds`]).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use serde_bytes::ByteBuf;
use verify::{Commitment, WorkerId};

use crate::metrics::Traffic;
use crate::server::Outgoing;

pub use rounds::Standing;

/// Results of a worker kept for the spot checks of its later tasks (error-feedback bases).
const KEEP_ACCEPTED: usize = 8;

/// A connected worker, as the driver needs it.
pub struct Link {
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
    /// The parameter version it holds (the one its last task used).
    pub held_version: Option<u64>,
    /// Its current task and the error-feedback base that task was given.
    pub task: Option<(u64, u64)>,
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

/// Links by connection, and kept results by identity.
#[derive(Default)]
pub struct Links {
    /// Connected workers by connection number.
    pub conns: HashMap<u64, Link>,
    accepted: HashMap<WorkerId, VecDeque<Accepted>>,
}

impl Links {
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

    /// Forgets the kept results of `w` (banned).
    pub fn forget(&mut self, w: &WorkerId) {
        self.accepted.remove(w);
    }
}
