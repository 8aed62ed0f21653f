//! The output directory across restarts: a run on port 0 comes back on the port its join
//! string names.

use std::time::Duration;

use integration_tests::{swarm_config, wait_until, Coordinator, Worker};

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
