//! `/metrics`: the run's counters and gauges in the Prometheus text format
//! (<https://prometheus.io/docs/instrumenting/exposition_formats/>), with the
//! `prometheus-client` crate. Counters start at zero with each coordinator process, as
//! Prometheus expects of a restarted target (`increase()` and `rate()` handle the reset);
//! the totals of the whole run are in `/api/status`.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::status::{RunState, Status};

/// The metrics, registered under the `dtrain_` prefix.
pub struct Prom {
    registry: Registry,
    rounds: Counter,
    samples: Counter,
    bytes_in: Counter,
    bytes_out: Counter,
    data_served: Counter,
    rejected: Counter,
    reassigned: Counter,
    checks: Counter,
    checks_passed: Counter,
    cheats: Counter,
    rollbacks: Counter,
    banned: Gauge,
    workers: Gauge,
    step: Gauge,
    paused: Gauge,
    loss: Gauge<f64, AtomicU64>,
    eval_loss: Gauge<f64, AtomicU64>,
    samples_per_s: Gauge<f64, AtomicU64>,
    round_seconds: Histogram,
    /// The run's totals when this process started (counters count from there).
    base: Option<Status>,
}

/// Raises a counter to `total` (counters only go up).
fn raise(c: &Counter, total: u64) {
    c.inc_by(total.saturating_sub(c.get()));
}

impl Default for Prom {
    fn default() -> Self {
        let mut r = Registry::with_prefix("dtrain");
        let rounds = Counter::default();
        let samples = Counter::default();
        let bytes_in = Counter::default();
        let bytes_out = Counter::default();
        let data_served = Counter::default();
        let rejected = Counter::default();
        let reassigned = Counter::default();
        let checks = Counter::default();
        let checks_passed = Counter::default();
        let cheats = Counter::default();
        let rollbacks = Counter::default();
        let banned = Gauge::default();
        let workers = Gauge::default();
        let step = Gauge::default();
        let paused = Gauge::default();
        let loss = Gauge::<f64, AtomicU64>::default();
        let eval_loss = Gauge::<f64, AtomicU64>::default();
        let samples_per_s = Gauge::<f64, AtomicU64>::default();
        // 50 ms to about 14 min.
        let round_seconds = Histogram::new(exponential_buckets(0.05, 2.0, 15));
        r.register("rounds", "Rounds (outer steps) committed", rounds.clone());
        r.register(
            "samples",
            "Training samples in committed rounds",
            samples.clone(),
        );
        r.register(
            "received_bytes",
            "Frame bytes received from workers",
            bytes_in.clone(),
        );
        r.register(
            "sent_bytes",
            "Frame bytes sent to workers",
            bytes_out.clone(),
        );
        r.register(
            "data_served_bytes",
            "Bytes of data files served",
            data_served.clone(),
        );
        r.register(
            "rejected_results",
            "Results refused at validation",
            rejected.clone(),
        );
        r.register(
            "reassigned_parts",
            "Parts given to another worker",
            reassigned.clone(),
        );
        r.register("spot_checks", "Spot checks finished", checks.clone());
        r.register(
            "spot_checks_passed",
            "Spot checks passed",
            checks_passed.clone(),
        );
        r.register(
            "cheats_caught",
            "Workers caught by spot checks",
            cheats.clone(),
        );
        r.register("rollbacks", "Rollbacks of contributions", rollbacks.clone());
        r.register(
            "banned_workers",
            "Workers banned in the run",
            banned.clone(),
        );
        r.register("workers", "Workers connected", workers.clone());
        r.register("step", "Rounds done in the run", step.clone());
        r.register(
            "paused",
            "1 while the operator has paused the run",
            paused.clone(),
        );
        r.register(
            "train_loss",
            "Mean training loss of the last round",
            loss.clone(),
        );
        r.register(
            "eval_loss",
            "Loss of the last evaluation",
            eval_loss.clone(),
        );
        r.register(
            "samples_per_second",
            "Training samples per second",
            samples_per_s.clone(),
        );
        r.register(
            "round_seconds",
            "Wall time of a round",
            round_seconds.clone(),
        );
        Prom {
            registry: r,
            rounds,
            samples,
            bytes_in,
            bytes_out,
            data_served,
            rejected,
            reassigned,
            checks,
            checks_passed,
            cheats,
            rollbacks,
            banned,
            workers,
            step,
            paused,
            loss,
            eval_loss,
            samples_per_s,
            round_seconds,
            base: None,
        }
    }
}

impl Prom {
    /// Takes the run's state; the first call sets the base the counters count from.
    pub fn update(&mut self, s: &Status) {
        let b = self.base.get_or_insert_with(|| s.clone());
        raise(&self.rounds, s.step.saturating_sub(b.step));
        raise(&self.samples, s.samples.saturating_sub(b.samples));
        raise(&self.bytes_in, s.bytes_in.saturating_sub(b.bytes_in));
        raise(&self.bytes_out, s.bytes_out.saturating_sub(b.bytes_out));
        raise(
            &self.data_served,
            s.data_served.saturating_sub(b.data_served),
        );
        raise(&self.rejected, s.rejected.saturating_sub(b.rejected));
        raise(&self.reassigned, s.reassigned.saturating_sub(b.reassigned));
        raise(&self.checks, s.checks.done.saturating_sub(b.checks.done));
        raise(
            &self.checks_passed,
            s.checks.passed.saturating_sub(b.checks.passed),
        );
        raise(
            &self.cheats,
            s.checks.caught.saturating_sub(b.checks.caught),
        );
        raise(&self.rollbacks, s.rollbacks.saturating_sub(b.rollbacks));
        self.banned.set(s.banned as i64);
        self.workers.set(s.workers as i64);
        self.step.set(s.step as i64);
        self.paused.set(i64::from(s.state == RunState::Paused));
        self.loss.set(s.loss.unwrap_or(f64::NAN));
        self.eval_loss
            .set(s.eval.and_then(|e| e.loss).unwrap_or(f64::NAN));
        self.samples_per_s.set(s.samples_per_s.unwrap_or(0.0));
    }

    /// Records the wall time of a committed round.
    pub fn round_time(&self, seconds: f64) {
        self.round_seconds.observe(seconds);
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_count_from_the_first_update_and_the_text_parses() {
        let mut p = Prom::default();
        let mut s = Status {
            step: 10,
            bytes_in: 1000,
            ..Status::default()
        };
        p.update(&s);
        s.step = 13;
        s.bytes_in = 1500;
        s.checks.passed = 2;
        s.state = RunState::Paused;
        p.update(&s);
        p.round_time(0.3);
        let text = p.encode();
        for want in [
            "dtrain_rounds_total 3",
            "dtrain_received_bytes_total 500",
            "dtrain_spot_checks_passed_total 2",
            "dtrain_paused 1",
            "dtrain_step 13",
            "dtrain_round_seconds_count 1",
            "# EOF",
        ] {
            assert!(text.contains(want), "{want} missing in\n{text}");
        }
    }
}
