//! Hostile and malformed input: refused with the right error, never a panic.

use super::*;

fn lim() -> DecodeLimits {
    DecodeLimits::default()
}

fn good(codec: CodecKind, zstd: i32) -> Vec<u8> {
    encode(&data(300, 1), &cfg(codec, zstd, 64), 0).unwrap()
}

#[test]
fn non_finite_input_is_refused() {
    for codec in CodecKind::ALL {
        let c = cfg(codec, 1, 8);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut v = data(1000, 1);
            v[700] = bad;
            assert_eq!(
                encode(&v, &c, 0),
                Err(CodecError::NonFiniteInput { index: 700 })
            );
        }
    }
}

#[test]
fn invalid_config_is_refused_by_encode() {
    let v = data(10, 1);
    for c in [
        cfg(CodecKind::Int8, 1, 4),
        cfg(CodecKind::Int8, 1, 65_537),
        cfg(CodecKind::Int8, 20, 64),
        cfg(CodecKind::Int8, -1, 64),
        CodecConfig {
            topk_fraction: 0.0,
            ..Default::default()
        },
        CodecConfig {
            topk_fraction: f32::NAN,
            ..Default::default()
        },
    ] {
        assert!(
            matches!(encode(&v, &c, 0), Err(CodecError::Config(_))),
            "{c:?}"
        );
    }
}

#[test]
fn huge_value_count_is_refused_before_allocating() {
    for codec in CodecKind::ALL {
        for zstd in [0, 1] {
            let mut b = good(codec, zstd);
            b[12..20].copy_from_slice(&(1u64 << 40).to_le_bytes());
            assert!(matches!(decode(&b, &lim()), Err(CodecError::TooLarge(_))));
            // Even with no value limit, the lengths do not add up: refused, not allocated.
            // (Top-k is sparse: a short body may announce any n, so only `max_values`
            // bounds its dense output.)
            if codec == CodecKind::TopK {
                continue;
            }
            let open = DecodeLimits {
                max_values: usize::MAX,
                max_encoded_bytes: usize::MAX,
            };
            assert!(matches!(decode(&b, &open), Err(CodecError::Malformed(_))));
            // A body length to match is refused too (zstd: the frame says otherwise).
            let max = codecs::body_len_range(codec, 1 << 40, 64).unwrap().1;
            b[20..28].copy_from_slice(&(max as u64).to_le_bytes());
            assert!(matches!(decode(&b, &open), Err(CodecError::Malformed(_))));
        }
    }
    let mut b = good(CodecKind::Fp32, 0);
    b[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(decode(
        &b,
        &DecodeLimits {
            max_values: usize::MAX,
            ..lim()
        }
    )
    .is_err());
}

#[test]
fn limits_are_applied() {
    let b = good(CodecKind::Int8, 1);
    let tight = DecodeLimits {
        max_values: 299,
        ..lim()
    };
    assert!(matches!(decode(&b, &tight), Err(CodecError::TooLarge(_))));
    let tight = DecodeLimits {
        max_encoded_bytes: b.len() - 1,
        ..lim()
    };
    assert!(matches!(decode(&b, &tight), Err(CodecError::TooLarge(_))));
    let exact = DecodeLimits {
        max_values: 300,
        max_encoded_bytes: b.len(),
    };
    assert_eq!(decode(&b, &exact).unwrap().len(), 300);
}

#[test]
fn header_fields_are_checked() {
    let g = good(CodecKind::Int8, 0);
    let with = |at: usize, byte: u8| {
        let mut b = g.clone();
        b[at] = byte;
        decode(&b, &lim())
    };
    assert_eq!(with(4, 2), Err(CodecError::UnsupportedVersion(2)));
    assert_eq!(with(4, 0), Err(CodecError::UnsupportedVersion(0)));
    assert!(matches!(
        peek_header(&{
            let mut b = g.clone();
            b[4] = 9;
            b
        }),
        Err(CodecError::UnsupportedVersion(9))
    ));
    assert!(
        matches!(with(0, b'X'), Err(CodecError::Malformed(_))),
        "magic"
    );
    assert!(matches!(with(5, 7), Err(CodecError::Malformed(_))), "codec");
    assert!(
        matches!(with(6, 0b1100), Err(CodecError::Malformed(_))),
        "top-k kind 3"
    );
    assert!(
        matches!(with(6, 0b1_0000), Err(CodecError::Malformed(_))),
        "unknown flag"
    );
    assert!(
        matches!(with(7, 1), Err(CodecError::Malformed(_))),
        "reserved"
    );
    assert!(
        matches!(with(8, 7), Err(CodecError::Malformed(_))),
        "block size 7"
    );
    assert!(
        matches!(with(10, 2), Err(CodecError::Malformed(_))),
        "block size > 65536"
    );
    assert!(
        matches!(with(9, 1), Err(CodecError::Malformed(_))),
        "other block size"
    );
    assert!(
        matches!(with(6, 1), Err(CodecError::Malformed(_))),
        "zstd flag on raw body"
    );
    for len in 0..HEADER_LEN {
        assert!(matches!(
            decode(&g[..len], &lim()),
            Err(CodecError::Malformed(_))
        ));
    }
}

#[test]
fn truncated_extended_and_corrupted_bodies_are_refused() {
    for codec in CodecKind::ALL {
        for zstd in [0, 1] {
            let g = good(codec, zstd);
            assert!(
                decode(&g[..g.len() - 1], &lim()).is_err(),
                "{codec:?} truncated"
            );
            let mut longer = g.clone();
            longer.push(0);
            assert!(decode(&longer, &lim()).is_err(), "{codec:?} extra byte");
            let mut flipped = g.clone();
            *flipped.last_mut().unwrap() ^= 0x10;
            assert!(decode(&flipped, &lim()).is_err(), "{codec:?} flipped");
            let mut sum = g.clone();
            sum[30] ^= 1;
            assert_eq!(decode(&sum, &lim()), Err(CodecError::Checksum), "{codec:?}");
        }
    }
}

#[test]
fn decode_exact_checks_the_count() {
    let b = good(CodecKind::Int8, 1);
    assert_eq!(
        decode_exact(&b, 301, &lim()),
        Err(CodecError::Length {
            expected: 301,
            got: 300
        })
    );
    assert_eq!(decode_exact(&b, 300, &lim()).unwrap().len(), 300);
}

fn f32_body(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn smuggled_non_finite_values_are_refused() {
    // Valid header and checksum around bodies that decode to NaN or infinity.
    let nan = craft(
        CodecKind::Fp32,
        TopKValues::Int8,
        8,
        2,
        &f32_body(&[1.0, f32::NAN]),
    );
    assert_eq!(
        decode(&nan, &lim()),
        Err(CodecError::NonFiniteOutput { index: 1 })
    );
    let inf = craft(
        CodecKind::Fp32,
        TopKValues::Int8,
        8,
        3,
        &f32_body(&[1.0, 2.0, f32::INFINITY]),
    );
    assert_eq!(
        decode(&inf, &lim()),
        Err(CodecError::NonFiniteOutput { index: 2 })
    );
    // fp16 infinity (0x7c00) and bf16 NaN (0x7fc0).
    let b = craft(CodecKind::Fp16, TopKValues::Int8, 8, 1, &[0x00, 0x7c]);
    assert_eq!(
        decode(&b, &lim()),
        Err(CodecError::NonFiniteOutput { index: 0 })
    );
    let b = craft(CodecKind::Bf16, TopKValues::Int8, 8, 1, &[0xc0, 0x7f]);
    assert_eq!(
        decode(&b, &lim()),
        Err(CodecError::NonFiniteOutput { index: 0 })
    );
    // Scales that are NaN, infinite or negative.
    for s in [f32::NAN, f32::INFINITY, -1.0] {
        let mut body = f32_body(&[s]);
        body.extend_from_slice(&[1; 8]);
        let b = craft(CodecKind::Int8, TopKValues::Int8, 8, 8, &body);
        assert!(
            matches!(decode(&b, &lim()), Err(CodecError::Malformed(_))),
            "{s}"
        );
    }
    // A finite scale whose product overflows.
    let mut body = f32_body(&[f32::MAX]);
    body.extend_from_slice(&[127; 8]);
    let b = craft(CodecKind::Int8, TopKValues::Int8, 8, 8, &body);
    assert!(matches!(
        decode(&b, &lim()),
        Err(CodecError::NonFiniteOutput { .. })
    ));
    // A NaN top-k value.
    let mut body = 1u64.to_le_bytes().to_vec();
    body.push(2);
    body.extend_from_slice(&f32_body(&[f32::NAN]));
    let b = craft(CodecKind::TopK, TopKValues::Fp32, 8, 5, &body);
    assert_eq!(
        decode(&b, &lim()),
        Err(CodecError::NonFiniteOutput { index: 2 })
    );
}

fn topk_body(k: u64, gaps: &[u8], values: &[f32]) -> Vec<u8> {
    let mut body = k.to_le_bytes().to_vec();
    body.extend_from_slice(gaps);
    body.extend_from_slice(&f32_body(values));
    body
}

#[test]
fn bad_topk_bodies_are_refused() {
    let dec = |n: u64, body: &[u8]| {
        decode(
            &craft(CodecKind::TopK, TopKValues::Fp32, 8, n, body),
            &lim(),
        )
    };
    // A well-formed one, for reference: indices 1 and 3 of 5.
    assert_eq!(
        dec(5, &topk_body(2, &[1, 1], &[2.0, 3.0])).unwrap(),
        vec![0.0, 2.0, 0.0, 3.0, 0.0]
    );
    let malformed = |r: Result<Vec<f32>, CodecError>| matches!(r, Err(CodecError::Malformed(_)));
    assert!(
        malformed(dec(5, &topk_body(2, &[1, 3], &[2.0, 3.0]))),
        "index 5 out of range"
    );
    assert!(
        malformed(dec(5, &topk_body(6, &[0; 6], &[1.0; 6]))),
        "k > n"
    );
    assert!(
        malformed(dec(5, &topk_body(2, &[1], &[2.0, 3.0]))),
        "missing index"
    );
    assert!(
        malformed(dec(5, &topk_body(2, &[1, 1, 0], &[2.0, 3.0]))),
        "extra index byte"
    );
    assert!(
        malformed(dec(
            5,
            &topk_body(1, &[0x80, 0x80, 0x80, 0x80, 0x80, 0], &[1.0])
        )),
        "long varint"
    );
    assert!(
        malformed(dec(5, &topk_body(1, &[0x81], &[1.0]))),
        "unterminated varint"
    );
    assert!(
        malformed(dec(5, &topk_body(u64::MAX, &[0], &[1.0]))),
        "huge k"
    );
    assert!(malformed(dec(5, &[1, 0, 0])), "no count");
    assert!(
        malformed(dec(1 << 20, &topk_body(1 << 19, &[0], &[1.0]))),
        "k beyond the body"
    );
    // Indices cannot repeat or go backwards: gaps are unsigned, so the only way is overflow
    // past n, which is refused.
    assert!(malformed(dec(
        3,
        &topk_body(3, &[0, 0, 0xff, 0xff, 0xff, 0xff, 0x0f], &[1.0; 3])
    )));
}

#[test]
fn bad_padding_is_refused() {
    // int4 with 3 values: the last byte's high nibble is unused and must be zero.
    let mut body = f32_body(&[1.0]);
    body.extend_from_slice(&[0x11, 0xf1]);
    let b = craft(CodecKind::Int4, TopKValues::Int8, 8, 3, &body);
    assert!(matches!(decode(&b, &lim()), Err(CodecError::Malformed(_))));
    body[5] = 0x01;
    let b = craft(CodecKind::Int4, TopKValues::Int8, 8, 3, &body);
    assert_eq!(decode(&b, &lim()).unwrap(), vec![1.0, 1.0, 1.0]);
    // sign1 with 3 values: bits 3..8 must be zero.
    let mut body = f32_body(&[2.0]);
    body.push(0b1010);
    let b = craft(CodecKind::Sign1, TopKValues::Int8, 8, 3, &body);
    assert!(matches!(decode(&b, &lim()), Err(CodecError::Malformed(_))));
    body[4] = 0b010;
    let b = craft(CodecKind::Sign1, TopKValues::Int8, 8, 3, &body);
    assert_eq!(decode(&b, &lim()).unwrap(), vec![2.0, -2.0, 2.0]);
}

#[test]
fn zstd_frames_are_checked_against_the_header() {
    let v = data(300, 3);
    let c = cfg(CodecKind::Int8, 0, 64);
    let raw = encode(&v, &c, 0).unwrap();
    let body = &raw[HEADER_LEN..];
    let mut h = peek_header(&raw).unwrap();
    h.zstd = true;
    let frame = |content: &[u8]| {
        let mut b = h.to_bytes().to_vec();
        b.extend_from_slice(&zstd::bulk::compress(content, 1).unwrap());
        b
    };
    assert_eq!(
        decode(&frame(body), &lim()).unwrap(),
        decode(&raw, &lim()).unwrap()
    );
    assert!(matches!(
        decode(&frame(&body[1..]), &lim()),
        Err(CodecError::Malformed(_))
    ));
    let mut longer = body.to_vec();
    longer.push(0);
    assert!(matches!(
        decode(&frame(&longer), &lim()),
        Err(CodecError::Malformed(_))
    ));
    // Not a zstd frame at all.
    let mut b = h.to_bytes().to_vec();
    b.extend_from_slice(body);
    assert!(matches!(decode(&b, &lim()), Err(CodecError::Malformed(_))));
    // A frame without a content size in its header.
    let mut enc = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
    enc.include_contentsize(false).unwrap();
    std::io::Write::write_all(&mut enc, body).unwrap();
    let mut b = h.to_bytes().to_vec();
    b.extend_from_slice(&enc.finish().unwrap());
    assert!(matches!(decode(&b, &lim()), Err(CodecError::Malformed(_))));
    // Two frames where one is expected.
    let mut b = frame(body);
    b.extend_from_slice(&zstd::bulk::compress(b"x", 1).unwrap());
    assert!(decode(&b, &lim()).is_err());
}
