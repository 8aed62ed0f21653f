use std::sync::Arc;

use compression::{CodecConfig, CodecKind, DecodeLimits};
use proto::ParamsPayload;
use tch::Device;
use trainer::{gradient, Dataset, ModelSpec, Net, OptimizerConfig, OptimizerKind, TrainData};

use crate::params::{rebuild, ParamsError};
use crate::*;

fn executor(inner: OptimizerConfig) -> Executor {
    tch::set_num_threads(1);
    let data = Arc::new(TrainData::from(Dataset::synthetic(64, 3)));
    Executor::new(&ModelSpec::Mlp, Device::Cpu, data, inner)
}

fn start() -> Vec<f32> {
    Net::new(&ModelSpec::Mlp, Device::Cpu, 11).flat_params()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn the_same_task_gives_the_same_bits_in_another_executor() {
    let p = start();
    let idx: Vec<u32> = (0..24).collect();
    let mut a = executor(OptimizerConfig::default());
    let mut b = executor(OptimizerConfig::default());
    for (micro, steps) in [(vec![24], false), (vec![24], true), (vec![8, 8, 8], true)] {
        let x = a.compute(&p, &idx, &micro, steps).unwrap();
        let y = b.compute(&p, &idx, &micro, steps).unwrap();
        assert_eq!(bits(&x.values), bits(&y.values));
        assert_eq!(x.leaves, y.leaves);
        assert_eq!(x.loss_sum.to_bits(), y.loss_sum.to_bits());
        // Executing again in the same executor does not depend on what it did before.
        let z = a.compute(&p, &idx, &micro, steps).unwrap();
        assert_eq!(bits(&x.values), bits(&z.values));
    }
}

#[test]
fn one_micro_batch_is_the_mean_gradient() {
    let p = start();
    let idx: Vec<u32> = (5..21).collect();
    let mut e = executor(OptimizerConfig::default());
    let r = e.compute(&p, &idx, &[16], false).unwrap();
    let mut net = Net::new(&ModelSpec::Mlp, Device::Cpu, 0);
    net.set_flat_params(&p).unwrap();
    let g = gradient(&mut net, e.data(), &idx).unwrap();
    assert_eq!(bits(&r.values), bits(&g.grad));
    assert!(r.leaves.is_empty());
    assert_eq!(r.step_root(), [0; 32]);
}

#[test]
fn inner_steps_follow_the_inner_optimizer_and_leave_one_leaf_each() {
    let sgd = OptimizerConfig {
        kind: OptimizerKind::Sgd,
        lr: 0.5,
        ..Default::default()
    };
    let p = start();
    let idx: Vec<u32> = (0..20).collect();
    let mut e = executor(sgd.clone());
    let r = e.compute(&p, &idx, &[12, 0, 8], true).unwrap();
    assert_eq!(r.leaves.len(), 3);
    assert_eq!(
        r.leaves[0], r.leaves[1],
        "an empty micro-batch changes nothing"
    );
    assert_ne!(r.leaves[1], r.leaves[2]);
    // By hand: two SGD steps of lr 0.5.
    let mut net = Net::new(&ModelSpec::Mlp, Device::Cpu, 0);
    net.set_flat_params(&p).unwrap();
    let g1 = gradient(&mut net, e.data(), &idx[..12]).unwrap().grad;
    let p1: Vec<f32> = p.iter().zip(&g1).map(|(x, g)| x - 0.5 * g).collect();
    net.set_flat_params(&p1).unwrap();
    let g2 = gradient(&mut net, e.data(), &idx[12..]).unwrap().grad;
    let p2: Vec<f32> = p1.iter().zip(&g2).map(|(x, g)| x - 0.5 * g).collect();
    let want: Vec<f32> = p.iter().zip(&p2).map(|(s, e)| s - e).collect();
    assert_eq!(bits(&r.values), bits(&want));
    assert_eq!(r.n, 20);
    // Each leaf is the state after its step (hashed on another thread, in step order).
    let mut opt = Optimizer::new(sgd);
    let mut q = p.clone();
    opt.step(&mut q, &g1).unwrap();
    assert_eq!(r.leaves[0], state_leaf(&q, &opt));
    opt.step(&mut q, &g2).unwrap();
    assert_eq!(r.leaves[2], state_leaf(&q, &opt));
    // A single batch with inner steps is one step's pseudo-gradient, not the gradient.
    let one = e.compute(&p, &idx[..12], &[12], true).unwrap();
    let want: Vec<f32> = p.iter().zip(&p1).map(|(s, e)| s - e).collect();
    assert_eq!(bits(&one.values), bits(&want));
    assert_eq!(one.leaves.len(), 1);
}

#[test]
fn bad_shapes_are_refused() {
    let mut e = executor(OptimizerConfig::default());
    let p = start();
    assert!(e.compute(&p, &[1, 2, 3], &[2], false).is_err());
    assert!(e.compute(&p, &[1, 2], &[], true).is_err());
    assert!(
        e.compute(&p, &[1, 2], &[1, 1], false).is_err(),
        "two batches, no inner steps"
    );
    assert!(
        e.compute(&p, &[1, 1_000_000], &[2], false).is_err(),
        "index out of range"
    );
    assert!(
        e.compute(&p[1..], &[1], &[1], false).is_err(),
        "wrong parameter count"
    );
}

#[test]
fn error_feedback_keeps_what_was_not_sent() {
    let v: Vec<f32> = (0..1000)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) * 1e-3)
        .collect();
    let r_in: Vec<f32> = (0..1000).map(|i| (i % 7) as f32 * 1e-4).collect();
    let int8 = CodecConfig {
        codec: CodecKind::Int8,
        ..Default::default()
    };
    let e = encode_update(&v, Some(&r_in), &int8, 3).unwrap();
    let decoded = compression::decode(&e.bytes, &DecodeLimits::default()).unwrap();
    for i in 0..v.len() {
        assert_eq!(e.encoded_input[i].to_bits(), (v[i] + r_in[i]).to_bits());
        assert_eq!(
            e.residual[i].to_bits(),
            (e.encoded_input[i] - decoded[i]).to_bits()
        );
    }
    assert!(e.residual.iter().any(|r| *r != 0.0));
    // Without error feedback, or with a lossless codec, nothing is kept.
    let off = CodecConfig {
        error_feedback: false,
        ..int8.clone()
    };
    assert!(encode_update(&v, None, &off, 3)
        .unwrap()
        .residual
        .is_empty());
    let fp32 = encode_update(&v, None, &CodecConfig::default(), 3).unwrap();
    assert!(fp32.residual.is_empty());
    assert_eq!(bits(&fp32.encoded_input), bits(&v));
    assert!(encode_update(&v, Some(&r_in[1..]), &int8, 3).is_err());
}

#[test]
fn parameters_are_rebuilt_bit_for_bit_or_refused() {
    let limits = DecodeLimits::default();
    let n = 300;
    let v0: Vec<f32> = (0..n).map(|i| (i as f32 * 0.01).sin()).collect();
    let v1: Vec<f32> = v0.iter().map(|x| x * 0.999 + 1e-4).collect();
    let h0 = verify::hash_f32(&v0);
    let h1 = verify::hash_f32(&v1);
    let full = ParamsPayload::Full(
        compression::encode(&v0, &CodecConfig::default(), 0)
            .unwrap()
            .into(),
    );
    let held = rebuild(None, &full, 4, &h0, n, &limits).unwrap();
    assert_eq!(held.version, 4);
    assert_eq!(bits(&held.values), bits(&v0));
    let xor = ParamsPayload::Xor {
        base: 4,
        delta: compression::encode_xor_delta(&v0, &v1, 1).unwrap().into(),
    };
    let next = rebuild(Some(&held), &xor, 5, &h1, n, &limits).unwrap();
    assert_eq!(bits(&next.values), bits(&v1));
    let same = rebuild(Some(&next), &ParamsPayload::Held, 5, &h1, n, &limits).unwrap();
    assert_eq!(bits(&same.values), bits(&v1));
    // Missing base, stale version, wrong hash.
    let err = rebuild(None, &xor, 5, &h1, n, &limits).unwrap_err();
    assert!(matches!(err, ParamsError::MissingBase(4)) && err.needs_full());
    assert!(rebuild(Some(&next), &ParamsPayload::Held, 6, &h1, n, &limits).is_err());
    let err = rebuild(Some(&held), &xor, 5, &h0, n, &limits).unwrap_err();
    assert!(matches!(err, ParamsError::HashMismatch));
    // Lossy deltas add up exactly as the coordinator adds them.
    let int8 = CodecConfig {
        codec: CodecKind::Int8,
        ..Default::default()
    };
    let d: Vec<f32> = v0.iter().zip(&v1).map(|(a, b)| b - a).collect();
    let enc = compression::encode(&d, &int8, 1).unwrap();
    let mut want = v0.clone();
    crate::params::add_delta(&mut want, &enc, &limits).unwrap();
    let add = ParamsPayload::Add {
        base: 4,
        deltas: vec![enc.into()],
    };
    let got = rebuild(Some(&held), &add, 5, &verify::hash_f32(&want), n, &limits).unwrap();
    assert_eq!(bits(&got.values), bits(&want));
}

#[test]
fn state_leaves_bind_the_optimizer_state() {
    let p = vec![1.0f32, 2.0];
    let mut a = trainer::Optimizer::new(OptimizerConfig::default());
    let b = trainer::Optimizer::new(OptimizerConfig::default());
    assert_eq!(state_leaf(&p, &a), state_leaf(&p, &b));
    let mut q = p.clone();
    a.step(&mut q, &[0.1, 0.1]).unwrap();
    assert_ne!(state_leaf(&p, &a), state_leaf(&p, &b), "moments differ");
}

#[test]
fn a_leaf_hashed_on_a_pool_is_the_leaf_hashed_on_one_thread() {
    // Large enough that blake3's update_rayon splits the input (several MiB).
    let n = 3_000_001;
    let mut p: Vec<f32> = (0..n).map(|i| (i % 977) as f32 * 1e-3).collect();
    let g: Vec<f32> = (0..n)
        .map(|i| ((i * 7) % 1013) as f32 * 1e-4 - 0.05)
        .collect();
    let mut opt = trainer::Optimizer::new(OptimizerConfig::default());
    opt.step(&mut p, &g).unwrap();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    let leaf = state_leaf(&p, &opt);
    assert_eq!(state_leaf_in(&pool, &p, &opt), leaf);
    assert_eq!(
        verify::hash_f32(&p),
        pool.install(|| verify::hash_f32_rayon(&p))
    );
    p[n - 1] += 1.0;
    assert_ne!(state_leaf_in(&pool, &p, &opt), leaf, "binds the last value");
}
