//! Join strings naming the coordinator by IPv6 address, IPv4 address or host name; addresses
//! that can never be reached end the worker at once with a clear message.

use std::time::Duration;

use integration_tests::{free_port, quick_config, run_worker_to_end, Coordinator, Worker};

const MINUTE: Duration = Duration::from_secs(60);

/// Runs a 20-step MLP run with one worker joining on the coordinator's join string.
fn train_with_one_worker(c: &mut Coordinator) -> String {
    let join = c.join_string();
    let _w = Worker::start(&join, c.dir.path(), "w0", &[]);
    assert!(c.wait(MINUTE * 2).success(), "{}", c.log());
    assert_eq!(c.summary()["steps"], 20);
    join
}

#[test]
fn a_worker_joins_a_coordinator_on_ipv6_loopback() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("skipped: this machine has no IPv6 loopback");
        return;
    }
    let mut c = Coordinator::start(&quick_config("mlp", 20, 64, "[::1]:0", ""));
    let join = train_with_one_worker(&mut c);
    assert!(join.contains("@[::1]:"), "{join}");
}

#[test]
fn a_worker_joins_by_host_name_and_on_ipv4() {
    let port = free_port();
    // The join string names the host, not the address it listens on.
    let config = quick_config("mlp", 20, 64, &format!("127.0.0.1:{port}"), "").replace(
        "min_workers = 1",
        &format!("min_workers = 1\npublic_addr = \"localhost:{port}\""),
    );
    let mut c = Coordinator::start(&config);
    let join = train_with_one_worker(&mut c);
    assert!(join.contains(&format!("@localhost:{port}/")), "{join}");
}

#[test]
fn an_address_that_can_never_be_reached_ends_the_worker_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (secret, fingerprint) = ("ab".repeat(32), "cd".repeat(32));
    let join = |addr: &str| format!("dtrain://{secret}@{addr}/{fingerprint}");
    for (addr, says) in [
        ("::1:7070", "brackets"),
        ("[::1:7070", "closing"),
        ("127.0.0.1:0", "port"),
        // Well formed, but no one can be reached there: refused by the transport at once.
        ("0.0.0.0:7070", "invalid remote address"),
    ] {
        // (It would retry for 5 s, and then say it gave up, were these failures retried.)
        let out = run_worker_to_end(&join(addr), dir.path(), &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{addr}: {err}");
        assert!(err.contains(says), "{addr}: expected {says:?} in:\n{err}");
        assert!(
            !err.contains("gave up"),
            "{addr}: retried instead of stopping:\n{err}"
        );
    }
}
