use bytes::Bytes;
use compression::{CodecConfig, CodecKind, DecodeLimits};
use serde_bytes::ByteBuf;
use trainer::{Optimizer, OptimizerConfig};
use verify::{AggregationConfig, WorkerKey};

use std::path::Path;

use super::*;

const N: usize = 40;

fn rules(downlink: CodecConfig) -> Rules {
    Rules {
        aggregation: AggregationConfig::default(),
        downlink,
        limits: DecodeLimits::default(),
    }
}

fn fresh() -> TrainState {
    TrainState::new(
        (0..N).map(|i| (i as f32 * 0.1).cos()).collect(),
        Optimizer::new(OptimizerConfig::default()),
    )
}

fn worker(i: u8) -> WorkerId {
    WorkerKey::from_seed([i; 32]).public()
}

/// Round `r` with one contribution per worker in `who`.
fn record(r: u64, who: &[u8]) -> RoundRecord {
    RoundRecord {
        round: r,
        contributions: who
            .iter()
            .map(|&w| {
                let g: Vec<f32> = (0..N)
                    .map(|i| {
                        ((i as u64 * 7 + r * 13 + u64::from(w) * 29) % 17) as f32 * 0.01 - 0.08
                    })
                    .collect();
                Contribution {
                    worker: worker(w),
                    task_id: r * 100 + u64::from(w),
                    n_samples: 8 + u32::from(w),
                    loss_sum: 1.0,
                    update: Bytes::from(
                        compression::encode(&g, &CodecConfig::default(), 0).unwrap(),
                    ),
                    verified: false,
                }
            })
            .collect(),
    }
}

/// Opens the ledger of `dir` for run `run`, from a fresh state when there is nothing to resume.
fn open(
    dir: &Path,
    run: u8,
    resume: bool,
    downlink: CodecConfig,
) -> anyhow::Result<(Ledger, Recovered)> {
    Ledger::open(dir, [run; 32], fresh(), resume, rules(downlink), cfg())
}

fn cfg() -> LedgerSection {
    LedgerSection {
        snapshot_every: 3,
        ..Default::default()
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn a_restart_replays_the_log_to_the_same_bits() {
    for downlink in [
        CodecConfig::lossless(),
        CodecConfig {
            codec: CodecKind::Int8,
            ..Default::default()
        },
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (mut l, rec) = open(dir.path(), 3, true, downlink.clone()).unwrap();
        assert!(rec.meta.is_none());
        for r in 0..4 {
            l.commit(record(r, &[1, 2]), vec![], &Meta::default())
                .unwrap();
        }
        l.checkpoint(&Meta::default(), vec![]).unwrap();
        for r in 4..9 {
            let meta = Meta {
                next_task: r,
                ..Default::default()
            };
            l.commit(record(r, &[1, 2, 3]), vec![], &meta).unwrap();
        }
        l.mark_verified(801).unwrap();
        let want = l.state.clone();
        drop(l);
        // As if killed: reopen from checkpoint + log.
        let (l2, rec) = open(dir.path(), 3, true, downlink.clone()).unwrap();
        assert_eq!(rec.replayed, 5);
        assert_eq!(rec.meta.unwrap().next_task, 8);
        assert_eq!(l2.state.round, 9);
        assert_eq!(bits(&l2.state.params), bits(&want.params));
        assert_eq!(
            bits(&l2.state.downlink_residual),
            bits(&want.downlink_residual)
        );
        assert!(l2.holds(|c| c.task_id == 801 && c.verified));
        // Where each worker's error feedback continues: its last contribution, also across
        // the checkpoint (worker 3 joined after it).
        assert_eq!(l2.state.ef_bases, want.ef_bases);
        assert_eq!(l2.state.ef_base(&worker(1)), 801);
        assert_eq!(l2.state.ef_base(&worker(3)), 803);
        assert_eq!(l2.state.ef_base(&worker(4)), 0);
        // resume = false starts over.
        let (l3, rec) = open(dir.path(), 3, false, downlink).unwrap();
        assert_eq!((l3.state.round, rec.replayed), (0, 0));
    }
}

#[test]
fn a_rollback_equals_never_having_had_the_removed_contributions() {
    let dir = tempfile::tempdir().unwrap();
    let (mut l, _) = open(dir.path(), 1, true, CodecConfig::lossless()).unwrap();
    let clean_dir = tempfile::tempdir().unwrap();
    let (mut clean, _) = open(clean_dir.path(), 1, true, CodecConfig::lossless()).unwrap();
    for r in 0..10 {
        // Worker 9 joins at round 4, and its round-6 result was spot-checked and confirmed.
        let who: &[u8] = if r >= 4 { &[1, 9, 2] } else { &[1, 2] };
        l.commit(record(r, who), vec![], &Meta::default()).unwrap();
        let mut honest = record(r, who);
        honest
            .contributions
            .retain(|c| c.worker != worker(9) || c.task_id == 609);
        clean.commit(honest, vec![], &Meta::default()).unwrap();
    }
    l.mark_verified(609).unwrap();
    let rb = l
        .remove(|c| c.worker == worker(9) && !c.verified)
        .unwrap()
        .unwrap();
    assert_eq!(rb.removed, 5, "rounds 4,5,7,8,9");
    assert_eq!(rb.from_round, 3, "the last snapshot before round 4");
    assert_eq!(rb.replayed, 7);
    assert_eq!(bits(&l.state.params), bits(&clean.state.params));
    assert_eq!(l.state.round, 10);
    // Worker 9's error feedback continues from its last contribution that stays.
    assert_eq!(l.state.ef_base(&worker(9)), 609);
    assert_eq!(l.state.ef_bases, clean.state.ef_bases);
    assert!(l
        .remove(|c| c.worker == worker(9) && !c.verified)
        .unwrap()
        .is_none());
    // The rolled-back state survives a restart once checkpointed.
    l.checkpoint(&Meta::default(), vec![]).unwrap();
    drop(l);
    let (back, _) = open(dir.path(), 1, true, CodecConfig::lossless()).unwrap();
    assert_eq!(bits(&back.state.params), bits(&clean.state.params));
    assert_eq!(back.state.ef_bases, clean.state.ef_bases);
}

#[test]
fn history_is_bounded_by_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let small = LedgerSection {
        snapshot_every: 2,
        rollback_window: 6,
        ..Default::default()
    };
    let (mut l, _) = Ledger::open(
        dir.path(),
        [1; 32],
        fresh(),
        true,
        rules(CodecConfig::lossless()),
        small,
    )
    .unwrap();
    for r in 0..20 {
        l.commit(record(r, &[1]), vec![], &Meta::default()).unwrap();
    }
    assert!(l.history_start() >= 20 - 8, "{}", l.history_start());
    assert!(
        !l.holds(|c| c.task_id == 101),
        "round 1 is out of the window"
    );
    assert!(l.holds(|c| c.task_id == 1901));
}

#[test]
fn a_checkpoint_of_another_run_or_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut l, _) = open(dir.path(), 1, true, CodecConfig::lossless()).unwrap();
    l.commit(record(0, &[1]), vec![], &Meta::default()).unwrap();
    l.checkpoint(&Meta::default(), vec![]).unwrap();
    drop(l);
    assert!(open(dir.path(), 2, true, CodecConfig::lossless()).is_err());
    let mut small = fresh();
    small.params.pop();
    let lossless = || rules(CodecConfig::lossless());
    assert!(Ledger::open(dir.path(), [1; 32], small, true, lossless(), cfg()).is_err());
    let p = checkpoint_path(dir.path());
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[20] ^= 1;
    std::fs::write(&p, bytes).unwrap();
    assert!(open(dir.path(), 1, true, CodecConfig::lossless()).is_err());
}

#[test]
fn a_round_is_on_disk_once_flushed_and_redone_if_lost_before() {
    let dir = tempfile::tempdir().unwrap();
    let (mut l, _) = open(dir.path(), 1, true, CodecConfig::lossless()).unwrap();
    for r in 0..3 {
        l.commit(record(r, &[1, 2]), vec![], &Meta::default())
            .unwrap();
    }
    // Committing round 2 logged round 1; round 2 is applied but not on disk yet.
    assert_eq!(l.state.round, 3);
    let after_two = {
        let (l2, rec) = open(dir.path(), 1, true, CodecConfig::lossless()).unwrap();
        assert_eq!(
            (rec.replayed, l2.state.round),
            (2, 2),
            "a kill now loses round 2"
        );
        l2.state
    };
    let want = l.state.clone();
    l.flush().unwrap();
    l.flush().unwrap();
    drop(l);
    let (l, rec) = open(dir.path(), 1, true, CodecConfig::lossless()).unwrap();
    assert_eq!(rec.replayed, 3);
    assert_eq!(bits(&l.state.params), bits(&want.params));
    // The lost round, redone from the state the log gives, gives the same bits.
    let redo_dir = tempfile::tempdir().unwrap();
    let (mut redo, _) = open(redo_dir.path(), 1, true, CodecConfig::lossless()).unwrap();
    redo.state = after_two;
    // (With the first update decoded beforehand, as the scheduler does after validating.)
    let rec = record(2, &[1, 2]);
    let first =
        compression::decode_exact(&rec.contributions[0].update, N, &DecodeLimits::default());
    redo.commit(rec, vec![Some(first.unwrap())], &Meta::default())
        .unwrap();
    assert_eq!(bits(&redo.state.params), bits(&want.params));
    // Anything else written first logs the round before it, in order.
    let mut l = l;
    l.commit(record(3, &[1]), vec![], &Meta::default()).unwrap();
    l.mark_verified(301).unwrap();
    drop(l);
    let (l, rec) = open(dir.path(), 1, true, CodecConfig::lossless()).unwrap();
    assert_eq!(rec.replayed, 4);
    assert!(l.holds(|c| c.task_id == 301 && c.verified));
}

#[test]
fn stored_updates_keep_the_byte_string_layout() {
    // Logs and checkpoints written when updates were `serde_bytes::ByteBuf` still read.
    #[derive(serde::Serialize)]
    struct Before {
        worker: WorkerId,
        task_id: u64,
        n_samples: u32,
        loss_sum: f64,
        update: ByteBuf,
        verified: bool,
    }
    let c = &record(0, &[1]).contributions[0];
    let before = Before {
        worker: c.worker,
        task_id: c.task_id,
        n_samples: c.n_samples,
        loss_sum: c.loss_sum,
        update: ByteBuf::from(c.update.to_vec()),
        verified: c.verified,
    };
    let old = bincode::serialize(&before).unwrap();
    assert_eq!(old, bincode::serialize(c).unwrap());
    let back: Contribution = bincode::deserialize(&old).unwrap();
    assert_eq!(back.update, c.update);
}

#[test]
fn updates_decoded_beforehand_are_used_as_given() {
    // The scheduler hands over what it decoded when validating; the ledger trusts it.
    let dir = tempfile::tempdir().unwrap();
    let (mut a, _) = open(dir.path(), 1, true, CodecConfig::lossless()).unwrap();
    let other = tempfile::tempdir().unwrap();
    let (mut b, _) = open(other.path(), 1, true, CodecConfig::lossless()).unwrap();
    a.commit(record(0, &[1]), vec![None], &Meta::default())
        .unwrap();
    b.commit(record(0, &[1]), vec![Some(vec![0.0; N])], &Meta::default())
        .unwrap();
    assert_ne!(bits(&a.state.params), bits(&b.state.params));
    // A zero gradient leaves the parameters where they were (no weight decay by default).
    assert_eq!(bits(&b.state.params), bits(&fresh().params));
}
