//! What the volunteer sees: the worker's state and counters, updated by the session and
//! read by the status line (`main.rs` draws it with indicatif on a terminal).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;

use trainer::runtime::human_bytes;

/// What the worker is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Reaching the coordinator (or waiting to try again).
    Connecting = 0,
    /// Fetching the run's data files.
    Downloading = 1,
    /// Computing a task.
    Training = 2,
    /// Joined, waiting for a task.
    Idle = 3,
    /// Leaving at the volunteer's request.
    Stopping = 4,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            1 => Phase::Downloading,
            2 => Phase::Training,
            3 => Phase::Idle,
            4 => Phase::Stopping,
            _ => Phase::Connecting,
        }
    }

    /// As the status line shows it.
    pub fn label(self) -> &'static str {
        match self {
            Phase::Connecting => "connecting",
            Phase::Downloading => "downloading data",
            Phase::Training => "training",
            Phase::Idle => "idle",
            Phase::Stopping => "stopping",
        }
    }
}

/// The worker's counters (this process's; the standing is the run's record).
#[derive(Debug, Default)]
pub struct Stats {
    phase: AtomicU8,
    tasks: AtomicU64,
    samples: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    /// Samples per second of the last task (f64 bits).
    rate: AtomicU64,
    standing: Mutex<proto::Standing>,
}

impl Stats {
    /// Sets what the worker is doing.
    pub fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::Relaxed);
    }

    /// What the worker is doing.
    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Relaxed))
    }

    /// A task answered: its samples and compute time (microseconds).
    pub fn task_done(&self, samples: u64, compute_us: u64) {
        self.tasks.fetch_add(1, Ordering::Relaxed);
        self.samples.fetch_add(samples, Ordering::Relaxed);
        if compute_us > 0 {
            let rate = samples as f64 / (compute_us as f64 * 1e-6);
            self.rate.store(rate.to_bits(), Ordering::Relaxed);
        }
    }

    /// Bytes sent to the coordinator.
    pub fn sent(&self, n: u64) {
        self.bytes_up.fetch_add(n, Ordering::Relaxed);
    }

    /// Bytes received from the coordinator (data files included).
    pub fn received(&self, n: u64) {
        self.bytes_down.fetch_add(n, Ordering::Relaxed);
    }

    /// The run's record of this worker, as its last task carried it.
    pub fn set_standing(&self, s: proto::Standing) {
        *self.standing.lock().unwrap_or_else(|e| e.into_inner()) = s;
    }

    /// Tasks answered by this process.
    pub fn tasks(&self) -> u64 {
        self.tasks.load(Ordering::Relaxed)
    }

    /// The status line: `training | 12 tasks | 812 samples/s | up 1.2 MB down 30.1 MB |
    /// checks passed 3 | accepted 40, strikes 0`.
    pub fn line(&self) -> String {
        let rate = f64::from_bits(self.rate.load(Ordering::Relaxed));
        let rate = if rate > 0.0 {
            format!("{rate:.0} samples/s")
        } else {
            "- samples/s".into()
        };
        let s = *self.standing.lock().unwrap_or_else(|e| e.into_inner());
        format!(
            "{} | {} tasks | {rate} | up {} down {} | checks passed {} | accepted {}, strikes {}",
            self.phase().label(),
            self.tasks(),
            human_bytes(self.bytes_up.load(Ordering::Relaxed)),
            human_bytes(self.bytes_down.load(Ordering::Relaxed)),
            s.checks_passed,
            s.tasks_accepted,
            s.strikes,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_shows_state_counters_and_standing() {
        let s = Stats::default();
        assert!(s.line().starts_with("connecting | 0 tasks | - samples/s"));
        s.set_phase(Phase::Training);
        s.task_done(64, 500_000);
        s.sent(1_500_000);
        s.received(2_000);
        s.set_standing(proto::Standing {
            tasks_accepted: 9,
            checks_passed: 2,
            strikes: 1,
        });
        assert_eq!(
            s.line(),
            "training | 1 tasks | 128 samples/s | up 1.5 MB down 2.0 kB | checks passed 2 | accepted 9, strikes 1"
        );
    }
}
