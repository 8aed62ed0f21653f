//! The ledger: the training state, the rounds that advanced it, and how both are kept.
//!
//! * Every round is appended to a write-ahead log (`wal.bin`, synced) before it is reported,
//!   so a `kill -9` loses no reported round: a restart loads `checkpoint.bin` and replays the
//!   log. [`Ledger::commit`] applies a round at once and [`Ledger::flush`] logs it, so that
//!   the driver can send the new parameters out first and write the log while the workers
//!   compute (a crash in between loses that round, which the restart redoes). A checkpoint
//!   is written whenever the log outgrows `ledger.wal_max_bytes` (and after evaluations and
//!   rollbacks), and the log starts over.
//! * In memory, snapshots every `ledger.snapshot_every` rounds and the records since the
//!   oldest one (within `ledger.rollback_window` rounds and `ledger.history_max_bytes`) let a
//!   rollback remove contributions (a caught cheater's) and replay the rest.

pub mod round;
pub mod wal;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tracing::info;
use verify::WorkerId;

pub use round::{apply, Applied, Contribution, RoundRecord, Rules, TrainState};
use wal::Wal;

use crate::config::LedgerSection;
use crate::registry::Standing;
use crate::state::atomic_write;

/// Run-level counters saved with the state.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Meta {
    /// Application bytes received so far.
    pub bytes_in: u64,
    /// Application bytes sent so far.
    pub bytes_out: u64,
    /// Wall seconds of the run so far.
    pub wall_s: f64,
    /// Distinct workers seen.
    pub workers_seen: u64,
    /// Next task id (task ids stay unique across restarts).
    pub next_task: u64,
    /// Global batches the committed rounds covered (rounds cover more than H when they
    /// grow with the workers present).
    pub batches_done: u64,
}

/// An entry of the write-ahead log.
#[derive(Debug, Serialize, Deserialize)]
enum Entry {
    /// A round was applied.
    Round {
        /// Its contributions.
        record: RoundRecord,
        /// Counters after it.
        meta: Meta,
    },
    /// A spot check confirmed a contribution.
    Verified {
        /// Its task.
        task_id: u64,
    },
    /// A contribution is to be removed (its check could not be completed).
    Dropped {
        /// Its task.
        task_id: u64,
    },
    /// A worker's standing changed.
    Standing {
        /// The worker.
        worker: WorkerId,
        /// Its new standing.
        standing: Standing,
    },
}

/// `checkpoint.bin`: the state, the counters and the standings, blake3-checked.
#[derive(Serialize, Deserialize)]
struct Checkpoint {
    version: u32,
    run_id: [u8; 32],
    state: TrainState,
    meta: Meta,
    standings: Vec<(WorkerId, Standing)>,
}

/// 3: the state holds the workers' error-feedback bases. 4: the counters hold the global
/// batches done.
const CHECKPOINT_VERSION: u32 = 4;

/// Path of the checkpoint in an output directory.
pub fn checkpoint_path(dir: &Path) -> PathBuf {
    dir.join("checkpoint.bin")
}

fn wal_path(dir: &Path) -> PathBuf {
    dir.join("wal.bin")
}

impl Checkpoint {
    fn save(&self, dir: &Path) -> Result<()> {
        let mut body = bincode::serialize(self)?;
        let sum = blake3::hash(&body);
        body.extend_from_slice(sum.as_bytes());
        atomic_write(&checkpoint_path(dir), &body)
    }

    fn load(dir: &Path, run_id: &[u8; 32], n_params: usize) -> Result<Option<Self>> {
        let path = checkpoint_path(dir);
        if !path.exists() {
            return Ok(None);
        }
        let bytes = std::fs::read(&path)?;
        if bytes.len() < 32 {
            bail!("{} is truncated", path.display());
        }
        let (body, sum) = bytes.split_at(bytes.len() - 32);
        if blake3::hash(body).as_bytes() != sum {
            bail!("{} fails its checksum", path.display());
        }
        let ck: Checkpoint = bincode::deserialize(body)?;
        if ck.version != CHECKPOINT_VERSION {
            bail!(
                "{}: unsupported checkpoint version {}",
                path.display(),
                ck.version
            );
        }
        if &ck.run_id != run_id {
            bail!("{} belongs to another run", path.display());
        }
        if ck.state.params.len() != n_params {
            bail!(
                "{}: {} parameters, the model has {n_params}",
                path.display(),
                ck.state.params.len()
            );
        }
        Ok(Some(ck))
    }
}

/// What a rollback did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rollback {
    /// The round the state was rolled back to.
    pub from_round: u64,
    /// Rounds replayed after it.
    pub replayed: u64,
    /// Contributions removed.
    pub removed: u64,
}

/// What opening found on disk.
pub struct Recovered {
    /// Counters of the last round recovered (None for a fresh run).
    pub meta: Option<Meta>,
    /// Worker standings, the latest of each.
    pub standings: Vec<(WorkerId, Standing)>,
    /// Contributions marked for removal whose rollback may not have happened yet.
    pub dropped: Vec<u64>,
    /// Rounds replayed from the log.
    pub replayed: u64,
}

/// The state with its log, checkpoints and in-memory history.
pub struct Ledger {
    dir: PathBuf,
    run_id: [u8; 32],
    /// The current state.
    pub state: TrainState,
    rules: Rules,
    cfg: LedgerSection,
    snapshots: VecDeque<TrainState>,
    records: VecDeque<RoundRecord>,
    history_bytes: u64,
    wal: Wal,
    /// The last round, applied but not logged yet (see [`Ledger::flush`]).
    unlogged: Option<Entry>,
}

impl Ledger {
    /// Opens the ledger of `dir`: resumes from its checkpoint and log when `resume` (and
    /// they exist), else starts from `fresh` with an empty log.
    pub fn open(
        dir: &Path,
        run_id: [u8; 32],
        fresh: TrainState,
        resume: bool,
        rules: Rules,
        cfg: LedgerSection,
    ) -> Result<(Self, Recovered)> {
        let n = fresh.params.len();
        let ck = if resume {
            Checkpoint::load(dir, &run_id, n)?
        } else {
            None
        };
        if !resume {
            // Starting over: nothing of an earlier run in this folder may come back later.
            let _ = std::fs::remove_file(wal_path(dir));
            let _ = std::fs::remove_file(checkpoint_path(dir));
        }
        let (wal, entries) = Wal::open::<Entry>(&wal_path(dir))?;
        let (state, mut meta, mut standings) = match ck {
            Some(ck) => (ck.state, Some(ck.meta), ck.standings),
            None => (fresh, None, Vec::new()),
        };
        let mut ledger = Ledger {
            dir: dir.to_path_buf(),
            run_id,
            snapshots: VecDeque::from([state.clone()]),
            state,
            rules,
            cfg,
            records: VecDeque::new(),
            history_bytes: 0,
            wal,
            unlogged: None,
        };
        let mut replayed = 0;
        let mut dropped = Vec::new();
        for e in entries {
            match e {
                // Entries from before the checkpoint (a crash between writing it and
                // clearing the log) are already in the state.
                Entry::Round { record, .. } if record.round < ledger.state.round => {}
                Entry::Round { record, meta: m } => {
                    ledger.apply_and_keep(record)?;
                    meta = Some(m);
                    replayed += 1;
                }
                Entry::Verified { task_id } => ledger.set_verified(task_id),
                Entry::Dropped { task_id } => dropped.push(task_id),
                Entry::Standing { worker, standing } => {
                    standings.retain(|(w, _)| *w != worker);
                    standings.push((worker, standing));
                }
            }
        }
        if replayed > 0 {
            info!(
                replayed,
                round = ledger.state.round,
                "replayed the write-ahead log"
            );
        }
        Ok((
            ledger,
            Recovered {
                meta,
                standings,
                replayed,
                dropped,
            },
        ))
    }

    /// Applies the next round and returns what it did; the round is logged by the next
    /// [`Ledger::flush`] (or by anything else this ledger writes first). Nothing about the
    /// round may be reported before then; its parameters may be sent out. An error (the
    /// record does not apply: it was validated when accepted, so this is a bug or a corrupt
    /// history) leaves the state unusable: the caller stops, and a restart replays the log.
    ///
    /// `decoded[i]`, where given, is contribution `i`'s update as `compression::decode_exact`
    /// gives it from its bytes (decoded when it was validated); the others are decoded here.
    pub fn commit(
        &mut self,
        record: RoundRecord,
        decoded: Vec<Option<Vec<f32>>>,
        meta: &Meta,
    ) -> Result<Applied> {
        self.flush()?;
        let applied = round::apply_decoded(&mut self.state, &record, decoded, &self.rules)?;
        // Cheap: the updates are reference-counted.
        self.unlogged = Some(Entry::Round {
            record: record.clone(),
            meta: meta.clone(),
        });
        self.keep(record);
        Ok(applied)
    }

    /// Appends the round [`Ledger::commit`] applied last to the log and syncs it, if that is
    /// not done yet.
    pub fn flush(&mut self) -> Result<()> {
        match self.unlogged.take() {
            Some(e) => self.wal.append(&e),
            None => Ok(()),
        }
    }

    fn apply_and_keep(&mut self, record: RoundRecord) -> Result<Applied> {
        let applied = apply(&mut self.state, &record, &self.rules)?;
        self.keep(record);
        Ok(applied)
    }

    /// Adds an applied record to the history, snapshots, and prunes.
    fn keep(&mut self, record: RoundRecord) {
        self.history_bytes += record.update_bytes();
        self.records.push_back(record);
        if self.state.round.is_multiple_of(self.cfg.snapshot_every) {
            self.history_bytes += self.state.mem_bytes();
            self.snapshots.push_back(self.state.clone());
        }
        while self.snapshots.len() > 1
            && (self.state.round - self.snapshots[1].round > self.cfg.rollback_window
                || self.history_bytes > self.cfg.history_max_bytes)
        {
            if let Some(old) = self.snapshots.pop_front() {
                self.history_bytes -= old.mem_bytes();
            }
            let keep_from = self.snapshots[0].round;
            while self.records.front().is_some_and(|r| r.round < keep_from) {
                if let Some(r) = self.records.pop_front() {
                    self.history_bytes -= r.update_bytes();
                }
            }
        }
    }

    /// Whether the contribution of `task_id` is in the history and confirmed.
    pub fn is_verified(&self, task_id: u64) -> bool {
        self.records
            .iter()
            .rev()
            .flat_map(|r| &r.contributions)
            .any(|c| c.task_id == task_id && c.verified)
    }

    fn set_verified(&mut self, task_id: u64) {
        for r in self.records.iter_mut().rev() {
            if let Some(c) = r.contributions.iter_mut().find(|c| c.task_id == task_id) {
                c.verified = true;
                return;
            }
        }
    }

    /// Records that a spot check confirmed the contribution of `task_id`.
    pub fn mark_verified(&mut self, task_id: u64) -> Result<()> {
        self.flush()?;
        self.set_verified(task_id);
        self.wal.append(&Entry::Verified { task_id })
    }

    /// Logs that the contribution of `task_id` is to be removed (so a restart before the
    /// rollback still removes it).
    pub fn mark_dropped(&mut self, task_id: u64) -> Result<()> {
        self.flush()?;
        self.wal.append(&Entry::Dropped { task_id })
    }

    /// Logs a worker's new standing.
    pub fn log_standing(&mut self, worker: WorkerId, standing: &Standing) -> Result<()> {
        self.flush()?;
        self.wal.append(&Entry::Standing {
            worker,
            standing: standing.clone(),
        })
    }

    /// Bytes in the write-ahead log.
    pub fn wal_bytes(&self) -> u64 {
        self.wal.len()
    }

    /// The first round still in the history (how far a rollback can reach).
    #[cfg(test)]
    pub fn history_start(&self) -> u64 {
        self.snapshots.front().map_or(self.state.round, |s| s.round)
    }

    /// Whether any contribution in the history matches `pred`.
    #[cfg(test)]
    pub fn holds(&self, pred: impl Fn(&Contribution) -> bool) -> bool {
        self.records
            .iter()
            .any(|r| r.contributions.iter().any(&pred))
    }

    /// Removes every contribution in the history that matches `pred`: rolls the state back to
    /// the last snapshot before the first of them and replays the rest. Returns None when
    /// none matches. Write a checkpoint afterwards, so that a restart does not bring them
    /// back from the log.
    pub fn remove(&mut self, pred: impl Fn(&Contribution) -> bool) -> Result<Option<Rollback>> {
        // The log keeps the rounds as they were applied; the checkpoint after a rollback
        // makes them redundant.
        self.flush()?;
        let Some(first) = self
            .records
            .iter()
            .find(|r| r.contributions.iter().any(&pred))
            .map(|r| r.round)
        else {
            return Ok(None);
        };
        let keep = self
            .snapshots
            .iter()
            .rposition(|s| s.round <= first)
            .unwrap_or(0);
        self.snapshots.truncate(keep + 1);
        let start = self.snapshots[keep].round;
        let mut removed = 0u64;
        let mut state = self.snapshots[keep].clone();
        let mut replayed = 0u64;
        for r in self.records.iter_mut().filter(|r| r.round >= start) {
            let before = r.contributions.len();
            r.contributions.retain(|c| !pred(c));
            removed += (before - r.contributions.len()) as u64;
            apply(&mut state, r, &self.rules)?;
            replayed += 1;
            if state.round.is_multiple_of(self.cfg.snapshot_every) {
                self.snapshots.push_back(state.clone());
            }
        }
        self.state = state;
        self.history_bytes = self
            .records
            .iter()
            .map(RoundRecord::update_bytes)
            .sum::<u64>()
            + self
                .snapshots
                .iter()
                .map(TrainState::mem_bytes)
                .sum::<u64>();
        Ok(Some(Rollback {
            from_round: start,
            replayed,
            removed,
        }))
    }

    /// Writes a checkpoint of the current state (which holds a round not logged yet) and
    /// empties the log.
    pub fn checkpoint(&mut self, meta: &Meta, standings: Vec<(WorkerId, Standing)>) -> Result<()> {
        self.unlogged = None;
        Checkpoint {
            version: CHECKPOINT_VERSION,
            run_id: self.run_id,
            state: self.state.clone(),
            meta: meta.clone(),
            standings,
        }
        .save(&self.dir)?;
        self.wal.clear()
    }
}

#[cfg(test)]
mod tests;
