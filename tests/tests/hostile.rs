//! Hostile peers: malformed frames, wrong shapes, NaN, truncated and oversized updates,
//! replayed and misaddressed results, bad signatures, requests for data outside the run, a
//! wrong version. Each is refused with a
//! clear reason, the peer is struck and after three strikes banned, and the run goes on.

use std::time::Duration;

use integration_tests::{quick_config, run_worker_to_end, Coordinator, Worker};

/// Each hostile mode and a phrase its refusal must contain.
const MODES: [(&str, &str); 9] = [
    ("nan", "NaN or infinite"),
    ("wrong-shape", "expected 101770"),
    ("truncated", "update:"),
    ("replay", "replayed or out of order"),
    ("unknown-task", "replayed or out of order"),
    ("bad-signature", "signature does not verify"),
    ("junk-frame", "malformed message"),
    ("oversized", "exceeds the cap"),
    ("bad-data-request", "not a file of this run"),
];

#[test]
fn every_hostile_peer_is_refused_struck_and_banned_while_the_run_goes_on() {
    let mut c = Coordinator::start(&quick_config("mlp", 120, 64, "127.0.0.1:0", ""));
    let join = c.join_string();
    let _honest = Worker::start(&join, c.dir.path(), "honest", &[]);
    let _hostile: Vec<Worker> = MODES
        .iter()
        .map(|(m, _)| Worker::start(&join, c.dir.path(), m, &["--test-hostile", m]))
        .collect();
    // A wrong protocol version is refused at the handshake, with the reason on both sides.
    let out = run_worker_to_end(&join, c.dir.path(), &["--test-protocol-version", "1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("protocol version mismatch"));
    assert!(c.wait(Duration::from_secs(240)).success(), "{}", c.log());

    let names = c.names();
    let name = |e: &serde_json::Value| names[e["worker"].as_str().unwrap()].clone();
    let offences = c.events("offence");
    let banned: Vec<String> = c.events("banned").iter().map(name).collect();
    for (mode, phrase) in MODES {
        let reasons: Vec<String> = offences
            .iter()
            .filter(|e| name(e) == mode)
            .map(|e| e["reason"].as_str().unwrap().to_string())
            .collect();
        assert!(
            reasons.iter().any(|r| r.contains(phrase)),
            "{mode}: no offence mentioning {phrase:?}: {reasons:?}"
        );
        assert!(banned.contains(&mode.to_string()), "{mode} was not banned");
    }
    assert!(!banned.contains(&"honest".to_string()));
    assert!(offences.iter().all(|e| name(e) != "honest"));
    let s = c.summary();
    assert_eq!(s["steps"], 120, "the run finished: {s}");
    assert!(s["final_test_acc"].as_f64().unwrap() > 0.7, "{s}");
    assert!(c.log().contains("protocol version mismatch"));
}
