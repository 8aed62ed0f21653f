//! The output directory across restarts: a run on port 0 comes back on the port its join
//! string names, one folder never has two coordinators, and a config the run cannot work
//! under is refused before the folder is made (by `run`, and by `check` without a run).

use std::process::Command;
use std::time::Duration;

use integration_tests::{bin, swarm_config, wait_until, Coordinator, Worker};

const MINUTE: Duration = Duration::from_secs(60);

fn port_of(join: &str) -> u16 {
    let addr = join
        .split('@')
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap();
    addr.rsplit_once(':').unwrap().1.parse().unwrap()
}

#[test]
fn a_restarted_run_on_port_0_comes_back_on_the_port_its_workers_hold() {
    let mut c = Coordinator::start(&swarm_config("mlp", 60, 64, 1, 1, ""));
    let join = c.join_string();
    let _w = Worker::start(&join, c.dir.path(), "w0", &[]);
    wait_until(MINUTE, || (c.steps_done() >= 10).then_some(())).expect("trains");
    c.signal("-KILL");
    c.wait(MINUTE);
    std::fs::remove_file(c.out().join("join.txt")).unwrap();
    c.spawn();
    assert_eq!(c.join_string(), join, "the same join string");
    // The worker, still holding the old join string, finds it again.
    assert!(c.wait(MINUTE * 2).success(), "{}", c.log());
    assert_eq!(c.summary()["steps"], 60);
}

#[test]
fn a_restart_whose_port_is_taken_says_what_to_set() {
    let mut c = Coordinator::start(&swarm_config("mlp", 60, 64, 1, 1, ""));
    let port = port_of(&c.join_string());
    c.signal("-KILL");
    c.wait(MINUTE);
    let _squatter = std::net::UdpSocket::bind(("127.0.0.1", port)).expect("port free again");
    c.spawn();
    assert!(!c.wait(MINUTE).success());
    let log = c.log();
    assert!(log.contains(&format!("port {port}")), "{log}");
    assert!(log.contains("set run.listen to a fixed port"), "{log}");
}

#[test]
fn a_second_coordinator_on_the_same_folder_refuses_at_once() {
    let mut first = Coordinator::start(&swarm_config("mlp", 60, 64, 1, 1, ""));
    first.join_string();
    let pid = first.pid().expect("running");
    let second = Command::new(bin("coordinator"))
        .args(["run", "--config"])
        .arg(first.config_path())
        .output()
        .expect("run a second coordinator");
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{err}");
    assert!(
        err.contains(&first.out().display().to_string()),
        "names the folder: {err}"
    );
    assert!(
        err.contains(&format!("pid {pid}")),
        "names the process: {err}"
    );
    // The first one is undisturbed, and a kill -9 leaves no stale lock behind.
    assert!(first.child.as_mut().unwrap().try_wait().unwrap().is_none());
    first.signal("-KILL");
    first.wait(MINUTE);
    std::fs::remove_file(first.out().join("join.txt")).unwrap();
    first.spawn();
    first.join_string();
    let events = || first.events("resume").len() + first.events("start").len();
    wait_until(MINUTE, || (events() == 2).then_some(())).expect("the restart runs");
    assert!(first.child.as_mut().unwrap().try_wait().unwrap().is_none());
}

#[test]
fn a_frame_cap_below_a_result_sent_without_zstd_is_refused_before_the_folder_is_made() {
    // The config's last table is [network]: this line lands there.
    let cfg = swarm_config("mlp", 10, 64, 1, 1, "max_frame_bytes = 65536\n");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("run.toml"), cfg).unwrap();
    let log = std::fs::File::create(dir.path().join("coordinator.log")).unwrap();
    let mut child = Command::new(bin("coordinator"))
        .current_dir(dir.path())
        .args(["run", "--config", "run.toml"])
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("run the coordinator");
    // Were it not refused, it would wait for workers: a minute is a failure, not a hang.
    let status = wait_until(MINUTE, || child.try_wait().unwrap());
    if status.is_none() {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let err = std::fs::read_to_string(dir.path().join("coordinator.log")).unwrap();
    assert!(status.is_some_and(|s| !s.success()), "{err}");
    assert!(
        err.contains("network.max_frame_bytes = 65536")
            && err.contains("sent without zstd")
            && err.contains("raise it"),
        "{err}"
    );
    assert!(!dir.path().join("out").exists(), "nothing written");
}

#[test]
fn check_refuses_what_run_would_refuse_and_says_what_it_checked() {
    let dir = tempfile::tempdir().unwrap();
    let check = |cfg: &str| {
        std::fs::write(dir.path().join("run.toml"), cfg).unwrap();
        Command::new(bin("coordinator"))
            .current_dir(dir.path())
            .args(["check", "--config", "run.toml"])
            .output()
            .expect("run coordinator check")
    };
    let good = check(&swarm_config("mlp", 10, 64, 1, 1, ""));
    let out = String::from_utf8_lossy(&good.stdout);
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    assert!(
        out.contains("# checked: model mlp with 101770 parameters; data fashion-mnist: 60000 training samples, 10000 held out"),
        "{out}"
    );
    // A config that parses but that `run` refuses (the frame cap; the last table is
    // [network]) is refused by `check` too, with `run`'s message.
    let bad = check(&swarm_config(
        "mlp",
        10,
        64,
        1,
        1,
        "max_frame_bytes = 65536\n",
    ));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success(), "{err}");
    assert!(
        err.contains("network.max_frame_bytes = 65536") && err.contains("raise it"),
        "{err}"
    );
    assert!(!dir.path().join("out").exists(), "nothing written");
}
