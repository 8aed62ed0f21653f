//! Unit and property tests of the core, driven by a scripted driver in virtual time.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use verify::{SpotCheckPolicy, WorkerId};

use super::*;

/// Batches of `size` consecutive sample indices.
struct Seq(usize);

impl Batches for Seq {
    fn batch(&self, index: u64) -> Vec<u32> {
        let s = self.0 as u32;
        (index as u32 * s..(index as u32 + 1) * s).collect()
    }
}

fn cfg() -> Config {
    Config {
        min_workers: 1,
        start_gather: Duration::ZERO,
        balance_by_speed: false,
        first_task_timeout: Duration::from_secs(60),
        min_task_timeout: Duration::from_secs(5),
        straggler_grace: Duration::from_secs(1),
        max_strikes: 3,
        max_pending_checks: 4,
        checks: None,
        run_seed: 7,
        inner_batches: 1,
        total_batches: 1000,
        growth: None,
        next_hints: false,
    }
}

fn w(i: u8) -> WorkerId {
    WorkerId([i; 32])
}

/// A core and a clock, with the actions collected.
struct Harness {
    core: Core<u64, Seq>,
    t0: Instant,
    now: Instant,
    sent: Vec<(u64, TaskSpec)>,
    closed: Vec<(u64, CloseWhy)>,
    commits: Vec<Commit<u64>>,
    banned: Vec<WorkerId>,
    offences: usize,
    accepted: Vec<(WorkerId, u64)>,
}

impl Harness {
    fn new(cfg: Config) -> Self {
        let t0 = Instant::now();
        Harness {
            core: Core::new(cfg, Seq(8), Vec::new(), 0),
            t0,
            now: t0,
            sent: Vec::new(),
            closed: Vec::new(),
            commits: Vec::new(),
            banned: Vec::new(),
            offences: 0,
            accepted: Vec::new(),
        }
    }

    fn drain(&mut self) {
        while let Some(a) = self.core.poll_action() {
            match a {
                Action::SendTask { conn, task, .. } => self.sent.push((conn, task)),
                Action::Close { conn, why, .. } => self.closed.push((conn, why)),
                Action::Commit(c) => self.commits.push(c),
                Action::Banned { worker, .. } => self.banned.push(worker),
                Action::Offence { .. } => self.offences += 1,
                Action::Accepted { worker, task, .. } => self.accepted.push((worker, task.task_id)),
                _ => {}
            }
        }
    }

    fn at(&mut self, ms: u64) {
        self.now = self.t0 + Duration::from_millis(ms);
        self.core.handle_timeout(self.now);
        self.drain();
    }

    fn input(&mut self, i: Input) {
        self.core.handle(self.now, i);
        self.drain();
    }

    fn join(&mut self, conn: u64, worker: WorkerId) {
        self.input(Input::Joined { conn, worker });
    }

    fn open(&mut self, round: u64) {
        self.core.open_round(self.now, round, round);
        self.drain();
    }

    /// The task `conn` holds (the last sent to it).
    fn task_of(&self, conn: u64) -> u64 {
        self.sent
            .iter()
            .rev()
            .find(|(c, _)| *c == conn)
            .expect("a task")
            .1
            .task_id
    }

    fn answer(&mut self, conn: u64, valid: bool) {
        self.answer_ms(conn, valid, 1.0);
    }

    /// Answers `conn`'s task, reporting `compute_ms` of compute.
    fn answer_ms(&mut self, conn: u64, valid: bool, compute_ms: f64) {
        let task = self.task_of(conn);
        self.core.handle_result(self.now, conn, task, |_| {
            if valid {
                Ok(Valid {
                    result: task,
                    compute_ms,
                })
            } else {
                Err("bad".into())
            }
        });
        self.drain();
    }
}

#[test]
fn a_round_splits_over_idle_workers_and_commits_in_part_order() {
    let mut h = Harness::new(cfg());
    for i in 0..3 {
        h.join(10 + i, w(3 - i as u8));
    }
    h.open(0);
    assert_eq!(h.core.phase(), Phase::InFlight);
    assert_eq!(h.sent.len(), 3);
    // Parts go in key order: worker 1 (conn 12) gets part 0.
    assert_eq!((h.sent[0].0, h.sent[0].1.part), (12, 0));
    for c in [11, 12, 10] {
        h.answer(c, true);
    }
    assert_eq!(h.commits.len(), 1);
    let c = &h.commits[0];
    assert_eq!(
        c.answers.iter().map(|a| a.worker).collect::<Vec<_>>(),
        vec![w(1), w(2), w(3)]
    );
    assert_eq!(h.core.phase(), Phase::Idle);
    let mut samples: Vec<u32> = h
        .sent
        .iter()
        .flat_map(|(_, t)| t.slice.indices.clone())
        .collect();
    samples.sort();
    assert_eq!(samples, (0..8).collect::<Vec<_>>());
}

#[test]
fn min_workers_and_the_check_backlog_hold_the_first_round() {
    let mut h = Harness::new(Config {
        min_workers: 2,
        ..cfg()
    });
    h.join(1, w(1));
    h.open(0);
    assert_eq!(h.core.phase(), Phase::Waiting);
    h.core.set_checks(h.now, 4, HashSet::new());
    h.join(2, w(2));
    assert_eq!(h.core.phase(), Phase::Waiting, "backlog full");
    h.core.set_checks(h.now, 0, HashSet::new());
    h.drain();
    assert_eq!(h.core.phase(), Phase::InFlight);
    // A disputed worker gets nothing.
    h.answer(1, true);
    h.answer(2, true);
    h.core.set_checks(h.now, 0, [w(1)].into_iter().collect());
    h.open(1);
    assert_eq!(h.sent.last().map(|s| s.0), Some(2));
    assert_eq!(h.sent.len(), 3);
}

#[test]
fn a_leaving_worker_s_part_goes_to_an_idle_one() {
    let mut h = Harness::new(cfg());
    h.join(1, w(1));
    h.join(2, w(2));
    h.open(0);
    h.answer(2, true);
    h.input(Input::Left {
        conn: 1,
        reason: "gone".into(),
        offence: false,
    });
    // Conn 2 is idle and never tried part 0.
    assert_eq!(h.sent.last().map(|(c, t)| (*c, t.part)), Some((2, 0)));
    h.answer(2, true);
    assert_eq!(h.commits.len(), 1);
    assert_eq!(h.offences, 0);
}

#[test]
fn tasks_carry_the_same_positions_of_the_next_round_when_asked() {
    let mut h = Harness::new(Config {
        next_hints: true,
        total_batches: 2,
        ..cfg()
    });
    h.join(1, w(1));
    h.join(2, w(2));
    h.open(0);
    // Round 0 is batch 0..8 in two parts; round 1 is batch 8..16 split the same way.
    let next: HashMap<u64, Vec<u32>> = h.sent.iter().map(|(c, t)| (*c, t.next.clone())).collect();
    let parts: HashMap<u64, Vec<u32>> = h
        .sent
        .iter()
        .map(|(c, t)| (*c, t.slice.indices.clone()))
        .collect();
    for conn in [1, 2] {
        let now: Vec<u32> = parts[&conn].iter().map(|i| i + 8).collect();
        assert_eq!(next[&conn], now, "conn {conn}");
    }
    // The last round has nothing after it.
    h.answer(1, true);
    h.answer(2, true);
    h.open(1);
    assert!(h.sent[2..].iter().all(|(_, t)| t.next.is_empty()));
    // Without the option, no hint.
    let mut plain = Harness::new(cfg());
    plain.join(1, w(1));
    plain.open(0);
    assert!(plain.sent[0].1.next.is_empty());
}

#[test]
fn offences_before_joining_strike_the_key_and_three_ban_it() {
    let mut h = Harness::new(cfg());
    h.join(1, w(1));
    for conn in 10..13 {
        h.input(Input::Offence {
            conn,
            worker: w(2),
            reason: "data request refused".into(),
        });
    }
    assert_eq!(h.offences, 3);
    assert_eq!(h.banned, vec![w(2)]);
    assert!(h.core.discipline().is_banned(&w(2)));
    assert!(!h.core.discipline().is_banned(&w(1)));
}

#[test]
fn a_missed_deadline_reassigns_and_the_late_answer_is_dropped_without_blame() {
    let mut h = Harness::new(cfg());
    h.join(1, w(1));
    h.join(2, w(2));
    h.open(0);
    h.answer(2, true);
    // The backup time (4x the first answer's 0 ms, plus the 1 s grace) comes before the
    // 60 s deadline of a first task.
    assert_eq!(h.core.poll_timeout(), Some(h.t0 + Duration::from_secs(1)));
    h.at(1_001);
    assert_eq!(h.sent.last().map(|(c, t)| (*c, t.part)), Some((2, 0)));
    h.answer(2, true);
    assert_eq!(h.commits.len(), 1);
    // Conn 1 answers its old task of a committed round: ignored, no strike, idle again.
    let old = h.sent[0].1.task_id;
    h.core.handle_result(h.now, 1, old, |_| {
        Ok(Valid {
            result: old,
            compute_ms: 1.0,
        })
    });
    h.drain();
    assert_eq!(h.offences, 0);
    assert_eq!(h.core.members().get(1).and_then(|m| m.busy), None);
}

#[test]
fn a_silent_worker_is_closed_without_a_strike() {
    let mut h = Harness::new(cfg());
    h.join(1, w(1));
    h.open(0);
    h.at(60_000 * 3 + 30_001);
    assert_eq!(h.closed, vec![(1, CloseWhy::Timeout)]);
    assert_eq!(h.offences, 0);
    assert!(h.core.members().is_empty());
}

#[test]
fn invalid_results_strike_and_three_strikes_ban() {
    let mut h = Harness::new(cfg());
    h.join(100, w(1));
    for round in 0..3 {
        // The cheater joins again each round; its task (a part, or a probe copy once the
        // honest worker is measured) gets an invalid answer.
        h.join(round + 1, w(9));
        h.open(round);
        h.answer(round + 1, false);
        assert_eq!(h.offences, round as usize + 1);
        // The honest worker answers whatever it holds until the round is committed.
        while h.commits.len() == round as usize {
            h.answer(100, true);
        }
    }
    assert_eq!(h.banned, vec![w(9)]);
    h.join(50, w(9));
    assert_eq!(h.closed.last(), Some(&(50, CloseWhy::Auth)));
    assert!(h.core.members().get(50).is_none());
}

#[test]
fn an_operator_ban_closes_the_connection_once_and_refuses_the_key_later() {
    let mut h = Harness::new(cfg());
    h.join(1, w(1));
    h.join(2, w(2));
    h.open(0);
    h.answer(1, true);
    for _ in 0..2 {
        h.input(Input::Ban {
            worker: w(1),
            reason: "spam".into(),
        });
    }
    assert_eq!(h.banned, vec![w(1)], "banned once");
    assert!(h.closed.contains(&(1, CloseWhy::Auth)));
    // A key that is not connected can be banned too.
    h.input(Input::Ban {
        worker: w(7),
        reason: "known bad".into(),
    });
    assert_eq!(h.banned, vec![w(1), w(7)]);
    h.join(3, w(7));
    assert_eq!(h.closed.last(), Some(&(3, CloseWhy::Auth)));
    assert!(h.core.members().get(3).is_none());
}

#[test]
fn a_caught_worker_loses_its_answers_in_the_round_and_its_connection() {
    let mut h = Harness::new(cfg());
    h.join(1, w(1));
    h.join(2, w(2));
    h.open(0);
    h.answer(1, true);
    h.input(Input::Caught {
        worker: w(1),
        reason: "noise".into(),
    });
    assert_eq!(h.banned, vec![w(1)]);
    assert!(h.closed.contains(&(1, CloseWhy::Auth)));
    h.answer(2, true);
    assert!(h.commits.is_empty(), "part 0 needs a new answer");
    assert_eq!(h.sent.last().map(|(c, t)| (*c, t.part)), Some((2, 0)));
    h.answer(2, true);
    assert_eq!(
        h.commits[0]
            .answers
            .iter()
            .map(|a| a.worker)
            .collect::<Vec<_>>(),
        vec![w(2), w(2)]
    );
}

#[test]
fn an_abandoned_check_reopens_the_part_and_strikes_only_a_reachable_worker() {
    let mut h = Harness::new(cfg());
    h.join(1, w(1));
    h.join(2, w(2));
    h.open(0);
    h.answer(1, true);
    let task = h.task_of(1);
    h.input(Input::CheckAbandoned {
        worker: w(1),
        task_id: task,
        conn: 1,
        reason: "no answer".into(),
        worker_fault: true,
    });
    assert_eq!(h.offences, 1);
    // Conn 1 was idle: it gets the part again (it tried it once, and is not live on it).
    assert_eq!(h.sent.last().map(|(c, t)| (*c, t.part)), Some((1, 0)));
    h.input(Input::CheckAbandoned {
        worker: w(1),
        task_id: task,
        conn: 99,
        reason: "gone".into(),
        worker_fault: true,
    });
    assert_eq!(h.offences, 1, "asked on another connection: no strike");
}

#[test]
fn a_result_for_a_task_not_held_is_an_offence() {
    let mut h = Harness::new(cfg());
    h.join(1, w(1));
    h.open(0);
    h.core
        .handle_result(h.now, 1, 12345, |_| Err("never called".into()));
    h.drain();
    assert_eq!(h.offences, 1);
    assert_eq!(h.closed, vec![(1, CloseWhy::Protocol)]);
    h.input(Input::TaskFailed {
        conn: 1,
        task_id: 1,
        reason: "x".into(),
    });
    assert_eq!(h.offences, 1, "a closed connection is forgotten");
}

#[test]
fn a_reconnect_replaces_the_old_connection() {
    let mut h = Harness::new(cfg());
    h.join(1, w(1));
    h.open(0);
    h.join(2, w(1));
    assert_eq!(h.closed, vec![(1, CloseWhy::Protocol)]);
    assert_eq!(h.sent.last().map(|(c, _)| *c), Some(2));
    assert_eq!(h.offences, 0);
}

#[test]
fn rounds_grow_with_the_workers_present() {
    let growth = Some(Growth {
        min_micro_batch: 2,
        max_global_batch: 32,
    });
    let mut h = Harness::new(Config {
        growth,
        inner_batches: 2,
        ..cfg()
    });
    for i in 0..10u64 {
        h.join(i, WorkerId([i as u8 + 1; 32]));
    }
    h.open(0);
    // 10 workers x 2 samples = 20 per inner batch: 3 global batches of 8 merged (24 <= 32).
    assert_eq!(h.sent.len(), 10);
    assert!(h.sent.iter().all(|(_, t)| t.slice.micro.len() == 2));
    let mut all: Vec<u32> = h
        .sent
        .iter()
        .flat_map(|(_, t)| t.slice.indices.clone())
        .collect();
    all.sort();
    assert_eq!(all, (0..48).collect::<Vec<_>>());
    for i in 0..10 {
        h.answer(i, true);
    }
    assert_eq!(h.commits[0].batches, 6);
}

#[test]
fn checks_are_drawn_by_the_policy() {
    let policy = SpotCheckPolicy {
        base_p: 1.0,
        new_worker_p: 1.0,
        trusted_after: 1,
    };
    let mut h = Harness::new(Config {
        checks: Some((policy, [3; 32])),
        ..cfg()
    });
    h.join(1, w(1));
    h.open(0);
    h.answer(1, true);
    let mut drawn = false;
    // Re-run to see the flag (the harness drops it): every result is drawn at p = 1.
    h.open(1);
    let task = h.task_of(1);
    h.core.handle_result(h.now, 1, task, |_| {
        Ok(Valid {
            result: task,
            compute_ms: 1.0,
        })
    });
    while let Some(a) = h.core.poll_action() {
        if let Action::Accepted { check, .. } = a {
            drawn = check;
        }
    }
    assert!(drawn);
}

/// Whether task `task`'s round was committed (removals after that are the ledger's rollback).
fn committed(h: &Harness, task: u64) -> bool {
    let round = h
        .sent
        .iter()
        .find(|(_, t)| t.task_id == task)
        .map(|(_, t)| t.round);
    h.commits.iter().any(|c| Some(c.round) == round)
}

/// What a random driver may do at each step.
#[derive(Clone, Debug)]
enum Op {
    Join(u8),
    Leave(u8),
    Answer(u8, bool),
    Fail(u8),
    Caught(u8),
    Abandon(u8),
    Tick(u16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..8).prop_map(Op::Join),
        (0u8..8).prop_map(Op::Leave),
        (0u8..8, prop::bool::weighted(0.9)).prop_map(|(w, v)| Op::Answer(w, v)),
        (0u8..8).prop_map(Op::Fail),
        (0u8..8).prop_map(Op::Caught),
        (0u8..8).prop_map(Op::Abandon),
        (0u16..20_000).prop_map(Op::Tick),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Over random event orders: no round is committed twice, every part is answered once
    /// (the commit covers the round's samples exactly), an accepted answer is never lost
    /// (it is in its round's commit unless its worker was banned or its check abandoned
    /// first), and a banned key never gets work.
    #[test]
    fn random_event_orders_keep_the_invariants(ops in prop::collection::vec(op(), 1..200)) {
        let mut h = Harness::new(Config { max_strikes: 2, ..cfg() });
        let mut conn_of: HashMap<u8, u64> = HashMap::new();
        let mut next_conn = 0;
        let mut round = 0;
        let mut t = 0u64;
        let mut removed: HashSet<u64> = HashSet::new();
        h.open(round);
        for op in ops {
            let before_sent = h.sent.len();
            match op {
                Op::Join(i) => {
                    next_conn += 1;
                    conn_of.insert(i, next_conn);
                    h.join(next_conn, w(i + 1));
                }
                Op::Leave(i) => {
                    if let Some(c) = conn_of.remove(&i) {
                        h.input(Input::Left { conn: c, reason: "x".into(), offence: i % 3 == 0 });
                    }
                }
                Op::Answer(i, valid) => {
                    if let Some(&c) = conn_of.get(&i) {
                        if let Some(task) = h.core.members().get(c).and_then(|m| m.busy) {
                            h.core.handle_result(h.now, c, task, |_| if valid { Ok(Valid { result: task, compute_ms: 1.0 }) } else { Err("bad".into()) });
                            h.drain();
                        }
                    }
                }
                Op::Fail(i) => {
                    if let Some(&c) = conn_of.get(&i) {
                        if let Some(task) = h.core.members().get(c).and_then(|m| m.busy) {
                            h.input(Input::TaskFailed { conn: c, task_id: task, reason: "oom".into() });
                        }
                    }
                }
                Op::Caught(i) => {
                    if i % 4 == 0 {
                        for (_, task) in h.accepted.iter().filter(|(x, _)| *x == w(i + 1)) {
                            if !committed(&h, *task) {
                                removed.insert(*task);
                            }
                        }
                        h.input(Input::Caught { worker: w(i + 1), reason: "x".into() });
                    }
                }
                Op::Abandon(i) => {
                    if let Some(&(wk, task)) = h.accepted.iter().rev().find(|(x, _)| *x == w(i + 1)) {
                        if !committed(&h, task) {
                            removed.insert(task);
                        }
                        let c = conn_of.get(&i).copied().unwrap_or(0);
                        h.input(Input::CheckAbandoned { worker: wk, task_id: task, conn: c, reason: "x".into(), worker_fault: true });
                    }
                }
                Op::Tick(ms) => {
                    t += u64::from(ms);
                    h.at(t);
                }
            }
            for (_, task) in &h.sent[before_sent..] {
                let holder = h.sent.iter().find(|(_, x)| x.task_id == task.task_id).map(|(c, _)| *c);
                let worker = holder.and_then(|c| h.core.members().get(c)).map(|m| m.worker);
                prop_assert!(worker.is_none_or(|wk| !h.core.discipline().is_banned(&wk)), "a banned key got work");
            }
            if h.core.phase() == Phase::Idle {
                round += 1;
                h.open(round);
            }
        }
        let rounds: Vec<u64> = h.commits.iter().map(|c| c.round).collect();
        let unique: HashSet<u64> = rounds.iter().copied().collect();
        prop_assert_eq!(unique.len(), rounds.len(), "a round committed twice");
        for c in &h.commits {
            let tasks: Vec<&TaskSpec> = c.answers.iter().map(|a| &h.sent.iter().find(|(_, t)| t.task_id == a.task_id).expect("sent").1).collect();
            let parts: HashSet<usize> = tasks.iter().map(|t| t.part).collect();
            prop_assert_eq!(parts.len(), tasks.len(), "a part answered twice");
            let mut samples: Vec<u32> = tasks.iter().flat_map(|t| t.slice.indices.clone()).collect();
            samples.sort();
            prop_assert_eq!(samples, Seq(8).batch(c.round), "the commit covers the round's samples");
            for a in &c.answers {
                prop_assert!(!removed.contains(&a.task_id), "an answer removed before its commit was kept");
            }
        }
        for (wk, task) in &h.accepted {
            let round = h.sent.iter().find(|(_, t)| t.task_id == *task).expect("sent").1.round;
            if h.commits.iter().any(|c| c.round == round) && !removed.contains(task) && !h.core.discipline().is_banned(wk) {
                let kept = h.commits.iter().any(|c| c.answers.iter().any(|a| a.task_id == *task));
                prop_assert!(kept, "accepted task {} lost", task);
            }
        }
    }
}

#[test]
fn pace_keeps_slow_workers_off_the_critical_path() {
    let s = |ms: f64| {
        Some(Speed {
            ms_per_sample: ms,
            floor: None,
        })
    };
    // Nobody measured: everyone.
    assert_eq!(pace(&[None, None], 64, 1), (vec![0, 1], None));
    // 300x slower: out; 2x slower: in.
    let (taken, target) = pace(&[s(0.2), s(60.0), s(0.4)], 64, 1);
    assert_eq!(taken, vec![0, 2]);
    let t = target.expect("a target").as_secs_f64() * 1000.0;
    assert!((t - 64.0 / (5.0 + 2.5)).abs() < 1e-5, "{t}");
    // Equal workers all stay, whatever their number (up to a part per sample).
    assert_eq!(pace(&[s(1.0); 32], 64, 1).0.len(), 32);
    // Unmeasured ones go off the path once someone is measured.
    assert_eq!(pace(&[None, s(1.0)], 64, 1).0, vec![1]);
    // A worker whose per-sample time looks fine but whose fixed cost per task exceeds the
    // round's time stays out.
    let costly = |samples| {
        Some(Speed {
            ms_per_sample: 0.3,
            floor: Some(Floor { ms: 500.0, samples }),
        })
    };
    assert_eq!(pace(&[s(0.2), costly(8)], 64, 1).0, vec![0]);
    // A floor measured on a whole part (a probe) says nothing about a smaller share: a
    // worker 2.5x slower, probed on the whole 64 samples, is taken for its share of 18.
    let probed = Some(Speed {
        ms_per_sample: 0.5,
        floor: Some(Floor {
            ms: 32.0,
            samples: 64,
        }),
    });
    assert_eq!(pace(&[s(0.2), probed], 64, 1).0, vec![0, 1]);
}

#[test]
fn a_probe_s_floor_bounds_tasks_at_least_as_large_as_the_probe() {
    let f = Floor {
        ms: 100.0,
        samples: 32,
    };
    assert_eq!((f.under(32), f.under(64), f.under(31)), (100.0, 100.0, 0.0));
    let probe = |took, n| Floor::after(Some(f), took, n, true);
    let floor = |ms, samples| Floor { ms, samples };
    // Quicker: lower at once, at the smaller size.
    assert_eq!(probe(60.0, 64), floor(60.0, 32));
    assert_eq!(probe(60.0, 8), floor(60.0, 8));
    // Slower on a task no larger: a fifth of the way up, from that size.
    assert_eq!(probe(200.0, 16), floor(120.0, 16));
    // Slower on a larger task: nothing new.
    assert_eq!(probe(200.0, 64), f);
    // A part of its own bounds every size.
    assert_eq!(Floor::after(None, 50.0, 64, false), floor(50.0, 1));
    assert_eq!(Floor::after(Some(f), 200.0, 64, false), floor(120.0, 1));
}

#[test]
fn new_and_slow_workers_get_probes_the_round_does_not_wait_for() {
    let mut h = Harness::new(cfg());
    h.join(1, w(1));
    // Two rounds measure worker 1 (its first answer does not count).
    for round in 0..2 {
        h.open(round);
        h.at(10 * (round + 1));
        h.answer(1, true);
    }
    // A new worker joins: next round it gets a copy of part 0 as a probe.
    h.join(2, w(2));
    h.open(2);
    let sent: Vec<(u64, usize)> = h.sent[2..].iter().map(|(c, t)| (*c, t.part)).collect();
    assert_eq!(sent, vec![(1, 0), (2, 0)]);
    h.at(30);
    h.answer(1, true);
    assert_eq!(h.commits.len(), 3, "the round did not wait for the probe");
    // Its first answer only warms it up: another probe.
    h.at(1030);
    h.answer(2, true);
    assert_eq!(h.offences, 0, "a late answer is no offence");
    h.open(3);
    assert_eq!(h.sent.last().map(|(c, _)| *c), Some(2));
    h.at(1040);
    h.answer(1, true);
    // The second probe answers 100x slower than worker 1: measured, kept off the path.
    h.at(2040);
    h.answer(2, true);
    h.open(4);
    assert_eq!(h.sent.last().map(|(c, _)| *c), Some(1));
    assert!(
        h.core.round().is_some_and(|r| r.parts.len() == 1),
        "only worker 1 on the path"
    );
    let n = h.sent.len();
    h.at(2050);
    h.answer(1, true);
    h.open(5);
    assert_eq!(h.sent.len(), n + 1, "no probe before 5 s");
    // It is measured again after a while.
    h.at(2060);
    h.answer(1, true);
    h.at(8000);
    h.open(6);
    assert_eq!(h.sent.last().map(|(c, _)| *c), Some(2));
    assert!(h.core.round().is_some_and(|r| r.parts.len() == 1));
}

#[test]
fn a_stalled_worker_is_replaced_at_a_deadline_from_the_round_s_target() {
    let mut h = Harness::new(Config {
        min_task_timeout: Duration::from_millis(100),
        ..cfg()
    });
    h.join(1, w(1));
    h.join(2, w(2));
    // A connection's first answer does not measure it; the second does.
    for round in 0..2 {
        h.open(round);
        h.at(8 * (round + 1));
        h.answer(1, true);
        h.answer(2, true);
    }
    h.open(2);
    // Both measured at 2 ms per sample (8 ms for 4 samples).
    let deadline = h.core.poll_timeout().expect("deadlines");
    assert!(
        deadline <= h.now + Duration::from_secs(2),
        "not the 60 s first-task timeout"
    );
    h.answer(1, true);
    h.at((deadline - h.t0).as_millis() as u64 + 1);
    assert_eq!(
        h.sent.last().map(|(c, t)| (*c, t.part)),
        Some((1, 1)),
        "worker 2's part went to worker 1"
    );
}

#[test]
fn unpredicted_stragglers_are_backed_up_after_the_first_answer() {
    let mut h = Harness::new(cfg());
    for i in 1..=4 {
        h.join(i, w(i as u8));
    }
    h.open(0);
    // Nobody is measured: four parts. Worker 1 answers at 50 ms; the others stall.
    h.at(50);
    h.answer(1, true);
    assert_eq!(
        h.core.poll_timeout(),
        Some(h.t0 + Duration::from_millis(50 + 200 + 1000))
    );
    h.at(1250);
    // Parts 1..3 go to worker 1 one after the other; the stragglers' answers come too late.
    for part in 1..4 {
        assert_eq!(h.sent.last().map(|(c, t)| (*c, t.part)), Some((1, part)));
        h.answer(1, true);
    }
    assert_eq!(h.commits.len(), 1);
    for c in 2..=4 {
        h.answer(c, true);
    }
    assert_eq!(h.offences, 0);
    assert!(h.commits[0].answers.iter().all(|a| a.worker == w(1)));
}

#[test]
fn a_newcomer_copies_a_part_of_a_round_only_slow_workers_started() {
    let mut h = Harness::new(cfg());
    h.join(1, w(1));
    h.open(0);
    // Worker 1 (unmeasured) holds the only part; worker 2 joins and gets a copy.
    h.join(2, w(2));
    assert_eq!(h.sent.last().map(|(c, t)| (*c, t.part)), Some((2, 0)));
    h.at(30);
    h.answer(2, true);
    assert_eq!(h.commits.len(), 1, "the copy's answer completed the round");
    h.at(9000);
    h.answer(1, true);
    assert_eq!(h.offences, 0);
}

#[test]
fn in_diloco_rounds_a_slower_worker_takes_smaller_micro_batches_and_still_contributes() {
    let mut h = Harness::new(Config {
        inner_batches: 4,
        balance_by_speed: true,
        ..cfg()
    });
    h.join(1, w(1));
    h.join(2, w(2));
    let mut t = 0;
    let (mut fast, mut slow) = (0.0, 0.0);
    for round in 0..12 {
        h.open(round * 4);
        let last = |h: &Harness, c: u64| {
            h.sent
                .iter()
                .rev()
                .find(|(x, _)| *x == c)
                .map(|(_, t)| t.slice.clone())
                .expect("sent")
        };
        let (a, b) = (last(&h, 1), last(&h, 2));
        assert_eq!(
            (a.micro.len(), b.micro.len()),
            (4, 4),
            "both take all 4 inner steps"
        );
        assert!(
            b.micro.iter().all(|&m| m > 0),
            "the slow one contributes to every step"
        );
        if round >= 4 {
            fast += a.indices.len() as f64;
            slow += b.indices.len() as f64;
        }
        // Worker 2 computes at half worker 1's speed (time proportional to its samples).
        let (ta, tb) = (a.indices.len() as f64, 2.0 * b.indices.len() as f64);
        h.at(t + ta as u64);
        h.answer_ms(1, true, ta);
        h.at(t + tb as u64);
        h.answer_ms(2, true, tb);
        t += tb as u64 + 10;
        h.at(t);
    }
    assert!(
        slow < 0.8 * fast,
        "samples once balanced: fast {fast}, slow {slow}"
    );
    assert!(
        h.commits.iter().all(|c| c.answers.len() == 2),
        "both contribute every round: {:?}",
        h.commits
            .iter()
            .map(|c| c.answers.iter().map(|a| a.worker.0[0]).collect::<Vec<_>>())
            .collect::<Vec<_>>()
    );
}

#[test]
fn a_worker_whose_fixed_cost_outweighs_its_samples_goes_off_the_path() {
    let mut h = Harness::new(Config {
        balance_by_speed: true,
        ..cfg()
    });
    h.join(1, w(1));
    h.join(2, w(2));
    let mut t = 0;
    let mut rounds_with_2 = Vec::new();
    for round in 0..30 {
        h.open(round);
        let on_path = h.core.round().map_or(0, |r| r.parts.len());
        rounds_with_2.push(on_path == 2);
        // Worker 1: 1 ms per sample. Worker 2: 40 ms whatever its share (fixed cost).
        let n1 = h
            .sent
            .iter()
            .rev()
            .find(|(c, _)| *c == 1)
            .map_or(0, |(_, t)| t.slice.indices.len());
        h.at(t + n1 as u64);
        h.answer_ms(1, true, n1 as f64);
        if on_path == 2 {
            h.at(t + 40);
            h.answer_ms(2, true, 40.0);
        }
        t += 100;
        assert_eq!(h.commits.len(), round as usize + 1);
    }
    assert!(rounds_with_2[0], "both start");
    assert!(
        !rounds_with_2[20..].iter().any(|x| *x),
        "worker 2 squeezed off the path: {rounds_with_2:?}"
    );
    assert_eq!(h.offences, 0);
}

#[test]
fn a_part_nobody_idle_can_take_in_time_goes_to_the_first_worker_that_can() {
    let mut h = Harness::new(cfg());
    for c in 1..=3 {
        h.join(c, w(c as u8));
    }
    // Round 0 warms everyone up; round 1 measures workers 1 and 2 at 10 ms and worker 3 at
    // 5 s (its part is backed up by worker 1).
    h.open(0);
    h.at(10);
    for c in 1..=3 {
        h.answer(c, true);
    }
    h.open(1);
    h.at(20);
    h.answer(1, true);
    h.answer(2, true);
    h.at(2000);
    h.answer(1, true);
    assert_eq!(h.commits.len(), 2);
    h.at(5000);
    h.answer(3, true);
    // Round 2 waits for workers 1 and 2 only; worker 2 leaves, and the slow worker 3, idle,
    // cannot take its part in time, event after event.
    h.open(2);
    assert_eq!(h.core.round().map(|r| r.parts.len()), Some(2));
    h.input(Input::Left {
        conn: 2,
        reason: "gone".into(),
        offence: false,
    });
    for ms in [5001, 5002, 5003] {
        h.at(ms);
    }
    assert!(
        h.sent.iter().all(|(c, t)| *c != 3 || t.round < 2),
        "the slow worker got no part: {:?}",
        h.sent
            .iter()
            .map(|(c, t)| (*c, t.round, t.part))
            .collect::<Vec<_>>()
    );
    // Worker 1 answers: idle again, it takes the part left over, and the round commits.
    h.at(5010);
    h.answer(1, true);
    assert_eq!(h.sent.last().map(|(c, t)| (*c, t.round)), Some((1, 2)));
    h.at(5020);
    h.answer(1, true);
    assert_eq!(h.commits.len(), 3);
}

#[test]
fn at_the_start_the_parts_of_workers_far_slower_than_the_first_answer_are_backed_up() {
    let mut h = Harness::new(Config {
        balance_by_speed: true,
        ..cfg()
    });
    for c in 1..=4 {
        h.join(c, w(c as u8));
    }
    // Nobody is measured: everyone takes a part.
    h.open(0);
    assert_eq!(h.sent.len(), 4);
    h.at(500);
    h.answer(1, true);
    // 4x the first answer's time plus the grace (1 s) later, the open parts go to worker 1.
    let mut t = 500;
    while h.commits.is_empty() && t < 20_000 {
        t += 100;
        h.at(t);
        if h.sent.last().is_some_and(|(c, _)| *c == 1) && h.core.round().is_some() {
            h.at(t + 50);
            h.answer(1, true);
        }
    }
    assert_eq!(
        h.commits.len(),
        1,
        "the round committed without the slow workers"
    );
    assert!(
        t <= 500 + 2000 + 1000 + 1000,
        "backed up in time, committed at {t} ms"
    );
}

#[test]
fn the_first_round_gathers_the_workers_that_start_together() {
    let mut h = Harness::new(Config {
        start_gather: Duration::from_secs(1),
        ..cfg()
    });
    h.join(1, w(1));
    h.open(0);
    assert!(h.sent.is_empty(), "gathering");
    assert_eq!(
        h.core.poll_timeout(),
        Some(h.t0 + Duration::from_secs(1)),
        "woken when gathering ends"
    );
    // The only worker leaves and comes back: gathering starts again, and no wake-up is
    // left in the past meanwhile.
    h.at(200);
    h.input(Input::Left {
        conn: 1,
        reason: "gone".into(),
        offence: false,
    });
    h.at(1500);
    assert!(
        h.core.poll_timeout().is_none_or(|t| t > h.now),
        "no busy loop"
    );
    h.join(1, w(1));
    h.at(1800);
    h.join(2, w(2));
    h.at(2499);
    assert!(h.sent.is_empty());
    h.at(2500);
    let parts: Vec<(u64, usize)> = h.sent.iter().map(|(c, t)| (*c, t.part)).collect();
    assert_eq!(parts, vec![(1, 0), (2, 1)], "one round over both");
    // Later rounds start at once.
    h.answer(1, true);
    h.answer(2, true);
    h.open(1);
    assert_eq!(h.sent.len(), 4);
}
