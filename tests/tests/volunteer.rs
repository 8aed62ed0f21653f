//! What a volunteer controls: Ctrl-C lets the worker finish and send the task in hand, then
//! leave without blame; a capped uplink and a lower CPU priority still train.

use std::process::Command;
use std::time::Duration;

use integration_tests::{swarm_config, wait_until, worker_command, Coordinator, Worker};

#[test]
fn ctrl_c_finishes_the_task_in_hand_and_leaves_the_run_cleanly() {
    let mut c = Coordinator::start(&swarm_config("mlp", 300, 64, 2, 1, ""));
    let join = c.join_string();
    let _stays = Worker::start(&join, c.dir.path(), "stays", &[]);
    let mut leaves = Worker::start(&join, c.dir.path(), "leaves", &[]);
    assert!(
        wait_until(Duration::from_secs(60), || (c.steps_done() >= 5)
            .then_some(()))
        .is_some(),
        "{}",
        c.log()
    );
    Command::new("kill")
        .args(["-INT", &leaves.child.id().to_string()])
        .status()
        .unwrap();
    let status = leaves
        .wait(Duration::from_secs(30))
        .expect("the worker stops");
    assert!(status.success(), "{}", leaves.log());
    let log = leaves.log();
    assert!(log.contains("stopping after the task in hand"), "{log}");
    assert!(log.contains("stopped by the volunteer"), "{log}");
    // The run goes on with the other worker, and nobody was struck.
    assert!(c.wait(Duration::from_secs(180)).success(), "{}", c.log());
    assert_eq!(c.steps_done(), 300);
    assert!(c.events("offence").is_empty(), "{:?}", c.events("offence"));
}

#[test]
fn a_worker_with_a_capped_uplink_and_a_low_priority_trains() {
    let mut c = Coordinator::start(&swarm_config("mlp", 20, 64, 1, 1, ""));
    let w = Worker::start(
        &c.join_string(),
        c.dir.path(),
        "w0",
        &["--max-upload-mbps", "4", "--nice", "10"],
    );
    assert!(c.wait(Duration::from_secs(120)).success(), "{}", c.log());
    assert_eq!(c.steps_done(), 20, "{}", w.log());
    // Refused values are clear errors.
    let out =
        integration_tests::run_worker_to_end(&c.join_string(), c.dir.path(), &["--nice", "40"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--nice"));
}

/// Ctrl-C to `w` two seconds from now; it must exit cleanly within `within`.
fn interrupt_after_2s(w: &mut Worker, within: Duration) {
    std::thread::sleep(Duration::from_secs(2));
    Command::new("kill")
        .args(["-INT", &w.child.id().to_string()])
        .status()
        .unwrap();
    let status = w.wait(within).expect("stops at once");
    assert!(status.success(), "{}", w.log());
}

#[test]
fn ctrl_c_during_the_first_download_stops_at_once() {
    // 5 Mbit/s: the 26.5 MB would take 42 s.
    let cfg = swarm_config("mlp", 5, 64, 1, 1, "[data]\nserve_max_mbps = 5\n");
    let c = Coordinator::start(&cfg);
    let mut w = Worker::start_fetching(&c.join_string(), c.dir.path(), "w0", &[]);
    let downloading = || w.log().contains("downloading the run's data").then_some(());
    assert!(
        wait_until(Duration::from_secs(30), downloading).is_some(),
        "{}",
        w.log()
    );
    interrupt_after_2s(&mut w, Duration::from_secs(10));
    assert!(w.log().contains("stopped by the volunteer"), "{}", w.log());
    // The unfinished file stays for the next start.
    let parts = std::fs::read_dir(c.dir.path().join("cache/tmp"))
        .unwrap()
        .count();
    assert_eq!(parts, 1);
}

/// The number before `what` in `line` (`"12 tasks"` → 12).
fn count_before(line: &str, what: &str) -> u64 {
    let head = &line[..line
        .find(what)
        .unwrap_or_else(|| panic!("{what} in {line}"))];
    head.trim_end()
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a count before {what} in {line}"))
}

#[test]
fn the_worker_reports_its_status_and_only_warnings_when_quiet() {
    let mut c = Coordinator::start(&swarm_config("mlp", 30, 64, 2, 1, ""));
    let join = c.join_string();
    let mut loud = Worker::start(&join, c.dir.path(), "loud", &[]);
    let quiet_log = c.dir.path().join("quiet.log");
    let mut quiet = worker_command(&join, &c.dir.path().join("quiet.key"), 60)
        .args(["--name", "quiet", "--quiet"])
        .args(["--data-dir", "/usr/share/datasets/fashion-mnist"])
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&quiet_log).unwrap())
        .spawn()
        .unwrap();
    assert!(c.wait(Duration::from_secs(120)).success(), "{}", c.log());
    assert!(loud
        .wait(Duration::from_secs(30))
        .is_some_and(|s| s.success()));
    assert!(quiet.wait().unwrap().success());
    // The last status line of the loud worker: its tasks, and the run's record of it.
    let log = loud.log();
    let line = log
        .lines()
        .rfind(|l| l.contains(" tasks | "))
        .unwrap_or_else(|| panic!("no status line:\n{log}"));
    assert!(count_before(line, " tasks") >= 5, "{line}");
    assert!(line.trim_end().ends_with(", strikes 0"), "{line}");
    // "accepted N, strikes 0": the run's record, as the last task carried it.
    assert!(count_before(line, ", strikes") >= 1, "{line}");
    assert!(line.contains("samples/s") && line.contains("up "), "{line}");
    // The quiet one trained too, and logged nothing below a warning.
    assert!(c.names().values().any(|n| n == "quiet"));
    let qlog = std::fs::read_to_string(&quiet_log).unwrap();
    assert!(!qlog.contains(" INFO "), "{qlog}");
}

#[test]
fn a_run_needing_more_threads_than_the_cap_is_refused_clearly() {
    let c = Coordinator::start(&swarm_config(
        "mlp",
        5,
        64,
        1,
        1,
        "[workers]\ndeterministic_threads = 2\n",
    ));
    // The harness's workers run with `--threads 1` (an alias of `--max-threads`).
    let out = integration_tests::run_worker_to_end(&c.join_string(), c.dir.path(), &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("more than --max-threads 1"), "{err}");
}

#[test]
fn ctrl_c_while_connecting_to_a_silent_coordinator_stops_at_once() {
    // A join string whose coordinator is gone: the handshake would wait out its timeout.
    let join = Coordinator::start(&swarm_config("mlp", 5, 64, 1, 1, "")).join_string();
    let dir = tempfile::tempdir().unwrap();
    let mut w = Worker::start(&join, dir.path(), "w0", &[]);
    let started = || w.log().contains("worker starting").then_some(());
    assert!(wait_until(Duration::from_secs(30), started).is_some());
    interrupt_after_2s(&mut w, Duration::from_secs(5));
    assert!(w.log().contains("stopped"), "{}", w.log());
}
