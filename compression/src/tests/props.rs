//! Property tests: round trips over random shapes and settings; decode of arbitrary or
//! corrupted bytes never panics.

use proptest::prelude::*;

use super::*;

fn codec() -> impl Strategy<Value = CodecKind> {
    (0u8..7).prop_map(|i| CodecKind::from_id(i).unwrap())
}

fn topk_values() -> impl Strategy<Value = TopKValues> {
    prop_oneof![
        Just(TopKValues::Fp32),
        Just(TopKValues::Fp16),
        Just(TopKValues::Int8)
    ]
}

fn block_size() -> impl Strategy<Value = u32> {
    prop_oneof![8u32..=300, 300u32..=4096, Just(65_536)]
}

fn value() -> impl Strategy<Value = f32> {
    prop_oneof![
        1 => Just(0.0f32),
        6 => -10.0f32..10.0,
        2 => -1e-4f32..1e-4,
        1 => -1e30f32..1e30,
    ]
}

fn config() -> impl Strategy<Value = CodecConfig> {
    (
        codec(),
        block_size(),
        0.0001f32..=1.0,
        topk_values(),
        0i32..=3,
        any::<bool>(),
    )
        .prop_map(
            |(codec, block_size, topk_fraction, topk_values, zstd_level, stochastic_rounding)| {
                CodecConfig {
                    codec,
                    block_size,
                    topk_fraction,
                    topk_values,
                    zstd_level,
                    zstd_adaptive: true,
                    stochastic_rounding,
                    error_feedback: true,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn round_trip_any_length_block_and_setting(
        v in proptest::collection::vec(value(), 0..5000),
        c in config(),
        seed in any::<u64>(),
    ) {
        let bytes = encode(&v, &c, seed).unwrap();
        let h = peek_header(&bytes).unwrap();
        prop_assert_eq!(h.n, v.len() as u64);
        prop_assert_eq!(h.codec, c.codec);
        let out = decode_exact(&bytes, v.len(), &DecodeLimits::default()).unwrap();
        check_decoded(&v, &out, &c);
        // Error feedback on the same input: decoded + residual == input.
        let mut ef = ErrorFeedback::new();
        let (_, d) = ef.encode(&v, &c, seed).unwrap();
        for ((x, y), r) in v.iter().zip(&d).zip(ef.residual()) {
            prop_assert_eq!(*r, x - y);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        if let Ok(out) = decode(&bytes, &DecodeLimits::default()) {
            prop_assert!(out.iter().all(|x| x.is_finite()));
        }
    }

    /// Random bodies behind a valid header and checksum reach the body decoders.
    #[test]
    fn arbitrary_bodies_with_valid_checksums_never_panic(
        c in codec(),
        kind in topk_values(),
        block in 8u32..40,
        n in prop_oneof![0u64..64, Just(1u64 << 40), any::<u64>()],
        body in proptest::collection::vec(any::<u8>(), 0..600),
    ) {
        let b = craft(c, kind, block, n, &body);
        if let Ok(out) = decode(&b, &DecodeLimits::default()) {
            prop_assert_eq!(out.len() as u64, n);
            prop_assert!(out.iter().all(|x| x.is_finite()));
        }
    }

    #[test]
    fn corrupted_payloads_give_an_error_or_a_sound_vector(
        c in config(),
        n in 0usize..600,
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let v = data(n, 4);
        let good = encode(&v, &c, 1).unwrap();
        let mut bad = good.clone();
        for (at, byte) in &edits {
            let i = at.index(bad.len());
            bad[i] ^= byte | 1;
        }
        let lim = DecodeLimits::default();
        if let Ok(out) = decode(&bad, &lim) {
            prop_assert_eq!(out.len() as u64, peek_header(&bad).unwrap().n);
            prop_assert!(out.iter().all(|x| x.is_finite()));
        }
        let short = &good[..cut.index(good.len())];
        prop_assert!(decode(short, &lim).is_err());
    }
}
