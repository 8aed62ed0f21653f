//! Stochastic rounding: unbiased on average, deterministic per seed.

use super::*;

fn mean_of_decodes(v: &[f32], c: &CodecConfig, trials: u64) -> Vec<f64> {
    let mut sum = vec![0f64; v.len()];
    for seed in 0..trials {
        let out = rt(v, c, seed);
        for (s, o) in sum.iter_mut().zip(out) {
            *s += f64::from(o);
        }
    }
    sum.iter().map(|s| s / trials as f64).collect()
}

#[test]
fn stochastic_rounding_is_unbiased() {
    // The block absmax (1.0) is exact; the other values sit between levels.
    let v = vec![1.0f32, 0.3, -0.77, 0.0, 0.05, -0.011, 0.5, 0.123];
    for (codec, levels) in [(CodecKind::Int8, 127.0), (CodecKind::Int4, 7.0)] {
        let c = CodecConfig {
            stochastic_rounding: true,
            ..cfg(codec, 0, 8)
        };
        let trials = 4000;
        let means = mean_of_decodes(&v, &c, trials);
        // Each decode is off by at most one step; the mean's standard error is at most
        // step / (2 sqrt(trials)). Allow 5 standard errors.
        let step = 1.0 / levels;
        let tol = 5.0 * step / (2.0 * (trials as f64).sqrt());
        for (m, x) in means.iter().zip(&v) {
            assert!(
                (m - f64::from(*x)).abs() < tol,
                "{codec:?}: mean {m} for {x}"
            );
        }
        // Nearest rounding, by contrast, is biased for these values.
        let nearest = mean_of_decodes(&v, &cfg(codec, 0, 8), 1);
        let bias: f64 = nearest
            .iter()
            .zip(&v)
            .map(|(m, x)| (m - f64::from(*x)).abs())
            .sum();
        assert!(bias > tol, "{codec:?}");
    }
}

#[test]
fn stochastic_topk_int8_values_are_unbiased() {
    let v = vec![1.0f32, 0.3, -0.77, 0.01, 0.0, 0.0, 0.0, 0.0];
    let c = CodecConfig {
        stochastic_rounding: true,
        topk_fraction: 0.5,
        ..cfg(CodecKind::TopK, 0, 8)
    };
    let means = mean_of_decodes(&v, &c, 4000);
    for (m, x) in means.iter().zip(&v) {
        assert!((m - f64::from(*x)).abs() < 2e-3, "mean {m} for {x}");
    }
}

#[test]
fn stochastic_rounding_is_deterministic_per_seed() {
    let v = data(2000, 6);
    for codec in [CodecKind::Int8, CodecKind::Int4, CodecKind::TopK] {
        let c = CodecConfig {
            stochastic_rounding: true,
            topk_fraction: 0.5,
            ..cfg(codec, 1, 64)
        };
        let a = encode(&v, &c, 42).unwrap();
        assert_eq!(a, encode(&v, &c, 42).unwrap(), "{codec:?}");
        assert_ne!(a, encode(&v, &c, 43).unwrap(), "{codec:?}");
        check_decoded(&v, &rt(&v, &c, 42), &c);
    }
}
