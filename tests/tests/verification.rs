//! Untrusted workers: spot checks by re-execution catch every kind of cheater, ban it by key,
//! remove its unverified contributions, and never touch an honest worker.

use std::collections::HashSet;
use std::time::Duration;

use integration_tests::{swarm_config, Coordinator, Worker};
use serde_json::Value;

const ADVERSARIES: [&str; 8] = [
    "noise",
    "scaled",
    "sign-flip",
    "zero",
    "stale",
    "wrong-data",
    "copy",
    "partial",
];

/// A run of `batches` global batches in rounds of `h`, with `honest` honest workers and one
/// cheater per mode in `cheaters`; returns the coordinator once the run is over.
fn run(
    batches: u64,
    h: u32,
    batch: usize,
    honest: usize,
    cheaters: &[&str],
    extra: &str,
) -> Coordinator {
    let extra = format!("[workers]\ndeterministic_threads = 1\n\n{extra}");
    let cfg = swarm_config("mlp", batches, batch, honest + cheaters.len(), h, &extra);
    let mut c = Coordinator::start(&cfg);
    let join = c.join_string();
    let mut workers: Vec<Worker> = (0..honest)
        .map(|i| Worker::start(&join, c.dir.path(), &format!("honest{i}"), &[]))
        .collect();
    for m in cheaters {
        workers.push(Worker::start(
            &join,
            c.dir.path(),
            m,
            &["--test-adversary", m],
        ));
    }
    assert!(c.wait(Duration::from_secs(300)).success(), "{}", c.log());
    c
}

/// Names of the banned workers, and the `cheat_detected` events by worker name.
fn outcome(c: &Coordinator) -> (HashSet<String>, Vec<(String, Value)>) {
    let names = c.names();
    let name = |k: &Value| {
        names
            .get(k.as_str().unwrap_or(""))
            .cloned()
            .unwrap_or_default()
    };
    let banned = c.summary()["banned"]
        .as_array()
        .unwrap()
        .iter()
        .map(name)
        .collect();
    let caught = c
        .events("cheat_detected")
        .into_iter()
        .map(|e| (name(&e["worker"]), e))
        .collect();
    (banned, caught)
}

#[test]
fn every_kind_of_cheater_is_caught_banned_and_removed() {
    let c = run(
        150,
        1,
        88,
        3,
        &ADVERSARIES,
        "[verification]\np = 0.1\nnew_worker_p = 0.5\n",
    );
    let (banned, caught) = outcome(&c);
    let want: HashSet<String> = ADVERSARIES.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        banned,
        want,
        "exactly the cheaters are banned; log:\n{}",
        c.log()
    );
    for (who, e) in &caught {
        assert!(want.contains(who), "{who} was accused: {e}");
        assert_eq!(e["evidence_valid"], true, "{e}");
        assert_eq!(e["evidence"]["commitment"]["task_id"], e["task_id"]);
    }
    let s = c.summary();
    assert_eq!(s["steps"], 150);
    assert!(
        s["checks_passed"].as_u64().unwrap() > 20,
        "honest results were checked: {s}"
    );
    // Their contributions before the ban were taken out of the model again.
    let removed: u64 = c
        .events("rolled_back")
        .iter()
        .map(|e| e["removed"].as_u64().unwrap())
        .sum();
    assert!(removed >= 1, "{s}");
    assert!(s["final_test_acc"].as_f64().unwrap() > 0.7, "{s}");
}

#[test]
fn diloco_cheats_are_localised_to_the_first_divergent_inner_step() {
    // int8 with error feedback: a check of a worker's second and later results also has it
    // reveal the values it encoded before, which its signed commitment pins down.
    let extra =
        "[inner_optimizer]\nkind = \"adamw\"\nlr = 0.001\n\n[compression]\ncodec = \"int8\"\n\n\
                 [verification]\np = 0.5\nnew_worker_p = 1.0\n";
    let c = run(160, 4, 64, 2, &["partial", "stale"], extra);
    let (banned, caught) = outcome(&c);
    let want: HashSet<String> = ["partial", "stale"].iter().map(|s| s.to_string()).collect();
    assert_eq!(banned, want, "{}", c.log());
    let step = |who: &str| {
        caught
            .iter()
            .find(|(w, _)| w == who)
            .map(|(_, e)| e["divergent_step"].clone())
            .unwrap_or_else(|| panic!("{who} not caught"))
    };
    // `partial` takes 2 of its 4 inner steps; `stale` starts from old parameters (step 0),
    // unless caught on its very first task, where old and current parameters coincide.
    assert_eq!(step("partial"), 2);
    let s = c.summary();
    assert_eq!(s["checks_abandoned"], 0, "{s}");
    assert!(s["checks_passed"].as_u64().unwrap() >= 10, "{s}");
}

#[test]
fn honest_workers_pass_every_check() {
    // Every result re-executed, with error feedback, DiLoCo rounds and a quantized downlink.
    let extra = "[compression]\ncodec = \"int8\"\n\n[downlink]\ncodec = \"int8\"\n\n\
                 [verification]\np = 1.0\nnew_worker_p = 1.0\n";
    let c = run(120, 2, 48, 3, &[], extra);
    let s = c.summary();
    assert_eq!(s["cheats_caught"], 0, "{s}");
    assert_eq!(s["checks_abandoned"], 0, "{s}");
    assert_eq!(s["checks"], s["tasks_ok"], "every result checked: {s}");
    // 60 rounds over 3 workers; the pace may keep one off the path for a few rounds.
    assert!(s["checks"].as_u64().unwrap() >= 150, "{s}");
    assert!(s["banned"].as_array().unwrap().is_empty());
}
