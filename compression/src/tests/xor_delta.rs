//! Lossless XOR parameter deltas: bit-exact round trips, compression of small updates,
//! hostile input, and property tests.

use proptest::prelude::*;

use super::*;
use crate::xor_delta::XorHeader;

fn lim() -> DecodeLimits {
    DecodeLimits::default()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// A xorshift64 stream, for reproducible random-ish data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// Roughly normal with standard deviation `sd` (sum of four uniforms).
    fn normal(&mut self, sd: f32) -> f32 {
        (self.unit() + self.unit() + self.unit() + self.unit()) * sd * 0.866
    }
}

/// Parameter-like values with the awkward ones mixed in: zeros of both signs, subnormals,
/// the extremes, and ordinary values of very different magnitudes.
fn params(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    (0..n)
        .map(|i| match i % 13 {
            0 => 0.0,
            1 => -0.0,
            2 => f32::from_bits(1 + (r.next() as u32 & 0x7f_ffff) % 0x7f_ffff),
            3 => -f32::from_bits(1),
            4 => f32::MIN_POSITIVE,
            5 => {
                if r.next() & 1 == 0 {
                    f32::MAX
                } else {
                    f32::MIN
                }
            }
            6 => r.unit() * 1e30,
            _ => r.normal(0.02),
        })
        .collect()
}

/// A new version of `old` with every kind of change: none, tiny relative steps, sign flips,
/// zero <-> negative zero, subnormal <-> normal, and arbitrary finite bit patterns.
fn changed(old: &[f32], seed: u64) -> Vec<f32> {
    let mut r = Rng(seed | 1);
    old.iter()
        .map(|&x| {
            let x = if x.is_finite() { x } else { 1.0 };
            let y = match r.next() % 8 {
                0 => x,
                1 => x * (1.0 + 1e-3 * r.unit()),
                2 => -x,
                3 => {
                    if x == 0.0 {
                        -x
                    } else {
                        0.0
                    }
                }
                4 => f32::from_bits(r.next() as u32 & 0x807f_ffff), // ±subnormal or ±0
                5 => r.unit() * 1e38,
                6 => loop {
                    let y = f32::from_bits(r.next() as u32);
                    if y.is_finite() {
                        break y;
                    }
                },
                _ => x + r.normal(1.0),
            };
            // Steps from ±f32::MAX may overflow: flip the sign instead.
            if y.is_finite() {
                y
            } else {
                -x
            }
        })
        .collect()
}

/// Encodes `old -> new`, applies it to `old`, and checks the result bitwise.
fn check_round_trip(old: &[f32], new: &[f32], level: i32) -> Vec<u8> {
    let bytes = encode_xor_delta(old, new, level).expect("encode");
    let out = apply_xor_delta(old, &bytes, &lim()).expect("apply");
    assert_eq!(bits(&out), bits(new), "level {level}, n {}", old.len());
    bytes
}

#[test]
fn round_trip_is_bit_exact() {
    for level in [0, 1, 3] {
        for n in [0, 1, 2, 7, 13, 100, 1000, 4099] {
            let old = params(n, n as u64 + 1);
            let new = changed(&old, n as u64 * 31 + 7);
            let bytes = check_round_trip(&old, &new, level);
            if level == 0 {
                assert_eq!(bytes.len(), XOR_HEADER_LEN + 4 * n);
            }
            // And back again: old holds only finite values here.
            check_round_trip(&new, &old, level);
            // A delta to itself.
            check_round_trip(&old, &old, level);
        }
    }
    // The higher levels, which do not use the cached context.
    let old = params(500, 9);
    check_round_trip(&old, &changed(&old, 10), MAX_ZSTD_LEVEL);
}

#[test]
fn old_may_hold_any_bit_pattern() {
    // `old` is trusted local state: NaN and infinities in it are fine as long as `new` is
    // finite.
    let old = vec![
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::from_bits(0xffff_ffff),
        1.0,
    ];
    let new = vec![1.0, -0.0, f32::from_bits(1), 3.5, f32::MAX];
    for level in [0, 1] {
        check_round_trip(&old, &new, level);
    }
}

#[test]
fn format_is_as_documented() {
    let old = [1.0f32, -2.0, 0.0];
    let new = [1.5f32, 2.0, -0.0];
    let b = encode_xor_delta(&old, &new, 0).unwrap();
    assert_eq!(b.len(), 32 + 12);
    assert_eq!(&b[0..4], b"DTX1");
    assert_eq!(b[4], 1);
    assert_eq!(&b[5..8], &[0, 0, 0]);
    assert_eq!(u64::from_le_bytes(b[8..16].try_into().unwrap()), 3);
    assert_eq!(u64::from_le_bytes(b[16..24].try_into().unwrap()), 12);
    let body = &b[32..];
    assert_eq!(&b[24..32], &header::checksum(body));
    // Plane k holds byte k of each XOR word.
    let words: Vec<u32> = old
        .iter()
        .zip(&new)
        .map(|(o, x)| o.to_bits() ^ x.to_bits())
        .collect();
    assert_eq!(words, vec![0x0040_0000, 0x8000_0000, 0x8000_0000]);
    for k in 0..4 {
        for (i, w) in words.iter().enumerate() {
            assert_eq!(body[k * 3 + i], w.to_le_bytes()[k], "plane {k}, value {i}");
        }
    }
    let z = encode_xor_delta(&old, &new, 1).unwrap();
    assert_eq!(z[5], 1, "zstd flag");
    assert_eq!(&z[8..32], &b[8..32], "same n, body length and checksum");
}

#[test]
fn unchanged_parameters_compress_to_almost_nothing() {
    let n = 100_000;
    let old = params(n, 3);
    for level in [1, 3] {
        let b = check_round_trip(&old, &old, level);
        assert!(
            b.len() * 100 < 4 * n,
            "level {level}: {} bytes for {n} unchanged values",
            b.len()
        );
    }
}

#[test]
fn adam_like_updates_compress_well() {
    let n = 100_000;
    let mut r = Rng(0x5eed);
    let old: Vec<f32> = (0..n).map(|_| r.normal(0.02)).collect();
    let new: Vec<f32> = old.iter().map(|&x| x * (1.0 + 1e-3 * r.unit())).collect();
    for level in [1, 3] {
        let b = check_round_trip(&old, &new, level);
        let ratio = b.len() as f64 / (4 * n) as f64;
        println!(
            "xor delta, Adam-like step (relative 1e-3), zstd {level}: {} bytes for {n} values, \
             ratio {ratio:.3}",
            b.len()
        );
        assert!(ratio < 0.8, "level {level}: ratio {ratio}");
    }
}

#[test]
fn bad_encode_arguments_are_refused() {
    let old = params(100, 1);
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut new = old.clone();
        new[0] = 1.0;
        new[70] = bad;
        assert_eq!(
            encode_xor_delta(&old, &new, 1),
            Err(CodecError::NonFiniteInput { index: 70 })
        );
    }
    assert_eq!(
        encode_xor_delta(&old, &old[..99], 1),
        Err(CodecError::Length {
            expected: 100,
            got: 99
        })
    );
    for level in [-1, MAX_ZSTD_LEVEL + 1, i32::MIN] {
        assert!(
            matches!(
                encode_xor_delta(&old, &old, level),
                Err(CodecError::Config(_))
            ),
            "{level}"
        );
    }
}

/// An honest delta of 300 values and its base.
fn good(level: i32) -> (Vec<f32>, Vec<u8>) {
    let old = params(300, 5);
    let new = changed(&old, 6);
    let b = encode_xor_delta(&old, &new, level).unwrap();
    (old, b)
}

/// A delta with a valid header and checksum around an arbitrary raw body.
fn craft_raw(n: u64, body: &[u8]) -> Vec<u8> {
    let h = XorHeader {
        zstd: false,
        n,
        body_len: body.len() as u64,
        checksum: header::checksum(body),
    };
    let mut out = h.to_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// The raw body that turns `base` into `target`.
fn planes(base: &[f32], target: &[f32]) -> Vec<u8> {
    let n = base.len();
    let mut body = vec![0u8; 4 * n];
    for (i, (o, x)) in base.iter().zip(target).enumerate() {
        let w = (o.to_bits() ^ x.to_bits()).to_le_bytes();
        for k in 0..4 {
            body[k * n + i] = w[k];
        }
    }
    body
}

#[test]
fn header_fields_are_checked() {
    for level in [0, 1] {
        let (base, g) = good(level);
        let with = |at: usize, byte: u8| {
            let mut b = g.clone();
            b[at] = byte;
            apply_xor_delta(&base, &b, &lim())
        };
        assert!(apply_xor_delta(&base, &g, &lim()).is_ok());
        for (at, &byte) in g[..4].iter().enumerate() {
            assert!(
                matches!(with(at, byte ^ 0x20), Err(CodecError::Malformed(_))),
                "magic byte {at}"
            );
        }
        assert_eq!(with(4, 2), Err(CodecError::UnsupportedVersion(2)));
        assert_eq!(with(4, 0), Err(CodecError::UnsupportedVersion(0)));
        for flags in [2u8, 0x80, 0xff] {
            assert!(
                matches!(with(5, flags), Err(CodecError::Malformed(_))),
                "flags {flags:#x}"
            );
        }
        // The zstd flag flipped: a raw body is not a zstd frame, and vice versa.
        assert!(matches!(
            with(5, 1 - level as u8),
            Err(CodecError::Malformed(_))
        ));
        assert!(matches!(with(6, 1), Err(CodecError::Malformed(_))));
        assert!(matches!(with(7, 1), Err(CodecError::Malformed(_))));
        // Checksum field.
        assert_eq!(with(24, g[24] ^ 1), Err(CodecError::Checksum));
        assert_eq!(with(31, g[31] ^ 0x80), Err(CodecError::Checksum));
        // Truncated header.
        for len in 0..XOR_HEADER_LEN {
            assert!(matches!(
                apply_xor_delta(&base, &g[..len], &lim()),
                Err(CodecError::Malformed(_))
            ));
        }
        // A codec payload is not a delta.
        let other = encode(&base, &CodecConfig::default(), 0).unwrap();
        assert!(matches!(
            apply_xor_delta(&base, &other, &lim()),
            Err(CodecError::Malformed(_))
        ));
    }
}

#[test]
fn lengths_are_checked_against_the_base_and_the_limits() {
    for level in [0, 1] {
        let (base, g) = good(level);
        let set = |at: usize, v: u64| {
            let mut b = g.clone();
            b[at..at + 8].copy_from_slice(&v.to_le_bytes());
            b
        };
        // n does not match the base.
        for n in [0u64, 299, 301, 1 << 20] {
            assert_eq!(
                apply_xor_delta(&base, &set(8, n), &lim()),
                Err(CodecError::Length {
                    expected: 300,
                    got: n
                })
            );
        }
        // The base does not match n.
        assert_eq!(
            apply_xor_delta(&base[..299], &g, &lim()),
            Err(CodecError::Length {
                expected: 299,
                got: 300
            })
        );
        // n beyond the value limit, whatever the base.
        for n in [1u64 << 40, u64::MAX] {
            assert!(matches!(
                apply_xor_delta(&base, &set(8, n), &lim()),
                Err(CodecError::TooLarge(_))
            ));
        }
        let open = DecodeLimits {
            max_values: usize::MAX,
            max_encoded_bytes: usize::MAX,
        };
        assert!(matches!(
            apply_xor_delta(&base, &set(8, u64::MAX), &open),
            Err(CodecError::Length { .. })
        ));
        // Body length other than 4n.
        for body_len in [0u64, 1199, 1201, 300, 2400, u64::MAX] {
            assert!(
                matches!(
                    apply_xor_delta(&base, &set(16, body_len), &lim()),
                    Err(CodecError::Malformed(_))
                ),
                "body_len {body_len}"
            );
        }
        // Limits: one under refuses, exact accepts.
        let tight = DecodeLimits {
            max_values: 299,
            ..lim()
        };
        assert!(matches!(
            apply_xor_delta(&base, &g, &tight),
            Err(CodecError::TooLarge(_))
        ));
        let tight = DecodeLimits {
            max_encoded_bytes: g.len() - 1,
            ..lim()
        };
        assert!(matches!(
            apply_xor_delta(&base, &g, &tight),
            Err(CodecError::TooLarge(_))
        ));
        let exact = DecodeLimits {
            max_values: 300,
            max_encoded_bytes: g.len(),
        };
        assert_eq!(apply_xor_delta(&base, &g, &exact).unwrap().len(), 300);
    }
}

#[test]
fn truncated_extended_and_corrupted_bodies_are_refused() {
    for level in [0, 1] {
        let (base, g) = good(level);
        for cut in [1, 2, 100, g.len() - XOR_HEADER_LEN] {
            assert!(
                apply_xor_delta(&base, &g[..g.len() - cut], &lim()).is_err(),
                "level {level}: {cut} bytes cut"
            );
        }
        let mut longer = g.clone();
        longer.push(0);
        assert!(
            apply_xor_delta(&base, &longer, &lim()).is_err(),
            "extra byte"
        );
        let mut flipped = g.clone();
        *flipped.last_mut().unwrap() ^= 0x10;
        assert!(apply_xor_delta(&base, &flipped, &lim()).is_err(), "flipped");
    }
    // A raw body: any flipped bit is caught by the checksum.
    let (base, g) = good(0);
    for at in [XOR_HEADER_LEN, XOR_HEADER_LEN + 500, g.len() - 1] {
        let mut b = g.clone();
        b[at] ^= 4;
        assert_eq!(
            apply_xor_delta(&base, &b, &lim()),
            Err(CodecError::Checksum)
        );
    }
    let mut short = g[..g.len() - 1].to_vec();
    assert!(matches!(
        apply_xor_delta(&base, &short, &lim()),
        Err(CodecError::Malformed(_))
    ));
    short.extend_from_slice(&[0, 0]);
    assert!(matches!(
        apply_xor_delta(&base, &short, &lim()),
        Err(CodecError::Malformed(_))
    ));
}

#[test]
fn zstd_frames_are_checked_against_the_header() {
    let (base, raw) = good(0);
    let body = &raw[XOR_HEADER_LEN..];
    let mut h = XorHeader::parse(&raw).unwrap();
    h.zstd = true;
    let frame = |content: &[u8]| {
        let mut b = h.to_bytes().to_vec();
        b.extend_from_slice(&zstd::bulk::compress(content, 1).unwrap());
        b
    };
    assert_eq!(
        bits(&apply_xor_delta(&base, &frame(body), &lim()).unwrap()),
        bits(&apply_xor_delta(&base, &raw, &lim()).unwrap())
    );
    // Frames announcing another size than 4n.
    assert!(matches!(
        apply_xor_delta(&base, &frame(&body[1..]), &lim()),
        Err(CodecError::Malformed(_))
    ));
    let mut longer = body.to_vec();
    longer.push(0);
    assert!(matches!(
        apply_xor_delta(&base, &frame(&longer), &lim()),
        Err(CodecError::Malformed(_))
    ));
    assert!(matches!(
        apply_xor_delta(&base, &frame(&[]), &lim()),
        Err(CodecError::Malformed(_))
    ));
    // A frame without a content size.
    let mut enc = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
    enc.include_contentsize(false).unwrap();
    std::io::Write::write_all(&mut enc, body).unwrap();
    let mut b = h.to_bytes().to_vec();
    b.extend_from_slice(&enc.finish().unwrap());
    assert!(matches!(
        apply_xor_delta(&base, &b, &lim()),
        Err(CodecError::Malformed(_))
    ));
    // Right size, other content: the checksum catches it.
    let mut other = body.to_vec();
    other[0] ^= 1;
    assert_eq!(
        apply_xor_delta(&base, &frame(&other), &lim()),
        Err(CodecError::Checksum)
    );
    // A second frame after the first.
    let mut b = frame(body);
    b.extend_from_slice(&zstd::bulk::compress(b"x", 1).unwrap());
    assert!(apply_xor_delta(&base, &b, &lim()).is_err());
}

#[test]
fn deltas_to_non_finite_values_are_refused() {
    let base = [1.0f32, 2.0, 3.0, -0.0];
    for (at, bad) in [
        (1, f32::INFINITY),
        (2, f32::NAN),
        (0, f32::NEG_INFINITY),
        (3, f32::from_bits(0xffc0_0001)),
    ] {
        let mut target = base;
        target[at] = bad;
        let body = planes(&base, &target);
        let b = craft_raw(4, &body);
        assert_eq!(
            apply_xor_delta(&base, &b, &lim()),
            Err(CodecError::NonFiniteOutput { index: at }),
            "{bad}"
        );
        // The same through zstd.
        let mut h = XorHeader::parse(&b).unwrap();
        h.zstd = true;
        let mut z = h.to_bytes().to_vec();
        z.extend_from_slice(&zstd::bulk::compress(&body, 3).unwrap());
        assert_eq!(
            apply_xor_delta(&base, &z, &lim()),
            Err(CodecError::NonFiniteOutput { index: at })
        );
    }
    // The crafting itself is sound: a finite target goes through.
    let target = [4.0f32, -0.0, f32::MAX, f32::from_bits(5)];
    let out = apply_xor_delta(&base, &craft_raw(4, &planes(&base, &target)), &lim()).unwrap();
    assert_eq!(bits(&out), bits(&target));
}

#[test]
fn empty_deltas_work() {
    for level in [0, 1] {
        let b = check_round_trip(&[], &[], level);
        assert_eq!(apply_xor_delta(&[], &b, &lim()).unwrap(), Vec::<f32>::new());
        assert_eq!(
            apply_xor_delta(&[1.0], &b, &lim()),
            Err(CodecError::Length {
                expected: 1,
                got: 0
            })
        );
    }
}

fn any_bits() -> impl Strategy<Value = f32> {
    any::<u32>().prop_map(f32::from_bits)
}

fn finite() -> impl Strategy<Value = f32> {
    prop_oneof![
        2 => any::<u32>().prop_map(f32::from_bits).prop_filter("finite", |x| x.is_finite()),
        1 => Just(0.0f32),
        1 => Just(-0.0f32),
        1 => (0u32..0x80_0000).prop_map(f32::from_bits),
        3 => -1.0f32..1.0,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn round_trip_any_bits(
        pairs in proptest::collection::vec((any_bits(), finite()), 0..2000),
        level in 0i32..=3,
    ) {
        let (old, new): (Vec<f32>, Vec<f32>) = pairs.into_iter().unzip();
        let bytes = encode_xor_delta(&old, &new, level).unwrap();
        let out = apply_xor_delta(&old, &bytes, &DecodeLimits::default()).unwrap();
        prop_assert_eq!(bits(&out), bits(&new));
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        base in proptest::collection::vec(any_bits(), 0..64),
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        if let Ok(out) = apply_xor_delta(&base, &bytes, &DecodeLimits::default()) {
            prop_assert_eq!(out.len(), base.len());
            prop_assert!(out.iter().all(|x| x.is_finite()));
        }
    }

    /// Arbitrary bytes behind a valid magic and version reach the length checks.
    #[test]
    fn arbitrary_headers_never_panic(
        base in proptest::collection::vec(finite(), 0..64),
        flags in 0u8..4,
        n in prop_oneof![0u64..70, any::<u64>()],
        body_len in prop_oneof![0u64..300, any::<u64>()],
        rest in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut b = XOR_MAGIC.to_vec();
        b.extend_from_slice(&[XOR_FORMAT_VERSION, flags, 0, 0]);
        b.extend_from_slice(&n.to_le_bytes());
        b.extend_from_slice(&body_len.to_le_bytes());
        b.extend_from_slice(&rest);
        if let Ok(out) = apply_xor_delta(&base, &b, &DecodeLimits::default()) {
            prop_assert_eq!(out.len(), base.len());
            prop_assert!(out.iter().all(|x| x.is_finite()));
        }
    }

    /// Random bodies behind a valid header and checksum: a finite result or
    /// `NonFiniteOutput`, and what comes out is exactly base XOR body.
    #[test]
    fn arbitrary_bodies_with_valid_checksums_never_panic(
        base in proptest::collection::vec(finite(), 0..64),
        seed in any::<u64>(),
    ) {
        let mut r = Rng(seed | 1);
        let body: Vec<u8> = (0..4 * base.len()).map(|_| r.next() as u8).collect();
        match apply_xor_delta(&base, &craft_raw(base.len() as u64, &body), &lim()) {
            Ok(out) => {
                prop_assert!(out.iter().all(|x| x.is_finite()));
                prop_assert_eq!(planes(&base, &out), body);
            }
            Err(e) => prop_assert!(matches!(e, CodecError::NonFiniteOutput { .. }), "{e}"),
        }
    }

    #[test]
    fn corrupted_deltas_give_an_error_or_a_sound_vector(
        n in 0usize..600,
        level in 0i32..=3,
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let old = params(n, 2);
        let new = changed(&old, 3);
        let good = encode_xor_delta(&old, &new, level).unwrap();
        let mut bad = good.clone();
        for (at, byte) in &edits {
            let i = at.index(bad.len());
            bad[i] ^= byte | 1;
        }
        if let Ok(out) = apply_xor_delta(&old, &bad, &lim()) {
            prop_assert_eq!(out.len(), n);
            prop_assert!(out.iter().all(|x| x.is_finite()));
        }
        let short = &good[..cut.index(good.len())];
        prop_assert!(apply_xor_delta(&old, short, &lim()).is_err());
    }
}

#[test]
fn compressing_a_raw_delta_afterwards_gives_the_bytes_of_encoding_with_zstd() {
    let old = params(3000, 1);
    let new = changed(&old, 2);
    let raw = encode_xor_delta(&old, &new, 0).unwrap();
    for level in [1, 3] {
        assert_eq!(
            compress_xor_delta(&raw, level).unwrap(),
            encode_xor_delta(&old, &new, level).unwrap()
        );
    }
    let zstd = compress_xor_delta(&raw, 1).unwrap();
    assert!(matches!(
        compress_xor_delta(&zstd, 1),
        Err(CodecError::Config(_))
    ));
    assert!(matches!(
        compress_xor_delta(&raw[..raw.len() - 4], 1),
        Err(CodecError::Malformed(_))
    ));
}
