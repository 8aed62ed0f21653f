//! Volunteers' machines differ: an honest worker whose libtorch dispatches to other CPU
//! kernels (`ATEN_CPU_CAPABILITY=default`, what an older or different CPU gets) is never
//! accused, in the tolerance comparison across classes and in the portable deterministic
//! mode, while cheaters on such kernels are still caught.

use std::collections::HashSet;
use std::time::Duration;

use integration_tests::{swarm_config, Coordinator, Worker};

/// The kernels of another CPU on this one.
const OTHER_CPU: (&str, &str) = ("ATEN_CPU_CAPABILITY", "default");

/// A run in which the first `other` workers compute with [`OTHER_CPU`], the next `native`
/// with this machine's kernels, then one cheater per mode (on [`OTHER_CPU`]).
fn run(batches: u64, other: usize, native: usize, cheaters: &[&str], extra: &str) -> Coordinator {
    let n = other + native + cheaters.len();
    let cfg = swarm_config("mlp", batches, 64, n, 1, extra);
    let mut c = Coordinator::start(&cfg);
    let join = c.join_string();
    let dir = c.dir.path().to_path_buf();
    let mut workers: Vec<Worker> = Vec::new();
    for i in 0..other {
        workers.push(Worker::start_env(
            &join,
            &dir,
            &format!("other{i}"),
            &[],
            &[OTHER_CPU],
        ));
    }
    for i in 0..native {
        workers.push(Worker::start(&join, &dir, &format!("native{i}"), &[]));
    }
    for m in cheaters {
        let args = ["--test-adversary", m];
        workers.push(Worker::start_env(&join, &dir, m, &args, &[OTHER_CPU]));
    }
    assert!(c.wait(Duration::from_secs(600)).success(), "{}", c.log());
    c
}

/// How each passed check was confirmed (`check_passed.how`).
fn hows(c: &Coordinator) -> Vec<String> {
    c.events("check_passed")
        .iter()
        .map(|e| e["how"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn assert_nobody_accused(c: &Coordinator) {
    let s = c.summary();
    assert_eq!(s["cheats_caught"], 0, "{s}\n{}", c.log());
    assert_eq!(s["checks_abandoned"], 0, "{s}");
    assert!(s["banned"].as_array().unwrap().is_empty(), "{s}");
    assert!(s["checks_passed"].as_u64().unwrap() >= 200, "{s}");
    assert_eq!(s["checks"], s["tasks_ok"], "every result checked: {s}");
}

#[test]
fn honest_workers_on_other_kernels_pass_across_classes() {
    // Deterministic threads, error feedback through int8: bitwise within the checks' class,
    // the calibrated tolerance across classes.
    let extra = "[workers]\ndeterministic_threads = 1\n\n[compression]\ncodec = \"int8\"\n\n\
                 [verification]\np = 1.0\nnew_worker_p = 1.0\n";
    let c = run(150, 1, 1, &[], extra);
    assert_nobody_accused(&c);
    let hows = hows(&c);
    assert!(hows.iter().any(|h| h == "bitwise"), "{hows:?}");
    assert!(
        hows.iter()
            .any(|h| h.contains("across classes") || h.contains("own class")),
        "the other CPU's results were compared across classes: {hows:?}"
    );
    // Each worker's class is in the metrics, and differs.
    let joined = c.events("worker_joined");
    let caps: HashSet<String> = joined
        .iter()
        .map(|e| e["class"]["cpu_capability"].as_str().unwrap().to_string())
        .collect();
    assert!(caps.contains("DEFAULT") && caps.len() == 2, "{joined:?}");
}

#[test]
fn the_portable_mode_compares_every_cpu_bitwise() {
    let extra = "[workers]\nportable = true\n\n[compression]\ncodec = \"int8\"\n\n\
                 [verification]\np = 1.0\nnew_worker_p = 1.0\n";
    let c = run(150, 1, 1, &[], extra);
    assert_nobody_accused(&c);
    let hows = hows(&c);
    assert!(hows.iter().all(|h| h == "bitwise"), "{hows:?}");
    // Both workers restarted themselves into the portable settings and share the checks'
    // class.
    for e in c
        .events("worker_joined")
        .iter()
        .filter(|e| e["class"]["portable"] == true)
    {
        assert_eq!(e["same_class_as_checks"], true, "{e}");
    }
}

#[test]
fn cheaters_on_other_kernels_are_caught_in_their_own_class() {
    const CHEATS: [&str; 5] = ["noise", "scaled", "sign-flip", "zero", "wrong-data"];
    let extra = "[workers]\ndeterministic_threads = 1\n\n\
                 [verification]\np = 0.2\nnew_worker_p = 1.0\n";
    let c = run(120, 1, 1, &CHEATS, extra);
    let names = c.names();
    let banned: HashSet<String> = c.summary()["banned"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| names[k.as_str().unwrap()].clone())
        .collect();
    let want: HashSet<String> = CHEATS.iter().map(|s| s.to_string()).collect();
    assert_eq!(banned, want, "exactly the cheaters are banned: {}", c.log());
    for e in c.events("cheat_detected") {
        let reason = e["reason"].as_str().unwrap();
        assert!(reason.contains("in its own class cpu/DEFAULT"), "{reason}");
        assert_eq!(e["evidence_valid"], true, "{e}");
    }
}
