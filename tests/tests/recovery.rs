//! Crashes: `kill -9` of the coordinator loses no accepted round; workers killed and
//! restarted at random never corrupt the run; a chaos run ends as well as a calm one.

use std::time::Duration;

use integration_tests::{free_port, quick_config, wait_until, Coordinator, Worker};
use rand::{Rng, SeedableRng};

const MINUTE: Duration = Duration::from_secs(60);

/// Steps of the `step` events, in order.
fn steps(c: &Coordinator) -> Vec<u64> {
    c.events("step")
        .iter()
        .map(|e| e["step"].as_u64().unwrap())
        .collect()
}

/// A restart resumes at the last reported round, or at the one after it when that round
/// was logged but the crash came before its report: then the restart reports it, marked
/// `recovered`.
fn assert_resumed_at(c: &Coordinator, resumed: u64, last_reported: u64) {
    let recovered: Vec<u64> = c
        .events("step")
        .iter()
        .filter(|e| e["recovered"] == true)
        .map(|e| e["step"].as_u64().unwrap())
        .collect();
    if resumed == last_reported {
        assert!(recovered.is_empty(), "recovered {recovered:?}");
    } else {
        assert_eq!(resumed, last_reported + 1, "resumed where it was killed");
        assert_eq!(recovered, vec![resumed]);
    }
}

#[test]
fn kill_9_of_the_coordinator_loses_no_accepted_round() {
    let listen = format!("127.0.0.1:{}", free_port());
    let extra = "[compression]\ncodec = \"int8\"\n";
    let mut c = Coordinator::start(&quick_config("mlp", 240, 64, &listen, extra));
    let join = c.join_string();
    let _w: Vec<Worker> = (0..2)
        .map(|i| Worker::start(&join, c.dir.path(), &format!("w{i}"), &[]))
        .collect();
    wait_until(MINUTE, || (c.steps_done() >= 60).then_some(())).expect("trains");
    c.signal("-KILL");
    c.wait(MINUTE);
    let before = steps(&c);
    let last = *before.last().unwrap();
    // Every round reported was in the write-ahead log before it was reported.
    c.spawn();
    assert!(c.wait(MINUTE * 3).success(), "{}", c.log());
    let resume = c.events("resume").pop().expect("resume event");
    assert_resumed_at(&c, resume["step"].as_u64().unwrap(), last);
    assert_eq!(
        steps(&c),
        (1..=240).collect::<Vec<_>>(),
        "each round exactly once"
    );
    assert_eq!(c.summary()["steps"], 240);
}

#[test]
fn a_round_logged_but_not_reported_is_reported_by_the_restart() {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut c = Coordinator::start_with(
        &quick_config("mlp", 40, 64, &listen, ""),
        &["--test-crash-after-logging", "25"],
    );
    let join = c.join_string();
    let _w = Worker::start(&join, c.dir.path(), "w0", &[]);
    assert_eq!(c.wait(MINUTE).code(), Some(137), "{}", c.log());
    assert_eq!(steps(&c).last(), Some(&24), "round 25 logged, not reported");
    c.spawn();
    assert!(c.wait(MINUTE).success(), "{}", c.log());
    let resume = c.events("resume").pop().expect("resume event");
    assert_eq!(resume["step"], 25);
    assert_resumed_at(&c, 25, 24);
    assert_eq!(steps(&c), (1..=40).collect::<Vec<_>>(), "each round once");
}

#[test]
fn chaos_ends_within_a_point_of_a_calm_run_with_no_round_lost() {
    let run = |chaos: bool| {
        let listen = format!("127.0.0.1:{}", free_port());
        let extra = "[compression]\ncodec = \"int8\"\n\n[workers]\ndeterministic_threads = 1\n";
        let mut c = Coordinator::start(&quick_config("mlp", 300, 64, &listen, extra));
        let join = c.join_string();
        let dir = c.dir.path().to_path_buf();
        let mut workers: Vec<Worker> = (0..4)
            .map(|i| Worker::start(&join, &dir, &format!("w{i}"), &[]))
            .collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let mut killed_coordinator = false;
        let mut last_before_kill = 0;
        while c.child.as_mut().unwrap().try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(rng.gen_range(1000..2500)));
            if !chaos {
                continue;
            }
            let done = c.steps_done();
            if !killed_coordinator && done >= 150 {
                c.signal("-KILL");
                c.wait(MINUTE);
                last_before_kill = steps(&c).last().copied().unwrap_or(0);
                c.spawn();
                killed_coordinator = true;
                continue;
            }
            // Kill a random worker and start it again under the same identity.
            let i = rng.gen_range(0..workers.len());
            workers[i].kill();
            workers[i] = Worker::start(&join, &dir, &format!("w{i}"), &[]);
        }
        assert!(c.wait(MINUTE).success(), "{}", c.log());
        if chaos {
            assert!(killed_coordinator, "the coordinator was killed once");
            let resume = c.events("resume").pop().expect("resumed");
            assert_resumed_at(&c, resume["step"].as_u64().unwrap(), last_before_kill);
        }
        // Counted, not assumed: every round applied exactly once, none lost to a crash.
        assert_eq!(steps(&c), (1..=300).collect::<Vec<_>>());
        c.summary()["final_test_acc"].as_f64().unwrap()
    };
    let calm = run(false);
    let chaos = run(true);
    eprintln!("test accuracy: calm {calm:.4}, chaos {chaos:.4}");
    assert!((calm - chaos).abs() <= 0.01, "calm {calm}, chaos {chaos}");
}
