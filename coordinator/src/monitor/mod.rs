//! The status server (`[monitor] listen`): a dashboard that refreshes itself, the run's
//! state as JSON (`/api/status`, `/api/workers`, `/api/history`), Prometheus metrics
//! (`/metrics`), and the operator's actions (pause, resume, stop, ban) behind the bearer
//! token of the run's `identity.json`.
//!
//! The scheduler publishes a [`Snapshot`] (at most twice a second, and when the run's state
//! changes);
//! requests only read the latest one, so a page left open for hours costs nothing that
//! grows. Operator actions reach the scheduler as [`Command`]s on its event channel.

pub mod http;
pub mod prom;
pub mod report;
pub mod status;

use std::sync::{Arc, Mutex, RwLock};

use verify::WorkerId;

pub use status::{History, RunState, Status, WorkerRow};

/// What the operator asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Open no new round after the one in flight.
    Pause,
    /// Open rounds again.
    Resume,
    /// Save a checkpoint and stop (the run resumes from its output dir).
    Stop,
    /// Ban a key: its connection is closed, its unverified contributions are rolled back, it
    /// is refused from now on.
    Ban {
        /// The key.
        worker: WorkerId,
        /// Why, as the operator wrote it (at most 200 characters kept).
        reason: String,
    },
}

/// What the pages and the API show.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The summary.
    pub status: Status,
    /// Connected workers.
    pub workers: Vec<WorkerRow>,
    /// Curves.
    pub history: History,
}

/// Hands a command to the scheduler; false once the scheduler is gone.
pub type CommandSink = Box<dyn Fn(Command) -> bool + Send + Sync>;

/// State shared by the scheduler (which writes) and the HTTP handlers (which read).
pub struct Monitor {
    snapshot: RwLock<Arc<Snapshot>>,
    prom: Mutex<prom::Prom>,
    /// BLAKE3 of the operator token (compared in constant time as `blake3::Hash`).
    token: blake3::Hash,
    commands: CommandSink,
}

impl Monitor {
    /// A monitor whose actions need `token` and go to `commands`.
    pub fn new(token: &[u8; 32], commands: CommandSink) -> Arc<Self> {
        Arc::new(Monitor {
            snapshot: RwLock::default(),
            prom: Mutex::default(),
            token: blake3::hash(hex::encode(token).as_bytes()),
            commands,
        })
    }

    /// Replaces what is shown.
    pub fn publish(&self, snapshot: Snapshot) {
        self.prom
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .update(&snapshot.status);
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(snapshot);
    }

    /// Records the wall time of a committed round (the histogram of `/metrics`).
    pub fn round_time(&self, seconds: f64) {
        self.prom
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .round_time(seconds);
    }

    /// The latest snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// `/metrics`.
    fn metrics_text(&self) -> String {
        self.prom.lock().unwrap_or_else(|e| e.into_inner()).encode()
    }

    /// Whether `presented` (the text after `Bearer `) is the operator token.
    fn authorized(&self, presented: &str) -> bool {
        blake3::hash(presented.trim().as_bytes()) == self.token
    }

    /// Hands `c` to the scheduler.
    fn command(&self, c: Command) -> bool {
        (self.commands)(c)
    }
}
