//! Error feedback: what was not sent is carried, bounded, and reset safely.

use super::*;

/// Runs `steps` EF steps and checks, per coordinate, that
/// `sum(inputs) - sum(decoded) == residual`, and that the residual stays bounded: below
/// `max_residual`, and not growing (its peak over the second half of the run is within 25%
/// of the peak over the first half).
fn track(c: &CodecConfig, n: usize, steps: u32, max_residual: f32) {
    let mut ef = ErrorFeedback::new();
    let mut sent = vec![0f64; n];
    let mut total = vec![0f64; n];
    let mut peaks = [0f32; 2];
    for step in 0..steps {
        let u = data(n, step);
        let (bytes, d) = ef.encode(&u, c, u64::from(step)).unwrap();
        // What the receiver decodes is exactly what EF accounted for.
        assert_eq!(
            decode_exact(&bytes, n, &DecodeLimits::default()).unwrap(),
            d
        );
        for i in 0..n {
            sent[i] += f64::from(d[i]);
            total[i] += f64::from(u[i]);
        }
        let half = usize::from(step >= steps / 2);
        peaks[half] = ef
            .residual()
            .iter()
            .fold(peaks[half], |m, x| m.max(x.abs()));
    }
    for i in 0..n {
        let gap = total[i] - sent[i];
        let r = f64::from(ef.residual()[i]);
        assert!(
            (gap - r).abs() < 1e-3 * (1.0 + gap.abs()),
            "{i}: {gap} vs {r}"
        );
    }
    let [first, second] = peaks;
    assert!(
        first.max(second) < max_residual && second <= first * 1.25,
        "{:?}: residual peaks {first} then {second}",
        c.codec
    );
}

#[test]
fn topk_feedback_tracks_the_sum_of_inputs() {
    let c = CodecConfig {
        topk_fraction: 0.1,
        ..cfg(CodecKind::TopK, 1, 64)
    };
    // Inputs are at most 3.5 in magnitude; with 10% sent per step a coordinate waits a
    // few steps at most before it is among the largest.
    track(&c, 500, 1000, 15.0);
}

#[test]
fn sign1_feedback_tracks_the_sum_of_inputs() {
    // Scaled sign is a contraction only by 1 - 1/block per block, so the residual plateaus
    // high (about 100 here for block 64, 12 for block 8), but it does plateau.
    track(&cfg(CodecKind::Sign1, 0, 64), 500, 1000, 150.0);
    track(&cfg(CodecKind::Sign1, 0, 8), 500, 1000, 20.0);
}

#[test]
fn int4_and_int8_feedback_keep_the_residual_within_a_step() {
    // The residual is the last rounding error: at most half a step of the corrected input.
    track(&cfg(CodecKind::Int8, 1, 64), 300, 100, 0.05);
    track(&cfg(CodecKind::Int4, 1, 64), 300, 100, 0.8);
}

#[test]
fn feedback_sends_the_residual_eventually() {
    // A constant small update that top-k never picks alone is sent once it accumulates.
    let mut u = vec![0.01f32; 100];
    u[0] = 1.0;
    let c = CodecConfig {
        topk_fraction: 0.01,
        topk_values: TopKValues::Fp32,
        ..cfg(CodecKind::TopK, 0, 8)
    };
    let mut ef = ErrorFeedback::new();
    let mut sent = vec![0f32; 100];
    for step in 0..2000 {
        let (_, d) = ef.encode(&u, &c, step).unwrap();
        for (s, x) in sent.iter_mut().zip(&d) {
            *s += x;
        }
    }
    assert!(
        sent[1..].iter().all(|&s| s > 0.0),
        "every coordinate was sent"
    );
}

#[test]
fn lossless_codec_leaves_no_residual() {
    let mut ef = ErrorFeedback::new();
    let (_, d) = ef
        .encode(&data(100, 1), &cfg(CodecKind::Int4, 0, 8), 0)
        .unwrap();
    assert_ne!(d, data(100, 1));
    assert!(ef.residual().iter().any(|&r| r != 0.0));
    // fp32 sends update + residual exactly, so the residual is flushed to zero.
    let (_, d) = ef
        .encode(&data(100, 2), &cfg(CodecKind::Fp32, 0, 8), 0)
        .unwrap();
    assert!(ef.residual().iter().all(|&r| r == 0.0));
    assert_eq!(d.len(), 100);
}

#[test]
fn feedback_resets_on_length_change_and_on_request() {
    let c = CodecConfig {
        topk_fraction: 0.1,
        ..cfg(CodecKind::TopK, 1, 8)
    };
    let mut ef = ErrorFeedback::new();
    assert!(ef.residual().is_empty());
    ef.encode(&data(50, 1), &c, 0).unwrap();
    assert_eq!(ef.residual().len(), 50);
    assert!(ef.residual().iter().any(|&r| r != 0.0));
    // A new length starts from a zero residual: the output is that of a fresh encoder.
    let u = data(30, 2);
    let (bytes, d) = ef.encode(&u, &c, 0).unwrap();
    assert_eq!(ef.residual().len(), 30);
    assert_eq!(bytes, encode(&u, &c, 0).unwrap());
    assert_eq!(d, rt(&u, &c, 0));
    ef.reset();
    assert!(ef.residual().is_empty());
    // A failed encode (non-finite input) leaves the residual as it was.
    ef.encode(&u, &c, 0).unwrap();
    let before = ef.residual().to_vec();
    let mut bad = u.clone();
    bad[3] = f32::INFINITY;
    assert!(ef.encode(&bad, &c, 0).is_err());
    assert_eq!(ef.residual(), &before[..]);
}
