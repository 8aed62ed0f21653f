//! The live progress line: an indicatif bar on a terminal, periodic log lines otherwise.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing::info;
use trainer::runtime::human_bytes;

/// Shows step, loss, workers and traffic as training goes.
pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    log_every: u64,
}

/// What the live line shows after a step.
pub struct StepLine {
    /// Mean training loss of the step.
    pub loss: f64,
    /// Connected workers.
    pub workers: usize,
    /// Bytes received so far.
    pub bytes_in: u64,
    /// Bytes sent so far.
    pub bytes_out: u64,
    /// Uplink compression: fp32 bytes of the accepted updates over their encoded bytes.
    pub uplink_ratio: f64,
    /// Training throughput in tokens per second (language models).
    pub tokens_per_s: Option<f64>,
    /// The last evaluation, as shown (`test acc 0.8812`, `val loss 1.9021`).
    pub eval: Option<String>,
}

impl Progress {
    /// A progress display for `total` steps starting at `done`.
    pub fn new(total: u64, done: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar =
                ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr_with_hz(4));
            bar.set_style(
                ProgressStyle::with_template("{elapsed_precise} [{bar:30}] step {pos}/{len} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar.set_position(done);
            bar
        });
        Progress {
            bar,
            total,
            log_every: (total / 20).max(1),
        }
    }

    /// Reports the state after a step.
    pub fn update(&self, step: u64, s: &StepLine) {
        let acc = s
            .eval
            .as_ref()
            .map(|e| format!(" | {e}"))
            .unwrap_or_default();
        let tps = s
            .tokens_per_s
            .map(|t| format!(" | {t:.0} tok/s"))
            .unwrap_or_default();
        let msg = format!(
            "| loss {:.4}{tps} | workers {} | in {} | out {} | uplink x{:.1}{acc}",
            s.loss,
            s.workers,
            human_bytes(s.bytes_in),
            human_bytes(s.bytes_out),
            s.uplink_ratio
        );
        match &self.bar {
            Some(bar) => {
                bar.set_position(step);
                bar.set_message(msg);
            }
            None if step.is_multiple_of(self.log_every) || step == self.total => {
                info!("step {step}/{} {msg}", self.total);
            }
            None => {}
        }
    }

    /// Prints a line above the bar (or logs it).
    pub fn message(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => info!("{line}"),
        }
    }

    /// Leaves the bar in place.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.abandon();
        }
    }
}
