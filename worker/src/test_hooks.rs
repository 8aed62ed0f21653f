//! TEST ONLY, compiled only with the cargo feature `test-hooks` (which `make test` and the
//! `experiments` crate turn on, and the binaries `make build` ships leave off): ways to make
//! a worker misbehave on purpose, so that tests and experiments can check that the
//! coordinator copes. None of this exists in a volunteer's worker.

use std::time::Instant;

use proto::TaskResult;

use crate::{adversary, hostile};

/// The misbehaviours a test asked for (the default: none).
#[derive(Clone, Debug)]
pub struct TestHooks {
    /// Announce this protocol version instead of [`proto::PROTOCOL_VERSION`].
    pub protocol_version: Option<u32>,
    /// Exit abruptly (status 137, like `kill -9`, no goodbye) on receiving this many tasks.
    pub crash_at_task: Option<u64>,
    /// Cheat with this mode on this fraction of the tasks.
    pub adversary: Option<(adversary::Mode, f64)>,
    /// Break the protocol in this way.
    pub hostile: Option<hostile::Hostile>,
    /// Take this many times as long per task (a straggler): after computing, sleep
    /// `(slowdown - 1) x` the compute time, and report the stretched time.
    pub slowdown: f64,
}

impl Default for TestHooks {
    fn default() -> Self {
        TestHooks {
            protocol_version: None,
            crash_at_task: None,
            adversary: None,
            hostile: None,
            slowdown: 1.0,
        }
    }
}

impl TestHooks {
    /// Whether the worker misbehaves on purpose (cheats or breaks the protocol).
    pub fn adversarial(&self) -> bool {
        self.adversary.is_some() || self.hostile.is_some()
    }

    /// Exits the process, as if killed, when `tasks_seen` is the task to crash at.
    pub fn crash_if_due(&self, tasks_seen: u64) {
        if self.crash_at_task == Some(tasks_seen) {
            tracing::warn!("test-only crash at task {tasks_seen}");
            std::process::exit(137);
        }
    }

    /// Stretches a task that started at `started` to `slowdown` times its compute time.
    pub fn stretch<E>(
        slowdown: f64,
        started: Instant,
        mut result: Result<TaskResult, E>,
    ) -> Result<TaskResult, E> {
        if slowdown > 1.0 {
            std::thread::sleep(started.elapsed().mul_f64(slowdown - 1.0));
            if let Ok(r) = &mut result {
                r.compute_us = started.elapsed().as_micros() as u64;
            }
        }
        result
    }
}
