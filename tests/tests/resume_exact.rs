//! Exact resumption. In deterministic mode a coordinator stopped at any point (`kill -9`,
//! SIGTERM, or a crash between logging a round and reporting it) and started again ends
//! with the same parameters, bit for bit, as the run that was never interrupted: with lossy
//! codecs and error feedback on both links, for H = 1 and H > 1. Error-feedback residuals
//! continue across the restart: the coordinator's downlink residual is in its state, and each
//! worker's uplink residual is kept by the worker, continued from the base the coordinator's
//! state names.

use std::process::ExitStatus;
use std::time::Duration;

use integration_tests::{swarm_config, wait_until, Coordinator, Worker};

const MINUTE: Duration = Duration::from_secs(60);

/// How a coordinator process ends before the run is over.
#[derive(Clone, Copy, Debug)]
enum Stop {
    /// Exits as if killed right after round N is logged, before it is reported.
    AfterLogging(u64),
    /// `kill -9` once round N is reported (wherever the next round then is).
    Kill(u64),
    /// SIGTERM once round N is reported: a checkpoint, then a clean exit.
    Term(u64),
}

fn args(stop: Option<&Stop>) -> Vec<String> {
    match stop {
        Some(Stop::AfterLogging(n)) => vec!["--test-crash-after-logging".into(), n.to_string()],
        _ => Vec::new(),
    }
}

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The logs of the coordinator and of the workers, for a failure's message.
fn logs(c: &Coordinator, w: &[Worker]) -> String {
    let workers: Vec<String> = w.iter().map(Worker::log).collect();
    format!(
        "coordinator:\n{}\nworkers:\n{}",
        c.log(),
        workers.join("\n----\n")
    )
}

/// Waits for the coordinator to exit; panics with every log after `timeout`.
fn exit_status(c: &mut Coordinator, w: &[Worker], timeout: Duration) -> ExitStatus {
    let child = c.child.as_mut().expect("running");
    match wait_until(timeout, || child.try_wait().expect("try_wait")) {
        Some(s) => {
            c.child = None;
            s
        }
        None => panic!("still running after {timeout:?}; {}", logs(c, w)),
    }
}

/// Waits until round `n` is reported; panics with every log after two minutes.
fn reach(c: &Coordinator, w: &[Worker], n: u64) {
    wait_until(MINUTE * 2, || (c.steps_done() >= n).then_some(()))
        .unwrap_or_else(|| panic!("no round {n}; {}", logs(c, w)));
}

/// Runs `config` with `workers` workers to the end, stopping and restarting the coordinator
/// at each of `stops` (the workers too, when `restart_workers`); returns the final
/// parameters' hash.
fn run(config: &str, rounds: u64, workers: usize, stops: &[Stop], restart_workers: bool) -> String {
    let mut c = Coordinator::start_with(config, &as_strs(&args(stops.first())));
    let join = c.join_string();
    let dir = c.dir.path().to_path_buf();
    let start = |i: usize| Worker::start(&join, &dir, &format!("w{i}"), &[]);
    let mut w: Vec<Worker> = (0..workers).map(start).collect();
    for (i, stop) in stops.iter().enumerate() {
        match *stop {
            Stop::AfterLogging(n) => {
                let status = exit_status(&mut c, &w, MINUTE * 2);
                assert_eq!(status.code(), Some(137), "{}", logs(&c, &w));
                assert_eq!(c.steps_done(), n - 1, "round {n} logged, not reported");
            }
            Stop::Kill(n) => {
                reach(&c, &w, n);
                c.signal("-KILL");
                exit_status(&mut c, &w, MINUTE);
            }
            Stop::Term(n) => {
                reach(&c, &w, n);
                let stopped = c.events("stopped").len();
                c.signal("-TERM");
                let status = exit_status(&mut c, &w, MINUTE);
                assert!(status.success(), "{}", logs(&c, &w));
                assert_eq!(
                    c.events("stopped").len(),
                    stopped + 1,
                    "SIGTERM saves, stops"
                );
            }
        }
        if restart_workers {
            w.clear();
            w = (0..workers).map(start).collect();
        }
        c.spawn_with(&as_strs(&args(stops.get(i + 1))));
    }
    let status = exit_status(&mut c, &w, MINUTE * 3);
    assert!(status.success(), "{}", logs(&c, &w));
    assert_eq!(
        c.events("resume").len(),
        stops.len(),
        "one resume per restart"
    );
    let steps: Vec<u64> = c
        .events("step")
        .iter()
        .map(|e| e["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=rounds).collect::<Vec<_>>(), "each round once");
    drop(w);
    c.summary()["params_blake3"]
        .as_str()
        .expect("params_blake3")
        .to_string()
}

/// Deterministic workers with equal shares (every round waits for all `workers` after a
/// start), the codecs given on both links, with error feedback.
fn config(
    uplink: &str,
    downlink: &str,
    batches: u64,
    h: u32,
    workers: usize,
    checks: bool,
) -> String {
    let verification = if checks {
        ""
    } else {
        "[verification]\np = 0.0\nnew_worker_p = 0.0\n"
    };
    let extra = format!(
        "[compression]\ncodec = \"{uplink}\"\n\n[downlink]\ncodec = \"{downlink}\"\n\n\
         [workers]\ndeterministic_threads = 1\nbalance_by_speed = false\n\n{verification}"
    );
    swarm_config("mlp", batches, 64, workers, h, &extra)
}

#[test]
fn crashes_at_any_point_resume_bit_for_bit_with_lossy_links() {
    // H = 1, one worker: int8 up, int4 down, spot checks on as by default.
    let cfg = config("int8", "int4", 120, 1, 1, true);
    let calm = run(&cfg, 120, 1, &[], false);
    let again = run(&cfg, 120, 1, &[], false);
    assert_eq!(calm, again, "an uninterrupted run is reproducible");
    let stops = [Stop::AfterLogging(30), Stop::Kill(60), Stop::Term(90)];
    let crashed = run(&cfg, 120, 1, &stops, false);
    assert_eq!(crashed, calm, "crashed at {stops:?}");
}

#[test]
fn diloco_rounds_resume_bit_for_bit_with_lossy_links() {
    // H = 4, two workers with equal shares (each continues its own residual, whichever
    // reconnects first): top-k up, int8 down; 30 rounds of 4 global batches.
    let cfg = config("topk", "int8", 120, 4, 2, false);
    let calm = run(&cfg, 30, 2, &[], false);
    let stops = [Stop::Kill(8), Stop::AfterLogging(15), Stop::Term(22)];
    let crashed = run(&cfg, 30, 2, &stops, false);
    assert_eq!(crashed, calm, "crashed at {stops:?}");
}

#[test]
fn a_worker_restarted_with_the_coordinator_resumes_bit_for_bit_when_it_lost_no_residual() {
    // The worker process dies with the coordinator: with a lossless uplink it keeps nothing
    // a restart could lose (the downlink residual is the coordinator's), so the run is
    // still exact. (With a lossy uplink its unsent residual dies with it; see below.)
    let cfg = config("fp32", "int8", 90, 1, 1, false);
    let calm = run(&cfg, 90, 1, &[], false);
    let stops = [Stop::Kill(30), Stop::AfterLogging(60)];
    let crashed = run(&cfg, 90, 1, &stops, true);
    assert_eq!(crashed, calm, "crashed at {stops:?}, the worker too");
}

#[test]
fn a_restarted_worker_starts_a_fresh_residual_on_both_sides() {
    // A worker killed mid-run loses its unsent residual; its next result says it continues
    // none (error-feedback base 0) and the coordinator re-executes it that way: with every
    // result checked bitwise, every check passes, before and after the restart.
    let extra = "[compression]\ncodec = \"int8\"\n\n[workers]\ndeterministic_threads = 1\n\n\
                 [verification]\np = 1.0\nnew_worker_p = 1.0\n";
    let mut c = Coordinator::start(&swarm_config("mlp", 60, 64, 1, 1, extra));
    let join = c.join_string();
    let dir = c.dir.path().to_path_buf();
    let mut w = Worker::start(&join, &dir, "w0", &["--test-crash-at-task", "25"]);
    assert!(
        w.wait(MINUTE * 2).is_some(),
        "the worker crashed at task 25"
    );
    let passed_before = c.events("check_passed").len();
    let _w = Worker::start(&join, &dir, "w0", &[]);
    assert!(c.wait(MINUTE * 3).success(), "{}", c.log());
    assert_eq!(c.summary()["steps"], 60);
    assert!(c.events("cheat_detected").is_empty(), "{}", c.log());
    assert!(c.events("offence").is_empty(), "{}", c.log());
    assert!(c.events("rejected_result").is_empty(), "{}", c.log());
    let passed_after = c.events("check_passed").len() - passed_before;
    assert!(
        passed_before > 0 && passed_after >= 20,
        "checks passed: {passed_before} before the restart, {passed_after} after"
    );
}
