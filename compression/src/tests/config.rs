//! Config parsing (the `[compression]` table of a TOML run config) and validation.

use super::*;

#[derive(serde::Deserialize)]
struct RunConfig {
    #[serde(default)]
    compression: CodecConfig,
}

#[test]
fn defaults() {
    let c = CodecConfig::default();
    assert_eq!(c.codec, CodecKind::Fp32);
    assert_eq!(c.block_size, 256);
    assert_eq!(c.topk_fraction, 0.01);
    assert_eq!(c.topk_values, TopKValues::Int8);
    assert_eq!(c.zstd_level, 1);
    assert!(!c.stochastic_rounding);
    assert!(c.validate().is_ok());
    assert_eq!(DecodeLimits::default().max_values, 1 << 28);
    assert_eq!(DecodeLimits::default().max_encoded_bytes, 1 << 30);
}

#[test]
fn toml_table_with_defaults_and_lowercase_names() {
    let r: RunConfig = toml::from_str(
        "[compression]\ncodec = \"topk\"\ntopk_fraction = 0.05\ntopk_values = \"fp16\"\n",
    )
    .unwrap();
    assert_eq!(
        r.compression,
        CodecConfig {
            codec: CodecKind::TopK,
            topk_fraction: 0.05,
            topk_values: TopKValues::Fp16,
            ..Default::default()
        }
    );
    let r: RunConfig = toml::from_str("").unwrap();
    assert_eq!(r.compression, CodecConfig::default());
    for (name, kind) in ["fp32", "fp16", "bf16", "int8", "int4", "sign1", "topk"]
        .iter()
        .zip(CodecKind::ALL)
    {
        let r: RunConfig = toml::from_str(&format!(
            "[compression]\ncodec = \"{name}\"\nblock_size = 128\nzstd_level = 0\nstochastic_rounding = true\n"
        ))
        .unwrap();
        assert_eq!(r.compression.codec, kind);
        assert_eq!(r.compression.block_size, 128);
        assert_eq!(r.compression.zstd_level, 0);
        assert!(r.compression.stochastic_rounding);
        let back = toml::to_string(&r.compression).unwrap();
        assert!(back.contains(&format!("codec = \"{name}\"")), "{back}");
        assert_eq!(toml::from_str::<CodecConfig>(&back).unwrap(), r.compression);
    }
    assert!(toml::from_str::<RunConfig>("[compression]\ncodec = \"int2\"\n").is_err());
    assert!(toml::from_str::<RunConfig>("[compression]\nblocksize = 64\n").is_err());
}

#[test]
fn validate_ranges() {
    let ok = |c: CodecConfig| c.validate().is_ok();
    let base = CodecConfig::default();
    assert!(ok(CodecConfig {
        block_size: 8,
        ..base.clone()
    }));
    assert!(ok(CodecConfig {
        block_size: 65_536,
        ..base.clone()
    }));
    assert!(!ok(CodecConfig {
        block_size: 7,
        ..base.clone()
    }));
    assert!(!ok(CodecConfig {
        block_size: 65_537,
        ..base.clone()
    }));
    assert!(ok(CodecConfig {
        topk_fraction: 1.0,
        ..base.clone()
    }));
    assert!(!ok(CodecConfig {
        topk_fraction: 0.0,
        ..base.clone()
    }));
    assert!(!ok(CodecConfig {
        topk_fraction: 1.01,
        ..base.clone()
    }));
    assert!(!ok(CodecConfig {
        topk_fraction: f32::NAN,
        ..base.clone()
    }));
    assert!(ok(CodecConfig {
        zstd_level: 0,
        ..base.clone()
    }));
    assert!(ok(CodecConfig {
        zstd_level: 19,
        ..base.clone()
    }));
    assert!(!ok(CodecConfig {
        zstd_level: 20,
        ..base.clone()
    }));
    assert!(!ok(CodecConfig {
        zstd_level: -1,
        ..base
    }));
    let e = CodecConfig {
        block_size: 3,
        ..Default::default()
    }
    .validate()
    .unwrap_err();
    assert!(e.to_string().contains("block_size 3"), "{e}");
}
